//! Tenancy: several isolated units sharing one pipeline's MongoDB source. Each tenant is
//! expanded into a unit of its own at load time, so nothing downstream needs to know about
//! tenants except the host-side namespace check ([`PipelineConfig::may_see`]).

use std::collections::HashSet;

use serde::Deserialize;

use super::pipeline::PipelineConfig;
use super::plugins::{Capabilities, LimitOverrides, PluginConfig, QuarantineConfig};
use super::quota::Quota;
use super::sink::SinkConfig;
use super::validate::{is_valid_id, Problems};

/// One tenant of a pipeline (`[[pipeline.tenant]]`). At load time each tenant becomes a
/// unit of its own with id `<pipeline>.<tenant>`: its own change stream (narrowed on the
/// server to its namespaces), pool account, publisher and checkpoint, so a slow or broken
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
    /// What the tenant may consume in all: plugins, memory, CPU, events/s, bytes/s.
    #[serde(default)]
    pub quota: Quota,
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

/// Turns a pipeline with `[[pipeline.tenant]]`s into one unit per tenant (see
/// [`TenantConfig`]); a pipeline without tenants is a unit as it is. A tenant whose id is
/// wrong gets no unit (the unit's own checks would only repeat the problem); other tenant
/// problems are recorded and the unit is still made, so that its remaining sections are
/// checked in the same run.
pub(super) fn expand_tenants(
    mut pipeline: PipelineConfig,
    problems: &mut Problems,
) -> Vec<PipelineConfig> {
    let tenants = std::mem::take(&mut pipeline.tenants);
    if tenants.is_empty() {
        return vec![pipeline];
    }
    if !pipeline.plugins.is_empty()
        || !pipeline.sink.stream.is_empty()
        || pipeline.limits != LimitOverrides::default()
        || pipeline.capabilities != Capabilities::default()
        || pipeline.quarantine != QuarantineConfig::default()
        || pipeline.quota != Quota::default()
    {
        problems.push(format!(
            "pipeline '{}' has tenants: plugins, limits, capabilities, quarantine, quota and \
             sink belong in each [[pipeline.tenant]], not in the pipeline",
            pipeline.id
        ));
    }
    let mut ids = HashSet::new();
    let mut units = Vec::new();
    for tenant in tenants {
        let at = |key: &str| format!("pipeline '{}', tenant '{}': {key}", pipeline.id, tenant.id);
        if !is_valid_id(&tenant.id) {
            problems.push(format!(
                "{}: the id must be non-empty and use only letters, digits, '-' and '_'",
                at("id")
            ));
            continue;
        }
        if !ids.insert(tenant.id.clone()) {
            problems.push(format!("{}: used twice", at("id")));
            continue;
        }
        let namespaces = tenant_namespaces(&pipeline, &tenant, problems);
        units.push(PipelineConfig {
            id: format!("{}.{}", pipeline.id, tenant.id),
            plugins: tenant.plugins,
            limits: tenant.limits,
            capabilities: tenant.capabilities,
            quarantine: tenant.quarantine,
            quota: tenant.quota,
            sink: tenant.sink,
            tenants: Vec::new(),
            tenant: Some(TenantScope {
                id: tenant.id,
                namespaces,
            }),
            ..pipeline.clone()
        });
    }
    units
}

/// A tenant's namespaces, parsed; each must lie inside what the pipeline watches, or the
/// server-side narrowing would widen the tenant's view instead.
fn tenant_namespaces(
    pipeline: &PipelineConfig,
    tenant: &TenantConfig,
    problems: &mut Problems,
) -> Vec<NamespacePattern> {
    let at = format!(
        "pipeline '{}', tenant '{}': namespaces",
        pipeline.id, tenant.id
    );
    if tenant.namespaces.is_empty() {
        problems.push(format!(
            "{at}: list what the tenant may see ('db.coll' or 'db.*')"
        ));
    }
    let mut namespaces = Vec::new();
    for text in &tenant.namespaces {
        let pattern = match NamespacePattern::parse(text) {
            Ok(pattern) => pattern,
            Err(e) => {
                problems.push(format!("{at}: {e}"));
                continue;
            }
        };
        let inside = pipeline
            .database
            .as_ref()
            .is_none_or(|db| *db == pattern.db)
            && (pipeline.collections.is_empty()
                || pattern
                    .coll
                    .as_ref()
                    .is_some_and(|c| pipeline.collections.contains(c)))
            && (pipeline.collection_list.is_empty()
                || pattern
                    .coll
                    .as_ref()
                    .is_some_and(|c| pipeline.collection_list.contains(&pattern.db, c)));
        if inside {
            namespaces.push(pattern);
        } else {
            problems.push(format!(
                "{at}: '{text}' lies outside what the pipeline watches"
            ));
        }
    }
    namespaces
}

impl PipelineConfig {
    /// Whether this unit may see an event on `namespace`: stream-level events such as
    /// invalidate (no namespace) always; with a `collections_file`, only the listed
    /// collections; for a tenant, only its namespaces. The server filters alike (see
    /// `source::open::namespace_filter`); this is the check that does not depend on it.
    pub fn may_see(&self, namespace: &crate::model::Namespace) -> bool {
        if namespace.db.is_empty() {
            return true;
        }
        let listed = self.collection_list.is_empty()
            || namespace
                .coll
                .as_deref()
                .is_some_and(|coll| self.collection_list.contains(&namespace.db, coll));
        listed
            && self.tenant.as_ref().is_none_or(|tenant| {
                tenant
                    .namespaces
                    .iter()
                    .any(|p| p.matches(&namespace.db, namespace.coll.as_deref()))
            })
    }
}
