//! `redact`: a tidegate `transform` plugin that removes or disguises sensitive fields (PII)
//! before an event leaves the database's trust boundary.
//!
//! Config keys (at least one of the first four; each a comma-separated list of dotted paths):
//! - `fields`: replace the value with `"[redacted]"`.
//! - `drop`: remove the field (or, for a numeric last segment, the array element).
//! - `mask`: replace the value by a string of `*` keeping its last `mask-keep` characters
//!   (default 4, never more than half); non-strings are masked as their JSON text.
//! - `hash`: replace the value by the hex HMAC-SHA-256 of its text (strings as is, anything
//!   else as its JSON text) under `hash-key`, so equal values still join but cannot be read.
//! - `mask-keep`: characters `mask` leaves visible (default 4).
//! - `hash-key`: the HMAC key, at least 16 characters; required with `hash`.
//!
//! A path through an array applies to each element (`addresses.street`); a numeric segment
//! picks one element (`addresses.0.street`). A path may be listed under one action only.
//!
//! Applied to `full-document`, `full-document-before-change` and an update's
//! `updated-fields` (keys equal to a path or below it are acted on whole; for keys above a
//! path, the rest of the path is acted on inside the value). `document-key` is left alone: it
//! identifies the document and the host relies on it.
//!
//! Each event becomes exactly one output, published on the pipeline's usual subject, with a
//! header `X-Redacted` giving the number of values changed. A document that is not a JSON
//! object is an `invalid-event`. Beware: on any plugin error the host dead-letters the
//! *original* event, so the dead-letter subject sees unredacted data and needs the same access
//! control as the source collection.

mod logic;

use tidegate_plugin::{
    Config as PluginConfig, ConfigKeys, Document, Error, Event, Output, Transform,
};

pub use logic::{redact_bytes, Action, Config, Kind, KNOWN_KEYS};

/// The plugin: its parsed configuration.
pub struct Redact(Config);

impl Redact {
    /// Redacts one optional document in place, naming it in any error.
    fn redact(&self, doc: &mut Option<Document>, kind: Kind, what: &str) -> Result<usize, Error> {
        let Some(current) = doc else { return Ok(0) };
        if kind == Kind::Document {
            let in_place = self
                .redact_in_place(current)
                .map_err(|e| Error::invalid_event(format!("{what}: {}", e.message())))?;
            if let Some(count) = in_place {
                return Ok(count);
            }
        }
        let (count, rewritten) = redact_bytes(current.as_bytes(), kind, &self.0)
            .map_err(|e| Error::invalid_event(format!("{what}: {e}")))?;
        if let Some(rewritten) = rewritten {
            *current = Document::from_bytes(rewritten);
        }
        Ok(count)
    }

    /// Redacts a document by edits: the values each rule reaches are located (by the host,
    /// for a received document, without converting the document) and replaced or removed one
    /// by one, so the host changes only those values of the original BSON. `None` when the
    /// rules could interact — one reached value inside (or the same as) another, or an array element dropped
    /// (which moves the later ones) — and the whole-document pass must decide instead.
    fn redact_in_place(&self, doc: &mut Document) -> Result<Option<usize>, Error> {
        let mut plan = Vec::new();
        for rule in &self.0.rules {
            for found in doc.find(&rule.path.join("."))? {
                let numeric_last = found
                    .path
                    .last()
                    .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()));
                if rule.action == Action::Drop && numeric_last && found.path.len() > 1 {
                    return Ok(None);
                }
                plan.push((found, rule.action));
            }
        }
        let nested = plan.iter().enumerate().any(|(i, (a, _))| {
            plan.iter()
                .enumerate()
                .any(|(j, (b, _))| i != j && b.path.starts_with(&a.path))
        });
        if nested {
            return Ok(None);
        }
        let count = plan.len();
        for (found, action) in plan {
            match action {
                Action::Drop => doc.unset_at(found.path)?,
                action => doc.set_at(found.path, self.0.replacement(action, &found.value))?,
            }
        }
        Ok(Some(count))
    }
}

impl Transform for Redact {
    const CONFIG_KEYS: ConfigKeys = ConfigKeys::Only(KNOWN_KEYS);

    fn init(config: &PluginConfig) -> Result<Self, Error> {
        let c = Config::parse(config)?;
        tidegate_plugin::log::debug(&format!("redact configured with {} path(s)", c.rules.len()));
        Ok(Redact(c))
    }

    fn transform(&self, mut event: Event) -> Result<Vec<Output>, Error> {
        let mut count = self.redact(&mut event.full_document, Kind::Document, "full-document")?;
        count += self.redact(
            &mut event.full_document_before_change,
            Kind::Document,
            "full-document-before-change",
        )?;
        if let Some(update) = &mut event.update_description {
            let mut fields = Some(update.updated_fields.clone());
            count += self.redact(
                &mut fields,
                Kind::UpdatedFields,
                "update-description.updated-fields",
            )?;
            if let Some(fields) = fields {
                update.updated_fields = fields;
            }
        }
        Ok(vec![
            Output::new(event).header("X-Redacted", count.to_string())
        ])
    }
}

tidegate_plugin::transform!(Redact);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Through the trait: documents and updated fields redacted, the key untouched, the
    /// count in the header; an untouched document keeps its exact bytes.
    #[test]
    fn transform_event() {
        let r = Redact::init_checked(&PluginConfig::from_pairs([("fields", "email")])).unwrap();
        let event = Event::update(
            "shop",
            "users",
            json!("u1"),
            json!({"email": "x@y.z", "n": 1}),
            Some(json!({"_id": "u1", "email": "x@y.z"})),
        );
        let out = r.transform(event.clone()).unwrap();
        assert_eq!(out.len(), 1);
        let e = &out[0].event;
        assert_eq!(
            e.full_document.as_ref().unwrap().get_str("email").unwrap(),
            Some("[redacted]")
        );
        let fields = &e.update_description.as_ref().unwrap().updated_fields;
        assert_eq!(fields.get_str("email").unwrap(), Some("[redacted]"));
        assert_eq!(e.document_key, event.document_key);
        assert_eq!(out[0].headers[0].name, "X-Redacted");
        assert_eq!(out[0].headers[0].value, "2");

        let untouched = Event::insert("shop", "users", json!({"_id": 1, "name": "n"}));
        let out = r.transform(untouched.clone()).unwrap();
        assert_eq!(out[0].event.full_document, untouched.full_document);
        assert_eq!(out[0].headers[0].value, "0");
    }

    #[test]
    fn not_an_object_is_invalid_event() {
        let r = Redact::init_checked(&PluginConfig::from_pairs([("fields", "email")])).unwrap();
        let mut event = Event::insert("a", "b", json!({}));
        event.full_document = Some(Document::from_bytes(b"[1]".to_vec()));
        let err = r.transform(event).err().unwrap();
        assert!(matches!(err, Error::InvalidEvent(m) if m.starts_with("full-document")));
    }

    /// A misspelt key would leave its fields in clear: `init` refuses it by name.
    #[test]
    fn unknown_keys_are_refused() {
        let config = PluginConfig::from_pairs([("fields", "name"), ("feilds", "email")]);
        let err = Redact::init_checked(&config).err().unwrap().to_string();
        assert!(err.contains("unknown config key `feilds`"), "{err}");
        assert!(err.contains("`fields`, `drop`, `mask`"), "{err}");
    }
}
