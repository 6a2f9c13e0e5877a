//! Scenario 9: JetStream alone, in the two layouts a shared reader's tenants can publish to —
//! the baseline that says what sharing one stream could save before tidegate is changed.
//!
//! N messages spread round-robin over K tenants (as routing by tenant key spreads
//! consecutive events), each with its own `Nats-Msg-Id` and a `Nats-Expected-Last-Msg-Id`
//! naming the previous message of the same stream (tidegate's ordering chain), with
//! `PUBLISH_WINDOW` acknowledgements in flight, on a fresh nats-server per row:
//! - **a stream per tenant**, what tidegate does today: K streams, K chains;
//! - **one stream, a subject space per tenant** (`<tenant>.…` subjects in one stream): one
//!   stream, one chain, which is what one publisher for a pipeline's tenants would send.
//!
//! Sizes and rounds come from the environment, as for scenario 8:
//! `TIDEGATE_BENCH_TENANTS` (default `1,10,100,1000`), `TIDEGATE_BENCH_ROUNDS` (default 1).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use tidegate_testkit::{stream_len, NatsServer};

use super::tenants::{list, ratio_cells};
use super::{
    create_stream, find_server_pid, fmt_rate, js_context, median, proc_status_kib, Args, Cpu,
    Table, PUBLISH_WINDOW,
};

/// The published payload: about the size of the tenants scenario's relaxed-JSON events.
const PAYLOAD_BYTES: usize = 1200;

/// Where a tenant's messages go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    StreamPerTenant,
    SharedStream,
}

impl Layout {
    fn label(self) -> &'static str {
        match self {
            Layout::StreamPerTenant => "a stream per tenant",
            Layout::SharedStream => "one stream, a subject space per tenant",
        }
    }
}

/// What one row measured.
struct Row {
    rate: f64,
    /// CPU seconds per message of this process and of nats-server.
    cpu_per_message: [f64; 2],
    /// nats-server's peak resident memory, KiB.
    nats_peak_kib: u64,
}

/// Scenario 9 alone: both layouts at every K, each row on a fresh nats-server.
pub(super) async fn streams_only(args: &Args) -> anyhow::Result<Vec<Table>> {
    let sizes: Vec<usize> = list("TIDEGATE_BENCH_TENANTS", vec![1, 10, 100, 1000]);
    let rounds = list("TIDEGATE_BENCH_ROUNDS", vec![1usize])
        .first()
        .copied()
        .unwrap_or(1);
    if rounds == 0 || sizes.contains(&0) {
        bail!("TIDEGATE_BENCH_ROUNDS and TIDEGATE_BENCH_TENANTS: at least 1");
    }
    let n = args.events;
    let mut table = Table::new(
        &format!(
            "9. JetStream alone: K tenants' messages in K streams or in one (N = {n}, \
             round-robin over the tenants, {rounds} round(s))"
        ),
        &[
            "layout",
            "K",
            "streams",
            "messages/s",
            "× K = 1",
            "× K = 1 per round",
            "CPU µs per message: bench / nats",
            "nats-server peak RSS MiB",
        ],
    );
    let layouts = [Layout::StreamPerTenant, Layout::SharedStream];
    // rows[l][i][r]: layout l, size i, round r; a round runs every layout and size in turn.
    let mut rows: Vec<Vec<Vec<Row>>> = layouts
        .iter()
        .map(|_| sizes.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..rounds {
        for (l, &layout) in layouts.iter().enumerate() {
            for (i, &k) in sizes.iter().enumerate() {
                eprintln!(
                    "9. JetStream alone: {}, K = {k}, round {}/{rounds}…",
                    layout.label(),
                    round + 1
                );
                rows[l][i].push(publish(n, k, layout).await?);
            }
        }
    }
    for (l, &layout) in layouts.iter().enumerate() {
        for (i, &k) in sizes.iter().enumerate() {
            let runs = &rows[l][i];
            // Against K = 1 of the same round, in the per-tenant layout: at K = 1 the two
            // layouts are the same thing.
            let ratios: Vec<f64> = runs
                .iter()
                .zip(&rows[0][0])
                .map(|(row, first)| row.rate / first.rate)
                .collect();
            let streams = match layout {
                Layout::StreamPerTenant => k,
                Layout::SharedStream => 1,
            };
            let [ratio, per_round] = ratio_cells(&ratios);
            table.row(vec![
                layout.label().into(),
                k.to_string(),
                streams.to_string(),
                fmt_rate(median(runs.iter().map(|r| r.rate))),
                ratio,
                per_round,
                (0..2)
                    .map(|p| {
                        let us = median(runs.iter().map(|r| r.cpu_per_message[p])) * 1e6;
                        format!("{us:.1}")
                    })
                    .collect::<Vec<_>>()
                    .join(" / "),
                (runs.iter().map(|r| r.nats_peak_kib).max().unwrap_or(0) / 1024).to_string(),
            ]);
        }
    }
    table.note(format!(
        "No tidegate and no MongoDB: this process publishes {PAYLOAD_BYTES}-byte payloads \
         itself, message i to tenant i mod K, with the async-nats JetStream context tidegate \
         builds ({PUBLISH_WINDOW} acknowledgements in flight), to file-storage streams with \
         a 120 s duplicate window, created before the clock starts. Every message carries \
         `Nats-Msg-Id` and (after a stream's first) `Nats-Expected-Last-Msg-Id` naming the \
         previous message in its stream. The rate is messages / (first publish → last \
         acknowledgement); CPU per message is each process's CPU time over the same span, \
         divided by N. \"× K = 1\" is against K = 1 of the first layout in the same round \
         (at K = 1 the layouts are the same), the median over the rounds."
    ));
    Ok(vec![table])
}

/// Publishes `n` messages over `k` tenants in `layout` on a fresh nats-server.
async fn publish(n: usize, k: usize, layout: Layout) -> anyhow::Result<Row> {
    let nats = NatsServer::start().await?;
    let client = nats.client().await?;
    let js = js_context(&client);
    let streams: Vec<String> = match layout {
        Layout::StreamPerTenant => (0..k).map(|t| format!("T{t}")).collect(),
        Layout::SharedStream => vec!["TENANTS".to_string()],
    };
    for (s, name) in streams.iter().enumerate() {
        let prefix = match layout {
            Layout::StreamPerTenant => format!("tenants.t{s}"),
            Layout::SharedStream => "tenants".to_string(),
        };
        create_stream(&js, name, &prefix).await?;
    }
    let subjects: Vec<String> = (0..k)
        .map(|t| format!("tenants.t{t}.bench.coll.insert"))
        .collect();
    let stream_of = |tenant: usize| match layout {
        Layout::StreamPerTenant => tenant,
        Layout::SharedStream => 0,
    };
    let payload = Bytes::from(vec![b'x'; PAYLOAD_BYTES]);
    let cpu = Cpu {
        pids: [
            Some("self".to_string()),
            None,
            find_server_pid("nats-server", "-p", nats.port()),
        ],
    };
    let mut previous: Vec<Option<String>> = vec![None; streams.len()];
    let mut window: VecDeque<PublishAckFuture> = VecDeque::with_capacity(PUBLISH_WINDOW);
    let started = Instant::now();
    let mark = cpu.mark();
    for i in 0..n {
        if window.len() >= PUBLISH_WINDOW {
            if let Some(ack) = window.pop_front() {
                ack.await.map_err(|e| anyhow!("ack: {e}"))?;
            }
        }
        let tenant = i % k;
        let id = format!("m{i}");
        let mut message = PublishMessage::build()
            .payload(payload.clone())
            .message_id(&id);
        let chain = &mut previous[stream_of(tenant)];
        if let Some(prev) = chain.as_deref() {
            message = message.expected_last_message_id(prev);
        }
        *chain = Some(id);
        let ack = js
            .send_publish(subjects[tenant].clone(), message)
            .await
            .map_err(|e| anyhow!("publish: {e}"))?;
        window.push_back(ack);
    }
    while let Some(ack) = window.pop_front() {
        ack.await.map_err(|e| anyhow!("ack: {e}"))?;
    }
    let elapsed = started.elapsed();
    let end = cpu.mark();
    let seconds = cpu.seconds(mark, end);
    let nats_peak_kib = cpu.pids[2]
        .as_deref()
        .map_or(0, |pid| proc_status_kib(pid, "VmHWM:"));

    let mut stored = 0;
    for name in &streams {
        stored += stream_len(&client, name).await;
    }
    if stored != n as u64 {
        bail!(
            "{} stream(s) hold {stored} messages, expected {n}",
            streams.len()
        );
    }
    Ok(Row {
        rate: n as f64 / elapsed.max(Duration::from_nanos(1)).as_secs_f64(),
        cpu_per_message: [seconds[0] / n as f64, seconds[2] / n as f64],
        nats_peak_kib,
    })
}
