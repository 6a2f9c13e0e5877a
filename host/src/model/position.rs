//! How far a pipeline is durably published: what the checkpoint stores and a restart resumes
//! from.

use mongodb::change_stream::event::ResumeToken;

/// How far the pipeline is durably published.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    /// Resume after this token.
    pub token: ResumeToken,
    /// The last message id the stream acknowledged, if any: the predecessor for the next
    /// `Nats-Expected-Last-Msg-Id`.
    pub last_msg_id: Option<String>,
    /// While a snapshot runs, how far it has come (see `snapshot::Progress`).
    pub snapshot: Option<bson::Document>,
}
