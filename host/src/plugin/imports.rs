//! What the host offers plugins to call, for every contract version: `log`, `config`, and
//! (0.2) `event`, which reads the current call's documents (and its rarer metadata) in place.

use bson::raw::{RawBsonRef, RawDocument};

use super::contract::{v0_1, v0_2};
use crate::model::{ejson, Change};
use crate::sandbox::PluginState;

impl v0_1::types::Host for PluginState {}
impl v0_2::types::Host for PluginState {}

/// One line, escaped (see `telemetry::escape`), within the call's log budget, tagged with the
/// unit, tenant and plugin that wrote it. `level`: 0 debug, 1 info, 2 warn, 3 error.
fn write_log(state: &mut PluginState, level: u8, message: &str) {
    let Some(admitted) = state.log_budget().admit(message) else {
        return;
    };
    let message = crate::ops::telemetry::escape(admitted);
    let (pipeline, tenant) = (state.pipeline.as_str(), state.tenant.as_deref());
    let plugin = state.plugin.as_str();
    match level {
        0 => tracing::debug!(pipeline, tenant, plugin, "{message}"),
        1 => tracing::info!(pipeline, tenant, plugin, "{message}"),
        2 => tracing::warn!(pipeline, tenant, plugin, "{message}"),
        _ => tracing::error!(pipeline, tenant, plugin, "{message}"),
    }
}

impl v0_1::filter::tidegate::plugin::log::Host for PluginState {
    fn write(&mut self, level: v0_1::filter::tidegate::plugin::log::Level, message: String) {
        use v0_1::filter::tidegate::plugin::log::Level;
        let level = match level {
            Level::Debug => 0,
            Level::Info => 1,
            Level::Warn => 2,
            Level::Error => 3,
        };
        write_log(self, level, &message);
    }
}

impl v0_2::filter::tidegate::plugin::log::Host for PluginState {
    fn write(&mut self, level: v0_2::filter::tidegate::plugin::log::Level, message: String) {
        use v0_2::filter::tidegate::plugin::log::Level;
        let level = match level {
            Level::Debug => 0,
            Level::Info => 1,
            Level::Warn => 2,
            Level::Error => 3,
        };
        write_log(self, level, &message);
    }
}

fn config_entries(state: &PluginState) -> Vec<(String, String)> {
    state
        .config
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl v0_1::filter::tidegate::plugin::config::Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn entries(&mut self) -> Vec<(String, String)> {
        config_entries(self)
    }
}

impl v0_2::filter::tidegate::plugin::config::Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn entries(&mut self) -> Vec<(String, String)> {
        config_entries(self)
    }
}

/// The document a 0.2 `part` names in `change`.
pub fn part_of(change: &Change, part: v0_2::types::Part) -> Option<&RawDocument> {
    use v0_2::types::Part;
    match part {
        Part::DocumentKey => change.document_key(),
        Part::FullDocument => change.full_document(),
        Part::FullDocumentBeforeChange => change.full_document_before_change(),
        Part::UpdatedFields => change
            .update_description()
            .and_then(|u| u.get_document("updatedFields").ok()),
        Part::Lsid => change.lsid(),
    }
}

/// A value as relaxed Extended JSON text. BSON the host holds is well-formed (the server's, or
/// built by the host), so a failure here is malformed input: reported as `null` rather than
/// trapping the plugin, and the host's own encoding of the event reports it properly.
fn value_text(value: RawBsonRef<'_>) -> String {
    let mut out = Vec::with_capacity(32);
    match ejson::write_value(value, ejson::Mode::Relaxed, &mut out) {
        Ok(()) => String::from_utf8(out).unwrap_or_else(|_| "null".into()),
        Err(_) => "null".into(),
    }
}

impl v0_2::event::Host for PluginState {
    fn document(
        &mut self,
        part: v0_2::types::Part,
        encoding: v0_2::event::Encoding,
    ) -> Option<Vec<u8>> {
        let doc = part_of(self.event.as_deref()?, part)?;
        match encoding {
            v0_2::event::Encoding::Bson => Some(doc.as_bytes().to_vec()),
            v0_2::event::Encoding::RelaxedJson => ejson::relaxed(doc).ok(),
        }
    }

    fn get(&mut self, part: v0_2::types::Part, path: Vec<String>) -> Option<String> {
        let doc = part_of(self.event.as_deref()?, part)?;
        super::path::get(doc, &path).map(value_text)
    }

    fn find(&mut self, part: v0_2::types::Part, path: Vec<String>) -> Vec<v0_2::types::Found> {
        let Some(doc) = self.event.as_deref().and_then(|e| part_of(e, part)) else {
            return Vec::new();
        };
        super::path::find(doc, &path)
            .into_iter()
            .map(|(path, value)| v0_2::types::Found {
                path,
                value: value_text(value),
            })
            .collect()
    }

    fn to(&mut self) -> Option<v0_2::types::Namespace> {
        super::edit::to(self.event.as_deref()?)
    }

    fn update(&mut self) -> Option<v0_2::types::UpdateDetails> {
        super::edit::update_details(self.event.as_deref()?)
    }
}
