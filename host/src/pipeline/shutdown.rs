//! The end of a run: the drain deadline, the last checkpoint, and the stages joined.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Error;

/// The shutdown timeout of one run, shared between the drain (raced against it) and the final
/// checkpoint save (given what is left of it).
pub(super) struct Deadline {
    timeout: Duration,
    /// When the drain must be over, known once shutdown was asked for.
    stop_by: Arc<OnceLock<Instant>>,
}

impl Deadline {
    pub(super) fn new(timeout: Duration) -> Deadline {
        Deadline {
            timeout,
            stop_by: Arc::new(OnceLock::new()),
        }
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Resolves `timeout` after `shutdown` turns true (never, if it never does), recording the
    /// deadline as soon as it is known.
    pub(super) fn passed(
        &self,
        mut shutdown: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> {
        let (timeout, stop_by) = (self.timeout, self.stop_by.clone());
        async move {
            if shutdown.wait_for(|stop| *stop).await.is_err() {
                return std::future::pending().await;
            }
            let at = *stop_by.get_or_init(|| Instant::now() + timeout);
            tokio::time::sleep_until(at).await;
        }
    }

    /// Waits for the checkpoint saver's last write. The final save gets what is left of the
    /// shutdown timeout (all of it when stopping for another reason); a store that does not
    /// answer by then is abandoned: the checkpoint stays where it was, and the rest is
    /// replayed.
    pub(super) async fn await_last_save(&self, saver: tokio::task::JoinHandle<()>, id: &str) {
        let save_within = self.stop_by.get().map_or(self.timeout, |at: &Instant| {
            at.saturating_duration_since(Instant::now())
        });
        if tokio::time::timeout(save_within.max(Duration::from_secs(1)), saver)
            .await
            .is_err()
        {
            tracing::error!(pipeline = %id, "final checkpoint not saved in time; the restart re-reads from the previous one");
        }
    }
}

/// Waits for the source task and the chain stage, and settles the run's outcome: the
/// drain's own error first, then the chain's, then the source's.
pub(super) async fn join_stages(
    id: &str,
    mut outcome: Result<(), Error>,
    source_task: super::SourceTask,
    chain_stage: tokio::task::JoinHandle<Result<(), Error>>,
) -> Result<(), Error> {
    // The loop ends once the chain's input closed, i.e. once the source task returned: by
    // shutdown, or with a fatal error that everything read before it was published ahead of.
    // (When fenced, the source is still stopping: await it before the chain stage.)
    if outcome.is_err() {
        // Stopping early: the source may be waiting on a server; it holds nothing to save.
        source_task.abort();
    }
    let source_result = match source_task.await {
        Ok(result) => result,
        Err(err) if err.is_cancelled() => Ok(()),
        Err(err) => Err(Error::Source {
            pipeline: id.to_string(),
            message: format!("source task failed: {err}"),
        }),
    };
    // Everything the chain stage handed over was published and checkpointed above; what
    // it held is replayed on restart.
    let chain_result = match chain_stage.await {
        Ok(result) => result,
        Err(err) => Err(Error::Sink {
            pipeline: id.to_string(),
            message: format!("chain stage failed (a tidegate bug): {err}"),
        }),
    };
    if outcome.is_ok() {
        outcome = chain_result;
    }
    outcome.and(source_result)
}
