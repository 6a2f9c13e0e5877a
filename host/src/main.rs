//! The `tidegate` command: a thin shell around [`tidegate::run`], plus the plugin authoring
//! tools in [`plugin_cli`], the live view of a pipeline's stream in [`tail`] and the admin
//! API's client in [`admin_cli`].

mod admin_cli;
mod plugin_cli;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc rather than glibc's malloc: every event allocates and frees dozens of small blocks
/// (BSON, the JSON payload, headers, ids, subjects) across the source, chain and publisher
/// tasks, and with glibc those calls (malloc, free, consolidation) were ~29 % of the no-plugin
/// path's CPU (BENCHMARKS.md, issue 16). The throughput bench uses the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// MongoDB change streams → WebAssembly plugins → NATS JetStream.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipelines of a config file until SIGTERM or SIGINT.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file and load its plugins without connecting to anything.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a pipeline's messages as JetStream stores them (`tidegate tail orders --last 5`).
    Tail(tail::Args),
    /// Tools for plugin authors: inspect, test and scaffold plugins, and push one to a
    /// tenant through the admin API.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Manage tenants through the admin API: add, list, show, update, suspend, resume, rm.
    Tenant {
        #[command(subcommand)]
        command: admin_cli::TenantCommand,
        #[command(flatten)]
        api: admin_cli::Api,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    #[command(flatten)]
    Tools(plugin_cli::Command),
    /// Upload a plugin version for a tenant through the admin API; it is checked (world,
    /// imports, `init` with the tenant's config, a smoke call) before it is accepted.
    Push(admin_cli::PushArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, check_only) = match cli.command {
        Command::Plugin {
            command: PluginCommand::Tools(command),
        } => return plugin_cli::run(command),
        Command::Plugin {
            command: PluginCommand::Push(args),
        } => return admin_cli::push(args),
        Command::Tenant { command, api } => return admin_cli::tenant(command, api),
        Command::Tail(args) => return tail::run(args),
        Command::Run { config } => (config, false),
        Command::Check { config } => (config, true),
    };
    let config = match tidegate::Config::load(&config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("tidegate: {}", tidegate::security::scrub(&err.to_string()));
            return ExitCode::from(2);
        }
    };
    tidegate::ops::telemetry::init(&config.log);
    let result = if check_only {
        check(&config)
    } else {
        run(config)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Once, in the log (which goes to stderr).
            tracing::error!("{err:#}");
            ExitCode::from(1)
        }
    }
}

fn check(config: &tidegate::Config) -> anyhow::Result<()> {
    let sandbox = tidegate::new_sandbox(config)?;
    let chains = tidegate::load_chains(config, &sandbox)?;
    for (pipeline, chain) in config.pipelines.iter().zip(chains) {
        let plugins: Vec<String> = chain
            .plugins()
            .iter()
            .map(|p| format!("{} ({:?}, {})", p.name(), p.world(), p.path().display()))
            .collect();
        println!("pipeline '{}': ok [{}]", pipeline.id, plugins.join(", "));
    }
    Ok(())
}

fn run(config: tidegate::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "tidegate starting");
        tidegate::run(config, shutdown_signal()).await?;
        tracing::info!("tidegate stopped cleanly");
        Ok(())
    });
    // Whatever still waits on a server (a driver's blocking lookup) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining and checkpointing"),
        _ = int.recv() => tracing::info!("SIGINT: draining and checkpointing"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        eprintln!("tidegate: second signal, exiting without draining");
        std::process::exit(130);
    });
}
