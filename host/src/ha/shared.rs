//! One lease for a pipeline whose tenants share a change stream: `lease.<pipeline>` is held
//! on behalf of all its tenant units, so the instance that owns the pipeline runs its shared
//! reader and every tenant, and a standby runs none of them. Tenants started at run time
//! join whatever term is under way.
//!
//! A term is published on a watch channel: its [`Fence`], its stop signal, and a token each
//! tenant run holds while it writes, so the term (and the lease) ends only once every tenant
//! has drained.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::fence::Fence;
use super::lease::Coordinator;
use crate::error::Error;

/// The pipelines' shared leases, by pipeline id.
pub(crate) type SharedLeases = HashMap<String, watch::Receiver<Option<SharedTerm>>>;

/// One term of ownership of a pipeline, shared by its tenants.
#[derive(Clone, Debug)]
pub struct SharedTerm {
    /// Fences every tenant's writes.
    pub fence: Fence,
    /// Turns true when the term ends (lease lost or handed over, or shutdown).
    pub stop: watch::Receiver<bool>,
    /// Held by each tenant run of the term; the term ends once all are dropped.
    pub running: mpsc::Sender<()>,
}

impl Coordinator {
    /// The terms of pipeline `pipeline`'s shared lease, its lease task started on first use
    /// (it runs until `shutdown`).
    pub fn shared_terms(
        self: &Arc<Self>,
        pipeline: &str,
        shutdown: watch::Receiver<bool>,
    ) -> watch::Receiver<Option<SharedTerm>> {
        let mut leases = self
            .shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(terms) = leases.get(pipeline) {
            return terms.clone();
        }
        let (publish, terms) = watch::channel(None);
        let publish = Arc::new(publish);
        let term = move |fence: Fence, stop: watch::Receiver<bool>| {
            share_term(publish.clone(), fence, stop)
        };
        tokio::spawn(self.clone().run_unit(pipeline.to_string(), shutdown, term));
        leases.insert(pipeline.to_string(), terms.clone());
        terms
    }
}

/// Publishes one term to the tenants and ends it once stopped (by shutdown, a hand-over, or
/// its fence lost: see `Coordinator::hold`) and every tenant has drained.
async fn share_term(
    publish: Arc<watch::Sender<Option<SharedTerm>>>,
    fence: Fence,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let (running, mut drained) = mpsc::channel(1);
    publish.send_replace(Some(SharedTerm {
        fence,
        stop: stop.clone(),
        running,
    }));
    let _ = stop.wait_for(|stop| *stop).await;
    // Dropping the published term leaves only the tenant runs' tokens.
    publish.send_replace(None);
    let _ = drained.recv().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::{timeout, Instant};

    use super::*;

    /// A stopped term (shutdown, a hand-over, or its fence lost, all of which the lease keeper
    /// turns into a stop) stops every tenant and ends only once the last has drained, with
    /// the term withdrawn.
    #[tokio::test]
    async fn a_stopped_term_stops_the_tenants_and_ends_once_they_drain() {
        let ceiling = Duration::from_secs(10);
        let (publish, mut terms) = watch::channel(None);
        let (stop_term, stop) = watch::channel(false);
        let fence = Fence::leased(Instant::now() + Duration::from_secs(600));
        let term = tokio::spawn(share_term(Arc::new(publish), fence, stop));
        let tenant = terms
            .wait_for(Option::is_some)
            .await
            .expect("published")
            .clone()
            .expect("a term");
        stop_term.send_replace(true);
        let mut tenant_stop = tenant.stop.clone();
        timeout(ceiling, tenant_stop.wait_for(|stop| *stop))
            .await
            .expect("the tenants are stopped")
            .expect("the term's stop");
        tokio::task::yield_now().await;
        assert!(!term.is_finished(), "the term waits for its tenants");
        drop(tenant);
        let ended = timeout(ceiling, term)
            .await
            .expect("the term ends once its tenants have")
            .expect("joined");
        assert!(ended.is_ok(), "{ended:?}");
        assert!(terms.borrow().is_none(), "the term is withdrawn");
    }
}
