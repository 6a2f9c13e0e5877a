//! The `[ha]` section: sharing pipelines between instances (see `ha::lease`).

use std::time::Duration;

use serde::Deserialize;

/// The `[ha]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// Share pipelines between instances through leases. Default: false (every pipeline of
    /// the config runs here).
    #[serde(default)]
    pub enabled: bool,
    /// KV bucket of leases and presence keys; created (with `max_age` = the TTL) when
    /// missing. Every instance sharing the work must use the same bucket and TTL. Default:
    /// `tidegate-leases`.
    #[serde(default = "default_bucket")]
    pub bucket: String,
    /// Lease time-to-live in milliseconds (at least 1000). A dead owner's pipelines are taken
    /// over about this long after its last renewal. Default: 10000.
    #[serde(default = "default_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// This instance's name in leases and logs (letters, digits, `-`, `_`). Default:
    /// `<hostname>-<pid>`.
    pub instance: Option<String>,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            enabled: false,
            bucket: default_bucket(),
            lease_ttl_ms: default_ttl_ms(),
            instance: None,
        }
    }
}

fn default_bucket() -> String {
    "tidegate-leases".into()
}

fn default_ttl_ms() -> u64 {
    10_000
}

impl HaConfig {
    /// Checks the section; the message names the key at fault (the first of
    /// `problems`).
    pub fn validate(&self) -> Result<(), String> {
        self.problems().into_iter().next().map_or(Ok(()), Err)
    }

    /// Every problem of the section, in key order, each naming its key: the whole file's
    /// problems are reported together.
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.lease_ttl_ms < 1000 {
            problems.push(format!(
                "ha.lease_ttl_ms = {} is below the minimum of 1000",
                self.lease_ttl_ms
            ));
        }
        if let Some(name) = self.instance.as_ref().filter(|name| !is_key_token(name)) {
            problems.push(format!(
                "ha.instance = '{name}': use letters, digits, '-' and '_' only"
            ));
        }
        if !is_key_token(&self.bucket) {
            problems.push(format!(
                "ha.bucket = '{}': use letters, digits, '-' and '_' only",
                self.bucket
            ));
        }
        problems
    }

    /// The lease time-to-live.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}

fn is_key_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
