//! The router's unit tests: routing, waiting for tenants behind, detaching, the bounds.

use super::super::channel::{lane_channel, LaneReceiver, Load};
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
    let token = crate::model::token::token_from_document(bson::doc! { "_data": format!("{n:08}") })
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
        // Bytes never bound these scenarios.
        let events = |events| Load {
            events,
            bytes: usize::MAX / 4,
        };
        router.bounds = (events(bounds.0), events(bounds.1));
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

/// Joins tenant `id` to `router` (driven directly, without its task); its lane's receiver.
fn join_directly(router: &mut Router, id: &str) -> LaneReceiver {
    let (lane, receiver) = lane_channel();
    let (reply, _joined) = oneshot::channel();
    router.command(Command::Join {
        tenant: id.to_string(),
        lane,
        reply,
    });
    receiver
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
            .map(|id| join_directly(&mut router, id))
            .collect();
        let events: Vec<SourceItem> = (0..burst)
            .map(|n| item(&ids[(n % k) as usize], n + 1))
            .collect();
        for pass in events.chunks(PASS_EVENTS) {
            let held = router.route(pass.iter().map(copy).collect());
            assert!(held.is_empty(), "K = {k}: a lane was full");
        }
        let limit = router.bounds.0;
        assert_eq!(limit.events, DEFAULT_TENANT_LANE_EVENTS as usize);
        for (id, tenant) in ids.iter().zip(&router.tenants) {
            let queued = tenant.lane.as_ref().expect("still attached").queued();
            assert_eq!(queued.events as u32, burst / k, "K = {k}, {id}");
            assert!(
                queued.under_half(limit),
                "K = {k}, {id}: {queued:?} of {limit:?}"
            );
        }
        drop(lanes);
    }

    // A getMore's worth for one tenant alone (a database per tenant, written a thousand
    // documents at a time) does not make its lane full either.
    let mut router = Router::new("p", None);
    router.command(Command::Register(scope("t")));
    assert!(router.route(vec![item("c", 0)]).is_empty());
    let _receiver = join_directly(&mut router, "t");
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

/// A lane is full by its documents' bytes as well as by its events: with room for 1,000
/// events but only two documents' bytes, the third document waits.
#[test]
fn a_lane_is_full_by_bytes_too() {
    let mut router = Router::new("p", None);
    let one = Load::of(&[item("a", 1)]);
    router.bounds.0 = Load {
        events: 1000,
        bytes: 2 * one.bytes,
    };
    router.command(Command::Register(scope("a")));
    assert!(router.route(vec![item("c", 0)]).is_empty());
    let _receiver = join_directly(&mut router, "a");
    assert!(router.route(vec![item("a", 1)]).is_empty());
    assert!(router.route(vec![item("a", 2)]).is_empty());
    let held = router.route(vec![item("a", 3)]);
    assert_eq!(held.len(), 1, "the third document waits for room");
}
