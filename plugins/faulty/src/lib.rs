//! `faulty`: a tidegate `transform` test plugin that misbehaves on request, to test how the host
//! handles plugin errors, traps and runaway plugins (dead-lettering, instance recycling,
//! deadlines).
//!
//! For each event it looks at top-level flags of `full-document`:
//! - `"fail": true` → returns `plugin-error::failed("asked to fail")`;
//! - `"trap": true` → panics, which traps the instance (guests are built with `panic = "abort"`);
//! - `"spin": true` → loops forever, until the host's deadline interrupts it;
//! - `"bomb": true` → allocates memory until the host's memory cap traps it;
//! - `"huge": true` → 1000 copies of the event; `"escape": true` → a subject outside the
//!   tenant's prefix;
//! - `"header_bomb": true` → one 2 MiB header; `"header_flood": true` → 2500 headers of
//!   406 bytes; `"long_subject": "<prefix>"` → a subject of 8 KiB under `<prefix>`;
//!   `"reserved_header": true` → a `Nats-Msg-Id` header (`"reserved_header": "<name>"` → a
//!   header of that name); `"change_id": true` → a changed id;
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
    use crate::logic::{
        action, check_keys, parse_fail_init, Action, ESCAPE_SUBJECT, FLOOD_HEADERS,
        FLOOD_VALUE_BYTES, HEADER_BOMB_BYTES, HUGE_COPIES, LONG_SUBJECT_BYTES,
    };

    wit_bindgen::generate!({
        world: "transform",
        path: "../../wit/plugin-0.1",
    });

    use tidegate::plugin::config;
    use tidegate::plugin::log::{self, Level};
    use tidegate::plugin::types::Header;

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
                Action::HeaderBomb => Ok(vec![Output {
                    event,
                    subject: None,
                    headers: vec![Header {
                        name: "X-Bomb".to_owned(),
                        value: "b".repeat(HEADER_BOMB_BYTES),
                    }],
                }]),
                Action::HeaderFlood => Ok(vec![Output {
                    event,
                    subject: None,
                    headers: (0..FLOOD_HEADERS)
                        .map(|i| Header {
                            name: format!("X-Flood-{i:04}"),
                            value: "f".repeat(FLOOD_VALUE_BYTES),
                        })
                        .collect(),
                }]),
                Action::LongSubject(prefix) => Ok(vec![Output {
                    event,
                    subject: Some(format!("{prefix}.{}", "s".repeat(LONG_SUBJECT_BYTES))),
                    headers: Vec::new(),
                }]),
                Action::ReservedHeader(name) => Ok(vec![Output {
                    event,
                    subject: None,
                    headers: vec![Header {
                        name,
                        value: "forged".to_owned(),
                    }],
                }]),
                Action::ChangeId => {
                    let mut event = event;
                    event.id = format!("{}-forged", event.id);
                    Ok(vec![Output {
                        event,
                        subject: None,
                        headers: Vec::new(),
                    }])
                }
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
