//! The operations endpoint: `/healthz`, `/readyz`, `/metrics`, `/status` and a small status
//! page at `/`.
//!
//! A deliberately small HTTP/1.1 responder (GET and HEAD, one request per connection) rather
//! than a web framework: five read-only pages do not justify the compile time. Nothing it
//! serves contains credentials or connection strings; pipelines are named by their ids only.

use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::Error;
use crate::metrics::{self, State};

/// The `[http]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on, e.g. `127.0.0.1:9464` or `0.0.0.0:9464`.
    pub address: String,
}

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Serves requests until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, nats: async_nats::Client) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::debug!(error = %err, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let nats = nats.clone();
        tokio::spawn(async move {
            if let Err(err) = handle(stream, &nats).await {
                tracing::debug!(error = %err, "HTTP request failed");
            }
        });
    }
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
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
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
        "/" => (200, "text/html; charset=utf-8", page(nats)),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

fn nats_connected(nats: &async_nats::Client) -> bool {
    nats.connection_state() == async_nats::connection::State::Connected
}

/// Why this instance is not ready; empty when it is: NATS connected, every pipeline running
/// (its change stream open) or deliberately on standby, and no running pipeline's position
/// within the oldest tenth of the oplog.
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
        if !matches!(state, State::Running | State::Standby) {
            reasons.push(format!("pipeline {name}: {}", state.name()));
        }
        if state == State::Running && series.near_oplog_edge() {
            reasons.push(format!(
                "pipeline {name}: position within the oldest tenth of the oplog ({} s of {} s left)",
                series.oplog_headroom_seconds().unwrap_or_default(),
                series.oplog_window_seconds().unwrap_or_default()
            ));
        }
    }
    reasons
}

fn status(nats: &async_nats::Client) -> serde_json::Value {
    let ready = not_ready(nats);
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "instance": metrics::registry().instance(),
        "ready": ready.is_empty(),
        "not_ready": ready,
        "nats": { "connected": nats_connected(nats) },
        "pipelines": metrics::registry().all().iter().map(|s| s.status()).collect::<Vec<_>>(),
    })
}

/// The human-readable page: one row per pipeline.
fn page(nats: &async_nats::Client) -> String {
    let html = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let ready = not_ready(nats);
    let mut rows = String::new();
    for series in metrics::registry().all() {
        let c = series.counts();
        let opt = |v: Option<String>| v.unwrap_or_else(|| "–".into());
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            html(&series.unit_id()),
            series.state().name(),
            c.read,
            c.published,
            c.dead_lettered,
            opt(series.lag_seconds().map(|s| format!("{s} s"))),
            opt(series.checkpoint_age_seconds().map(|s| format!("{s:.1} s"))),
            html(&series.status()["plugins"]
                .as_array()
                .map(|p| p.iter().filter_map(|p| p["name"].as_str()).collect::<Vec<_>>().join(" → "))
                .unwrap_or_default()),
        ));
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tidegate</title>\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.3em .8em;text-align:left}}\
         tr:nth-child(even){{background:#f3f3f3}}</style></head><body>\
         <h1>tidegate {version}</h1><p>{instance}NATS: {nats} · {ready}</p>\
         <table><tr><th>pipeline</th><th>state</th><th>read</th><th>published</th>\
         <th>dead-lettered</th><th>lag</th><th>checkpoint age</th><th>plugins</th></tr>\n{rows}</table>\
         <p><a href=\"/status\">/status</a> · <a href=\"/metrics\">/metrics</a> · \
         <a href=\"/readyz\">/readyz</a></p></body></html>\n",
        version = env!("CARGO_PKG_VERSION"),
        instance = metrics::registry()
            .instance()
            .map(|i| format!("instance {} · ", html(&i)))
            .unwrap_or_default(),
        nats = if nats_connected(nats) { "connected" } else { "not connected" },
        ready = if ready.is_empty() {
            "ready".to_string()
        } else {
            html(&format!("not ready: {}", ready.join("; ")))
        },
    )
}
