//! The plugin contract as the host sees it: one bindings module per released WIT version.
//!
//! A released version (`wit/plugin-<version>/`) is frozen: its bindings module is never
//! edited except to follow wasmtime. A new version gets a folder and a module of its own
//! beside the old ones (`v0_2` next to `v0_1`), and the host keeps loading components of every
//! version here, telling them apart by the versioned package they import and export
//! (`tidegate:plugin@0.1.0`). Today there is one version.

pub mod v0_1;
