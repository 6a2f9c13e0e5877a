//! The worker pool every unit's plugin chain runs on: a fixed number of OS threads shared by
//! all units, however many tenants there are, with turns handed out by [`Fair`].
//!
//! Each unit opens a [`PoolAccount`] and runs its chain in short turns (one slice of a
//! batch, see `pipeline::chain_thread`). A turn is a closure; its thread CPU time is charged
//! to the account. There are `workers` normal threads and as many background threads, which
//! move themselves to the `SCHED_IDLE` policy once at start (nice 19 where that is refused;
//! an unprivileged process cannot undo either, so the lanes are separate threads): a heavy
//! account's turns run only there.
//!
//! **A background worker never takes the pool's lock.** Under `SCHED_IDLE` a thread may wait
//! a long time for a CPU while every core is busy; had it been holding the lock, every normal
//! worker and every unit queueing a turn (async runtime threads) would have waited with it: a
//! heavy tenant would have stalled everyone, the priority inversion the lane exists to avoid.
//! So turns reach a background worker through its own channel (filled by normal-priority
//! threads holding the lock, read with `try_recv` and `park`, neither of which takes a lock),
//! and it hands each finished turn to a normal-priority settler thread, which charges it
//! under the lock and feeds the lane again.
//!
//! The pool is process-wide ([`pool`]) like the metrics registry: one per process, sized by
//! the first [`configure`] (`sandbox.workers`, 0 meaning one per core; `sandbox.background =
//! false` leaves out the background lane), started on first use.
//! Its threads live as long as the process; idle, normal workers wait on a condition variable
//! and background workers park.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::fair::{AccountId, Fair, Lane};

/// How long an idle normal worker sleeps before looking again even unwoken: accounts move
/// between lanes as their recent CPU use decays and as others become active, without any
/// event to wake a worker (each look also feeds idle background workers).
const IDLE_RECHECK: Duration = Duration::from_millis(50);

/// A queued turn: a unit's closure, run by a worker without the pool's lock, and answered
/// once the worker has charged it.
trait Job: Send {
    /// Runs the unit's closure; returns the CPU time it used and whether it broke a plugin
    /// limit.
    fn run(&mut self) -> (Duration, bool);

    /// Hands the result to the unit, with whether the account is heavy now.
    fn answer(self: Box<Self>, heavy: bool);
}

/// A queued turn (one allocation: the closure, its result and the way back together).
type Turn = Box<dyn Job>;

/// A unit's turn before and after it runs.
struct UnitTurn<F, R> {
    turn: Option<F>,
    ran: Option<(R, Duration)>,
    done: tokio::sync::oneshot::Sender<Ran<R>>,
}

impl<F, R> Job for UnitTurn<F, R>
where
    F: FnOnce() -> (R, Strain) + Send,
    R: Send,
{
    fn run(&mut self) -> (Duration, bool) {
        let Some(turn) = self.turn.take() else {
            return (Duration::ZERO, false);
        };
        let started = thread_cpu_time();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(turn));
        let cpu = thread_cpu_time().saturating_sub(started);
        match outcome {
            Ok((value, strain)) => {
                let held = cpu.saturating_add(strain.waited);
                self.ran = Some((value, held));
                (held, strain.breached)
            }
            Err(_) => (cpu, false),
        }
    }

    fn answer(self: Box<Self>, heavy: bool) {
        // A turn that panicked sends nothing: the unit sees its channel closed.
        if let Some((value, cpu)) = self.ran {
            let _ = self.done.send(Ran { value, cpu, heavy });
        }
    }
}

/// What a turn tells the pool of itself beyond the CPU time its thread used.
#[derive(Debug, Clone, Copy, Default)]
pub struct Strain {
    /// Whether it broke a plugin limit (a call out of fuel, past its deadline, over its
    /// memory or output caps: until a turn that does not, the account is heavy beside other
    /// active accounts, see `fair`).
    pub breached: bool,
    /// How long its plugins' waits blocked the worker (a plugin granted the clock may sleep
    /// up to its deadline): charged as CPU time, since a wait holds the worker as computing
    /// does, so a tenant that sleeps on every event is heavy as one that spins is.
    pub waited: Duration,
}

/// What a unit's turn returned, and what it cost.
pub struct Ran<R> {
    /// The closure's result.
    pub value: R,
    /// The CPU time the turn used, with the time its plugins' waits blocked.
    pub cpu: Duration,
    /// Whether the account is heavy after this turn (its next turn runs on the background
    /// workers).
    pub heavy: bool,
}

/// The process's pool of plugin workers.
pub struct WorkerPool {
    shared: Arc<Shared>,
    workers: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes one normal worker: a normal-lane turn is ready.
    wake_normal: Condvar,
    epoch: Instant,
    next_id: AtomicU64,
}

/// What the pool's lock guards.
struct State {
    fair: Fair<Turn>,
    /// Normal workers waiting for a turn: a wake-up is a system call, made only when one may
    /// find someone (a turn queued or charged ends in one when a worker sleeps).
    sleeping: usize,
    /// Each background worker's way in (empty without a background lane).
    background: Vec<BackgroundWorker>,
    /// The background workers with no turn, by index into `background`.
    idle_background: Vec<usize>,
}

/// A background worker as the normal-priority side sees it.
struct BackgroundWorker {
    turns: mpsc::Sender<(AccountId, Turn)>,
    thread: Thread,
}

/// A turn a background worker has run, on its way to be charged.
struct Finished {
    id: AccountId,
    turn: Turn,
    cpu: Duration,
    breached: bool,
    /// The worker's index, idle again.
    worker: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        #[cfg(all(test, target_os = "linux"))]
        tests::count_lock();
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Makes a turn ready in `lane` runnable: wakes a sleeping normal worker, or hands
    /// background turns to idle background workers.
    fn wake(&self, state: &mut State, lane: Option<Lane>) {
        match lane {
            Some(Lane::Normal) if state.sleeping > 0 => self.wake_normal.notify_one(),
            Some(Lane::Background) => self.feed_background(state),
            _ => {}
        }
    }

    /// Gives each idle background worker the next background-lane turn, while there are
    /// both. Called with the lock held, on normal-priority threads only.
    fn feed_background(&self, state: &mut State) {
        while let Some(&worker) = state.idle_background.last() {
            let now = self.now();
            let popped = state.fair.pop(Lane::Background, now);
            if popped.passed_other && state.sleeping > 0 {
                self.wake_normal.notify_one();
            }
            let Some((id, turn)) = popped.turn else {
                return;
            };
            state.idle_background.pop();
            let Some(to) = state.background.get(worker) else {
                continue;
            };
            if to.turns.send((id, turn)).is_err() {
                // The worker's thread is gone (it cannot panic outside a turn, which is
                // caught): the turn is dropped, which its unit sees as a failed turn, and
                // the account is released; the worker is not listed again.
                tracing::error!(worker, "a background plugin worker is gone; a turn dropped");
                state.fair.charge(id, 0, false, now);
                continue;
            }
            to.thread.unpark();
        }
    }
}

/// The pool's size and whether it has a background lane, as configured.
#[derive(Debug, Clone, Copy)]
struct Settings {
    workers: usize,
    background: bool,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();
static POOL: OnceLock<Result<WorkerPool, String>> = OnceLock::new();

fn one_per_core() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Sets the number of normal workers (0: one per core) of the process's pool, and whether
/// heavy units run on background workers (`sandbox.workers`, `sandbox.background`). Only the
/// first call before the pool starts counts; returns whether this one did.
pub fn configure(workers: u32, background: bool) -> bool {
    let workers = match workers {
        0 => one_per_core(),
        n => n as usize,
    };
    POOL.get().is_none()
        && SETTINGS
            .set(Settings {
                workers,
                background,
            })
            .is_ok()
}

/// The process's pool, started on first use.
pub fn pool() -> Result<&'static WorkerPool, String> {
    POOL.get_or_init(|| {
        let settings = *SETTINGS.get_or_init(|| Settings {
            workers: one_per_core(),
            background: true,
        });
        WorkerPool::start(settings)
    })
    .as_ref()
    .map_err(Clone::clone)
}

impl WorkerPool {
    /// Starts the normal workers and, with a background lane, as many background ones.
    fn start(settings: Settings) -> Result<WorkerPool, String> {
        let workers = settings.workers.max(1);
        let mut background_settler = None;
        let cannot = |err: std::io::Error| format!("cannot start a plugin worker thread: {err}");
        let mut background = Vec::new();
        if settings.background {
            let (finished_tx, finished) = mpsc::channel();
            for n in 0..workers {
                let (turns_tx, turns) = mpsc::channel();
                let finished_tx = finished_tx.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("tidegate-plugins-bg-{n}"))
                    .spawn(move || work_in_background(n, turns, finished_tx))
                    .map_err(cannot)?;
                background.push(BackgroundWorker {
                    turns: turns_tx,
                    thread: handle.thread().clone(),
                });
            }
            // Started below, once `shared` exists.
            background_settler = Some(finished);
        }
        let idle_background = (0..background.len()).collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                fair: Fair::new(workers, settings.background),
                sleeping: 0,
                background,
                idle_background,
            }),
            wake_normal: Condvar::new(),
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
        });
        if let Some(finished) = background_settler {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tidegate-plugins-bg-settle".into())
                .spawn(move || settle_background(&shared, finished))
                .map_err(cannot)?;
        }
        for n in 0..workers {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("tidegate-plugins-{n}"))
                .spawn(move || work(&shared))
                .map_err(cannot)?;
        }
        tracing::debug!(
            workers,
            background = settings.background,
            "plugin worker pool started"
        );
        Ok(WorkerPool { shared, workers })
    }

    /// The number of normal workers (there are as many background ones, if any).
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// A new account: one unit's turns, scheduled fairly against every other account.
    pub fn account(&self) -> PoolAccount {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let now = self.shared.now();
        self.shared.lock().fair.open(id, now);
        PoolAccount {
            id,
            shared: self.shared.clone(),
        }
    }
}

/// One unit's place in the pool; closed when dropped.
pub struct PoolAccount {
    id: AccountId,
    shared: Arc<Shared>,
}

impl PoolAccount {
    /// Runs `turn` on a worker when the scheduler gives this account its turn. The closure
    /// returns its result and its [`Strain`]. An error means the turn panicked (a tidegate
    /// bug).
    pub async fn run<R: Send + 'static>(
        &self,
        turn: impl FnOnce() -> (R, Strain) + Send + 'static,
    ) -> Result<Ran<R>, String> {
        let (done, result) = tokio::sync::oneshot::channel();
        let turn: Turn = Box::new(UnitTurn {
            turn: Some(turn),
            ran: None,
            done,
        });
        {
            let now = self.shared.now();
            let mut state = self.shared.lock();
            let ready = state.fair.push(self.id, turn, now);
            self.shared.wake(&mut state, ready);
        }
        result
            .await
            .map_err(|_| "a plugin worker panicked running this unit (a tidegate bug)".to_string())
    }
}

impl Drop for PoolAccount {
    fn drop(&mut self) {
        self.shared.lock().fair.close(self.id);
    }
}

/// A normal worker: takes the next normal-lane turn, runs it without the lock, and under one
/// hold of the lock charges it and takes the next; answers the unit after letting the lock
/// go. Each hold also feeds idle background workers whatever background turns are ready.
fn work(shared: &Shared) {
    // The turn that ran last, with whether its account is heavy now: answered once the lock
    // is let go (the answer wakes the unit's task).
    let mut answered: Option<(Turn, bool)> = None;
    let mut state = shared.lock();
    loop {
        let popped = state.fair.pop(Lane::Normal, shared.now());
        if popped.passed_other {
            shared.feed_background(&mut state);
        }
        let Some((id, mut turn)) = popped.turn else {
            if let Some((done, heavy)) = answered.take() {
                // Answered before sleeping: the unit may queue its next turn at once.
                drop(state);
                done.answer(heavy);
                state = shared.lock();
                continue;
            }
            // Accounts change lane without an event (see IDLE_RECHECK): look on each wake.
            shared.feed_background(&mut state);
            state.sleeping += 1;
            state = match shared.wake_normal.wait_timeout(state, IDLE_RECHECK) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
            state.sleeping -= 1;
            continue;
        };
        drop(state);
        if let Some((done, heavy)) = answered.take() {
            done.answer(heavy);
        }
        let (cpu, breached) = turn.run();
        state = shared.lock();
        let charged = state
            .fair
            .charge(id, cpu.as_nanos() as u64, breached, shared.now());
        // Its next turn, already queued, may have moved to the background lane (this lane's
        // own turns are taken by this worker's next pop).
        if charged.ready == Some(Lane::Background) {
            shared.feed_background(&mut state);
        }
        answered = Some((turn, charged.heavy));
    }
}

/// A background worker: runs the turns handed to it, at the lowest priority, without ever
/// taking the pool's lock (see the module docs). `try_recv` and `park` take no lock either:
/// a sender finds no receiver blocked in the channel, so it only pushes and unparks.
fn work_in_background(
    worker: usize,
    turns: mpsc::Receiver<(AccountId, Turn)>,
    finished: mpsc::Sender<Finished>,
) {
    lower_priority();
    loop {
        let (id, mut turn) = match turns.try_recv() {
            Ok(next) => next,
            Err(mpsc::TryRecvError::Empty) => {
                std::thread::park();
                continue;
            }
            Err(mpsc::TryRecvError::Disconnected) => return,
        };
        let (cpu, breached) = turn.run();
        let done = Finished {
            id,
            turn,
            cpu,
            breached,
            worker,
        };
        if finished.send(done).is_err() {
            return;
        }
    }
}

/// The background lane's settler, at normal priority: charges the turns background workers
/// have run (all that are waiting, under one hold of the lock), lists those workers idle
/// again, feeds them, and answers the units once the lock is let go.
fn settle_background(shared: &Shared, finished: mpsc::Receiver<Finished>) {
    let mut answers = Vec::new();
    while let Ok(first) = finished.recv() {
        let mut state = shared.lock();
        for done in std::iter::once(first).chain(finished.try_iter()) {
            let charged = state.fair.charge(
                done.id,
                done.cpu.as_nanos() as u64,
                done.breached,
                shared.now(),
            );
            state.idle_background.push(done.worker);
            shared.wake(&mut state, charged.ready);
            answers.push((done.turn, charged.heavy));
        }
        shared.feed_background(&mut state);
        drop(state);
        for (turn, heavy) in answers.drain(..) {
            turn.answer(heavy);
        }
    }
}

/// CPU time the calling thread has used (also what the benchmark's per-call figures count,
/// so that time the thread spends descheduled on a shared machine is not counted).
#[cfg(target_os = "linux")]
pub fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to write; the clock id is a constant
    // every Linux kernel since 2.6.12 supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// CPU time the calling thread has used (elsewhere: not measured, so every turn costs the
/// same and the order is round-robin).
#[cfg(not(target_os = "linux"))]
pub fn thread_cpu_time() -> Duration {
    Duration::ZERO
}

/// Moves the calling thread to the `SCHED_IDLE` policy: it runs only when no normal thread
/// of the machine wants its CPU, and a normal thread that wakes takes the CPU from it at
/// once. Nice 19 is not enough: the kernel's EEVDF scheduler lets a running thread finish its
/// time slice (a few milliseconds) before a woken one runs, whatever their nice values, so a
/// hog at nice 19 still delays every wake-up of the good tenant's pipeline, of mongod and of
/// nats-server that lands on its core. Where `SCHED_IDLE` is refused, nice 19; a failure of
/// both only makes the background lane as urgent as the normal one: logged. Public for the
/// benchmark's control, which burns a hog's CPU at exactly this priority outside the pool.
#[cfg(target_os = "linux")]
pub fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` is a valid `sched_param` for the call
    // to read. Lowering a thread's own policy needs no privilege.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        return;
    }
    let refused = std::io::Error::last_os_error();
    if let Err(err) = set_nice(19) {
        tracing::warn!(
            error = %err,
            "cannot lower a background plugin worker's priority; heavy tenants then compete \
             with the others at normal priority"
        );
    } else {
        tracing::info!(
            error = %refused,
            "background plugin workers run at nice 19: the SCHED_IDLE policy was refused"
        );
    }
}

/// Elsewhere: no lower priority (see the Linux version).
#[cfg(not(target_os = "linux"))]
pub fn lower_priority() {}

/// Sets the calling thread's nice value (on Linux a thread has its own).
#[cfg(target_os = "linux")]
pub fn set_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: `gettid` takes no arguments; `setpriority` only reads its integer arguments,
    // and on Linux a thread id names exactly that thread.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
pub fn set_nice(_nice: i32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use std::time::Duration;

    use super::{Settings, Strain, WorkerPool};

    const BREACHED: Strain = Strain {
        breached: true,
        waited: Duration::ZERO,
    };

    /// Times a background worker thread took the lock of any pool in this test process.
    static LOCKED_IN_BACKGROUND: AtomicUsize = AtomicUsize::new(0);
    /// Background workers' thread names start so (the settler's is `…-bg-settle`).
    const BACKGROUND_WORKER: &str = "tidegate-plugins-bg-";

    pub(super) fn count_lock() {
        let me = std::thread::current();
        let name = me.name().unwrap_or_default();
        if name.starts_with(BACKGROUND_WORKER) && !name.ends_with("settle") {
            LOCKED_IN_BACKGROUND.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A pool of its own for a test: one normal worker and one background worker.
    #[allow(clippy::expect_used)] // Test code: a pool that cannot start is a failed test.
    fn one_worker_and_background() -> WorkerPool {
        WorkerPool::start(Settings {
            workers: 1,
            background: true,
        })
        .expect("pool starts")
    }

    /// A heavy account's turns run on background workers, and those workers never take the
    /// pool's lock: at the lowest priority a worker may wait long for a CPU, and one holding
    /// the lock meanwhile would stall every normal worker and every unit queueing a turn (a
    /// breaching tenant stalling the others, on a busy machine). The turns still run, in
    /// order, and the light account's turns stay on normal workers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_workers_never_take_the_pools_lock() {
        let pool = one_worker_and_background();
        let (light, hostile) = (pool.account(), pool.account());
        let thread_name = || {
            std::thread::current()
                .name()
                .unwrap_or_default()
                .to_string()
        };
        // The light account is active (one turn) so that the hostile one is not alone.
        let light_ran_on = light
            .run(move || (thread_name(), Strain::default()))
            .await
            .expect("turn runs")
            .value;
        let mut ran_on = Vec::new();
        for i in 0..50 {
            // Every hostile turn breaks a limit: heavy from its first turn on.
            let ran = hostile
                .run(move || ((i, thread_name()), BREACHED))
                .await
                .expect("turn runs");
            ran_on.push(ran.value);
            if i % 10 == 0 {
                // Keeps the light account active beside it.
                light
                    .run(|| ((), Strain::default()))
                    .await
                    .expect("turn runs");
            }
        }
        assert!(
            light_ran_on.starts_with("tidegate-plugins-") && !light_ran_on.contains("-bg-"),
            "{light_ran_on}"
        );
        assert_eq!(
            ran_on.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            (0..50).collect::<Vec<_>>()
        );
        let in_background = ran_on
            .iter()
            .filter(|(_, name)| name.starts_with(BACKGROUND_WORKER))
            .count();
        assert!(
            in_background >= 45,
            "the breaching account's turns ran on {:?}",
            ran_on
        );
        assert_eq!(LOCKED_IN_BACKGROUND.load(Ordering::Relaxed), 0);
    }

    /// A turn whose plugin waited (a plugin granted the clock sleeping on every event) is
    /// charged the wait as CPU time: beside another active account it is heavy, as a turn
    /// that computed as long would be, though its thread used almost no CPU; and what it
    /// reports counts the wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_turn_that_waited_is_charged_the_wait() {
        let pool = one_worker_and_background();
        let (light, sleeper) = (pool.account(), pool.account());
        let quiet = light.run(|| ((), Strain::default())).await.expect("runs");
        assert!(!quiet.heavy);
        let waited = Strain {
            breached: false,
            waited: Duration::from_millis(50),
        };
        let slept = sleeper.run(move || ((), waited)).await.expect("runs");
        assert!(
            slept.cpu >= Duration::from_millis(50),
            "charged {:?}",
            slept.cpu
        );
        assert!(slept.heavy, "a 50 ms wait beside an active account");
    }

    /// A background worker's thread leaves the normal policy for `SCHED_IDLE` (nice 19
    /// alone would let a hog finish its time slice before a woken normal thread runs).
    #[test]
    fn background_workers_run_under_sched_idle() {
        let policies = std::thread::spawn(|| {
            // SAFETY: pid 0 names the calling thread; the call only reads its argument.
            let before = unsafe { libc::sched_getscheduler(0) };
            super::lower_priority();
            // SAFETY: as above.
            let after = unsafe { libc::sched_getscheduler(0) };
            (before, after)
        })
        .join()
        .expect("the thread ends");
        assert_eq!(policies, (libc::SCHED_OTHER, libc::SCHED_IDLE));
    }
}
