//! `tidegate plugin …`: tools for plugin authors, in the binary only.
//!
//! - `inspect` says what a component is (world, contract version, exports, imports, size) and
//!   whether tidegate can run it, and why not;
//! - `test` runs events from a JSON-lines file through a plugin under the same sandbox and
//!   limits as production, printing each verdict or output, error, fuel and time — plugin
//!   debugging without a database;
//! - `new` scaffolds a plugin project with a test.
//!
//! Loading and calling go through the library's [`tidegate::plugin::Plugin`] and
//! [`tidegate::sandbox::Sandbox`], in [`load`] only, so the CLI can never drift from how a
//! pipeline runs a plugin.

mod events;
mod scaffold;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use tidegate::config::{Capabilities, Encoding, PluginLimits, SandboxConfig};
use tidegate::plugin::{convert, Decision, Plugin, PluginSettings};
use tidegate::sandbox::Sandbox;

/// `tidegate plugin <command>`.
#[derive(Subcommand)]
pub enum Command {
    /// Show a component's world, contract version, exports, imports and size, and whether
    /// tidegate can run it.
    Inspect {
        /// The component (`.wasm`).
        file: PathBuf,
        /// A config entry `key=value` for the plugin's `init` (repeatable).
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
    },
    /// Run the events of a JSON-lines file through a plugin, under production limits.
    Test {
        /// The component (`.wasm`).
        file: PathBuf,
        /// One change event per line, in the published payload's shape (relaxed or
        /// canonical Extended JSON): `{"operationType": "insert", "ns": {…}, "fullDocument": …}`.
        #[arg(long)]
        events: PathBuf,
        /// A config entry `key=value` (repeatable), as in `[pipeline.plugins.config]`.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Memory cap per instance, MiB (production default 64).
        #[arg(long)]
        memory_mib: Option<u32>,
        /// Fuel per call (production default 100000000).
        #[arg(long)]
        fuel: Option<u64>,
        /// Wall-clock limit per call, ms (production default 1000).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Grant a WASI capability, as `capabilities` does in the config: `clock` or
        /// `random` (repeatable; production default: none).
        #[arg(long = "allow", value_name = "CAPABILITY")]
        allow: Vec<String>,
    },
    /// Create a new plugin project in `<dir>/<name>` with a working example and a test.
    New {
        /// Plugin name (letters, digits, `-`, `_`).
        name: String,
        /// Language of the guest.
        #[arg(long, value_enum)]
        lang: Lang,
        /// Folder to create the project in (default: the current one).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Rust only: path of the `tidegate-plugin` SDK crate (default: the `plugins/sdk`
        /// folder of the tidegate source tree this binary was built from, if it exists).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

/// Guest languages `plugin new` can scaffold.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Lang {
    /// Rust, with the `tidegate-plugin` SDK.
    Rust,
    /// C, with committed `wit-bindgen c` bindings.
    C,
    /// Python (componentize-py).
    Python,
    /// JavaScript (componentize-js).
    Js,
}

/// Runs a `plugin` subcommand: exit 0 on success, 1 when the plugin cannot run or an event
/// failed, 2 on bad arguments.
pub fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Inspect { file, config } => parse_config(&config).and_then(|config| {
            let settings = PluginSettings {
                pipeline: "plugin-test".into(),
                config,
                limits: PluginLimits::default(),
                capabilities: Capabilities::default(),
                tenant: None,
            };
            inspect(&file, &settings)
        }),
        Command::Test {
            file,
            events,
            config,
            memory_mib,
            fuel,
            timeout_ms,
            allow,
        } => parse_config(&config).and_then(|config| {
            let mut limits = PluginLimits::default();
            limits.memory_mib = memory_mib.unwrap_or(limits.memory_mib);
            limits.fuel_per_call = fuel.unwrap_or(limits.fuel_per_call);
            limits.timeout_ms = timeout_ms.unwrap_or(limits.timeout_ms);
            let mut capabilities = Capabilities::default();
            for a in &allow {
                match a.as_str() {
                    "clock" => capabilities.clock = true,
                    "random" => capabilities.random = true,
                    other => bail!("--allow {other:?}: expected clock or random"),
                }
            }
            let settings = PluginSettings {
                pipeline: "plugin-test".into(),
                config,
                limits,
                capabilities,
                tenant: None,
            };
            test(&file, &events, &settings)
        }),
        Command::New {
            name,
            lang,
            dir,
            sdk,
        } => scaffold::new(&name, lang, &dir, sdk.as_deref()).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("tidegate plugin: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn parse_config(entries: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    entries
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
            _ => bail!("--config {e:?}: expected KEY=VALUE"),
        })
        .collect()
}

/// The plugin's name for logs: its file stem.
fn name_of(file: &Path) -> String {
    file.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into())
}

/// Loads a plugin exactly as a pipeline does, in a sandbox with the production defaults
/// (including the compiled-plugin cache). The one place the CLI touches the sandbox.
fn load(
    file: &Path,
    settings: &PluginSettings,
) -> anyhow::Result<(Sandbox, Result<Plugin, tidegate::Error>)> {
    let sandbox = Sandbox::new(&SandboxConfig::default(), settings.limits.memory_mib)
        .map_err(anyhow::Error::msg)?;
    let plugin = Plugin::load(&sandbox, &name_of(file), file, settings);
    Ok((sandbox, plugin))
}

/// What a `.wasm` file is, read without instantiating it.
struct Shape {
    world: Option<&'static str>,
    exports: Vec<String>,
    imports: Vec<String>,
}

fn shape(sandbox: &Sandbox, bytes: &[u8]) -> Result<Shape, String> {
    match bytes.get(0..8) {
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {
            return Err("a core WebAssembly module, not a component: wrap it with \
                        `wasm-tools component new`"
                .into())
        }
        Some([0, b'a', b's', b'm', ..]) => {}
        _ => return Err("not a WebAssembly file (no \\0asm header)".into()),
    }
    let engine = sandbox.engine();
    let compiled = sandbox
        .compile(bytes)
        .map_err(|err| format!("not a valid component: {err}"))?;
    let ty = compiled.component.component_type();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let world = if exports.iter().any(|e| e == "filter") {
        Some("filter")
    } else if exports.iter().any(|e| e == "transform") {
        Some("transform")
    } else {
        None
    };
    Ok(Shape {
        world,
        exports,
        imports,
    })
}

fn inspect(file: &Path, settings: &PluginSettings) -> anyhow::Result<bool> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let (sandbox, plugin) = load(file, settings)?;
    println!("file:      {} ({} bytes)", file.display(), bytes.len());
    let shape = match shape(&sandbox, &bytes) {
        Ok(shape) => shape,
        Err(reason) => {
            println!("runs:      no — {reason}");
            return Ok(false);
        }
    };
    println!(
        "world:     {}",
        shape
            .world
            .unwrap_or("none (exports neither filter nor transform)")
    );
    let mut versions: Vec<&str> = shape
        .imports
        .iter()
        .filter_map(|i| i.strip_prefix("tidegate:plugin/"))
        .filter_map(|i| i.split_once('@').map(|(_, v)| v))
        .collect();
    versions.dedup();
    println!(
        "contract:  {}",
        match versions.as_slice() {
            [] => "unknown (imports no tidegate:plugin interface)".to_owned(),
            vs => vs
                .iter()
                .map(|v| format!("tidegate:plugin@{v}"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    );
    println!("exports:   {}", shape.exports.join(", "));
    println!("imports:   {}", shape.imports.join(", "));
    match plugin {
        Ok(_) => {
            println!("runs:      yes (loaded and initialised under the default limits)");
            Ok(true)
        }
        Err(err) => {
            let message = match &err {
                tidegate::Error::Plugin { message, .. } => message.clone(),
                other => other.to_string(),
            };
            println!("runs:      no — {message}");
            if message.contains("invalid-config") && settings.config.is_empty() {
                println!("           (its init refused an empty config: pass --config KEY=VALUE)");
            }
            Ok(false)
        }
    }
}

fn test(file: &Path, events: &Path, settings: &PluginSettings) -> anyhow::Result<bool> {
    let limits = settings.limits;
    // Plugin log lines (and nothing else) on stderr.
    tidegate::telemetry::init(&tidegate::config::LogConfig {
        level: "warn,tidegate::plugin=debug".into(),
        ..Default::default()
    });
    let text = std::fs::read_to_string(events)
        .with_context(|| format!("cannot read {}", events.display()))?;
    let changes = events::parse_lines(&text).with_context(|| format!("in {}", events.display()))?;
    let (_sandbox, plugin) = load(file, settings)?;
    let mut plugin = match plugin {
        Ok(p) => p,
        Err(err) => {
            println!("cannot run: {err}");
            return Ok(false);
        }
    };
    println!(
        "{} ({:?}), {} event(s), limits: {} MiB, {} fuel, {} ms per call",
        file.display(),
        plugin.world(),
        changes.len(),
        limits.memory_mib,
        limits.fuel_per_call,
        limits.timeout_ms
    );
    let mut all_ok = true;
    for (line, change) in &changes {
        let sent = match convert::to_wit(change) {
            Ok(sent) => sent,
            Err(message) => {
                all_ok = false;
                println!("line {line}: error encoding: {message}");
                continue;
            }
        };
        let started = Instant::now();
        let result = plugin.call(&sent);
        let elapsed = started.elapsed();
        let cost = format!(
            "[fuel {}, {:.3} ms]",
            plugin.last_fuel_used(),
            elapsed.as_secs_f64() * 1000.0
        );
        let what = format!(
            "line {line}: {} {}",
            change.operation().as_str(),
            change.namespace()
        );
        match result {
            Ok(Decision::Keep) => println!("{what} -> keep {cost}"),
            Ok(Decision::Drop) => println!("{what} -> drop {cost}"),
            Ok(Decision::Replace(outputs)) => {
                println!("{what} -> {} output(s) {cost}", outputs.len());
                for (i, out) in outputs.into_iter().enumerate() {
                    let headers: Vec<String> = out
                        .headers
                        .iter()
                        .map(|h| format!("{}: {}", h.name, h.value))
                        .collect();
                    println!(
                        "  [{i}] subject: {}{}",
                        out.subject.as_deref().unwrap_or("(pipeline template)"),
                        if headers.is_empty() {
                            String::new()
                        } else {
                            format!("; headers: {}", headers.join(", "))
                        }
                    );
                    let payload = convert::from_wit(out.event, &sent, change)
                        .and_then(|c| tidegate::encode::payload(&c, Encoding::RelaxedJson));
                    match payload {
                        Ok(bytes) => println!("      {}", String::from_utf8_lossy(&bytes)),
                        Err(message) => {
                            all_ok = false;
                            println!("      error invalid-output: {message}");
                        }
                    }
                }
            }
            Err(err) => {
                all_ok = false;
                println!("{what} -> error {}: {} {cost}", err.kind, err.message);
            }
        }
    }
    Ok(all_ok)
}
