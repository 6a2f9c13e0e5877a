//! How long each pipeline's checkpoint would survive in MongoDB's oplog.
//!
//! The oplog is a capped collection: once it holds its configured maximum size, every new
//! entry pushes the oldest ones out. A checkpoint whose position has been pushed out cannot
//! be resumed (`ChangeStreamHistoryLost`) and events are lost. So what matters is not how
//! old the oplog's oldest entry is (on a young oplog that is merely its age) but how many
//! more bytes can be written before the checkpointed position is overwritten, and how fast
//! bytes are being written.
//!
//! Every `checkpoint.oplog_check_interval_ms` a task per deployment ([`Watches`], which
//! follows units added and removed at run time) reads the oplog's storage stats
//! (`$collStats` on `local.oplog.rs`: `maxSize`, `size`) and the times of its oldest and
//! newest entries, measures the write rate over the last [`RATE_READINGS`] readings, and
//! projects the **headroom**: the seconds until the oplog overwrites the checkpointed position
//! if the pipeline stopped now and writes went on at that rate,
//!
//! ```text
//! headroom = (maxSize − bytes written after the position) / write rate
//! bytes written after the position ≈ size × (newest − position) / (newest − oldest)
//! ```
//!
//! A healthy pipeline's position is close to the newest entry, so its headroom is the oplog's
//! capacity at the current write rate; a stalled one's headroom counts down. The headroom
//! sets a [`Level`]: `warn` below `checkpoint.oplog_warn_headroom_secs`, `error` below
//! `checkpoint.oplog_error_headroom_secs` (and `/readyz` then reports the pipeline), `lost`
//! once the position is older than the oldest entry. Each change of level is logged once,
//! with a reminder every [`REMINDER`] while it lasts. Where the oplog cannot be read (a
//! sharded cluster through mongos, a user without read access to `local`) nothing is
//! recorded.
//!
//! MongoDB's minimum retention (`oplogMinRetentionHours`, or `replSetResizeOplog`'s
//! `minRetentionHours`) keeps every entry at least that long, however large the oplog grows:
//! where it is set, a position is safe until it is that old, whatever the size says, and the
//! headroom is the larger of the two. It is read from `serverStatus` (`oplogTruncation`) on
//! every check, so a change at run time counts; where `serverStatus` is not allowed, the
//! size alone is used and the projection errs on the early side.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document, Timestamp};
use futures::TryStreamExt;
use tokio::sync::watch;

use crate::config::PipelineConfig;
use crate::ops::telemetry::human_duration;

/// Readings the write rate is measured over: one minute at the default check interval.
pub const RATE_READINGS: usize = 6;
/// How often a warning or error that still holds is logged again.
pub const REMINDER: Duration = Duration::from_secs(30 * 60);
/// A level is left for a better one only once the headroom clears its threshold by this
/// factor, so a headroom hovering at a threshold does not log on every check.
const HYSTERESIS: f64 = 1.1;

/// How close a checkpoint is to being overwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Headroom above the warning threshold, or nothing is being written.
    Ok,
    /// Headroom below `oplog_warn_headroom_secs`.
    Warn,
    /// Headroom below `oplog_error_headroom_secs`: `/readyz` reports the pipeline.
    Error,
    /// The position is older than the oplog's oldest entry: it cannot be resumed.
    Lost,
}

/// One reading of the oplog's size and ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// The configured maximum size (`maxSize`), bytes.
    pub max_bytes: f64,
    /// The bytes it holds now (`size`).
    pub size_bytes: f64,
    /// Unix seconds of its oldest entry.
    pub oldest_secs: i64,
    /// Unix seconds of its newest entry.
    pub newest_secs: i64,
    /// The minimum retention, seconds (0: none, or not readable).
    pub min_retention_secs: f64,
}

/// What the last check found, as metrics, `/status` and `/readyz` show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Status {
    /// The configured maximum size, bytes.
    pub max_bytes: u64,
    /// The bytes it holds.
    pub size_bytes: u64,
    /// Seconds between its oldest and newest entries (what it holds now, not its capacity).
    pub window_seconds: i64,
    /// The minimum retention MongoDB keeps every entry for, hours (0: none, or not
    /// readable).
    pub min_retention_hours: f64,
    /// Bytes written per second over the last readings; `None` until two readings exist.
    pub write_bytes_per_second: Option<f64>,
    /// Projected seconds until the checkpointed position is overwritten; `None` while the
    /// position or the write rate is unknown, or nothing is being written.
    pub headroom_seconds: Option<f64>,
    /// The level the headroom sets.
    pub level: Level,
    /// Unix milliseconds of the check.
    pub checked_at_unix_ms: i64,
}

/// The warning thresholds, seconds.
#[derive(Debug, Clone, Copy)]
struct Thresholds {
    warn: f64,
    error: f64,
}

/// The headroom watches of this process, one per deployment, covering units that come and
/// go at run time (tenants added and removed through the admin API) as well as the config's.
#[derive(Clone)]
pub struct Watches {
    /// Each deployment's units, by MongoDB URI; its watch follows the list.
    deployments: Arc<Mutex<HashMap<String, watch::Sender<Vec<PipelineConfig>>>>>,
    shutdown: watch::Receiver<bool>,
}

impl Watches {
    /// No units yet; every watch ends when `shutdown` turns true.
    pub fn new(shutdown: watch::Receiver<bool>) -> Watches {
        Watches {
            deployments: Default::default(),
            shutdown,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<Vec<PipelineConfig>>>> {
        self.deployments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Watches `unit` (in place of an earlier config of the same id), a unit starting. The
    /// first unit of a deployment starts that deployment's watch (and its MongoDB client).
    ///
    /// The unit's position is unknown until it loads or writes its checkpoint: what an
    /// earlier run of the same id in this process recorded (on another deployment, or in a
    /// record since deleted) is forgotten, or the first check, before a thousand tenants
    /// have loaded, would call their positions lost against a younger oplog.
    pub fn add(&self, unit: &PipelineConfig) {
        crate::ops::metrics::pipeline(&unit.id).forget_checkpoint();
        let mut deployments = self.lock();
        if let Some(units) = deployments.get(&unit.mongodb_uri) {
            units.send_modify(|units| {
                units.retain(|u| u.id != unit.id);
                units.push(unit.clone());
            });
            return;
        }
        let (units, watched) = watch::channel(vec![unit.clone()]);
        deployments.insert(unit.mongodb_uri.clone(), units);
        let (uri, shutdown) = (unit.mongodb_uri.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let Ok(client) = crate::security::mongo_client(&uri).await else {
                return; // the units themselves report a bad URI
            };
            watch_headroom(watched, client, shutdown).await;
        });
    }

    /// Stops watching unit `id`.
    pub fn remove(&self, id: &str) {
        for units in self.lock().values() {
            units.send_if_modified(|units| {
                let before = units.len();
                units.retain(|u| u.id != id);
                units.len() != before
            });
        }
    }
}

/// Records the oplog headroom of every unit `units` lists (all on the deployment `client`
/// reaches) until `shutdown`, logging changes of level. One reading of the oplog serves them
/// all, every shortest `checkpoint.oplog_check_interval_ms` among them: a thousand tenants
/// cost mongod one `$collStats` per interval, not a thousand.
async fn watch_headroom(
    mut units: watch::Receiver<Vec<PipelineConfig>>,
    client: mongodb::Client,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut watched: Vec<Watched> = Vec::new();
    let mut every = None;
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    let mut rate = WriteRate::default();
    let mut said = false;
    // Whether `units` changed since `watched` was made (`changed()` marks the change seen).
    let mut stale = true;
    loop {
        if stale {
            stale = false;
            watched = rewatch(&units.borrow_and_update(), watched);
            let shortest = watched.iter().map(|unit| unit.interval_ms).min();
            if shortest != every {
                every = shortest;
                let period = Duration::from_millis(shortest.unwrap_or(3_600_000).max(1));
                tick = tokio::time::interval_at(
                    tokio::time::Instant::now() + Duration::from_secs(1),
                    period,
                );
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            changed = units.changed() => match changed {
                Ok(()) => {
                    stale = true;
                    continue;
                }
                Err(_) => return, // the process's watches are gone: it is ending
            },
            _ = tick.tick(), if every.is_some() => {}
        }
        match read(&client).await {
            Ok(reading) => {
                rate.push(Instant::now(), reading);
                let mut lines = Lines::default();
                for unit in &mut watched {
                    let position = unit.metrics.checkpoint_position_secs();
                    let status = assess(
                        &reading,
                        rate.bytes_per_second(),
                        position,
                        unit.thresholds,
                        unit.reported.level,
                    );
                    if let Some(line) = to_say(
                        &unit.id,
                        &status,
                        position,
                        unit.thresholds,
                        &mut unit.reported,
                    ) {
                        lines.add(line);
                    }
                    unit.metrics.set_oplog(status);
                }
                lines.log();
            }
            Err(err) if !said => {
                said = true;
                let ids: Vec<&str> = watched.iter().map(|u| u.id.as_str()).collect();
                tracing::info!(pipelines = %ids.join(", "), error = %err, "cannot read the oplog's size and ends; no oplog headroom");
            }
            Err(_) => {}
        }
    }
}

/// The units of `units`, keeping what was last said of those already watched.
fn rewatch(units: &[PipelineConfig], before: Vec<Watched>) -> Vec<Watched> {
    let mut before: HashMap<String, Reported> =
        before.into_iter().map(|w| (w.id, w.reported)).collect();
    units
        .iter()
        .map(|unit| {
            let reported = before.remove(&unit.id).unwrap_or_else(|| Reported {
                level: Level::Ok,
                at: Instant::now(),
            });
            Watched {
                metrics: crate::ops::metrics::pipeline(&unit.id),
                thresholds: Thresholds {
                    warn: unit.checkpoint.oplog_warn_headroom_secs as f64,
                    error: unit.checkpoint.oplog_error_headroom_secs as f64,
                },
                interval_ms: unit.checkpoint.oplog_check_interval_ms,
                reported,
                id: unit.id.clone(),
            }
        })
        .collect()
}

/// One unit under [`watch_headroom`]: where its status goes and what was last said of it.
struct Watched {
    id: String,
    metrics: Arc<crate::ops::metrics::PipelineMetrics>,
    thresholds: Thresholds,
    /// Its `checkpoint.oplog_check_interval_ms`.
    interval_ms: u64,
    reported: Reported,
}

/// Reads the oplog's configured maximum, its size, and the times of its ends.
pub async fn read(client: &mongodb::Client) -> Result<Reading, String> {
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let stats = oplog
        .aggregate([doc! { "$collStats": { "storageStats": {} } }])
        .await
        .map_err(|err| err.to_string())?
        .try_next()
        .await
        .map_err(|err| err.to_string())?
        .ok_or("$collStats returned nothing")?;
    let storage = stats
        .get_document("storageStats")
        .map_err(|err| format!("$collStats: {err}"))?;
    let number = |name: &str| match storage.get(name) {
        Some(Bson::Int32(n)) => Some(f64::from(*n)),
        Some(Bson::Int64(n)) => Some(*n as f64),
        Some(Bson::Double(n)) => Some(*n),
        _ => None,
    };
    let max_bytes = number("maxSize")
        .filter(|m| *m > 0.0)
        .ok_or("the oplog reports no maximum size (maxSize)")?;
    let size_bytes = number("size").ok_or("the oplog reports no size")?;
    let (oldest, newest) = ends(client).await?;
    Ok(Reading {
        max_bytes,
        size_bytes,
        oldest_secs: i64::from(oldest.time),
        newest_secs: i64::from(newest.time),
        min_retention_secs: min_retention_hours(client).await * 3600.0,
    })
}

/// The oplog's minimum retention in hours (`serverStatus.oplogTruncation`), 0 where none is
/// set or `serverStatus` is not allowed (the size alone then counts).
async fn min_retention_hours(client: &mongodb::Client) -> f64 {
    let command = doc! {
        "serverStatus": 1, "oplogTruncation": 1, "repl": 0, "metrics": 0, "locks": 0,
        "wiredTiger": 0, "tcmalloc": 0, "transactions": 0, "network": 0, "opcounters": 0,
    };
    let Ok(status) = client.database("admin").run_command(command).await else {
        return 0.0;
    };
    match status
        .get_document("oplogTruncation")
        .ok()
        .and_then(|t| t.get("oplogMinRetentionHours"))
    {
        Some(Bson::Double(hours)) => hours.max(0.0),
        Some(Bson::Int32(hours)) => f64::from(*hours).max(0.0),
        Some(Bson::Int64(hours)) => (*hours as f64).max(0.0),
        _ => 0.0,
    }
}

/// The times of the oplog's oldest and newest entries.
pub async fn ends(client: &mongodb::Client) -> Result<(Timestamp, Timestamp), String> {
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let oplog = &oplog;
    let at = |order: i32| async move {
        let entry = oplog
            .find_one(doc! {})
            .sort(doc! { "$natural": order })
            .projection(doc! { "ts": 1 })
            .await
            .map_err(|err| err.to_string())?
            .ok_or("the oplog is empty")?;
        entry.get_timestamp("ts").map_err(|err| err.to_string())
    };
    Ok((at(1).await?, at(-1).await?))
}

/// The bytes written to the oplog over its last [`RATE_READINGS`] readings.
#[derive(Debug, Default)]
struct WriteRate {
    readings: VecDeque<(Instant, Reading)>,
}

impl WriteRate {
    fn push(&mut self, at: Instant, reading: Reading) {
        self.readings.push_back((at, reading));
        while self.readings.len() > RATE_READINGS + 1 {
            self.readings.pop_front();
        }
    }

    /// Bytes per second between the first and the last reading kept.
    fn bytes_per_second(&self) -> Option<f64> {
        let (first, _) = self.readings.front()?;
        let (last, _) = self.readings.back()?;
        let seconds = last.duration_since(*first).as_secs_f64();
        if seconds <= 0.0 {
            return None;
        }
        let written: f64 = self
            .readings
            .iter()
            .zip(self.readings.iter().skip(1))
            .map(|((_, a), (_, b))| written_between(a, b))
            .sum();
        Some(written / seconds)
    }
}

/// Bytes written between two readings: the growth, plus what was truncated from the old end
/// (estimated from how far the oldest entry moved, at the earlier reading's average density).
fn written_between(a: &Reading, b: &Reading) -> f64 {
    let grown = b.size_bytes - a.size_bytes;
    let truncated = if b.oldest_secs > a.oldest_secs {
        let span = (a.newest_secs - a.oldest_secs).max(1) as f64;
        a.size_bytes * ((b.oldest_secs - a.oldest_secs) as f64 / span).min(1.0)
    } else {
        0.0
    };
    (grown + truncated).max(0.0)
}

/// Projected seconds until the oplog overwrites `position_secs` at `bytes_per_second`, or
/// until the position is older than the minimum retention if that is later; 0 if it already
/// has been overwritten; `None` when nothing is being written.
pub fn headroom_seconds(
    reading: &Reading,
    bytes_per_second: f64,
    position_secs: i64,
) -> Option<f64> {
    if position_secs < reading.oldest_secs {
        return Some(0.0);
    }
    if bytes_per_second <= 0.0 {
        return None;
    }
    let span = (reading.newest_secs - reading.oldest_secs) as f64;
    let behind = (reading.newest_secs - position_secs).max(0) as f64;
    let after_position = match span > 0.0 {
        true => reading.size_bytes * (behind / span).min(1.0),
        false => 0.0,
    };
    let by_size = (reading.max_bytes - after_position).max(0.0) / bytes_per_second;
    // The newest entry stands for now: a replica set writes one every 10 s even when idle.
    let by_retention =
        position_secs as f64 + reading.min_retention_secs - reading.newest_secs as f64;
    Some(by_size.max(by_retention))
}

/// The level `headroom` sets, coming from `current`: a level is left for a better one only
/// once the headroom clears its threshold by [`HYSTERESIS`].
fn level(headroom: Option<f64>, lost: bool, thresholds: Thresholds, current: Level) -> Level {
    if lost {
        return Level::Lost;
    }
    let Some(headroom) = headroom else {
        return Level::Ok;
    };
    let threshold = |seconds: f64, level: Level| match current >= level {
        true => seconds * HYSTERESIS,
        false => seconds,
    };
    if headroom < threshold(thresholds.error, Level::Error) {
        Level::Error
    } else if headroom < threshold(thresholds.warn, Level::Warn) {
        Level::Warn
    } else {
        Level::Ok
    }
}

/// The status of one check.
fn assess(
    reading: &Reading,
    bytes_per_second: Option<f64>,
    position_secs: Option<i64>,
    thresholds: Thresholds,
    current: Level,
) -> Status {
    let headroom = match (position_secs, bytes_per_second) {
        (Some(position), Some(rate)) => headroom_seconds(reading, rate, position),
        _ => None,
    };
    let lost = position_secs.is_some_and(|p| p < reading.oldest_secs);
    Status {
        max_bytes: reading.max_bytes as u64,
        size_bytes: reading.size_bytes as u64,
        window_seconds: reading.newest_secs - reading.oldest_secs,
        min_retention_hours: reading.min_retention_secs / 3600.0,
        write_bytes_per_second: bytes_per_second,
        headroom_seconds: headroom,
        level: level(headroom, lost, thresholds, current),
        checked_at_unix_ms: crate::ops::metrics::unix_now_ms(),
    }
}

/// The level last logged, and when.
struct Reported {
    level: Level,
    at: Instant,
}

/// What one check has to say of one unit: a change of level, or a reminder of a warning or
/// error that has lasted [`REMINDER`].
#[derive(Debug, Clone, PartialEq)]
struct Line {
    pipeline: String,
    level: Level,
    threshold: f64,
    headroom_s: Option<i64>,
    lag_s: Option<i64>,
    oplog_max_mb: u64,
    oplog_used_mb: u64,
    write_kb_s: Option<f64>,
}

/// The line to log for a unit after a check, if any; records it as said.
fn to_say(
    pipeline: &str,
    status: &Status,
    position_secs: Option<i64>,
    thresholds: Thresholds,
    reported: &mut Reported,
) -> Option<Line> {
    let changed = status.level != reported.level;
    let remind = status.level != Level::Ok && reported.at.elapsed() >= REMINDER;
    if !changed && !remind {
        return None;
    }
    reported.level = status.level;
    reported.at = Instant::now();
    Some(Line {
        pipeline: pipeline.to_string(),
        level: status.level,
        threshold: match status.level {
            Level::Error => thresholds.error,
            _ => thresholds.warn,
        },
        headroom_s: status.headroom_seconds.map(|h| h.round() as i64),
        lag_s: position_secs.map(|p| crate::ops::metrics::unix_now_ms() / 1000 - p),
        oplog_max_mb: status.max_bytes / (1024 * 1024),
        oplog_used_mb: status.size_bytes / (1024 * 1024),
        write_kb_s: status
            .write_bytes_per_second
            .map(|r| (r / 1024.0 * 10.0).round() / 10.0),
    })
}

/// Units named in full in a line that speaks for several; the rest are counted.
const NAMED_UNITS: usize = 8;

/// One check's lines, merged by level and threshold: the units of one deployment share one
/// oplog, so a thousand tenants falling behind together is one line naming a few of them and
/// counting the rest, not a thousand lines.
#[derive(Default)]
struct Lines {
    groups: Vec<Vec<Line>>,
}

impl Lines {
    fn add(&mut self, line: Line) {
        match self
            .groups
            .iter_mut()
            .find(|group| group[0].level == line.level && group[0].threshold == line.threshold)
        {
            Some(group) => group.push(line),
            None => self.groups.push(vec![line]),
        }
    }

    fn log(self) {
        for group in self.groups {
            log_line(&merge(group));
        }
    }
}

/// One line for `group` (lines of one level, not empty): the pipelines it names, the
/// smallest headroom and the largest lag among them.
fn merge(group: Vec<Line>) -> Line {
    let units = group.len();
    let mut names: Vec<&str> = group
        .iter()
        .map(|l| l.pipeline.as_str())
        .take(NAMED_UNITS)
        .collect();
    let more = units.saturating_sub(names.len());
    let and_more = format!("and {more} more");
    if more > 0 {
        names.push(&and_more);
    }
    let pipeline = names.join(", ");
    let headroom_s = group.iter().filter_map(|l| l.headroom_s).min();
    let lag_s = group.iter().filter_map(|l| l.lag_s).max();
    Line {
        pipeline,
        headroom_s,
        lag_s,
        ..group[0].clone()
    }
}

fn log_line(line: &Line) {
    let Line {
        pipeline,
        level,
        threshold,
        headroom_s,
        lag_s,
        oplog_max_mb,
        oplog_used_mb,
        write_kb_s,
    } = line;
    let about = headroom_s.map(human_duration).unwrap_or_else(|| "?".into());
    match level {
        Level::Lost => tracing::error!(
            pipeline,
            lag_s,
            oplog_max_mb,
            oplog_used_mb,
            write_kb_s,
            "the checkpointed position is older than the oplog's oldest entry: it cannot be \
             resumed (see on_history_lost); enlarge the oplog so this does not happen again"
        ),
        Level::Error => {
            tracing::error!(
            pipeline, headroom_s, lag_s, oplog_max_mb, oplog_used_mb, write_kb_s,
            "at the current write rate the oplog overwrites the checkpointed position in about \
             {about} (below oplog_error_headroom_secs = {threshold}); catch up, enlarge the \
             oplog or write less"
        )
        }
        Level::Warn => {
            tracing::warn!(
            pipeline, headroom_s, lag_s, oplog_max_mb, oplog_used_mb, write_kb_s,
            "at the current write rate the oplog overwrites the checkpointed position in about \
             {about} (below oplog_warn_headroom_secs = {threshold}): an outage longer than \
             that loses the position; enlarge the oplog or write less"
        )
        }
        Level::Ok => tracing::info!(
            pipeline,
            headroom_s,
            lag_s,
            oplog_max_mb,
            oplog_used_mb,
            write_kb_s,
            "oplog headroom back above oplog_warn_headroom_secs"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1024.0 * 1024.0;
    const THRESHOLDS: Thresholds = Thresholds {
        warn: 3600.0,
        error: 600.0,
    };

    fn reading(max_mb: f64, size_mb: f64, oldest: i64, newest: i64) -> Reading {
        Reading {
            max_bytes: max_mb * MB,
            size_bytes: size_mb * MB,
            oldest_secs: oldest,
            newest_secs: newest,
            min_retention_secs: 0.0,
        }
    }

    /// A fresh 512 MB oplog holding 2 MB written over 2 seconds is not "past half of its
    /// window": at 1 KB/s its capacity is days.
    #[test]
    fn a_young_oplog_is_measured_by_its_capacity_not_its_age() {
        let young = reading(512.0, 2.0, 1000, 1002);
        let headroom = headroom_seconds(&young, 1024.0, 1001).expect("writes");
        assert!(headroom > 500_000.0, "{headroom}");
        assert_eq!(
            level(Some(headroom), false, THRESHOLDS, Level::Ok),
            Level::Ok
        );
    }

    #[test]
    fn headroom_counts_the_bytes_after_the_position() {
        // Full: 100 MB over 100 s; the position 50 s behind the newest entry has 50 MB after
        // it, so 50 MB more at 1 MB/s overwrite it.
        let full = reading(100.0, 100.0, 1000, 1100);
        let headroom = headroom_seconds(&full, MB, 1050).expect("writes");
        assert!((headroom - 50.0).abs() < 1e-6, "{headroom}");
        // Caught up: the whole capacity.
        assert_eq!(headroom_seconds(&full, MB, 1100), Some(100.0));
        // Already overwritten.
        assert_eq!(headroom_seconds(&full, MB, 999), Some(0.0));
        // Nothing written: no projection.
        assert_eq!(headroom_seconds(&full, 0.0, 1050), None);
    }

    #[test]
    fn a_minimum_retention_keeps_a_position_until_it_is_that_old() {
        // Full and written fast (100 s of capacity), but every entry is kept an hour: a
        // caught-up position is safe for the hour, one 50 s behind for 50 s less.
        let kept = Reading {
            min_retention_secs: 3600.0,
            ..reading(100.0, 100.0, 1000, 1100)
        };
        assert_eq!(headroom_seconds(&kept, MB, 1100), Some(3600.0));
        assert_eq!(headroom_seconds(&kept, MB, 1050), Some(3550.0));
        // Kept past its size (the oplog over its maximum): the retention alone counts.
        let over = Reading {
            min_retention_secs: 3600.0,
            ..reading(100.0, 300.0, 1000, 1100)
        };
        assert_eq!(headroom_seconds(&over, MB, 1100), Some(3600.0));
        // A retention shorter than what the size gives changes nothing.
        let short = Reading {
            min_retention_secs: 10.0,
            ..reading(100.0, 100.0, 1000, 1100)
        };
        assert_eq!(headroom_seconds(&short, MB, 1100), Some(100.0));
        // Overwritten is overwritten.
        assert_eq!(headroom_seconds(&kept, MB, 999), Some(0.0));
    }

    #[test]
    fn write_rate_includes_what_was_truncated() {
        let mut rate = WriteRate::default();
        let start = Instant::now();
        // Not full yet: the growth is what was written.
        rate.push(start, reading(10.0, 4.0, 1000, 1010));
        rate.push(
            start + Duration::from_secs(10),
            reading(10.0, 6.0, 1000, 1020),
        );
        let first = rate.bytes_per_second().expect("rate");
        assert!((first - 0.2 * MB).abs() < 1.0, "{first}");
        // Full: the size stands still and the oldest entry moves 10 of 20 s: half of 6 MB.
        rate.push(
            start + Duration::from_secs(20),
            reading(10.0, 6.0, 1010, 1030),
        );
        let rate = rate.bytes_per_second().expect("rate");
        assert!((rate - (2.0 + 3.0) * MB / 20.0).abs() < 1.0, "{rate}");
    }

    #[test]
    fn levels_have_hysteresis() {
        let at = |h: f64, current| level(Some(h), false, THRESHOLDS, current);
        assert_eq!(at(4000.0, Level::Ok), Level::Ok);
        assert_eq!(at(3000.0, Level::Ok), Level::Warn);
        assert_eq!(at(500.0, Level::Ok), Level::Error);
        // Just above a threshold: stays at the worse level until clear of it.
        assert_eq!(at(3700.0, Level::Warn), Level::Warn);
        assert_eq!(at(4000.0, Level::Warn), Level::Ok);
        assert_eq!(at(620.0, Level::Error), Level::Error);
        assert_eq!(at(700.0, Level::Error), Level::Warn);
        assert_eq!(level(None, false, THRESHOLDS, Level::Warn), Level::Ok);
        assert_eq!(level(Some(1e9), true, THRESHOLDS, Level::Ok), Level::Lost);
    }

    fn line(pipeline: &str, level: Level, headroom_s: i64, lag_s: i64) -> Line {
        Line {
            pipeline: pipeline.into(),
            level,
            threshold: if level == Level::Error { 600.0 } else { 3600.0 },
            headroom_s: Some(headroom_s),
            lag_s: Some(lag_s),
            oplog_max_mb: 128,
            oplog_used_mb: 53,
            write_kb_s: Some(5521.2),
        }
    }

    /// A thousand tenants crossing a threshold in one check are one line per level, naming a
    /// few, counting the rest, with the worst headroom and lag among them.
    #[test]
    fn a_thousand_units_alike_are_one_line() {
        let mut lines = Lines::default();
        for i in 0..1000 {
            lines.add(line(&format!("p.t{i}"), Level::Error, 30 + i, 5 + i % 7));
        }
        lines.add(line("q", Level::Warn, 3000, 1));
        assert_eq!(lines.groups.len(), 2);
        let mut groups = lines.groups.into_iter();
        let errors = merge(groups.next().expect("errors"));
        assert_eq!(
            errors.pipeline,
            "p.t0, p.t1, p.t2, p.t3, p.t4, p.t5, p.t6, p.t7, and 992 more"
        );
        assert_eq!((errors.headroom_s, errors.lag_s), (Some(30), Some(11)));
        assert_eq!(errors.level, Level::Error);
        // One unit alone keeps its own line.
        assert_eq!(
            merge(groups.next().expect("warn")),
            line("q", Level::Warn, 3000, 1)
        );
    }
}
