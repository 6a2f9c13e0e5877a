//! Scenarios 3 and 4 (tidegate end to end: backlog drains, latency at a steady rate) and the
//! per-event goals of issue 16 measured from them, as ratios against the raw clients of
//! scenarios 1–2 in the same run:
//!
//! - no plugins: ≥ 0.8 × min(raw read, raw publish), and tidegate's own CPU per event
//!   ≤ 1.3 × the raw clients' (the driver reading plus the async publish, each measured alone);
//! - op-filter + match + redact (the issue's chain): ≥ 0.65 × min(raw read, raw publish);
//! - p99 insert → stored ≤ 10 ms at half of the three-plugin peak, with those three plugins.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::{e2e_backlog, e2e_latency, fmt_rate, fmt_secs, Args, Env, Latency, Table};

/// `TIDEGATE_BENCH_PERF=DIR`: each backlog drain of scenario 3 (and each row of scenario 8) is
/// recorded by `perf record -F 999 --call-graph dwarf` on this process into
/// `DIR/drain-<plugins>.data` (`DIR/tenants-<layout>-<routing>-<K>x<plugins>.data`)
/// (the release profile has no frame pointers, so call graphs unwind with DWARF), or with
/// `TIDEGATE_BENCH_PERF_FLAT` set by `perf record -F 1999` without call graphs.
pub(crate) struct Profiler {
    child: Option<Child>,
}

impl Profiler {
    /// Starts recording, when asked for; a missing `perf` only says so.
    pub(crate) fn start(name: &str) -> Profiler {
        let Some(dir) = std::env::var_os("TIDEGATE_BENCH_PERF").map(PathBuf::from) else {
            return Profiler { child: None };
        };
        let out = dir.join(format!("{name}.data"));
        // Flat (`TIDEGATE_BENCH_PERF_FLAT`): where the samples land, without call graphs, at a
        // higher rate; quick to record and to report.
        let args: &[&str] = match std::env::var_os("TIDEGATE_BENCH_PERF_FLAT") {
            Some(_) => &["record", "-F", "1999", "-p"],
            None => &["record", "-F", "999", "--call-graph", "dwarf,16384", "-p"],
        };
        let child = Command::new("perf")
            .args(args)
            .arg(std::process::id().to_string())
            .arg("-o")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => {
                // perf needs a moment to attach to every thread.
                std::thread::sleep(std::time::Duration::from_millis(500));
                Profiler { child: Some(child) }
            }
            Err(err) => {
                eprintln!("perf record not started ({err}); profiling nothing");
                Profiler { child: None }
            }
        }
    }

    /// Stops recording (SIGINT, as perf expects) and waits for the file to be written.
    pub(crate) fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

/// The issue's three-plugin chain, as scenario 3 and 4 label it.
const CHAIN3: &str = "3 (op-filter, match, redact)";

/// The chains scenario 3 drains a backlog with: plugin count and label.
const CHAINS: [(usize, &str); 3] = [(0, "0"), (1, "1 (op-filter)"), (3, CHAIN3)];

/// The `[[pipeline.plugins]]` tables of a chain of `count` plugins: none, op-filter, or
/// op-filter + match (a `where` query every insert passes) + redact. Every event is published.
pub(crate) fn chain_toml(count: usize) -> String {
    let filter = r#"
[[pipeline.plugins]]
name = "op-filter"
config = { operations = "insert,update,replace,delete" }
"#;
    let rest = r#"
[[pipeline.plugins]]
name = "match"
config = { where = '{"fullDocument.qty": {"$gte": 0}}' }

[[pipeline.plugins]]
name = "redact"
config = { fields = "email" }
"#;
    match count {
        0 => String::new(),
        1 => filter.to_string(),
        _ => format!("{filter}{rest}"),
    }
}

/// CPU per event of one measurement, in µs: the bench process (the client alone in
/// scenarios 1–2, tidegate in 3) and the two servers together.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CpuPerEvent {
    pub(crate) process_us: f64,
    pub(crate) servers_us: f64,
}

impl CpuPerEvent {
    /// From the CPU seconds of bench, mongod and nats-server over `events` events.
    pub(crate) fn of(seconds: [f64; 3], events: usize) -> CpuPerEvent {
        let per = |s: f64| s * 1e6 / events.max(1) as f64;
        CpuPerEvent {
            process_us: per(seconds[0]),
            servers_us: per(seconds[1] + seconds[2]),
        }
    }
}

/// The raw baselines of scenarios 1–2 in this run.
pub(crate) struct Raw {
    pub(crate) read_rate: f64,
    pub(crate) publish_rate: f64,
    pub(crate) read_cpu: CpuPerEvent,
    pub(crate) publish_cpu: CpuPerEvent,
}

impl Raw {
    fn lower(&self) -> f64 {
        self.read_rate.min(self.publish_rate)
    }

    /// The raw clients' own CPU per event: reading one event plus publishing one.
    fn clients_us(&self) -> f64 {
        self.read_cpu.process_us + self.publish_cpu.process_us
    }
}

const CPU_HEADER: &str = "CPU cores: bench / mongod / nats = total";

/// Runs scenarios 3 and 4 and returns their tables and the goals table.
pub(crate) async fn end_to_end(env: &Env, args: &Args, raw: &Raw) -> anyhow::Result<Vec<Table>> {
    let n = args.events;
    let lower = raw.lower();
    let mut backlog = Table::new(
        &format!("3. tidegate end to end, backlog of N = {n} events (max_in_flight 256)"),
        &[
            "plugins",
            "total s",
            "startup s",
            "events/s (after first msg)",
            "events/s (incl. startup)",
            "vs. min(raw read, raw publish)",
            "longest stall ms",
            CPU_HEADER,
            "CPU µs/event: tidegate / servers",
        ],
    );
    let mut thread_notes = Vec::new();
    let mut drains = Vec::new();
    for (plugins, label) in CHAINS {
        eprintln!("3. end to end backlog, {plugins} plugin(s)…");
        let b = e2e_backlog(env, n, plugins).await?;
        thread_notes.push(format!("{label}: {}", b.threads));
        backlog.row(vec![
            label.into(),
            fmt_secs(b.total),
            fmt_secs(b.startup),
            fmt_rate(b.steady_rate),
            fmt_rate(b.total_rate),
            format!("{:.0}%", 100.0 * b.steady_rate / lower),
            format!("{:.0}", b.longest_stall.as_secs_f64() * 1e3),
            b.cpu.clone(),
            format!(
                "{:.1} / {:.1}",
                b.per_event.process_us, b.per_event.servers_us
            ),
        ]);
        drains.push((b.steady_rate, b.per_event));
    }
    backlog.note(format!(
        "min(raw read, raw async publish) = {} events/s. \"startup\" is from tidegate::run until the \
         first message is seen in the stream (connect, compile plugins, open the change stream); \
         the rate and the CPU figures after the first message exclude it. \"longest stall\" is the \
         longest interval (10 ms polling) in which the stream did not grow after publishing began. \
         \"bench\" is the process tidegate runs in (plus the bench's 10 ms stream-length polling). \
         The match plugin's query is `{{\"fullDocument.qty\": {{\"$gte\": 0}}}}` (every insert passes).",
        fmt_rate(lower)
    ));
    backlog.note(format!(
        "Cores used per thread of the bench process over the same interval (thread names cut to \
         15 characters by Linux): {}.",
        thread_notes.join("; ")
    ));

    let (none, chain3) = (drains[0], drains[2]);
    let half_peak = ((chain3.0 / 2.0) as u64).max(10);
    let mut latency = Table::new(
        &format!(
            "4. Latency insert → JetStream store, {} s per row",
            args.latency_secs
        ),
        &[
            "plugins",
            "target/s",
            "batch",
            "events",
            "achieved/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "mean ms",
        ],
    );
    let runs = [
        (0, "0", args.rate, "fixed0"),
        (3, CHAIN3, args.rate, "fixed3"),
        (3, CHAIN3, half_peak, "half3"),
    ];
    let mut half = None;
    for (plugins, label, per_sec, tag) in runs {
        // Ten documents per insert_many at the fixed rate; at higher rates one insert every
        // 5 ms (the timer's resolution is 1 ms), so the writer itself keeps up.
        let batch = ((per_sec / 200) as usize).max(10);
        eprintln!("4. latency, {plugins} plugin(s), {per_sec}/s in batches of {batch}…");
        let l = e2e_latency(env, plugins, (per_sec, args.latency_secs, batch), tag).await?;
        latency.row(vec![
            label.into(),
            fmt_rate(per_sec as f64),
            batch.to_string(),
            l.sent.to_string(),
            fmt_rate(l.achieved_rate),
            format!("{:.1}", l.p50_ms),
            format!("{:.1}", l.p99_ms),
            format!("{:.1}", l.max_ms),
            format!("{:.1}", l.mean_ms),
        ]);
        if tag == "half3" {
            half = Some(l);
        }
    }
    latency.note(format!(
        "latency = the message's JetStream store time (server clock) − `ts_ns` stamped just before \
         insert_many (same machine, same clock). The last row runs at half of the three-plugin \
         drain rate of table 3 ({} events/s).",
        fmt_rate(chain3.0)
    ));

    let goals = goals_table(raw, none, chain3, half.as_ref(), half_peak);
    Ok(vec![backlog, latency, goals])
}

/// Issue 16's goals beside what this run measured.
fn goals_table(
    raw: &Raw,
    (none_rate, none_cpu): (f64, CpuPerEvent),
    (chain3_rate, _): (f64, CpuPerEvent),
    half: Option<&Latency>,
    half_peak: u64,
) -> Table {
    let mut table = Table::new(
        "Goals of issue 16 (ratios within this run)",
        &["goal", "target", "measured", "met"],
    );
    let met = |ok: bool| if ok { "yes" } else { "no" }.to_string();
    let lower = raw.lower();
    let ratio0 = none_rate / lower;
    table.row(vec![
        "no plugins ÷ min(raw read, raw publish)".into(),
        "≥ 0.80".into(),
        format!("{ratio0:.2}"),
        met(ratio0 >= 0.8),
    ]);
    let cpu_ratio = none_cpu.process_us / raw.clients_us().max(1e-9);
    table.row(vec![
        "tidegate CPU per event (no plugins) ÷ raw clients' (read + async publish)".into(),
        "≤ 1.3".into(),
        format!(
            "{cpu_ratio:.2} ({:.1} µs ÷ ({:.1} + {:.1}) µs)",
            none_cpu.process_us, raw.read_cpu.process_us, raw.publish_cpu.process_us
        ),
        met(cpu_ratio <= 1.3),
    ]);
    let ratio3 = chain3_rate / lower;
    table.row(vec![
        "op-filter + match + redact ÷ min(raw read, raw publish)".into(),
        "≥ 0.65".into(),
        format!("{ratio3:.2}"),
        met(ratio3 >= 0.65),
    ]);
    match half {
        Some(l) => table.row(vec![
            format!(
                "p99 insert → stored, three plugins, half of their peak ({} /s)",
                fmt_rate(half_peak as f64)
            ),
            "≤ 10 ms".into(),
            format!("{:.1} ms (p50 {:.1} ms)", l.p99_ms, l.p50_ms),
            met(l.p99_ms <= 10.0),
        ]),
        None => table.row(vec![
            "p99 at half of the peak".into(),
            "≤ 10 ms".into(),
            "not run".into(),
            "—".into(),
        ]),
    }
    table.note(format!(
        "Raw baselines: driver read {} events/s using {:.1} µs of client CPU per event (servers \
         {:.1} µs); async publish {} /s using {:.1} µs (servers {:.1} µs). With no plugins the \
         servers used {:.1} µs per event.",
        fmt_rate(raw.read_rate),
        raw.read_cpu.process_us,
        raw.read_cpu.servers_us,
        fmt_rate(raw.publish_rate),
        raw.publish_cpu.process_us,
        raw.publish_cpu.servers_us,
        none_cpu.servers_us,
    ));
    table
}
