//! Checking a pushed plugin before it is accepted, with the code that loads plugins for a
//! running unit ([`Plugin::load`]): it must be a component of a contract world this host
//! runs, import nothing the host does not offer, fit the tenant's limits, `init` with the
//! config its tenant gives it, and survive a call on a sample event (the same smoke call
//! hot reload makes). A refusal says which step failed and why.

use std::path::Path;

use crate::config::{Capabilities, PipelineConfig};
use crate::plugin::{Chain, Plugin};
use crate::sandbox::Sandbox;

/// What an accepted plugin is.
#[derive(Debug, serde::Serialize)]
pub struct Accepted {
    /// `filter` or `transform`.
    pub world: String,
    /// The interfaces it imports.
    pub imports: Vec<String>,
    /// Imports that the tenant's capabilities leave inert (a clock stopped at the epoch, a
    /// fixed random stream, no files, an empty environment): worth knowing, not a refusal.
    pub notes: Vec<String>,
}

/// Validates `bytes` as plugin `name` of tenant unit `unit` (its config, limits and
/// capabilities), writing them to a scratch file in `scratch` for the loader. Blocking.
pub fn validate(
    sandbox: &Sandbox,
    unit: &PipelineConfig,
    name: &str,
    bytes: &[u8],
    scratch: &Path,
) -> Result<Accepted, String> {
    let Some(plugin) = unit.plugins.iter().find(|p| p.name == name) else {
        let names: Vec<&str> = unit.plugins.iter().map(|p| p.name.as_str()).collect();
        return Err(format!(
            "tenant '{}' has no plugin '{name}' in its chain (it has: [{}]); add it to the \
             tenant's spec first",
            unit.id,
            names.join(", ")
        ));
    };
    if bytes.get(0..4) != Some(b"\0asm") {
        return Err("not a WebAssembly file (no \\0asm header)".into());
    }
    let imports = imports(bytes);
    let path = scratch.join(format!(
        ".upload-{}-{}.wasm",
        std::process::id(),
        super::store::sha256_hex(bytes)
    ));
    std::fs::write(&path, bytes)
        .map_err(|err| format!("cannot write a scratch copy to {}: {err}", path.display()))?;
    let loaded = Plugin::load(sandbox, name, &path, &Chain::settings(unit, plugin));
    let _ = std::fs::remove_file(&path);
    // The loader's message names the scratch file; the caller knows it as its upload. A
    // plugin-error from `init` is passed on as it is, so it is named as such.
    let mut plugin = loaded.map_err(|err| match err {
        crate::Error::Plugin { message, .. }
            if ["invalid-config:", "invalid-event:", "failed:"]
                .iter()
                .any(|p| message.starts_with(p)) =>
        {
            format!("its init refused the tenant's config: {message}")
        }
        crate::Error::Plugin { message, .. } => message,
        other => other.to_string(),
    })?;
    plugin.smoke_test().map_err(|err| {
        format!(
            "the smoke call on a sample event failed ({}): {}",
            err.kind.as_str(),
            err.message
        )
    })?;
    Ok(Accepted {
        world: format!("{:?}", plugin.world()).to_lowercase(),
        notes: inert(&imports, &unit.capabilities),
        imports,
    })
}

/// The component's own (top-level) imports.
fn imports(bytes: &[u8]) -> Vec<String> {
    let mut depth = 0i32;
    let mut names = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { break };
        match payload {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth -= 1,
            wasmparser::Payload::ComponentImportSection(reader) if depth == 0 => {
                names.extend(
                    reader
                        .into_iter()
                        .flatten()
                        .map(|i| i.name.name.to_string()),
                );
            }
            _ => {}
        }
    }
    names
}

/// Which of `imports` the capabilities leave inert.
fn inert(imports: &[String], capabilities: &Capabilities) -> Vec<String> {
    let rules: [(&str, bool, &str); 4] = [
        (
            "wasi:clocks/",
            capabilities.clock,
            "clocks stand still at the epoch and waits end at once (capability `clock` not granted)",
        ),
        (
            "wasi:random/",
            capabilities.random,
            "random numbers are a fixed stream (capability `random` not granted)",
        ),
        (
            "wasi:filesystem/",
            !capabilities.read_dirs.is_empty(),
            "no folders are mounted (no `read_dirs` granted)",
        ),
        (
            "wasi:cli/environment",
            !capabilities.env.is_empty(),
            "the environment is empty (no `env` granted)",
        ),
    ];
    rules
        .iter()
        .filter(|(prefix, granted, _)| !granted && imports.iter().any(|i| i.starts_with(prefix)))
        .map(|(prefix, _, note)| format!("{}: {note}", prefix.trim_end_matches('/')))
        .collect()
}
