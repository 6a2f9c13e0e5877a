//! The operations endpoint: `/healthz`, `/readyz`, `/metrics`, `/status` and a small status
//! page at `/`.
//!
//! A deliberately small HTTP/1.1 responder (GET and HEAD, one request per connection) rather
//! than a web framework: five read-only pages do not justify the compile time. Nothing it
//! serves contains credentials or connection strings; pipelines are named by their ids only.

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
            let nats = nats.clone();
            tokio::spawn(async move {
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
/// (its change stream open) or deliberately on standby, and no running pipeline's checkpoint
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
        if !matches!(state, State::Running | State::Standby) {
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

/// Escapes text for HTML.
fn html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The human-readable page: one card per unit with the figures of `/status` and two small
/// graphs, self-contained (no scripts, fonts or other requests), refreshing every 5 s.
fn page(nats: &async_nats::Client) -> String {
    let status = status(nats);
    let ready = not_ready(nats);
    let mut units = String::new();
    for unit in status["pipelines"].as_array().into_iter().flatten() {
        units.push_str(&unit_card(unit));
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tidegate</title>\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <meta name=\"viewport\" content=\"width=device-width\"><style>{STYLE}</style></head><body>\
         <h1>tidegate {version}</h1>\
         <p class=\"summary\">{instance}NATS: <span data-field=\"nats\">{nats}</span> · \
         <span data-field=\"ready\" class=\"{ready_class}\">{ready}</span> · up \
         <span data-field=\"uptime\">{uptime}</span></p>{reasons}\n{units}\
         <p class=\"links\"><a href=\"/status\">/status</a> · <a href=\"/metrics\">/metrics</a> · \
         <a href=\"/readyz\">/readyz</a></p></body></html>\n",
        version = env!("CARGO_PKG_VERSION"),
        instance = metrics::registry()
            .instance()
            .map(|i| format!("instance {} · ", html(&i)))
            .unwrap_or_default(),
        nats = if nats_connected(nats) {
            "connected"
        } else {
            "not connected"
        },
        ready_class = if ready.is_empty() { "good" } else { "bad" },
        ready = if ready.is_empty() {
            "ready"
        } else {
            "not ready"
        },
        uptime = human_duration(metrics::registry().uptime_seconds() as i64),
        reasons = match ready.is_empty() {
            true => String::new(),
            false => format!(
                "<ul class=\"reasons\">{}</ul>",
                ready
                    .iter()
                    .map(|r| format!("<li>{}</li>", html(r)))
                    .collect::<String>()
            ),
        },
    )
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222;background:#fafafa}\
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.15em;margin:0 0 .5em}\
.good{color:#1a7f37}.bad{color:#c62828}.warn{color:#b26a00}\
.unit{background:#fff;border:1px solid #ddd;border-radius:6px;padding:1em;margin:1em 0;max-width:60em}\
.state{font-size:.8em;padding:.15em .5em;border-radius:3px;color:#fff;background:#777;margin-left:.5em}\
.state.running{background:#1a7f37}.state.retrying,.state.stopped{background:#c62828}\
.state.standby,.state.starting{background:#b26a00}\
.error{background:#fdecea;border-left:4px solid #c62828;padding:.4em .7em;margin:.5em 0;\
font-family:monospace;font-size:.9em;white-space:pre-wrap;word-break:break-word}\
dl{display:grid;grid-template-columns:max-content auto max-content auto;gap:.25em 1em;margin:.5em 0}\
dt{color:#666}dd{margin:0;font-variant-numeric:tabular-nums}\
.graphs{display:flex;gap:1.5em;flex-wrap:wrap}figure{margin:0}\
figcaption{font-size:.8em;color:#666}svg{background:#f4f6f8;border:1px solid #e0e0e0}\
.links{margin-top:1.5em;font-size:.9em}";

/// One unit's card, from its `/status` JSON.
fn unit_card(unit: &serde_json::Value) -> String {
    let number = |v: &serde_json::Value| v.as_f64();
    let id = match (
        unit["labels"]["pipeline"].as_str(),
        unit["labels"]["tenant"].as_str(),
    ) {
        (Some(p), Some(t)) => format!("{p}.{t}"),
        (Some(p), None) => p.to_string(),
        _ => String::new(),
    };
    let state = unit["state"].as_str().unwrap_or_default();
    let error = match unit["last_error"].as_object() {
        Some(e) => format!(
            "<div class=\"error\">last error, {} ago: <span data-field=\"last_error\">{}</span></div>",
            human_duration(e["age_seconds"].as_f64().unwrap_or_default() as i64),
            html(e["message"].as_str().unwrap_or_default())
        ),
        None => String::new(),
    };
    let dash = || "–".to_string();
    let counts = &unit["counts"];
    let oplog = &unit["oplog"];
    let headroom = match (oplog["level"].as_str(), number(&oplog["headroom_seconds"])) {
        (Some(level), Some(h)) => {
            let class = match level {
                "ok" => "good",
                "warn" => "warn",
                _ => "bad",
            };
            // A reading older than two default check intervals is marked as such (e.g.
            // while MongoDB is unreachable).
            let checked = oplog["checked_at_unix_ms"].as_i64().unwrap_or_default();
            let age = (metrics::unix_now_ms() - checked) / 1000;
            let stale = match age > 20 {
                true => format!(", read {} ago", human_duration(age)),
                false => String::new(),
            };
            format!(
                "<span class=\"{class}\">about {} ({level}{stale})</span>",
                human_duration(h as i64)
            )
        }
        (Some(_), None) => "no writes measured yet".to_string(),
        _ => dash(),
    };
    let snapshot = &unit["snapshot"];
    let documents = snapshot["documents"].as_u64().unwrap_or_default();
    let snapshot = match (
        snapshot["active"].as_bool(),
        snapshot["estimated_total"].as_u64(),
    ) {
        (Some(true), Some(total)) => format!(
            "running: {documents} of about {total} documents ({} %)",
            documents * 100 / total.max(1)
        ),
        (Some(true), None) => format!("running: {documents} documents"),
        _ if documents > 0 => format!("done: {documents} documents"),
        _ => "none".to_string(),
    };
    let plugins = unit["plugins"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(|p| p["name"].as_str())
                .collect::<Vec<_>>()
                .join(" → ")
        })
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "none".to_string());
    let fields = [
        (
            "events/s (last minute)",
            "events_per_second",
            number(&unit["events_per_second"]).map_or_else(dash, |r| format!("{r:.1}")),
        ),
        (
            "messages/s (last minute)",
            "messages_per_second",
            number(&unit["messages_per_second"]).map_or_else(dash, |r| format!("{r:.1}")),
        ),
        (
            "lag",
            "lag",
            unit["lag_seconds"]
                .as_i64()
                .map_or_else(dash, |s| format!("{s} s")),
        ),
        (
            "checkpoint age",
            "checkpoint_age",
            number(&unit["checkpoint_age_seconds"]).map_or_else(dash, |s| format!("{s:.1} s")),
        ),
        ("events read", "read", counts["read"].to_string()),
        ("published", "published", counts["published"].to_string()),
        ("filtered", "filtered", counts["filtered"].to_string()),
        (
            "dead-lettered",
            "dead_lettered",
            counts["dead_lettered"].to_string(),
        ),
        ("publish retries", "retries", counts["retries"].to_string()),
        ("snapshot", "snapshot", snapshot),
    ];
    let mut rows: String = fields
        .iter()
        .map(|(label, field, value)| {
            format!(
                "<dt>{label}</dt><dd data-field=\"{field}\">{}</dd>",
                html(value)
            )
        })
        .collect();
    rows.push_str(&format!(
        "<dt>oplog headroom</dt><dd data-field=\"oplog_headroom\">{headroom}</dd>\
         <dt>plugins</dt><dd data-field=\"plugins\">{}</dd>",
        html(&plugins)
    ));
    let history = &unit["history"];
    let step = history["step_seconds"].as_u64().unwrap_or(5);
    let series = |name: &str| -> Vec<Option<f64>> {
        history[name]
            .as_array()
            .map(|v| v.iter().map(|x| x.as_f64()).collect())
            .unwrap_or_default()
    };
    format!(
        "<section class=\"unit\" id=\"unit-{id}\"><h2>{name}<span class=\"state {state}\" \
         data-field=\"state\">{state}</span></h2>{error}<dl>{rows}</dl><div class=\"graphs\">\
         {events}{lag}</div></section>\n",
        id = html(&id),
        name = html(&id),
        events = graph(
            "events read per second",
            "/s",
            &series("events_per_second"),
            step
        ),
        lag = graph("lag", " s", &series("lag_seconds"), step),
    )
}

/// A small line graph (inline SVG) of `points` taken every `step` seconds, newest on the
/// right, scaled to its largest value; gaps where a value is unknown.
fn graph(title: &str, unit: &str, points: &[Option<f64>], step: u64) -> String {
    const WIDTH: f64 = 300.0;
    const HEIGHT: f64 = 60.0;
    let most = points
        .iter()
        .flatten()
        .fold(0.0_f64, |a, b| a.max(*b))
        .max(1.0);
    let slots = points.len().max(2) - 1;
    let x = |i: usize| WIDTH * i as f64 / slots as f64;
    let y = |v: f64| HEIGHT - 2.0 - (HEIGHT - 4.0) * v / most;
    // One polyline per run of known values.
    let mut runs: Vec<Vec<String>> = vec![Vec::new()];
    for (i, point) in points.iter().enumerate() {
        match (point, runs.last_mut()) {
            (Some(v), Some(run)) => run.push(format!("{:.1},{:.1}", x(i), y(*v))),
            (None, Some(run)) if !run.is_empty() => runs.push(Vec::new()),
            _ => {}
        }
    }
    let lines: String = runs
        .iter()
        .filter(|run| !run.is_empty())
        .map(|run| {
            format!(
                "<polyline fill=\"none\" stroke=\"#1565c0\" stroke-width=\"1.5\" points=\"{}\"/>",
                run.join(" ")
            )
        })
        .collect();
    let minutes = (points.len() as u64 * step).div_ceil(60);
    format!(
        "<figure><svg width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         role=\"img\" aria-label=\"{title}\">{lines}</svg><figcaption>{title}, last {minutes} min \
         (top: {most:.1}{unit})</figcaption></figure>"
    )
}
