//! Host bindings for contract 0.1 (`wit/plugin-0.1`, frozen), one module per world.
//!
//! The transform world reuses the filter world's types and import traits (`with`), so that
//! one `ChangeEvent` type and one `PluginState` implementation serve both.

#![allow(missing_docs)]

/// Bindings for `world filter`, and the shared interfaces.
pub mod filter {
    wasmtime::component::bindgen!({
        path: "../wit/plugin-0.1",
        world: "filter",
    });
}

/// Bindings for `world transform`.
pub mod transform {
    wasmtime::component::bindgen!({
        path: "../wit/plugin-0.1",
        world: "transform",
        with: {
            "tidegate:plugin/types": super::filter::tidegate::plugin::types,
            "tidegate:plugin/log": super::filter::tidegate::plugin::log,
            "tidegate:plugin/config": super::filter::tidegate::plugin::config,
        },
    });
}

/// The contract's types (`interface types`), shared by both worlds.
pub use filter::tidegate::plugin::types;
