//! `op-filter`: a tidegate `filter` plugin that keeps only the events whose operation and
//! namespace are listed in its configuration.
//!
//! Config keys (all optional):
//! - `operations`: comma-separated operations to keep, e.g. `insert,update,replace`. Names are
//!   the WIT ones (`drop-database`, `snapshot-read`, …), the server's other `operationType`s
//!   (`createIndexes`, …), or `other:<operationType>` for one this plugin does not know.
//!   Absent: every operation is kept.
//! - `namespaces`: comma-separated `db.coll` or `db.*` patterns. Absent: every namespace is kept.
//!
//! Filtering in a plugin rather than in the change stream's `$match` lets one watch feed
//! pipelines that each keep a different slice.
//!
//! The logic lives in [`logic`] (plain Rust, tested natively); this file only adapts it to the
//! WIT bindings, which exist only when compiling for wasm32.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

mod logic;

#[cfg(target_arch = "wasm32")]
mod component {
    use std::sync::OnceLock;

    use crate::logic::{Config, Op, KNOWN_KEYS};

    wit_bindgen::generate!({
        world: "filter",
        path: "../../wit/plugin-0.1",
    });

    use tidegate::plugin::log::{self, Level};
    use tidegate::plugin::{config, types::Operation};

    /// Parsed once by `init`; a component instance handles one event at a time.
    static CONFIG: OnceLock<Config> = OnceLock::new();

    fn load() -> Result<Config, PluginError> {
        for (key, _) in config::entries() {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                log::write(Level::Warn, &format!("ignoring unknown config key `{key}`"));
            }
        }
        let ops = config::get("operations");
        let nss = config::get("namespaces");
        Config::parse(ops.as_deref(), nss.as_deref()).map_err(PluginError::InvalidConfig)
    }

    /// The configuration, loaded on first use if the host did not call `init` first.
    fn current() -> Result<&'static Config, PluginError> {
        if let Some(c) = CONFIG.get() {
            return Ok(c);
        }
        let c = load()?;
        Ok(CONFIG.get_or_init(|| c))
    }

    fn op(o: &Operation) -> Op {
        match o {
            Operation::Insert => Op::Insert,
            Operation::Update => Op::Update,
            Operation::Replace => Op::Replace,
            Operation::Delete => Op::Delete,
            Operation::Drop => Op::Drop,
            Operation::Rename => Op::Rename,
            Operation::DropDatabase => Op::DropDatabase,
            Operation::Invalidate => Op::Invalidate,
            Operation::SnapshotRead => Op::SnapshotRead,
            Operation::Other(s) => Op::Other(s.clone()),
        }
    }

    struct OpFilter;

    impl Guest for OpFilter {
        fn init() -> Result<(), PluginError> {
            let c = load()?;
            log::write(Level::Debug, &format!("op-filter configured: {c:?}"));
            // A second `init` (should the host ever call it again) keeps the first configuration.
            let _ = CONFIG.set(c);
            Ok(())
        }

        fn filter(event: ChangeEvent) -> Result<bool, PluginError> {
            let ns = &event.namespace;
            Ok(current()?.keeps(&op(&event.operation), &ns.db, ns.coll.as_deref()))
        }
    }

    export!(OpFilter);
}
