//! Shared harness for tidegate's integration tests and benchmarks.
//!
//! Everything here starts **real** servers — a single-node MongoDB replica set ([`MongoReplicaSet`])
//! and a JetStream-enabled NATS server ([`NatsServer`]) — on free loopback ports, in temporary
//! directories that are removed on drop. Child processes ([`ChildProcess`], and the servers) are
//! killed with `SIGKILL` and reaped on drop, so a failing test leaves no orphans behind.
//!
//! Binaries are located through the `TIDEGATE_MONGOD` (`TIDEGATE_MONGOD_OLD` for the 6.0.5 "old
//! server" of [`MongoReplicaSet::start_old`]) / `TIDEGATE_NATS_SERVER` environment
//! variables, or else by running `scripts/install-deps.sh` once per process. Guest plugins are
//! built once per process by `scripts/build-plugins.sh` (see [`plugin_dir`]).
//!
//! This crate deliberately does not depend on the `tidegate` host crate, so the host can use it as
//! a dev-dependency.
#![deny(missing_docs)]

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

mod bins;
mod mongo;
mod nats;
mod plugins;
mod process;
mod server;
mod stream;

pub use bins::{
    chromium_path, consumers_node_modules, mongod_path, nats_py_path, nats_server_path,
    old_mongod_path, wasm_tools_path,
};
pub use mongo::{MongoReplicaSet, MongoReplicaSet3};
pub use nats::{ClientOptions, NatsServer};
pub use plugins::{examples_dir, plugin_dir};
pub use process::ChildProcess;
pub use stream::{stream_len, stream_messages};

/// Root of the tidegate repository (the parent of the manifest directory).
///
/// Read at run time from cargo's `CARGO_MANIFEST_DIR` (the running test's or bench's crate,
/// one level below the root like this one) before the compile-time value: a build cache shared
/// between clones at different paths can hand this crate over compiled in another clone.
pub fn repo_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.join("Cargo.toml").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    match manifest.parent() {
        Some(parent) => parent.to_path_buf(),
        None => manifest,
    }
}

/// What a repository script printed (lossily decoded), from [`run_script`].
pub(crate) struct ScriptOutput {
    /// Path of the script, for error messages.
    pub(crate) script: PathBuf,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `scripts/<name>` with `bash` in the repository root and captures its output. Fails (with
/// the exit status, stderr and stdout) if it cannot be run or does not exit successfully.
pub(crate) fn run_script(name: &str) -> Result<ScriptOutput, String> {
    let script = repo_root().join("scripts").join(name);
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(repo_root())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!(
            "{} failed with {}\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}",
            script.display(),
            out.status
        ));
    }
    Ok(ScriptOutput {
        script,
        stdout,
        stderr,
    })
}

/// A TCP port on 127.0.0.1 that was free a moment ago: binds port 0, reads the port the kernel
/// chose, and releases it.
///
/// Another process may grab the port before it is used; the server starters in this crate retry
/// with a new port when their first start fails with "address already in use".
///
/// # Panics
/// Panics if no loopback port can be bound at all (the machine is unusable for these tests).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"));
    match listener.local_addr() {
        Ok(addr) => addr.port(),
        Err(e) => panic!("cannot read the local address of a listener on 127.0.0.1:0: {e}"),
    }
}

/// Polls `f` every 50 ms until it returns `true`; fails after `timeout` with an error naming
/// `what`. `f` is always polled at least once.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Returns the last `max_lines` lines of a text file (lossily decoded), for error messages.
pub(crate) fn tail_file(path: &std::path::Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            if lines.is_empty() {
                "<empty>".to_string()
            } else {
                lines[start..].join("\n")
            }
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub(crate) async fn tcp_accepts(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
        )
        .await,
        Ok(Ok(_))
    )
}

/// Creates a temporary directory with a recognisable prefix.
pub(crate) fn temp_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .with_context(|| format!("creating a temporary directory with prefix {prefix}"))
}

#[cfg(test)]
mod tests;
