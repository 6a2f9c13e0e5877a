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
use std::collections::{BTreeMap, VecDeque};

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

impl Lane {
    /// The lane's position in per-lane arrays.
    pub(super) fn index(self) -> usize {
        match self {
            Lane::Normal => 0,
            Lane::Background => 1,
        }
    }
}

/// One account's standing.
#[derive(Debug)]
struct Account<J> {
    /// CPU nanoseconds used, offset by the floor when it last woke.
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
}

/// The scheduler's state, behind the pool's lock. `J` is a queued turn.
#[derive(Debug)]
pub(super) struct Fair<J> {
    accounts: BTreeMap<AccountId, Account<J>>,
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
            accounts: BTreeMap::new(),
            share: Cell::new(None),
            floor: 0,
            workers: workers.max(1),
            background,
        }
    }

    /// Registers account `id`.
    pub(super) fn open(&mut self, id: AccountId, now: u64) {
        self.share.set(None);
        self.accounts.insert(
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
    }

    /// Forgets account `id` and anything it had queued.
    pub(super) fn close(&mut self, id: AccountId) {
        self.share.set(None);
        self.accounts.remove(&id);
    }

    /// Queues a turn of account `id` (nothing happens for an unknown account).
    pub(super) fn push(&mut self, id: AccountId, job: J, now: u64) {
        let floor = self.floor;
        if let Some(account) = self.accounts.get_mut(&id) {
            if !Self::is_active(account, now) {
                self.share.set(None);
            }
            if account.is_idle() {
                account.vtime = account.vtime.max(floor);
            }
            account.active_at = Some(now);
            account.queue.push_back(job);
        }
    }

    /// Whether a worker of `lane` would find a turn to take now.
    pub(super) fn has_ready(&self, lane: Lane, now: u64) -> bool {
        let share = self.fair_share(now);
        self.ready_accounts()
            .any(|(_, a)| Self::lane_of(a, share, now) == lane)
    }

    /// The accounts with a turn queued and none running: the only ones a worker may take a
    /// turn from. (A set of them kept apart was dearer: under load nearly every account is
    /// in it, and each step of its walk is a lookup.)
    fn ready_accounts(&self) -> impl Iterator<Item = (AccountId, &Account<J>)> {
        self.accounts
            .iter()
            .filter(|(_, a)| !a.running && !a.queue.is_empty())
            .map(|(id, a)| (*id, a))
    }

    /// The next turn for a worker of `lane`: the waiting account with the least virtual time
    /// among those of that lane that have no turn running. Marks it running.
    pub(super) fn pop(&mut self, lane: Lane, now: u64) -> Option<(AccountId, J)> {
        let share = self.fair_share(now);
        let id = self
            .ready_accounts()
            .filter(|(_, a)| Self::lane_of(a, share, now) == lane)
            .min_by_key(|(id, a)| (a.vtime, *id))
            .map(|(id, _)| id)?;
        let account = self.accounts.get_mut(&id)?;
        let job = account.queue.pop_front()?;
        account.running = true;
        account.active_at = Some(now);
        self.floor = self.floor.max(account.vtime);
        Some((id, job))
    }

    /// Records that a turn of account `id` ended after `cpu_ns` of CPU.
    pub(super) fn charge(&mut self, id: AccountId, cpu_ns: u64, now: u64) {
        if let Some(account) = self.accounts.get_mut(&id) {
            account.running = false;
            account.vtime = account.vtime.saturating_add(cpu_ns);
            account.rate = account.rate_now(now) + cpu_ns as f64 / RATE_WINDOW as f64;
            account.rate_at = now;
            account.active_at = Some(now);
            account.long_turn = cpu_ns > LONG_TURN;
        }
    }

    /// Records whether account `id`'s last turn broke a plugin limit; whether that changed.
    pub(super) fn breached(&mut self, id: AccountId, breached: bool) -> bool {
        match self.accounts.get_mut(&id) {
            Some(account) => std::mem::replace(&mut account.breached, breached) != breached,
            None => false,
        }
    }

    /// Whether account `id` is heavy now (see the module docs).
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
            let (id, ()) = fair.pop(Lane::Normal, now).expect("a waiting turn");
            let cost = costs[id as usize];
            now += cost;
            used[id as usize] += cost;
            fair.charge(id, cost, now);
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
            let (id, ()) = fair.pop(Lane::Normal, now).expect("turn");
            now += MS;
            fair.charge(id, MS, now);
            fair.push(id, (), now);
        }
        fair.push(1, (), now);
        // From now on both alternate: account 1 is not given 1000 turns in a row.
        let mut first_ten = Vec::new();
        for _ in 0..10 {
            let (id, ()) = fair.pop(Lane::Normal, now).expect("turn");
            first_ten.push(id);
            now += MS;
            fair.charge(id, MS, now);
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
        let first = fair.pop(Lane::Normal, 0).map(|(id, _)| id);
        let second = fair.pop(Lane::Normal, 0).map(|(id, _)| id);
        assert_eq!((first, second), (Some(0), Some(1)));
        assert!(fair.pop(Lane::Normal, 0).is_none());
        fair.charge(0, MS, MS);
        assert_eq!(fair.pop(Lane::Normal, MS).map(|(id, _)| id), Some(0));
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
            let (id, ()) = fair.pop(Lane::Normal, now).expect("hog turn");
            now += 80 * MS;
            fair.charge(id, 80 * MS, now);
        }
        assert!(!fair.is_heavy(0, now));
        // The light tenant arrives: now the hog (about 1 core, over 2 / 3) is heavy.
        fair.push(1, (), now);
        fair.push(0, (), now);
        assert!(fair.is_heavy(0, now));
        assert!(!fair.is_heavy(1, now));
        assert_eq!(fair.pop(Lane::Normal, now).map(|(id, _)| id), Some(1));
        assert!(fair.pop(Lane::Normal, now).is_none());
        assert_eq!(fair.pop(Lane::Background, now).map(|(id, _)| id), Some(0));
        fair.charge(1, MS / 10, now);
        fair.charge(0, 80 * MS, now + 80 * MS);
        // Idle for 5 s: its use has decayed, but its last turn was long: still heavy.
        now += 5_000 * MS;
        fair.push(1, (), now);
        fair.push(0, (), now);
        assert!(fair.is_heavy(0, now));
        // A short turn, and it is light again.
        assert_eq!(fair.pop(Lane::Background, now).map(|(id, _)| id), Some(0));
        fair.charge(0, MS, now + MS);
        assert!(!fair.is_heavy(0, now + MS));
    }

    /// A unit whose last turn broke a plugin limit (a header bomb: cheap calls, each over its
    /// output cap) runs in the background beside another active unit, however little CPU it
    /// uses; alone it is not heavy; after a turn without a breach it is light again.
    #[test]
    fn a_breaching_unit_runs_in_the_background() {
        let mut fair = accounts(2, 2);
        fair.push(0, (), 0);
        let (id, ()) = fair.pop(Lane::Normal, 0).expect("bomb turn");
        fair.charge(id, MS / 2, MS);
        fair.breached(id, true);
        assert!(!fair.is_heavy(0, MS), "alone: nobody to be fair to");
        fair.push(1, (), MS);
        fair.push(0, (), MS);
        assert!(fair.is_heavy(0, MS));
        assert!(!fair.is_heavy(1, MS));
        assert_eq!(fair.pop(Lane::Normal, MS).map(|(id, _)| id), Some(1));
        assert!(fair.pop(Lane::Normal, MS).is_none());
        assert_eq!(fair.pop(Lane::Background, MS).map(|(id, _)| id), Some(0));
        fair.charge(0, MS / 2, 2 * MS);
        fair.breached(0, false);
        assert!(!fair.is_heavy(0, 2 * MS), "a clean turn: light again");
    }

    /// A lane has a turn ready only when one of its accounts has a turn queued and none
    /// running: what decides which lane's worker the pool wakes.
    #[test]
    fn ready_turns_are_found_in_their_own_lane() {
        let mut fair = accounts(2, 2);
        assert!(!fair.has_ready(Lane::Normal, 0));
        fair.push(0, (), 0);
        fair.push(1, (), 0);
        fair.breached(1, true);
        assert!(fair.has_ready(Lane::Normal, 0));
        assert!(fair.has_ready(Lane::Background, 0));
        assert_eq!(fair.pop(Lane::Background, 0).map(|(id, _)| id), Some(1));
        fair.push(1, (), 0);
        assert!(
            !fair.has_ready(Lane::Background, 0),
            "its turn runs: the second one waits"
        );
        assert_eq!(fair.pop(Lane::Normal, 0).map(|(id, _)| id), Some(0));
        assert!(!fair.has_ready(Lane::Normal, 0));
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
            let (good, ()) = fair.pop(Lane::Normal, now).expect("good turn");
            fair.charge(good, MS / 10, now + MS / 10);
            fair.push(0, (), now);
            let lane = if fair.is_heavy(0, now) {
                Lane::Background
            } else {
                Lane::Normal
            };
            let (hog, ()) = fair.pop(lane, now).expect("hog turn");
            fair.charge(hog, 80 * MS, now + 80 * MS);
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
