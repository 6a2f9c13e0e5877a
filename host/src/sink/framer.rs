//! Framing: turning a chain's verdict on one event into the NATS messages that carry it
//! (subjects, message ids, headers, payloads), dead letters included, each checked against
//! what the server accepts before it is sent.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mongodb::change_stream::event::ResumeToken;

use crate::config::{Encoding, PipelineConfig};
use crate::error::Error;
use crate::model::failure::FailureKind;
use crate::model::key::{key_id, key_json};
use crate::model::subject::SubjectTemplate;
use crate::model::{Change, SourceEvent};
use crate::ops::metrics::PipelineMetrics as PipelineStats;
use crate::plugin::{DeadLetterCause, Verdict};
use crate::sink::format::Formatter;
use crate::sink::headers::{line_bytes, Headers};
use crate::sink::{encode, EventMessages, Message};

/// NATS's default `max_payload`, assumed if the server did not say.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// The smallest `max_payload` a pipeline runs with: below it even a dead-letter stub (ids,
/// namespace, reason) might not fit, and an event could be neither published nor
/// dead-lettered.
pub const MIN_MAX_PAYLOAD: usize = 16 * 1024;

/// The longest subject tidegate publishes to. nats-server closes the connection of a client
/// whose protocol line (`HPUB <subject> <reply inbox> <sizes>`) is longer than its
/// `max_control_line` (default 4096 bytes, not announced to clients); half of it leaves room
/// for the reply inbox and the sizes.
pub const MAX_SUBJECT_BYTES: usize = 2048;

/// Bytes reserved for the `Nats-Expected-Last-Msg-Id` value the publisher adds (the previous
/// message's id, unknown while framing) when no longer id has been seen.
pub(crate) const EXPECTED_ID_ALLOWANCE: usize = 512;

/// The most bytes of an error text a dead-letter stub carries.
const STUB_ERROR_CHARS: usize = 200;

/// Turns chain verdicts into NATS messages: subjects, ids, headers, payloads.
///
/// Every message it makes fits the connected server's `max_payload` as the server counts it
/// ([`Framer::fits`]): an output that does not is dead-lettered instead, and a dead letter
/// that does not is cut down to a stub that does. So no event, and no plugin output, can make
/// the server close the connection every unit shares.
pub struct Framer {
    pipeline: String,
    subjects: SubjectTemplate,
    dead_letter_subject: String,
    /// Dead letters keep the change-event shape in this encoding, whatever the format.
    encoding: Encoding,
    formatter: Formatter,
    pub(crate) max_payload: usize,
    /// The longest message id framed so far (at first, the checkpoint's): the publisher's
    /// `Nats-Expected-Last-Msg-Id` header repeats the previous message's id.
    longest_id: usize,
    /// On a stream shared by a pipeline's tenants, the longest id any of them has framed:
    /// the predecessor a message names may be another tenant's.
    longest_shared_id: Option<Arc<AtomicUsize>>,
    /// The headers every message carries after its `Content-Type`, built once.
    common_headers: Headers,
    /// The encoding's content type: of every message but a transform's own payload.
    content_type: String,
    /// `heartbeat_publish_ms`, and when the last heartbeat message was framed.
    heartbeat_every: Option<std::time::Duration>,
    last_heartbeat: Option<std::time::Instant>,
    heartbeat_subject: String,
}

impl Framer {
    /// A framer for `pipeline` publishing to a server that accepts `max_payload` bytes;
    /// `longest_id` is the length of the last published message's id, if known.
    pub fn new(
        pipeline: &PipelineConfig,
        max_payload: usize,
        longest_id: usize,
    ) -> Result<Framer, Error> {
        let subjects = SubjectTemplate::parse(
            &pipeline.sink.subject_template,
            &pipeline.sink.subject_prefix,
        )
        .map_err(|message| Error::Sink {
            pipeline: pipeline.id.clone(),
            message,
        })?;
        let mut common_headers = Headers::default();
        common_headers.append("Tidegate-Pipeline", &pipeline.id);
        if let Some(tenant) = &pipeline.tenant {
            common_headers.append("Tidegate-Tenant", &tenant.id);
        }
        Ok(Framer {
            pipeline: pipeline.id.clone(),
            subjects,
            dead_letter_subject: pipeline.dead_letter_subject(),
            encoding: pipeline.sink.encoding,
            formatter: Formatter::new(pipeline.sink.format, pipeline.sink.encoding, &pipeline.id),
            max_payload,
            longest_id,
            longest_shared_id: None,
            common_headers,
            content_type: pipeline.sink.encoding.content_type().to_string(),
            heartbeat_every: (pipeline.heartbeat_publish_ms > 0)
                .then(|| Duration::from_millis(pipeline.heartbeat_publish_ms)),
            last_heartbeat: None,
            heartbeat_subject: format!("{}.heartbeat", pipeline.sink.subject_prefix),
        })
    }

    /// A message's first headers: `Content-Type` (`content_type`, or the encoding's) and the
    /// common ones, with room for the rest.
    fn headers(&self, content_type: Option<&str>) -> Headers {
        let mut headers = Headers::with_capacity(320);
        headers.append("Content-Type", content_type.unwrap_or(&self.content_type));
        headers.extend(&self.common_headers);
        headers
    }

    /// The subject dead letters go to.
    pub fn dead_letter_subject(&self) -> &str {
        &self.dead_letter_subject
    }

    /// A heartbeat message for an idle stream at `token`, if heartbeats are published and
    /// the last one is old enough.
    pub(crate) fn heartbeat(&mut self, token: &ResumeToken) -> Vec<Message> {
        let Some(every) = self.heartbeat_every else {
            return Vec::new();
        };
        if self.last_heartbeat.is_some_and(|at| at.elapsed() < every) {
            return Vec::new();
        }
        self.last_heartbeat = Some(std::time::Instant::now());
        let time = crate::model::token::token_time(token);
        let payload = serde_json::json!({
            "pipeline": self.pipeline,
            "clusterTime": time.map(|t| format!("{}.{}", t.time, t.increment)),
            "at": bson::DateTime::now().try_to_rfc3339_string().ok(),
        });
        let message = Message {
            subject: self.heartbeat_subject.clone(),
            msg_id: format!(
                "{}:{}:heartbeat",
                self.pipeline,
                crate::model::token::token_id(token)
            ),
            headers: self.headers(None),
            payload: payload.to_string().into(),
        };
        match self.accept(message) {
            Ok(message) => vec![message],
            Err(reason) => {
                // Nothing is lost: a heartbeat only says the stream is alive.
                tracing::warn!(pipeline = %self.pipeline, "heartbeat not published: {reason}");
                Vec::new()
            }
        }
    }

    /// The messages for one event's verdict, each one checked with [`Framer::fits`].
    pub fn frame(
        &mut self,
        event: &SourceEvent,
        verdict: Verdict,
        stats: &PipelineStats,
    ) -> EventMessages {
        let framed = |messages| EventMessages {
            messages,
            token: event.token.clone(),
            snapshot: event.snapshot.clone(),
            commit_unix_ms: event.change.commit_unix_ms(),
        };
        let change = &event.change;
        let outputs = match verdict {
            Verdict::DeadLetter(cause) => return framed(self.dead_letter(event, &cause, stats)),
            Verdict::Skip(_) | Verdict::Halt(_) => {
                stats.skipped();
                Vec::new()
            }
            Verdict::OutOfScope => {
                stats.out_of_scope();
                Vec::new()
            }
            Verdict::Publish(outputs) => {
                if outputs.is_empty() {
                    stats.filtered();
                }
                outputs
            }
        };
        let mut messages = Vec::with_capacity(outputs.len());
        for (index, output) in outputs.into_iter().enumerate() {
            let change = output.change.as_ref().unwrap_or(change);
            // A payload a transform made is published as is; otherwise the change is encoded.
            let (bytes, content_type) = match output.payload {
                Some(payload) => (payload.bytes, payload.content_type),
                None => match self.formatter.payload(change) {
                    Ok(payload) => (payload.bytes, payload.content_type),
                    Err((kind, message)) => {
                        let message = format!("output {index}: {message}");
                        let cause = DeadLetterCause::Host { kind, message };
                        return framed(self.dead_letter(event, &cause, stats));
                    }
                },
            };
            let subject = match output.subject {
                Some(subject) => subject,
                None => self.subjects.render(change),
            };
            let mut headers = self.headers(Some(content_type.as_str()));
            routing_headers(&mut headers, change, true);
            for (name, value) in &output.headers {
                headers.append(name, value);
            }
            let message = Message {
                subject,
                msg_id: format!("{}:{}:{index}", self.pipeline, change.id()),
                headers,
                payload: bytes.into(),
            };
            match self.accept(message) {
                Ok(message) => messages.push(message),
                Err(reason) => {
                    let cause = DeadLetterCause::Host {
                        kind: FailureKind::TooLarge,
                        message: format!("output {index}: {reason}"),
                    };
                    return framed(self.dead_letter(event, &cause, stats));
                }
            }
        }
        framed(messages)
    }

    /// An event `oversize = "skip"` stripped on the server: its stub (id, namespace, document
    /// key, times) goes to the dead-letter subject with reason `oversize` and the size in
    /// `Tidegate-Event-Size`; plugins never see it.
    pub(crate) fn oversize(
        &mut self,
        event: &SourceEvent,
        size: i64,
        stats: &PipelineStats,
    ) -> EventMessages {
        let cause = DeadLetterCause::Host {
            kind: FailureKind::Oversize,
            message: format!(
                "the event is {size} bytes, over MongoDB's 16 MiB limit; oversize = \"skip\" \
                 dead-letters this stub of it (id, namespace, document key, cluster time)"
            ),
        };
        let mut messages = self.dead_letter(event, &cause, stats);
        for message in &mut messages {
            message
                .headers
                .insert("Tidegate-Event-Size", &size.to_string());
        }
        EventMessages {
            messages,
            token: event.token.clone(),
            snapshot: event.snapshot.clone(),
            commit_unix_ms: event.change.commit_unix_ms(),
        }
    }

    /// The original event, to the dead-letter subject, with the reason in headers; when that
    /// does not fit, a stub that does ([`Framer::dead_letter_stub`]).
    fn dead_letter(
        &mut self,
        event: &SourceEvent,
        cause: &DeadLetterCause,
        stats: &PipelineStats,
    ) -> Vec<Message> {
        // The host's own reasons are counted and logged with an empty plugin name.
        let plugin = cause.plugin().map_or("", |err| err.plugin.as_str());
        stats.dead_lettered(plugin, cause.kind().as_str());
        tracing::warn!(
            pipeline = %self.pipeline,
            plugin = %plugin,
            kind = %cause.kind(),
            // Plugin-supplied text, escaped (see `telemetry::escape`).
            error = %crate::ops::telemetry::escape(cause.message()),
            event = %crate::ops::telemetry::escape(event.change.id()),
            "event dead-lettered"
        );
        let full = encode::payload(&event.change, self.encoding).map(|payload| {
            self.dead_letter_message(event, cause, payload, HEADER_TEXT_CHARS, true)
        });
        let too_large = match full.map(|message| self.accept(message)) {
            Ok(Ok(message)) => return vec![message],
            Ok(Err(reason)) => reason,
            Err(reason) => format!("the event cannot be encoded: {reason}"),
        };
        self.dead_letter_stub(event, cause, &too_large)
            .into_iter()
            .collect()
    }
}

/// The most characters of one header value taken from an error or other free text.
const HEADER_TEXT_CHARS: usize = 1000;

/// Size accounting: how the NATS server measures a message, and the stub a dead letter is
/// cut down to. Kept apart from the framing above, which only asks [`Framer::fits`].
impl Framer {
    /// Why `message` cannot be published without the server refusing it (and closing the
    /// connection every unit shares), if it cannot: its subject is longer than
    /// [`MAX_SUBJECT_BYTES`], or subject, header block and payload together
    /// ([`Framer::wire_size`]) exceed the server's `max_payload`. nats-server itself counts
    /// only the header block and the payload; counting the subject too leaves JetStream's
    /// stored copy (which holds the subject) room as well.
    pub fn fits(&self, message: &Message) -> Result<(), String> {
        if message.subject.len() > MAX_SUBJECT_BYTES {
            return Err(format!(
                "subject is {} bytes; at most {MAX_SUBJECT_BYTES} are published (the NATS \
                 server closes connections whose protocol lines exceed its max_control_line)",
                message.subject.len()
            ));
        }
        let size = self.wire_size(message);
        if size.total() > self.max_payload {
            return Err(format!(
                "message is {} bytes (subject {}, headers {}, payload {}); the NATS server \
                 accepts at most {} (max_payload)",
                size.total(),
                size.subject,
                size.headers,
                size.payload,
                self.max_payload
            ));
        }
        Ok(())
    }

    /// Frames for a stream shared with other tenants, whose longest message id is
    /// `longest` (see `sink::shared`).
    pub fn share_longest_id(&mut self, longest: Arc<AtomicUsize>) {
        longest.fetch_max(self.longest_id, Ordering::Relaxed);
        self.longest_shared_id = Some(longest);
    }

    /// `message` if it [`fits`](Framer::fits), remembering its id's length for the
    /// `Nats-Expected-Last-Msg-Id` header of the next message.
    fn accept(&mut self, message: Message) -> Result<Message, String> {
        self.fits(&message)?;
        self.longest_id = self.longest_id.max(message.msg_id.len());
        if let Some(shared) = &self.longest_shared_id {
            shared.fetch_max(self.longest_id, Ordering::Relaxed);
        }
        Ok(message)
    }

    /// What `message` weighs on the wire once the publisher adds its `Nats-Msg-Id` and
    /// `Nats-Expected-Last-Msg-Id` headers (the latter's value is the previous message's id,
    /// at most the longest id framed so far or `EXPECTED_ID_ALLOWANCE`).
    pub fn wire_size(&self, message: &Message) -> WireSize {
        let shared = self
            .longest_shared_id
            .as_ref()
            .map_or(0, |shared| shared.load(Ordering::Relaxed));
        let expected_id = self
            .longest_id
            .max(shared)
            .max(message.msg_id.len())
            .max(EXPECTED_ID_ALLOWANCE);
        wire_size(message, expected_id)
    }

    /// A dead letter for `event` with `payload`, the routing headers (`Tidegate-Key` only
    /// `with_key`) and the reason in `Tidegate-*` headers whose free text is cut at
    /// `text_chars` characters.
    fn dead_letter_message(
        &self,
        event: &SourceEvent,
        cause: &DeadLetterCause,
        payload: Vec<u8>,
        text_chars: usize,
        with_key: bool,
    ) -> Message {
        let mut headers = self.headers(None);
        routing_headers(&mut headers, &event.change, with_key);
        headers.append(
            "Tidegate-Error-Kind",
            &header_text(cause.kind().as_str(), text_chars),
        );
        headers.append("Tidegate-Error", &header_text(cause.message(), text_chars));
        if let Some(err) = cause.plugin().filter(|err| !err.plugin.is_empty()) {
            headers.append("Tidegate-Plugin", &header_text(&err.plugin, text_chars));
            headers.append(
                "Tidegate-Plugin-Hash",
                &header_text(&err.plugin_hash, text_chars),
            );
        }
        headers.append(
            "Tidegate-Original-Subject",
            &header_text(&self.subjects.render(&event.change), text_chars),
        );
        Message {
            subject: self.dead_letter_subject.clone(),
            msg_id: format!("{}:{}:dead-letter", self.pipeline, event.change.id()),
            headers,
            payload: payload.into(),
        }
    }

    /// A dead letter cut down to fit `max_payload`: the event without its documents (id,
    /// operation, namespace, document key, cluster and wall time), the error texts cut to
    /// [`STUB_ERROR_CHARS`], and a `Tidegate-Stub` header saying why the whole did not fit.
    /// If the document key alone is too large, it goes too. `None` (logged as an error, the
    /// event skipped) only if even that cannot fit, i.e. the event's id alone is larger than
    /// the server accepts: such an event cannot be published in any form.
    fn dead_letter_stub(
        &mut self,
        event: &SourceEvent,
        cause: &DeadLetterCause,
        too_large: &str,
    ) -> Option<Message> {
        let original = &event.change;
        for keep_key in [true, false] {
            let mut left_out = vec![
                "fullDocument",
                "fullDocumentBeforeChange",
                "updateDescription",
                "lsid",
                "txnNumber",
            ];
            if !keep_key {
                left_out.push("documentKey");
            }
            let payload = original
                .without(&left_out)
                .and_then(|stub| encode::payload(&stub, self.encoding))
                .unwrap_or_default();
            let mut message =
                self.dead_letter_message(event, cause, payload, STUB_ERROR_CHARS, keep_key);
            let what = if keep_key {
                "documents left out"
            } else {
                "documents and document key left out"
            };
            message.headers.insert(
                "Tidegate-Stub",
                &header_text(&format!("{what}: {too_large}"), HEADER_TEXT_CHARS),
            );
            if let Ok(message) = self.accept(message) {
                return Some(message);
            }
        }
        tracing::error!(
            pipeline = %self.pipeline,
            event = %header_text(original.id(), STUB_ERROR_CHARS),
            "event skipped: not even a dead-letter stub of it fits the NATS server's \
             max_payload of {} bytes",
            self.max_payload
        );
        None
    }
}

/// A message's size as the NATS server sees it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireSize {
    /// The subject.
    pub subject: usize,
    /// The header block, including the headers the publisher adds.
    pub headers: usize,
    /// The payload.
    pub payload: usize,
}

/// What `message` weighs on the wire with its `Nats-Msg-Id` and a
/// `Nats-Expected-Last-Msg-Id` of `expected_id` bytes.
pub(crate) fn wire_size(message: &Message, expected_id: usize) -> WireSize {
    WireSize {
        subject: message.subject.len(),
        headers: message.headers.block_bytes()
            + line_bytes("Nats-Msg-Id", message.msg_id.len())
            + line_bytes("Nats-Expected-Last-Msg-Id", expected_id),
        payload: message.payload.len(),
    }
}

impl WireSize {
    /// Everything together.
    pub fn total(&self) -> usize {
        self.subject + self.headers + self.payload
    }
}

/// The longest `Tidegate-Key` value published: a larger key is left out of the headers (the
/// payload still holds it), so a huge `_id` cannot crowd out the message.
pub const MAX_KEY_HEADER_BYTES: usize = 1024;

/// Headers that let consumers route without parsing the payload: `Tidegate-Operation`
/// (MongoDB's `operationType` spelling), `Tidegate-Namespace` (`db.coll`, or `db`),
/// `Tidegate-Key` (the document key's `_id` as relaxed Extended JSON, when the event has one,
/// `with_key` asks for it and its text is at most [`MAX_KEY_HEADER_BYTES`]) and
/// `Tidegate-Cluster-Time` (`<seconds>.<increment>`, when the event has one). Names and
/// namespaces pass through [`header_text`]; the key's JSON escapes CR and LF itself.
fn routing_headers(headers: &mut Headers, change: &Change, with_key: bool) {
    headers.append(
        "Tidegate-Operation",
        &header_text(change.operation().as_str(), HEADER_TEXT_CHARS),
    );
    headers.append(
        "Tidegate-Namespace",
        &header_text(&change.namespace().to_string(), HEADER_TEXT_CHARS),
    );
    let key = key_id(change).and_then(|id| key_json(id).ok());
    if let Some(key) = key.filter(|k| with_key && k.len() <= MAX_KEY_HEADER_BYTES) {
        headers.append("Tidegate-Key", &key);
    }
    if let Some(time) = change.cluster_time() {
        headers.append(
            "Tidegate-Cluster-Time",
            &format!("{}.{}", time.time, time.increment),
        );
    }
}

/// `text` as a header value: control characters (CR, LF…) as spaces, at most `max_chars`.
fn header_text(text: &str, max_chars: usize) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{CallError, Output};

    /// A unit `t` publishing under `cdc`.
    fn pipeline() -> PipelineConfig {
        let mut sink = toml::Table::new();
        sink.insert("stream".into(), "T".into());
        sink.insert("subject_prefix".into(), "cdc".into());
        let mut table = toml::Table::new();
        table.insert("id".into(), "t".into());
        table.insert("mongodb_uri".into(), "mongodb://unused".into());
        table.insert("sink".into(), sink.into());
        table.try_into().expect("pipeline config")
    }

    fn event(change: crate::model::Change) -> SourceEvent {
        SourceEvent {
            token: crate::model::token::token_from_document(bson::doc! { "_data": "82AA" })
                .expect("token"),
            change,
            snapshot: None,
        }
    }

    fn output(subject: Option<String>, headers: Vec<(String, String)>) -> Verdict {
        Verdict::Publish(vec![Output {
            change: None,
            subject,
            headers,
            payload: None,
        }])
    }

    fn kind(message: &Message) -> Option<String> {
        message
            .headers
            .get("Tidegate-Error-Kind")
            .map(str::to_owned)
    }

    /// A change with document key `key` in `shop.orders`, at cluster time 10.2.
    fn keyed(key: bson::RawDocumentBuf) -> crate::model::Change {
        let fields = crate::model::Fields {
            document_key: Some(std::borrow::Cow::Owned(key)),
            cluster_time: Some(bson::Timestamp {
                time: 10,
                increment: 2,
            }),
            ..crate::model::Fields::new(
                "82AA",
                crate::model::Operation::Delete,
                crate::model::Namespace {
                    db: "shop".into(),
                    coll: Some("orders".into()),
                },
            )
        };
        crate::model::Change::from_fields(fields, None).expect("change")
    }

    fn header(message: &Message, name: &str) -> Option<String> {
        message.headers.get(name).map(str::to_owned)
    }

    /// Operation, namespace, key (JSON, CR/LF escaped) and cluster time on every event; a key
    /// too long for a header is left out.
    #[test]
    fn routing_headers_name_the_change() {
        let mut framer = Framer::new(&pipeline(), 64 * 1024, 0).expect("framer");
        let stats = crate::ops::metrics::pipeline("framer-test");
        let change = keyed(bson::rawdoc! { "_id": "a\r\nb" });
        let framed = framer.frame(&event(change), output(None, Vec::new()), &stats);
        let message = &framed.messages[0];
        assert_eq!(
            header(message, "Tidegate-Operation").as_deref(),
            Some("delete")
        );
        assert_eq!(
            header(message, "Tidegate-Namespace").as_deref(),
            Some("shop.orders")
        );
        assert_eq!(
            header(message, "Tidegate-Key").as_deref(),
            Some(r#""a\r\nb""#)
        );
        assert_eq!(
            header(message, "Tidegate-Cluster-Time").as_deref(),
            Some("10.2")
        );
        assert_eq!(
            header(message, "Content-Type").as_deref(),
            Some("application/json; ejson=relaxed")
        );
        let long = keyed(bson::rawdoc! { "_id": "k".repeat(MAX_KEY_HEADER_BYTES) });
        let framed = framer.frame(&event(long), output(None, Vec::new()), &stats);
        assert_eq!(kind(&framed.messages[0]), None);
        assert_eq!(header(&framed.messages[0], "Tidegate-Key"), None);
        assert!(header(&framed.messages[0], "Tidegate-Operation").is_some());
        let probe = framer.frame(
            &event(crate::model::Change::probe()),
            output(None, Vec::new()),
            &stats,
        );
        assert_eq!(
            header(&probe.messages[0], "Tidegate-Key"),
            None,
            "no key, no header"
        );
        assert_eq!(header(&probe.messages[0], "Tidegate-Cluster-Time"), None);
    }

    /// Outputs whose headers, or subject, would make the server drop the connection are
    /// dead-lettered with the sizes; everything framed fits.
    #[test]
    fn oversized_outputs_are_dead_lettered() {
        let max = 64 * 1024;
        let mut framer = Framer::new(&pipeline(), max, 0).expect("framer");
        let stats = crate::ops::metrics::pipeline("framer-test");
        let event = event(crate::model::Change::probe());

        let small = output(None, vec![("X-Ok".into(), "1".into())]);
        let framed = framer.frame(&event, small, &stats);
        assert_eq!(framed.messages.len(), 1);
        assert_eq!(kind(&framed.messages[0]), None);

        // Many headers, each small, together over max_payload on the wire only.
        let flood = (0..200)
            .map(|i| (format!("X-F{i:03}"), "f".repeat(320)))
            .collect::<Vec<_>>();
        let named: usize = flood.iter().map(|(n, v)| n.len() + v.len()).sum();
        assert!(named < max, "names and values alone fit");
        let framed = framer.frame(&event, output(None, flood), &stats);
        assert_eq!(framed.messages.len(), 1);
        let dead = &framed.messages[0];
        assert_eq!(kind(dead).as_deref(), Some("too-large"));
        assert_eq!(dead.subject, "cdc.dead-letter");
        let error = dead.headers.get("Tidegate-Error").expect("error");
        assert!(
            error.contains("accepts at most 65536 (max_payload)"),
            "{error}"
        );

        let long = format!("cdc.{}", "s".repeat(MAX_SUBJECT_BYTES));
        let framed = framer.frame(&event, output(Some(long), Vec::new()), &stats);
        assert_eq!(kind(&framed.messages[0]).as_deref(), Some("too-large"));
        for message in &framed.messages {
            assert!(framer.fits(message).is_ok());
        }
    }

    /// A dead letter too large to send whole becomes a stub that fits, keeping the event's
    /// id, namespace and key and saying what was left out.
    #[test]
    fn oversized_dead_letters_become_stubs() {
        let max = MIN_MAX_PAYLOAD;
        let mut framer = Framer::new(&pipeline(), max, 0).expect("framer");
        let stats = crate::ops::metrics::pipeline("framer-test");
        let key = bson::rawdoc! { "_id": 7 };
        let full = bson::rawdoc! { "_id": 7, "blob": "b".repeat(2 * max) };
        let probe = crate::model::Change::probe();
        let mut fields = crate::model::Fields::new(
            probe.id(),
            probe.operation().clone(),
            probe.namespace().clone(),
        );
        fields.document_key = Some(std::borrow::Cow::Borrowed(&key));
        fields.full_document = Some(std::borrow::Cow::Borrowed(&full));
        let change = crate::model::Change::from_fields(fields, None).expect("change");
        let err = CallError {
            plugin: "p".into(),
            plugin_hash: "sha256:00".into(),
            kind: FailureKind::PluginError,
            message: "e".repeat(5000),
        };
        let cause = DeadLetterCause::Plugin(err);
        let framed = framer.frame(&event(change), Verdict::DeadLetter(cause), &stats);
        assert_eq!(framed.messages.len(), 1);
        let stub = &framed.messages[0];
        assert!(framer.fits(stub).is_ok());
        assert_eq!(kind(stub).as_deref(), Some("plugin-error"));
        let why = stub.headers.get("Tidegate-Stub").expect("stub");
        assert!(why.starts_with("documents left out: message is "), "{why}");
        let error = stub.headers.get("Tidegate-Error").expect("error");
        assert_eq!(error.len(), STUB_ERROR_CHARS);
        let body: serde_json::Value = serde_json::from_slice(&stub.payload).expect("json");
        assert_eq!(body["documentKey"]["_id"], 7);
        assert_eq!(body["ns"]["coll"], "coll");
        assert!(body.get("fullDocument").is_none(), "{body}");
    }
}
