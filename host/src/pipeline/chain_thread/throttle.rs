//! The unit's quota rates, turned into waits between its turns on the worker pool: token
//! buckets for events/s and bytes/s (a burst of one second's worth), pacing for the CPU
//! share, and the breach pause its chain owes. Nothing is dropped: the unit only waits, and
//! its bounded queues pass the wait back to its change stream.

use std::time::{Duration, Instant};

use crate::config::Quota;
use crate::ops::metrics::QuotaWait;

/// A unit's rates and what it has used of them.
pub(super) struct Throttle {
    events: Option<Bucket>,
    bytes: Option<Bucket>,
    cpu_share: Option<f64>,
}

/// What one turn used.
pub(super) struct TurnUse {
    /// Change events it took from the batch.
    pub(super) events: usize,
    /// Bytes of the messages it framed.
    pub(super) bytes: usize,
    /// CPU time it used on its worker.
    pub(super) cpu: Duration,
    /// Idle time its chain owes for limit breaches.
    pub(super) breach_pause: Duration,
}

impl Throttle {
    /// The rates of `quota`, buckets full.
    pub(super) fn new(quota: &Quota, now: Instant) -> Throttle {
        Throttle {
            events: quota.events_per_sec.map(|rate| Bucket::new(rate, now)),
            bytes: quota
                .bytes_per_sec
                .map(|rate| Bucket::new(rate as f64, now)),
            cpu_share: quota.cpu_share,
        }
    }

    /// How long to wait before the next turn after one that used `used`, and which quota
    /// (or the breach pause) asks for the longest of the waits; `None`: go on at once.
    pub(super) fn after_turn(
        &mut self,
        used: &TurnUse,
        now: Instant,
    ) -> Option<(QuotaWait, Duration)> {
        let events = self
            .events
            .as_mut()
            .map(|b| b.take(used.events as f64, now));
        let bytes = self.bytes.as_mut().map(|b| b.take(used.bytes as f64, now));
        let cpu = self
            .cpu_share
            .filter(|share| *share < 1.0)
            .map(|share| used.cpu.mul_f64(1.0 / share - 1.0));
        [
            (QuotaWait::EventsPerSec, events),
            (QuotaWait::BytesPerSec, bytes),
            (QuotaWait::CpuShare, cpu),
            (QuotaWait::BreachPause, Some(used.breach_pause)),
        ]
        .into_iter()
        .filter_map(|(why, wait)| wait.filter(|w| !w.is_zero()).map(|w| (why, w)))
        .max_by_key(|(_, wait)| *wait)
    }
}

/// A token bucket of `rate` per second holding at most one second's worth; its level may go
/// below zero (a turn is never cut short), which is the debt waited out.
struct Bucket {
    rate: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            level: rate,
            at: now,
        }
    }

    /// Takes `amount`; returns how long until the level is back at zero.
    fn take(&mut self, amount: f64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.level = (self.level + elapsed * self.rate).min(self.rate) - amount;
        if self.level >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.level / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(events: usize, bytes: usize, cpu_ms: u64) -> TurnUse {
        TurnUse {
            events,
            bytes,
            cpu: Duration::from_millis(cpu_ms),
            breach_pause: Duration::ZERO,
        }
    }

    /// 100 events/s: a burst of 100 passes, then each further 50 waits half a second, so
    /// the long-run rate is the quota whatever the turns' sizes.
    #[test]
    fn events_per_sec_allows_a_burst_then_paces() {
        let t0 = Instant::now();
        let quota = Quota {
            events_per_sec: Some(100.0),
            ..Quota::default()
        };
        let mut throttle = Throttle::new(&quota, t0);
        assert_eq!(throttle.after_turn(&turn(100, 0, 0), t0), None);
        let (why, wait) = throttle.after_turn(&turn(50, 0, 0), t0).expect("a wait");
        assert_eq!(why, QuotaWait::EventsPerSec);
        assert_eq!(wait, Duration::from_millis(500));
        // Waiting it out and taking another 50 costs another half second, no more.
        let t1 = t0 + wait;
        let (_, wait) = throttle.after_turn(&turn(50, 0, 0), t1).expect("a wait");
        assert_eq!(wait, Duration::from_millis(500));
    }

    /// A quarter of a core: a turn that used 10 ms of CPU is followed by 30 ms of waiting.
    #[test]
    fn cpu_share_paces_by_cpu_used() {
        let t0 = Instant::now();
        let quota = Quota {
            cpu_share: Some(0.25),
            ..Quota::default()
        };
        let mut throttle = Throttle::new(&quota, t0);
        let (why, wait) = throttle.after_turn(&turn(1, 0, 10), t0).expect("a wait");
        assert_eq!(
            (why, wait),
            (QuotaWait::CpuShare, Duration::from_millis(30))
        );
    }

    /// The longest wait wins and is named; no quota, no breach: no wait.
    #[test]
    fn the_longest_wait_is_taken() {
        let t0 = Instant::now();
        let quota = Quota {
            bytes_per_sec: Some(1000),
            cpu_share: Some(0.5),
            ..Quota::default()
        };
        let mut throttle = Throttle::new(&quota, t0);
        let used = TurnUse {
            breach_pause: Duration::from_millis(100),
            ..turn(1, 3000, 10)
        };
        let (why, wait) = throttle.after_turn(&used, t0).expect("a wait");
        assert_eq!(
            (why, wait),
            (QuotaWait::BytesPerSec, Duration::from_secs(2))
        );
        let mut free = Throttle::new(&Quota::default(), t0);
        assert_eq!(free.after_turn(&turn(1_000_000, 1 << 30, 1000), t0), None);
    }
}
