//! Where a pipeline starts reading: a fresh pipeline's first position (saved before anything
//! is published, so that a crash cannot restart elsewhere), what a restart resumes or
//! snapshots first, what happens when the oplog no longer holds the checkpoint, and the
//! start-up check that the document images the config asks for can work.

use bson::doc;
use mongodb::change_stream::event::ResumeToken;
use tokio::sync::watch;

use crate::config::{
    parse_start_at, parse_token, FullDocument, FullDocumentBeforeChange, HistoryLostPolicy,
    PipelineConfig, SnapshotMode, StartAt,
};
use crate::error::Error;
use crate::model::token::{token_from_document, token_time};
use crate::model::{Position, SnapshotProgress};
use crate::source::errors::{retry_later, FATAL_CODES, HISTORY_LOST, MIN_BACKOFF};
use crate::source::open::{open, OpenAt};
use crate::source::snapshot::{begin_snapshot, SnapshotPlan};

/// Where a pipeline without a checkpoint opens its stream.
pub(crate) fn first_start(pipeline: &PipelineConfig) -> Result<OpenAt, Error> {
    let invalid = |message: String| Error::Source {
        pipeline: pipeline.id.clone(),
        message,
    };
    if let Some(text) = &pipeline.start_after_token {
        let token = parse_token(text)
            .and_then(token_from_document)
            .map_err(|e| invalid(format!("start_after_token: {e}")))?;
        return Ok(OpenAt::StartAfter(token));
    }
    Ok(match &pipeline.start_at {
        None => OpenAt::Now,
        Some(text) => match parse_start_at(text).map_err(invalid)? {
            StartAt::Now => OpenAt::Now,
            StartAt::ClusterTime(time) => OpenAt::AtTime(time),
        },
    })
}

/// A new start that must be saved before anything is published, so that a crash cannot
/// restart somewhere else: for a pipeline without a `checkpoint`, the stream's position now
/// (`start_at = "now"`) or the captured start and empty progress of its snapshot; with a
/// plain checkpoint and `snapshot = "always"`, the new snapshot's. `None` when the start is
/// already fixed (a checkpoint, an explicit `start_at` time or `start_after_token`), or when
/// shut down while retrying.
pub async fn first_position(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    checkpoint: Option<&Position>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Position>, Error> {
    let snapshot = match checkpoint {
        None => pipeline.snapshot != SnapshotMode::Never,
        Some(saved) => pipeline.snapshot == SnapshotMode::Always && saved.snapshot.is_none(),
    };
    if !snapshot && (checkpoint.is_some() || !matches!(first_start(pipeline)?, OpenAt::Now)) {
        return Ok(None);
    }
    let mut backoff = MIN_BACKOFF;
    loop {
        let resolved = match snapshot {
            true => begin_snapshot(client, pipeline)
                .await
                .map(|progress| Position {
                    token: progress.start.clone(),
                    last_msg_id: None,
                    snapshot: Some(SnapshotProgress::Initial(Box::new(progress))),
                }),
            false => open_position(client, pipeline, &OpenAt::Now)
                .await
                .map(|token| Position {
                    token,
                    last_msg_id: None,
                    snapshot: None,
                }),
        };
        match resolved {
            Ok(position) => return Ok(Some(position)),
            Err(err) => {
                let what = "cannot resolve the start position; retrying";
                if retry_later(pipeline, what, err, &mut backoff, shutdown).await? {
                    return Ok(None);
                }
            }
        }
    }
}

/// The position a stream opened at `at` starts from: the token of its (empty) first batch.
pub(crate) async fn open_position(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    at: &OpenAt,
) -> Result<ResumeToken, mongodb::error::Error> {
    let mut stream = open(client, pipeline, at).await?;
    // The server returns the position with the (empty) first batch; an event arriving in
    // between would carry its own token, which lies after it: refuse that and retry.
    match stream.resume_token() {
        Some(token) => Ok(token),
        None => match stream.next_if_any().await? {
            None => stream.resume_token().ok_or_else(|| {
                mongodb::error::Error::from(std::io::Error::other(
                    "the server gave no starting position",
                ))
            }),
            Some(_) => Err(mongodb::error::Error::from(std::io::Error::other(
                "a change arrived while the starting position was being captured",
            ))),
        },
    }
}

/// Applies `on_history_lost` when the stream cannot resume from `start`: `latest` reopens
/// from now (the only way on); `resnapshot` (or `snapshot = "when-needed"`) asks for a new
/// snapshot (`None`); `fail` is an error naming the checkpoint's time and the oplog's
/// oldest entry.
pub(crate) async fn history_lost(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    start: &OpenAt,
    err: mongodb::error::Error,
) -> Result<Option<OpenAt>, Error> {
    let wanted = match start {
        OpenAt::ResumeAfter(token) | OpenAt::StartAfter(token) => token_time(token),
        OpenAt::AtTime(time) => Some(*time),
        OpenAt::Now => None,
    };
    let oldest = crate::ops::oplog::ends(client)
        .await
        .ok()
        .map(|(first, _)| first);
    let describe = |t: Option<bson::Timestamp>| match t {
        Some(t) => format!(
            "{} ({}.{})",
            bson::DateTime::from_millis(i64::from(t.time) * 1000),
            t.time,
            t.increment
        ),
        None => "unknown".to_string(),
    };
    let detail = format!(
        "the stream needed cluster time {}, the oldest oplog entry is {}",
        describe(wanted),
        describe(oldest)
    );
    let policy = match pipeline.snapshot {
        SnapshotMode::WhenNeeded => HistoryLostPolicy::Resnapshot,
        _ => pipeline.on_history_lost,
    };
    match policy {
        HistoryLostPolicy::Resnapshot => {
            tracing::error!(
                pipeline = %pipeline.id,
                "history lost: {detail}; taking a new snapshot, then streaming from where it \
                 began (changes in between are covered by the documents' current state)"
            );
            Ok(None)
        }
        HistoryLostPolicy::Latest => {
            tracing::error!(
                pipeline = %pipeline.id,
                "history lost: {detail}; on_history_lost = \"latest\", so capture resumes from \
                 now and the events in between are NOT published"
            );
            Ok(Some(OpenAt::Now))
        }
        HistoryLostPolicy::Fail => Err(Error::Source {
            pipeline: pipeline.id.clone(),
            message: format!(
                "{}; {detail}: {err}",
                FATAL_CODES
                    .iter()
                    .find(|(code, _)| *code == HISTORY_LOST)
                    .map(|(_, reason)| *reason)
                    .unwrap_or("history lost")
            ),
        }),
    }
}

/// Checks at start that `required` document images can work: the server is 6.0 or newer and
/// every listed collection records pre- and post-images. Without this the stream would fail
/// on the first event lacking an image, far from the cause.
pub async fn check_images(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
) -> Result<(), Error> {
    let needs_after = pipeline.full_document == FullDocument::Required;
    let needs_before = pipeline.full_document_before_change == FullDocumentBeforeChange::Required;
    let uses_images = needs_after
        || needs_before
        || pipeline.full_document == FullDocument::WhenAvailable
        || pipeline.full_document_before_change == FullDocumentBeforeChange::WhenAvailable;
    if !uses_images {
        return Ok(());
    }
    let fail = |message: String| Error::Source {
        pipeline: pipeline.id.clone(),
        message,
    };
    let info = match client
        .database("admin")
        .run_command(doc! { "buildInfo": 1 })
        .await
    {
        Ok(info) => info,
        Err(err) => {
            // Unreachable now (it may come up later, and the stream retries): check nothing
            // rather than fail a pipeline that would otherwise wait for the server.
            tracing::warn!(pipeline = %pipeline.id, error = %err, "cannot check document-image support now");
            return Ok(());
        }
    };
    let major = info
        .get_str("version")
        .ok()
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(0);
    if major < 6 {
        return Err(fail(format!(
            "document images (full_document = when-available/required, \
             full_document_before_change) need MongoDB 6.0 or newer; this server is {}",
            info.get_str("version").unwrap_or("older")
        )));
    }
    if !(needs_after || needs_before) {
        return Ok(());
    }
    let listed: Vec<(&String, &String)> = match &pipeline.database {
        _ if !pipeline.collection_list.is_empty() => {
            pipeline.collection_list.namespaces().collect()
        }
        Some(db) => pipeline.collections.iter().map(|coll| (db, coll)).collect(),
        None => return Ok(()),
    };
    for (db, coll) in listed {
        let mut found = client
            .database(db)
            .list_collections()
            .filter(doc! { "name": coll })
            .await
            .map_err(|e| fail(format!("cannot list collections of {db}: {e}")))?;
        let spec = futures::StreamExt::next(&mut found).await;
        let enabled = match spec {
            Some(Ok(spec)) => spec
                .options
                .change_stream_pre_and_post_images
                .is_some_and(|o| o.enabled),
            _ => false,
        };
        if !enabled {
            return Err(fail(format!(
                "`required` document images need changeStreamPreAndPostImages on {db}.{coll}, \
                 which is off (or the collection does not exist); enable it with \
                 db.runCommand({{collMod: \"{coll}\", changeStreamPreAndPostImages: {{enabled: true}}}}) \
                 or use when-available"
            )));
        }
    }
    Ok(())
}

/// Where [`crate::source::run`] opens the stream first, and the snapshot to take before: the
/// checkpoint's position (finishing the snapshot it was in, unless that is the running
/// `incremental` one, which goes on beside the stream), or for a pipeline without one
/// `at_time` or the config's start (with a first snapshot unless `snapshot = "never"`).
pub(crate) fn plan_start(
    pipeline: &PipelineConfig,
    checkpoint: Option<Position>,
    at_time: Option<bson::Timestamp>,
    incremental: bool,
) -> Result<(OpenAt, Option<SnapshotPlan>), Error> {
    Ok(match checkpoint {
        Some(Position { token, .. }) if incremental => (OpenAt::ResumeAfter(token), None),
        Some(Position {
            token,
            snapshot: Some(SnapshotProgress::Initial(progress)),
            ..
        }) => (
            OpenAt::ResumeAfter(token),
            Some(SnapshotPlan::Resume(*progress)),
        ),
        Some(Position {
            snapshot: Some(SnapshotProgress::Incremental(_)),
            ..
        }) => {
            // Its watermarks are written to, and read back from, the signal collection.
            return Err(Error::Source {
                pipeline: pipeline.id.clone(),
                message: "the checkpoint holds a running incremental snapshot, which needs \
                          signal_collection; set it again, or delete the checkpoint"
                    .into(),
            });
        }
        Some(Position { token, .. }) => (
            OpenAt::ResumeAfter(token),
            (pipeline.snapshot == SnapshotMode::Always).then_some(SnapshotPlan::New),
        ),
        None => match at_time {
            Some(time) => (OpenAt::AtTime(time), None),
            None => (
                first_start(pipeline)?,
                (pipeline.snapshot != SnapshotMode::Never).then_some(SnapshotPlan::New),
            ),
        },
    })
}
