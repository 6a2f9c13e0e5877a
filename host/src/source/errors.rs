//! Which server errors end a pipeline and which are waited out, and how a driver error is
//! worded for the operator: the driver's own text is a dump of its topology, so first contact
//! (a wrong host, a refused connection, TLS, a replica set name) is told as one line naming
//! the server, the likely cause and what to do.

use std::time::Duration;

use mongodb::error::ErrorKind;
use tokio::sync::watch;

use crate::config::PipelineConfig;
use crate::error::Error;

/// MongoDB's ChangeStreamHistoryLost.
pub(crate) const HISTORY_LOST: i32 = 286;

/// Server error codes after which resuming cannot succeed.
pub(crate) const FATAL_CODES: &[(i32, &str)] = &[
    (
        HISTORY_LOST,
        "the checkpointed position is no longer in the oplog (ChangeStreamHistoryLost); \
         events were lost while tidegate was behind. Set `on_history_lost = \"latest\"` or \
         delete the pipeline's checkpoint to start from now, and enlarge the oplog",
    ),
    (
        260,
        "the checkpointed resume token is invalid for this stream (InvalidResumeToken)",
    ),
    (
        280,
        "the change stream failed fatally (ChangeStreamFatalError)",
    ),
    (
        40573,
        "change streams need a replica set or sharded cluster, and this server is standalone; \
         make it a one-member replica set (restart mongod with --replSet rs0, run \
         rs.initiate() once) and add replicaSet=rs0 to mongodb_uri",
    ),
    (
        13,
        "not authorized to watch this namespace; grant the user the changeStream and find \
         actions on it (the read role has both)",
    ),
    (
        18,
        "authentication failed; check the user, password and authSource in mongodb_uri",
    ),
    (
        40324,
        "the server does not know a stage of the change stream (Unrecognized pipeline stage \
         name); `oversize = \"split\"` needs MongoDB 6.0.9+ or 7.0+",
    ),
];

pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(200);

const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub(crate) fn error_code(err: &mongodb::error::Error) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Command(command) => Some(command.code),
        // A failed handshake (e.g. a wrong SCRAM password) carries the server's refusal as
        // its source.
        ErrorKind::Authentication { .. } => {
            let source = std::error::Error::source(err)?;
            let source = source
                .downcast_ref::<Box<mongodb::error::Error>>()
                .map(|boxed| &**boxed)
                .or_else(|| source.downcast_ref::<mongodb::error::Error>())?;
            error_code(source)
        }
        _ => None,
    }
}

fn fatal_reason(err: &mongodb::error::Error) -> Option<&'static str> {
    let code = error_code(err)?;
    FATAL_CODES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, reason)| *reason)
}

/// Handles a failed open or read: a fatal error is returned; anything else is logged (one
/// readable line, see [`describe`]) and waited out with exponential backoff. `Ok(true)`
/// means shutdown was requested meanwhile.
pub(crate) async fn retry_later(
    pipeline: &PipelineConfig,
    what: &str,
    err: mongodb::error::Error,
    backoff: &mut Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, Error> {
    retry_quietly(pipeline, what, err, backoff, shutdown, false).await
}

/// [`retry_later`], logging the failure only at debug level when `quiet` (a retry within an
/// outage already reported).
pub(crate) async fn retry_quietly(
    pipeline: &PipelineConfig,
    what: &str,
    err: mongodb::error::Error,
    backoff: &mut Duration,
    shutdown: &mut watch::Receiver<bool>,
    quiet: bool,
) -> Result<bool, Error> {
    let id = pipeline.id.as_str();
    if let Some(reason) = fatal_reason(&err) {
        return Err(Error::Source {
            pipeline: id.to_string(),
            message: format!(
                "{reason} (the server at {} said: {})",
                uri_hosts(&pipeline.mongodb_uri),
                server_words(&err)
            ),
        });
    }
    let described = describe(pipeline, &err);
    let retry_in_ms = backoff.as_millis() as u64;
    match quiet {
        true => tracing::debug!(pipeline = id, retry_in_ms, "{what}: {described}"),
        false => tracing::warn!(pipeline = id, retry_in_ms, "{what}: {described}"),
    }
    crate::ops::metrics::pipeline(id).retrying(&format!("{what}: {described}"));
    let delay = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    Ok(tokio::select! {
        _ = tokio::time::sleep(delay) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    })
}

/// The `host:port` list of a MongoDB URI, without credentials or options.
pub fn uri_hosts(uri: &str) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let hosts = rest.split(['/', '?']).next().unwrap_or(rest);
    hosts
        .rsplit_once('@')
        .map_or(hosts, |(_, hosts)| hosts)
        .to_string()
}

/// The server's own message in a command error (or the error's text otherwise).
fn server_words(err: &mongodb::error::Error) -> String {
    match err.kind.as_ref() {
        ErrorKind::Command(command) => command.message.clone(),
        _ => err.to_string(),
    }
}

/// A driver error as one line: what failed at which server, the likely cause, what to do.
pub fn describe(pipeline: &PipelineConfig, err: &mongodb::error::Error) -> String {
    let hosts = uri_hosts(&pipeline.mongodb_uri);
    match err.kind.as_ref() {
        ErrorKind::ServerSelection { message, .. } => format!(
            "no usable MongoDB server at {hosts}: {}",
            selection_cause(message, &pipeline.mongodb_uri)
        ),
        ErrorKind::Command(command) => format!(
            "the server at {hosts} refused: {} ({} {})",
            command.message, command.code, command.code_name
        ),
        ErrorKind::Authentication { message, .. } => format!(
            "authentication at {hosts} failed: {message}; check the user, password and \
             authSource in mongodb_uri"
        ),
        ErrorKind::Io(io) => format!("network error talking to {hosts}: {io}"),
        _ => err.to_string(),
    }
}

/// The likely cause of a server-selection timeout, from the driver's topology text.
fn selection_cause(message: &str, uri: &str) -> String {
    let has = |needle: &str| message.to_ascii_lowercase().contains(needle);
    let replica_set = uri
        .split(['?', '&'])
        .find_map(|option| option.strip_prefix("replicaSet="));
    if has("failed to lookup address") || has("name or service not known") || has("dns") {
        return "the host name does not resolve; check the host in mongodb_uri".into();
    }
    if has("connection refused") {
        return "connection refused: nothing listens at that host and port; check mongodb_uri \
                and that mongod is running there"
            .into();
    }
    if has("certificate") || has("tls") || has("ssl") || has("handshake") {
        return "the TLS handshake failed: the server wants TLS (add tls=true to mongodb_uri) \
                or its certificate is not trusted (tlsCAFile=…)"
            .into();
    }
    if let (Some(name), true) = (replica_set, has("replicasetnoprimary")) {
        return format!(
            "mongodb_uri sets replicaSet={name}, but no server there is a primary of a replica \
             set with that name: a standalone server, a set named differently, or a set with no \
             primary (check rs.status() on the server; fix or remove replicaSet= — change \
             streams need a replica set)"
        );
    }
    if has("timed out") || has("timeout") {
        return "the connection attempt timed out: a wrong host, or a firewall in between".into();
    }
    "no server answered in time".into()
}
