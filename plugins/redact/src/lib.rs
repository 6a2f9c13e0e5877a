//! `redact`: a tidegate `transform` plugin that replaces sensitive fields with `"[redacted]"`
//! before an event leaves the database's trust boundary.
//!
//! Config keys:
//! - `fields` (required): comma-separated dotted paths, e.g. `email,address.street`. A path
//!   through an array applies to each element (`addresses.street`); a numeric segment picks one
//!   element (`addresses.0.street`).
//!
//! Redacted: `full-document`, `full-document-before-change`, and the matching keys of an
//! update's `updated-fields` (keys equal to a path or below it are replaced whole; for keys above
//! a path, the rest of the path is redacted inside the value). `document-key` is left alone: it
//! identifies the document and the host relies on it.
//!
//! Each event becomes exactly one output, published on the pipeline's usual subject, with a
//! header `X-Redacted` giving the number of values replaced. A document that is not a JSON
//! object is an `invalid-event`. Beware: on any plugin error the host dead-letters the
//! *original* event, so the dead-letter subject sees unredacted data and needs the same access
//! control as the source collection.
//!
//! The logic lives in [`logic`] (plain Rust, tested natively); this file only adapts it to the
//! WIT bindings, which exist only when compiling for wasm32.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

mod logic;

#[cfg(target_arch = "wasm32")]
mod component {
    use std::sync::OnceLock;

    use crate::logic::{redact_bytes, Config, Kind, KNOWN_KEYS};

    wit_bindgen::generate!({
        world: "transform",
        path: "../../wit/plugin-0.1",
    });

    use tidegate::plugin::config;
    use tidegate::plugin::log::{self, Level};
    use tidegate::plugin::types::Header;

    /// Parsed once by `init`; a component instance handles one event at a time.
    static CONFIG: OnceLock<Config> = OnceLock::new();

    fn load() -> Result<Config, PluginError> {
        for (key, _) in config::entries() {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                log::write(Level::Warn, &format!("ignoring unknown config key `{key}`"));
            }
        }
        Config::parse(config::get("fields").as_deref()).map_err(PluginError::InvalidConfig)
    }

    /// The configuration, loaded on first use if the host did not call `init` first.
    fn current() -> Result<&'static Config, PluginError> {
        if let Some(c) = CONFIG.get() {
            return Ok(c);
        }
        let c = load()?;
        Ok(CONFIG.get_or_init(|| c))
    }

    /// Redacts one optional document in place, naming it in any error.
    fn redact(
        doc: &mut Option<Vec<u8>>,
        kind: Kind,
        what: &str,
        config: &Config,
    ) -> Result<usize, PluginError> {
        let Some(bytes) = doc else { return Ok(0) };
        let (count, rewritten) = redact_bytes(bytes, kind, config)
            .map_err(|e| PluginError::InvalidEvent(format!("{what}: {e}")))?;
        if let Some(rewritten) = rewritten {
            *bytes = rewritten;
        }
        Ok(count)
    }

    struct Redact;

    impl Guest for Redact {
        fn init() -> Result<(), PluginError> {
            let c = load()?;
            log::write(
                Level::Debug,
                &format!("redact configured with {} path(s)", c.paths.len()),
            );
            // A second `init` (should the host ever call it again) keeps the first configuration.
            let _ = CONFIG.set(c);
            Ok(())
        }

        fn transform(mut event: ChangeEvent) -> Result<Vec<Output>, PluginError> {
            let config = current()?;
            let mut count = redact(
                &mut event.full_document,
                Kind::Document,
                "full-document",
                config,
            )?;
            count += redact(
                &mut event.full_document_before_change,
                Kind::Document,
                "full-document-before-change",
                config,
            )?;
            if let Some(update) = &mut event.update_description {
                let mut fields = Some(std::mem::take(&mut update.updated_fields));
                let result = redact(
                    &mut fields,
                    Kind::UpdatedFields,
                    "update-description.updated-fields",
                    config,
                );
                update.updated_fields = fields.unwrap_or_default();
                count += result?;
            }
            Ok(vec![Output {
                event,
                subject: None,
                headers: vec![Header {
                    name: "X-Redacted".to_owned(),
                    value: count.to_string(),
                }],
            }])
        }
    }

    export!(Redact);
}
