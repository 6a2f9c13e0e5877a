//! The plugin's settings: string key/values from its `config` table in tidegate's TOML.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::str::FromStr;

use serde_json::Value;

use crate::error::{Error, Result};

/// The config keys a plugin accepts: its `CONFIG_KEYS` (see
/// [`Filter::CONFIG_KEYS`](crate::Filter::CONFIG_KEYS)), checked by [`Config::check_keys`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigKeys {
    /// These keys only; any other one makes `init` fail with an error naming it.
    Only(&'static [&'static str]),
    /// Any key: the opt-out for plugins whose keys are free-form (say, one header per key).
    /// Such a plugin cannot tell a typo from a new key: use it only when keys are data.
    Any,
}

/// A plugin's configuration: the string keys and values of its
/// `[[pipeline.plugins]] config = { … }` table. Typed getters turn a bad value into an
/// [`Error::InvalidConfig`] that names the key, which stops tidegate at start-up.
///
/// ```
/// use tidegate_plugin::Config;
///
/// let config = Config::from_pairs([("copies", "3"), ("fields", "email, address.street")]);
/// assert_eq!(config.parse::<u32>("copies")?, Some(3));
/// assert_eq!(config.list("fields")?, Some(vec!["email".to_owned(), "address.street".to_owned()]));
/// assert_eq!(config.get("missing"), None);
/// assert!(config.require("missing").is_err());
/// # Ok::<(), tidegate_plugin::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    entries: BTreeMap<String, String>,
}

impl Config {
    /// A configuration from key/value pairs (the host's, or a unit test's).
    ///
    /// ```
    /// # use tidegate_plugin::Config;
    /// assert_eq!(Config::from_pairs([("a", "1")]).get("a"), Some("1"));
    /// ```
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Config {
        Config {
            entries: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The raw value of `key`.
    ///
    /// ```
    /// # use tidegate_plugin::Config;
    /// assert_eq!(Config::default().get("a"), None);
    /// ```
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// The raw value of `key`, or an error saying it is required.
    ///
    /// ```
    /// # use tidegate_plugin::Config;
    /// let err = Config::default().require("fields").unwrap_err();
    /// assert_eq!(err.to_string(), "invalid-config: `fields` is required");
    /// ```
    pub fn require(&self, key: &str) -> Result<&str> {
        self.get(key)
            .ok_or_else(|| Error::invalid_config(format!("`{key}` is required")))
    }

    /// `key` parsed with [`FromStr`] (after trimming blanks); `None` when absent.
    ///
    /// ```
    /// # use tidegate_plugin::Config;
    /// let c = Config::from_pairs([("n", " 5 "), ("bad", "five")]);
    /// assert_eq!(c.parse::<u8>("n")?, Some(5));
    /// assert!(c.parse::<u8>("bad").is_err());
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn parse<T>(&self, key: &str) -> Result<Option<T>>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|err| {
                Error::invalid_config(format!("`{key}`: cannot parse {v:?}: {err}"))
            }),
        }
    }

    /// `key` as a comma-separated list, blanks around entries trimmed; `None` when absent.
    /// An empty entry (`a,,b`, a trailing comma, an empty value) is an error: it is almost
    /// always a mistake.
    ///
    /// ```
    /// # use tidegate_plugin::Config;
    /// let c = Config::from_pairs([("ok", "a, b"), ("bad", "a,,b")]);
    /// assert_eq!(c.list("ok")?, Some(vec!["a".to_owned(), "b".to_owned()]));
    /// assert!(c.list("bad").is_err());
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn list(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        value
            .split(',')
            .map(str::trim)
            .map(|item| {
                if item.is_empty() {
                    Err(Error::invalid_config(format!(
                        "`{key}` has an empty entry in {value:?}"
                    )))
                } else {
                    Ok(item.to_owned())
                }
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// `key` parsed as JSON, for settings with structure (in TOML, write it in a `'''…'''`
    /// literal string); `None` when absent.
    ///
    /// ```
    /// # use tidegate_plugin::Config;
    /// let c = Config::from_pairs([("rule", r#"{"a": [1, 2]}"#)]);
    /// assert_eq!(c.json("rule")?, Some(serde_json::json!({"a": [1, 2]})));
    /// assert!(Config::from_pairs([("rule", "{")]).json("rule").is_err());
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn json(&self, key: &str) -> Result<Option<Value>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => serde_json::from_str(v)
                .map(Some)
                .map_err(|err| Error::invalid_config(format!("`{key}` is not valid JSON: {err}"))),
        }
    }

    /// The configured keys not in `known`, sorted: probably typos.
    ///
    /// ```
    /// # use tidegate_plugin::Config;
    /// let c = Config::from_pairs([("fields", "a"), ("feilds", "b")]);
    /// assert_eq!(c.unknown_keys(&["fields"]), ["feilds"]);
    /// ```
    pub fn unknown_keys(&self, known: &[&str]) -> Vec<&str> {
        self.entries
            .keys()
            .map(String::as_str)
            .filter(|k| !known.contains(k))
            .collect()
    }

    /// An [`Error::InvalidConfig`] naming every configured key that `allowed` does not
    /// accept, and listing the ones it does. A misspelt key must never be ignored: for a
    /// redaction plugin, `feilds = "email"` would publish the e-mail address in clear. The
    /// [`filter!`](crate::filter) and [`transform!`](crate::transform) glue calls it with
    /// the plugin's `CONFIG_KEYS` before `init` (see [`Filter::init_checked`](crate::Filter::init_checked)).
    ///
    /// ```
    /// # use tidegate_plugin::{Config, ConfigKeys};
    /// let c = Config::from_pairs([("fields", "a"), ("feilds", "b")]);
    /// let err = c.check_keys(ConfigKeys::Only(&["fields", "mode"])).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invalid-config: unknown config key `feilds` (known keys: `fields`, `mode`)"
    /// );
    /// assert!(c.check_keys(ConfigKeys::Only(&["fields", "feilds"])).is_ok());
    /// assert!(c.check_keys(ConfigKeys::Any).is_ok());
    /// ```
    pub fn check_keys(&self, allowed: ConfigKeys) -> Result<()> {
        let ConfigKeys::Only(known) = allowed else {
            return Ok(());
        };
        let unknown = self.unknown_keys(known);
        if unknown.is_empty() {
            return Ok(());
        }
        let quote = |keys: &[&str]| {
            keys.iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let plural = if unknown.len() == 1 { "" } else { "s" };
        let known = match known {
            [] => "this plugin takes no config keys".to_owned(),
            known => format!("known keys: {}", quote(known)),
        };
        Err(Error::invalid_config(format!(
            "unknown config key{plural} {} ({known})",
            quote(&unknown)
        )))
    }

    /// Every key and value, sorted by key.
    ///
    /// ```
    /// # use tidegate_plugin::Config;
    /// let c = Config::from_pairs([("b", "2"), ("a", "1")]);
    /// assert_eq!(c.entries().collect::<Vec<_>>(), [("a", "1"), ("b", "2")]);
    /// ```
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}
