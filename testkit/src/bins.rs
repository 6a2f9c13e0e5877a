//! Locating the server binaries.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{anyhow, bail};

use crate::run_script;

/// Output of `scripts/install-deps.sh` (`KEY=value` lines), computed once per process.
static INSTALLED: OnceLock<Result<HashMap<String, String>, String>> = OnceLock::new();

fn run_install_deps() -> Result<HashMap<String, String>, String> {
    Ok(run_script("install-deps.sh")?
        .stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

/// Resolves a binary: `$env_var` if set, else the `key` line printed by `install-deps.sh`.
fn locate(env_var: &str, key: &str) -> anyhow::Result<PathBuf> {
    let path = locate_path(env_var, key)?;
    if !path.is_file() {
        bail!(
            "{key} binary {} does not exist (from {env_var} or scripts/install-deps.sh)",
            path.display()
        );
    }
    Ok(path)
}

/// Resolves a folder the same way.
fn locate_dir(env_var: &str, key: &str) -> anyhow::Result<PathBuf> {
    let path = locate_path(env_var, key)?;
    if !path.is_dir() {
        bail!(
            "{key} folder {} does not exist (from {env_var} or scripts/install-deps.sh)",
            path.display()
        );
    }
    Ok(path)
}

fn locate_path(env_var: &str, key: &str) -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os(env_var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let installed = INSTALLED
                .get_or_init(run_install_deps)
                .as_ref()
                .map_err(|e| anyhow!("locating {key} (set {env_var} to skip this): {e}"))?;
            match installed.get(key) {
                Some(p) => PathBuf::from(p),
                None => bail!(
                    "scripts/install-deps.sh printed no {key}=... line (set {env_var} instead)"
                ),
            }
        }
    };
    Ok(path)
}

/// Path of the `mongod` binary every test starts (MongoDB 6.0.27, the current 6.0 patch
/// release): `$TIDEGATE_MONGOD`, else what `scripts/install-deps.sh` installs (the script runs
/// at most once per process).
pub fn mongod_path() -> anyhow::Result<PathBuf> {
    locate("TIDEGATE_MONGOD", "MONGOD")
}

/// Path of the "old server" `mongod` (MongoDB 6.0.5, older than 6.0.9: no
/// `$changeStreamSplitLargeEvent`), for tests of what tidegate refuses there:
/// `$TIDEGATE_MONGOD_OLD`, else what `scripts/install-deps.sh` installs.
pub fn old_mongod_path() -> anyhow::Result<PathBuf> {
    locate("TIDEGATE_MONGOD_OLD", "MONGOD_OLD")
}

/// Path of the `nats-server` binary: `$TIDEGATE_NATS_SERVER`, else what
/// `scripts/install-deps.sh` installs (the script runs at most once per process).
pub fn nats_server_path() -> anyhow::Result<PathBuf> {
    locate("TIDEGATE_NATS_SERVER", "NATS_SERVER")
}

/// Path of the `wasm-tools` binary: `$TIDEGATE_WASM_TOOLS`, else what
/// `scripts/install-deps.sh` installs. Tests use it to build deliberately wrong components.
pub fn wasm_tools_path() -> anyhow::Result<PathBuf> {
    locate("TIDEGATE_WASM_TOOLS", "WASM_TOOLS")
}

/// Path of a `chromium` binary: `$TIDEGATE_CHROMIUM`, else what `scripts/install-deps.sh`
/// installs (Debian's package). Tests render the status page in it, headless.
pub fn chromium_path() -> anyhow::Result<PathBuf> {
    locate("TIDEGATE_CHROMIUM", "CHROMIUM")
}

/// The folder holding nats-py, for `PYTHONPATH` (the Python consumer example):
/// `$TIDEGATE_NATS_PY`, else what `scripts/install-deps.sh` installs.
pub fn nats_py_path() -> anyhow::Result<PathBuf> {
    locate_dir("TIDEGATE_NATS_PY", "NATS_PY_PATH")
}

/// `examples/consumers/node_modules`, with nats.js for the Node and browser consumer
/// examples: `$TIDEGATE_CONSUMERS_NODE_MODULES`, else what `scripts/install-deps.sh` installs.
pub fn consumers_node_modules() -> anyhow::Result<PathBuf> {
    locate_dir("TIDEGATE_CONSUMERS_NODE_MODULES", "CONSUMERS_NODE_MODULES")
}
