//! `snoop`: a tidegate `transform` test plugin that reports, in headers of its single output,
//! what the host's WASI lets it see. The tests run it with and without capabilities granted.
//!
//! - `X-Env`: how many environment variables it can read;
//! - `X-Clock`: the wall clock's seconds since the Unix epoch;
//! - `X-Random`: eight random bytes, in hex;
//! - `X-Dirs`: the folders it was given, comma-separated;
//! - `X-Connect`: what connecting a TCP socket to 127.0.0.1:9 gave (`ok` or the WASI error name).
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
    use wasi::clocks::wall_clock;
    use wasi::filesystem::preopens;
    use wasi::random::random;
    use wasi::sockets::network::{IpAddressFamily, IpSocketAddress, Ipv4SocketAddress};
    use wasi::sockets::{instance_network, tcp_create_socket};

    struct Snoop;

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
                ],
            }])
        }
    }

    export!(Snoop);
}
