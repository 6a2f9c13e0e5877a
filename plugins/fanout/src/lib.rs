//! `fanout`: a tidegate `transform` test and demo plugin that publishes every event several
//! times. It exercises the host's handling of transforms that return many outputs (ordering,
//! per-output subjects and headers, message ids of the copies) or none at all.
//!
//! Config keys (all optional):
//! - `copies`: how many outputs per event, 0 to 1000 (default 2). `0` drops every event.
//! - `subject-prefix`: when set, copy `i` is published on `<subject-prefix>.copy<i>`; otherwise
//!   every copy goes to the pipeline's usual subject.
//!
//! Every copy is the unchanged event with a header `X-Copy` holding its 0-based index.
//!
//! The logic lives in [`logic`] (plain Rust, tested natively); this file only adapts it to the
//! WIT bindings, which exist only when compiling for wasm32.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

mod logic;

#[cfg(target_arch = "wasm32")]
mod component {
    use std::sync::OnceLock;

    use crate::logic::{Config, KNOWN_KEYS};

    wit_bindgen::generate!({
        world: "transform",
        path: "../../wit/plugin-0.1",
    });

    use tidegate::plugin::config;
    use tidegate::plugin::log::{self, Level};
    use tidegate::plugin::types::Header;

    /// Parsed once by `init`; a component instance handles one event at a time.
    static CONFIG: OnceLock<Config> = OnceLock::new();

    fn load() -> Result<Config, PluginError> {
        for (key, _) in config::entries() {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                log::write(Level::Warn, &format!("ignoring unknown config key `{key}`"));
            }
        }
        let copies = config::get("copies");
        let prefix = config::get("subject-prefix");
        Config::parse(copies.as_deref(), prefix.as_deref()).map_err(PluginError::InvalidConfig)
    }

    /// The configuration, loaded on first use if the host did not call `init` first.
    fn current() -> Result<&'static Config, PluginError> {
        if let Some(c) = CONFIG.get() {
            return Ok(c);
        }
        let c = load()?;
        Ok(CONFIG.get_or_init(|| c))
    }

    struct Fanout;

    impl Guest for Fanout {
        fn init() -> Result<(), PluginError> {
            let c = load()?;
            log::write(Level::Debug, &format!("fanout configured: {c:?}"));
            // A second `init` (should the host ever call it again) keeps the first configuration.
            let _ = CONFIG.set(c);
            Ok(())
        }

        fn transform(event: ChangeEvent) -> Result<Vec<Output>, PluginError> {
            let config = current()?;
            Ok((0..config.copies)
                .map(|i| Output {
                    event: event.clone(),
                    subject: config.subject(i),
                    headers: vec![Header {
                        name: "X-Copy".to_owned(),
                        value: i.to_string(),
                    }],
                })
                .collect())
        }
    }

    export!(Fanout);
}
