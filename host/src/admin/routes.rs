//! One function per endpoint of the admin API (the table is in docs/platform.md). Each
//! returns `Err(response)` for a refusal, so `?` reads as "or refuse".

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::consumer;
use serde::Deserialize;
use serde_json::json;

use super::http::{Request, Response};
use super::store::{TenantRecord, WriteError};
use super::tokens::{self, Caller};
use super::{purge, upload, Admin};
use crate::config::{PipelineConfig, TenantConfig};
use crate::ops::metrics;

type Outcome = Result<Response, Response>;

/// Answers one request of `caller` (see [`authenticate`]).
pub(super) async fn handle(admin: &Admin, request: &Request, caller: &Caller) -> Response {
    route(admin, request, caller)
        .await
        .unwrap_or_else(|refusal| refusal)
}

async fn route(admin: &Admin, request: &Request, caller: &Caller) -> Outcome {
    let path: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    match (request.method.as_str(), path.as_slice()) {
        ("GET", ["v1", "tenants"]) => list(admin, caller).await,
        ("POST", ["v1", "tenants"]) => add(admin, request, caller).await,
        ("GET", ["v1", "tenants", id]) => show(admin, id, caller).await,
        ("PUT", ["v1", "tenants", id]) => update(admin, id, request, caller).await,
        ("DELETE", ["v1", "tenants", id]) => remove(admin, id, request, caller).await,
        ("POST", ["v1", "tenants", id, "suspend"]) => suspend(admin, id, true, caller).await,
        ("POST", ["v1", "tenants", id, "resume"]) => suspend(admin, id, false, caller).await,
        ("POST", ["v1", "tenants", id, "token"]) => new_token(admin, id, caller).await,
        ("GET", ["v1", "tenants", id, "plugins"]) => plugins(admin, id, caller).await,
        ("PUT", ["v1", "tenants", id, "plugins", name]) => {
            push(admin, id, name, request, caller).await
        }
        ("GET", ["v1", "tenants", id, "dead-letters"]) => {
            dead_letters(admin, id, request, caller).await
        }
        (_, ["v1", "tenants", ..]) => Err(Response::error(
            405,
            format!(
                "{} {} is not an admin API call (see docs/platform.md)",
                request.method, request.path
            ),
        )),
        _ => Err(Response::error(
            404,
            format!("no such path: {}", request.path),
        )),
    }
}

/// The tenant a request uploads a plugin for, if it is an upload (`PUT
/// /v1/tenants/<id>/plugins/<name>`): its body may be large, and is read in its turn.
pub(super) fn upload_of<'a>(method: &str, path: &'a str) -> Option<&'a str> {
    let path: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, path.as_slice()) {
        ("PUT", ["v1", "tenants", id, "plugins", _]) => Some(id),
        _ => None,
    }
}

/// The operator, or the tenant whose token `authorization` (the header) carries; 401
/// otherwise. Asked before a request's body is read.
pub(super) async fn authenticate(
    admin: &Admin,
    authorization: Option<&str>,
) -> Result<Caller, Response> {
    let Some(token) = tokens::bearer(authorization) else {
        return Err(Response::error(
            401,
            "missing token: send `Authorization: Bearer <token>` with the operator token or a \
             tenant's token",
        ));
    };
    if tokens::matches(token, &admin.operator) {
        return Ok(Caller::Operator);
    }
    if let Some(id) = tokens::claimed_tenant(token) {
        if let Ok(Some((record, _))) = admin.store.get(id).await {
            if tokens::matches(token, &record.token_sha256) {
                return Ok(Caller::Tenant(id.to_string()));
            }
        }
    }
    Err(Response::error(
        401,
        "unknown or revoked token: use the operator token or the token issued when the tenant \
         was added (the operator can issue a new one: POST /v1/tenants/<id>/token)",
    ))
}

fn operator_only(caller: &Caller, what: &str) -> Result<(), Response> {
    match caller {
        Caller::Operator => Ok(()),
        Caller::Tenant(id) => Err(Response::error(
            403,
            format!("only the operator may {what}; this is tenant '{id}''s token"),
        )),
    }
}

/// Refuses (403) a tenant's token used on another tenant.
pub(super) fn own_tenant(caller: &Caller, id: &str) -> Result<(), Response> {
    match caller.may_use(id) {
        true => Ok(()),
        false => Err(Response::error(
            403,
            format!(
                "this token belongs to another tenant; a tenant's token may use only its own \
                 plugins, status and dead letters, not '{id}''s"
            ),
        )),
    }
}

/// The record of `id` and its revision; 404 if there is none.
async fn record(admin: &Admin, id: &str) -> Result<(TenantRecord, u64), Response> {
    match admin.store.get(id).await {
        Ok(Some(found)) => Ok(found),
        Ok(None) => Err(Response::error(404, format!("no tenant '{id}'"))),
        Err(err) => Err(Response::error(503, err)),
    }
}

/// The unit a record runs as; 422 naming every problem.
fn unit_of(
    admin: &Admin,
    pipeline: &str,
    tenant: &serde_json::Value,
    streams: &HashSet<String>,
) -> Result<PipelineConfig, Response> {
    let tenant: TenantConfig = serde_json::from_value(tenant.clone())
        .map_err(|err| Response::error(400, format!("tenant: {err}")))?;
    admin
        .config
        .tenant_unit(pipeline, tenant, streams)
        .map_err(|problems| Response::error(422, problems))
}

/// Every stored tenant but `except`, with the streams they publish to.
struct Others {
    records: Vec<(String, TenantRecord)>,
    streams: HashSet<String>,
}

async fn others(admin: &Admin, except: &str) -> Result<Others, Response> {
    let records: Vec<_> = admin
        .store
        .list()
        .await
        .map_err(|err| Response::error(503, err))?
        .into_iter()
        .filter(|(id, _)| id != except)
        .collect();
    let streams = records
        .iter()
        .filter_map(|(_, r)| {
            r.tenant
                .pointer("/sink/stream")?
                .as_str()
                .map(str::to_string)
        })
        .collect();
    Ok(Others { records, streams })
}

impl Others {
    /// 409 when one of `unit`'s tenant-key values is already another tenant's in the same
    /// pipeline: the shared reader routes each value to one tenant, so a second claim would
    /// hand it another tenant's events.
    fn check_key_values(&self, pipeline: &str, unit: &PipelineConfig) -> Result<(), Response> {
        let Some(scope) = &unit.tenant else {
            return Ok(());
        };
        for (id, record) in self.records.iter().filter(|(_, r)| r.pipeline == pipeline) {
            let theirs: Vec<&str> = match record.tenant.get("key_values").and_then(|v| v.as_array())
            {
                Some(values) if !values.is_empty() => {
                    values.iter().filter_map(|v| v.as_str()).collect()
                }
                _ => record
                    .tenant
                    .get("id")
                    .and_then(|v| v.as_str())
                    .into_iter()
                    .collect(),
            };
            if let Some(taken) = scope
                .key_values
                .iter()
                .find(|v| theirs.contains(&v.as_str()))
            {
                return Err(Response::error(
                    409,
                    format!("key value '{taken}' already belongs to tenant '{id}'; each value routes to one tenant"),
                ));
            }
        }
        Ok(())
    }
}

/// Checks each plugin of `unit` that names a digest: the component exists and passes
/// [`upload::validate`] with the unit's settings.
async fn check_components(admin: &Admin, unit: &PipelineConfig) -> Result<(), Response> {
    for plugin in &unit.plugins {
        let Some(digest) = &plugin.sha256 else {
            continue;
        };
        let path = admin
            .store
            .component_path(digest)
            .await
            .map_err(|err| Response::error(422, format!("plugin '{}': {err}", plugin.name)))?;
        let bytes = std::fs::read(&path).map_err(|err| {
            Response::error(500, format!("cannot read {}: {err}", path.display()))
        })?;
        validated(admin, unit, &plugin.name, bytes).await?;
    }
    Ok(())
}

/// [`upload::validate`] on a blocking thread, under a plugin load permit like every other
/// load (see `Sandbox::loading`); 422 with the reason.
async fn validated(
    admin: &Admin,
    unit: &PipelineConfig,
    name: &str,
    bytes: Vec<u8>,
) -> Result<upload::Accepted, Response> {
    let (unit, name2) = (unit.clone(), name.to_string());
    let scratch = admin.store.cache().to_path_buf();
    admin
        .sandbox
        .loading(move |sandbox| upload::validate(sandbox, &unit, &name2, &bytes, &scratch))
        .await
        .map_err(|err| Response::error(500, format!("the validator failed: {err}")))?
        .map_err(|reason| Response::error(422, format!("plugin '{name}' refused: {reason}")))
}

/// Stores `record` as tenant `id` if it is still at `revision`; 409 if it changed meanwhile.
async fn save(
    admin: &Admin,
    id: &str,
    record: &TenantRecord,
    revision: u64,
) -> Result<(), Response> {
    admin
        .store
        .update(id, record, revision)
        .await
        .map_err(|err| write_refusal(err, id))
}

fn write_refusal(err: WriteError, id: &str) -> Response {
    match err {
        WriteError::Conflict => Response::error(
            409,
            format!("tenant '{id}' was changed by another call meanwhile (or exists already); read it again and retry"),
        ),
        WriteError::Failed(message) => Response::error(503, message),
    }
}

/// What a tenant looks like in answers (never its token's hash).
fn view(id: &str, record: &TenantRecord) -> serde_json::Value {
    let plugins: Vec<_> = record
        .plugins()
        .into_iter()
        .map(|(name, sha256)| json!({ "name": name, "sha256": sha256 }))
        .collect();
    let status = metrics::registry()
        .all()
        .into_iter()
        .find(|s| s.unit_id() == id)
        .map(|s| s.status());
    json!({
        "id": id,
        "pipeline": record.pipeline,
        "suspended": record.suspended,
        "plugins": plugins,
        "tenant": record.tenant,
        "status": status,
    })
}

async fn list(admin: &Admin, caller: &Caller) -> Outcome {
    operator_only(caller, "list tenants")?;
    let all = admin
        .store
        .list()
        .await
        .map_err(|err| Response::error(503, err))?;
    let tenants: Vec<_> = all.iter().map(|(id, r)| view(id, r)).collect();
    Ok(Response::ok(200, json!({ "tenants": tenants })))
}

/// The body of `POST /v1/tenants`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    pipeline: String,
    tenant: serde_json::Value,
    #[serde(default)]
    suspended: bool,
}

fn json_body<T: serde::de::DeserializeOwned>(request: &Request) -> Result<T, Response> {
    serde_json::from_slice(&request.body).map_err(|err| {
        Response::error(
            400,
            format!("the body is not the JSON expected here: {err}"),
        )
    })
}

async fn add(admin: &Admin, request: &Request, caller: &Caller) -> Outcome {
    operator_only(caller, "add tenants")?;
    let body: AddBody = json_body(request)?;
    let tenant_id = body
        .tenant
        .get("id")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let id = format!("{}.{tenant_id}", body.pipeline);
    let others = others(admin, &id).await?;
    let unit = unit_of(admin, &body.pipeline, &body.tenant, &others.streams)?;
    others.check_key_values(&body.pipeline, &unit)?;
    check_components(admin, &unit).await?;
    let token = tokens::issue(&id).map_err(|err| Response::error(500, err))?;
    let record = TenantRecord {
        pipeline: body.pipeline,
        tenant: body.tenant,
        suspended: body.suspended,
        token_sha256: tokens::digest(&token),
    };
    admin
        .store
        .create(&id, &record)
        .await
        .map_err(|err| write_refusal(err, &id))?;
    Ok(Response::ok(
        201,
        json!({ "id": id, "token": token, "note": "keep the token: it is shown only once" }),
    ))
}

async fn show(admin: &Admin, id: &str, caller: &Caller) -> Outcome {
    own_tenant(caller, id)?;
    let (record, _) = record(admin, id).await?;
    Ok(Response::ok(200, view(id, &record)))
}

async fn update(admin: &Admin, id: &str, request: &Request, caller: &Caller) -> Outcome {
    operator_only(caller, "change a tenant's spec")?;
    let (mut record, revision) = record(admin, id).await?;
    let mut tenant: serde_json::Value = json_body(request)?;
    let wanted = format!(
        "{}.{}",
        record.pipeline,
        tenant
            .get("id")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
    );
    if wanted != id {
        return Err(Response::error(400, format!("the spec's id makes '{wanted}', not '{id}'; a tenant cannot be renamed (add a new one)")));
    }
    // Plugins given without a digest keep the one they had.
    let before = record.plugins();
    if let Some(plugins) = tenant.get_mut("plugins").and_then(|p| p.as_array_mut()) {
        for plugin in plugins.iter_mut().filter(|p| p.get("sha256").is_none()) {
            let name = plugin
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or_default();
            if let Some((_, Some(digest))) = before.iter().find(|(n, _)| n == name) {
                plugin["sha256"] = json!(digest);
            }
        }
    }
    let others = others(admin, id).await?;
    let unit = unit_of(admin, &record.pipeline, &tenant, &others.streams)?;
    others.check_key_values(&record.pipeline, &unit)?;
    check_components(admin, &unit).await?;
    let before = record.plugins();
    record.tenant = tenant;
    save(admin, id, &record, revision).await?;
    let now: HashSet<String> = record
        .plugins()
        .into_iter()
        .filter_map(|(_, d)| d)
        .collect();
    let replaced = before.into_iter().filter_map(|(_, d)| d);
    forget_replaced(admin, replaced.filter(|d| !now.contains(d)).collect()).await;
    Ok(Response::ok(200, view(id, &record)))
}

/// Deletes the components a tenant's record stopped naming (a new version pushed, a spec
/// naming others) that no other record names, so the object store holds what is in use
/// rather than every version ever pushed. The call that replaced them has succeeded: a
/// failure here only leaves them stored, and is logged.
async fn forget_replaced(admin: &Admin, replaced: Vec<String>) {
    if let Err(err) = admin.store.delete_unused(replaced, None).await {
        tracing::warn!(error = %err, "admin API: a replaced plugin component stays stored");
    }
}

async fn remove(admin: &Admin, id: &str, request: &Request, caller: &Caller) -> Outcome {
    operator_only(caller, "remove tenants")?;
    let purge = match request.param("purge") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Response::error(
                400,
                format!("purge={other}: give purge=true (delete the tenant's data) or purge=false"),
            ))
        }
    };
    let (mut record, revision) = record(admin, id).await?;
    let mut answer = json!({ "id": id, "removed": true });
    if purge {
        let others = others(admin, id).await?;
        let unit = unit_of(admin, &record.pipeline, &record.tenant, &others.streams)?;
        // Stopped everywhere before its data goes; the record goes last, so a purge that
        // fails half-way can be asked for again.
        if !record.suspended {
            record.suspended = true;
            save(admin, id, &record, revision).await?;
        }
        let components = record
            .plugins()
            .into_iter()
            .filter_map(|(_, d)| d)
            .collect();
        answer["purged"] = purge::tenant(admin, id, &unit, components)
            .await
            .map_err(|err| Response::error(503, err))?;
    }
    admin
        .store
        .delete(id)
        .await
        .map_err(|err| Response::error(503, err))?;
    Ok(Response::ok(200, answer))
}

async fn suspend(admin: &Admin, id: &str, suspended: bool, caller: &Caller) -> Outcome {
    operator_only(caller, "suspend or resume tenants")?;
    let (mut record, revision) = record(admin, id).await?;
    record.suspended = suspended;
    save(admin, id, &record, revision).await?;
    Ok(Response::ok(
        200,
        json!({ "id": id, "suspended": suspended }),
    ))
}

async fn new_token(admin: &Admin, id: &str, caller: &Caller) -> Outcome {
    operator_only(caller, "issue tenant tokens")?;
    let (mut record, revision) = record(admin, id).await?;
    let token = tokens::issue(id).map_err(|err| Response::error(500, err))?;
    record.token_sha256 = tokens::digest(&token);
    save(admin, id, &record, revision).await?;
    Ok(Response::ok(
        200,
        json!({ "id": id, "token": token, "note": "the previous token no longer works" }),
    ))
}

async fn plugins(admin: &Admin, id: &str, caller: &Caller) -> Outcome {
    own_tenant(caller, id)?;
    let (record, _) = record(admin, id).await?;
    let plugins: Vec<_> = record
        .plugins()
        .into_iter()
        .map(|(name, sha256)| json!({ "name": name, "sha256": sha256 }))
        .collect();
    Ok(Response::ok(200, json!({ "id": id, "plugins": plugins })))
}

async fn push(admin: &Admin, id: &str, name: &str, request: &Request, caller: &Caller) -> Outcome {
    own_tenant(caller, id)?;
    let (mut record, revision) = record(admin, id).await?;
    if request.body.is_empty() {
        return Err(Response::error(
            400,
            "send the component (the .wasm file) as the body",
        ));
    }
    let unit = unit_of(admin, &record.pipeline, &record.tenant, &HashSet::new())?;
    let accepted = validated(admin, &unit, name, request.body.clone()).await?;
    let digest = admin
        .store
        .put_component(&request.body)
        .await
        .map_err(|err| Response::error(503, err))?;
    let replaced = record
        .plugins()
        .into_iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, d)| d)
        .filter(|d| *d != digest);
    record.set_plugin(name, &digest);
    save(admin, id, &record, revision).await?;
    // A call replacing the same bytes elsewhere may have found them unused, and deleted
    // them, between the store and the save: they are stored again then (the local copy
    // is fetched again from the store when it is next needed).
    admin
        .store
        .keep_stored(&digest, &request.body)
        .await
        .map_err(|err| Response::error(503, err))?;
    forget_replaced(admin, replaced.into_iter().collect()).await;
    Ok(Response::ok(
        200,
        json!({ "id": id, "plugin": name, "sha256": digest, "world": accepted.world, "imports": accepted.imports, "notes": accepted.notes }),
    ))
}

/// Most dead letters one call returns.
const MAX_DEAD_LETTERS: usize = 1000;
/// Most payload bytes shown per dead letter.
const MAX_SHOWN_PAYLOAD: usize = 64 * 1024;
/// Most bytes of dead letters (as JSON) in one answer; past it the answer ends early and
/// says where to go on (`next_from_seq`). A thousand letters of 64 KiB, escaped, would be
/// hundreds of MiB held per call.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;
/// Dead letters fetched from JetStream at once (each up to the server's `max_payload`).
const FETCH_BATCH: usize = 16;

async fn dead_letters(admin: &Admin, id: &str, request: &Request, caller: &Caller) -> Outcome {
    use futures::StreamExt;
    own_tenant(caller, id)?;
    let (record, _) = record(admin, id).await?;
    let unit = unit_of(admin, &record.pipeline, &record.tenant, &HashSet::new())?;
    let limit = request
        .param("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100usize)
        .clamp(1, MAX_DEAD_LETTERS);
    let from = request
        .param("from_seq")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1u64)
        .max(1);
    let subject = unit.dead_letter_subject();
    let empty = || {
        Ok(Response::ok(
            200,
            json!({ "id": id, "subject": subject, "dead_letters": [] }),
        ))
    };
    let Ok(stream) = admin.js.get_stream(&unit.sink.stream).await else {
        return empty();
    };
    let reader: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: subject.clone(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .map_err(|err| Response::error(503, format!("cannot read dead letters: {err}")))?;
    let pending = reader.cached_info().num_pending as usize;
    let name = reader.cached_info().name.clone();
    let wanted = limit.min(pending);
    let (mut found, mut bytes, mut next_seq) = (Vec::new(), 0, None);
    'fetch: while found.len() < wanted {
        let mut batch = reader
            .fetch()
            .max_messages((wanted - found.len()).min(FETCH_BATCH))
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|err| Response::error(503, format!("cannot read dead letters: {err}")))?;
        let before = found.len();
        while let Some(Ok(message)) = batch.next().await {
            let (letter, seq) = dead_letter(&message);
            bytes += letter.to_string().len();
            found.push(letter);
            next_seq = Some(seq + 1);
            if bytes >= MAX_ANSWER_BYTES {
                break 'fetch;
            }
        }
        if found.len() == before {
            break;
        }
    }
    let _ = stream.delete_consumer(&name).await;
    let mut answer = json!({ "id": id, "subject": subject, "dead_letters": found });
    if found.len() < pending {
        answer["next_from_seq"] = json!(next_seq.unwrap_or(from));
    }
    Ok(Response::ok(200, answer))
}

/// One dead letter: its sequence, subject, headers and payload (as text, cut at 64 KiB).
/// A dead letter as the API shows it, and its stream sequence.
fn dead_letter(message: &async_nats::jetstream::Message) -> (serde_json::Value, u64) {
    let seq = message
        .info()
        .map(|i| i.stream_sequence)
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = message
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |v| (name.to_string(), json!(v.as_str())))
        })
        .collect();
    let shown = &message.payload[..message.payload.len().min(MAX_SHOWN_PAYLOAD)];
    let letter = json!({
        "seq": seq,
        "subject": message.subject.as_str(),
        "headers": headers,
        "payload": String::from_utf8_lossy(shown),
        "payload_bytes": message.payload.len(),
    });
    (letter, seq)
}
