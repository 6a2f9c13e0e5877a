//! The plugin contract as the host sees it: one bindings module per released WIT version.
//!
//! A released version (`wit/plugin-<version>/`) is frozen: its bindings module is never
//! edited except to follow wasmtime. A new version gets a folder and a module of its own
//! beside the old ones, and the host keeps loading components of every version here, telling
//! them apart by what they export: 0.1's worlds export bare `filter` / `transform` functions,
//! 0.2's export the versioned interface `tidegate:plugin/filter-api@0.2.0` (or
//! `transform-api`).
//!
//! - [`v0_1`]: documents as relaxed Extended JSON inside the event; a transform returns
//!   whole events.
//! - [`v0_2`]: metadata as plain fields, documents read in place through the `event` import,
//!   a transform returns edits (see `wit/plugin-0.2/types.wit`).

pub mod v0_1;
pub mod v0_2;

/// Which released contract a component was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    /// `tidegate:plugin@0.1.0`.
    V0_1,
    /// `tidegate:plugin@0.2.0`.
    V0_2,
}

impl Version {
    /// The version as the WIT package spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_1 => "0.1.0",
            Version::V0_2 => "0.2.0",
        }
    }
}

/// What a component's export names say about its world and contract version (`None`: not a
/// tidegate plugin of any released version).
pub fn identify(exports: &[String]) -> Option<(crate::plugin::World, Version)> {
    use crate::plugin::World;
    let has = |name: &str| exports.iter().any(|e| e == name);
    if has(v0_2::FILTER_EXPORT) {
        Some((World::Filter, Version::V0_2))
    } else if has(v0_2::TRANSFORM_EXPORT) {
        Some((World::Transform, Version::V0_2))
    } else if has("filter") {
        Some((World::Filter, Version::V0_1))
    } else if has("transform") {
        Some((World::Transform, Version::V0_1))
    } else {
        None
    }
}
