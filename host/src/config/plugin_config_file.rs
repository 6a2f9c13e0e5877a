//! `config_file`: a plugin's config values kept in a JSON or TOML file of their own, for
//! settings too large for the main file (a `map` plugin's variants for a big polymorphic
//! collection, say).
//!
//! Plugins are sandboxed and cannot read host files, so the host reads the file when the
//! config is loaded (again on every SIGHUP) and hands its keys to `init` exactly as if they
//! were written in the plugin's `config` table. The file holds one object (JSON) or table
//! (TOML) of keys; a string value is passed as it is, a number or boolean as its text, an
//! array or object as its compact JSON text (so structured settings such as `map`'s
//! `variants` are written as plain JSON or TOML instead of JSON inside a string). A key may
//! be given in the file or in `config`, not both (which one should win is a guess an
//! operator should not have to remember).
//!
//! The file may hold secrets, as `config` may: errors name the file, the line and the key,
//! never a value.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::pipeline::PipelineConfig;
use super::toml_errors::describe_toml_error;
use super::validate::Problems;

/// The largest plugin config file read. Its values are copied into the plugin's memory (64
/// MiB by default) at every `init`, so a mapping much larger than this belongs elsewhere.
pub const MAX_PLUGIN_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// Reads every plugin's `config_file` of `unit` (relative to `base`, the config file's
/// folder), merging its keys into the plugin's `config`; the path is made absolute.
pub(super) fn load(unit: &mut PipelineConfig, base: &Path, problems: &mut Problems) {
    for plugin in &mut unit.plugins {
        let Some(file) = &plugin.config_file else {
            continue;
        };
        let path = base.join(file);
        let at = format!(
            "pipeline '{}': plugin '{}': config_file",
            unit.id, plugin.name
        );
        match read(&path) {
            Ok(values) => {
                for (key, value) in values {
                    match plugin.config.entry(key) {
                        Entry::Vacant(slot) => {
                            slot.insert(value);
                        }
                        Entry::Occupied(slot) => problems.push(format!(
                            "{at}: key `{}` is given both in {} and in `config`; keep one",
                            slot.key(),
                            path.display()
                        )),
                    }
                }
            }
            Err(problem) => problems.push(format!("{at}: {problem}")),
        }
        plugin.config_file = Some(path);
    }
}

/// The config values in the file at `path`: JSON, or TOML when its name ends in `.toml`.
/// The error names the file (and the line of a syntax error), never a value.
pub fn read(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let name = path.display();
    let size = std::fs::metadata(path)
        .map_err(|err| format!("{name}: cannot read it: {err}"))?
        .len();
    if size > MAX_PLUGIN_CONFIG_BYTES {
        return Err(format!(
            "{name}: {size} bytes, over the {MAX_PLUGIN_CONFIG_BYTES}-byte limit of a plugin config file"
        ));
    }
    let text =
        std::fs::read_to_string(path).map_err(|err| format!("{name}: cannot read it: {err}"))?;
    let is_toml = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("toml"));
    let object = match is_toml {
        true => parse_toml(&text),
        false => parse_json(&text),
    }
    .map_err(|problem| format!("{name}: {problem}"))?;
    object
        .into_iter()
        .map(|(key, value)| Ok((key.clone(), config_value(&key, value)?)))
        .collect::<Result<_, String>>()
        .map_err(|problem| format!("{name}: {problem}"))
}

/// A JSON object's keys and values. serde_json's syntax errors name the line and column
/// and never quote the text.
fn parse_json(text: &str) -> Result<serde_json::Map<String, Value>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(format!(
            "must hold a JSON object of config keys, not {}",
            kind(&other)
        )),
        Err(err) => Err(format!(
            "not JSON: {err} (a file not named *.toml is read as JSON)"
        )),
    }
}

/// A TOML table's keys and values, as JSON values.
fn parse_toml(text: &str) -> Result<serde_json::Map<String, Value>, String> {
    let table: toml::Table = toml::from_str(text)
        .map_err(|err| format!("not TOML: {}", describe_toml_error(text, &err)))?;
    Ok(table
        .into_iter()
        .map(|(key, value)| (key, toml_to_json(value)))
        .collect())
}

fn toml_to_json(value: toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map_or_else(|| Value::String(f.to_string()), Value::Number),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Value::Object(
            table
                .into_iter()
                .map(|(k, v)| (k, toml_to_json(v)))
                .collect(),
        ),
    }
}

/// One value as the string `init` receives.
fn config_value(key: &str, value: Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s),
        Value::Null => Err(format!(
            "key `{key}` is null; leave it out instead (config values are text)"
        )),
        Value::Bool(_) | Value::Number(_) => Ok(value.to_string()),
        Value::Array(_) | Value::Object(_) => Ok(value.to_string()),
    }
}

/// What a JSON value is, for an error that must not show it.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn json_values_become_config_strings() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write(
            &dir,
            "map.json",
            "\u{feff}{\"discriminator\": \"kind\", \"n\": 3, \"f\": 1.5, \"on\": true,\n\
             \"variants\": {\"post\": {\"fields\": {\"a.b\": \"ab\"}}}, \"list\": [1, \"x\"]}",
        );
        let values = read(&path).expect("valid");
        assert_eq!(values["discriminator"], "kind");
        assert_eq!(values["n"], "3");
        assert_eq!(values["f"], "1.5");
        assert_eq!(values["on"], "true");
        assert_eq!(values["variants"], r#"{"post":{"fields":{"a.b":"ab"}}}"#);
        assert_eq!(values["list"], r#"[1,"x"]"#);
    }

    #[test]
    fn toml_values_become_config_strings() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write(
            &dir,
            "map.TOML",
            "discriminator = \"kind\"\nlimit = 10\n\
             [variants.post]\nfields = { \"author.id\" = \"userId\" }\nsubject = \"cdc.posts\"\n",
        );
        let values = read(&path).expect("valid");
        assert_eq!(values["discriminator"], "kind");
        assert_eq!(values["limit"], "10");
        assert_eq!(
            values["variants"],
            r#"{"post":{"fields":{"author.id":"userId"},"subject":"cdc.posts"}}"#
        );
    }

    #[test]
    fn errors_name_the_file_and_line_but_no_value() {
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = "hunter2-secret";
        let cases = [
            (
                "bad.json",
                format!("{{\"key\": \"{secret}\",\n \"x\" 1}}"),
                "line 2",
            ),
            ("list.json", format!("[\"{secret}\"]"), "not an array"),
            (
                "null.json",
                "{\"key\": null}".to_string(),
                "key `key` is null",
            ),
            (
                "bad.toml",
                format!("key = \"{secret}\"\nother = {secret}\n"),
                "line 2",
            ),
        ];
        for (file, text, needle) in cases {
            let path = write(&dir, file, &text);
            let err = read(&path).expect_err("refused");
            assert!(err.starts_with(&path.display().to_string()), "{err}");
            assert!(err.contains(needle), "{file}: {err}");
            assert!(!err.contains(secret), "{file}: {err}");
        }
        let missing = read(&dir.path().join("nope.json")).expect_err("refused");
        assert!(missing.contains("nope.json: cannot read it"), "{missing}");
    }

    #[test]
    fn oversized_files_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let big = "x".repeat(usize::try_from(MAX_PLUGIN_CONFIG_BYTES).expect("fits") + 1);
        let path = write(&dir, "big.json", &format!("{{\"k\": \"{big}\"}}"));
        let err = read(&path).expect_err("refused");
        assert!(err.contains("limit of a plugin config file"), "{err}");
        assert!(!err.contains("xxxx"), "{err}");
    }
}
