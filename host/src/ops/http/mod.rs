//! The operations endpoint: `/healthz`, `/readyz`, `/metrics`, `/status` and a small status
//! page at `/`.
//!
//! The page itself is rendered in `page`; this module is the server: routing, request
//! limits and the readiness rules.
//!
//! A deliberately small HTTP/1.1 responder (GET and HEAD, one request per connection) rather
//! than a web framework: five read-only pages do not justify the compile time. Nothing it
//! serves contains credentials or connection strings; pipelines are named by their ids only.

mod page;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::HttpConfig;
use crate::error::Error;
use crate::ops::metrics::{self, State};
use crate::ops::oplog::Level;
use crate::ops::telemetry::human_duration;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once: each is a task and a socket, and the endpoint answers
/// anyone who can reach it; past it a connection is answered `503` at once and closed, so a
/// flood of connections costs tidegate neither its sockets nor its memory.
const MAX_CONNECTIONS: usize = 64;

/// Binds the configured address (a failure is a start-up error).
pub async fn bind(config: &HttpConfig) -> Result<TcpListener, Error> {
    let listener = TcpListener::bind(&config.address)
        .await
        .map_err(|err| Error::Startup {
            message: format!("http.address = '{}': cannot listen: {err}", config.address),
        })?;
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "HTTP endpoint listening");
    }
    Ok(listener)
}

/// Serves requests until the task is dropped or aborted, and takes the metrics' history
/// samples (the page's graphs, `/status`'s rates) meanwhile.
pub async fn serve(listener: TcpListener, nats: async_nats::Client) {
    let history = async {
        let step = metrics::HISTORY_STEP;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + step, step);
        loop {
            tick.tick().await;
            metrics::registry().sample_history();
        }
    };
    let places = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let requests = async {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::debug!(error = %err, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(place) = places.clone().try_acquire_owned() else {
                let busy = format!("{MAX_CONNECTIONS} connections are served at once; retry\n");
                refuse_at_once(&stream, &encode(503, "text/plain", &busy, true));
                tracing::debug!("HTTP connection refused: too many at once");
                continue;
            };
            let nats = nats.clone();
            tokio::spawn(async move {
                let _place = place;
                if let Err(err) = handle(stream, &nats).await {
                    tracing::debug!(error = %err, "HTTP request failed");
                }
            });
        }
    };
    tokio::join!(history, requests);
}

async fn handle(mut stream: TcpStream, nats: &async_nats::Client) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    })
    .await;
    if !matches!(complete, Ok(Ok(()))) {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match method {
        "GET" | "HEAD" => route(path, nats),
        _ => (405, "text/plain", "only GET and HEAD\n".to_string()),
    };
    // Error texts shown here come from client libraries too: no secret may pass.
    let body = crate::security::scrub(&body);
    let response = encode(status, content_type, &body, method != "HEAD");
    stream.write_all(&response).await?;
    stream.shutdown().await
}

/// Writes `answer` to a connection refused on arrival and drops what the client has sent
/// so far, without waiting on it (an accept loop must not): a socket closed with unread
/// data is reset, and the client would lose the answer with it. A request still on its way
/// may yet be reset.
pub fn refuse_at_once(stream: &TcpStream, answer: &[u8]) {
    let _ = stream.try_write(answer);
    let mut scratch = [0u8; 4096];
    while matches!(stream.try_read(&mut scratch), Ok(n) if n > 0) {}
}

/// A response as it goes on the wire (`with_body` false: a `HEAD`'s, its length announced).
fn encode(status: u16, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

fn route(path: &str, nats: &async_nats::Client) -> (u16, &'static str, String) {
    match path {
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/readyz" => match not_ready(nats) {
            reasons if reasons.is_empty() => (200, "text/plain", "ready\n".into()),
            reasons => (
                503,
                "text/plain",
                format!("not ready:\n{}\n", reasons.join("\n")),
            ),
        },
        "/metrics" => {
            let mut body = metrics::registry().render();
            body.push_str(&format!(
                "# HELP tidegate_nats_connected 1 while connected to NATS.\n# TYPE tidegate_nats_connected gauge\ntidegate_nats_connected {}\n",
                u8::from(nats_connected(nats))
            ));
            (200, "text/plain; version=0.0.4; charset=utf-8", body)
        }
        "/status" => (200, "application/json", status(nats).to_string()),
        "/" => {
            let page = page::page(&status(nats), &not_ready(nats), nats_connected(nats));
            (200, "text/html; charset=utf-8", page)
        }
        _ => (404, "text/plain", "not found\n".into()),
    }
}

fn nats_connected(nats: &async_nats::Client) -> bool {
    nats.connection_state() == async_nats::connection::State::Connected
}

/// Why this instance is not ready; empty when it is: NATS connected, every pipeline running
/// (its change stream open), deliberately on standby or a tenant held for plugins that do not
/// load (the tenant's own problem, on `/status` and `tidegate_pipeline_held`; counting it
/// would let one tenant's bad upload take the instance out of service for every other
/// tenant), and no running pipeline's checkpoint
/// projected to be overwritten by the oplog within `oplog_error_headroom_secs` (see
/// [`oplog`](crate::ops::oplog)).
fn not_ready(nats: &async_nats::Client) -> Vec<String> {
    let mut reasons = Vec::new();
    if !nats_connected(nats) {
        reasons.push("NATS: not connected".to_string());
    }
    let all = metrics::registry().all();
    if all.is_empty() {
        reasons.push("no pipeline started yet".to_string());
    }
    for series in all {
        let state = series.state();
        let name = series.unit_id();
        if !matches!(state, State::Running | State::Standby | State::Held) {
            reasons.push(format!("pipeline {name}: {}", state.name()));
        }
        let Some(oplog) = series.oplog().filter(|_| state == State::Running) else {
            continue;
        };
        match oplog.level {
            Level::Error => reasons.push(format!(
                "pipeline {name}: at the current write rate the oplog overwrites its checkpointed \
                 position in about {}",
                human_duration(oplog.headroom_seconds.unwrap_or_default() as i64)
            )),
            Level::Lost => reasons.push(format!(
                "pipeline {name}: its checkpointed position is no longer in the oplog"
            )),
            Level::Ok | Level::Warn => {}
        }
    }
    reasons
}

fn status(nats: &async_nats::Client) -> serde_json::Value {
    let ready = not_ready(nats);
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "instance": metrics::registry().instance(),
        "uptime_seconds": metrics::registry().uptime_seconds(),
        "ready": ready.is_empty(),
        "not_ready": ready,
        "nats": { "connected": nats_connected(nats) },
        "pipelines": metrics::registry().all().iter().map(|s| s.status()).collect::<Vec<_>>(),
    })
}
