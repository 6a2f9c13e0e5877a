//! `{{name}}`: a tidegate filter plugin.
//!
//! Keeps the events whose document has `status` equal to the configured `status` (default
//! `active`), and every delete (a delete carries no document). Config, in tidegate's TOML:
//!
//! ```toml
//! [[pipeline.plugins]]
//! name = "{{name}}"
//! config = { status = "active" }
//! ```

use tidegate_plugin::{Config, ConfigKeys, Error, Event, Filter, Operation};

pub struct Plugin {
    status: String,
}

impl Filter for Plugin {
    /// Any other key (a typo) makes `init` fail, naming it.
    const CONFIG_KEYS: ConfigKeys = ConfigKeys::Only(&["status"]);

    fn init(config: &Config) -> Result<Self, Error> {
        let status = config.get("status").unwrap_or("active").to_owned();
        if status.is_empty() {
            return Err(Error::invalid_config("`status` must not be empty"));
        }
        Ok(Plugin { status })
    }

    fn filter(&self, event: &Event) -> Result<bool, Error> {
        if event.operation == Operation::Delete {
            return Ok(true);
        }
        let Some(doc) = event.document() else {
            return Ok(false);
        };
        Ok(doc.get_str("status")? == Some(self.status.as_str()))
    }
}

tidegate_plugin::filter!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugin(status: &str) -> Plugin {
        Plugin::init_checked(&Config::from_pairs([("status", status)])).expect("valid config")
    }

    #[test]
    fn keeps_matching_status_and_deletes() {
        let p = plugin("active");
        let active = Event::insert("shop", "users", json!({"_id": 1, "status": "active"}));
        let closed = Event::insert("shop", "users", json!({"_id": 2, "status": "closed"}));
        assert!(p.filter(&active).unwrap());
        assert!(!p.filter(&closed).unwrap());
        assert!(p.filter(&Event::delete("shop", "users", json!(1))).unwrap());
    }

    #[test]
    fn wrong_type_is_an_invalid_event() {
        let e = Event::insert("shop", "users", json!({"status": 3}));
        assert!(matches!(plugin("active").filter(&e), Err(Error::InvalidEvent(_))));
    }

    #[test]
    fn empty_status_and_unknown_keys_are_refused() {
        assert!(Plugin::init_checked(&Config::from_pairs([("status", "")])).is_err());
        assert!(Plugin::init_checked(&Config::from_pairs([("stauts", "active")])).is_err());
    }
}
