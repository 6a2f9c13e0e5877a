//! Tenancy: several isolated units sharing one pipeline's MongoDB source. Each tenant is
//! expanded into a unit of its own at load time, so nothing downstream needs to know about
//! tenants except the host-side namespace check ([`PipelineConfig::may_see`]).

use std::collections::HashSet;

use serde::Deserialize;

use super::pipeline::PipelineConfig;
use super::plugins::{Capabilities, LimitOverrides, PluginConfig, QuarantineConfig};
use super::sink::SinkConfig;
use super::validate::is_valid_id;

/// One tenant of a pipeline (`[[pipeline.tenant]]`). At load time each tenant becomes a
/// unit of its own with id `<pipeline>.<tenant>`: its own change stream (narrowed on the
/// server to its namespaces), plugin thread, publisher and checkpoint, so a slow or broken
/// tenant can never hold another one back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Unique within the pipeline: letters, digits, `-` and `_`.
    pub id: String,
    /// The namespaces the tenant may see: `db.coll`, or `db.*` for a whole database. They
    /// must lie inside the pipeline's own scope. Enforced on the server (`$match`) and
    /// again in the host before any plugin sees an event.
    pub namespaces: Vec<String>,
    /// The tenant's plugin chain.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
    /// Limits for the tenant's plugins (a plugin's own `limits` override them).
    #[serde(default)]
    pub limits: LimitOverrides,
    /// What the tenant's plugins may use. Default: nothing.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// How the tenant's failing plugins are handled.
    #[serde(default)]
    pub quarantine: QuarantineConfig,
    /// The tenant's stream and subjects. Every output must stay under its `subject_prefix`.
    pub sink: SinkConfig,
}

/// What a tenant unit may see, kept for the host-side check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantScope {
    /// The tenant's id.
    pub id: String,
    /// Its namespaces, parsed.
    pub namespaces: Vec<NamespacePattern>,
}

/// `db.coll` or `db.*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePattern {
    /// Database name.
    pub db: String,
    /// Collection name; `None` for every collection of `db`.
    pub coll: Option<String>,
}

impl NamespacePattern {
    /// Parses `db.coll` or `db.*`.
    pub fn parse(text: &str) -> Result<NamespacePattern, String> {
        let (db, coll) = text
            .split_once('.')
            .ok_or_else(|| format!("'{text}' is not 'db.collection' or 'db.*'"))?;
        if db.is_empty() || coll.is_empty() || db.contains(['*', '$', ' ']) {
            return Err(format!("'{text}' is not 'db.collection' or 'db.*'"));
        }
        let coll = match coll {
            "*" => None,
            c if c.contains('*') => {
                return Err(format!(
                    "'{text}': only a whole database may be matched with '*' (as in 'db.*')"
                ))
            }
            c => Some(c.to_string()),
        };
        Ok(NamespacePattern {
            db: db.to_string(),
            coll,
        })
    }

    /// Whether an event on `db`/`coll` falls under this pattern. Database-level events
    /// (no collection, like dropDatabase) match any pattern of their database.
    pub fn matches(&self, db: &str, coll: Option<&str>) -> bool {
        self.db == db
            && match (&self.coll, coll) {
                (Some(mine), Some(theirs)) => mine == theirs,
                _ => true,
            }
    }
}

/// Turns every pipeline with `[[pipeline.tenant]]`s into one unit per tenant (see
/// [`TenantConfig`]); pipelines without tenants are units as they are.
pub(super) fn expand_tenants(
    pipelines: Vec<PipelineConfig>,
) -> Result<Vec<PipelineConfig>, String> {
    let mut units = Vec::new();
    for mut pipeline in pipelines {
        let tenants = std::mem::take(&mut pipeline.tenants);
        if tenants.is_empty() {
            if pipeline.sink.stream.is_empty() || pipeline.sink.subject_prefix.is_empty() {
                return Err(format!(
                    "pipeline '{}': [pipeline.sink] with `stream` and `subject_prefix` is \
                     required (or [[pipeline.tenant]]s, each with its own sink)",
                    pipeline.id
                ));
            }
            units.push(pipeline);
            continue;
        }
        if !pipeline.plugins.is_empty()
            || !pipeline.sink.stream.is_empty()
            || pipeline.limits != LimitOverrides::default()
            || pipeline.capabilities != Capabilities::default()
            || pipeline.quarantine != QuarantineConfig::default()
        {
            return Err(format!(
                "pipeline '{}' has tenants: plugins, limits, capabilities, quarantine and sink \
                 belong in each [[pipeline.tenant]], not in the pipeline",
                pipeline.id
            ));
        }
        let mut ids = HashSet::new();
        for tenant in tenants {
            let at =
                |key: &str| format!("pipeline '{}', tenant '{}': {key}", pipeline.id, tenant.id);
            if !is_valid_id(&tenant.id) {
                return Err(format!(
                    "{}: the id must be non-empty and use only letters, digits, '-' and '_'",
                    at("id")
                ));
            }
            if !ids.insert(tenant.id.clone()) {
                return Err(format!("{}: used twice", at("id")));
            }
            if tenant.namespaces.is_empty() {
                return Err(format!(
                    "{}: list what the tenant may see ('db.coll' or 'db.*')",
                    at("namespaces")
                ));
            }
            let mut namespaces = Vec::new();
            for text in &tenant.namespaces {
                let pattern = NamespacePattern::parse(text)
                    .map_err(|e| format!("{}: {e}", at("namespaces")))?;
                let inside = pipeline
                    .database
                    .as_ref()
                    .is_none_or(|db| *db == pattern.db)
                    && (pipeline.collections.is_empty()
                        || pattern
                            .coll
                            .as_ref()
                            .is_some_and(|c| pipeline.collections.contains(c)));
                if !inside {
                    return Err(format!(
                        "{}: '{text}' lies outside what the pipeline watches",
                        at("namespaces")
                    ));
                }
                namespaces.push(pattern);
            }
            units.push(PipelineConfig {
                id: format!("{}.{}", pipeline.id, tenant.id),
                plugins: tenant.plugins,
                limits: tenant.limits,
                capabilities: tenant.capabilities,
                quarantine: tenant.quarantine,
                sink: tenant.sink,
                tenants: Vec::new(),
                tenant: Some(TenantScope {
                    id: tenant.id,
                    namespaces,
                }),
                ..pipeline.clone()
            });
        }
    }
    Ok(units)
}

impl PipelineConfig {
    /// Whether this unit may see an event on `namespace`: always without tenants; for a
    /// tenant, only its namespaces (and stream-level events such as invalidate, which have
    /// no namespace).
    pub fn may_see(&self, namespace: &crate::model::Namespace) -> bool {
        let Some(tenant) = &self.tenant else {
            return true;
        };
        namespace.db.is_empty()
            || tenant
                .namespaces
                .iter()
                .any(|p| p.matches(&namespace.db, namespace.coll.as_deref()))
    }
}
