//! What `/status` serialises for one series (README's operations section describes every
//! field): kept apart from the counters so the JSON's shape is read in one place.

use std::sync::atomic::Ordering;

use super::{unix_now_ms, PipelineMetrics, HISTORY_STEP};

impl PipelineMetrics {
    /// This series as `/status` JSON (README's operations section describes every field).
    pub fn status(&self) -> serde_json::Value {
        let c = self.counts();
        let labels: serde_json::Map<String, serde_json::Value> = self
            .labels
            .0
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone().into()))
            .collect();
        let rates = self.rates();
        let history = self.history();
        let snapshot_total = self.snapshot_total.load(Ordering::Relaxed);
        serde_json::json!({
            "labels": labels,
            "state": self.state().name(),
            "last_error": self.last_error().map(|e| serde_json::json!({
                "message": e.message,
                "at_unix_ms": e.at_unix_ms,
                "age_seconds": (unix_now_ms() - e.at_unix_ms).max(0) as f64 / 1000.0,
            })),
            "position": {
                "last_msg_id": self.checkpoint_msg_id.lock().ok().and_then(|id| id.clone()),
                "change_time_unix": self.checkpoint_position_secs(),
            },
            "lag_seconds": self.lag_seconds(),
            "checkpoint_age_seconds": self.checkpoint_age_seconds(),
            "events_per_second": rates.map(|r| r.0),
            "messages_per_second": rates.map(|r| r.1),
            "oplog": self.oplog(),
            "snapshot": {
                "active": self.snapshot_active(),
                "documents": self.snapshot_done.load(Ordering::Relaxed),
                "estimated_total": (snapshot_total > 0).then_some(snapshot_total),
            },
            "counts": {
                "read": c.read,
                "filtered": c.filtered,
                "dead_lettered": c.dead_lettered,
                "skipped": self.skipped.load(Ordering::Relaxed),
                "out_of_scope": self.out_of_scope.load(Ordering::Relaxed),
                "published": c.published,
                "duplicates": c.duplicates,
                "retries": c.retries,
                "checkpoints": self.checkpoints.load(Ordering::Relaxed),
                "snapshot_documents": self.snapshot_documents.load(Ordering::Relaxed),
                "leases_lost": self.leases_lost.load(Ordering::Relaxed),
            },
            "history": {
                "step_seconds": HISTORY_STEP.as_secs(),
                "events_per_second": history.iter().map(|h| h.0).collect::<Vec<_>>(),
                "lag_seconds": history.iter().map(|h| h.1).collect::<Vec<_>>(),
            },
            "plugins": self.plugins.lock().map(|p| p.clone()).unwrap_or_default(),
            "tenants_catching_up": self.tenants_catching_up.load(Ordering::Relaxed),
            "tenants_waiting_to_catch_up": self.tenants_waiting_to_catch_up.load(Ordering::Relaxed),
        })
    }
}
