//! The shared reader's router: which tenants an event belongs to, in constant time per event
//! (a hash map on the namespace, or on the tenant key's value), and each tenant's share handed
//! to its lane without waiting for it while another tenant could be kept waiting. What the
//! reader has queued is routed in one pass ([`PASS_EVENTS`]), one share per tenant, and lanes
//! are counted in events and bytes (`channel.rs`): full at `pipeline.tenant_lane_events` or
//! [`LANE_BYTES`], and together bounded by [`READER_EVENTS`] and [`READER_BYTES`], past
//! which the reader's next batch waits. A tenant
//! whose lane is full while another attached tenant keeps up (its lane less than half full)
//! is detached: the router drops its lane and the tenant reads on from its own position
//! (`lane.rs`), so the one keeping up is never held up.
//!
//! When no other attached tenant keeps up (the tenant is the only one attached, or every
//! tenant is behind because the whole process is: a burst on a busy machine), there is
//! nobody to protect: the router waits for room, and the change stream waits with it, as a
//! unit's own stream waits for its chain. Detaching would only open more change streams on
//! mongod to read the same events again, with less CPU for everyone. The wait ends when
//! there is room; when another tenant keeps up again (one that drained its lane, or joined
//! with an empty one: the full ones are detached then); when the tenant leaves; or after
//! [`BEHIND_WAIT`] without room: a tenant that is stuck rather than slow (its stream away, a
//! halted chain) is detached after all, so that the shared change stream reads on and never
//! idles long enough for mongod to reap its cursor.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::raw::{RawBsonRef, RawDocument};
use mongodb::change_stream::event::ResumeToken;
use tokio::sync::{mpsc, oneshot, watch};

use super::channel::{LaneSender, Load};
use crate::config::{TenantKey, TenantScope, DEFAULT_TENANT_LANE_EVENTS, KEYED_OPERATIONS};
use crate::model::{Change, Namespace};
use crate::ops::metrics::PipelineMetrics;
use crate::source::SourceItem;

/// Broadcast the reader's position to idle lanes at most this often: it only moves their
/// checkpoints (saved once a second by default), and each lane it reaches costs a pass
/// through that tenant's stages; with many tenants one send per lane per change-stream batch
/// would cost more than the events.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// The longest the router waits for room in the lanes of tenants that are behind (while no
/// other keeps up) before detaching them. A tenant that is merely slow makes room far sooner
/// (each batch it takes); mongod reaps a cursor left idle for ten minutes.
const BEHIND_WAIT: Duration = Duration::from_secs(30);

/// How often a wait for room looks again whether another tenant keeps up (and would now be
/// held up by the wait).
const BEHIND_RECHECK: Duration = Duration::from_millis(20);

/// The events the router leaves queued across its attached tenants' lanes before it takes
/// the reader's next batch: what the shared reader holds in memory ahead of its tenants'
/// chains, however many there are. Reaching it means the process as a whole is behind (no
/// one lane need be full), so the reader waits, as a unit's own stream waits for its chain.
/// A lane counts as full at `pipeline.tenant_lane_events`, in events, not in shares: a burst
/// for one tenant (a database per tenant, written a thousand documents at a time) is not a
/// slow tenant, nor is a large getMore routed as dozens of one-event shares (`channel.rs`).
const READER_EVENTS: usize = crate::config::SHARED_READER_EVENTS as usize;

/// The bytes (documents' BSON) the router leaves queued across its attached tenants' lanes
/// before it takes the reader's next batch, as [`READER_EVENTS`] bounds their number:
/// documents run up to 16 MiB, and 65,536 of them would be a terabyte.
const READER_BYTES: usize = 256 << 20;

/// The bytes a lane holds before it counts as full, beside `pipeline.tenant_lane_events`:
/// a quarter of [`READER_BYTES`], as the default lane is a quarter of [`READER_EVENTS`].
const LANE_BYTES: usize = READER_BYTES / 4;

/// The most events the router takes from the reader's queue for one pass: what queued while
/// it routed the last is routed together, so that each tenant gets one share of several
/// events rather than several shares of a fraction of one (see `channel.rs`).
const PASS_EVENTS: usize = 4_096;

/// What a tenant's lane asks of the router.
pub(super) enum Command {
    /// A tenant unit started: its events are routed to it (while it has a lane) and no longer
    /// counted as unroutable.
    Register(TenantScope),
    /// Install `lane` for `tenant`: every event of the tenant routed after the reader's
    /// current position (sent on `reply`) goes to it.
    Join {
        tenant: String,
        lane: LaneSender,
        reply: oneshot::Sender<ResumeToken>,
    },
    /// A tenant unit stopped.
    Leave(String),
}

/// Why an event belongs to no running tenant (logged once per kind, counted as out of
/// scope on the pipeline's own series).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Unroutable {
    Namespace,
    KeyMissing,
    KeyType,
    KeyUnknown,
    KeyOutsideNamespaces,
}

impl Unroutable {
    fn describe(self) -> &'static str {
        match self {
            Unroutable::Namespace => "no running tenant owns its namespace",
            Unroutable::KeyMissing => "it does not carry the tenant key (an update whose document was deleted before the lookup, a delete without pre-image…)",
            Unroutable::KeyType => {
                "its tenant key is not a string, an integer or an ObjectId"
            }
            Unroutable::KeyUnknown => "no running tenant owns its tenant key's value",
            Unroutable::KeyOutsideNamespaces => "the tenant owning its key value may not see its namespace",
        }
    }
}

/// One registered tenant.
struct Tenant {
    scope: TenantScope,
    /// Its lane while attached.
    lane: Option<LaneSender>,
    /// Whether an event went to its lane since the last heartbeat: its position moved with
    /// that event, so the next heartbeat skips it (at K = 1000 under load, heartbeats to
    /// every lane were as many sends as the events).
    fed: bool,
}

/// The share of a tenant that is behind, routed while its lane was full and no other tenant
/// kept up.
struct Held {
    tenant: String,
    share: Vec<SourceItem>,
}

/// The routing tables of one shared reader, rebuilt when a tenant registers or leaves
/// (rare), read for every event.
pub(super) struct Router {
    pipeline: String,
    key: Option<TenantKey>,
    tenants: Vec<Tenant>,
    /// Tenants with a `db.coll` pattern, by (db, coll).
    exact: HashMap<(String, String), Vec<usize>>,
    /// Tenants with a `db.*` pattern, by db.
    whole: HashMap<String, Vec<usize>>,
    /// Tenants with any pattern in a database (for database-wide events).
    any_in: HashMap<String, Vec<usize>>,
    /// By tenant key value.
    by_key: HashMap<String, usize>,
    /// The token of the last item routed: where a joining lane takes over.
    position: Option<ResumeToken>,
    /// Joins waiting for the first position.
    pending: Vec<(String, LaneSender, oneshot::Sender<ResumeToken>)>,
    logged: HashSet<Unroutable>,
    last_heartbeat: Option<Instant>,
    stats: Arc<PipelineMetrics>,
    /// [`BEHIND_WAIT`], shorter in tests.
    behind_wait: Duration,
    /// The load a lane holds before it counts as full (`pipeline.tenant_lane_events` and
    /// [`LANE_BYTES`]), and the lanes together ([`READER_EVENTS`], [`READER_BYTES`]); other
    /// in tests.
    bounds: (Load, Load),
}

impl Router {
    pub(super) fn new(pipeline: &str, key: Option<TenantKey>) -> Router {
        Router {
            pipeline: pipeline.to_string(),
            key,
            tenants: Vec::new(),
            exact: HashMap::new(),
            whole: HashMap::new(),
            any_in: HashMap::new(),
            by_key: HashMap::new(),
            position: None,
            pending: Vec::new(),
            logged: HashSet::new(),
            last_heartbeat: None,
            stats: crate::ops::metrics::pipeline(pipeline),
            behind_wait: BEHIND_WAIT,
            bounds: (
                Load {
                    events: DEFAULT_TENANT_LANE_EVENTS as usize,
                    bytes: LANE_BYTES,
                },
                Load {
                    events: READER_EVENTS,
                    bytes: READER_BYTES,
                },
            ),
        }
    }

    /// The router, with lanes full at `events` (`pipeline.tenant_lane_events`).
    pub(super) fn lane_events(mut self, events: u32) -> Router {
        self.bounds.0.events = events as usize;
        self
    }

    /// Routes batches from the reader and answers the lanes until the reader ends; publishes
    /// the reader's position on `position` for lanes deciding when to join.
    pub(super) async fn run(
        mut self,
        mut batches: mpsc::Receiver<Vec<SourceItem>>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        position: watch::Sender<Option<ResumeToken>>,
    ) {
        // When the lanes hold the reader's bound, since when (see [`Router::over_bound`]).
        let mut full_since = None;
        loop {
            let full = self.over_bound(&mut full_since);
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => return,
                },
                // Room is made by the chains taking from their lanes: looked at again shortly.
                () = tokio::time::sleep(BEHIND_RECHECK), if full => {}
                batch = batches.recv(), if !full => match batch {
                    Some(mut batch) => {
                        while batch.len() < PASS_EVENTS {
                            match batches.try_recv() {
                                Ok(more) => batch.extend(more),
                                Err(_) => break,
                            }
                        }
                        let held = self.route(batch);
                        if !held.is_empty() && !self.wait_for_room(held, &mut commands).await {
                            return;
                        }
                        position.send_replace(self.position.clone());
                        self.install_pending();
                    }
                    None => return,
                },
            }
        }
    }

    /// Hands each `held` share to its tenant's lane once it has room, serving commands
    /// meanwhile; detaches the tenant instead as soon as another attached tenant keeps up
    /// (so that no one waits for it), or once the wait has lasted [`BEHIND_WAIT`]. False
    /// when the commands' channel has closed (the reader is gone).
    async fn wait_for_room(
        &mut self,
        held: Vec<Held>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> bool {
        tracing::debug!(pipeline = %self.pipeline, behind = held.len(), "every attached tenant is behind: the shared change stream waits for them");
        let limit = tokio::time::sleep(self.behind_wait);
        tokio::pin!(limit);
        for Held { tenant, share } in held {
            while let Some(lane) = self.lane_of(&tenant) {
                if lane.is_closed() {
                    self.detach(&tenant);
                    break;
                }
                if lane.has_room(Load::of(&share), self.bounds.0) {
                    if !lane.send(share) {
                        self.detach(&tenant);
                    }
                    break;
                }
                if self.someone_keeps_up(&tenant) {
                    self.detach(&tenant);
                    break;
                }
                tokio::select! {
                    biased;
                    command = commands.recv() => match command {
                        Some(command) => self.command(command),
                        None => return false,
                    },
                    () = &mut limit => {
                        self.detach(&tenant);
                        break;
                    }
                    // Room, or time to look at the others again.
                    () = lane.taken_or_closed() => {}
                    () = tokio::time::sleep(BEHIND_RECHECK) => {}
                }
            }
        }
        true
    }

    /// Whether the attached lanes hold [`READER_EVENTS`] or [`READER_BYTES`], so that the next
    /// reader batch waits; `since` keeps when that began. A wait as long as [`BEHIND_WAIT`] means
    /// tenants that are stuck rather than slow: the one holding the most is detached then,
    /// and the wait starts over.
    fn over_bound(&mut self, since: &mut Option<Instant>) -> bool {
        let queued = self
            .lanes()
            .fold(Load::default(), |sum, (_, lane)| sum.plus(lane.queued()));
        if !queued.reaches(self.bounds.1) {
            *since = None;
            return false;
        }
        let began = *since.get_or_insert_with(Instant::now);
        if began.elapsed() >= self.behind_wait {
            let fullest = self
                .lanes()
                .max_by_key(|(_, lane)| (lane.queued().bytes, lane.queued().events))
                .map(|(id, _)| id.to_string());
            if let Some(id) = fullest {
                self.detach(&id);
            }
            *since = None;
        }
        true
    }

    /// The attached tenants' ids and lanes.
    fn lanes(&self) -> impl Iterator<Item = (&str, &LaneSender)> {
        self.tenants
            .iter()
            .filter_map(|t| Some((t.scope.id.as_str(), t.lane.as_ref()?)))
    }

    /// `tenant`'s lane, while it is attached.
    fn lane_of(&self, tenant: &str) -> Option<LaneSender> {
        self.tenants
            .iter()
            .find(|t| t.scope.id == tenant)
            .and_then(|t| t.lane.clone())
    }

    /// Whether an attached tenant other than `behind` keeps up: its lane is less than half
    /// full, so a wait for `behind` would hold it up.
    fn someone_keeps_up(&self, behind: &str) -> bool {
        self.lanes()
            .any(|(id, lane)| id != behind && lane.queued().under_half(self.bounds.0))
    }

    /// Drops `tenant`'s lane: it reads on from its own position.
    fn detach(&mut self, tenant: &str) {
        let Some(tenant) = self.tenants.iter_mut().find(|t| t.scope.id == tenant) else {
            return;
        };
        if tenant.lane.take().is_some_and(|lane| !lane.is_closed()) {
            tracing::info!(pipeline = %self.pipeline, tenant = %tenant.scope.id, "tenant detached from the shared change stream (it is behind: slow plugins, its stream unavailable, or held); it reads on alone and rejoins when caught up");
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Register(scope) => {
                self.tenants.retain(|t| t.scope.id != scope.id);
                self.tenants.push(Tenant {
                    scope,
                    lane: None,
                    fed: false,
                });
                self.rebuild();
            }
            Command::Leave(id) => {
                self.tenants.retain(|t| t.scope.id != id);
                self.pending.retain(|(tenant, _, _)| *tenant != id);
                self.rebuild();
            }
            Command::Join {
                tenant,
                lane,
                reply,
            } => {
                self.pending.push((tenant, lane, reply));
                self.install_pending();
            }
        }
    }

    /// Installs the waiting lanes once the reader has a position (its first batch).
    fn install_pending(&mut self) {
        let Some(position) = &self.position else {
            return;
        };
        for (id, lane, reply) in std::mem::take(&mut self.pending) {
            let Some(tenant) = self.tenants.iter_mut().find(|t| t.scope.id == id) else {
                continue;
            };
            if reply.send(position.clone()).is_ok() {
                tenant.lane = Some(lane);
            }
        }
    }

    fn rebuild(&mut self) {
        self.exact.clear();
        self.whole.clear();
        self.any_in.clear();
        self.by_key.clear();
        for (i, tenant) in self.tenants.iter().enumerate() {
            for pattern in &tenant.scope.namespaces {
                let db = pattern.db.clone();
                match &pattern.coll {
                    Some(coll) => self.exact.entry((db.clone(), coll.clone())).or_default(),
                    None => self.whole.entry(db.clone()).or_default(),
                }
                .push(i);
                let any = self.any_in.entry(db).or_default();
                if !any.contains(&i) {
                    any.push(i);
                }
            }
            for value in &tenant.scope.key_values {
                // Validation gives each value one tenant; should two claim one anyway (tenants
                // added at run time), the first keeps it: a value never moves to a newcomer.
                match self.by_key.entry(value.clone()) {
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(i);
                    }
                    std::collections::hash_map::Entry::Occupied(_) => tracing::error!(
                        pipeline = %self.pipeline,
                        tenant = %tenant.scope.id,
                        "key value {value:?} belongs to another tenant already; its events are not routed to this one"
                    ),
                }
            }
        }
    }

    /// Splits `batch` by tenant and hands each attached tenant its share. The shares of
    /// tenants whose lanes are full are returned, to be handed over when there is room
    /// ([`Router::wait_for_room`]), when no other attached tenant keeps up; otherwise those
    /// tenants are detached.
    fn route(&mut self, batch: Vec<SourceItem>) -> Vec<Held> {
        let mut shares: HashMap<usize, Vec<SourceItem>> = HashMap::new();
        let mut heartbeat = None;
        if let Some(item) = batch.last() {
            self.position = Some(item.token().clone());
        }
        for item in batch {
            let event = match &item {
                SourceItem::Event(event) | SourceItem::Oversize { event, .. } => event,
                SourceItem::Heartbeat(token, _) => {
                    heartbeat = Some(token.clone());
                    continue;
                }
            };
            heartbeat = None;
            self.stats.read();
            let owners = match self.owners(&event.change) {
                Ok(owners) => owners,
                Err(why) => {
                    self.unroutable(why, &event.change);
                    continue;
                }
            };
            let attached: Vec<usize> = owners
                .into_iter()
                .filter(|&i| self.tenants[i].lane.is_some())
                .collect();
            if let Some((&last, rest)) = attached.split_last() {
                for &i in rest {
                    shares.entry(i).or_default().push(copy(&item));
                }
                shares.entry(last).or_default().push(item);
            }
        }
        for &i in shares.keys() {
            self.tenants[i].fed = true;
        }
        // The reader's position after the batch moves on the checkpoint of every attached
        // lane that had no event since the last heartbeat.
        let due = self
            .last_heartbeat
            .is_none_or(|at| at.elapsed() >= HEARTBEAT_EVERY);
        if let (Some(token), true) = (heartbeat, due) {
            self.last_heartbeat = Some(Instant::now());
            for (i, tenant) in self.tenants.iter_mut().enumerate() {
                let fed = std::mem::replace(&mut tenant.fed, false);
                if tenant.lane.is_some() && !fed {
                    let share = shares.entry(i).or_default();
                    share.push(SourceItem::Heartbeat(token.clone(), None));
                }
            }
        }
        let mut full = Vec::new();
        for (i, share) in shares {
            let Some(lane) = &self.tenants[i].lane else {
                continue;
            };
            if !lane.has_room(Load::of(&share), self.bounds.0) {
                full.push(Held {
                    tenant: self.tenants[i].scope.id.clone(),
                    share,
                });
            } else if !lane.send(share) {
                self.detach(&self.tenants[i].scope.id.clone());
            }
        }
        // Behind while another keeps up: detached, so that the other never waits.
        let (detached, held): (Vec<Held>, Vec<Held>) = full
            .into_iter()
            .partition(|held| self.someone_keeps_up(&held.tenant));
        for held in detached {
            self.detach(&held.tenant);
        }
        held
    }

    /// The tenants `change` belongs to.
    fn owners(&self, change: &Change) -> Result<Vec<usize>, Unroutable> {
        let by_namespace = self.by_namespace(change.namespace());
        let Some(key) = &self.key else {
            return non_empty(by_namespace, Unroutable::Namespace);
        };
        let operation = change.operation().as_str();
        if !KEYED_OPERATIONS.contains(&operation) {
            return non_empty(by_namespace, Unroutable::Namespace);
        }
        let value = key_value(change.document(), key.path_for(operation))?;
        let owner = *self
            .by_key
            .get(value.as_ref())
            .ok_or(Unroutable::KeyUnknown)?;
        match by_namespace.contains(&owner) {
            true => Ok(vec![owner]),
            false => Err(Unroutable::KeyOutsideNamespaces),
        }
    }

    /// The tenants whose namespaces include `namespace` (every tenant for a stream-wide
    /// event without one).
    fn by_namespace(&self, namespace: &Namespace) -> Vec<usize> {
        if namespace.db.is_empty() {
            return (0..self.tenants.len()).collect();
        }
        let Some(coll) = &namespace.coll else {
            return self.any_in.get(&namespace.db).cloned().unwrap_or_default();
        };
        let mut owners = self
            .exact
            .get(&(namespace.db.clone(), coll.clone()))
            .cloned()
            .unwrap_or_default();
        for &i in self.whole.get(&namespace.db).into_iter().flatten() {
            if !owners.contains(&i) {
                owners.push(i);
            }
        }
        owners
    }

    /// Counts an event no running tenant owns, and logs the first of each kind.
    fn unroutable(&mut self, why: Unroutable, change: &Change) {
        self.stats.out_of_scope();
        if self.logged.insert(why) {
            tracing::warn!(
                pipeline = %self.pipeline,
                namespace = %change.namespace(),
                operation = change.operation().as_str(),
                "an event no tenant receives: {}; such events are counted in \
                 tidegate_events_out_of_scope_total{{pipeline=\"{}\"}} and logged once per kind",
                why.describe(),
                self.pipeline
            );
        }
    }
}

/// `owners`, or `why` when there are none.
fn non_empty(owners: Vec<usize>, why: Unroutable) -> Result<Vec<usize>, Unroutable> {
    match owners.is_empty() {
        true => Err(why),
        false => Ok(owners),
    }
}

/// An event for a second tenant (namespaces may overlap).
fn copy(item: &SourceItem) -> SourceItem {
    match item {
        SourceItem::Event(event) => SourceItem::Event(event.clone()),
        SourceItem::Oversize { event, size } => SourceItem::Oversize {
            event: event.clone(),
            size: *size,
        },
        SourceItem::Heartbeat(token, progress) => {
            SourceItem::Heartbeat(token.clone(), progress.clone())
        }
    }
}

/// The key value at dotted `path` in `event`, as the text tenants' `key_values` name it by
/// ([`TenantKey::value_text`]).
fn key_value<'a>(event: &'a RawDocument, path: &str) -> Result<Cow<'a, str>, Unroutable> {
    let mut document = event;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let value = match document.get(part) {
            Ok(Some(RawBsonRef::Null)) | Ok(None) | Err(_) => return Err(Unroutable::KeyMissing),
            Ok(Some(value)) => value,
        };
        if parts.peek().is_none() {
            return TenantKey::value_text(value).ok_or(Unroutable::KeyType);
        }
        document = match value {
            RawBsonRef::Document(inner) => inner,
            _ => return Err(Unroutable::KeyMissing),
        };
    }
    Err(Unroutable::KeyMissing)
}

#[cfg(test)]
mod tests;
