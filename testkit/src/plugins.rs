//! Building the guest plugins.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::anyhow;

use crate::{repo_root, run_script};

static PLUGIN_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static EXAMPLES_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Builds the guest plugins once per process by running `scripts/build-plugins.sh`, and returns
/// the directory that holds the `<name>.wasm` files (the last line the script prints on stdout).
///
/// The result, success or failure, is cached for the rest of the process. The script locks
/// itself, so concurrent test processes are safe. Blocks the calling thread while building; on
/// failure the error contains the script's stderr.
pub fn plugin_dir() -> anyhow::Result<PathBuf> {
    PLUGIN_DIR
        .get_or_init(|| build_dir("build-plugins.sh"))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Like [`plugin_dir`] for the example plugins in other languages (`scripts/build-examples.sh`):
/// the directory holding `c-filter.wasm`.
pub fn examples_dir() -> anyhow::Result<PathBuf> {
    EXAMPLES_DIR
        .get_or_init(|| build_dir("build-examples.sh"))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Runs a build script that prints its output directory as its last stdout line.
fn build_dir(script: &str) -> Result<PathBuf, String> {
    let out = run_script(script)?;
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
