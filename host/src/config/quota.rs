//! What one unit (a tenant, or a pipeline without tenants) may consume in all, beyond each
//! plugin's own limits: `[pipeline.tenant.quota]` or `[pipeline.quota]`.
//!
//! Counts and sizes are checked when the config is loaded (a chain over them is refused
//! with the key at fault); rates are throttled while the unit runs: the unit waits before
//! its next events, its change stream is read more slowly, and nothing is dropped (see
//! `pipeline::chain_thread`). Every key is optional; absent means no quota.

use serde::Deserialize;

use super::pipeline::PipelineConfig;
use super::validate::Problems;

/// A unit's quota.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Most plugins in the unit's chain. Checked at load.
    pub plugins: Option<u32>,
    /// Most memory all the unit's plugin instances may hold together, in MiB: the sum of
    /// their `limits.memory_mib` (each instance is capped at its own). Checked at load.
    pub memory_mib: Option<u64>,
    /// Most CPU the unit's plugin chain may use on average, in cores (`0.25` = a quarter of
    /// one core). After a turn on the worker pool that used `c` of CPU, the unit waits
    /// `c × (1 / cpu_share − 1)` before its next turn.
    pub cpu_share: Option<f64>,
    /// Most change events per second through the unit's chain (each event counts once,
    /// whatever it becomes), with a burst of one second's worth.
    pub events_per_sec: Option<f64>,
    /// Most bytes per second of messages the unit publishes (payload and headers), with a
    /// burst of one second's worth.
    pub bytes_per_sec: Option<u64>,
}

/// The quota's keys that must be positive, and what the unit's chain asks against its
/// counts.
pub(super) fn check_quota(unit: &PipelineConfig, problems: &mut Problems) {
    let quota = &unit.quota;
    let at = format!("pipeline '{}': quota", unit.id);
    let positive = [
        ("plugins", quota.plugins.map(f64::from)),
        ("memory_mib", quota.memory_mib.map(|m| m as f64)),
        ("cpu_share", quota.cpu_share),
        ("events_per_sec", quota.events_per_sec),
        ("bytes_per_sec", quota.bytes_per_sec.map(|b| b as f64)),
    ];
    for (key, value) in positive {
        if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            problems.push(format!("{at}.{key} must be a number greater than zero"));
        }
    }
    if let Some(max) = quota.plugins {
        if unit.plugins.len() > max as usize {
            problems.push(format!(
                "{at}.plugins: the chain has {} plugins; the quota allows {max}",
                unit.plugins.len()
            ));
        }
    }
    if let Some(max) = quota.memory_mib {
        let total: u64 = unit
            .plugins
            .iter()
            .map(|p| u64::from(unit.plugin_limits(p).memory_mib))
            .sum();
        if total > max {
            problems.push(format!(
                "{at}.memory_mib: the plugins' limits.memory_mib add up to {total} MiB; the \
                 quota allows {max} MiB (lower a plugin's limits.memory_mib or raise the quota)"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    /// Two tenants, `acme` with two plugins of 16 MiB each and `quota_line` in its table.
    fn config(quota_line: &str) -> Result<Config, String> {
        let text = format!(
            r#"
            [nats]
            url = "nats://127.0.0.1:4222"
            [[pipeline]]
            id = "shop"
            mongodb_uri = "mongodb://127.0.0.1:27017/?replicaSet=rs0"
            database = "shop"
            [[pipeline.tenant]]
            id = "acme"
            namespaces = ["shop.orders"]
            limits = {{ memory_mib = 16 }}
            {quota_line}
            [pipeline.tenant.sink]
            stream = "ACME"
            subject_prefix = "acme"
            [[pipeline.tenant.plugins]]
            name = "op-filter"
            [[pipeline.tenant.plugins]]
            name = "redact"
            [[pipeline.tenant]]
            id = "globex"
            namespaces = ["shop.returns"]
            [pipeline.tenant.sink]
            stream = "GLOBEX"
            subject_prefix = "globex"
            "#
        );
        Config::parse(&text, Path::new("/etc/tidegate"), |_| None)
    }

    /// A tenant's quota reaches its unit only; counts and sizes within it load.
    #[test]
    fn a_tenant_quota_belongs_to_its_unit() {
        let config = config(
            "quota = { plugins = 2, memory_mib = 32, cpu_share = 0.5, events_per_sec = 100.0, \
             bytes_per_sec = 100000 }",
        )
        .expect("valid");
        let acme = &config.pipelines[0].quota;
        assert_eq!(acme.plugins, Some(2));
        assert_eq!(acme.cpu_share, Some(0.5));
        assert_eq!(acme.events_per_sec, Some(100.0));
        assert_eq!(config.pipelines[1].quota, super::Quota::default());
    }

    /// A chain over its quota of plugins or memory is refused at load, naming the key;
    /// rates must be positive.
    #[test]
    fn a_chain_over_its_quota_is_refused() {
        let cases = [
            (
                "quota = { plugins = 1 }",
                "quota.plugins: the chain has 2 plugins",
            ),
            ("quota = { memory_mib = 31 }", "add up to 32 MiB"),
            ("quota = { cpu_share = 0.0 }", "quota.cpu_share must be"),
            (
                "quota = { events_per_sec = -1.0 }",
                "quota.events_per_sec must be",
            ),
            ("quota = { cpu = 1 }", "unknown field"),
        ];
        for (line, expected) in cases {
            let err = config(line).expect_err(line);
            assert!(err.contains(expected), "{line}: {err}");
        }
    }
}
