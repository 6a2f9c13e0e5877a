//! Tenancy: several isolated units sharing one pipeline's MongoDB source. Each tenant is
//! expanded into a unit of its own at load time, so nothing downstream needs to know about
//! tenants except the host-side namespace check ([`PipelineConfig::may_see`]) and the
//! shared reader that routes events to them (`pipeline::shared`).

use std::borrow::Cow;
use std::collections::HashSet;

use bson::oid::ObjectId;
use bson::{doc, Bson, Document, RawBsonRef};
use serde::Deserialize;

use super::pipeline::{
    FullDocument, FullDocumentBeforeChange, PipelineConfig, SnapshotMode, TenantReader,
};
use super::plugins::{Capabilities, LimitOverrides, PluginConfig, QuarantineConfig};
use super::quota::Quota;
use super::sink::SinkConfig;
use super::validate::{is_valid_id, Problems};

/// One tenant of a pipeline (`[[pipeline.tenant]]`). At load time each tenant becomes a
/// unit of its own with id `<pipeline>.<tenant>`: its own pool account, publisher and
/// checkpoint; its events come from the pipeline's shared change stream (or, with
/// `tenant_reader = "own"` and while it catches up, from its own stream narrowed on the
/// server to its namespaces and key values), so a slow or broken tenant never holds
/// another one back.
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
    /// The tenant's own stream and subjects. Every output must stay under its
    /// `subject_prefix`. Without it, the tenant publishes into the pipeline's
    /// `[pipeline.sink]` stream, under `<the pipeline's subject_prefix>.<tenant id>`.
    pub sink: Option<SinkConfig>,
    /// With the pipeline's `tenant_key`: the key values whose events are this tenant's,
    /// written as text: a string as it is, an ObjectId in lowercase hex, an integer in
    /// decimal ([`TenantKey::value_text`]). Default: the tenant's id. No two tenants may share
    /// a value.
    #[serde(default)]
    pub key_values: Vec<String>,
}

/// What a tenant unit may see, kept for the host-side check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantScope {
    /// The tenant's id.
    pub id: String,
    /// Its namespaces, parsed.
    pub namespaces: Vec<NamespacePattern>,
    /// The pipeline it belongs to (the id of its shared reader).
    pub pipeline: String,
    /// With the pipeline's `tenant_key`, the values that are the tenant's; empty without.
    pub key_values: Vec<String>,
}

/// The pipeline's `tenant_key`, split into where an event carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantKey {
    /// The dotted path, as configured (`fullDocument.tenantId`).
    pub path: String,
    /// Where a delete carries it, for a key in `fullDocument`: the same path under
    /// `fullDocumentBeforeChange` (the pre-image).
    pub delete_path: Option<String>,
}

/// 2^63: a long is at least its negative and less than it.
const LONG_RANGE: f64 = 9_223_372_036_854_775_808.0;

/// Operations that carry a document (and so a tenant key); other events (drop, rename,
/// invalidate…) go to every tenant that may see their namespace.
pub const KEYED_OPERATIONS: [&str; 4] = ["insert", "update", "replace", "delete"];

/// The events a shared reader queues across all its tenants' lanes before it waits for them
/// (`pipeline::shared`): what it holds in memory ahead of their chains, and so the most one
/// tenant's `tenant_lane_events` may be.
pub const SHARED_READER_EVENTS: u32 = 65_536;

/// The default `tenant_lane_events`: a quarter of [`SHARED_READER_EVENTS`], so that a few
/// tenants far behind never take the whole of it.
pub const DEFAULT_TENANT_LANE_EVENTS: u32 = SHARED_READER_EVENTS / 4;

impl TenantKey {
    /// Parses `tenant_key`: a dotted path under `fullDocument` or `documentKey`.
    pub fn parse(path: &str) -> Result<TenantKey, String> {
        let (root, rest) = path.split_once('.').unwrap_or((path, ""));
        if rest.is_empty()
            || rest
                .split('.')
                .any(|part| part.is_empty() || part.starts_with('$'))
        {
            return Err(format!(
                "'{path}' is not a dotted path into the event such as 'fullDocument.tenantId'"
            ));
        }
        match root {
            "fullDocument" => Ok(TenantKey {
                path: path.to_string(),
                delete_path: Some(format!("fullDocumentBeforeChange.{rest}")),
            }),
            "documentKey" => Ok(TenantKey {
                path: path.to_string(),
                delete_path: None,
            }),
            _ => Err(format!(
                "'{path}' must lie in 'fullDocument' or 'documentKey' (the fields every \
                 insert, update, replace and delete can carry)"
            )),
        }
    }

    /// Where an event of `operation` carries the key.
    pub fn path_for(&self, operation: &str) -> &str {
        match (&self.delete_path, operation) {
            (Some(before), "delete") => before,
            _ => &self.path,
        }
    }

    /// A document's key value as the text `key_values` name it by: a string as it is, an
    /// ObjectId as its 24 lowercase hex digits (as `ObjectId.toString()` prints it), an
    /// integer (int, long, or a double with an integral value) in plain decimal. Applications
    /// key their tenants by ObjectIds and numbers as often as by strings, and the config (a
    /// TOML file, the admin API's JSON) names them all as strings. `None` for any other type.
    pub fn value_text(value: RawBsonRef<'_>) -> Option<Cow<'_, str>> {
        match value {
            RawBsonRef::String(text) => Some(Cow::Borrowed(text)),
            RawBsonRef::ObjectId(id) => Some(Cow::Owned(id.to_hex())),
            RawBsonRef::Int32(n) => Some(Cow::Owned(n.to_string())),
            RawBsonRef::Int64(n) => Some(Cow::Owned(n.to_string())),
            // An integral double in a long's range is that integer exactly, as the server's
            // numeric comparison (`server_match`) takes it.
            RawBsonRef::Double(x) if x.fract() == 0.0 && (-LONG_RANGE..LONG_RANGE).contains(&x) => {
                Some(Cow::Owned((x as i64).to_string()))
            }
            _ => None,
        }
    }

    /// The query (for a change stream's `$match`) on the key at `path` that holds exactly
    /// when [`TenantKey::value_text`] of the value there is one of `values`: each value as a
    /// string, and, where its text is an ObjectId's or an integer's, as that too (integers
    /// compared as numbers, of the numeric types `value_text` reads only). A query reaches
    /// into arrays, which the router does not: no field on the way may be one.
    pub fn server_match(path: &str, values: &[String]) -> Document {
        let mut numbers = Vec::new();
        let mut ids = Vec::new();
        for value in values {
            if let Some(n) = value
                .parse::<i64>()
                .ok()
                .filter(|n| n.to_string() == *value)
            {
                numbers.push(Bson::Int64(n));
            }
            if let Some(id) = ObjectId::parse_str(value)
                .ok()
                .filter(|id| id.to_hex() == *value)
            {
                ids.push(Bson::ObjectId(id));
            }
        }
        let mut either = vec![doc! { path: { "$in": values } }];
        if !numbers.is_empty() {
            either.push(doc! { path: { "$in": numbers, "$type": ["int", "long", "double"] } });
        }
        if !ids.is_empty() {
            either.push(doc! { path: { "$in": ids } });
        }
        // Under the root (`fullDocument`…, never an array): each field on the way.
        let arrays: Vec<Document> = path
            .match_indices('.')
            .skip(1)
            .map(|(end, _)| &path[..end])
            .chain([path])
            .map(|field| doc! { field: { "$type": "array" } })
            .collect();
        let mut query = match either.len() {
            1 => either.remove(0),
            _ => doc! { "$or": either },
        };
        query.insert("$nor", arrays);
        query
    }
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
        || pipeline.limits != LimitOverrides::default()
        || pipeline.capabilities != Capabilities::default()
        || pipeline.quarantine != QuarantineConfig::default()
        || pipeline.quota != Quota::default()
    {
        problems.push(format!(
            "pipeline '{}' has tenants: plugins, limits, capabilities, quarantine and quota \
             belong in each [[pipeline.tenant]], not in the pipeline",
            pipeline.id
        ));
    }
    let shared = shared_sink(&pipeline, problems);
    check_tenant_reading(&pipeline, problems);
    let mut ids = HashSet::new();
    let mut values = HashSet::new();
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
        let key_values = tenant_key_values(&pipeline, &tenant, &mut values, problems);
        let sink = match (tenant.sink, &shared) {
            (Some(own), _) => own,
            (None, Some(shared)) => SinkConfig {
                subject_prefix: format!("{}.{}", shared.subject_prefix, tenant.id),
                shared_prefix: Some(shared.subject_prefix.clone()),
                ..shared.clone()
            },
            (None, None) => {
                problems.push(format!(
                    "{}: a tenant needs a [pipeline.tenant.sink] of its own, or the pipeline a \
                     [pipeline.sink] its tenants share",
                    at("sink")
                ));
                SinkConfig::default()
            }
        };
        units.push(PipelineConfig {
            id: format!("{}.{}", pipeline.id, tenant.id),
            plugins: tenant.plugins,
            limits: tenant.limits,
            capabilities: tenant.capabilities,
            quarantine: tenant.quarantine,
            quota: tenant.quota,
            sink,
            tenants: Vec::new(),
            tenant: Some(TenantScope {
                id: tenant.id,
                namespaces,
                pipeline: pipeline.id.clone(),
                key_values,
            }),
            ..pipeline.clone()
        });
    }
    units
}

/// The pipeline's `[pipeline.sink]`, if it has one: the stream its tenants without a sink of
/// their own share, each under a subject space of its own.
fn shared_sink(pipeline: &PipelineConfig, problems: &mut Problems) -> Option<SinkConfig> {
    let sink = &pipeline.sink;
    if sink.stream.is_empty() && sink.subject_prefix.is_empty() {
        return None;
    }
    let at = format!("pipeline '{}', sink", pipeline.id);
    if sink.stream.is_empty() || sink.subject_prefix.is_empty() {
        problems.push(format!(
            "{at}: a stream shared by the tenants needs both `stream` and `subject_prefix`"
        ));
        return None;
    }
    if pipeline.tenant_reader != TenantReader::Shared {
        problems.push(format!(
            "{at}: a stream the tenants share needs tenant_reader = \"shared\": one lease for \
             the pipeline, so that one instance writes the stream (with a reader each, tenants \
             are leased one by one, and two instances would break each other's ordering chain)"
        ));
    }
    if sink.dead_letter_subject.is_some() {
        problems.push(format!(
            "{at}: dead_letter_subject cannot be set on a stream the tenants share: each \
             tenant's dead letters go to <subject_prefix>.<tenant id>.dead-letter, in its own \
             subject space"
        ));
    }
    Some(sink.clone())
}

/// The pipeline-wide keys of tenant reading: a `tenant_key` every routed event can carry,
/// and no signal collection beside a shared reader. Each problem names the fix.
fn check_tenant_reading(pipeline: &PipelineConfig, problems: &mut Problems) {
    let at = format!("pipeline '{}'", pipeline.id);
    if pipeline.tenant_catch_up_streams == 0 {
        problems.push(format!(
            "{at}: tenant_catch_up_streams must be at least 1 (no tenant behind the shared \
             reader could ever catch up)"
        ));
    }
    let most = SHARED_READER_EVENTS;
    if pipeline.tenant_lane_events == 0 || pipeline.tenant_lane_events > most {
        problems.push(format!(
            "{at}: tenant_lane_events must be between 1 and {most} (the events the shared \
             reader queues across all its tenants), not {}",
            pipeline.tenant_lane_events
        ));
    }
    if pipeline.tenant_reader == TenantReader::Shared && pipeline.signal_collection.is_some() {
        problems.push(format!(
            "{at}: signal_collection is not supported with a shared tenant reader (a signal \
             would start a snapshot for every tenant); set tenant_reader = \"own\" or remove it"
        ));
    }
    let Some(path) = &pipeline.tenant_key else {
        return;
    };
    let key = match TenantKey::parse(path) {
        Ok(key) => key,
        Err(e) => return problems.push(format!("{at}: tenant_key {e}")),
    };
    if pipeline.snapshot != SnapshotMode::Never {
        problems.push(format!(
            "{at}: snapshot with tenant_key is not supported (a snapshot reads whole \
             collections, not one tenant's documents); set snapshot = \"never\""
        ));
    }
    let skipped = |op: &str| pipeline.skip_operations.iter().any(|s| s == op);
    if key.delete_path.is_none() {
        return;
    }
    if pipeline.full_document == FullDocument::Off && !skipped("update") {
        problems.push(format!(
            "{at}: tenant_key '{path}' is in fullDocument, which updates carry only with \
             full_document = \"update-lookup\", \"when-available\" or \"required\"; set one, \
             put \"update\" in skip_operations, or use a key in documentKey (a shard key)"
        ));
    }
    if pipeline.full_document_before_change == FullDocumentBeforeChange::Off && !skipped("delete") {
        problems.push(format!(
            "{at}: tenant_key '{path}' is in fullDocument, which deletes do not carry: set \
             full_document_before_change = \"required\" (with changeStreamPreAndPostImages on \
             the collections), put \"delete\" in skip_operations, or use a key in documentKey"
        ));
    }
}

/// A tenant's key values (default: its id) with the pipeline's `tenant_key`; each value
/// belongs to one tenant only.
fn tenant_key_values(
    pipeline: &PipelineConfig,
    tenant: &TenantConfig,
    taken: &mut HashSet<String>,
    problems: &mut Problems,
) -> Vec<String> {
    let at = format!("pipeline '{}', tenant '{}'", pipeline.id, tenant.id);
    if pipeline.tenant_key.is_none() {
        if !tenant.key_values.is_empty() {
            problems.push(format!(
                "{at}: key_values need the pipeline's tenant_key (say where the key is, \
                 e.g. tenant_key = \"fullDocument.tenantId\")"
            ));
        }
        return Vec::new();
    }
    let values = match tenant.key_values.is_empty() {
        true => vec![tenant.id.clone()],
        false => tenant.key_values.clone(),
    };
    for value in &values {
        if !taken.insert(value.clone()) {
            problems.push(format!(
                "{at}: key value '{value}' belongs to another tenant too; each value routes \
                 to one tenant"
            ));
        }
    }
    values
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

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const KEYED: &str = r#"
        [nats]
        url = "nats://127.0.0.1:4222"
        [[pipeline]]
        id = "saas"
        mongodb_uri = "mongodb://127.0.0.1:27017/?replicaSet=rs0"
        database = "app"
        tenant_key = "fullDocument.tenantId"
        full_document = "update-lookup"
        full_document_before_change = "required"
        [[pipeline.tenant]]
        id = "acme"
        namespaces = ["app.*"]
        [pipeline.tenant.sink]
        stream = "ACME"
        subject_prefix = "acme"
        [[pipeline.tenant]]
        id = "initech"
        key_values = ["i1", "i2"]
        namespaces = ["app.orders"]
        [pipeline.tenant.sink]
        stream = "INITECH"
        subject_prefix = "initech"
    "#;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, std::path::Path::new("."), |_| None)
    }

    /// A tenant's own stream asks the server for its key values as strings, and as numbers
    /// and ObjectIds where their text is one, canonically written (no `042`, no uppercase
    /// hex: the router would never read a value so); no field on the way may be an array.
    #[test]
    fn the_server_is_asked_for_every_type_a_key_value_names() {
        use bson::{doc, oid::ObjectId, Bson};

        use crate::config::TenantKey;
        let id = "65a1f0c2e4b0a1b2c3d4e5f6";
        let values: Vec<String> = ["acme", "42", "042", "-7", id, &id.to_uppercase()]
            .map(String::from)
            .to_vec();
        let query = TenantKey::server_match("fullDocument.org.id", &values);
        let oid = ObjectId::parse_str(id).expect("oid");
        assert_eq!(
            query,
            doc! {
                "$or": [
                    { "fullDocument.org.id": { "$in": values.clone() } },
                    { "fullDocument.org.id": {
                        "$in": [Bson::Int64(42), Bson::Int64(-7)],
                        "$type": ["int", "long", "double"],
                    } },
                    { "fullDocument.org.id": { "$in": [oid] } },
                ],
                "$nor": [
                    { "fullDocument.org": { "$type": "array" } },
                    { "fullDocument.org.id": { "$type": "array" } },
                ],
            }
        );
        let strings = vec!["acme".to_string()];
        assert_eq!(
            TenantKey::server_match("documentKey.t", &strings),
            doc! {
                "documentKey.t": { "$in": strings.clone() },
                "$nor": [{ "documentKey.t": { "$type": "array" } }],
            }
        );
    }

    /// Key values default to the tenant's id; every tenant knows its pipeline.
    #[test]
    fn tenant_keys_default_to_the_id() {
        let config = parse(KEYED).expect("valid");
        let scopes: Vec<_> = config
            .pipelines
            .iter()
            .map(|p| p.tenant.clone().expect("tenant"))
            .collect();
        assert_eq!(scopes[0].key_values, ["acme"]);
        assert_eq!(scopes[1].key_values, ["i1", "i2"]);
        assert!(scopes.iter().all(|s| s.pipeline == "saas"));
    }

    /// Configs whose events could not be routed are refused, naming the fix.
    #[test]
    fn unroutable_key_configs_are_refused() {
        let cases = [
            ("full_document = \"update-lookup\"", "", "skip_operations"),
            (
                "full_document_before_change = \"required\"",
                "",
                "deletes do not carry",
            ),
            (
                "\"fullDocument.tenantId\"",
                "\"ns.db\"",
                "'fullDocument' or 'documentKey'",
            ),
            (
                "\"fullDocument.tenantId\"",
                "\"fullDocument\"",
                "dotted path",
            ),
            (
                "[\"i1\", \"i2\"]",
                "[\"acme\"]",
                "belongs to another tenant",
            ),
            (
                "database = \"app\"",
                "database = \"app\"\nsnapshot = \"initial\"",
                "snapshot",
            ),
            (
                "database = \"app\"",
                "database = \"app\"\nsignal_collection = \"app.signals\"",
                "tenant_reader = \"own\"",
            ),
            (
                "database = \"app\"",
                "database = \"app\"\ntenant_lane_events = 0",
                "tenant_lane_events must be between 1 and 65536",
            ),
            (
                "database = \"app\"",
                "database = \"app\"\ntenant_lane_events = 65537",
                "not 65537",
            ),
            (
                "database = \"app\"",
                "database = \"app\"\ntenant_catch_up_streams = 0",
                "tenant_catch_up_streams must be at least 1",
            ),
        ];
        crate::config::tests::assert_refused(KEYED, &cases);
        let text = KEYED.replace("tenant_key = \"fullDocument.tenantId\"", "");
        let err = parse(&text).expect_err("key values without a key");
        assert!(err.contains("need the pipeline's tenant_key"), "{err}");
        let own = KEYED.replace(
            "database = \"app\"",
            "database = \"app\"\ntenant_reader = \"own\"\nsignal_collection = \"app.signals\"",
        );
        parse(&own).expect("signals with own readers");
        let lanes = KEYED.replace(
            "database = \"app\"",
            "database = \"app\"\ntenant_lane_events = 65536",
        );
        let config = parse(&lanes).expect("the largest lane");
        assert!(config
            .pipelines
            .iter()
            .all(|p| p.tenant_lane_events == 65_536));
        let config = parse(KEYED).expect("valid");
        assert!(config
            .pipelines
            .iter()
            .all(|p| p.tenant_lane_events == 16_384));
    }
}
