//! The shared reader's router: which tenants an event belongs to, in constant time per event
//! (a hash map on the namespace, or on the tenant key's value), and each tenant's batch handed
//! to its lane without waiting for it while another tenant could be kept waiting. A tenant
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

use super::channel::LaneSender;
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
    /// The events a lane holds before it counts as full (`pipeline.tenant_lane_events`), and
    /// [`READER_EVENTS`] (other in tests).
    bounds: (usize, usize),
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
            bounds: (DEFAULT_TENANT_LANE_EVENTS as usize, READER_EVENTS),
        }
    }

    /// The router, with lanes full at `events` (`pipeline.tenant_lane_events`).
    pub(super) fn lane_events(mut self, events: u32) -> Router {
        self.bounds.0 = events as usize;
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
                if lane.has_room(share.len(), self.bounds.0) {
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

    /// Whether the attached lanes hold [`READER_EVENTS`] or more, so that the reader's next
    /// batch waits; `since` keeps when that began. A wait as long as [`BEHIND_WAIT`] means
    /// tenants that are stuck rather than slow: the one holding the most is detached then,
    /// and the wait starts over.
    fn over_bound(&mut self, since: &mut Option<Instant>) -> bool {
        let queued: usize = self.lanes().map(|(_, lane)| lane.queued()).sum();
        if queued < self.bounds.1 {
            *since = None;
            return false;
        }
        let began = *since.get_or_insert_with(Instant::now);
        if began.elapsed() >= self.behind_wait {
            let fullest = self
                .lanes()
                .max_by_key(|(_, lane)| lane.queued())
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
            .any(|(id, lane)| id != behind && lane.queued() * 2 < self.bounds.0)
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
            if !lane.has_room(share.len(), self.bounds.0) {
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
mod tests {
    use super::super::channel::{lane_channel, LaneReceiver};
    use super::*;
    use bson::rawdoc;

    /// The key is read at its dotted path, as the text key values name it by; absent, null
    /// or of another type is named.
    #[test]
    fn key_values_are_read_at_their_path() {
        let id = bson::oid::ObjectId::parse_str("65a1f0c2e4b0a1b2c3d4e5f6").expect("oid");
        let event = rawdoc! { "fullDocument": {
            "t": "a", "n": 1, "l": -7i64, "d": 42.0, "f": 42.5, "o": id, "b": true, "z": null,
        } };
        let read = |path| key_value(&event, path).map(Cow::into_owned);
        assert_eq!(read("fullDocument.t"), Ok("a".to_string()));
        assert_eq!(read("fullDocument.n"), Ok("1".to_string()));
        assert_eq!(read("fullDocument.l"), Ok("-7".to_string()));
        assert_eq!(read("fullDocument.d"), Ok("42".to_string()));
        assert_eq!(
            read("fullDocument.o"),
            Ok("65a1f0c2e4b0a1b2c3d4e5f6".to_string())
        );
        assert_eq!(read("fullDocument.f"), Err(Unroutable::KeyType));
        assert_eq!(read("fullDocument.b"), Err(Unroutable::KeyType));
        assert_eq!(read("fullDocument.z"), Err(Unroutable::KeyMissing));
        assert_eq!(read("fullDocument.t.x"), Err(Unroutable::KeyMissing));
        assert_eq!(read("documentKey.t"), Err(Unroutable::KeyMissing));
    }

    /// An item of collection `db.<coll>` with token `n`.
    fn item(coll: &str, n: u32) -> SourceItem {
        let token =
            crate::model::token::token_from_document(bson::doc! { "_data": format!("{n:08}") })
                .expect("token");
        let namespace = Namespace {
            db: "db".to_string(),
            coll: Some(coll.to_string()),
        };
        let change = Change::from_fields(
            crate::model::Fields::new(
                format!("{coll}{n}"),
                crate::model::Operation::Insert,
                namespace,
            ),
            None,
        )
        .expect("change");
        SourceItem::Event(Box::new(crate::model::SourceEvent {
            token,
            change,
            snapshot: None,
        }))
    }

    /// The change ids of a share.
    fn ids(share: &[SourceItem]) -> Vec<String> {
        share
            .iter()
            .filter_map(|item| match item {
                SourceItem::Event(event) => Some(event.change.id().to_string()),
                _ => None,
            })
            .collect()
    }

    /// Waits (event by event, without a deadline of its own) until the router has taken
    /// every batch sent to it.
    async fn taken(batches: &mpsc::Sender<Vec<SourceItem>>) {
        while batches.capacity() < batches.max_capacity() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Runs a router scenario under a generous ceiling: a router that waits wrongly would
    /// otherwise hang the test.
    async fn within_ceiling(scenario: impl std::future::Future<Output = ()>) {
        tokio::time::timeout(Duration::from_secs(120), scenario)
            .await
            .expect("the router stopped routing");
    }

    /// Tenant `id`, seeing `db.<id>`.
    fn scope(id: &str) -> crate::config::TenantScope {
        crate::config::TenantScope {
            id: id.to_string(),
            namespaces: vec![
                crate::config::NamespacePattern::parse(&format!("db.{id}")).expect("pattern")
            ],
            pipeline: "p".to_string(),
            key_values: Vec::new(),
        }
    }

    /// A router running as the shared reader runs it, fed batches by the test.
    struct Running {
        batches: mpsc::Sender<Vec<SourceItem>>,
        commands: mpsc::UnboundedSender<Command>,
        _position: watch::Receiver<Option<ResumeToken>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Running {
        /// Starts a router whose lanes hold `lane_events` events and that waits for tenants
        /// behind at most `behind_wait`, with tenants `ids` registered.
        fn start(lane_events: usize, behind_wait: Duration, ids: &[&str]) -> Running {
            Running::bounded((lane_events, READER_EVENTS), behind_wait, ids)
        }

        /// As [`Running::start`], with the lanes' and the reader's bounds.
        fn bounded(bounds: (usize, usize), behind_wait: Duration, ids: &[&str]) -> Running {
            let (batches, batches_rx) = mpsc::channel(4);
            let (commands, commands_rx) = mpsc::unbounded_channel();
            let (position, _position) = watch::channel(None);
            let mut router = Router::new("p", None);
            router.behind_wait = behind_wait;
            router.bounds = bounds;
            let task = tokio::spawn(router.run(batches_rx, commands_rx, position));
            for id in ids {
                commands.send(Command::Register(scope(id))).expect("router");
            }
            Running {
                batches,
                commands,
                _position,
                task,
            }
        }

        /// Asks for tenant `id` to join; the answer is the router's position.
        fn join(&self, id: &str) -> (LaneReceiver, oneshot::Receiver<ResumeToken>) {
            let (lane, lane_rx) = lane_channel();
            let (reply, joined) = oneshot::channel();
            let join = Command::Join {
                tenant: id.to_string(),
                lane,
                reply,
            };
            self.commands.send(join).expect("router");
            (lane_rx, joined)
        }

        async fn send(&self, batch: Vec<SourceItem>) {
            self.batches.send(batch).await.expect("router");
        }

        /// Sends `batch` and waits until the router has taken it: it is routed in a pass of
        /// its own.
        async fn pass(&self, batch: Vec<SourceItem>) {
            self.send(batch).await;
            taken(&self.batches).await;
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// The ids of the next `n` events in `lane`; fewer if it ends first.
    async fn next_events(lane: &mut LaneReceiver, n: usize) -> Vec<String> {
        let mut seen = Vec::new();
        while seen.len() < n {
            match lane.recv().await {
                Some(message) => seen.extend(ids(&message)),
                None => break,
            }
        }
        seen
    }

    /// `prefix` followed by each of `numbers`.
    fn named(prefix: &str, numbers: std::ops::RangeInclusive<u32>) -> Vec<String> {
        numbers.map(|n| format!("{prefix}{n}")).collect()
    }

    /// The only attached tenant is never detached for being behind: the router waits for
    /// room in its lane (the reader's batches wait meanwhile) and it gets every event, in
    /// order. Once a second tenant joins, the one behind is detached rather than waited
    /// for, and the newcomer's events flow.
    #[tokio::test]
    async fn the_only_attached_tenant_is_waited_for_until_another_joins() {
        within_ceiling(only_attached_tenant_scenario()).await;
    }

    async fn only_attached_tenant_scenario() {
        let router = Running::start(1, BEHIND_WAIT, &["a", "b"]);
        let (mut lane_a, joined) = router.join("a");
        router.send(vec![item("c", 0)]).await;
        joined.await.expect("a joined");

        // `a` alone: its lane holds one event, and a second and third wait for it.
        for n in 1..=3 {
            router.send(vec![item("a", n)]).await;
        }
        assert_eq!(next_events(&mut lane_a, 3).await, named("a", 1..=3));

        // Behind again, then `b` joins while the router waits for `a`.
        router.pass(vec![item("a", 4)]).await;
        router.pass(vec![item("a", 5)]).await;
        let (mut lane_b, joined) = router.join("b");
        let at = joined.await.expect("b joined");
        let token_id = crate::model::token::token_id;
        assert_eq!(token_id(&at), token_id(item("a", 5).token()));
        assert_eq!(next_events(&mut lane_a, 2).await, ["a4"], "a was detached");
        router.send(vec![item("b", 6)]).await;
        assert_eq!(next_events(&mut lane_b, 1).await, ["b6"]);
    }

    /// Two tenants both behind (neither takes from its lane) are waited for, not detached:
    /// nobody keeps up, so detaching would only add change streams. Once one catches up
    /// (drains its lane), the one still behind is detached and the other's events flow.
    #[tokio::test]
    async fn tenants_all_behind_are_waited_for_until_one_keeps_up() {
        within_ceiling(all_behind_scenario()).await;
    }

    async fn all_behind_scenario() {
        let router = Running::start(4, BEHIND_WAIT, &["a", "b"]);
        let (mut lane_a, joined_a) = router.join("a");
        let (mut lane_b, joined_b) = router.join("b");
        router.send(vec![item("c", 0)]).await;
        joined_a.await.expect("a joined");
        joined_b.await.expect("b joined");

        // Four passes fill both lanes; the fifth finds both full.
        for n in 1..=5 {
            router.pass(vec![item("a", n), item("b", n)]).await;
        }
        // Several rechecks' worth: still both attached.
        tokio::time::sleep(BEHIND_RECHECK * 5).await;
        assert!(
            !lane_a.is_closed() && !lane_b.is_closed(),
            "a tenant was detached"
        );

        // `b` catches up: `a`, still behind, is detached, and `b` gets its fifth.
        assert_eq!(next_events(&mut lane_b, 5).await, named("b", 1..=5));
        assert_eq!(next_events(&mut lane_a, 5).await, named("a", 1..=4));
        router.send(vec![item("a", 6), item("b", 6)]).await;
        assert_eq!(next_events(&mut lane_b, 1).await, ["b6"]);
    }

    /// The only attached tenant that makes no room for the router's wait limit is detached
    /// after all, and the router reads on.
    #[tokio::test]
    async fn the_only_attached_tenant_is_detached_when_stuck() {
        within_ceiling(stuck_tenant_scenario()).await;
    }

    async fn stuck_tenant_scenario() {
        let router = Running::start(1, Duration::from_millis(200), &["a"]);
        let (mut lane_a, joined) = router.join("a");
        router.send(vec![item("c", 0)]).await;
        joined.await.expect("a joined");
        // `a` takes nothing: its lane holds 1, the router waits with 2, then gives up.
        for n in 1..=3 {
            router.pass(vec![item("a", n)]).await;
        }
        assert_eq!(next_events(&mut lane_a, 2).await, ["a1"], "a was detached");
    }

    /// Lanes that together hold the reader's bound, none of them full, make the reader's
    /// batches wait (the process as a whole is behind): nobody is detached, and the next
    /// batch is routed once a chain has taken from its lane.
    #[tokio::test]
    async fn lanes_at_the_readers_bound_hold_the_reader_back() {
        within_ceiling(readers_bound_scenario()).await;
    }

    async fn readers_bound_scenario() {
        let router = Running::bounded((8, 4), BEHIND_WAIT, &["a", "b"]);
        let (mut lane_a, joined_a) = router.join("a");
        let (mut lane_b, joined_b) = router.join("b");
        router.pass(vec![item("c", 0)]).await;
        joined_a.await.expect("a joined");
        joined_b.await.expect("b joined");
        router.pass(vec![item("a", 1), item("b", 1)]).await;
        router.pass(vec![item("a", 2), item("b", 2)]).await;
        // Four events queued: the third batch waits in the reader's queue.
        router.send(vec![item("a", 3), item("b", 3)]).await;
        tokio::time::sleep(BEHIND_RECHECK * 5).await;
        assert_eq!(router.batches.capacity() + 1, router.batches.max_capacity());
        assert!(!lane_a.is_closed() && !lane_b.is_closed());

        assert_eq!(next_events(&mut lane_a, 2).await, named("a", 1..=2));
        taken(&router.batches).await;
        assert_eq!(next_events(&mut lane_b, 3).await, named("b", 1..=3));
        assert_eq!(next_events(&mut lane_a, 1).await, ["a3"]);
        assert!(!lane_a.is_closed() && !lane_b.is_closed());
    }

    /// Lanes at the reader's bound that nobody takes from for the wait limit: the tenant
    /// holding the most is detached, and the reader reads on.
    #[tokio::test]
    async fn lanes_stuck_at_the_readers_bound_detach_the_fullest() {
        within_ceiling(stuck_at_bound_scenario()).await;
    }

    async fn stuck_at_bound_scenario() {
        let router = Running::bounded((8, 4), Duration::from_millis(200), &["a", "b"]);
        let (mut lane_a, joined_a) = router.join("a");
        let (mut lane_b, joined_b) = router.join("b");
        router.pass(vec![item("c", 0)]).await;
        joined_a.await.expect("a joined");
        joined_b.await.expect("b joined");
        let first = vec![item("a", 1), item("a", 2), item("a", 3), item("b", 1)];
        router.pass(first).await;
        router.pass(vec![item("a", 4), item("b", 2)]).await;
        assert_eq!(next_events(&mut lane_a, 4).await, named("a", 1..=3));
        assert_eq!(next_events(&mut lane_b, 2).await, named("b", 1..=2));
        assert!(!lane_b.is_closed(), "b is still attached");
    }

    /// What the reader's queue holds is routed in one pass: each tenant gets one share
    /// with all of its events, however many reader batches they came in.
    #[tokio::test]
    async fn queued_batches_are_routed_in_one_pass() {
        let router = Running::start(
            DEFAULT_TENANT_LANE_EVENTS as usize,
            BEHIND_WAIT,
            &["a", "b"],
        );
        let (mut lane_a, joined_a) = router.join("a");
        let (mut lane_b, joined_b) = router.join("b");
        router.send(vec![item("c", 0)]).await;
        joined_a.await.expect("a joined");
        joined_b.await.expect("b joined");
        // Four batches queue before the router runs again (this runtime has one thread, and
        // sends with room never yield to it).
        for n in 1..=4 {
            let batch = vec![item("a", n), item("b", n)];
            router.batches.send(batch).await.expect("router");
        }
        taken(&router.batches).await;
        let a = lane_a.recv().await.expect("a's share");
        let b = lane_b.recv().await.expect("b's share");
        assert_eq!(ids(&a), named("a", 1..=4));
        assert_eq!(ids(&b), named("b", 1..=4));
    }

    /// One getMore of the shared reader's size, routed over K tenants before any of them
    /// takes anything, leaves every lane less than half full: a burst alone never makes a
    /// tenant look behind, nor another look as if it kept up while the first is full (which
    /// is what detached tenants when lanes were counted in messages: a burst put dozens of
    /// one-event shares in each). Nothing is lost on the way.
    #[test]
    fn a_burst_leaves_every_lane_less_than_half_full() {
        let burst = crate::source::SHARED_BATCH_SIZE;
        for k in [2u32, 10, 100, 1000] {
            let mut router = Router::new("p", None);
            let ids: Vec<String> = (0..k).map(|t| format!("t{t}")).collect();
            for id in &ids {
                router.command(Command::Register(scope(id)));
            }
            assert!(router.route(vec![item("c", 0)]).is_empty());
            let lanes: Vec<LaneReceiver> = ids
                .iter()
                .map(|id| {
                    let (lane, receiver) = lane_channel();
                    let (reply, _joined) = oneshot::channel();
                    router.command(Command::Join {
                        tenant: id.clone(),
                        lane,
                        reply,
                    });
                    receiver
                })
                .collect();
            let events: Vec<SourceItem> = (0..burst)
                .map(|n| item(&ids[(n % k) as usize], n + 1))
                .collect();
            for pass in events.chunks(PASS_EVENTS) {
                let held = router.route(pass.iter().map(copy).collect());
                assert!(held.is_empty(), "K = {k}: a lane was full");
            }
            let limit = DEFAULT_TENANT_LANE_EVENTS as usize;
            for (id, tenant) in ids.iter().zip(&router.tenants) {
                let lane = tenant.lane.as_ref().expect("still attached");
                assert_eq!(lane.queued() as u32, burst / k, "K = {k}, {id}");
                assert!(
                    lane.queued() * 2 < limit,
                    "K = {k}, {id}: {} of {limit}",
                    lane.queued()
                );
            }
            drop(lanes);
        }

        // A getMore's worth for one tenant alone (a database per tenant, written a thousand
        // documents at a time) does not make its lane full either.
        let mut router = Router::new("p", None);
        router.command(Command::Register(scope("t")));
        assert!(router.route(vec![item("c", 0)]).is_empty());
        let (lane, _receiver) = lane_channel();
        let (reply, _joined) = oneshot::channel();
        router.command(Command::Join {
            tenant: "t".to_string(),
            lane,
            reply,
        });
        let events: Vec<SourceItem> = (0..burst).map(|n| item("t", n + 1)).collect();
        for pass in events.chunks(PASS_EVENTS) {
            let pass = pass.iter().map(copy).collect();
            assert!(router.route(pass).is_empty(), "t's lane was full");
        }
    }

    /// A key value claimed twice stays with the tenant that claimed it first, whatever the
    /// order in which others register or leave.
    #[test]
    fn a_key_value_never_moves_to_a_second_claimant() {
        let scope = |id: &str| crate::config::TenantScope {
            id: id.to_string(),
            namespaces: vec![crate::config::NamespacePattern::parse("db.*").expect("pattern")],
            pipeline: "p".to_string(),
            key_values: vec!["acme".to_string()],
        };
        let key = TenantKey::parse("fullDocument.t").expect("key");
        let mut router = Router::new("p", Some(key));
        router.command(Command::Register(scope("first")));
        router.command(Command::Register(scope("second")));
        let owner = |router: &Router| router.tenants[router.by_key["acme"]].scope.id.clone();
        assert_eq!(owner(&router), "first");
        router.command(Command::Register(scope("third")));
        assert_eq!(owner(&router), "first");
        router.command(Command::Leave("first".to_string()));
        assert_eq!(owner(&router), "second");
    }
}
