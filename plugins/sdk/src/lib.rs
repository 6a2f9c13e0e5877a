//! Write [tidegate](https://github.com/tidegate/tidegate) plugins in Rust.
//!
//! A tidegate plugin is a WebAssembly component that sees every MongoDB change event of a
//! pipeline and either keeps or drops it (a **filter**) or turns it into zero or more events to
//! publish (a **transform**). This crate hides the component bindings: implement [`Filter`] or
//! [`Transform`] on a type, register it with [`filter!`] or [`transform!`], and build for
//! wasm. The same code unit-tests natively with plain `cargo test`.
//!
//! ```
//! use tidegate_plugin::{Config, ConfigKeys, Error, Event, Filter, Operation};
//!
//! /// Keeps orders above a configured total.
//! pub struct BigOrders {
//!     min: f64,
//! }
//!
//! impl Filter for BigOrders {
//!     // Any other key (a typo) makes `init` fail, naming it.
//!     const CONFIG_KEYS: ConfigKeys = ConfigKeys::Only(&["min-total"]);
//!
//!     fn init(config: &Config) -> Result<Self, Error> {
//!         Ok(BigOrders { min: config.parse("min-total")?.unwrap_or(100.0) })
//!     }
//!
//!     fn filter(&self, event: &Event) -> Result<bool, Error> {
//!         let Some(doc) = event.document() else { return Ok(event.operation == Operation::Delete) };
//!         Ok(doc.get_f64("total")?.is_some_and(|total| total >= self.min))
//!     }
//! }
//!
//! tidegate_plugin::filter!(BigOrders);
//!
//! // Natively, the plugin is plain Rust; `init_checked` is what the host's `init` runs:
//! let plugin = BigOrders::init_checked(&Config::from_pairs([("min-total", "50")]))?;
//! assert!(BigOrders::init_checked(&Config::from_pairs([("min-totl", "50")])).is_err());
//! assert!(plugin.filter(&Event::insert("shop", "orders", serde_json::json!({"total": 70})))?);
//! assert!(!plugin.filter(&Event::insert("shop", "orders", serde_json::json!({"total": 7})))?);
//! # Ok::<(), Error>(())
//! ```
//!
//! Build the component (`crate-type = ["cdylib"]` in `Cargo.toml`):
//!
//! ```sh
//! rustup target add wasm32-wasip2            # once
//! cargo build --release --target wasm32-wasip2
//! ```
//!
//! or, without WASI imports at all, for `wasm32-unknown-unknown` followed by
//! `wasm-tools component new` (what tidegate's own `scripts/build-plugins.sh` does). See
//! `docs/writing-plugins.md` in the repository.
//!
//! # What is where
//!
//! - [`Event`] and its parts ([`Operation`], [`Namespace`], [`UpdateDescription`], …): the
//!   change as the plugin receives it.
//! - [`Document`]: a document (relaxed Extended JSON) read by dotted path, and edited in
//!   place ([`Document::set`], [`Document::unset`], [`Document::rename`]: [`Edit`]s the host
//!   applies to the original BSON).
//! - [`Output`], [`Header`], [`subject`]: what a transform returns.
//! - [`Config`]: the plugin's settings, with typed getters; [`ConfigKeys`]: which keys it
//!   accepts (by default none: declare them in `CONFIG_KEYS`).
//! - [`Error`]: why an event could not be handled (it is then dead-lettered).
//! - [`log`]: writing to tidegate's log.
//!
//! # Contract versions
//!
//! The SDK builds components for tidegate's plugin contract 0.2 (`wit/plugin-0.2`): a call
//! carries the event's metadata, its documents stay in the host until the plugin reads them,
//! and a transform's changes travel back as edits. A filter that looks at `operation` and
//! `namespace` never touches a document, and [`Document::value`], [`Document::find`] and
//! the edit methods read or change single values without converting the whole document. The
//! plugin code is the same as for 0.1; with the `contract-0-1` feature the SDK builds a 0.1
//! component instead (for hosts older than 0.2 support).
//!
//! # State and instances
//!
//! `init` runs once per instance, before the first event. The host runs one event at a time
//! per instance, and replaces an instance that trapped (a panic traps) by a fresh one, calling
//! `init` again; so keep only caches in `self`, never state that must survive.

#![deny(missing_docs)]

pub mod config;
pub mod document;
pub mod edit;
pub mod error;
pub mod event;
pub mod log;
pub mod output;

#[cfg(all(target_arch = "wasm32", not(feature = "contract-0-1")))]
#[doc(hidden)]
#[path = "guest_v0_2.rs"]
pub mod guest;

#[cfg(all(target_arch = "wasm32", feature = "contract-0-1"))]
#[doc(hidden)]
#[path = "guest_v0_1.rs"]
pub mod guest;

pub use config::{Config, ConfigKeys};
pub use document::Document;
pub use edit::{Edit, Found};
pub use error::{Error, Result};
pub use event::{
    ClusterTime, Event, Namespace, NamespacePattern, Operation, Transaction, TruncatedArray,
    UpdateDescription,
};
pub use output::{subject, Header, Output, Payload};

/// The JSON value type documents are read as (re-exported `serde_json::Value`).
pub use serde_json::{json, Map, Value};

/// A plugin that keeps or drops events. Register it with [`filter!`].
///
/// ```
/// use tidegate_plugin::{Config, Error, Event, Filter, Operation};
///
/// struct NoDeletes;
///
/// impl Filter for NoDeletes {
///     fn init(_config: &Config) -> Result<Self, Error> {
///         Ok(NoDeletes)
///     }
///     fn filter(&self, event: &Event) -> Result<bool, Error> {
///         Ok(event.operation != Operation::Delete)
///     }
/// }
///
/// assert!(!NoDeletes.filter(&Event::delete("a", "b", serde_json::json!(1)))?);
/// # Ok::<(), Error>(())
/// ```
pub trait Filter: Sized + 'static {
    /// The config keys [`Filter::init`] reads. Any other configured key makes the host's
    /// `init` call fail with an error naming it (see [`Config::check_keys`]), so a typo never
    /// silently falls back to a default. Default: no keys at all. Plugins whose keys are
    /// free-form opt out with [`ConfigKeys::Any`].
    const CONFIG_KEYS: ConfigKeys = ConfigKeys::Only(&[]);

    /// Reads and checks the configuration; called once per instance before the first event.
    /// An error stops tidegate from starting, naming the plugin.
    fn init(config: &Config) -> Result<Self>;

    /// What the component's `init` export runs: the key check against
    /// [`Filter::CONFIG_KEYS`], then [`Filter::init`]. Unit tests call it to see what the
    /// host would.
    fn init_checked(config: &Config) -> Result<Self> {
        config.check_keys(Self::CONFIG_KEYS)?;
        Self::init(config)
    }

    /// `true` keeps the event, `false` drops it (it is still checkpointed). An error
    /// dead-letters the event.
    fn filter(&self, event: &Event) -> Result<bool>;
}

/// A plugin that turns each event into zero or more events. Register it with [`transform!`].
///
/// ```
/// use tidegate_plugin::{Config, Error, Event, Output, Transform};
///
/// /// Tags every event with the collection it came from.
/// struct Tag;
///
/// impl Transform for Tag {
///     fn init(_config: &Config) -> Result<Self, Error> {
///         Ok(Tag)
///     }
///     fn transform(&self, event: Event) -> Result<Vec<Output>, Error> {
///         let coll = event.namespace.coll.clone().unwrap_or_default();
///         Ok(vec![Output::new(event).header("X-Collection", coll)])
///     }
/// }
///
/// let out = Tag.transform(Event::insert("shop", "orders", serde_json::json!({})))?;
/// assert_eq!(out[0].headers[0].value, "orders");
/// # Ok::<(), Error>(())
/// ```
pub trait Transform: Sized + 'static {
    /// The config keys [`Transform::init`] reads. Any other configured key makes the host's
    /// `init` call fail with an error naming it (see [`Config::check_keys`]), so a typo never
    /// silently falls back to a default. Default: no keys at all. Plugins whose keys are
    /// free-form opt out with [`ConfigKeys::Any`].
    const CONFIG_KEYS: ConfigKeys = ConfigKeys::Only(&[]);

    /// Reads and checks the configuration; called once per instance before the first event.
    /// An error stops tidegate from starting, naming the plugin.
    fn init(config: &Config) -> Result<Self>;

    /// What the component's `init` export runs: the key check against
    /// [`Transform::CONFIG_KEYS`], then [`Transform::init`]. Unit tests call it to see what the
    /// host would.
    fn init_checked(config: &Config) -> Result<Self> {
        config.check_keys(Self::CONFIG_KEYS)?;
        Self::init(config)
    }

    /// The outputs replace the event, in order; an empty list drops it. An error
    /// dead-letters the event.
    fn transform(&self, event: Event) -> Result<Vec<Output>>;
}

/// Registers a [`Filter`] implementation as the component's `filter` world exports.
///
/// Use it once per crate, at the top level. Natively it expands to nothing, so the crate still
/// compiles and tests as plain Rust.
///
/// ```
/// # use tidegate_plugin::{Config, Error, Event, Filter};
/// struct KeepAll;
/// impl Filter for KeepAll {
///     fn init(_: &Config) -> Result<Self, Error> { Ok(KeepAll) }
///     fn filter(&self, _: &Event) -> Result<bool, Error> { Ok(true) }
/// }
/// tidegate_plugin::filter!(KeepAll);
/// ```
#[macro_export]
macro_rules! filter {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __TidegateFilter;
            impl $crate::guest::FilterGuest for __TidegateFilter {
                fn init() -> ::core::result::Result<(), $crate::guest::WitError> {
                    $crate::guest::init::<$plugin, _>(<$plugin as $crate::Filter>::init_checked)
                }
                fn filter(
                    event: $crate::guest::WitEvent,
                ) -> ::core::result::Result<bool, $crate::guest::WitError> {
                    $crate::guest::call_filter::<$plugin>(event)
                }
            }
            $crate::guest::filter::export_filter!(__TidegateFilter with_types_in $crate::guest::filter);
        };
    };
}

/// Registers a [`Transform`] implementation as the component's `transform` world exports.
///
/// Use it once per crate, at the top level. Natively it expands to nothing.
///
/// ```
/// # use tidegate_plugin::{Config, Error, Event, Output, Transform};
/// struct Same;
/// impl Transform for Same {
///     fn init(_: &Config) -> Result<Self, Error> { Ok(Same) }
///     fn transform(&self, e: Event) -> Result<Vec<Output>, Error> { Ok(vec![Output::new(e)]) }
/// }
/// tidegate_plugin::transform!(Same);
/// ```
#[macro_export]
macro_rules! transform {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __TidegateTransform;
            impl $crate::guest::TransformGuest for __TidegateTransform {
                fn init() -> ::core::result::Result<(), $crate::guest::WitError> {
                    $crate::guest::init::<$plugin, _>(<$plugin as $crate::Transform>::init_checked)
                }
                fn transform(
                    event: $crate::guest::WitEvent,
                ) -> ::core::result::Result<
                    $crate::guest::Vec<$crate::guest::WitOutput>,
                    $crate::guest::WitError,
                > {
                    $crate::guest::call_transform::<$plugin>(event)
                }
            }
            $crate::guest::transform::export_transform!(__TidegateTransform with_types_in $crate::guest::transform);
        };
    };
}
