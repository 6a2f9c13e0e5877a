//! `tidegate plugin …`: tools for plugin authors, in the binary only.
//!
//! - `inspect` says what a component is (world, contract version, exports, imports, size) and
//!   whether tidegate can run it, and why not;
//! - `test` runs events from a JSON-lines file through a plugin under the same sandbox and
//!   limits as production, printing each verdict or output, error, fuel and time, and what
//!   production would do with it (publish, or dead-letter and why) — plugin debugging without
//!   a database;
//! - `new` scaffolds a plugin project with a test.
//!
//! Results go to stdout, for people and scripts alike; a slow compile (a large Python or
//! JavaScript component, the first time) is announced on stderr only ([`progress`]).
//!
//! Loading goes through the library's [`tidegate::plugin::Plugin`] and
//! [`tidegate::sandbox::Sandbox`], in [`load`] only; `test` calls and checks through the
//! pipeline's own [`tidegate::plugin::Chain`] and frames the verdict with its
//! [`tidegate::sink::framer::Framer`], so the CLI can never drift from how a pipeline runs a
//! plugin and what it publishes.

mod events;
mod progress;
mod scaffold;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use tidegate::config::{Capabilities, Encoding, PipelineConfig, PluginLimits, SandboxConfig};
use tidegate::model::{Change, SourceEvent};
use tidegate::ops::metrics::PipelineMetrics;
use tidegate::plugin::{Chain, Output, Plugin, PluginSettings, Verdict, World};
use tidegate::sandbox::Sandbox;
use tidegate::sink::framer::Framer;

/// NATS's default `max_payload`, what `plugin test` checks messages against by default.
const NATS_DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

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
        /// Config entries from a JSON or TOML file, as a plugin's `config_file`.
        #[arg(long, value_name = "FILE")]
        config_file: Option<PathBuf>,
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
        /// Config entries from a JSON or TOML file, as a plugin's `config_file`.
        #[arg(long, value_name = "FILE")]
        config_file: Option<PathBuf>,
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
        /// The pipeline's `sink.subject_prefix`: subjects plugins choose must lie under it.
        #[arg(long, default_value = "cdc")]
        subject_prefix: String,
        /// The NATS server's `max_payload`, in bytes, that every message must fit
        /// (default: NATS's default, 1 MiB).
        #[arg(long, default_value_t = NATS_DEFAULT_MAX_PAYLOAD)]
        max_payload: usize,
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
        /// Rust only: build against a local checkout of the `tidegate-plugin` SDK (tidegate's
        /// `plugins/sdk` folder) through a `[patch.crates-io]` section, instead of the
        /// published crate (the default: `tidegate-plugin = "0.1"` from crates.io).
        #[arg(long, value_name = "DIR")]
        sdk_path: Option<PathBuf>,
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
        Command::Inspect {
            file,
            config,
            config_file,
        } => parse_config(&config, config_file.as_deref()).and_then(|config| {
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
            config_file,
            memory_mib,
            fuel,
            timeout_ms,
            allow,
            subject_prefix,
            max_payload,
        } => parse_config(&config, config_file.as_deref()).and_then(|config| {
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
            let pipeline = test_pipeline(&subject_prefix)?;
            test(&file, &events, &settings, &pipeline, max_payload)
        }),
        Command::New {
            name,
            lang,
            dir,
            sdk_path,
        } => scaffold::new(&name, lang, &dir, sdk_path.as_deref()).map(|()| true),
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

/// The `--config` entries, and those of `--config-file` (a key in both is refused, as in a
/// pipeline's config).
fn parse_config(
    entries: &[String],
    file: Option<&Path>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut config: BTreeMap<String, String> = entries
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
            _ => bail!("--config {e:?}: expected KEY=VALUE"),
        })
        .collect::<anyhow::Result<_>>()?;
    if let Some(file) = file {
        let values =
            tidegate::config::read_plugin_config_file(file).map_err(|e| anyhow::anyhow!(e))?;
        for (key, value) in values {
            if config.contains_key(&key) {
                bail!(
                    "key `{key}` is given both in --config and in {}",
                    file.display()
                );
            }
            config.insert(key, value);
        }
    }
    Ok(config)
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
    let plugin = progress::report_if_slow(&compiling(file), || {
        Plugin::load(&sandbox, &name_of(file), file, settings)
    });
    Ok((sandbox, plugin))
}

/// What a slow load says on stderr: `compiling x.wasm (18.2 MB)`.
fn compiling(file: &Path) -> String {
    match std::fs::metadata(file) {
        Ok(meta) => format!(
            "compiling {} ({})",
            file.display(),
            progress::size(meta.len())
        ),
        Err(_) => format!("compiling {}", file.display()),
    }
}

/// What a `.wasm` file is, read without instantiating it.
struct Shape {
    world: Option<&'static str>,
    version: Option<tidegate::plugin::Version>,
    exports: Vec<String>,
    imports: Vec<String>,
}

fn shape(sandbox: &Sandbox, file: &Path, bytes: &[u8]) -> Result<Shape, String> {
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
    // Loaded from the compiled-plugin cache when `load` compiled it; compiled again (as
    // slowly) only when the cache is off or unusable.
    let compiled = progress::report_if_slow(&compiling(file), || sandbox.compile(bytes))
        .map_err(|err| format!("not a valid component: {err}"))?;
    let ty = compiled.component.component_type();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let identified = tidegate::plugin::contract::identify(&exports);
    let world = identified.map(|(world, _)| match world {
        World::Filter => "filter",
        World::Transform => "transform",
    });
    Ok(Shape {
        world,
        version: identified.map(|(_, version)| version),
        exports,
        imports,
    })
}

fn inspect(file: &Path, settings: &PluginSettings) -> anyhow::Result<bool> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let (sandbox, plugin) = load(file, settings)?;
    println!("file:      {} ({} bytes)", file.display(), bytes.len());
    let shape = match shape(&sandbox, file, &bytes) {
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
    // The version its exports name (what the host goes by), else what its imports say.
    let mut versions: Vec<&str> = shape
        .imports
        .iter()
        .filter_map(|i| i.strip_prefix("tidegate:plugin/"))
        .filter_map(|i| i.split_once('@').map(|(_, v)| v))
        .collect();
    versions.dedup();
    println!(
        "contract:  {}",
        match (shape.version, versions.as_slice()) {
            (Some(v), _) => format!("tidegate:plugin@{}", v.as_str()),
            (None, []) => "unknown (imports no tidegate:plugin interface)".to_owned(),
            (None, vs) => vs
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

/// The one-plugin unit `plugin test` runs events through: the default sink under
/// `subject_prefix`, quarantine off (every event gets its own verdict).
fn test_pipeline(subject_prefix: &str) -> anyhow::Result<PipelineConfig> {
    if !tidegate::model::subject::is_valid_subject(subject_prefix, false) {
        bail!("--subject-prefix {subject_prefix:?}: not a valid NATS subject");
    }
    let mut sink = toml::Table::new();
    sink.insert("stream".into(), "PLUGIN_TEST".into());
    sink.insert("subject_prefix".into(), subject_prefix.into());
    let mut table = toml::Table::new();
    table.insert("id".into(), "plugin-test".into());
    table.insert("mongodb_uri".into(), "mongodb://unused".into());
    table.insert("sink".into(), sink.into());
    let mut pipeline: PipelineConfig = table.try_into().context("test pipeline")?;
    pipeline.quarantine.after_failures = 0;
    Ok(pipeline)
}

/// Runs every event of `events` through the plugin as the unit `pipeline` would: the chain's
/// call-and-check path, then the framer's size checks against `max_payload`. Prints each
/// verdict and whether production would publish it or dead-letter it (and why); `false` if
/// any event failed or would be dead-lettered.
fn test(
    file: &Path,
    events: &Path,
    settings: &PluginSettings,
    pipeline: &PipelineConfig,
    max_payload: usize,
) -> anyhow::Result<bool> {
    // Plugin log lines and dead-letter warnings (and nothing else) on stderr.
    tidegate::ops::telemetry::init(&tidegate::config::LogConfig {
        level: "warn,tidegate::plugin=debug".into(),
        ..Default::default()
    });
    let text = std::fs::read_to_string(events)
        .with_context(|| format!("cannot read {}", events.display()))?;
    let changes = events::parse_lines(&text).with_context(|| format!("in {}", events.display()))?;
    let (_sandbox, plugin) = load(file, settings)?;
    let plugin = match plugin {
        Ok(p) => p,
        Err(err) => {
            println!("cannot run: {err}");
            return Ok(false);
        }
    };
    let world = plugin.world();
    let limits = settings.limits;
    println!(
        "{} ({world:?}), {} event(s), limits: {} MiB, {} fuel, {} ms per call, {} output \
         bytes, max_payload {max_payload}",
        file.display(),
        changes.len(),
        limits.memory_mib,
        limits.fuel_per_call,
        limits.timeout_ms,
        limits.max_output_bytes.min(max_payload as u64),
    );
    let mut chain = Chain::of(vec![plugin], pipeline);
    chain.cap_output_bytes(max_payload as u64);
    let mut framer = Framer::new(pipeline, max_payload, 0)?;
    let stats = tidegate::ops::metrics::pipeline(&pipeline.id);
    let mut all_ok = true;
    for (line, change) in &changes {
        let started = Instant::now();
        let verdict = chain.run(change);
        let elapsed = started.elapsed();
        let fuel = chain.plugins().first().map_or(0, Plugin::last_fuel_used);
        let cost = format!("[fuel {fuel}, {:.3} ms]", elapsed.as_secs_f64() * 1000.0);
        let what = format!(
            "line {line}: {} {}",
            change.operation().as_str(),
            change.namespace()
        );
        print_verdict(&what, &cost, world, change, &verdict);
        all_ok &= print_production(&mut framer, change, verdict, &stats)?;
    }
    Ok(all_ok)
}

/// Prints what the plugin decided for `change`: a filter's keep or drop, a transform's
/// outputs (subject, headers, payload as relaxed JSON), or its error.
fn print_verdict(what: &str, cost: &str, world: World, change: &Change, verdict: &Verdict) {
    match verdict {
        Verdict::Publish(outputs) if world == World::Filter => {
            let kept = if outputs.is_empty() { "drop" } else { "keep" };
            println!("{what} -> {kept} {cost}");
        }
        Verdict::Publish(outputs) => {
            println!("{what} -> {} output(s) {cost}", outputs.len());
            for (i, out) in outputs.iter().enumerate() {
                print_output(i, out, change);
            }
        }
        Verdict::DeadLetter(err) => {
            println!("{what} -> error {}: {} {cost}", err.kind(), err.message())
        }
        other => println!("{what} -> {other:?} {cost}"),
    }
}

/// Prints output `i` of a transform: its subject and headers, then its payload (the event as
/// relaxed JSON, or the bytes the transform gave).
fn print_output(i: usize, out: &Output, change: &Change) {
    let headers: Vec<String> = out
        .headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}"))
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
    // Bytes a transform made itself are what gets published: shown as they are.
    if let Some(payload) = &out.payload {
        println!(
            "      ({}) {}",
            payload.content_type,
            String::from_utf8_lossy(&payload.bytes)
        );
        return;
    }
    let shown = out.change.as_ref().unwrap_or(change);
    match tidegate::sink::encode::payload(shown, Encoding::RelaxedJson) {
        Ok(bytes) => println!("      {}", String::from_utf8_lossy(&bytes)),
        Err(message) => println!("      (cannot show as JSON: {message})"),
    }
}

/// Frames `verdict` with the pipeline's own framer, so the answer is what production would
/// publish, and prints the dead letter if that is what it comes to; `false` then.
fn print_production(
    framer: &mut Framer,
    change: &Change,
    verdict: Verdict,
    stats: &PipelineMetrics,
) -> anyhow::Result<bool> {
    let token = tidegate::model::token::token_from_document(bson::doc! { "_data": change.id() })
        .map_err(anyhow::Error::msg)?;
    let event = SourceEvent {
        token,
        change: change.clone(),
        snapshot: None,
    };
    let framed = framer.frame(&event, verdict, stats);
    let Some(message) = framed
        .messages
        .iter()
        .find(|m| m.headers.get("Tidegate-Error-Kind").is_some())
    else {
        return Ok(true);
    };
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .map(str::to_owned)
            .unwrap_or_default()
    };
    println!(
        "  production: dead-lettered to {} ({}: {}){}",
        message.subject,
        header("Tidegate-Error-Kind"),
        header("Tidegate-Error"),
        if message.headers.get("Tidegate-Stub").is_some() {
            " as a stub"
        } else {
            ""
        }
    );
    Ok(false)
}
