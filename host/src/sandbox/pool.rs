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
//! The pool is process-wide ([`pool`]) like the metrics registry: one per process, sized by
//! the first [`configure`] (`sandbox.workers`, 0 meaning one per core; `sandbox.background =
//! false` leaves out the background lane), started on first use.
//! Its threads live as long as the process and wait on a condition variable when idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::fair::{AccountId, Fair, Lane};

/// How long an idle normal worker sleeps before looking again even unwoken: accounts move
/// to the normal lane as their recent CPU use decays, without any event to wake a worker.
const IDLE_RECHECK: Duration = Duration::from_millis(50);

/// The same for a background worker, a safety net only: an account becomes heavy only when a
/// turn is queued or charged, or a breach recorded, and each of those wakes a worker of the
/// lane that has a turn ready. Background workers rarely take the lock unwoken: one that
/// does and is preempted there (it runs at the lowest priority) holds up every other worker.
const BACKGROUND_RECHECK: Duration = Duration::from_secs(1);

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
    F: FnOnce() -> (R, bool) + Send,
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
            Ok((value, breached)) => {
                self.ran = Some((value, cpu));
                (cpu, breached)
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

/// What a unit's turn returned, and what it cost.
pub struct Ran<R> {
    /// The closure's result.
    pub value: R,
    /// The CPU time the turn used.
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
    /// One per lane ([`Lane::index`]): a queued turn wakes a worker that may run it, and only
    /// one. A background worker woken for nothing would take the lock at the lowest priority,
    /// and a normal worker could then wait for it to be scheduled again.
    wake: [Condvar; 2],
    epoch: Instant,
    next_id: AtomicU64,
}

/// What the pool's lock guards.
struct State {
    fair: Fair<Turn>,
    /// Workers waiting for a turn, per lane: a wake-up is a system call, made only when one
    /// may find someone (a turn queued or charged ends in one when a worker sleeps).
    sleeping: [usize; 2],
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Wakes one worker of `lane` (a turn of it is ready), if one sleeps.
    fn wake(&self, state: &State, lane: Option<Lane>) {
        if let Some(lane) = lane {
            if state.sleeping[lane.index()] > 0 {
                self.wake[lane.index()].notify_one();
            }
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
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                fair: Fair::new(workers, settings.background),
                sleeping: [0; 2],
            }),
            wake: [Condvar::new(), Condvar::new()],
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
        });
        let mut lanes = vec![(Lane::Normal, "plugins")];
        if settings.background {
            lanes.push((Lane::Background, "plugins-bg"));
        }
        for (lane, name) in lanes {
            for n in 0..workers {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("tidegate-{name}-{n}"))
                    .spawn(move || work(&shared, lane))
                    .map_err(|err| format!("cannot start a plugin worker thread: {err}"))?;
            }
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
    /// returns its result and whether the turn broke a plugin limit (a call out of fuel,
    /// past its deadline, over its memory or output caps: until a turn that does not, the
    /// account is heavy beside other active accounts, see `fair`). An error means the turn
    /// panicked (a tidegate bug).
    pub async fn run<R: Send + 'static>(
        &self,
        turn: impl FnOnce() -> (R, bool) + Send + 'static,
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
            self.shared.wake(&state, ready);
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

/// A worker: takes the next turn of its lane, runs it without the lock, and under one hold
/// of the lock charges it and takes the next; answers the unit after letting the lock go.
fn work(shared: &Shared, lane: Lane) {
    let recheck = match lane {
        Lane::Normal => IDLE_RECHECK,
        Lane::Background => {
            lower_priority();
            BACKGROUND_RECHECK
        }
    };
    let other = match lane {
        Lane::Normal => Lane::Background,
        Lane::Background => Lane::Normal,
    };
    // The turn that ran last, with whether its account is heavy now: answered once the lock
    // is let go (the answer wakes the unit's task).
    let mut answered: Option<(Turn, bool)> = None;
    let mut state = shared.lock();
    loop {
        let popped = state.fair.pop(lane, shared.now());
        if popped.passed_other {
            shared.wake(&state, Some(other));
        }
        let Some((id, mut turn)) = popped.turn else {
            if let Some((done, heavy)) = answered.take() {
                // Answered before sleeping: the unit may queue its next turn at once.
                drop(state);
                done.answer(heavy);
                state = shared.lock();
                continue;
            }
            state.sleeping[lane.index()] += 1;
            state = match shared.wake[lane.index()].wait_timeout(state, recheck) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
            state.sleeping[lane.index()] -= 1;
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
        // Its next turn, already queued, may have moved to the other lane (this lane's own
        // turns are taken by this worker's next pop).
        if charged.ready == Some(other) {
            shared.wake(&state, charged.ready);
        }
        answered = Some((turn, charged.heavy));
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
/// both only makes the background lane as urgent as the normal one: logged.
#[cfg(target_os = "linux")]
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` is a valid `sched_param` for the call
    // to read. Lowering a thread's own policy needs no privilege.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        return;
    }
    let refused = std::io::Error::last_os_error();
    // SAFETY: `gettid` takes no arguments; `setpriority` only reads its integer arguments,
    // and on Linux a thread id names exactly that thread.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19)
    };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
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

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
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
