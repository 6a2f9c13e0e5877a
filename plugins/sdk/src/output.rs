//! What a transform hands back: events to publish, with subjects and headers.

use crate::event::Event;

/// An extra NATS header on a published message.
///
/// Names starting with `Nats-` or `Tidegate-` are reserved, names must be printable ASCII
/// without `:`, and values must not contain CR or LF: the host dead-letters an event whose
/// output breaks these rules. [`Header::check`] tests them in the plugin.
///
/// ```
/// use tidegate_plugin::Header;
/// assert!(Header::new("X-Source", "shop").check().is_ok());
/// assert!(Header::new("Nats-Msg-Id", "x").check().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

impl Header {
    /// A header.
    ///
    /// ```
    /// # use tidegate_plugin::Header;
    /// assert_eq!(Header::new("X-A", "1").value, "1");
    /// ```
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Header {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }

    /// The host's rules for headers, checked here so a plugin can report a clear error.
    ///
    /// ```
    /// # use tidegate_plugin::Header;
    /// assert!(Header::new("X-A", "a\nb").check().is_err());
    /// assert!(Header::new("X A", "a").check().is_err());
    /// ```
    pub fn check(&self) -> Result<(), String> {
        let lower = self.name.to_ascii_lowercase();
        if lower.starts_with("nats-") || lower.starts_with("tidegate-") {
            return Err(format!("header '{}' is reserved", self.name));
        }
        let valid_name =
            !self.name.is_empty() && self.name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !valid_name || self.value.contains(['\r', '\n']) {
            return Err(format!(
                "header '{}' has an invalid name or value",
                self.name
            ));
        }
        Ok(())
    }
}

/// One message a transform wants published (and handed to the next plugin in the chain).
///
/// ```
/// use serde_json::json;
/// use tidegate_plugin::{Event, Output};
///
/// let event = Event::insert("shop", "orders", json!({"_id": 1}));
/// let out = Output::new(event).subject("cdc.orders.new").header("X-Region", "eu");
/// assert_eq!(out.subject.as_deref(), Some("cdc.orders.new"));
/// assert_eq!(out.headers[0].name, "X-Region");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// The event to pass on. Its `id` must stay the event's id.
    pub event: Event,
    /// Subject to publish on instead of the pipeline's template; it must lie under the
    /// pipeline's subject prefix. `None`: the template (or an earlier plugin's subject).
    pub subject: Option<String>,
    /// Extra headers.
    pub headers: Vec<Header>,
    /// Bytes to publish instead of the event encoded by the pipeline (see [`Payload`]).
    /// Contract 0.2 only: under `contract-0-1` an output with a payload fails the event.
    pub payload: Option<Payload>,
}

/// A message body the plugin made itself (a protobuf, Avro or CSV record, say), published
/// as is instead of the event encoded by the pipeline's `format` and `encoding`. The event
/// still gives the message its id, subject and `Tidegate-*` headers, and still goes on down
/// the chain; a later transform's payload replaces this one.
///
/// The host dead-letters the event when the content type is not 1 to 256 bytes of printable
/// ASCII, or when the bytes do not fit the plugin's `max_output_bytes` or the NATS server's
/// `max_payload`. [`Payload::check`] tests the content type in the plugin.
///
/// ```
/// use tidegate_plugin::Payload;
/// let p = Payload::new(b"1,ada\n".to_vec(), "text/csv");
/// assert!(p.check().is_ok());
/// assert!(Payload::new(Vec::new(), "").check().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    /// The message body.
    pub bytes: Vec<u8>,
    /// The message's `Content-Type` header.
    pub content_type: String,
}

/// The longest content type the host accepts.
const MAX_CONTENT_TYPE_BYTES: usize = 256;

impl Payload {
    /// A payload of `bytes` with `content_type`.
    pub fn new(bytes: Vec<u8>, content_type: impl Into<String>) -> Payload {
        Payload {
            bytes,
            content_type: content_type.into(),
        }
    }

    /// The host's rule for the content type (1 to 256 bytes of printable ASCII and spaces),
    /// checked here so a plugin can report a clear error.
    ///
    /// ```
    /// # use tidegate_plugin::Payload;
    /// assert!(Payload::new(vec![1], "application/x-protobuf").check().is_ok());
    /// assert!(Payload::new(vec![1], "text/csv\r\nX-A: 1").check().is_err());
    /// ```
    pub fn check(&self) -> Result<(), String> {
        let t = &self.content_type;
        let printable = t.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
        if t.is_empty() || t.len() > MAX_CONTENT_TYPE_BYTES || !printable {
            return Err(format!(
                "payload content type {t:?} must be 1 to {MAX_CONTENT_TYPE_BYTES} bytes of \
                 printable ASCII"
            ));
        }
        Ok(())
    }
}

impl Output {
    /// An output publishing `event` on the pipeline's usual subject, without extra headers.
    ///
    /// ```
    /// # use tidegate_plugin::{Event, Output};
    /// let out = Output::new(Event::delete("a", "b", serde_json::json!(1)));
    /// assert!(out.subject.is_none() && out.headers.is_empty());
    /// ```
    pub fn new(event: Event) -> Output {
        Output {
            event,
            subject: None,
            headers: Vec::new(),
            payload: None,
        }
    }

    /// Publishes on `subject` (see [`subject`] to build one from names).
    ///
    /// ```
    /// # use tidegate_plugin::{Event, Output};
    /// let out = Output::new(Event::delete("a", "b", serde_json::json!(1))).subject("cdc.x");
    /// assert_eq!(out.subject.as_deref(), Some("cdc.x"));
    /// ```
    pub fn subject(mut self, subject: impl Into<String>) -> Output {
        self.subject = Some(subject.into());
        self
    }

    /// Adds a header.
    ///
    /// ```
    /// # use tidegate_plugin::{Event, Output};
    /// let out = Output::new(Event::delete("a", "b", serde_json::json!(1))).header("X-A", "1");
    /// assert_eq!(out.headers.len(), 1);
    /// ```
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Output {
        self.headers.push(Header::new(name, value));
        self
    }

    /// Publishes `bytes` with `content_type` instead of the encoded event (see [`Payload`]).
    ///
    /// ```
    /// # use tidegate_plugin::{Event, Output};
    /// let out = Output::new(Event::delete("a", "b", serde_json::json!(1)))
    ///     .payload(b"1\n".to_vec(), "text/csv");
    /// assert_eq!(out.payload.unwrap().content_type, "text/csv");
    /// ```
    pub fn payload(mut self, bytes: Vec<u8>, content_type: impl Into<String>) -> Output {
        self.payload = Some(Payload::new(bytes, content_type));
        self
    }
}

/// A NATS subject from `tokens`, joined by `.`. Characters NATS gives a meaning to (`.`, `*`,
/// `>`) and blanks inside a token become `_`, and empty tokens become `_`, so names from data
/// (a collection, a tenant id) cannot split or widen the subject — the same rule as the host's
/// subject template.
///
/// ```
/// use tidegate_plugin::subject;
/// assert_eq!(subject(&["cdc", "shop", "system.views"]), "cdc.shop.system_views");
/// assert_eq!(subject(&["cdc", "a b*", ""]), "cdc.a_b_._");
/// ```
pub fn subject(tokens: &[&str]) -> String {
    tokens
        .iter()
        .map(|t| {
            if t.is_empty() {
                "_".to_owned()
            } else {
                t.chars()
                    .map(|c| {
                        if matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control() {
                            '_'
                        } else {
                            c
                        }
                    })
                    .collect()
            }
        })
        .collect::<Vec<String>>()
        .join(".")
}
