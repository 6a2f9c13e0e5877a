//! `tidegate plugin inspect | test | new`, run as the real binary on the plugins the project
//! builds from source: what authors see, and the exit codes scripts rely on.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use tidegate_testkit::{examples_dir, plugin_dir};

fn plugin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .arg("plugin")
        .args(args)
        .output()
        .expect("run tidegate")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wasm(name: &str) -> String {
    plugin_dir()
        .expect("plugins build")
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

/// `inspect` names the world, contract version, exports and imports, and says plainly
/// whether tidegate can run the file and why not (a config `init` refuses, not wasm at all).
/// The SDK's plugins are 0.2 components; their 0.1 builds (`v0.1/`) say 0.1.
#[test]
fn inspect_reports_shape_and_whether_it_runs() {
    let out = plugin(&["inspect", &wasm("op-filter")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("world:     filter"), "{text}");
    assert!(text.contains("contract:  tidegate:plugin@0.2.0"), "{text}");
    assert!(
        text.contains("exports:   tidegate:plugin/filter-api@0.2.0"),
        "{text}"
    );
    assert!(text.contains("tidegate:plugin/config@0.2.0"), "{text}");
    assert!(text.contains("runs:      yes"), "{text}");

    let out = plugin(&["inspect", &wasm("v0.1/op-filter")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("world:     filter"), "{text}");
    assert!(text.contains("contract:  tidegate:plugin@0.1.0"), "{text}");
    assert!(text.contains("exports:   init, filter"), "{text}");
    assert!(text.contains("tidegate:plugin/config@0.1.0"), "{text}");
    assert!(text.contains("runs:      yes"), "{text}");

    let out = plugin(&["inspect", &wasm("redact")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("world:     transform"), "{text}");
    assert!(
        text.contains("runs:      no — invalid-config: `fields` is required"),
        "{text}"
    );
    assert!(text.contains("pass --config"), "{text}");
    let out = plugin(&["inspect", &wasm("redact"), "--config", "fields=email"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").expect("write");
    let out = plugin(&["inspect", &junk.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("not a WebAssembly file"),
        "{}",
        stdout(&out)
    );
}

fn events(dir: &Path) -> String {
    events_file(
        dir,
        "events.jsonl",
        r#"// a comment line
{"operationType": "insert", "ns": {"db": "shop", "coll": "orders"}, "documentKey": {"_id": 1}, "fullDocument": {"_id": 1, "email": "a@b.c"}}
{"operationType": "insert", "ns": {"db": "shop", "coll": "orders"}, "documentKey": {"_id": 2}, "fullDocument": {"_id": 2, "fail": true}}
{"operationType": "delete", "ns": {"db": "shop", "coll": "orders"}, "documentKey": {"_id": 2}}
"#,
    )
}

/// Writes `lines` (`plugin test`'s events file) to `dir/name`; returns its path.
fn events_file(dir: &Path, name: &str, lines: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, lines).expect("write events");
    path.display().to_string()
}

/// `test` prints per event the verdict or each output (subject, headers, payload) with fuel
/// and time; a failing event shows its error and makes the exit code 1.
#[test]
fn test_runs_events_and_reports_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = events(dir.path());

    let out = plugin(&[
        "test",
        &wasm("op-filter"),
        "--events",
        &events,
        "--config",
        "operations=insert",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("line 2: insert shop.orders -> keep [fuel "),
        "{text}"
    );
    assert!(
        text.contains("line 4: delete shop.orders -> drop [fuel "),
        "{text}"
    );

    let out = plugin(&[
        "test",
        &wasm("fanout"),
        "--events",
        &events,
        "--config",
        "copies=2",
        "--config",
        "subject-prefix=cdc.c",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("line 2: insert shop.orders -> 2 output(s)"),
        "{text}"
    );
    assert!(
        text.contains("[1] subject: cdc.c.copy1; headers: X-Copy: 1"),
        "{text}"
    );
    assert!(
        text.contains(r#""fullDocument":{"_id":1,"email":"a@b.c"}"#),
        "{text}"
    );

    let out = plugin(&["test", &wasm("faulty"), "--events", &events]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("line 3: insert shop.orders -> error plugin-error: failed: asked to fail"),
        "{text}"
    );
    assert!(
        text.contains("line 4: delete shop.orders -> 1 output(s)"),
        "the run goes on: {text}"
    );

    // The production limits apply, and can be tightened: a runaway call runs out of fuel.
    let spin = events_file(
        dir.path(),
        "spin.jsonl",
        r#"{"operationType": "insert", "ns": {"db": "d", "coll": "c"}, "fullDocument": {"spin": true}}"#,
    );
    let out = plugin(&[
        "test",
        &wasm("faulty"),
        "--events",
        &spin,
        "--fuel",
        "5000000",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("5000000 fuel"), "{text}");
    assert!(text.contains("-> error out-of-fuel"), "{text}");
}

/// What contract 0.2's call record leaves out, and the SDK reads on demand through the
/// `event` import (a rename's `to`, an update's removed fields and truncated arrays), goes on
/// unchanged through a transform that changes no metadata.
#[test]
fn test_keeps_metadata_read_on_demand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = events_file(
        dir.path(),
        "events.jsonl",
        r#"{"operationType": "rename", "ns": {"db": "shop", "coll": "orders"}, "to": {"db": "shop", "coll": "archive"}}
{"operationType": "update", "ns": {"db": "shop", "coll": "orders"}, "documentKey": {"_id": 1}, "updateDescription": {"updatedFields": {"a": 1}, "removedFields": ["gone"], "truncatedArrays": [{"field": "list", "newSize": 2}]}}
"#,
    );
    let out = plugin(&[
        "test",
        &wasm("fanout"),
        "--events",
        &events,
        "--config",
        "copies=1",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(r#""ns":{"db":"shop","coll":"orders"},"to":{"db":"shop","coll":"archive"}"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#""removedFields":["gone"],"truncatedArrays":[{"field":"list","newSize":2}]"#
        ),
        "{text}"
    );
}

/// `--config-file` gives `test` the entries of a file, as a pipeline's `config_file` does
/// (TOML here, with a structured value); a key also given with `--config` is refused.
#[test]
fn test_takes_config_from_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = events(dir.path());
    let file = dir.path().join("map.toml");
    std::fs::write(
        &file,
        "[variants.\"*\"]\nfields = { \"_id\" = \"id\" }\nsubject = \"cdc.mapped\"\n",
    )
    .expect("write");
    let file = file.display().to_string();
    let args = [
        "test",
        &wasm("map"),
        "--events",
        &events,
        "--config-file",
        &file,
    ];
    let out = plugin(&[&args[..], &["--config", "discriminator=_id"]].concat());
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("[0] subject: cdc.mapped"), "{text}");
    assert!(text.contains(r#""fullDocument":{"id":1}"#), "{text}");
    let out = plugin(&[&args[..], &["--config", "variants={}"]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("key `variants` is given both"), "{err}");
}

/// `test` checks outputs the way production does, through the same call-and-check path and
/// framer: a reserved header, a changed id, a subject outside the prefix or too long, and
/// outputs over the size limits (one 2 MiB header; many small headers that together exceed
/// `max_payload` on the wire) each say that production would dead-letter the event and why,
/// and make the exit code 1; a plain event is published as before.
#[test]
fn test_reports_what_production_would_dead_letter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let line = |doc: &str| {
        format!(
            r#"{{"operationType": "insert", "ns": {{"db": "shop", "coll": "orders"}}, "documentKey": {{"_id": 1}}, "fullDocument": {doc}}}"#
        )
    };
    let lines = [
        line(r#"{"_id": 1, "reserved_header": true}"#),
        line(r#"{"_id": 1, "change_id": true}"#),
        line(r#"{"_id": 1, "escape": true}"#),
        line(r#"{"_id": 1, "header_bomb": true}"#),
        line(r#"{"_id": 1, "header_flood": true}"#),
        line(r#"{"_id": 1, "long_subject": "cdc"}"#),
        line(r#"{"_id": 1, "plain": true}"#),
    ];
    let hostile = events_file(dir.path(), "hostile.jsonl", &lines.join("\n"));
    let out = plugin(&["test", &wasm("faulty"), "--events", &hostile]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let expected = [
        (1, "invalid-output: header 'Nats-Msg-Id' is reserved"),
        (2, "invalid-output: output changed the event id"),
        (3, "invalid-output: output subject 'elsewhere.stolen'"),
        (4, "output-too-large: outputs carry 2097"),
        (5, "too-large: output 0: message is"),
        (6, "too-large: output 0: subject is 8196 bytes"),
    ];
    let blocks: Vec<&str> = text.split("\nline ").skip(1).collect();
    assert_eq!(blocks.len(), lines.len(), "{text}");
    for (index, reason) in expected {
        let block = blocks[index - 1];
        assert!(
            block.contains(&format!(
                "production: dead-lettered to cdc.dead-letter ({reason}"
            )),
            "line {index}: {block}"
        );
    }
    assert!(
        blocks[4].contains("the NATS server accepts at most 1048576 (max_payload)"),
        "{}",
        blocks[4]
    );
    assert!(
        blocks[3].contains("the NATS server's max_payload; limits.max_output_bytes is 4194304"),
        "{}",
        blocks[3]
    );
    let plain = blocks[6];
    assert!(plain.contains("-> 1 output(s)"), "{plain}");
    assert!(!plain.contains("production: dead-lettered"), "{plain}");

    // A larger max_payload lets the flood through: the check is the server's limit.
    let flood = events_file(
        dir.path(),
        "flood.jsonl",
        &line(r#"{"_id": 1, "header_flood": true}"#),
    );
    let out = plugin(&[
        "test",
        &wasm("faulty"),
        "--events",
        &flood,
        "--max-payload",
        "8388608",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(!text.contains("dead-lettered"), "{text}");
}

/// `new --lang rust` scaffolds a crate that depends on the SDK by version, never by a path
/// the user did not give; `--sdk-path` points it at a local checkout through
/// `[patch.crates-io]`, and with that its own tests pass natively, offline.
#[test]
fn new_rust_plugin_passes_its_tests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/sdk")
        .canonicalize()
        .expect("the SDK in this tree");

    // By default: the published crate, and the override as a commented hint only.
    let out = plugin(&["new", "by-version", "--lang", "rust", "--dir", &d]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let manifest = std::fs::read_to_string(dir.path().join("by-version/Cargo.toml")).unwrap();
    assert!(
        manifest.contains("\ntidegate-plugin = \"0.1\"\n"),
        "{manifest}"
    );
    assert!(manifest.contains("# [patch.crates-io]"), "{manifest}");
    let active: Vec<&str> = manifest
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        !active.iter().any(|l| l.contains("path")),
        "no path dependency: {manifest}"
    );
    assert!(
        !manifest.contains(&sdk.display().to_string()),
        "the SDK folder this binary was built from must not leak into the scaffold: {manifest}"
    );

    let sdk_arg = sdk.display().to_string();
    let new = |name: &str| {
        plugin(&[
            "new",
            name,
            "--lang",
            "rust",
            "--dir",
            &d,
            "--sdk-path",
            &sdk_arg,
        ])
    };
    let out = new("status-filter");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let project = dir.path().join("status-filter");
    assert!(project.join("src/lib.rs").is_file());
    let manifest = std::fs::read_to_string(project.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("\ntidegate-plugin = \"0.1\"\n"),
        "{manifest}"
    );
    assert!(
        manifest.contains(&format!(
            "[patch.crates-io]\ntidegate-plugin = {{ path = \"{}\" }}",
            sdk.display()
        )),
        "{manifest}"
    );
    assert_eq!(
        new("status-filter").status.code(),
        Some(2),
        "never overwrites"
    );
    let wrong = plugin(&["new", "x", "--lang", "rust", "--dir", &d, "--sdk-path", &d]);
    assert_eq!(wrong.status.code(), Some(2));
    assert!(
        stderr(&wrong).contains("no Cargo.toml there; give tidegate's plugins/sdk folder"),
        "{}",
        stderr(&wrong)
    );

    // Shared across runs so the SDK's dependencies compile once.
    let target = dirs_cache().join("scaffold-target");
    let test = Command::new("cargo")
        .args(["test", "--offline", "--quiet"])
        .current_dir(&project)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo");
    let text = String::from_utf8_lossy(&test.stdout);
    assert!(
        test.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&test.stderr)
    );
    assert!(text.contains("3 passed"), "{text}");
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `new --lang c` scaffolds the C example; it builds with the project's C toolchain and
/// `plugin test` runs it.
#[test]
fn new_c_plugin_builds_and_runs() {
    // Installs the C toolchain (and builds the shipped example) first.
    examples_dir().expect("examples build");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = plugin(&[
        "new",
        "skipper",
        "--lang",
        "c",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let project = dir.path().join("skipper");
    let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
    assert!(readme.starts_with("# skipper (C)"), "{readme}");
    assert!(!readme.contains("skip-collections"), "{readme}");
    let build = Command::new(project.join("build.sh"))
        .arg("skipper.wasm")
        .current_dir(&project)
        .env(
            "WASM_TOOLS",
            tidegate_testkit::wasm_tools_path().expect("wasm-tools"),
        )
        .output()
        .expect("run build.sh");
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let component = project.join("skipper.wasm").display().to_string();
    let events = project.join("events.jsonl").display().to_string();
    let out = plugin(&["test", &component, "--events", &events]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("line 2: insert shop.orders -> keep"),
        "{text}"
    );
    assert!(
        text.contains("line 3: insert shop.tmp_import -> drop"),
        "{text}"
    );
    assert!(
        text.contains("line 4: dropDatabase scratch -> keep"),
        "{text}"
    );
}

/// `new --lang python|js` writes the example project with the WIT contract next to it, so the
/// build needs nothing from the tidegate tree, under the new plugin's name: the README's
/// title and commands and the source's header name it, not the example (`min-total`,
/// `route-by-field`); a config key spelt like the example's name stays. (The examples
/// themselves are built and run through the host in tests/plugins.rs.)
#[test]
fn new_python_and_js_plugins_are_self_contained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    for (lang, name, files, example, title) in [
        (
            "python",
            "big-orders",
            ["app.py", "build.sh", "events.jsonl"],
            "min-total",
            "# big-orders (Python)",
        ),
        (
            "js",
            "router",
            ["plugin.js", "build.mjs", "events.jsonl"],
            "route-by-field",
            "# router (JavaScript)",
        ),
    ] {
        let out = plugin(&["new", name, "--lang", lang, "--dir", &d]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let root = dir.path().join(name);
        for f in files {
            assert!(root.join(f).is_file(), "{lang}: {f}");
        }
        let wit = std::fs::read_to_string(root.join("wit/types.wit")).expect("wit");
        assert!(wit.contains("package tidegate:plugin@0.1.0;"));
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        assert!(readme.starts_with(title), "{lang}: {readme}");
        assert!(
            readme.contains(&format!("tidegate plugin inspect {name}.wasm")),
            "{lang}: {readme}"
        );
        let source = std::fs::read_to_string(root.join(files[0])).unwrap();
        assert!(
            source.contains(&format!("{name}: a tidegate")),
            "{lang}: {source}"
        );
        for (file, text) in [("README.md", &readme), (files[0], &source)] {
            assert!(
                !text.contains(&format!("{example}.wasm"))
                    && !text.contains(&format!("# {example} (")),
                "{lang} {file} still names the example: {text}"
            );
        }
    }
    let app = std::fs::read_to_string(dir.path().join("big-orders/app.py")).unwrap();
    assert!(app.contains("config.get(\"min-total\")"), "{app}");
    assert!(
        !std::fs::read_to_string(dir.path().join("router/plugin.js"))
            .unwrap()
            .contains("route-by-field")
    );

    let out = plugin(&["new", "9lives", "--lang", "c", "--dir", &d]);
    assert_eq!(out.status.code(), Some(2), "bad names are refused");
}

/// The first `inspect` of a large component (the 18 MB Python example, compiled from cold)
/// says on stderr what it is compiling, with the size, and how long it took; stdout, which
/// scripts parse, is the same as for the quick cached run that follows.
#[test]
fn inspect_announces_a_slow_compile_on_stderr_only() {
    let component = examples_dir()
        .expect("examples build")
        .join("python-filter.wasm");
    let cache = tempfile::tempdir().expect("tempdir");
    let inspect = || {
        Command::new(env!("CARGO_BIN_EXE_tidegate"))
            .args(["plugin", "inspect", &component.display().to_string()])
            .env("XDG_CACHE_HOME", cache.path())
            .output()
            .expect("run tidegate")
    };
    let cold = inspect();
    assert_eq!(cold.status.code(), Some(0), "{}", stdout(&cold));
    let err = stderr(&cold);
    let megabytes = std::fs::metadata(&component).unwrap().len() as f64 / 1e6;
    assert!(
        err.contains(&format!(
            "compiling {} ({megabytes:.1} MB)…",
            component.display()
        )),
        "{err}"
    );
    assert!(err.contains("  done in "), "{err}");
    assert!(!stdout(&cold).contains("compiling"), "{}", stdout(&cold));

    let warm = inspect();
    assert_eq!(warm.status.code(), Some(0), "{}", stderr(&warm));
    assert_eq!(stdout(&cold), stdout(&warm));
}

/// `~/.cache/tidegate` (or `$TIDEGATE_CACHE`).
fn dirs_cache() -> std::path::PathBuf {
    std::env::var_os("TIDEGATE_CACHE")
        .map(Into::into)
        .unwrap_or_else(|| {
            Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cache/tidegate")
        })
}
