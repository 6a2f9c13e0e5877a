//! `snoop`: a tidegate `transform` test plugin that reports, in headers of its single output,
//! what the host's WASI lets it see. The tests run it with and without capabilities granted.
//!
//! - `X-Env`: how many environment variables it can read;
//! - `X-Clock`: the wall clock's seconds since the Unix epoch;
//! - `X-Random`: eight random bytes, in hex;
//! - `X-Dirs`: the folders it was given, comma-separated;
//! - `X-Connect`: what connecting a TCP socket to 127.0.0.1:9 gave (`ok` or the WASI error name);
//! - `X-Waited-Ms`: when the event's full document has `"wait_ms": N`, it first waits N ms on
//!   a monotonic-clock pollable (what a guest's `sleep` does), and this says how long the wait
//!   took by that clock (a wait is a host call, which the host's epoch deadline cannot cut);
//! - `X-Held`: when the event's full document has `"hold": N`, it first creates N pollables
//!   (resources in the host's table) and keeps them for the rest of the instance's life; this
//!   says how many it holds in all.
//!
//! It has no logic worth testing natively: everything it does is a WASI call.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        world: "tidegate-test:snoop/snoop",
        path: "wit",
        generate_all,
    });

    use tidegate::plugin::types::Header;
    use wasi::cli::environment;
    use wasi::clocks::{monotonic_clock, wall_clock};
    use wasi::filesystem::preopens;
    use wasi::random::random;
    use wasi::sockets::network::{IpAddressFamily, IpSocketAddress, Ipv4SocketAddress};
    use wasi::sockets::{instance_network, tcp_create_socket};

    struct Snoop;

    /// The `N` of `"<key>": N` in a relaxed-EJSON document, if there.
    fn number(document: Option<&[u8]>, key: &str) -> Option<u64> {
        let document = std::str::from_utf8(document?).ok()?;
        let rest = document.split_once(&format!("\"{key}\":"))?.1.trim_start();
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    thread_local! {
        /// Pollables created by `hold` events, kept for the instance's life.
        static HELD: std::cell::RefCell<Vec<wasi::io::poll::Pollable>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Creates `n` more pollables and keeps them; how many are held in all.
    fn hold(n: u64) -> usize {
        HELD.with_borrow_mut(|held| {
            for _ in 0..n {
                held.push(monotonic_clock::subscribe_duration(0));
            }
            held.len()
        })
    }

    /// Waits `ms` on a pollable (`subscribe-duration`, then `block`); the milliseconds that
    /// passed by the monotonic clock.
    fn wait(ms: u64) -> u64 {
        let started = monotonic_clock::now();
        monotonic_clock::subscribe_duration(ms * 1_000_000).block();
        monotonic_clock::now().saturating_sub(started) / 1_000_000
    }

    fn connect() -> String {
        let socket = match tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv4) {
            Ok(socket) => socket,
            Err(err) => return err.name().to_owned(),
        };
        let network = instance_network::instance_network();
        let address = IpSocketAddress::Ipv4(Ipv4SocketAddress {
            port: 9,
            address: (127, 0, 0, 1),
        });
        match socket.start_connect(&network, address) {
            Ok(()) => "ok".to_owned(),
            Err(err) => err.name().to_owned(),
        }
    }

    impl Guest for Snoop {
        /// It reads no config key, so any key is a mistake.
        fn init() -> Result<(), PluginError> {
            let keys: Vec<String> = tidegate::plugin::config::entries()
                .into_iter()
                .map(|(key, _)| format!("`{key}`"))
                .collect();
            if keys.is_empty() {
                return Ok(());
            }
            Err(PluginError::InvalidConfig(format!(
                "unknown config key{} {} (this plugin takes no config keys)",
                if keys.len() == 1 { "" } else { "s" },
                keys.join(", ")
            )))
        }

        fn transform(event: ChangeEvent) -> Result<Vec<Output>, PluginError> {
            let document = event.full_document.as_deref();
            let held = number(document, "hold").map(hold);
            let waited = number(document, "wait_ms").map(wait);
            let random: String = random::get_random_bytes(8)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let dirs: Vec<String> = preopens::get_directories()
                .into_iter()
                .map(|(_, path)| path)
                .collect();
            let header = |name: &str, value: String| Header {
                name: name.to_owned(),
                value,
            };
            Ok(vec![Output {
                event,
                subject: None,
                headers: vec![
                    header("X-Env", environment::get_environment().len().to_string()),
                    header("X-Clock", wall_clock::now().seconds.to_string()),
                    header("X-Random", random),
                    header("X-Dirs", dirs.join(",")),
                    header("X-Connect", connect()),
                ]
                .into_iter()
                .chain(waited.map(|ms| header("X-Waited-Ms", ms.to_string())))
                .chain(held.map(|n| header("X-Held", n.to_string())))
                .collect(),
            }])
        }
    }

    export!(Snoop);
}
