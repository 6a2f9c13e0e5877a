//! Hot reload: plugin files watched on disk, and SIGHUP re-reading the config file.
//!
//! A new version is compiled (or taken from the cache), checked against its world,
//! initialised and given a smoke call on a synthetic event before it is sent to the unit's
//! chain stage, which swaps it in between two events: no event is lost, none is seen by
//! both versions. If any step fails, the running version stays and the failure is logged
//! once per file version. A unit held at start-up (its plugins did not load) starts as soon
//! as its whole chain loads.
//!
//! SIGHUP reloads every unit's plugin chain from the file (plugins, their config, limits,
//! capabilities, quarantine policy), which also releases quarantined plugins. Changes to
//! anything else (sources, sinks, checkpoints, the set of pipelines and tenants) are
//! reported as needing a restart and not applied.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, PipelineConfig};
use crate::plugin::{Chain, Plugin};
use crate::sandbox::Sandbox;

/// What the reloader sends a unit's chain stage.
pub enum ChainUpdate {
    /// A new version of the plugin at `index`.
    Plugin {
        /// Position in the chain.
        index: usize,
        /// The loaded, smoke-tested plugin.
        plugin: Box<Plugin>,
    },
    /// A whole new chain (SIGHUP, or a held unit whose plugins now load).
    Chain(Chain),
}

/// The receiving end of a unit's updates, shared by the runs of the unit (a
/// high-availability owner runs it again after regaining its lease) and locked by each.
pub type Updates = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ChainUpdate>>>;

/// The reloader's view of one running unit.
pub struct UnitHandle {
    config: PipelineConfig,
    updates: mpsc::UnboundedSender<ChainUpdate>,
    /// Whether the unit runs without a chain: its start-up load failed or has not finished
    /// (then a changed file is sent as a whole chain, which either starts the held unit or
    /// replaces the one loaded meanwhile). Cleared by the unit once its own load succeeds.
    held: Arc<AtomicBool>,
    files: Vec<WatchedFile>,
}

/// One plugin file as last seen.
#[derive(Default)]
struct WatchedFile {
    path: PathBuf,
    /// Size and modification time when last read, to skip unchanged files cheaply.
    seen: Option<(u64, SystemTime)>,
    /// The version running now (or that failed last), so each version is tried once.
    hash: String,
}

impl UnitHandle {
    /// A handle for `config`'s unit; `held` is set while it has no chain (see the field).
    pub fn new(
        config: PipelineConfig,
        plugin_dir: &Path,
        updates: mpsc::UnboundedSender<ChainUpdate>,
        held: Arc<AtomicBool>,
    ) -> UnitHandle {
        let files = watched_files(&config, plugin_dir);
        UnitHandle {
            config,
            updates,
            held,
            files,
        }
    }
}

fn watched_files(config: &PipelineConfig, plugin_dir: &Path) -> Vec<WatchedFile> {
    config
        .plugins
        .iter()
        .map(|p| {
            let path = PipelineConfig::plugin_path(p, plugin_dir);
            let seen = file_stamp(&path);
            let hash = std::fs::read(&path)
                .map(|b| hash_of(&b))
                .unwrap_or_default();
            WatchedFile { path, seen, hash }
        })
        .collect()
}

fn file_stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

fn hash_of(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Watches plugin files (when `sandbox.watch_plugins`) and SIGHUP until `shutdown`.
pub async fn run(
    sandbox: Arc<Sandbox>,
    config: Config,
    mut units: Vec<UnitHandle>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; config reload disabled");
            None
        }
    };
    let watch = config.sandbox.watch_plugins;
    let mut tick = tokio::time::interval(Duration::from_millis(
        config.sandbox.watch_interval_ms.max(50),
    ));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick(), if watch => {
                for unit in &mut units {
                    check_files(&sandbox, unit, &config.plugin_dir).await;
                }
            }
            Some(()) = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => reload_config(&sandbox, &config, &mut units).await,
        }
    }
}

/// Loads and sends whatever changed among one unit's plugin files.
async fn check_files(sandbox: &Arc<Sandbox>, unit: &mut UnitHandle, plugin_dir: &Path) {
    let mut changed = Vec::new();
    for (index, file) in unit.files.iter_mut().enumerate() {
        let stamp = file_stamp(&file.path);
        if stamp.is_none() || stamp == file.seen {
            continue;
        }
        file.seen = stamp;
        let Ok(bytes) = std::fs::read(&file.path) else {
            continue;
        };
        let hash = hash_of(&bytes);
        if hash != file.hash {
            file.hash = hash;
            changed.push(index);
        }
    }
    if changed.is_empty() {
        return;
    }
    if unit.held.load(Ordering::Acquire) {
        match load_chain(sandbox, &unit.config, plugin_dir).await {
            Ok(chain) => {
                tracing::info!(pipeline = %unit.config.id, "plugins now load; starting the held unit");
                unit.held.store(false, Ordering::Release);
                let _ = unit.updates.send(ChainUpdate::Chain(chain));
            }
            Err(message) => {
                crate::ops::metrics::pipeline(&unit.config.id).reload_refused();
                tracing::error!(pipeline = %unit.config.id, "plugin reload refused; the unit stays held: {message}")
            }
        }
        return;
    }
    for index in changed {
        let Some(plugin_config) = unit.config.plugins.get(index).cloned() else {
            continue;
        };
        let settings = Chain::settings(&unit.config, &plugin_config);
        let path = unit.files[index].path.clone();
        let loaded = sandbox
            .loading(move |loader| {
                let mut plugin = Plugin::load(loader, &plugin_config.name, &path, &settings)
                    .map_err(|err| err.to_string())?;
                plugin
                    .smoke_test()
                    .map_err(|err| format!("smoke call failed: {}: {}", err.kind, err.message))?;
                Ok::<_, String>(plugin)
            })
            .await
            .unwrap_or_else(Err);
        match loaded {
            Ok(plugin) => {
                let _ = unit.updates.send(ChainUpdate::Plugin {
                    index,
                    plugin: Box::new(plugin),
                });
            }
            Err(message) => {
                crate::ops::metrics::pipeline(&unit.config.id).reload_refused();
                tracing::error!(
                    pipeline = %unit.config.id,
                    file = %unit.files[index].path.display(),
                    "plugin reload refused; the running version stays: {message}"
                )
            }
        }
    }
}

/// Loads and smoke-tests a whole chain off the async threads, under a load permit.
pub(crate) async fn load_chain(
    sandbox: &Arc<Sandbox>,
    config: &PipelineConfig,
    plugin_dir: &Path,
) -> Result<Chain, String> {
    let (config, plugin_dir) = (config.clone(), plugin_dir.to_path_buf());
    sandbox
        .loading(move |sandbox| {
            let mut chain =
                Chain::load(sandbox, &config, &plugin_dir).map_err(|err| err.to_string())?;
            chain.smoke_test().map_err(|err| {
                format!(
                    "plugin '{}': smoke call failed: {}: {}",
                    err.plugin, err.kind, err.message
                )
            })?;
            Ok(chain)
        })
        .await
        .unwrap_or_else(Err)
}

/// SIGHUP: re-reads the config file and reloads every unit's chain from it.
async fn reload_config(sandbox: &Arc<Sandbox>, running: &Config, units: &mut [UnitHandle]) {
    let Some(path) = &running.path else {
        tracing::warn!("SIGHUP ignored: the config did not come from a file");
        return;
    };
    tracing::info!(file = %path.display(), "SIGHUP: reloading plugin chains from the config");
    let fresh = match Config::load(path) {
        Ok(fresh) => fresh,
        Err(err) => {
            tracing::error!("config reload refused; the running config stays: {err}");
            return;
        }
    };
    for unit in units.iter_mut() {
        let Some(new) = fresh.pipelines.iter().find(|p| p.id == unit.config.id) else {
            tracing::warn!(pipeline = %unit.config.id, "removed from the config; restart tidegate to stop it");
            continue;
        };
        if !same_but_chain(new, &unit.config) {
            tracing::warn!(pipeline = %unit.config.id, "source, sink or checkpoint settings changed; restart tidegate to apply them (plugins are reloaded now)");
        }
        match load_chain(sandbox, new, &fresh.plugin_dir).await {
            Ok(chain) => {
                unit.config.plugins = new.plugins.clone();
                unit.config.limits = new.limits;
                unit.config.capabilities = new.capabilities.clone();
                unit.config.quarantine = new.quarantine;
                unit.files = watched_files(&unit.config, &fresh.plugin_dir);
                unit.held.store(false, Ordering::Release);
                let _ = unit.updates.send(ChainUpdate::Chain(chain));
            }
            Err(message) => {
                crate::ops::metrics::pipeline(&unit.config.id).reload_refused();
                tracing::error!(
                    pipeline = %unit.config.id,
                    "config reload refused for this unit; its running plugins stay: {message}"
                )
            }
        }
    }
    for new in &fresh.pipelines {
        if !units.iter().any(|u| u.config.id == new.id) {
            tracing::warn!(pipeline = %new.id, "added to the config; restart tidegate to start it");
        }
    }
}

/// A unit's settings other than its plugin chain, for spotting changes SIGHUP cannot apply.
/// Whether two settings of a unit differ only in what a new chain carries (plugins, their
/// limits, capabilities and quarantine), so that swapping the chain applies the change.
pub(crate) fn same_but_chain(a: &PipelineConfig, b: &PipelineConfig) -> bool {
    without_chain(a) == without_chain(b)
}

fn without_chain(config: &PipelineConfig) -> String {
    let mut rest = config.clone();
    rest.plugins.clear();
    rest.limits = Default::default();
    rest.capabilities = Default::default();
    rest.quarantine = Default::default();
    format!("{rest:?}")
}
