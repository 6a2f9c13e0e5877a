//! What the source does with a signal (parsed by [`crate::source::signal`]): start, stop,
//! pause or resume a snapshot, log a line, or, for this unit's own watermarks, publish the
//! chunk an incremental snapshot read between them. A signal that cannot be acted on is
//! refused with a WARN line and counted, never an error: a typo in a signal document must
//! not stop capture.

use bson::Document;
use mongodb::error::ErrorKind;

use super::{check_filter, match_patterns, requested_namespaces, Incremental};
use crate::config::PipelineConfig;
use crate::model::token::token_id;
use crate::model::{InitialProgress, Namespace, Operation, SourceEvent};
use crate::source::open::namespace_filter;
use crate::source::signal::{Signal, SnapshotKind, SnapshotRequest};
use crate::source::SourceItem;

/// What the stream does after a signal.
pub(crate) enum AfterSignal {
    /// Goes on.
    Stream,
    /// Pauses for a blocking snapshot, then reopens after the signal.
    Block(Box<InitialProgress>),
}

/// Acts on one signal-collection event: a Debezium signal, or one of this unit's watermarks
/// (at its closing watermark, the chunk's remaining documents are queued and the next chunk
/// starts). Every signal is counted; one that cannot be acted on is logged at WARN with the
/// reason. `Err` only for a failure worth retrying (the server).
pub(crate) async fn on_signal(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    collection: &mongodb::Collection<Document>,
    event: &SourceEvent,
    incremental: &mut Option<Incremental>,
    batch: &mut Vec<SourceItem>,
) -> Result<AfterSignal, mongodb::error::Error> {
    let id = pipeline.id.as_str();
    // Only inserted documents are signals (updates and deletes of them are not).
    let (Operation::Insert, Some(raw)) = (event.change.operation(), event.change.full_document())
    else {
        return Ok(AfterSignal::Stream);
    };
    let document = match Document::try_from(raw) {
        Ok(document) => document,
        Err(err) => {
            tracing::warn!(pipeline = id, "signal refused: unreadable document: {err}");
            crate::ops::metrics::count_signal(id, "invalid");
            return Ok(AfterSignal::Stream);
        }
    };
    let signal = Acting {
        client,
        pipeline,
        collection,
        event,
        document: &document,
    };
    match Signal::parse(&document) {
        Signal::Watermark { open, window, unit } if unit == id => {
            signal.watermark(open, &window, incremental, batch).await?
        }
        Signal::Watermark { .. } => {}
        Signal::Invalid(reason) => signal.refused("invalid", &reason),
        Signal::Log(message) => {
            let at = token_id(&event.token);
            tracing::info!(pipeline = id, "signal log: {}", message.replace("{}", &at));
            crate::ops::metrics::count_signal(id, "accepted");
        }
        Signal::Execute(_) if incremental.is_some() => signal.refused(
            "refused",
            "an incremental snapshot is already running; stop it first (stop-snapshot) or \
             wait for it to finish",
        ),
        Signal::Execute(request) => return signal.execute(&request, incremental).await,
        Signal::Stop {
            kind: SnapshotKind::Blocking,
            ..
        } => signal.refused(
            "refused",
            "a blocking snapshot holds the stream while it runs (no signal is read until it \
             is done), so there is none to stop; stop-snapshot applies to incremental ones",
        ),
        Signal::Stop { patterns, .. } => signal.stop(&patterns, incremental).await?,
        Signal::Pause => signal.pause(incremental),
        Signal::Resume => signal.resume(incremental).await?,
    }
    Ok(AfterSignal::Stream)
}

/// A signal being acted on, with what its handlers need to act and to report.
struct Acting<'a> {
    client: &'a mongodb::Client,
    pipeline: &'a PipelineConfig,
    /// The signal collection, where an incremental snapshot writes its watermarks.
    collection: &'a mongodb::Collection<Document>,
    event: &'a SourceEvent,
    /// The signal as written, for log lines.
    document: &'a Document,
}

impl Acting<'_> {
    fn id(&self) -> &str {
        &self.pipeline.id
    }

    /// Logs and counts a signal not acted on.
    fn refused(&self, outcome: &'static str, reason: &str) {
        tracing::warn!(pipeline = self.id(), signal = %self.document, "signal refused: {reason}");
        crate::ops::metrics::count_signal(self.id(), outcome);
    }

    /// Logs and counts a signal acted on.
    fn accepted(&self, what: &str) {
        tracing::info!(pipeline = self.id(), signal = %self.document, "{what}");
        crate::ops::metrics::count_signal(self.id(), "accepted");
    }

    /// Starts the running snapshot's next chunk, ending the snapshot when nothing is left.
    async fn next_chunk(
        &self,
        incremental: &mut Option<Incremental>,
    ) -> Result<(), mongodb::error::Error> {
        if let Some(running) = incremental.as_mut() {
            if !running
                .next_chunk(self.client, self.pipeline.snapshot_chunk_size)
                .await?
            {
                *incremental = finished(self.id(), incremental.take());
            }
        }
        Ok(())
    }

    /// One of this unit's watermarks: at a window's close, queues the chunk's remaining
    /// documents and starts the next chunk (unless paused).
    async fn watermark(
        &self,
        open: bool,
        window: &str,
        incremental: &mut Option<Incremental>,
        batch: &mut Vec<SourceItem>,
    ) -> Result<(), mongodb::error::Error> {
        let id = self.id();
        let Some(running) = incremental.as_mut() else {
            return Ok(());
        };
        let Some(chunk) = running.saw_watermark(open, window, &self.event.token)? else {
            return Ok(());
        };
        tracing::info!(
            pipeline = id,
            read = chunk.len(),
            done = running.done(),
            "incremental snapshot chunk"
        );
        crate::ops::metrics::pipeline(id).snapshot_read(chunk.len());
        let total = running.estimate(self.client).await;
        crate::ops::telemetry::snapshot_progress(id, running.done(), total);
        batch.extend(chunk.into_iter().map(|e| SourceItem::Event(Box::new(e))));
        if running.is_paused() {
            tracing::info!(pipeline = id, "incremental snapshot paused after its chunk");
            return Ok(());
        }
        self.next_chunk(incremental).await
    }

    /// `execute-snapshot`: a blocking snapshot pauses the stream (the caller runs it); an
    /// incremental one starts its first chunk here.
    async fn execute(
        &self,
        request: &SnapshotRequest,
        incremental: &mut Option<Incremental>,
    ) -> Result<AfterSignal, mongodb::error::Error> {
        let (namespaces, filters) = match plan_snapshot(self.client, self.pipeline, request).await?
        {
            Ok(planned) => planned,
            Err((outcome, reason)) => {
                self.refused(outcome, &reason);
                return Ok(AfterSignal::Stream);
            }
        };
        let names: Vec<String> = namespaces.iter().map(ToString::to_string).collect();
        if request.kind == SnapshotKind::Blocking {
            self.accepted(&format!(
                "blocking snapshot started by a signal: [{}]",
                names.join(", ")
            ));
            return Ok(AfterSignal::Block(Box::new(InitialProgress {
                start: self.event.token.clone(),
                namespaces,
                index: 0,
                last_id: None,
                done: 0,
                filters,
            })));
        }
        self.accepted(&format!(
            "incremental snapshot started by a signal: [{}]",
            names.join(", ")
        ));
        let mut running = Incremental::new(
            format!("i{}", token_id(&self.event.token)),
            self.id(),
            self.collection.clone(),
            namespaces,
            filters,
        );
        // Only a snapshot whose first chunk started is kept: after a failure the signal is
        // read again and starts it anew.
        *incremental = match running
            .next_chunk(self.client, self.pipeline.snapshot_chunk_size)
            .await?
        {
            true => Some(running),
            false => finished(self.id(), Some(running)),
        };
        Ok(AfterSignal::Stream)
    }

    /// `stop-snapshot` of the running incremental snapshot: all of it, or the collections
    /// its `patterns` match.
    async fn stop(
        &self,
        patterns: &[String],
        incremental: &mut Option<Incremental>,
    ) -> Result<(), mongodb::error::Error> {
        let Some(running) = incremental.as_mut() else {
            self.refused("refused", "no incremental snapshot is running");
            return Ok(());
        };
        if patterns.is_empty() {
            let done = running.done();
            *incremental = None;
            self.accepted(&format!(
                "incremental snapshot stopped by a signal after {done} documents"
            ));
            return Ok(());
        }
        let Some(removed) = self.matched_remaining(running, patterns).await? else {
            return Ok(());
        };
        let names: Vec<String> = removed.iter().map(ToString::to_string).collect();
        self.accepted(&format!(
            "incremental snapshot: [{}] removed by a stop-snapshot signal",
            names.join(", ")
        ));
        if running.remove(&removed) {
            self.next_chunk(incremental).await?;
        }
        Ok(())
    }

    /// The namespaces still to read that `patterns` match; `None` (the signal refused) when
    /// they match none or are invalid.
    async fn matched_remaining(
        &self,
        running: &Incremental,
        patterns: &[String],
    ) -> Result<Option<Vec<Namespace>>, mongodb::error::Error> {
        let matched = match match_patterns(self.client, running.remaining(), patterns).await {
            Ok(matched) => matched,
            Err(err) => {
                let reason = input_error(err)?;
                self.refused("invalid", &format!("data-collections: {reason}"));
                return Ok(None);
            }
        };
        if matched.namespaces.is_empty() {
            let remaining: Vec<String> = running
                .remaining()
                .iter()
                .map(ToString::to_string)
                .collect();
            self.refused(
                "refused",
                &format!(
                    "none of its data-collections is still to be read by the running \
                     snapshot (remaining: [{}])",
                    remaining.join(", ")
                ),
            );
            return Ok(None);
        }
        Ok(Some(matched.namespaces))
    }

    /// `pause-snapshot`: the running incremental snapshot starts no new chunk.
    fn pause(&self, incremental: &mut Option<Incremental>) {
        match incremental.as_mut() {
            None => self.refused("refused", "no incremental snapshot is running"),
            Some(running) if running.is_paused() => self.refused("refused", "already paused"),
            Some(running) => {
                running.set_paused(true);
                self.accepted("incremental snapshot paused by a signal");
            }
        }
    }

    /// `resume-snapshot`: a paused incremental snapshot goes on with its next chunk.
    async fn resume(
        &self,
        incremental: &mut Option<Incremental>,
    ) -> Result<(), mongodb::error::Error> {
        match incremental.as_mut() {
            None => self.refused("refused", "no incremental snapshot is running"),
            Some(running) if !running.is_paused() => self.refused("refused", "it is not paused"),
            Some(running) => {
                running.set_paused(false);
                self.accepted("incremental snapshot resumed by a signal");
                if !running.in_window() {
                    self.next_chunk(incremental).await?;
                }
            }
        }
        Ok(())
    }
}

/// A snapshot plan refused: the outcome to count (`refused`, `invalid`) and the reason.
type Refusal = (&'static str, String);

/// The namespaces an `execute-snapshot` request names (its `data-collections` matched
/// against the pipeline's scope) and each one's filter (its `additional-conditions`,
/// checked by the server). The inner `Err` refuses the signal; the outer is worth retrying.
async fn plan_snapshot(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    request: &SnapshotRequest,
) -> Result<Result<(Vec<Namespace>, Vec<Document>), Refusal>, mongodb::error::Error> {
    let id = pipeline.id.as_str();
    let matched = match requested_namespaces(
        client,
        pipeline,
        namespace_filter(pipeline),
        &request.patterns,
    )
    .await
    {
        Ok(matched) => matched,
        Err(err) => {
            return input_error(err)
                .map(|reason| Err(("invalid", format!("data-collections: {reason}"))))
        }
    };
    let unmatched: Vec<&String> = matched
        .unmatched
        .iter()
        .filter_map(|i| request.requested.get(*i))
        .collect();
    if matched.namespaces.is_empty() {
        return Ok(Err((
            "refused",
            format!(
                "no collection in this pipeline's scope matches data-collections {:?} \
                 (names are matched whole, as `db.coll`, or as regular expressions)",
                request.requested
            ),
        )));
    }
    if !unmatched.is_empty() {
        tracing::warn!(
            pipeline = id,
            ?unmatched,
            "execute-snapshot: these data-collections match no collection in this pipeline's \
             scope and are skipped; the others are snapshotted"
        );
    }
    let mut filters = vec![Document::new(); matched.namespaces.len()];
    for (name, filter) in &request.conditions {
        let Some(at) = matched
            .namespaces
            .iter()
            .position(|ns| ns.to_string() == *name)
        else {
            let names: Vec<String> = matched.namespaces.iter().map(ToString::to_string).collect();
            return Ok(Err((
                "refused",
                format!(
                    "additional-conditions names {name}, which is not among the collections to \
                     snapshot [{}]",
                    names.join(", ")
                ),
            )));
        };
        if let Err(err) = check_filter(client, &matched.namespaces[at], filter).await {
            return input_error(err).map(|reason| {
                Err((
                    "invalid",
                    format!("the filter {filter} for {name} is refused by the server: {reason}"),
                ))
            });
        }
        filters[at] = filter.clone();
    }
    Ok(Ok((matched.namespaces, filters)))
}

/// A server error caused by what a signal asked (a bad regular expression or query) as its
/// readable reason; any other error is returned to be retried.
fn input_error(err: mongodb::error::Error) -> Result<String, mongodb::error::Error> {
    match err.kind.as_ref() {
        ErrorKind::Command(command)
            if matches!(command.code, 2 | 9 | 14 | 51091 | 51108 | 51109)
                || command.message.contains("regular expression") =>
        {
            Ok(command.message.clone())
        }
        _ => Err(err),
    }
}

/// Logs the end of an incremental snapshot; returns `None` for the caller's state.
pub(crate) fn finished(pipeline: &str, done: Option<Incremental>) -> Option<Incremental> {
    if let Some(done) = done {
        tracing::info!(
            pipeline,
            documents = done.done(),
            "incremental snapshot done"
        );
    }
    None
}
