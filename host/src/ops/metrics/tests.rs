//! The registry's own checks: decoding, histogram arithmetic, derived figures and label
//! escaping (the exposition as a whole is checked against a real parser in tests/ops.rs).

use super::series::Sample;
use super::*;
use crate::model::Position;

#[test]
fn token_time_is_decoded() {
    let token: ResumeToken = bson::deserialize_from_bson(bson::Bson::Document(
        bson::doc! { "_data": "826560A7F2000000012B022C0100296E5A1004" },
    ))
    .expect("token");
    assert_eq!(token_seconds(&token), Some(0x6560_A7F2));
}

#[test]
fn histogram_buckets_are_cumulative() {
    let h = Histogram::new(&[1.0, 2.0]);
    h.observe(Duration::from_millis(500));
    h.observe(Duration::from_millis(1500));
    h.observe(Duration::from_secs(9));
    let mut out = String::new();
    h.render(&mut out, "x", "p=\"a\"");
    assert!(out.contains("x_bucket{p=\"a\",le=\"1\"} 1\n"));
    assert!(out.contains("x_bucket{p=\"a\",le=\"2\"} 2\n"));
    assert!(out.contains("x_bucket{p=\"a\",le=\"+Inf\"} 3\n"));
    assert!(out.contains("x_count{p=\"a\"} 3\n"));
}

#[test]
fn lag_and_checkpoint_age_come_from_the_checkpoint() {
    let m = PipelineMetrics::new(Labels::pipeline("p"));
    assert_eq!((m.lag_seconds(), m.checkpoint_age_seconds()), (None, None));
    let now = unix_now_ms() / 1000;
    let token: ResumeToken = bson::deserialize_from_bson(bson::Bson::Document(
        bson::doc! { "_data": format!("82{:08X}00000001", now - 30) },
    ))
    .expect("token");
    let position = Position {
        token,
        last_msg_id: Some("p:1:0".into()),
        snapshot: None,
    };
    // Written 2 s ago by an earlier run, holding a position 30 s old.
    m.checkpoint_loaded(&position, Some(unix_now_ms() - 2000));
    let lag = m.lag_seconds().expect("lag");
    assert!((30..32).contains(&lag), "{lag}");
    let age = m.checkpoint_age_seconds().expect("age");
    assert!((2.0..3.0).contains(&age), "{age}");
    m.checkpointed(&position);
    assert!(m.checkpoint_age_seconds().expect("age") < 1.0);
    assert_eq!(m.status()["position"]["last_msg_id"], "p:1:0");
}

/// A unit started again in the same process (a tenant removed and added again, a pipeline
/// moved to another deployment by a reload, the bench's rows): until the new run loads or
/// writes its checkpoint, the earlier run's position is not reported as its lag, age or
/// oplog headroom (a false "position lost" alarm against a younger oplog).
#[test]
fn a_new_run_forgets_an_earlier_runs_position() {
    let m = PipelineMetrics::new(Labels::pipeline("again"));
    let token: ResumeToken = bson::deserialize_from_bson(bson::Bson::Document(
        bson::doc! { "_data": format!("82{:08X}00000001", unix_now_ms() / 1000 - 30) },
    ))
    .expect("token");
    let position = Position {
        token,
        last_msg_id: Some("again:1:0".into()),
        snapshot: None,
    };
    m.checkpointed(&position);
    m.set_oplog(crate::ops::oplog::Status {
        max_bytes: 1,
        size_bytes: 1,
        window_seconds: 1,
        min_retention_hours: 0.0,
        write_bytes_per_second: None,
        headroom_seconds: Some(0.0),
        level: crate::ops::oplog::Level::Lost,
        checked_at_unix_ms: unix_now_ms(),
    });
    assert!(m.lag_seconds().is_some() && m.checkpoint_position_secs().is_some());
    m.forget_checkpoint();
    assert_eq!(m.lag_seconds(), None);
    assert_eq!(m.checkpoint_position_secs(), None);
    assert_eq!(m.checkpoint_age_seconds(), None);
    assert!(m.oplog().is_none());
    assert!(
        m.status()["position"]["last_msg_id"].is_null(),
        "{}",
        m.status()
    );
    // A position whose token carries no time is unknown, not the one before it.
    m.checkpointed(&position);
    let timeless = Position {
        token: bson::deserialize_from_bson(bson::Bson::Document(bson::doc! { "_data": "zz" }))
            .expect("token"),
        last_msg_id: None,
        snapshot: None,
    };
    m.checkpointed(&timeless);
    assert_eq!(m.checkpoint_position_secs(), None);
}

#[test]
fn known_counters_exist_at_zero() {
    let m = PipelineMetrics::new(Labels::pipeline("zero"));
    m.set_plugins(vec![PluginInfo {
        name: "f".into(),
        world: "filter".into(),
        sha256: String::new(),
    }]);
    let mut out = String::new();
    registry().render_labelled(&mut out, &[Arc::new(m)]);
    assert!(out.contains(
        "tidegate_dead_letters_total{pipeline=\"zero\",plugin=\"f\",reason=\"out-of-fuel\"} 0\n"
    ));
    assert!(out.contains(
        "tidegate_dead_letters_total{pipeline=\"zero\",plugin=\"\",reason=\"too-large\"} 0\n"
    ));
}

#[test]
fn rates_over_the_history() {
    let m = PipelineMetrics::new(Labels::pipeline("r"));
    assert_eq!(m.rates(), None);
    if let Ok(mut history) = m.history.lock() {
        let t = history[0].at_ms;
        for (i, read) in [(1, 100), (2, 200), (13, 1300)] {
            history.push_back(Sample {
                at_ms: t + i * 5000,
                read,
                published: read / 2,
                lag_seconds: Some(1),
            });
        }
    }
    // The last minute: from the sample 60 s before the newest one.
    assert_eq!(m.rates(), Some((20.0, 10.0)));
    assert_eq!(m.history().len(), 3);
    assert_eq!(m.history()[0], (20.0, Some(1)));
}

#[test]
fn labels_are_escaped_and_extensible() {
    let labels = Labels::pipeline("a\"b").with("tenant", "t1");
    assert_eq!(labels.render(), "pipeline=\"a\\\"b\",tenant=\"t1\"");
    assert_eq!(labels.get("tenant"), Some("t1"));
}
