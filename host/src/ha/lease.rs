//! High availability: several instances with the same config share the pipelines, each
//! pipeline run by one instance at a time, coordinated through a NATS KV bucket.
//!
//! # Leases
//! Pipeline `P` is owned by whoever holds key `lease.P` in the bucket (`[ha] bucket`). The
//! bucket's `max_age` is the lease time-to-live, so a key that is not rewritten within
//! `lease_ttl_ms` disappears on the server. An instance takes a free lease with `create`
//! (which fails if the key exists), and renews it every third of the TTL with `update`, a
//! compare-and-set on the key's revision. A renewal that finds a different revision means
//! the lease was lost: the pipeline stops at once.
//!
//! # Fencing
//! While it owns a pipeline, the instance writes through a [`Fence`] that lapses a margin
//! before the lease could expire on the server (counted from when the renewal was sent), so
//! an owner that was suspended or cut off stops writing before anyone can take over. Writes
//! that slip through anyway are refused by the servers: the checkpoint is written with a
//! compare-and-set against the new owner's claim (see [`crate::checkpoint`]), and messages
//! chain `Nats-Expected-Last-Msg-Id`, deduplicate on ids derived from the events, and a
//! deposed publisher that finds another instance's message at the stream's end stops (see
//! [`crate::sink`]).
//!
//! # Takeover time
//! When an owner dies, its lease expires `lease_ttl_ms` after its last renewal; standbys try
//! to take free leases every fifth of the TTL; the new owner then connects, loads (and
//! claims) the checkpoint and resumes the change stream after it. So a pipeline is
//! unattended for at most `lease_ttl_ms` × 1.2 plus the server's expiry timer (about a
//! second) plus the pipeline's start-up. On a clean shutdown the owner deletes its lease
//! after draining, and standbys, which watch the key, take over at once.
//!
//! # Balancing
//! Each instance keeps a presence key `instance.<id>` alive the same way. With `L` live
//! instances and `P` pipelines, an instance takes a lease only while it owns fewer than
//! ⌈P / L⌉, and one that owns more (because instances joined) hands one pipeline over per
//! renewal: it drains it, checkpoints, deletes the lease, and waits two leases' time before
//! competing again.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::ha::HaConfig;
use crate::error::Error;
use crate::ha::fence::Fence;
use crate::ops::metrics::State;

/// What a lease key holds: who owns the pipeline (for operators and `/status`).
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct LeaseValue {
    /// The owning instance.
    pub instance: String,
}

/// How one term of ownership ended.
struct Term {
    /// What the unit returned.
    result: Result<(), Error>,
    /// Whether this instance stopped it to hand it over.
    handing_over: bool,
}

/// This instance's side of the coordination, shared by its pipelines' lease keepers.
pub struct Coordinator {
    kv: kv::Store,
    instance: String,
    ttl: Duration,
    /// Units shared out (the file's, plus tenants the admin API added while running).
    pipelines: AtomicUsize,
    /// Leases held (or being taken) by this instance.
    owned: AtomicUsize,
    /// Live instances, as last counted by the presence task (at least 1: this one).
    live: AtomicUsize,
    /// The leases held for every tenant of a pipeline with a shared reader (`shared.rs`).
    pub(super) shared: std::sync::Mutex<super::shared::SharedLeases>,
}

impl Coordinator {
    /// Opens (creating if needed) the lease bucket for an instance running `pipelines`
    /// pipelines.
    pub async fn open(
        js: &jetstream::Context,
        config: &HaConfig,
        pipelines: usize,
    ) -> Result<Arc<Coordinator>, Error> {
        let fail = |message: String| Error::Startup { message };
        let ttl = config.ttl();
        let kv = match js.get_key_value(&config.bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: config.bucket.clone(),
                    description: "tidegate pipeline leases".into(),
                    history: 1,
                    max_age: ttl,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|err| {
                    fail(format!(
                        "cannot open or create KV bucket '{}': {err}",
                        config.bucket
                    ))
                })?,
        };
        let max_age = kv
            .status()
            .await
            .map_err(|err| fail(format!("cannot read KV bucket '{}': {err}", config.bucket)))?
            .max_age();
        if max_age != ttl {
            return Err(fail(format!(
                "KV bucket '{}' expires keys after {} ms but ha.lease_ttl_ms = {}; every instance \
                 must use the bucket's TTL (or delete the bucket to change it)",
                config.bucket,
                max_age.as_millis(),
                config.lease_ttl_ms
            )));
        }
        let instance = config.instance.clone().unwrap_or_else(default_instance);
        crate::ops::metrics::registry().set_instance(&instance);
        tracing::info!(instance = %instance, bucket = %config.bucket, lease_ttl_ms = config.lease_ttl_ms, "high availability on");
        Ok(Arc::new(Coordinator {
            kv,
            instance,
            ttl,
            pipelines: AtomicUsize::new(pipelines),
            owned: AtomicUsize::new(0),
            live: AtomicUsize::new(1),
            shared: Default::default(),
        }))
    }

    /// Counts a unit added (`true`) or removed (`false`) while running, for the fair share.
    pub fn count_unit(&self, added: bool) {
        let _ = self
            .pipelines
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match added {
                true => Some(n + 1),
                false => n.checked_sub(1),
            });
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    fn poll_every(&self) -> Duration {
        self.ttl / 5
    }

    /// When a lease written at `sent` stops protecting its owner: a tenth of the TTL before
    /// it can expire on the server.
    fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.ttl - self.ttl / 10
    }

    fn fair_share(&self) -> usize {
        let live = self.live.load(Ordering::Acquire).max(1);
        self.pipelines.load(Ordering::Acquire).div_ceil(live).max(1)
    }

    /// Reserves room for one more lease if this instance is below its fair share.
    fn reserve(&self) -> bool {
        let fair = self.fair_share();
        self.owned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                (o < fair).then_some(o + 1)
            })
            .is_ok()
    }

    /// Gives up room for one lease if this instance is above its fair share.
    fn shed(&self) -> bool {
        let fair = self.fair_share();
        self.owned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                (o > fair).then(|| o - 1)
            })
            .is_ok()
    }

    fn unreserve(&self) {
        let _ = self
            .owned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| o.checked_sub(1));
    }

    fn lease_value(&self) -> bytes::Bytes {
        serde_json::to_vec(&LeaseValue {
            instance: self.instance.clone(),
        })
        .unwrap_or_default()
        .into()
    }

    /// Keeps this instance's presence key alive (and counts the live instances) until
    /// `shutdown`, then deletes it.
    pub async fn run_presence(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let key = format!("instance.{}", self.instance);
        let mut tick = tokio::time::interval(self.renew_every());
        let mut previous_count = 0;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {
                    if let Err(err) = self.kv.put(&key, self.lease_value()).await {
                        tracing::warn!(error = %err, "cannot renew presence key; retrying");
                    }
                    match self.count_live().await {
                        Ok(counted) => {
                            // A lower count is believed only when seen twice in a row: a key
                            // may be missing for a moment while it is being replaced.
                            let live = counted.max(previous_count).max(1);
                            previous_count = counted;
                            let before = self.live.swap(live, Ordering::AcqRel);
                            if before != live {
                                tracing::info!(live_instances = live, fair_share = self.fair_share(), "instances changed");
                            }
                        }
                        Err(err) => tracing::warn!(error = %err, "cannot count live instances"),
                    }
                }
            }
        }
        let _ = self.kv.delete(&key).await;
        Ok(())
    }

    async fn count_live(&self) -> Result<usize, String> {
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| e.to_string())?
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(keys.iter().filter(|k| k.starts_with("instance.")).count())
    }

    /// Runs unit `id` whenever this instance holds its lease, standing by otherwise, until
    /// `shutdown` (drain, checkpoint, release) or an error of the unit's (release, return it).
    ///
    /// Each term of ownership calls `term` with the term's [`Fence`] and a stop signal, and
    /// runs the future it returns until it ends: a [`Error::Fenced`] ends the term (back to
    /// standby), `Ok` after a stop hands the unit over or shuts down, any other error ends
    /// the unit. The lease knows nothing of what the unit does.
    pub async fn run_unit<F, Fut>(
        self: Arc<Self>,
        id: String,
        mut shutdown: watch::Receiver<bool>,
        mut term: F,
    ) -> Result<(), Error>
    where
        F: FnMut(Fence, watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let key = format!("lease.{id}");
        let metrics = crate::ops::metrics::pipeline(&id);
        // Let instances started together see each other before anyone takes leases.
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = tokio::time::sleep(self.renew_every()) => {}
        }
        loop {
            metrics.set_state(State::Standby);
            let Some((mut revision, mut sent)) = self.acquire(&id, &key, &mut shutdown).await
            else {
                return Ok(());
            };
            metrics.set_state(State::Starting);
            tracing::info!(pipeline = %id, instance = %self.instance, "lease taken: running the pipeline from its checkpoint");
            let mut tolerate_foreign_tail = false;
            // Owner.
            loop {
                let fence = match tolerate_foreign_tail {
                    false => Fence::leased(self.valid_until(sent)),
                    true => Fence::tolerating_foreign_tail(self.valid_until(sent)),
                };
                let (stop_tx, stop_rx) = watch::channel(false);
                let task = tokio::spawn(term(fence.clone(), stop_rx));
                let held = self
                    .hold(
                        &id,
                        &key,
                        &mut revision,
                        &fence,
                        task,
                        stop_tx,
                        &mut shutdown,
                    )
                    .await;
                let Term {
                    result,
                    handing_over,
                } = held;
                match result {
                    Err(Error::Fenced { message, .. }) => {
                        // A foreign message at the stream's end, but is the lease really lost?
                        // If it is still ours, no other instance can have published since we
                        // took it: an earlier owner stored that message after the checkpoint,
                        // and the duplicate window has passed. Run again, relying on
                        // deduplication as a single instance does.
                        if fence.saw_foreign_tail() && !tolerate_foreign_tail && !handing_over {
                            let resent = Instant::now();
                            if let Ok(next) =
                                self.kv.update(&key, self.lease_value(), revision).await
                            {
                                tracing::warn!(pipeline = %id, "the stream ends with a message an earlier owner stored after the checkpoint, past the duplicate window; restarting the pipeline relying on deduplication alone");
                                revision = next;
                                sent = resent;
                                tolerate_foreign_tail = true;
                                continue;
                            }
                        }
                        if !handing_over {
                            self.unreserve();
                        }
                        metrics.lease_lost();
                        tracing::warn!(pipeline = %id, reason = %message, "lost the lease: stopped writing, standing by");
                        break;
                    }
                    result => {
                        if !handing_over {
                            self.unreserve();
                        }
                        if fence.holds() {
                            self.release(&key, revision).await;
                        }
                        result?;
                        if *shutdown.borrow() {
                            return Ok(());
                        }
                        if handing_over {
                            // Leave the pipeline to the others for a while.
                            tokio::select! {
                                _ = shutdown.changed() => return Ok(()),
                                _ = tokio::time::sleep(self.ttl * 2) => {}
                            }
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Stands by until this instance takes lease `key` (its revision, and when the taking
    /// was sent), or `None` on shutdown. A released lease is taken at once; an expired one
    /// is found by polling (expiry leaves no marker to watch).
    async fn acquire(
        &self,
        id: &str,
        key: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<(u64, Instant)> {
        let mut released = self.kv.watch(key).await.ok();
        loop {
            if *shutdown.borrow() {
                return None;
            }
            if self.reserve() {
                let sent = Instant::now();
                match self.kv.create(key, self.lease_value()).await {
                    Ok(revision) => return Some((revision, sent)),
                    Err(err) => {
                        self.unreserve();
                        if err.kind() != kv::CreateErrorKind::AlreadyExists {
                            tracing::warn!(pipeline = %id, error = %err, "cannot take lease; retrying");
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.changed() => {}
                _ = tokio::time::sleep(self.poll_every()) => {}
                Some(_) = next_change(&mut released) => {}
            }
        }
    }

    /// One term of ownership: renews the lease while `task` runs, stopping it on shutdown
    /// or to hand the unit over to balance instances, and revoking `fence` if the lease was
    /// taken.
    ///
    /// A fence lost (revoked, or lapsed while renewals failed or the process was suspended)
    /// stops the task as well, and a task that then ends without an error ends the term as
    /// [`Error::Fenced`]. A unit finds out about a lost fence only when it writes; one that is
    /// not writing (holding until its plugins load, still starting, a pipeline's tenants
    /// sharing a term) would otherwise keep the term, and the instance would never stand by
    /// again, never take the unit back, and never say it lost the lease.
    #[allow(clippy::too_many_arguments)]
    async fn hold(
        &self,
        id: &str,
        key: &str,
        revision: &mut u64,
        fence: &Fence,
        mut task: tokio::task::JoinHandle<Result<(), Error>>,
        stop_tx: watch::Sender<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Term {
        let mut renew =
            tokio::time::interval_at(Instant::now() + self.renew_every(), self.renew_every());
        let mut draining = false;
        let mut handing_over = false;
        let mut fence_lost = std::pin::pin!(fence.lost());
        let mut lost = false;
        loop {
            tokio::select! {
                _ = shutdown.changed(), if !draining => {
                    draining = true;
                    let _ = stop_tx.send(true);
                }
                () = &mut fence_lost, if !lost => {
                    lost = true;
                    let _ = stop_tx.send(true);
                }
                done = &mut task => {
                    let result = match done {
                        Ok(Ok(())) if lost => Err(Error::Fenced {
                            pipeline: id.to_string(),
                            message: fence.reason(),
                        }),
                        Ok(result) => result,
                        Err(err) => Err(Error::Startup {
                            message: format!("pipeline task failed: {err}"),
                        }),
                    };
                    return Term { result, handing_over };
                }
                _ = renew.tick() => {
                    if !fence.holds() {
                        continue;
                    }
                    let sent = Instant::now();
                    match self.kv.update(key, self.lease_value(), *revision).await {
                        Ok(next) => {
                            *revision = next;
                            fence.extend_until(self.valid_until(sent));
                        }
                        Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            fence.revoke("the lease was taken by another instance");
                        }
                        // The fence lapses on its own if this goes on too long.
                        Err(err) => tracing::warn!(pipeline = %id, error = %err, "cannot renew lease; retrying"),
                    }
                    if !draining && fence.holds() && self.shed() {
                        tracing::info!(pipeline = %id, fair_share = self.fair_share(), "handing the pipeline over to balance instances");
                        draining = true;
                        handing_over = true;
                        let _ = stop_tx.send(true);
                    }
                }
            }
        }
    }

    /// Deletes the lease if it is still ours, so that a standby takes over without waiting
    /// for it to expire.
    async fn release(&self, key: &str, revision: u64) {
        match self.kv.delete_expect_revision(key, Some(revision)).await {
            Ok(()) => tracing::info!(lease = %key, "lease released"),
            Err(err) => tracing::debug!(lease = %key, error = %err, "lease not released"),
        }
    }
}

/// The next change of a watched key; never, without a watch.
async fn next_change(watch: &mut Option<kv::Watch>) -> Option<()> {
    match watch {
        Some(watch) => watch.next().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

/// `<hostname>-<pid>`, reduced to characters a KV key accepts.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "tidegate".into());
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_key() {
        let mut ha = HaConfig::default();
        assert!(ha.validate().is_ok());
        ha.lease_ttl_ms = 500;
        assert!(ha.validate().unwrap_err().contains("ha.lease_ttl_ms"));
        ha.lease_ttl_ms = 5000;
        ha.instance = Some("a.b".into());
        assert!(ha.validate().unwrap_err().contains("ha.instance"));
    }

    #[test]
    fn default_instance_is_a_key_token() {
        assert!(crate::config::ha::HaConfig {
            instance: Some(default_instance()),
            ..Default::default()
        }
        .validate()
        .is_ok());
    }
}
