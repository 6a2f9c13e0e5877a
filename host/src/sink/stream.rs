//! The stream itself: created or checked before a pipeline publishes, and its last message of
//! a unit read back at start as the [`Floor`] the restarted publisher continues from.

use std::time::Duration;

use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::{self, Context};
use mongodb::change_stream::event::ResumeToken;

use super::EventMessages;
use crate::config::{PipelineConfig, SinkConfig, Storage};
use crate::error::Error;
use crate::model::subject::subject_covers;
use crate::model::token::token_id;

/// Creates the pipeline's stream, or checks that an existing one can deduplicate and holds
/// every subject the pipeline publishes.
pub async fn prepare_stream(js: &Context, pipeline: &PipelineConfig) -> Result<(), Error> {
    let sink = &pipeline.sink;
    let fail = |message: String| Error::Sink {
        pipeline: pipeline.id.clone(),
        message,
    };
    let wanted_subject = format!("{}.>", sink.stream_prefix());
    let window = Duration::from_secs(sink.duplicate_window_secs);
    match js.get_stream(&sink.stream).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|err| fail(format!("cannot read stream '{}': {err}", sink.stream)))?;
            check_existing(&info.config, sink, &wanted_subject, window).map_err(fail)?;
            let wanted = stream_config(sink, &wanted_subject);
            for difference in settings_differences(&info.config, &wanted) {
                tracing::warn!(
                    pipeline = %pipeline.id,
                    stream = %sink.stream,
                    "the stream exists and is used as it is, although its {difference}; \
                     tidegate never edits an existing stream (nats stream edit changes it)"
                );
            }
            Ok(())
        }
        Err(err) if is_stream_not_found(&err) => {
            let config = stream_config(sink, &wanted_subject);
            if let Err(err) = js.create_stream(config).await {
                let overlapping = matches!(
                    err.kind(),
                    jetstream::context::CreateStreamErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP
                );
                return Err(fail(match overlapping {
                    true => overlap_message(js, &sink.stream, &wanted_subject).await,
                    false => format!("cannot create stream '{}': {err}", sink.stream),
                }));
            }
            tracing::info!(
                pipeline = %pipeline.id,
                stream = %sink.stream,
                subjects = %wanted_subject,
                replicas = sink.replicas,
                storage = ?sink.storage,
                max_age_secs = ?sink.max_age_secs,
                max_bytes = ?sink.max_bytes,
                max_msgs_per_subject = ?sink.max_msgs_per_subject,
                "created stream"
            );
            Ok(())
        }
        Err(err) if jetstream_off(&err) => Err(fail(format!(
            "JetStream is not enabled on the NATS server at {} (its JetStream API does not \
             answer); start nats-server with -js (or add `jetstream {{}}` to its config file), \
             and make sure this account has JetStream",
            server_address(js)
        ))),
        Err(err) => Err(fail(format!(
            "cannot look up stream '{}': {err}",
            sink.stream
        ))),
    }
}

/// The stream tidegate creates for `sink`: its subjects, duplicate window, replicas, storage
/// and limits (unset limits: none, JetStream's `-1`/zero).
fn stream_config(sink: &SinkConfig, wanted_subject: &str) -> StreamConfig {
    let limit = |value: Option<u64>| value.and_then(|v| i64::try_from(v).ok()).unwrap_or(-1);
    StreamConfig {
        name: sink.stream.clone(),
        subjects: vec![wanted_subject.to_string()],
        duplicate_window: Duration::from_secs(sink.duplicate_window_secs),
        storage: match sink.storage {
            Storage::File => StorageType::File,
            Storage::Memory => StorageType::Memory,
        },
        num_replicas: sink.replicas,
        max_age: Duration::from_secs(sink.max_age_secs.unwrap_or(0)),
        max_bytes: limit(sink.max_bytes),
        max_messages_per_subject: limit(sink.max_msgs_per_subject),
        ..Default::default()
    }
}

/// How an existing stream's settings differ from the ones tidegate would create it with
/// (replicas, storage, limits), one phrase each, for a warning: the stream is the
/// operator's, and changing it (least of all weakening its retention) is theirs to decide.
fn settings_differences(existing: &StreamConfig, wanted: &StreamConfig) -> Vec<String> {
    let limit = |value: i64| match value {
        v if v <= 0 => "none".to_string(),
        v => v.to_string(),
    };
    let age = |age: Duration| match age.as_secs() {
        0 => "none".to_string(),
        secs => format!("{secs}s"),
    };
    let pairs = [
        (
            "replicas",
            existing.num_replicas.max(1).to_string(),
            wanted.num_replicas.to_string(),
        ),
        (
            "storage",
            format!("{:?}", existing.storage).to_lowercase(),
            format!("{:?}", wanted.storage).to_lowercase(),
        ),
        ("max age", age(existing.max_age), age(wanted.max_age)),
        (
            "max bytes",
            limit(existing.max_bytes),
            limit(wanted.max_bytes),
        ),
        (
            "max messages per subject",
            limit(existing.max_messages_per_subject),
            limit(wanted.max_messages_per_subject),
        ),
    ];
    pairs
        .into_iter()
        .filter(|(_, have, want)| have != want)
        .map(|(what, have, want)| format!("{what} is {have}, not the configured {want}"))
        .collect()
}

/// Whether an existing stream can take the pipeline: it holds `wanted` subjects, remembers
/// ids at least `window` long, and acknowledges publishes; the error says what to change.
fn check_existing(
    config: &StreamConfig,
    sink: &SinkConfig,
    wanted_subject: &str,
    window: Duration,
) -> Result<(), String> {
    if !config
        .subjects
        .iter()
        .any(|s| subject_covers(s, wanted_subject))
    {
        return Err(format!(
            "stream '{}' has subjects [{}], which do not cover '{wanted_subject}'; add it to \
             the stream or change sink.subject_prefix",
            sink.stream,
            config.subjects.join(", ")
        ));
    }
    if config.duplicate_window < window {
        return Err(format!(
            "stream '{}' keeps message ids for {}s, less than sink.duplicate_window_secs = {}; \
             restarts could then publish duplicates. Raise the stream's duplicate window \
             (nats stream edit {} --dupe-window {}s) or lower the setting",
            sink.stream,
            config.duplicate_window.as_secs(),
            sink.duplicate_window_secs,
            sink.stream,
            sink.duplicate_window_secs
        ));
    }
    if config.no_ack {
        return Err(format!(
            "stream '{}' has no_ack set, so publishes cannot be confirmed",
            sink.stream
        ));
    }
    Ok(())
}

/// The id (`Nats-Msg-Id`) of the last message stored under the pipeline's subject prefix, if
/// any: the stream's real tail, whatever the checkpoint says.
pub async fn stream_tail(js: &Context, pipeline: &PipelineConfig) -> Result<Option<String>, Error> {
    let sink = &pipeline.sink;
    last_message_under(js, &sink.stream, &sink.subject_prefix)
        .await
        .map_err(|message| Error::Sink {
            pipeline: pipeline.id.clone(),
            message,
        })
}

/// The id of the last message stored in `stream` under subjects `<prefix>.>`, if any.
pub(super) async fn last_message_under(
    js: &Context,
    stream: &str,
    prefix: &str,
) -> Result<Option<String>, String> {
    let handle = js
        .get_stream_no_info(stream)
        .await
        .map_err(|err| format!("cannot open stream '{stream}': {err}"))?;
    let subjects = format!("{prefix}.>");
    match handle.get_last_raw_message_by_subject(&subjects).await {
        Ok(message) => Ok(message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|id| id.as_str().to_string())),
        Err(err) if err.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Ok(None)
        }
        Err(err) => Err(format!(
            "cannot read the last message on '{subjects}' in stream '{stream}': {err}"
        )),
    }
}

/// The stream's last stored message of this unit, as found at start: the events the restarted
/// pipeline re-reads up to it are already stored, and [`Publisher::push`](super::Publisher::push) drops them.
///
/// Ids are `<unit>:<event id>:<output>`, where the event id is the resume token's `_data`
/// (or `snapshot.<start>.<ns>.<_id>` for a snapshot read) and the output an index,
/// `dead-letter` or `heartbeat`. `_data` is MongoDB's KeyString in hex, whose byte order is
/// the change stream's order (a sharded cluster merges its shards' streams by it), so events
/// are placed before or after the tail by comparing their tokens' `_data` with the tail's.
#[derive(Debug, Clone, PartialEq)]
pub struct Floor {
    /// The tail's full message id.
    msg_id: String,
    /// `<unit>:<event id>:`, the prefix every message of the tail's event carries.
    event_prefix: String,
    /// The tail's output index, when it is a numbered output.
    output: Option<usize>,
    /// The tail's place in the stream order (a token's `_data`), when known: for a change
    /// event, its token; for an initial snapshot read, the snapshot's start (every read
    /// shares it, so reads are matched by id only).
    position: Option<String>,
    /// Whether the tail is a snapshot read.
    snapshot: bool,
}

/// How two tokens' `_data` compare in stream order; `None` unless both are hex KeyStrings
/// beginning with a timestamp (MongoDB 4.2+ tokens), the only shape whose order is known.
pub fn stream_order(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let keystring = |data: &str| {
        data.starts_with("82") && data.len() >= 18 && data.bytes().all(|c| c.is_ascii_hexdigit())
    };
    (keystring(a) && keystring(b)).then(|| a.to_ascii_uppercase().cmp(&b.to_ascii_uppercase()))
}

impl Floor {
    /// The floor for `msg_id`, if it is one of unit `unit`'s message ids.
    pub fn parse(unit: &str, msg_id: &str) -> Option<Floor> {
        let rest = msg_id.strip_prefix(unit)?.strip_prefix(':')?;
        let (event, output) = rest.rsplit_once(':')?;
        if event.is_empty() {
            return None;
        }
        let snapshot = event.starts_with("snapshot.");
        let position = match event.strip_prefix("snapshot.") {
            // An initial snapshot's id names its start; an incremental one's (`i…`) does not.
            Some(rest) => rest.split('.').next().map(str::to_string),
            None => Some(event.to_string()),
        };
        Some(Floor {
            msg_id: msg_id.to_string(),
            event_prefix: format!("{unit}:{event}:"),
            output: output.parse().ok(),
            position: position.filter(|p| stream_order(p, p).is_some()),
            snapshot,
        })
    }

    /// The tail's message id.
    pub fn msg_id(&self) -> &str {
        &self.msg_id
    }

    /// The cluster time of the tail's event, for a change event's tail (not a snapshot read).
    pub fn time(&self) -> Option<bson::Timestamp> {
        if self.snapshot {
            return None;
        }
        let data = self.position.as_deref()?;
        let time = u32::from_str_radix(data.get(2..10)?, 16).ok()?;
        let increment = u32::from_str_radix(data.get(10..18)?, 16).ok()?;
        Some(bson::Timestamp { time, increment })
    }

    /// Whether a pipeline resuming after `token` may re-read messages the tail holds: unless
    /// the tail lies at or before `token` in the stream's order (then the checkpointed event,
    /// complete, ends at or after it). A snapshot read always may: reads share the token of
    /// the snapshot's start.
    pub fn lies_after(&self, token: &ResumeToken) -> bool {
        if self.snapshot {
            return true;
        }
        let tail = self.position.as_deref().unwrap_or_default();
        matches!(
            stream_order(tail, &token_id(token)),
            Some(std::cmp::Ordering::Greater) | None
        )
    }

    /// How many of `event`'s leading messages the stream already holds, and whether the
    /// events after it lie past the tail (the floor is then done).
    pub(super) fn stored(&self, event: &EventMessages) -> (usize, bool) {
        if event
            .messages
            .iter()
            .any(|m| m.msg_id.starts_with(&self.event_prefix))
        {
            // The tail's own event: its outputs up to the tail are stored.
            let stored = event
                .messages
                .iter()
                .take_while(|m| {
                    m.msg_id == self.msg_id
                        || (m.msg_id.starts_with(&self.event_prefix)
                            && matches!(
                                (output_index(&m.msg_id), self.output),
                                (Some(i), Some(tail)) if i <= tail
                            ))
                })
                .count();
            let stored = match event.messages.iter().position(|m| m.msg_id == self.msg_id) {
                Some(i) => stored.max(i + 1),
                None => stored,
            };
            return (stored, true);
        }
        let Some(tail) = self.position.as_deref() else {
            return (0, false);
        };
        match stream_order(&token_id(&event.token), tail) {
            // Before the tail in the stream: stored, all of it.
            Some(std::cmp::Ordering::Less) => (event.messages.len(), false),
            Some(std::cmp::Ordering::Greater) => (0, true),
            // Another snapshot read of the same snapshot, or an unknown order: publish it,
            // and let the duplicate window drop it if it was stored.
            _ => (0, false),
        }
    }
}

/// The output index at the end of a message id (`…:<index>`), if it is one.
fn output_index(msg_id: &str) -> Option<usize> {
    msg_id.rsplit_once(':')?.1.parse().ok()
}

// First contact: JetStream refusals as messages naming the problem and what to do.

/// Whether a stream lookup failed because JetStream is off: no one answers its API (a
/// server started without `-js`) or the server says it is not enabled (for the account).
pub fn jetstream_off(err: &jetstream::context::GetStreamError) -> bool {
    use jetstream::context::{GetStreamErrorKind, RequestError, RequestErrorKind};
    match err.kind() {
        GetStreamErrorKind::JetStream(e) => {
            e.error_code() == jetstream::ErrorCode::JETSTREAM_NOT_ENABLED
                || e.error_code() == jetstream::ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
        }
        GetStreamErrorKind::Request => std::error::Error::source(err)
            .and_then(|source| source.downcast_ref::<RequestError>())
            .is_some_and(|request| request.kind() == RequestErrorKind::NoResponders),
        _ => false,
    }
}

/// The server this client is connected to, `host:port`.
fn server_address(js: &Context) -> String {
    let info = js.client().server_info();
    format!("{}:{}", info.host, info.port)
}

/// Why JetStream refused to create stream `stream` for `wanted`: the other streams whose
/// subjects overlap it, named, and what to do.
async fn overlap_message(js: &Context, stream: &str, wanted: &str) -> String {
    let mut others = Vec::new();
    let mut streams = js.streams();
    while let Some(Ok(info)) = futures::StreamExt::next(&mut streams).await {
        let overlapping: Vec<&String> = info
            .config
            .subjects
            .iter()
            .filter(|s| subject_covers(s, wanted) || subject_covers(wanted, s))
            .collect();
        if !overlapping.is_empty() {
            others.push(format!(
                "'{}' (subjects [{}])",
                info.config.name,
                info.config
                    .subjects
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let others = match others.is_empty() {
        true => "another stream (could not list which)".to_string(),
        false => format!("stream {}", others.join(" and ")),
    };
    format!(
        "cannot create stream '{stream}' for '{wanted}': {others} already takes these \
         subjects, and JetStream lets one stream own a subject. Set sink.stream to that \
         stream to publish into it (it must cover '{wanted}'), or choose a sink.subject_prefix \
         it does not cover"
    )
}

/// Whether `err` says that the stream does not exist.
pub fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Headers;
    use crate::sink::Message;
    use bytes::Bytes;

    #[test]
    fn covers() {
        assert!(subject_covers("cdc.>", "cdc.>"));
        assert!(subject_covers(">", "cdc.>"));
        assert!(subject_covers("*.>", "cdc.>"));
        assert!(!subject_covers("cdc.*", "cdc.>"));
        assert!(!subject_covers("cdc.a.>", "cdc.>"));
        assert!(!subject_covers("other.>", "cdc.>"));
        assert!(subject_covers("cdc.a", "cdc.a"));
    }

    /// A stream made by hand is left alone; what differs from the settings is named.
    #[test]
    fn differing_settings_are_named() {
        let mut table = toml::Table::new();
        table.insert("stream".into(), "S".into());
        table.insert("subject_prefix".into(), "cdc".into());
        table.insert("replicas".into(), 3.into());
        table.insert("max_msgs_per_subject".into(), 1.into());
        let sink: SinkConfig = table.try_into().expect("sink");
        let wanted = stream_config(&sink, "cdc.>");
        assert_eq!(wanted.num_replicas, 3);
        assert_eq!(wanted.max_messages_per_subject, 1);
        assert_eq!(wanted.max_bytes, -1);
        assert!(settings_differences(&wanted, &wanted).is_empty());
        let existing = StreamConfig {
            max_messages_per_subject: -1,
            ..wanted.clone()
        };
        assert_eq!(
            settings_differences(&existing, &wanted),
            ["max messages per subject is none, not the configured 1"]
        );
    }

    fn token(data: &str) -> ResumeToken {
        crate::model::token::token_from_document(bson::doc! { "_data": data }).expect("token")
    }

    /// An event's messages for `data`, with `outputs` numbered messages.
    fn event(data: &str, outputs: usize) -> EventMessages {
        EventMessages {
            messages: (0..outputs)
                .map(|i| Message {
                    subject: "cdc.x".into(),
                    msg_id: format!("p:{data}:{i}"),
                    headers: Headers::default(),
                    payload: Bytes::new(),
                })
                .collect(),
            token: token(data),
            snapshot: None,
            commit_unix_ms: None,
        }
    }

    const T1: &str = "8200000001000000012B0429296E1404";
    const T2: &str = "8200000002000000012B0429296E1404";
    const T3: &str = "8200000002000000022B0429296E1404";

    /// Events before the tail are stored, the tail's own event up to its output, later events
    /// not at all; the floor is passed at the tail's event.
    #[test]
    fn floor_skips_what_the_stream_holds() {
        let floor = Floor::parse("p", &format!("p:{T2}:1")).expect("ours");
        assert_eq!(floor.stored(&event(T1, 2)), (2, false));
        assert_eq!(floor.stored(&event(T2, 3)), (2, true));
        assert_eq!(floor.stored(&event(T3, 1)), (0, true));
        assert_eq!(
            floor.time(),
            Some(bson::Timestamp {
                time: 2,
                increment: 1
            })
        );
        // Another unit's ids, or a tenant unit's, are not this unit's floor.
        assert!(Floor::parse("q", &format!("p:{T2}:1")).is_none());
        assert!(Floor::parse("p", &format!("p.t:{T2}:1")).is_none());
    }

    /// The checkpoint's own (complete) event and anything before it need no floor.
    #[test]
    fn floor_only_past_the_checkpoint() {
        let floor = Floor::parse("p", &format!("p:{T2}:0")).expect("ours");
        assert!(floor.lies_after(&token(T1)));
        assert!(!floor.lies_after(&token(T2)));
        assert!(!floor.lies_after(&token(T3)));
        let heartbeat = Floor::parse("p", &format!("p:{T2}:heartbeat")).expect("ours");
        assert!(!heartbeat.lies_after(&token(T2)));
        assert_eq!(heartbeat.stored(&event(T1, 1)), (1, false));
    }

    /// Snapshot reads share the snapshot's token: only the tail's own read is skipped, and
    /// the floor ends at it.
    #[test]
    fn snapshot_floor_matches_the_read_itself() {
        let tail = format!("p:snapshot.{T1}.shop.orders.5:0");
        let floor = Floor::parse("p", &tail).expect("ours");
        assert!(floor.lies_after(&token(T1)));
        assert_eq!(floor.time(), None);
        let mut read = event(T1, 1);
        read.messages[0].msg_id = format!("p:snapshot.{T1}.shop.orders.4:0");
        assert_eq!(floor.stored(&read), (0, false));
        read.messages[0].msg_id = tail.clone();
        assert_eq!(floor.stored(&read), (1, true));
        assert_eq!(floor.stored(&event(T2, 1)), (0, true));
    }
}
