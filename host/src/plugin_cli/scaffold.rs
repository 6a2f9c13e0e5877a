//! `tidegate plugin new`: a plugin project that builds and tests out of the box.
//!
//! The Rust template lives in `templates/rust`; the C, Python and JavaScript projects are
//! copies of the examples in `examples/` (plus the WIT contract), so each scaffold is exactly
//! what the test suite builds and runs through the host.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::Lang;

/// `(relative path, contents)` of one project file; contents may hold `{{name}}`, `{{crate}}`
/// and `{{sdk}}`.
type File = (&'static str, &'static [u8]);

const RUST: &[File] = &[
    ("Cargo.toml", include_bytes!("templates/rust/Cargo.toml")),
    ("src/lib.rs", include_bytes!("templates/rust/lib.rs")),
    ("README.md", include_bytes!("templates/rust/README.md")),
    (
        "events.jsonl",
        include_bytes!("templates/rust/events.jsonl"),
    ),
];

/// tidegate's WIT contract, which the Python and JavaScript toolchains read at build time.
const WIT: File = (
    "wit/types.wit",
    include_bytes!("../../../wit/plugin-0.1/types.wit"),
);

const PYTHON: &[File] = &[
    (
        "app.py",
        include_bytes!("../../../examples/python-filter/app.py"),
    ),
    (
        "build.sh",
        include_bytes!("../../../examples/python-filter/build.sh"),
    ),
    (
        "README.md",
        include_bytes!("../../../examples/python-filter/README.md"),
    ),
    (
        "events.jsonl",
        include_bytes!("../../../examples/python-filter/events.jsonl"),
    ),
    WIT,
];

const JS: &[File] = &[
    (
        "plugin.js",
        include_bytes!("../../../examples/js-transform/plugin.js"),
    ),
    (
        "build.mjs",
        include_bytes!("../../../examples/js-transform/build.mjs"),
    ),
    (
        "README.md",
        include_bytes!("../../../examples/js-transform/README.md"),
    ),
    (
        "events.jsonl",
        include_bytes!("../../../examples/js-transform/events.jsonl"),
    ),
    WIT,
];

const C: &[File] = &[
    (
        "skip_collections.c",
        include_bytes!("../../../examples/c-filter/skip_collections.c"),
    ),
    (
        "build.sh",
        include_bytes!("../../../examples/c-filter/build.sh"),
    ),
    (
        "README.md",
        include_bytes!("../../../examples/c-filter/README.md"),
    ),
    (
        "events.jsonl",
        include_bytes!("../../../examples/c-filter/events.jsonl"),
    ),
    (
        "bindings/filter.c",
        include_bytes!("../../../examples/c-filter/bindings/filter.c"),
    ),
    (
        "bindings/filter.h",
        include_bytes!("../../../examples/c-filter/bindings/filter.h"),
    ),
    (
        "bindings/filter_component_type.o",
        include_bytes!("../../../examples/c-filter/bindings/filter_component_type.o"),
    ),
];

/// Where this binary's source tree keeps the SDK, if that tree is still there.
fn default_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    sdk.join("Cargo.toml")
        .is_file()
        .then(|| sdk.canonicalize().unwrap_or(sdk))
}

/// Creates `<dir>/<name>` for `lang`. Refuses to overwrite an existing folder.
pub fn new(name: &str, lang: Lang, dir: &Path, sdk: Option<&Path>) -> anyhow::Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || !name.starts_with(|c: char| c.is_ascii_alphabetic())
    {
        bail!("plugin name {name:?}: use letters, digits, `-` and `_`, starting with a letter");
    }
    let (files, sdk) = match lang {
        Lang::Rust => {
            let sdk = match sdk {
                Some(p) => p
                    .canonicalize()
                    .with_context(|| format!("--sdk {}", p.display()))?,
                None => default_sdk().context(
                    "cannot find the tidegate-plugin SDK next to this binary's sources; pass \
                     --sdk <path to tidegate's plugins/sdk>",
                )?,
            };
            (RUST, sdk.display().to_string())
        }
        Lang::C => (C, String::new()),
        Lang::Python => (PYTHON, String::new()),
        Lang::Js => (JS, String::new()),
    };
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let crate_name = name.replace('-', "_");
    for (path, contents) in files {
        let target = root.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let contents: Vec<u8> = match std::str::from_utf8(contents) {
            Ok(text) if !path.ends_with(".o") => text
                .replace("{{name}}", name)
                .replace("{{crate}}", &crate_name)
                .replace("{{sdk}}", &sdk)
                .into_bytes(),
            _ => contents.to_vec(),
        };
        std::fs::write(&target, contents)
            .with_context(|| format!("cannot write {}", target.display()))?;
        if path.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    println!("created {} ({lang:?})", root.display());
    let build = match lang {
        Lang::Rust => "cargo test, then build as README.md says".to_owned(),
        Lang::Js => format!(
            "npm install @bytecodealliance/componentize-js@0.23.0 && node build.mjs {name}.wasm"
        ),
        Lang::C | Lang::Python => format!("./build.sh {name}.wasm"),
    };
    println!("  cd {} && {build}", root.display());
    println!("  tidegate plugin test <the .wasm> --events events.jsonl");
    Ok(())
}
