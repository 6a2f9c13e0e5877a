//! `tidegate tail PIPELINE`: prints a pipeline's messages as JetStream stores them, for people
//! watching a pipeline (consumers read the stream themselves: `docs/consumers.md`).
//!
//! It reads the same config file as `run`, connects with the same authentication and TLS
//! options ([`tidegate::security::nats_options`]), and follows the unit's stream with an
//! ephemeral ordered consumer filtered to the unit's subjects: nothing durable is left behind
//! on the server, and nothing is acknowledged, so tailing never changes what other consumers
//! see. Every error says what to check; none shows a secret.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::jetstream::{self, consumer, stream::Stream};
use async_nats::HeaderMap;
use futures::StreamExt;
use tidegate::config::PipelineConfig;
use tidegate::model::subject::{is_valid_subject, subject_covers};
use tidegate::security::{nats_options, parse_nats_urls, scrub};
use tidegate::Config;

/// `tidegate tail`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// The pipeline to follow; a tenant's unit is `<pipeline>.<tenant>`.
    pipeline: String,
    /// The TOML config file the pipeline runs with.
    #[arg(long, short, default_value = "tidegate.toml")]
    config: PathBuf,
    /// Start with the oldest message the stream holds (default: only new messages).
    #[arg(long, conflicts_with_all = ["since", "last"])]
    from_start: bool,
    /// Start with the messages stored since this long ago (`90s`, `15m`, `2h`, `1d`, `1h30m`)
    /// or since an RFC 3339 time (`2026-11-22T10:00:00Z`).
    #[arg(long, value_name = "DURATION|TIME", conflicts_with = "last")]
    since: Option<String>,
    /// Start with the last N messages (of those the subject filter selects).
    #[arg(long, value_name = "N")]
    last: Option<u64>,
    /// Only messages on these subjects, a NATS pattern under the pipeline's prefix
    /// (`cdc.shop.orders.>`, `cdc.*.*.delete`, `cdc.dead-letter`). Default: all of them.
    #[arg(long, value_name = "FILTER")]
    subject: Option<String>,
    /// One JSON object per message and line (subject, seq, time, id, headers, payload),
    /// for scripts; default: headers and pretty-printed payload.
    #[arg(long)]
    compact: bool,
    /// Exit after printing this many messages (default: follow until interrupted).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

/// Where the consumer starts.
enum Start {
    New,
    All,
    Since(time::OffsetDateTime),
    Last(u64),
}

/// Runs `tidegate tail`; exit code 2 for a bad config or argument, 1 for anything else.
pub fn run(args: Args) -> ExitCode {
    let prepared = Config::load(&args.config)
        .map_err(anyhow::Error::from)
        .and_then(|config| Ok((find_unit(&config, &args.pipeline, &args.config)?, config)))
        .and_then(|(unit, config)| Ok((start_of(&args)?, filter_of(&args, &unit)?, unit, config)));
    let (start, filter, unit, config) = match prepared {
        Ok(prepared) => prepared,
        Err(err) => {
            eprintln!("tidegate tail: {}", scrub(&format!("{err:#}")));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tidegate tail: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            result = follow(&config, &unit, &filter, start, &args) => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tidegate tail: {}", scrub(&format!("{err:#}")));
            ExitCode::from(1)
        }
    }
}

/// The unit named `name`; an unknown name is answered with the names there are.
fn find_unit(config: &Config, name: &str, path: &Path) -> anyhow::Result<PipelineConfig> {
    if let Some(unit) = config.pipelines.iter().find(|p| p.id == name) {
        return Ok(unit.clone());
    }
    let ids: Vec<&str> = config.pipelines.iter().map(|p| p.id.as_str()).collect();
    let tenants: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| id.strip_prefix(name).is_some_and(|t| t.starts_with('.')))
        .collect();
    if !tenants.is_empty() {
        bail!(
            "pipeline '{name}' has tenants, each with a stream of its own: tail one of {}",
            tenants.join(", ")
        );
    }
    bail!(
        "no pipeline '{name}' in {}; its pipelines are: {}",
        path.display(),
        ids.join(", ")
    )
}

fn start_of(args: &Args) -> anyhow::Result<Start> {
    if args.from_start {
        return Ok(Start::All);
    }
    if let Some(n) = args.last {
        if n == 0 {
            bail!("--last: give a number of messages above 0");
        }
        return Ok(Start::Last(n));
    }
    let Some(since) = &args.since else {
        return Ok(Start::New);
    };
    if let Ok(time) = bson::DateTime::parse_rfc3339_str(since) {
        let nanos = i128::from(time.timestamp_millis()) * 1_000_000;
        let time = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .map_err(|err| anyhow::anyhow!("--since {since}: {err}"))?;
        return Ok(Start::Since(time));
    }
    let ago = parse_duration(since).map_err(|err| anyhow::anyhow!("--since {since}: {err}"))?;
    Ok(Start::Since(time::OffsetDateTime::now_utc() - ago))
}

/// `90s`, `15m`, `2h`, `1d`, `1h30m`: numbers each followed by a unit.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || "give a duration such as 90s, 15m, 2h, 1d or 1h30m, or an RFC 3339 time".into();
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(bad)?;
        number.clear();
    }
    if !number.is_empty() || text.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// The subject filter: `--subject`, which must lie under the unit's prefix, or the prefix.
fn filter_of(args: &Args, unit: &PipelineConfig) -> anyhow::Result<String> {
    let all = format!("{}.>", unit.sink.subject_prefix);
    let Some(filter) = &args.subject else {
        return Ok(all);
    };
    if !is_valid_subject(filter, true) || !subject_covers(&all, filter) {
        bail!(
            "--subject '{filter}': give a NATS subject or pattern under '{all}', which pipeline \
             '{}' publishes to",
            unit.id
        );
    }
    Ok(filter.clone())
}

/// Connects, opens the consumer and prints until `--count` messages were printed.
async fn follow(
    config: &Config,
    unit: &PipelineConfig,
    filter: &str,
    start: Start,
    args: &Args,
) -> anyhow::Result<()> {
    let client = connect(config).await?;
    let js = jetstream::new(client);
    let stream = open_stream(&js, unit).await?;
    let deliver_policy = match start {
        Start::New => consumer::DeliverPolicy::New,
        Start::All => consumer::DeliverPolicy::All,
        Start::Since(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
        Start::Last(n) => last_n(&stream, filter, n).await?,
    };
    let ordered = stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            filter_subject: filter.to_string(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot create a consumer on stream '{}'", unit.sink.stream))?;
    let mut messages = ordered
        .messages()
        .await
        .with_context(|| format!("cannot read stream '{}'", unit.sink.stream))?;
    eprintln!(
        "tidegate tail: following stream '{}', subjects {filter} (Ctrl-C to stop)",
        unit.sink.stream
    );
    let mut printed = 0;
    while args.count.is_none_or(|count| printed < count) {
        let Some(message) = messages.next().await else {
            bail!("the server closed the consumer");
        };
        let message = message.context("reading the stream")?;
        println!("{}", render(&message, args.compact));
        printed += 1;
    }
    Ok(())
}

/// A client connected with the config's `[nats]` settings, or a clear reason why not.
async fn connect(config: &Config) -> anyhow::Result<async_nats::Client> {
    let urls = parse_nats_urls(&config.nats.url).map_err(|m| anyhow::anyhow!("nats.url: {m}"))?;
    let options = nats_options(
        &config.nats.auth,
        urls.credentials.as_ref(),
        config.nats.tls.as_ref(),
    )
    .await?;
    options
        .connection_timeout(Duration::from_secs(5))
        .connect(&urls.servers)
        .await
        .map_err(|err| {
            anyhow::anyhow!(
                "cannot connect to NATS at {} (nats.url, or TIDEGATE_NATS_URL): {err}; check \
                 that nats-server runs there and that [nats.auth] / [nats.tls] match it",
                urls.servers.join(",")
            )
        })
}

/// The unit's stream; a missing one (the pipeline never ran) is named as such.
async fn open_stream(js: &jetstream::Context, unit: &PipelineConfig) -> anyhow::Result<Stream> {
    let name = &unit.sink.stream;
    match js.get_stream(name).await {
        Ok(stream) => Ok(stream),
        Err(err) if tidegate::sink::is_stream_not_found(&err) => bail!(
            "stream '{name}' of pipeline '{}' does not exist on this NATS server: `tidegate \
             run` creates it when the pipeline first starts (or check pipeline.sink.stream)",
            unit.id
        ),
        Err(err) if tidegate::sink::jetstream_off(&err) => bail!(
            "JetStream does not answer on this NATS server: start nats-server with -js, and \
             make sure this account has JetStream"
        ),
        Err(err) => Err(err).with_context(|| format!("cannot read stream '{name}'")),
    }
}

/// A start sequence from which `filter` selects exactly the last `n` messages (all when
/// there are fewer). The pending count of a probe consumer falls as its start moves on, so
/// a binary search over the stream's sequences finds it in a few dozen probes, without
/// reading any message.
async fn last_n(stream: &Stream, filter: &str, n: u64) -> anyhow::Result<consumer::DeliverPolicy> {
    let info = stream.get_info().await.context("cannot read the stream")?;
    let (mut low, mut high) = (info.state.first_sequence, info.state.last_sequence);
    if pending_from(stream, filter, low).await? <= n {
        return Ok(consumer::DeliverPolicy::All);
    }
    // pending_from(low) > n always holds, pending_from(high + 1) <= n as well.
    while low < high {
        let middle = low + (high - low).div_ceil(2);
        if pending_from(stream, filter, middle).await? > n {
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    // `low` is the last start with more than n pending: the n-th from the end follows it.
    Ok(consumer::DeliverPolicy::ByStartSequence {
        start_sequence: low + 1,
    })
}

/// How many messages `filter` selects from stream sequence `start` on.
async fn pending_from(stream: &Stream, filter: &str, start: u64) -> anyhow::Result<u64> {
    let probe: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: filter.to_string(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            inactive_threshold: Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .context("cannot count messages (probe consumer)")?;
    let info = probe.cached_info();
    let pending = info.num_pending;
    // The server removes it after its inactive threshold anyway.
    let _ = stream.delete_consumer(&info.name).await;
    Ok(pending)
}

/// One message as text: a header line, the headers and the payload, or one JSON line.
fn render(message: &jetstream::Message, compact: bool) -> String {
    let (seq, time) = match message.info() {
        Ok(info) => (info.stream_sequence, rfc3339(info.published)),
        Err(_) => (0, String::new()),
    };
    let headers = message
        .headers
        .as_ref()
        .map(shown_headers)
        .unwrap_or_default();
    let id = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("Nats-Msg-Id"))
        .map(|(_, value)| value.clone())
        .unwrap_or_default();
    let content_type = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("Content-Type"))
        .map(|(_, value)| value.as_str())
        .unwrap_or_default();
    let payload = payload_json(&message.payload, content_type);
    if compact {
        let headers: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .map(|(name, value)| (name.clone(), value.clone().into()))
            .collect();
        return serde_json::json!({
            "subject": message.subject.as_str(),
            "seq": seq,
            "time": time,
            "id": id,
            "headers": headers,
            "payload": payload,
        })
        .to_string();
    }
    let mut text = format!("--- {}  #{seq}  {time}\n", message.subject);
    for (name, value) in &headers {
        text.push_str(&format!("{name}: {value}\n"));
    }
    text.push_str(&match &payload {
        serde_json::Value::Null => "(empty payload)".to_string(),
        serde_json::Value::String(text) => text.clone(),
        json => serde_json::to_string_pretty(json).unwrap_or_default(),
    });
    text
}

/// Every header but the ordering chain's `Nats-Expected-Last-Msg-Id`, in order.
fn shown_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut shown: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| {
            !name
                .to_string()
                .eq_ignore_ascii_case("Nats-Expected-Last-Msg-Id")
        })
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (name.to_string(), value.as_str().to_string()))
        })
        .collect();
    // The map's order is arbitrary: the message id first, then by name.
    shown.sort_by_key(|(name, _)| (!name.eq_ignore_ascii_case("Nats-Msg-Id"), name.clone()));
    shown
}

/// The payload as JSON: BSON payloads as relaxed Extended JSON, JSON as is, other text as a
/// string, an empty payload (a `full-document` delete) as null.
fn payload_json(payload: &[u8], content_type: &str) -> serde_json::Value {
    if payload.is_empty() {
        return serde_json::Value::Null;
    }
    if content_type.starts_with("application/bson") {
        let json = bson::RawDocument::from_bytes(payload)
            .map_err(|err| err.to_string())
            .and_then(tidegate::model::ejson::relaxed);
        return match json {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            Err(err) => format!("(malformed BSON payload, {} bytes: {err})", payload.len()).into(),
        };
    }
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| String::from_utf8_lossy(payload).into_owned().into())
}

fn rfc3339(time: time::OffsetDateTime) -> String {
    let millis = (time.unix_timestamp_nanos() / 1_000_000) as i64;
    bson::DateTime::from_millis(millis)
        .try_to_rfc3339_string()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "5", "m", "5x", "1h30", "-5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn payloads() {
        assert_eq!(
            payload_json(b"", "application/json"),
            serde_json::Value::Null
        );
        assert_eq!(
            payload_json(br#"{"a":1}"#, "application/json; ejson=relaxed"),
            serde_json::json!({"a": 1})
        );
        let bson = bson::serialize_to_vec(&bson::doc! { "n": 1_i64, "s": "x" }).unwrap();
        assert_eq!(
            payload_json(&bson, "application/bson"),
            serde_json::json!({"n": 1, "s": "x"})
        );
        assert_eq!(
            payload_json(b"hello", "text/plain"),
            serde_json::json!("hello")
        );
    }
}
