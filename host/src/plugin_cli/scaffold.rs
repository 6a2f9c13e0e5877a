//! `tidegate plugin new`: a plugin project that builds and tests out of the box.
//!
//! The Rust template lives in `templates/rust`; the C, Python and JavaScript projects are
//! copies of the examples in `examples/` (plus the WIT contract), so each scaffold is exactly
//! what the test suite builds and runs through the host.

use std::path::Path;

use anyhow::{bail, Context};

use super::Lang;

/// `(relative path, contents)` of one project file; the Rust template's contents may hold
/// `{{name}}`, `{{crate}}`, `{{sdk_version}}` and `{{sdk_patch}}`.
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

/// The SDK release a scaffolded Rust plugin depends on (a Cargo requirement, so any 0.1.x).
/// A unit test keeps it in step with `plugins/Cargo.toml`.
const SDK_VERSION: &str = "0.1";

/// What a copied example calls itself, and the texts in its files where that name stands
/// for the plugin — not a config key spelt the same, like Python's `min-total` — so that
/// `plugin new` can write the new plugin's name there instead. (A unit test checks every
/// text still occurs in its example.)
struct ExampleName {
    name: &'static str,
    texts: &'static [&'static str],
}

const PYTHON_NAME: ExampleName = ExampleName {
    name: "min-total",
    texts: &[
        "min-total.wasm",
        "# min-total (Python)",
        "\"\"\"min-total: ",
    ],
};
const JS_NAME: ExampleName = ExampleName {
    name: "route-by-field",
    texts: &["route-by-field"],
};
const C_NAME: ExampleName = ExampleName {
    name: "skip-collections",
    texts: &["skip-collections"],
};

/// Creates `<dir>/<name>` for `lang`. Refuses to overwrite an existing folder. A Rust plugin
/// depends on the SDK from crates.io by version; `sdk_path` (a local checkout of
/// `plugins/sdk`) adds a `[patch.crates-io]` that builds against it instead.
pub fn new(name: &str, lang: Lang, dir: &Path, sdk_path: Option<&Path>) -> anyhow::Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || !name.starts_with(|c: char| c.is_ascii_alphabetic())
    {
        bail!("plugin name {name:?}: use letters, digits, `-` and `_`, starting with a letter");
    }
    if sdk_path.is_some() && !matches!(lang, Lang::Rust) {
        bail!("--sdk-path is for Rust plugins only");
    }
    let (files, example) = match lang {
        Lang::Rust => (RUST, None),
        Lang::C => (C, Some(&C_NAME)),
        Lang::Python => (PYTHON, Some(&PYTHON_NAME)),
        Lang::Js => (JS, Some(&JS_NAME)),
    };
    let sdk_patch = sdk_patch(sdk_path)?;
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
            Ok(text) if !path.ends_with(".o") => {
                let text = match example {
                    Some(example) => rename(text, example, name),
                    None => text
                        .replace("{{name}}", name)
                        .replace("{{crate}}", &crate_name)
                        .replace("{{sdk_version}}", SDK_VERSION)
                        .replace("{{sdk_patch}}", &sdk_patch),
                };
                text.into_bytes()
            }
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
    if matches!(lang, Lang::Rust) && sdk_path.is_none() {
        println!(
            "  (tidegate-plugin {SDK_VERSION} comes from crates.io; to use a local checkout of \
             tidegate's plugins/sdk instead, see [patch.crates-io] in Cargo.toml or pass \
             --sdk-path)"
        );
    }
    println!("  tidegate plugin test <the .wasm> --events events.jsonl");
    Ok(())
}

/// Writes `name` where `example`'s files name the plugin.
fn rename(text: &str, example: &ExampleName, name: &str) -> String {
    example.texts.iter().fold(text.to_owned(), |text, from| {
        text.replace(from, &from.replace(example.name, name))
    })
}

/// The end of a Rust plugin's `Cargo.toml`: a `[patch.crates-io]` that takes the SDK from
/// `sdk_path`, or the same section commented out, as a hint, when there is none. The SDK
/// is found by version from crates.io otherwise, never by a path the user did not give.
fn sdk_patch(sdk_path: Option<&Path>) -> anyhow::Result<String> {
    const WHY: &str = "# The SDK from a local checkout of tidegate instead of crates.io";
    let Some(path) = sdk_path else {
        return Ok(format!(
            "{WHY}\n# (`tidegate plugin new --sdk-path DIR` writes this):\n\
             # [patch.crates-io]\n\
             # tidegate-plugin = {{ path = \"/path/to/tidegate/plugins/sdk\" }}\n"
        ));
    };
    let sdk = path
        .canonicalize()
        .with_context(|| format!("--sdk-path {}", path.display()))?;
    let manifest = std::fs::read_to_string(sdk.join("Cargo.toml")).with_context(|| {
        format!(
            "--sdk-path {}: no Cargo.toml there; give tidegate's plugins/sdk folder",
            path.display()
        )
    })?;
    if !manifest.contains("name = \"tidegate-plugin\"") {
        bail!(
            "--sdk-path {}: its Cargo.toml is not the tidegate-plugin crate; give tidegate's \
             plugins/sdk folder",
            path.display()
        );
    }
    let Some(sdk) = sdk.to_str() else {
        bail!("--sdk-path {}: not a UTF-8 path", path.display());
    };
    Ok(format!(
        "{WHY} (`--sdk-path`);\n# remove this section to build against the published crate.\n\
         [patch.crates-io]\n\
         tidegate-plugin = {{ path = {} }}\n",
        toml::Value::String(sdk.to_owned())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every text `plugin new` renames still occurs in its example, so an edit to an example
    /// cannot silently leave the example's name in new plugins.
    #[test]
    fn renamed_texts_occur_in_their_examples() {
        for (files, example) in [(PYTHON, PYTHON_NAME), (JS, JS_NAME), (C, C_NAME)] {
            for text in example.texts {
                assert!(text.contains(example.name), "{text}");
                assert!(
                    files
                        .iter()
                        .any(|(_, bytes)| String::from_utf8_lossy(bytes).contains(text)),
                    "{text:?} is in none of the {} example's files",
                    example.name
                );
            }
        }
    }

    /// The scaffold's requirement matches the SDK's version in `plugins/Cargo.toml`.
    #[test]
    fn sdk_version_matches_the_sdk() {
        let manifest = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/Cargo.toml"),
        )
        .unwrap();
        let manifest: toml::Table = manifest.parse().unwrap();
        let version = manifest["workspace"]["package"]["version"]
            .as_str()
            .unwrap();
        assert!(
            version.starts_with(&format!("{SDK_VERSION}.")),
            "SDK {version}, scaffold requires {SDK_VERSION}"
        );
    }
}
