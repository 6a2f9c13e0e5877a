//! The human-readable page at `/`: one card per unit with the figures of `/status` and two
//! small graphs, self-contained (no scripts, fonts or other requests) so it works behind any
//! proxy and leaks nothing to third parties. Everything is read from the `/status` JSON, so
//! the page can never show a figure `/status` does not.

use crate::ops::metrics;
use crate::ops::telemetry::human_duration;

/// Escapes text for HTML.
fn html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page, from `status` (the `/status` JSON), the not-ready reasons and NATS's state;
/// it refreshes itself every 5 s.
pub(super) fn page(status: &serde_json::Value, ready: &[String], nats_connected: bool) -> String {
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
        nats = if nats_connected {
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
.state.running{background:#1a7f37}.state.retrying,.state.stopped,.state.held{background:#c62828}\
.state.standby,.state.starting{background:#b26a00}\
.error{background:#fdecea;border-left:4px solid #c62828;padding:.4em .7em;margin:.5em 0;\
font-family:monospace;font-size:.9em;white-space:pre-wrap;word-break:break-word}\
dl{display:grid;grid-template-columns:max-content auto max-content auto;gap:.25em 1em;margin:.5em 0}\
dt{color:#666}dd{margin:0;font-variant-numeric:tabular-nums}\
.graphs{display:flex;gap:1.5em;flex-wrap:wrap}figure{margin:0}\
figcaption{font-size:.8em;color:#666}svg{background:#f4f6f8;border:1px solid #e0e0e0}\
.links{margin-top:1.5em;font-size:.9em}";

/// What a card shows where a figure is not known yet.
fn dash() -> String {
    "–".to_string()
}

/// One unit's card, from its `/status` JSON.
fn unit_card(unit: &serde_json::Value) -> String {
    let id = unit_id(&unit["labels"]);
    let state = unit["state"].as_str().unwrap_or_default();
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
        error = last_error(&unit["last_error"]),
        rows = rows(unit),
        events = graph(
            "events read per second",
            "/s",
            &series("events_per_second"),
            step
        ),
        lag = graph("lag", " s", &series("lag_seconds"), step),
    )
}

/// The unit's id from its labels: `<pipeline>` or `<pipeline>.<tenant>`.
fn unit_id(labels: &serde_json::Value) -> String {
    match (labels["pipeline"].as_str(), labels["tenant"].as_str()) {
        (Some(p), Some(t)) => format!("{p}.{t}"),
        (Some(p), None) => p.to_string(),
        _ => String::new(),
    }
}

/// The banner of the unit's most recent error, if it has one.
fn last_error(error: &serde_json::Value) -> String {
    match error.as_object() {
        Some(e) => format!(
            "<div class=\"error\">last error, {} ago: <span data-field=\"last_error\">{}</span></div>",
            human_duration(e["age_seconds"].as_f64().unwrap_or_default() as i64),
            html(e["message"].as_str().unwrap_or_default())
        ),
        None => String::new(),
    }
}

/// The card's figures as `<dt>`/`<dd>` pairs, each `<dd>` named by `data-field` for the
/// page test and for scrapers of the page.
fn rows(unit: &serde_json::Value) -> String {
    let number = |v: &serde_json::Value| v.as_f64();
    let counts = &unit["counts"];
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
        ("snapshot", "snapshot", snapshot(&unit["snapshot"])),
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
        "<dt>oplog headroom</dt><dd data-field=\"oplog_headroom\">{}</dd>\
         <dt>plugins</dt><dd data-field=\"plugins\">{}</dd>",
        headroom(&unit["oplog"]),
        html(&plugin_chain(&unit["plugins"]))
    ));
    rows
}

/// The oplog headroom as markup (already escaped: only numbers and fixed words), coloured by
/// its level.
fn headroom(oplog: &serde_json::Value) -> String {
    match (oplog["level"].as_str(), oplog["headroom_seconds"].as_f64()) {
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
    }
}

/// The snapshot's progress in words.
fn snapshot(snapshot: &serde_json::Value) -> String {
    let documents = snapshot["documents"].as_u64().unwrap_or_default();
    match (
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
    }
}

/// The chain's plugin names, in call order.
fn plugin_chain(plugins: &serde_json::Value) -> String {
    plugins
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(|p| p["name"].as_str())
                .collect::<Vec<_>>()
                .join(" → ")
        })
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "none".to_string())
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
