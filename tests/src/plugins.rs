//! Building the guest plugins.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::anyhow;

use crate::{repo_root, run_script};

static PLUGIN_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Builds the guest plugins once per process by running `scripts/build-plugins.sh`, and returns
/// the directory that holds the `<name>.wasm` files (the last line the script prints on stdout).
///
/// The result, success or failure, is cached for the rest of the process. The script locks
/// itself, so concurrent test processes are safe. Blocks the calling thread while building; on
/// failure the error contains the script's stderr.
pub fn plugin_dir() -> anyhow::Result<PathBuf> {
    PLUGIN_DIR
        .get_or_init(build_plugins)
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_plugins() -> Result<PathBuf, String> {
    let out = run_script("build-plugins.sh")?;
    let (script, stderr) = (&out.script, &out.stderr);
    let Some(last) = out.stdout.lines().map(str::trim).rfind(|l| !l.is_empty()) else {
        return Err(format!(
            "{} printed no output directory on stdout\n--- stderr ---\n{stderr}",
            script.display()
        ));
    };
    let dir = repo_root().join(last); // an absolute `last` replaces the root
    if !dir.is_dir() {
        return Err(format!(
            "{} printed {last:?} as its last stdout line, which is not a directory\n--- stderr ---\n{stderr}",
            script.display()
        ));
    }
    Ok(dir)
}
