//! `faulty`: a tidegate `transform` test plugin that misbehaves on request, to test how the host
//! handles plugin errors, traps and runaway plugins (dead-lettering, instance recycling,
//! deadlines).
//!
//! For each event it looks at top-level flags of `full-document`:
//! - `"fail": true` → returns `plugin-error::failed("asked to fail")`;
//! - `"trap": true` → panics, which traps the instance (guests are built with `panic = "abort"`);
//! - `"spin": true` → loops forever, until the host's deadline interrupts it;
//! - `"bomb": true` → allocates memory until the host's memory cap traps it;
//! - otherwise → the unchanged event as the single output.
//!
//! Each of the first four writes one `debug` line to the log first. A full document that is not
//! valid JSON is an `invalid-event`.
//!
//! Config keys (optional; any other key makes `init` fail):
//! - `fail-init`: `true` makes `init` return `invalid-config`, to test that tidegate refuses to
//!   start (default `false`).
//!
//! The logic lives in [`logic`] (plain Rust, tested natively); this file only adapts it to the
//! WIT bindings, which exist only when compiling for wasm32.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

mod logic;

#[cfg(target_arch = "wasm32")]
mod component {
    use crate::logic::{action, check_keys, parse_fail_init, Action, ESCAPE_SUBJECT, HUGE_COPIES};

    wit_bindgen::generate!({
        world: "transform",
        path: "../../wit/plugin-0.1",
    });

    use tidegate::plugin::config;
    use tidegate::plugin::log::{self, Level};

    struct Faulty;

    impl Guest for Faulty {
        fn init() -> Result<(), PluginError> {
            let entries = config::entries();
            check_keys(entries.iter().map(|(key, _)| key.as_str()))
                .map_err(PluginError::InvalidConfig)?;
            let fail = parse_fail_init(config::get("fail-init").as_deref())
                .map_err(PluginError::InvalidConfig)?;
            if fail {
                log::write(Level::Debug, "failing init as configured");
                return Err(PluginError::InvalidConfig("fail-init is set".to_owned()));
            }
            Ok(())
        }

        fn transform(event: ChangeEvent) -> Result<Vec<Output>, PluginError> {
            let act = action(event.full_document.as_deref()).map_err(PluginError::InvalidEvent)?;
            match act {
                Action::Pass => Ok(vec![Output {
                    event,
                    subject: None,
                    headers: Vec::new(),
                }]),
                Action::Fail => {
                    log::write(
                        Level::Debug,
                        &format!("failing event {} as asked", event.id),
                    );
                    Err(PluginError::Failed("asked to fail".to_owned()))
                }
                Action::Trap => {
                    log::write(
                        Level::Debug,
                        &format!("trapping on event {} as asked", event.id),
                    );
                    panic!("asked to trap");
                }
                Action::Spin => {
                    log::write(
                        Level::Debug,
                        &format!("spinning on event {} as asked", event.id),
                    );
                    // `black_box` keeps the optimiser from reasoning about the loop; it compiles
                    // to a bare wasm `loop`, where the host's epoch interruption can stop it.
                    let mut n: u64 = 0;
                    loop {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                }
                Action::Huge => Ok((0..HUGE_COPIES)
                    .map(|_| Output {
                        event: event.clone(),
                        subject: None,
                        headers: Vec::new(),
                    })
                    .collect()),
                Action::Escape => Ok(vec![Output {
                    event,
                    subject: Some(ESCAPE_SUBJECT.to_owned()),
                    headers: Vec::new(),
                }]),
                Action::Bomb => {
                    log::write(
                        Level::Debug,
                        &format!("allocating without limit on event {} as asked", event.id),
                    );
                    // Touch every page so nothing is optimised away; the host's cap on linear
                    // memory makes `memory.grow` trap long before this returns.
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hoard.push(vec![1u8; 1 << 20]);
                        std::hint::black_box(&hoard);
                    }
                }
            }
        }
    }

    export!(Faulty);
}
