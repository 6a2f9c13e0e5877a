//! Refusals: bad configs, bad plugins and a stream that cannot deduplicate each stop tidegate
//! before it reads anything, with a message that names the file and the problem.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::{component, Harness};

fn tidegate(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run tidegate")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A config with no servers behind it: `tidegate check` never connects.
fn offline_config(dir: &Path, plugins: &str) -> String {
    format!(
        r#"
plugin_dir = "{}"
[nats]
url = "nats://127.0.0.1:1"
[[pipeline]]
id = "p"
mongodb_uri = "mongodb://127.0.0.1:1/?replicaSet=rs0"
database = "d"
[pipeline.sink]
stream = "S"
subject_prefix = "cdc"
{plugins}
"#,
        dir.display()
    )
}

/// A misspelt key stops tidegate with exit code 2 and a message naming the file and key.
#[test]
fn unknown_config_key_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    let text = offline_config(dir.path(), "").replace("subject_prefix", "subjet_prefix");
    std::fs::write(&path, text).expect("write");
    let out = tidegate(&["run"], &path);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("subjet_prefix"), "{err}");
}

/// A missing config file is named.
#[test]
fn missing_config_file_is_named() {
    let out = tidegate(&["check"], Path::new("/nonexistent/tidegate.toml"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/tidegate.toml"),
        "{}",
        stderr(&out)
    );
}

fn check_plugin_bytes(bytes: Option<&[u8]>, extra: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    if let Some(bytes) = bytes {
        std::fs::write(dir.path().join("bad.wasm"), bytes).expect("write plugin");
    }
    let plugins = format!("[[pipeline.plugins]]\nname = \"bad\"\n{extra}");
    let path = dir.path().join("tidegate.toml");
    std::fs::write(&path, offline_config(dir.path(), &plugins)).expect("write");
    let out = tidegate(&["check"], &path);
    (out.status.code(), stderr(&out))
}

/// Missing, garbage, core-module and wrong-world plugins are each refused at start with the
/// plugin's name, its file and what is wrong with it.
#[test]
fn bad_plugins_are_refused_with_the_file_and_the_problem() {
    let (code, err) = check_plugin_bytes(None, "");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("plugin 'bad'") && err.contains("bad.wasm") && err.contains("cannot read"),
        "{err}"
    );

    let (code, err) = check_plugin_bytes(Some(b"definitely not wasm"), "");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a WebAssembly file"), "{err}");

    // A valid core module, not a component.
    let (code, err) = check_plugin_bytes(Some(b"\0asm\x01\0\0\0"), "");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a valid WebAssembly component"), "{err}");

    // A valid, empty component: it implements no tidegate world.
    let (code, err) = check_plugin_bytes(Some(b"\0asm\x0d\0\x01\0"), "");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("exports neither `filter` nor `transform`"),
        "{err}"
    );
}

/// A plugin that rejects its configuration in `init` stops tidegate, naming the plugin.
#[test]
fn plugin_rejecting_its_config_is_refused() {
    let plugins = tidegate_testkit::plugin_dir().expect("plugins build");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tidegate.toml");
    // `redact` requires `fields`.
    let text = offline_config(&plugins, "[[pipeline.plugins]]\nname = \"redact\"\n");
    std::fs::write(&path, text).expect("write");
    let out = tidegate(&["check"], &path);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("plugin 'redact'") && err.contains("invalid-config"),
        "{err}"
    );

    let text = offline_config(
        &plugins,
        "[[pipeline.plugins]]\nname = \"redact\"\nconfig = { fields = \"email\" }\n",
    );
    std::fs::write(&path, text).expect("write");
    let out = tidegate(&["check"], &path);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("pipeline 'p': ok"));
}

/// An existing stream whose duplicate window is shorter than required makes `run` refuse to
/// start, explaining why and how to fix it; nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_with_short_duplicate_window_is_refused() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.create_stream(&["cdc.>"], Duration::from_secs(10)).await?;
    let path = h.write_config("tidegate.toml", &h.config("", ""))?;
    let mut child = h.spawn_binary(&path)?;
    let status = child.wait_exit(Duration::from_secs(120)).await?;
    let log = child.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("keeps message ids for 10s"), "{log}");
    assert!(log.contains("--dupe-window"), "{log}");
    Ok(())
}

/// An existing stream that does not cover the pipeline's subjects is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_not_covering_subjects_is_refused() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.create_stream(&["other.>"], Duration::from_secs(120))
        .await?;
    let path = h.write_config("tidegate.toml", &h.config("", ""))?;
    let mut child = h.spawn_binary(&path)?;
    let status = child.wait_exit(Duration::from_secs(120)).await?;
    let log = child.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("do not cover 'cdc.>'"), "{log}");
    Ok(())
}

/// Real components that are wrong in the two ways that matter: one exports a `filter` of
/// another shape (built for a different contract), one imports a capability tidegate does not
/// grant. Both are refused at start, naming the plugin and the problem.
#[test]
fn wrong_world_and_ungranted_import_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong_shape = component(
        dir.path(),
        "shape",
        "package test:shape;\nworld shape { export filter: func(x: u32) -> bool; }\n",
        "shape",
        r#"(module (func (export "filter") (param i32) (result i32) i32.const 1))"#,
    );
    let wants_network = component(
        dir.path(),
        "net",
        "package test:net;\ninterface socket { connect: func(); }\n\
         world net { import socket; export filter: func(x: u32) -> bool; }\n",
        "net",
        r#"(module (import "test:net/socket" "connect" (func))
                   (func (export "filter") (param i32) (result i32) i32.const 1))"#,
    );
    let check = |file: &Path| {
        let plugins = format!(
            "[[pipeline.plugins]]\nname = \"bad\"\nfile = \"{}\"\n",
            file.display()
        );
        let path = dir.path().join("tidegate.toml");
        std::fs::write(&path, offline_config(dir.path(), &plugins)).expect("write");
        let out = tidegate(&["check"], &path);
        (out.status.code(), stderr(&out))
    };
    let (code, err) = check(&wrong_shape);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("plugin 'bad'") && err.contains("does not match the `filter` world"),
        "{err}"
    );
    let (code, err) = check(&wants_network);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("imports something tidegate does not grant"),
        "{err}"
    );
    assert!(err.contains("test:net/socket"), "{err}");
}

/// The tenants example stays valid: every tenant's plugins load and check.
#[test]
fn tenants_example_checks() -> anyhow::Result<()> {
    tidegate_testkit::plugin_dir()?;
    let path = tidegate_testkit::repo_root().join("examples/tenants/tidegate.toml");
    let out = tidegate(&["check"], &path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}{}", text, stderr(&out));
    assert!(
        text.contains("pipeline 'shop.analytics': ok [op-filter"),
        "{text}"
    );
    assert!(
        text.contains("pipeline 'shop.support': ok [redact"),
        "{text}"
    );
    Ok(())
}

/// `tidegate check` reads the files a config names: a capture list with a bad row and a
/// plugin config file that is not JSON are refused (exit 2) in one run, each named with
/// its file and line, without showing the plugin file's values.
#[test]
fn check_reports_problems_in_the_files_a_config_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("capture.csv"), "d,orders\nd,\n").expect("write");
    std::fs::write(
        dir.path().join("redact.json"),
        "{\"fields\": \"email\",\n \"hash-key\" \"s3cret\"}",
    )
    .expect("write");
    let plugins = "[[pipeline.plugins]]\nname = \"redact\"\nconfig_file = \"redact.json\"\n";
    let text = offline_config(dir.path(), plugins).replace(
        "database = \"d\"",
        "database = \"d\"\ncollections_file = \"capture.csv\"",
    );
    let path = dir.path().join("tidegate.toml");
    std::fs::write(&path, text).expect("write");
    let out = tidegate(&["check"], &path);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let csv = dir.path().join("capture.csv");
    assert!(
        err.contains(&format!(
            "collections_file: {}:2: the collection name is empty",
            csv.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("plugin 'redact': config_file: ") && err.contains("line 2"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}
