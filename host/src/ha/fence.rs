//! Whether this process may still write for a pipeline: publish its messages and save its
//! checkpoint.
//!
//! Without high availability a pipeline's fence has no deadline ([`Fence::none`]); it is
//! only revoked when a checkpoint write finds that another process has claimed the record
//! (the same config started twice by mistake), and the pipeline then stops. With it, the
//! [`lease`](crate::ha::lease) keeper hands the pipeline a fence that holds until a deadline it
//! pushes forward on every renewal of the pipeline's lease. The deadline is computed from
//! when the renewal was *sent* and ends a margin before the lease can expire on the server,
//! so by the time any standby can take the lease over, this process has stopped writing. The
//! clock is monotonic and keeps running while the process is suspended (SIGSTOP, a VM
//! pause): a process that wakes up past its deadline finds the fence gone before it writes.
//!
//! A fence is also revoked outright when a write proves that someone else has taken over
//! (a checkpoint compare-and-set that fails, a stream whose last message is not ours). Once
//! gone, a fence never comes back: the pipeline stops and the lease keeper starts afresh.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A pipeline's right to write; cheap to clone (all clones share the state).
#[derive(Clone, Debug)]
pub struct Fence {
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    /// Whether the fence comes from a lease and ends at `deadline_ms`.
    leased: bool,
    /// Reference point of `deadline_ms`.
    base: Instant,
    /// Milliseconds after `base` when the fence ends unless extended.
    deadline_ms: AtomicU64,
    revoked: AtomicBool,
    /// Revoked because the stream's last message was not this pipeline's (see the sink).
    foreign_tail: AtomicBool,
    /// Whether the sink should rely on deduplication instead (see [`Fence::tolerating_foreign_tail`]).
    tolerate_foreign_tail: bool,
    /// Why the fence was revoked, for the log.
    reason: Mutex<String>,
    changed: Notify,
}

impl Fence {
    /// A fence without a lease: it holds until revoked. The sink keeps the single-instance
    /// behaviour on a foreign last message.
    pub fn none() -> Fence {
        Fence::new(false, Instant::now(), true)
    }

    /// A fence that holds until `until`.
    pub fn leased(until: Instant) -> Fence {
        Fence::new(true, until, false)
    }

    /// A fence that holds until `until`, for a pipeline restarted by its lease keeper after
    /// the stream was found to end with a message this pipeline did not publish although the
    /// lease was never lost: an earlier owner stored it after the checkpoint, and the duplicate
    /// window has passed. The sink then falls back to deduplication alone, as without high
    /// availability (see README.md, "The delivery guarantee, precisely").
    pub fn tolerating_foreign_tail(until: Instant) -> Fence {
        Fence::new(true, until, true)
    }

    fn new(leased: bool, until: Instant, tolerate_foreign_tail: bool) -> Fence {
        let fence = Fence {
            state: Arc::new(State {
                leased,
                base: Instant::now(),
                deadline_ms: AtomicU64::new(0),
                revoked: AtomicBool::new(false),
                foreign_tail: AtomicBool::new(false),
                tolerate_foreign_tail,
                reason: Mutex::new(String::new()),
                changed: Notify::new(),
            }),
        };
        fence.extend_until(until);
        fence
    }

    /// Whether the pipeline may still write. Once false, false for good.
    pub fn holds(&self) -> bool {
        let state = &self.state;
        if state.revoked.load(Ordering::Acquire) {
            return false;
        }
        if state.leased && Instant::now() >= state.deadline() {
            self.revoke("the lease was not renewed in time (was this process suspended?)");
            return false;
        }
        true
    }

    /// Pushes the deadline to `until` (never backwards; nothing once revoked).
    pub fn extend_until(&self, until: Instant) {
        let state = &self.state;
        if !state.leased || state.revoked.load(Ordering::Acquire) {
            return;
        }
        let ms = until.saturating_duration_since(state.base).as_millis() as u64;
        state.deadline_ms.fetch_max(ms, Ordering::AcqRel);
        state.changed.notify_waiters();
    }

    /// Ends the fence now; the first reason given is kept.
    pub fn revoke(&self, reason: &str) {
        let state = &self.state;
        if !state.revoked.swap(true, Ordering::AcqRel) {
            if let Ok(mut kept) = state.reason.lock() {
                *kept = reason.to_string();
            }
        }
        state.changed.notify_waiters();
    }

    /// Revokes the fence because the stream's last message is not this pipeline's: another
    /// instance published, or an earlier owner did (the lease keeper finds out which).
    pub fn revoke_foreign_tail(&self, reason: &str) {
        self.state.foreign_tail.store(true, Ordering::Release);
        self.revoke(reason);
    }

    /// Whether [`Fence::revoke_foreign_tail`] was called.
    pub fn saw_foreign_tail(&self) -> bool {
        self.state.foreign_tail.load(Ordering::Acquire)
    }

    /// Whether the sink should stop on a foreign last message (leased, not tolerating).
    pub fn stops_on_foreign_tail(&self) -> bool {
        !self.state.tolerate_foreign_tail
    }

    /// Why the fence was revoked (empty while it holds).
    pub fn reason(&self) -> String {
        self.state
            .reason
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Resolves once the fence no longer holds.
    pub async fn lost(&self) {
        let state = &self.state;
        loop {
            let changed = state.changed.notified();
            if !self.holds() {
                return;
            }
            if state.leased {
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep_until(state.deadline()) => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

impl State {
    fn deadline(&self) -> Instant {
        self.base + Duration::from_millis(self.deadline_ms.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expires_unless_extended_and_stays_revoked() {
        let fence = Fence::leased(Instant::now() + Duration::from_millis(50));
        assert!(fence.holds());
        fence.extend_until(Instant::now() + Duration::from_millis(200));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(fence.holds(), "extended");
        tokio::time::timeout(Duration::from_secs(2), fence.lost())
            .await
            .expect("lost() resolves at the deadline");
        assert!(!fence.holds());
        fence.extend_until(Instant::now() + Duration::from_secs(60));
        assert!(!fence.holds(), "a lost fence never comes back");
        assert!(fence.reason().contains("not renewed"));
    }

    #[tokio::test]
    async fn revoke_wakes_waiters_and_none_has_no_deadline() {
        let fence = Fence::leased(Instant::now() + Duration::from_secs(60));
        let waiter = tokio::spawn({
            let fence = fence.clone();
            async move { fence.lost().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        fence.revoke("taken over");
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("revocation wakes lost()")
            .expect("task");
        assert_eq!(fence.reason(), "taken over");
        let none = Fence::none();
        assert!(none.holds());
        assert!(!none.stops_on_foreign_tail());
        none.extend_until(Instant::now());
        assert!(none.holds(), "no deadline without a lease");
        none.revoke("checkpoint claimed by another process");
        assert!(!none.holds());
    }
}
