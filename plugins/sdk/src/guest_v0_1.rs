//! The wasm side for contract 0.1 (the `contract-0-1` feature): component bindings, conversions between them and the SDK's types, and the
//! per-instance plugin state. Used only by the [`filter!`](crate::filter) and
//! [`transform!`](crate::transform) macros; compiled only for wasm32.

use std::any::Any;
use std::cell::OnceCell;

pub use std::vec::Vec;

use crate::{
    ClusterTime, Config, Document, Error, Event, Filter, Namespace, Operation, Output, Transaction,
    Transform, TruncatedArray, UpdateDescription,
};

/// Bindings of the `filter` world, and the interfaces both worlds share.
pub mod filter {
    wit_bindgen::generate!({
        world: "filter",
        path: "../../wit/plugin-0.1",
        pub_export_macro: true,
        export_macro_name: "export_filter",
        default_bindings_module: "tidegate_plugin::guest::filter",
    });
}

/// Bindings of the `transform` world, reusing the `filter` world's interfaces so that one set
/// of types and conversions serves both.
pub mod transform {
    wit_bindgen::generate!({
        world: "transform",
        path: "../../wit/plugin-0.1",
        pub_export_macro: true,
        export_macro_name: "export_transform",
        default_bindings_module: "tidegate_plugin::guest::transform",
        with: {
            "tidegate:plugin/types@0.1.0": crate::guest::filter::tidegate::plugin::types,
            "tidegate:plugin/log@0.1.0": crate::guest::filter::tidegate::plugin::log,
            "tidegate:plugin/config@0.1.0": crate::guest::filter::tidegate::plugin::config,
        },
    });
}

use filter::tidegate::plugin::{config as host_config, log as host_log, types as wit};

/// What the `filter!` macro implements.
pub use filter::Guest as FilterGuest;
/// What the `transform!` macro implements.
pub use transform::Guest as TransformGuest;

/// The contract's change event.
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
    let event = from_wit(event);
    let outputs = with_plugin(P::init_checked, |p| p.transform(event)).map_err(to_wit_error)?;
    if outputs.iter().any(|o| o.payload.is_some()) {
        return Err(WitError::Failed(
            "an output replaces the payload, which contract 0.1 cannot carry: build the \
             plugin for contract 0.2 (without the SDK's `contract-0-1` feature)"
                .into(),
        ));
    }
    Ok(outputs.into_iter().map(output_to_wit).collect())
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

fn ns_to_wit(ns: Namespace) -> wit::Namespace {
    wit::Namespace {
        db: ns.db,
        coll: ns.coll,
    }
}

fn from_wit(e: WitEvent) -> Event {
    Event {
        id: e.id,
        operation: op_from_wit(e.operation),
        namespace: ns_from_wit(e.namespace),
        to: e.to.map(ns_from_wit),
        document_key: e.document_key.map(Document::from_bytes),
        full_document: e.full_document.map(Document::from_bytes),
        full_document_before_change: e.full_document_before_change.map(Document::from_bytes),
        update_description: e.update_description.map(|u| UpdateDescription {
            updated_fields: Document::from_bytes(u.updated_fields),
            removed_fields: u.removed_fields,
            truncated_arrays: u
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
        transaction: e.transaction.map(|t| Transaction {
            lsid: Document::from_bytes(t.lsid),
            txn_number: t.txn_number,
        }),
    }
}

fn to_wit(e: Event) -> WitEvent {
    WitEvent {
        id: e.id,
        operation: op_to_wit(e.operation),
        namespace: ns_to_wit(e.namespace),
        to: e.to.map(ns_to_wit),
        document_key: e.document_key.map(Document::into_bytes),
        full_document: e.full_document.map(Document::into_bytes),
        full_document_before_change: e.full_document_before_change.map(Document::into_bytes),
        update_description: e.update_description.map(|u| wit::UpdateDescription {
            updated_fields: u.updated_fields.into_bytes(),
            removed_fields: u.removed_fields,
            truncated_arrays: u
                .truncated_arrays
                .into_iter()
                .map(|t| wit::TruncatedArray {
                    field: t.field,
                    new_size: t.new_size,
                })
                .collect(),
        }),
        cluster_time: e.cluster_time.map(|t| wit::ClusterTime {
            seconds: t.seconds,
            increment: t.increment,
        }),
        wall_time_ms: e.wall_time_ms,
        transaction: e.transaction.map(|t| wit::Transaction {
            lsid: t.lsid.into_bytes(),
            txn_number: t.txn_number,
        }),
    }
}

fn output_to_wit(o: Output) -> WitOutput {
    WitOutput {
        event: to_wit(o.event),
        subject: o.subject,
        headers: o
            .headers
            .into_iter()
            .map(|h| wit::Header {
                name: h.name,
                value: h.value,
            })
            .collect(),
    }
}
