//! The wasm side for contract 0.2 (the default): component bindings, conversions between
//! them and the SDK's types, and the per-instance plugin state. Used only by the
//! [`filter!`](crate::filter) and [`transform!`](crate::transform) macros and by received
//! documents reading the host ([`crate::edit`]); compiled only for wasm32.
//!
//! A received event's documents stay in the host ([`Document::in_host`]); what a transform
//! returns becomes edits for the documents it kept, a `replace` for the ones it rebuilt, and
//! new metadata only when it changed any.

use std::any::Any;
use std::cell::OnceCell;

pub use std::vec::Vec;

use crate::edit::{Edit, Part};
use crate::{
    ClusterTime, Config, Document, Error, Event, Filter, Namespace, Operation, Output, Transaction,
    Transform, TruncatedArray, UpdateDescription,
};

/// Bindings of the `filter` world, and the interfaces both worlds share.
pub mod filter {
    wit_bindgen::generate!({
        world: "filter",
        path: "../../wit/plugin-0.2",
        pub_export_macro: true,
        export_macro_name: "export_filter",
        default_bindings_module: "tidegate_plugin::guest::filter",
        // Outputs carry new metadata only when it differs from what was received.
        additional_derives: [PartialEq],
    });
}

/// Bindings of the `transform` world, reusing the `filter` world's interfaces so that one set
/// of types and conversions serves both.
pub mod transform {
    wit_bindgen::generate!({
        world: "transform",
        path: "../../wit/plugin-0.2",
        pub_export_macro: true,
        export_macro_name: "export_transform",
        default_bindings_module: "tidegate_plugin::guest::transform",
        with: {
            "tidegate:plugin/types@0.2.0": crate::guest::filter::tidegate::plugin::types,
            "tidegate:plugin/log@0.2.0": crate::guest::filter::tidegate::plugin::log,
            "tidegate:plugin/config@0.2.0": crate::guest::filter::tidegate::plugin::config,
            "tidegate:plugin/event@0.2.0": crate::guest::filter::tidegate::plugin::event,
        },
    });
}

use filter::tidegate::plugin::{
    config as host_config, event as host_event, log as host_log, types as wit,
};

/// What the `filter!` macro implements.
pub use filter::exports::tidegate::plugin::filter_api::Guest as FilterGuest;
/// What the `transform!` macro implements.
pub use transform::exports::tidegate::plugin::transform_api::Guest as TransformGuest;

/// The contract's change event (what a call carries).
pub type WitEvent = wit::ChangeEvent;
/// The contract's error.
pub type WitError = wit::PluginError;
/// The contract's output.
pub type WitOutput = wit::Output;

thread_local! {
    /// The plugin value `init` built. A component instance runs one call at a time.
    static PLUGIN: OnceCell<Box<dyn Any>> = const { OnceCell::new() };
}

/// Writes a log line through the host.
pub fn log(level: crate::log::Level, message: &str) {
    use crate::log::Level;
    let level = match level {
        Level::Debug => host_log::Level::Debug,
        Level::Info => host_log::Level::Info,
        Level::Warn => host_log::Level::Warn,
        Level::Error => host_log::Level::Error,
    };
    host_log::write(level, message);
}

fn config() -> Config {
    Config::from_pairs(host_config::entries())
}

fn part_to_wit(part: Part) -> wit::Part {
    match part {
        Part::DocumentKey => wit::Part::DocumentKey,
        Part::FullDocument => wit::Part::FullDocument,
        Part::FullDocumentBeforeChange => wit::Part::FullDocumentBeforeChange,
        Part::UpdatedFields => wit::Part::UpdatedFields,
        Part::Lsid => wit::Part::Lsid,
    }
}

/// A received part's whole text (relaxed EJSON).
pub fn document(part: Part) -> Option<Vec<u8>> {
    host_event::document(part_to_wit(part), host_event::Encoding::RelaxedJson)
}

/// One value of a received part, as relaxed EJSON text.
pub fn get(part: Part, path: &[String]) -> Option<String> {
    host_event::get(part_to_wit(part), path)
}

/// Every value a path reaches in a received part, with its location.
pub fn find(part: Part, path: &[String]) -> Vec<(Vec<String>, String)> {
    host_event::find(part_to_wit(part), path)
        .into_iter()
        .map(|f| (f.path, f.value))
        .collect()
}

/// `init` export: builds the plugin value. A second call keeps the first value.
pub fn init<P: 'static, F: FnOnce(&Config) -> crate::Result<P>>(make: F) -> Result<(), WitError> {
    let plugin = make(&config()).map_err(to_wit_error)?;
    PLUGIN.with(|cell| {
        let _ = cell.set(Box::new(plugin));
    });
    Ok(())
}

/// Runs `f` on the plugin value, building it first if the host did not call `init`.
fn with_plugin<P: 'static, R>(
    make: impl FnOnce(&Config) -> crate::Result<P>,
    f: impl FnOnce(&P) -> crate::Result<R>,
) -> crate::Result<R> {
    PLUGIN.with(|cell| {
        if cell.get().is_none() {
            let plugin = make(&config())?;
            let _ = cell.set(Box::new(plugin));
        }
        let plugin = cell
            .get()
            .and_then(|b| b.downcast_ref::<P>())
            .ok_or_else(|| Error::failed("plugin state missing"))?;
        f(plugin)
    })
}

/// `filter` export.
pub fn call_filter<P: Filter>(event: WitEvent) -> Result<bool, WitError> {
    let event = from_wit(event);
    with_plugin(P::init_checked, |p| p.filter(&event)).map_err(to_wit_error)
}

/// `transform` export.
pub fn call_transform<P: Transform>(event: WitEvent) -> Result<Vec<WitOutput>, WitError> {
    let parts = event.parts;
    let event = from_wit(event);
    let received = metadata_to_wit(&event, parts);
    let outputs = with_plugin(P::init_checked, |p| p.transform(event)).map_err(to_wit_error)?;
    Ok(outputs
        .into_iter()
        .map(|o| output_to_wit(o, &received))
        .collect())
}

fn to_wit_error(err: Error) -> WitError {
    match err {
        Error::InvalidEvent(m) => WitError::InvalidEvent(m),
        Error::InvalidConfig(m) => WitError::InvalidConfig(m),
        Error::Failed(m) => WitError::Failed(m),
    }
}

fn op_from_wit(op: wit::Operation) -> Operation {
    match op {
        wit::Operation::Insert => Operation::Insert,
        wit::Operation::Update => Operation::Update,
        wit::Operation::Replace => Operation::Replace,
        wit::Operation::Delete => Operation::Delete,
        wit::Operation::Drop => Operation::Drop,
        wit::Operation::Rename => Operation::Rename,
        wit::Operation::DropDatabase => Operation::DropDatabase,
        wit::Operation::Invalidate => Operation::Invalidate,
        wit::Operation::SnapshotRead => Operation::SnapshotRead,
        wit::Operation::Other(s) => Operation::Other(s),
    }
}

fn op_to_wit(op: Operation) -> wit::Operation {
    match op {
        Operation::Insert => wit::Operation::Insert,
        Operation::Update => wit::Operation::Update,
        Operation::Replace => wit::Operation::Replace,
        Operation::Delete => wit::Operation::Delete,
        Operation::Drop => wit::Operation::Drop,
        Operation::Rename => wit::Operation::Rename,
        Operation::DropDatabase => wit::Operation::DropDatabase,
        Operation::Invalidate => wit::Operation::Invalidate,
        Operation::SnapshotRead => wit::Operation::SnapshotRead,
        Operation::Other(s) => wit::Operation::Other(s),
    }
}

fn ns_from_wit(ns: wit::Namespace) -> Namespace {
    Namespace {
        db: ns.db,
        coll: ns.coll,
    }
}

fn ns_to_wit(ns: &Namespace) -> wit::Namespace {
    wit::Namespace {
        db: ns.db.clone(),
        coll: ns.coll.clone(),
    }
}

/// A namespace from its one-string form (`db` or `db.coll`: database names have no dot), the
/// database name keeping the received string's allocation.
fn ns_from_text(mut text: String) -> Namespace {
    match text.find('.') {
        Some(dot) => {
            let coll = text[dot + 1..].to_owned();
            text.truncate(dot);
            Namespace {
                db: text,
                coll: Some(coll),
            }
        }
        None => Namespace {
            db: text,
            coll: None,
        },
    }
}

/// The SDK's event for a received one: metadata as given (`to` and an update's details
/// asked of the host, for the events that have them), documents left in the host.
fn from_wit(e: WitEvent) -> Event {
    let has =
        |flag: wit::Parts, part: Part| e.parts.contains(flag).then(|| Document::in_host(part));
    let document_key = has(wit::Parts::DOCUMENT_KEY, Part::DocumentKey);
    let full_document = has(wit::Parts::FULL_DOCUMENT, Part::FullDocument);
    let full_document_before_change = has(
        wit::Parts::FULL_DOCUMENT_BEFORE_CHANGE,
        Part::FullDocumentBeforeChange,
    );
    let updated_fields = has(wit::Parts::UPDATED_FIELDS, Part::UpdatedFields);
    let lsid = has(wit::Parts::LSID, Part::Lsid);
    let details = match updated_fields {
        Some(_) => host_event::update(),
        None => None,
    }
    .unwrap_or(wit::UpdateDetails {
        removed_fields: Vec::new(),
        truncated_arrays: Vec::new(),
    });
    let operation = op_from_wit(e.operation);
    let to = match operation {
        Operation::Rename => host_event::to().map(ns_from_wit),
        _ => None,
    };
    Event {
        id: e.id,
        operation,
        namespace: ns_from_text(e.namespace),
        to,
        document_key,
        full_document,
        full_document_before_change,
        update_description: updated_fields.map(|updated_fields| UpdateDescription {
            updated_fields,
            removed_fields: details.removed_fields,
            truncated_arrays: details
                .truncated_arrays
                .into_iter()
                .map(|t| TruncatedArray {
                    field: t.field,
                    new_size: t.new_size,
                })
                .collect(),
        }),
        cluster_time: e.cluster_time.map(|t| ClusterTime {
            seconds: t.seconds,
            increment: t.increment,
        }),
        wall_time_ms: e.wall_time_ms,
        transaction: e.txn_number.map(|txn_number| Transaction {
            lsid: lsid.unwrap_or_else(|| Document::from_bytes(b"{}".to_vec())),
            txn_number,
        }),
    }
}

/// What the host must do to a part so it becomes `doc`: the edits made to a kept document,
/// a `replace` for a rebuilt (or moved) one, a removal for a dropped one.
fn part_edits(part: Part, doc: Option<Document>, received: bool, out: &mut Vec<wit::Edit>) {
    let wit_part = part_to_wit(part);
    match doc {
        None if received => out.push(wit::Edit::Replace(wit::ReplacePart {
            part: wit_part,
            document: None,
        })),
        None => {}
        Some(doc) if doc.origin() == Some(part) => {
            out.extend(doc.edits().iter().map(|e| edit_to_wit(wit_part, e)));
        }
        Some(doc) => out.push(wit::Edit::Replace(wit::ReplacePart {
            part: wit_part,
            document: Some(String::from_utf8_lossy(&doc.into_bytes()).into_owned()),
        })),
    }
}

fn edit_to_wit(part: wit::Part, edit: &Edit) -> wit::Edit {
    match edit {
        Edit::Set(path, value) => wit::Edit::Set(wit::SetValue {
            part,
            path: path.clone(),
            value: value.to_string(),
        }),
        Edit::Unset(path) => wit::Edit::Unset(wit::Location {
            part,
            path: path.clone(),
        }),
        Edit::Rename(path, to) => wit::Edit::Rename(wit::RenameField {
            part,
            path: path.clone(),
            to: to.clone(),
        }),
    }
}

/// The contract's metadata of `e` (everything but its documents), with the parts it was
/// received with.
fn metadata_to_wit(e: &Event, parts: wit::Parts) -> wit::Metadata {
    wit::Metadata {
        id: e.id.clone(),
        operation: op_to_wit(e.operation.clone()),
        namespace: ns_to_wit(&e.namespace),
        to: e.to.as_ref().map(ns_to_wit),
        parts,
        update: e.update_description.as_ref().map(|u| wit::UpdateDetails {
            removed_fields: u.removed_fields.clone(),
            truncated_arrays: u
                .truncated_arrays
                .iter()
                .map(|t| wit::TruncatedArray {
                    field: t.field.clone(),
                    new_size: t.new_size,
                })
                .collect(),
        }),
        cluster_time: e.cluster_time.map(|t| wit::ClusterTime {
            seconds: t.seconds,
            increment: t.increment,
        }),
        wall_time_ms: e.wall_time_ms,
        txn_number: e.transaction.as_ref().map(|t| t.txn_number),
    }
}

/// Whether `e`'s metadata is still `m`'s: [`metadata_to_wit`] compared field by field, without
/// building the record. Nearly every output keeps what it received, and building a record
/// only to compare it (its strings cloned, then freed) was a tenth of a transform call.
fn same_metadata(e: &Event, m: &wit::Metadata) -> bool {
    let same_ns = |ns: &Namespace, w: &wit::Namespace| ns.db == w.db && ns.coll == w.coll;
    let same_op = match (&e.operation, &m.operation) {
        (Operation::Other(a), wit::Operation::Other(b)) => a == b,
        (Operation::Other(_), _) | (_, wit::Operation::Other(_)) => false,
        (a, b) => op_to_wit(a.clone()) == *b,
    };
    let same_update = match (&e.update_description, &m.update) {
        (None, None) => true,
        (Some(u), Some(w)) => {
            u.removed_fields == w.removed_fields
                && u.truncated_arrays.len() == w.truncated_arrays.len()
                && u.truncated_arrays
                    .iter()
                    .zip(&w.truncated_arrays)
                    .all(|(t, w)| t.field == w.field && t.new_size == w.new_size)
        }
        _ => false,
    };
    e.id == m.id
        && same_op
        && same_ns(&e.namespace, &m.namespace)
        && match (&e.to, &m.to) {
            (None, None) => true,
            (Some(a), Some(b)) => same_ns(a, b),
            _ => false,
        }
        && same_update
        && e.cluster_time.map(|t| (t.seconds, t.increment))
            == m.cluster_time.map(|t| (t.seconds, t.increment))
        && e.wall_time_ms == m.wall_time_ms
        && e.transaction.as_ref().map(|t| t.txn_number) == m.txn_number
}

fn output_to_wit(o: Output, received: &wit::Metadata) -> WitOutput {
    let e = o.event;
    let parts = received.parts;
    let metadata = (!same_metadata(&e, received)).then(|| metadata_to_wit(&e, parts));
    let mut edits = Vec::new();
    part_edits(
        Part::DocumentKey,
        e.document_key,
        parts.contains(wit::Parts::DOCUMENT_KEY),
        &mut edits,
    );
    part_edits(
        Part::FullDocument,
        e.full_document,
        parts.contains(wit::Parts::FULL_DOCUMENT),
        &mut edits,
    );
    part_edits(
        Part::FullDocumentBeforeChange,
        e.full_document_before_change,
        parts.contains(wit::Parts::FULL_DOCUMENT_BEFORE_CHANGE),
        &mut edits,
    );
    part_edits(
        Part::UpdatedFields,
        e.update_description.map(|u| u.updated_fields),
        parts.contains(wit::Parts::UPDATED_FIELDS),
        &mut edits,
    );
    part_edits(
        Part::Lsid,
        e.transaction.map(|t| t.lsid),
        parts.contains(wit::Parts::LSID),
        &mut edits,
    );
    WitOutput {
        edits,
        metadata,
        subject: o.subject,
        headers: o
            .headers
            .into_iter()
            .map(|h| wit::Header {
                name: h.name,
                value: h.value,
            })
            .collect(),
        payload: o.payload.map(|p| wit::Payload {
            bytes: p.bytes,
            content_type: p.content_type,
        }),
    }
}
