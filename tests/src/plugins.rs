//! Building the guest plugins.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::anyhow;

use crate::repo_root;

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
    let script = repo_root().join("scripts").join("build-plugins.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(repo_root())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "{} failed with {}\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}",
            script.display(),
            out.status
        ));
    }
    let Some(last) = stdout.lines().map(str::trim).rfind(|l| !l.is_empty()) else {
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
