//! The pace of a pipeline's checkpoint writes, shared by all its units.
//!
//! Every unit saves its acknowledged position every `checkpoint.interval_ms`. A pipeline with a
//! thousand tenants is a thousand units: at the default interval that was a thousand writes a
//! second to the checkpoint store (a compare-and-set on a NATS KV record, or a MongoDB update)
//! while events flow, whatever each tenant's own traffic, and it cost about 8 % of the CPU per
//! event of tidegate, mongod and nats-server together (BENCHMARKS.md, "A thousand tenants'
//! checkpoints").
//! So a pipeline's units draw their writes from one [`WritePace`] of
//! `checkpoint.max_writes_per_sec`: writes are spaced evenly in the order units ask, and a
//! unit waiting for its turn saves its newest position when the turn comes (the positions it
//! was handed meanwhile are folded into it, never queued). With few units nothing changes;
//! with many, each unit's checkpoint is older (at most about units ÷ rate seconds), which
//! only lengthens what a crash replays: the replayed messages carry the ids JetStream already
//! holds, and are dropped. A unit's start position and its last position when it stops are
//! saved without waiting for the pace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// The write slots of one pipeline's checkpoints.
#[derive(Debug)]
pub struct WritePace {
    /// The time between two writes.
    every: Duration,
    /// The earliest time the next write may start.
    next: Mutex<Instant>,
}

impl WritePace {
    /// A pace of at most `per_sec` writes a second (at least one).
    pub fn new(per_sec: u32) -> WritePace {
        WritePace {
            every: Duration::from_secs(1) / per_sec.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// The pace of pipeline `pipeline`'s checkpoints at `per_sec` writes a second, shared by
    /// every unit of that pipeline (its tenants) that asks for it while any holds it. A
    /// different rate (the file was reloaded with another) starts a new pace.
    pub fn for_pipeline(pipeline: &str, per_sec: u32) -> Arc<WritePace> {
        type Paces = Mutex<HashMap<(String, u32), Weak<WritePace>>>;
        static PACES: OnceLock<Paces> = OnceLock::new();
        let mut paces = PACES
            .get_or_init(Paces::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        paces.retain(|_, pace| pace.strong_count() > 0);
        let key = (pipeline.to_string(), per_sec);
        if let Some(pace) = paces.get(&key).and_then(Weak::upgrade) {
            return pace;
        }
        let pace = Arc::new(WritePace::new(per_sec));
        paces.insert(key, Arc::downgrade(&pace));
        pace
    }

    /// Takes the next write slot: the time at which the caller may write (now, if the pace
    /// has room). Slots are handed out in the order they are asked for.
    pub fn reserve(&self) -> Instant {
        let now = Instant::now();
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = (*next).max(now);
        *next = slot + self.every;
        slot
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::WritePace;

    /// Writes asked for together are spaced at the pace, in the order asked; a pace with room
    /// (the last slot long past) lets the next write go at once, without a burst of slots
    /// saved up while it was idle.
    #[tokio::test(start_paused = true)]
    async fn slots_are_spaced_in_order_and_not_saved_up() {
        let pace = WritePace::new(4);
        let start = Instant::now();
        let slots: Vec<Duration> = (0..5).map(|_| pace.reserve() - start).collect();
        assert_eq!(
            slots,
            [0, 250, 500, 750, 1000].map(Duration::from_millis).to_vec()
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        assert_eq!(pace.reserve(), now);
        assert_eq!(pace.reserve(), now + Duration::from_millis(250));
    }

    /// The units of one pipeline share a pace while any holds it; another pipeline, or the
    /// same one at another rate, has its own.
    #[tokio::test(start_paused = true)]
    async fn a_pipelines_units_share_one_pace() {
        let a = WritePace::for_pipeline("pace-test-a", 10);
        let b = WritePace::for_pipeline("pace-test-a", 10);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(
            &a,
            &WritePace::for_pipeline("pace-test-b", 10)
        ));
        assert!(!Arc::ptr_eq(
            &a,
            &WritePace::for_pipeline("pace-test-a", 20)
        ));
        let now = Instant::now();
        assert_eq!(a.reserve(), now);
        assert_eq!(b.reserve(), now + Duration::from_millis(100));
    }

    /// A rate of 0 (refused by validation) still paces, at one write a second, rather than
    /// dividing by zero.
    #[tokio::test(start_paused = true)]
    async fn a_zero_rate_is_one_a_second() {
        let pace = WritePace::new(0);
        let now = Instant::now();
        pace.reserve();
        assert_eq!(pace.reserve(), now + Duration::from_secs(1));
    }
}
