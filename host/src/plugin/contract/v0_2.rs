//! Host bindings for contract 0.2 (`wit/plugin-0.2`), one module per world.
//!
//! The transform world reuses the filter world's types and import traits (`with`), so that
//! one `ChangeEvent` type and one `PluginState` implementation serve both.

#![allow(missing_docs)]

/// The export a 0.2 filter component has.
pub const FILTER_EXPORT: &str = "tidegate:plugin/filter-api@0.2.0";
/// The export a 0.2 transform component has.
pub const TRANSFORM_EXPORT: &str = "tidegate:plugin/transform-api@0.2.0";

/// Bindings for `world filter`, and the shared interfaces.
pub mod filter {
    wasmtime::component::bindgen!({
        path: "../wit/plugin-0.2",
        world: "filter",
    });
}

/// Bindings for `world transform`.
pub mod transform {
    wasmtime::component::bindgen!({
        path: "../wit/plugin-0.2",
        world: "transform",
        with: {
            "tidegate:plugin/types": super::filter::tidegate::plugin::types,
            "tidegate:plugin/log": super::filter::tidegate::plugin::log,
            "tidegate:plugin/config": super::filter::tidegate::plugin::config,
            "tidegate:plugin/event": super::filter::tidegate::plugin::event,
        },
    });
}

/// The `event` import: the current call's documents.
pub use filter::tidegate::plugin::event;
/// The contract's types (`interface types`), shared by both worlds.
pub use filter::tidegate::plugin::types;
