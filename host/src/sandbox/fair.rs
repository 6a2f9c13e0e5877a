//! Who runs next on the worker pool: the scheduling decisions alone, with time and CPU costs
//! passed in, so that fairness is tested deterministically (see `pool` for the threads).
//!
//! - **Fair order.** Each account (one unit: a pipeline, or one tenant of it) has a virtual
//!   time, the CPU its turns have used. The next turn goes to the waiting account with the
//!   least virtual time, so under contention every account gets the same CPU time, whatever
//!   its calls cost. An account that was idle starts again at the current floor (the virtual
//!   time of the last turn started) rather than with credit for the time it slept.
//! - **One turn at a time.** An account never has two turns running: one tenant holds at most
//!   one worker, however much it has queued.
//! - **Heavy accounts run in the background.** An account whose recent CPU use (cores,
//!   decayed over [`RATE_WINDOW`]) is above its fair share, `workers / (active accounts + 1)`,
//!   or whose last turn used more than [`LONG_TURN`] of CPU or broke a plugin limit (fuel,
//!   deadline, memory, output size: a header bomb's calls are cheap, but each one is
//!   hostile work), while another account is active, is *heavy*: its turns run only on the
//!   background workers, which the OS runs only when no normal thread wants the CPU
//!   (`SCHED_IDLE`, see `pool`). The `+ 1` keeps a share for what is not plugin work (the
//!   async runtime, and MongoDB and NATS when they share the machine). A heavy account
//!   still gets every core nobody else wants, but a light account's turn never waits for a
//!   CPU a hog holds: the kernel preempts the hog. Alone, an account is never heavy.

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap, VecDeque};

/// The span over which an account's CPU use is averaged (the time constant of its decay),
/// in nanoseconds.
pub(super) const RATE_WINDOW: u64 = 1_000_000_000;

/// A turn that used more CPU than this (ns) makes its account heavy until its next turn:
/// one call that long holds a core however rarely it comes (a hog slowed by the breach pause
/// uses little CPU on average, but each of its calls runs to its fuel).
pub(super) const LONG_TURN: u64 = 10_000_000;

/// How long a computed fair share is used before it is counted again (ns): counting is a pass
/// over every account, and the share was counted several times per turn (a thousand tenants
/// made it most of the pool's work). Accounts that start or stop being active through a
/// turn queued or an account opened or closed count at once; only the slow drift of
/// accounts going idle waits this long.
const SHARE_FRESH: u64 = 1_000_000;

/// An account's number.
pub(super) type AccountId = u64;

/// Which workers may take a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// Normal priority: light accounts.
    Normal,
    /// Lowest priority: heavy accounts.
    Background,
}

/// One account's standing.
#[derive(Debug)]
struct Account<J> {
    /// CPU nanoseconds used, offset by the floor when it last woke. Not changed while the
    /// account is in [`Fair::ready`] (it is part of the key there).
    vtime: u64,
    /// Recent CPU use in cores, as of `rate_at`.
    rate: f64,
    rate_at: u64,
    /// When it last had a turn queued, running or finished (`None`: never).
    active_at: Option<u64>,
    queue: VecDeque<J>,
    running: bool,
    /// Whether its last turn used more than [`LONG_TURN`].
    long_turn: bool,
    /// Whether its last turn broke a plugin limit.
    breached: bool,
}

impl<J> Account<J> {
    fn rate_now(&self, now: u64) -> f64 {
        let age = now.saturating_sub(self.rate_at) as f64;
        self.rate * (-age / RATE_WINDOW as f64).exp()
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && !self.running
    }

    /// Whether a worker may take its next turn: one queued and none running.
    fn is_ready(&self) -> bool {
        !self.running && !self.queue.is_empty()
    }
}

/// What [`Fair::pop`] found.
pub(super) struct Popped<J> {
    /// The turn to run, and its account.
    pub(super) turn: Option<(AccountId, J)>,
    /// Whether a ready turn of the other lane was passed over on the way (its account
    /// changed lane while it waited: a worker of that lane may be asleep).
    pub(super) passed_other: bool,
}

/// What [`Fair::charge`] left.
pub(super) struct Charged {
    /// Whether the account is heavy now (where its next turn runs).
    pub(super) heavy: bool,
    /// The lane of its next turn, if one is queued.
    pub(super) ready: Option<Lane>,
}

/// The scheduler's state, behind the pool's lock. `J` is a queued turn.
///
/// Every step of a turn (queue, take, charge) costs O(log K) for K accounts: the accounts
/// with a turn ready are kept ordered by virtual time (`ready`), so the next turn is the
/// first of them whose lane is the worker's; a pass over every account is made only to count
/// the fair share, at most once per [`SHARE_FRESH`]. (A set of ready ids walked whole for
/// the least virtual time was dearer than the plain pass it replaced: under load nearly every
/// account is ready; kept in order, the walk stops at the first of the worker's lane.)
#[derive(Debug)]
pub(super) struct Fair<J> {
    accounts: HashMap<AccountId, Account<J>>,
    /// The accounts for which [`Account::is_ready`] holds, by (virtual time, id).
    ready: BTreeSet<(u64, AccountId)>,
    /// The last fair share counted, and when (see [`SHARE_FRESH`]).
    share: Cell<Option<(u64, Option<f64>)>>,
    floor: u64,
    workers: usize,
    /// Whether heavy accounts are set apart at all (`sandbox.background`).
    background: bool,
}

impl<J> Fair<J> {
    /// No accounts yet, for a pool of `workers` normal workers, with or without a
    /// `background` lane (without it, no account is ever heavy).
    pub(super) fn new(workers: usize, background: bool) -> Fair<J> {
        Fair {
            accounts: HashMap::new(),
            ready: BTreeSet::new(),
            share: Cell::new(None),
            floor: 0,
            workers: workers.max(1),
            background,
        }
    }

    /// Registers account `id`.
    pub(super) fn open(&mut self, id: AccountId, now: u64) {
        self.share.set(None);
        let replaced = self.accounts.insert(
            id,
            Account {
                vtime: self.floor,
                rate: 0.0,
                rate_at: now,
                active_at: None,
                queue: VecDeque::new(),
                running: false,
                long_turn: false,
                breached: false,
            },
        );
        if let Some(old) = replaced {
            self.ready.remove(&(old.vtime, id));
        }
    }

    /// Forgets account `id` and anything it had queued.
    pub(super) fn close(&mut self, id: AccountId) {
        self.share.set(None);
        if let Some(account) = self.accounts.remove(&id) {
            self.ready.remove(&(account.vtime, id));
        }
    }

    /// Queues a turn of account `id` (nothing happens for an unknown account); returns the
    /// lane that now has a turn of it ready (`None` while one of its turns runs).
    pub(super) fn push(&mut self, id: AccountId, job: J, now: u64) -> Option<Lane> {
        let floor = self.floor;
        let account = self.accounts.get_mut(&id)?;
        if !Self::is_active(account, now) {
            self.share.set(None);
        }
        if account.is_idle() {
            account.vtime = account.vtime.max(floor);
        }
        account.active_at = Some(now);
        let was_ready = account.is_ready();
        account.queue.push_back(job);
        if !account.is_ready() {
            return None;
        }
        if !was_ready {
            self.ready.insert((account.vtime, id));
        }
        let share = self.fair_share(now);
        self.accounts
            .get(&id)
            .map(|account| Self::lane_of(account, share, now))
    }

    /// Whether a worker of `lane` would find a turn to take now (a walk in virtual-time
    /// order that stops at the first of the lane).
    #[cfg(test)]
    pub(super) fn has_ready(&self, lane: Lane, now: u64) -> bool {
        let share = self.fair_share(now);
        self.ready.iter().any(|(_, id)| {
            self.accounts
                .get(id)
                .is_some_and(|a| Self::lane_of(a, share, now) == lane)
        })
    }

    /// The next turn for a worker of `lane`: the waiting account with the least virtual time
    /// among those of that lane that have no turn running. Marks it running.
    pub(super) fn pop(&mut self, lane: Lane, now: u64) -> Popped<J> {
        let share = self.fair_share(now);
        let mut passed_other = false;
        let mut chosen = None;
        for &(vtime, id) in &self.ready {
            let Some(account) = self.accounts.get(&id) else {
                continue;
            };
            if Self::lane_of(account, share, now) == lane {
                chosen = Some((vtime, id));
                break;
            }
            passed_other = true;
        }
        let turn = chosen.and_then(|(vtime, id)| {
            self.ready.remove(&(vtime, id));
            let account = self.accounts.get_mut(&id)?;
            let job = account.queue.pop_front()?;
            account.running = true;
            account.active_at = Some(now);
            self.floor = self.floor.max(account.vtime);
            Some((id, job))
        });
        Popped { turn, passed_other }
    }

    /// Records that a turn of account `id` ended after `cpu_ns` of CPU, and whether it broke
    /// a plugin limit.
    pub(super) fn charge(
        &mut self,
        id: AccountId,
        cpu_ns: u64,
        breached: bool,
        now: u64,
    ) -> Charged {
        let Some(account) = self.accounts.get_mut(&id) else {
            return Charged {
                heavy: false,
                ready: None,
            };
        };
        if account.is_ready() {
            // Not reached while it ran; kept in step should a caller charge a turn it did
            // not take.
            self.ready.remove(&(account.vtime, id));
        }
        account.running = false;
        account.vtime = account.vtime.saturating_add(cpu_ns);
        account.rate = account.rate_now(now) + cpu_ns as f64 / RATE_WINDOW as f64;
        account.rate_at = now;
        account.active_at = Some(now);
        account.long_turn = cpu_ns > LONG_TURN;
        account.breached = breached;
        if account.is_ready() {
            self.ready.insert((account.vtime, id));
        }
        let share = self.fair_share(now);
        let Some(account) = self.accounts.get(&id) else {
            return Charged {
                heavy: false,
                ready: None,
            };
        };
        let lane = Self::lane_of(account, share, now);
        Charged {
            heavy: lane == Lane::Background,
            ready: account.is_ready().then_some(lane),
        }
    }

    /// Whether account `id` is heavy now (see the module docs).
    #[cfg(test)]
    pub(super) fn is_heavy(&self, id: AccountId, now: u64) -> bool {
        let share = self.fair_share(now);
        self.accounts
            .get(&id)
            .is_some_and(|a| Self::lane_of(a, share, now) == Lane::Background)
    }

    /// A fair share of the workers, in cores, among the accounts active within the last
    /// [`RATE_WINDOW`]; `None` when at most one is (nobody to be fair to).
    fn fair_share(&self, now: u64) -> Option<f64> {
        if let Some((at, share)) = self.share.get() {
            if now >= at && now - at < SHARE_FRESH {
                return share;
            }
        }
        let active = self
            .accounts
            .values()
            .filter(|a| Self::is_active(a, now))
            .count();
        let share =
            (self.background && active > 1).then(|| self.workers as f64 / (active + 1) as f64);
        self.share.set(Some((now, share)));
        share
    }

    /// Whether `account` counts in the fair share: a turn queued or running, or one within
    /// the last [`RATE_WINDOW`].
    fn is_active(account: &Account<J>, now: u64) -> bool {
        !account.is_idle()
            || account
                .active_at
                .is_some_and(|at| now.saturating_sub(at) < RATE_WINDOW)
    }

    fn lane_of(account: &Account<J>, share: Option<f64>, now: u64) -> Lane {
        match share {
            // The decay only lowers the rate: below the share, `exp` need not be called (it
            // was a tenth of the pool's work with a thousand tenants queued).
            Some(share)
                if account.long_turn
                    || account.breached
                    || (account.rate > share && account.rate_now(now) > share) =>
            {
                Lane::Background
            }
            _ => Lane::Normal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Runs `turns` turns on one worker, each account's turn costing its entry of `costs`
    /// (ns) and every account always having work; returns the CPU each got. (Callers leave
    /// out the background lane: this is the order within a lane.)
    fn contend(fair: &mut Fair<()>, costs: &[u64], turns: usize) -> Vec<u64> {
        let mut used = vec![0u64; costs.len()];
        let mut now = 0u64;
        for id in 0..costs.len() as u64 {
            fair.push(id, (), now);
        }
        for _ in 0..turns {
            let (id, ()) = fair.pop(Lane::Normal, now).turn.expect("a waiting turn");
            let cost = costs[id as usize];
            now += cost;
            used[id as usize] += cost;
            fair.charge(id, cost, false, now);
            fair.push(id, (), now);
        }
        used
    }

    impl<J> Fair<J> {
        fn rate_now_of(&self, id: AccountId, now: u64) -> f64 {
            self.accounts[&id].rate_now(now)
        }
    }

    /// `n` accounts on `workers` workers; `workers` 0: one worker and no background lane,
    /// to test the order within a lane alone.
    fn accounts(n: u64, workers: usize) -> Fair<()> {
        let mut fair = Fair::new(workers.max(1), workers > 0);
        for id in 0..n {
            fair.open(id, 0);
        }
        fair
    }

    /// A tenant whose turns cost 80 ms (a call burning its whole fuel) and one whose turns
    /// cost 1 ms get the same CPU time under contention, not 80 times more for the hog.
    #[test]
    fn cpu_time_is_shared_equally_whatever_a_turn_costs() {
        let mut fair = accounts(2, 0);
        let used = contend(&mut fair, &[80 * MS, MS], 2000);
        let (hog, good) = (used[0] as f64, used[1] as f64);
        assert!(
            (hog / good - 1.0).abs() < 0.1,
            "hog {hog} ns, good {good} ns: shares should be equal"
        );
    }

    /// Three equal tenants and one hog: each gets a quarter of the CPU.
    #[test]
    fn four_accounts_get_a_quarter_each() {
        let mut fair = accounts(4, 0);
        let used = contend(&mut fair, &[2 * MS, 2 * MS, 2 * MS, 50 * MS], 4000);
        let total: u64 = used.iter().sum();
        for (id, u) in used.iter().enumerate() {
            let share = *u as f64 / total as f64;
            assert!((share - 0.25).abs() < 0.03, "account {id} got {share:.3}");
        }
    }

    /// An account that slept does not come back with credit for the time it slept: it
    /// starts at the floor, so it cannot then hold the workers for as long as it was away.
    #[test]
    fn a_sleeper_starts_at_the_floor() {
        let mut fair = accounts(2, 0);
        contend(&mut fair, &[MS, MS], 1);
        // Account 1 leaves; account 0 runs alone for a long time.
        fair.close(1);
        fair.open(1, 0);
        let mut now = 0;
        for _ in 0..1000 {
            let (id, ()) = fair.pop(Lane::Normal, now).turn.expect("turn");
            now += MS;
            fair.charge(id, MS, false, now);
            fair.push(id, (), now);
        }
        fair.push(1, (), now);
        // From now on both alternate: account 1 is not given 1000 turns in a row.
        let mut first_ten = Vec::new();
        for _ in 0..10 {
            let (id, ()) = fair.pop(Lane::Normal, now).turn.expect("turn");
            first_ten.push(id);
            now += MS;
            fair.charge(id, MS, false, now);
            fair.push(id, (), now);
        }
        let zeros = first_ten.iter().filter(|id| **id == 0).count();
        assert!((4..=6).contains(&zeros), "turns: {first_ten:?}");
    }

    /// An account never has two turns running, so one tenant holds at most one worker.
    #[test]
    fn one_turn_per_account_at_a_time() {
        let mut fair = accounts(2, 4);
        fair.push(0, (), 0);
        fair.push(0, (), 0);
        fair.push(1, (), 0);
        let first = fair.pop(Lane::Normal, 0).turn.map(|(id, _)| id);
        let second = fair.pop(Lane::Normal, 0).turn.map(|(id, _)| id);
        assert_eq!((first, second), (Some(0), Some(1)));
        assert!(fair.pop(Lane::Normal, 0).turn.is_none());
        fair.charge(0, MS, false, MS);
        assert_eq!(fair.pop(Lane::Normal, MS).turn.map(|(id, _)| id), Some(0));
    }

    /// A hog that keeps a core busy beside a light tenant becomes heavy and is offered only
    /// to background workers; the light one stays on normal workers. Alone, the hog is not
    /// heavy; and once it stops, it becomes light again as its use decays.
    #[test]
    fn a_hog_beside_others_runs_in_the_background() {
        let mut fair = accounts(2, 2);
        let mut now = 0;
        // The hog alone, a whole core for 2 s: not heavy (nobody to be fair to).
        for _ in 0..25 {
            fair.push(0, (), now);
            let (id, ()) = fair.pop(Lane::Normal, now).turn.expect("hog turn");
            now += 80 * MS;
            fair.charge(id, 80 * MS, false, now);
        }
        assert!(!fair.is_heavy(0, now));
        // The light tenant arrives: now the hog (about 1 core, over 2 / 3) is heavy.
        fair.push(1, (), now);
        fair.push(0, (), now);
        assert!(fair.is_heavy(0, now));
        assert!(!fair.is_heavy(1, now));
        assert_eq!(fair.pop(Lane::Normal, now).turn.map(|(id, _)| id), Some(1));
        assert!(fair.pop(Lane::Normal, now).turn.is_none());
        assert_eq!(
            fair.pop(Lane::Background, now).turn.map(|(id, _)| id),
            Some(0)
        );
        fair.charge(1, MS / 10, false, now);
        fair.charge(0, 80 * MS, false, now + 80 * MS);
        // Idle for 5 s: its use has decayed, but its last turn was long: still heavy.
        now += 5_000 * MS;
        fair.push(1, (), now);
        fair.push(0, (), now);
        assert!(fair.is_heavy(0, now));
        // A short turn, and it is light again.
        assert_eq!(
            fair.pop(Lane::Background, now).turn.map(|(id, _)| id),
            Some(0)
        );
        fair.charge(0, MS, false, now + MS);
        assert!(!fair.is_heavy(0, now + MS));
    }

    /// A unit whose last turn broke a plugin limit (a header bomb: cheap calls, each over its
    /// output cap) runs in the background beside another active unit, however little CPU it
    /// uses; alone it is not heavy; after a turn without a breach it is light again.
    #[test]
    fn a_breaching_unit_runs_in_the_background() {
        let mut fair = accounts(2, 2);
        fair.push(0, (), 0);
        let (id, ()) = fair.pop(Lane::Normal, 0).turn.expect("bomb turn");
        fair.charge(id, MS / 2, true, MS);
        assert!(!fair.is_heavy(0, MS), "alone: nobody to be fair to");
        fair.push(1, (), MS);
        fair.push(0, (), MS);
        assert!(fair.is_heavy(0, MS));
        assert!(!fair.is_heavy(1, MS));
        assert_eq!(fair.pop(Lane::Normal, MS).turn.map(|(id, _)| id), Some(1));
        assert!(fair.pop(Lane::Normal, MS).turn.is_none());
        assert_eq!(
            fair.pop(Lane::Background, MS).turn.map(|(id, _)| id),
            Some(0)
        );
        let charged = fair.charge(0, MS / 2, false, 2 * MS);
        assert!(!charged.heavy, "a clean turn: light again");
        assert!(!fair.is_heavy(0, 2 * MS));
    }

    /// A queued turn is ready in its account's lane, and only while none of its turns runs:
    /// what decides which lane's worker the pool wakes. A worker that passes over the other
    /// lane's ready turn says so.
    #[test]
    fn ready_turns_are_found_in_their_own_lane() {
        let mut fair = accounts(2, 2);
        assert!(!fair.has_ready(Lane::Normal, 0));
        assert_eq!(
            fair.push(1, (), 0),
            Some(Lane::Normal),
            "alone: never heavy"
        );
        let (id, ()) = fair.pop(Lane::Normal, 0).turn.expect("turn");
        // Its turn broke a plugin limit: heavy as soon as another account is active.
        let charged = fair.charge(id, MS / 10, true, MS);
        assert!(!charged.heavy && charged.ready.is_none());
        assert_eq!(fair.push(0, (), MS), Some(Lane::Normal));
        assert_eq!(fair.push(1, (), MS), Some(Lane::Background));
        assert!(fair.has_ready(Lane::Normal, MS));
        assert!(fair.has_ready(Lane::Background, MS));
        let popped = fair.pop(Lane::Background, MS);
        assert_eq!(popped.turn.map(|(id, _)| id), Some(1));
        assert!(
            popped.passed_other,
            "account 0 (less virtual time) was passed over"
        );
        assert_eq!(
            fair.push(1, (), MS),
            None,
            "its turn runs: the second one waits"
        );
        assert!(!fair.has_ready(Lane::Background, MS));
        let popped = fair.pop(Lane::Normal, MS);
        assert_eq!(popped.turn.map(|(id, _)| id), Some(0));
        assert!(!popped.passed_other);
        assert!(!fair.has_ready(Lane::Normal, MS));
        let charged = fair.charge(1, MS / 10, false, 2 * MS);
        assert_eq!(
            charged.ready,
            Some(Lane::Normal),
            "a clean turn: light again"
        );
    }

    /// A closed account's queued turns are gone from the order, and a thousand accounts
    /// with a turn each are served least virtual time first, each once.
    #[test]
    fn the_ready_order_follows_pushes_pops_and_closes() {
        let mut fair = accounts(1000, 2);
        for id in 0..1000 {
            fair.push(id, (), 0);
        }
        fair.close(0);
        let mut served = Vec::new();
        while let Some((id, ())) = fair.pop(Lane::Normal, 0).turn {
            served.push(id);
        }
        assert_eq!(served, (1..1000).collect::<Vec<_>>());
        // Charged in reverse, so that their virtual times are in reverse order.
        for (i, &id) in served.iter().rev().enumerate() {
            fair.push(id, (), 0);
            fair.charge(id, 1000 + i as u64, false, 0);
        }
        let first = fair.pop(Lane::Normal, 0).turn.map(|(id, _)| id);
        assert_eq!(first, Some(999), "the least CPU used goes first");
    }

    /// A hog slowed down by the breach pause (one 80 ms call every 400 ms: a fifth of a
    /// core on average, under its fair share) is still heavy: each of its calls would hold a
    /// core for 80 ms.
    #[test]
    fn a_paced_hog_with_long_calls_is_heavy() {
        let mut fair = accounts(2, 2);
        let mut now = 0;
        for _ in 0..10 {
            fair.push(1, (), now);
            let (good, ()) = fair.pop(Lane::Normal, now).turn.expect("good turn");
            fair.charge(good, MS / 10, false, now + MS / 10);
            fair.push(0, (), now);
            let lane = if fair.is_heavy(0, now) {
                Lane::Background
            } else {
                Lane::Normal
            };
            let (hog, ()) = fair.pop(lane, now).turn.expect("hog turn");
            fair.charge(hog, 80 * MS, false, now + 80 * MS);
            now += 400 * MS;
        }
        fair.push(0, (), now);
        assert!(
            fair.rate_now_of(0, now) < 0.67,
            "under its fair share on average"
        );
        assert!(fair.is_heavy(0, now));
    }
}
