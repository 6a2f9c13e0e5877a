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
        let id = pipeline.to_string();
        let term = move |fence: Fence, stop: watch::Receiver<bool>| {
            share_term(publish.clone(), id.clone(), fence, stop)
        };
        tokio::spawn(self.clone().run_unit(pipeline.to_string(), shutdown, term));
        leases.insert(pipeline.to_string(), terms.clone());
        terms
    }
}

/// Publishes one term to the tenants and ends it once every tenant has drained: when the
/// lease keeper stops it (`Ok`), or when its fence is lost (`Error::Fenced`, which sends the
/// keeper back to standby, as a unit under a lease of its own does when its writes are
/// fenced). Without the second way out, an instance suspended past its lease would find its
/// tenants fenced on waking and stay in the term for good: never standing by again, so never
/// taking the pipeline back, and never saying it lost the lease.
async fn share_term(
    publish: Arc<watch::Sender<Option<SharedTerm>>>,
    pipeline: String,
    fence: Fence,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let (running, mut drained) = mpsc::channel(1);
    // The tenants' stop: the keeper's, or the fence lost (a tenant idle or held notices).
    let (term_stop, tenants_stop) = watch::channel(false);
    publish.send_replace(Some(SharedTerm {
        fence: fence.clone(),
        stop: tenants_stop,
        running,
    }));
    let lost = tokio::select! {
        _ = stop.wait_for(|stop| *stop) => false,
        () = fence.lost() => true,
    };
    term_stop.send_replace(true);
    // Dropping the published term leaves only the tenant runs' tokens.
    publish.send_replace(None);
    let _ = drained.recv().await;
    match lost {
        false => Ok(()),
        true => Err(Error::Fenced {
            pipeline,
            message: fence.reason(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::{timeout, Instant};

    use super::*;

    /// A term's fence lost (an instance woken past its lease, a write that found another
    /// owner) stops the tenants, and once the last has drained the term ends with
    /// `Error::Fenced`, which sends the lease keeper back to standby; stopped by the keeper,
    /// it ends with `Ok`.
    #[tokio::test]
    async fn a_lost_fence_stops_the_tenants_and_ends_the_term_fenced() {
        let ceiling = Duration::from_secs(10);
        for lose_fence in [true, false] {
            let (publish, mut terms) = watch::channel(None);
            let (stop_term, stop) = watch::channel(false);
            let fence = Fence::leased(Instant::now() + Duration::from_secs(600));
            let term = tokio::spawn(share_term(
                Arc::new(publish),
                "p".into(),
                fence.clone(),
                stop,
            ));
            let tenant = terms
                .wait_for(Option::is_some)
                .await
                .expect("published")
                .clone()
                .expect("a term");
            match lose_fence {
                true => fence.revoke("the lease was taken by another instance"),
                false => {
                    stop_term.send_replace(true);
                }
            }
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
            match lose_fence {
                true => assert!(
                    matches!(&ended, Err(Error::Fenced { pipeline, message })
                        if pipeline == "p" && message.contains("taken by another")),
                    "{ended:?}"
                ),
                false => assert!(ended.is_ok(), "{ended:?}"),
            }
            assert!(terms.borrow().is_none(), "the term is withdrawn");
        }
    }
}
