//! What a wasmtime component call costs made async, against the same call made sync, and
//! whether a call suspended at an epoch deadline can be finished on another thread with its
//! instance intact: the two facts a plugin call that starts where its event was routed and,
//! if it turns slow, moves to the worker pool would rest on.
//!
//! ```sh
//! cd bench/wasmtime-async && cargo run --release [-- ROUNDS]
//! ```
//!
//! The guest is a component from WAT with one export, `f(n)`, that counts its calls in a
//! global and loops `n` times: `n = 0` is the call alone, the larger `n` stand for plugins
//! doing work. Sync and async calls of one `n` run in the same round, back to back (which goes
//! first alternates by round), in fresh stores, each armed as tidegate arms a call (fuel and an
//! epoch deadline set before it).
//! An async call is polled once on the calling thread with a no-op waker, as an inline call
//! would be; only one that yields would be finished elsewhere.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker, TypedFunc};
use wasmtime::{Config, Engine, Result, Store, UpdateDeadline};

const GUEST: &str = r#"
(component
  (core module $m
    (global $calls (mut i32) (i32.const 0))
    (func (export "f") (param $n i32) (result i32)
      (local $acc i32)
      (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
      (local.set $acc (global.get $calls))
      (block $done
        (loop $l
          (br_if $done (i32.eqz (local.get $n)))
          (local.set $acc (i32.add (i32.mul (local.get $acc) (i32.const 31)) (local.get $n)))
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br $l)))
      (local.get $acc))
    (func (export "calls") (result i32) (global.get $calls)))
  (core instance $i (instantiate $m))
  (func (export "f") (param "n" u32) (result u32) (canon lift (core func $i "f")))
  (func (export "calls") (result u32) (canon lift (core func $i "calls"))))
"#;

/// More fuel than any call here burns: fuel is metered, as in tidegate, never exhausted.
const FUEL: u64 = 1 << 40;
/// Calls per measurement.
const CALLS: u32 = 100_000;

/// One engine for every measurement: fuel and epochs on, as tidegate's.
fn engine() -> Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.consume_fuel(true);
    config.epoch_interruption(true);
    Engine::new(&config)
}

/// A store with the guest's two exports.
struct Guest {
    store: Store<()>,
    /// `f(n)`: counts the call, loops `n` times.
    f: TypedFunc<(u32,), (u32,)>,
    /// `calls()`: how many calls `f` has had.
    calls: TypedFunc<(), (u32,)>,
}

/// A fresh store and instance. Past its deadline, an async call yields instead of trapping
/// (one that ran too long would trap in tidegate).
fn instantiate(engine: &Engine, component: &Component) -> Result<Guest> {
    let mut store = Store::new(engine, ());
    store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
    let instance = Linker::new(engine).instantiate(&mut store, component)?;
    let f = instance.get_typed_func(&mut store, "f")?;
    let calls = instance.get_typed_func(&mut store, "calls")?;
    Ok(Guest { store, f, calls })
}

/// Polls once on this thread: the output, or the future if the call yielded.
fn poll_once<F: Future + Unpin>(mut future: F) -> Result<F::Output, F> {
    match Pin::new(&mut future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => Ok(output),
        Poll::Pending => Err(future),
    }
}

/// Polls until done (a yielded call is ready to go on at once).
fn finish<F: Future + Unpin>(mut future: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = Pin::new(&mut future).poll(&mut cx) {
            return output;
        }
    }
}

/// Nanoseconds per call of `f(n)`, sync.
fn sync_call_ns(engine: &Engine, component: &Component, n: u32) -> Result<f64> {
    let Guest { mut store, f, .. } = instantiate(engine, component)?;
    let started = Instant::now();
    for _ in 0..CALLS {
        store.set_fuel(FUEL)?;
        store.set_epoch_deadline(100);
        let (out,) = f.call(&mut store, (n,))?;
        std::hint::black_box(out);
    }
    Ok(started.elapsed().as_nanos() as f64 / f64::from(CALLS))
}

/// Nanoseconds per call of `f(n)`, async, polled inline; and how many calls yielded.
fn async_call_ns(engine: &Engine, component: &Component, n: u32) -> Result<(f64, u32)> {
    let Guest { mut store, f, .. } = instantiate(engine, component)?;
    let mut yielded = 0;
    let started = Instant::now();
    for _ in 0..CALLS {
        store.set_fuel(FUEL)?;
        store.set_epoch_deadline(100);
        let (out,) = match poll_once(Box::pin(f.call_async(&mut store, (n,)))) {
            Ok(done) => done?,
            Err(rest) => {
                yielded += 1;
                finish(rest)?
            }
        };
        std::hint::black_box(out);
    }
    Ok((
        started.elapsed().as_nanos() as f64 / f64::from(CALLS),
        yielded,
    ))
}

/// A long call started on this thread, suspended at its first epoch deadline (the engine's
/// epoch advanced every millisecond), finished on another thread; then a second call on the
/// same instance must see the first one's state.
fn suspend_and_move(engine: &Engine, component: &Component) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
                engine.increment_epoch();
            }
        })
    };
    let Guest {
        mut store,
        f,
        calls,
    } = instantiate(engine, component)?;
    store.set_fuel(FUEL)?;
    store.set_epoch_deadline(1);
    let here = std::thread::current().id();
    let started = Instant::now();
    let rest = match poll_once(Box::pin(f.call_async(&mut store, (200_000_000,)))) {
        Ok(_) => wasmtime::bail!("a 200M-iteration call finished within one epoch tick"),
        Err(rest) => rest,
    };
    let first_slice = started.elapsed();
    let (finished_elsewhere, polls) = std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let mut rest = rest;
                let mut polls = 0u32;
                let mut cx = Context::from_waker(Waker::noop());
                loop {
                    polls += 1;
                    if let Poll::Ready(output) = rest.as_mut().poll(&mut cx) {
                        return output.map(|_| (std::thread::current().id() != here, polls));
                    }
                }
            })
            .join()
            .expect("the finishing thread panicked")
    })?;
    store.set_epoch_deadline(1_000_000);
    let (counted,) = calls.call(&mut store, ())?;
    stop.store(true, Ordering::Relaxed);
    ticker.join().expect("the epoch ticker panicked");
    println!(
        "suspend and move: yielded after {first_slice:?} on the calling thread, finished on \
         another thread: {finished_elsewhere} ({polls} more polls, {:?} in all); the \
         instance then counted {counted} call(s), 1 expected",
        started.elapsed()
    );
    if !finished_elsewhere || counted != 1 {
        wasmtime::bail!("the suspended call did not finish elsewhere with its state kept");
    }
    Ok(())
}

fn main() -> Result<()> {
    let rounds: u32 = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|_| wasmtime::format_err!("ROUNDS: {arg}"))?,
        None => 5,
    };
    let engine = engine()?;
    let component = Component::new(&engine, GUEST)?;
    suspend_and_move(&engine, &component)?;
    println!(
        "\n| round | n | sync ns/call | async ns/call (polled inline) | async − sync | yielded |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for round in 1..=rounds {
        for n in [0, 100, 1000] {
            // Which goes first alternates, so that neither always runs on a warmer cache.
            let (sync, (async_ns, yielded)) = if round % 2 == 1 {
                let sync = sync_call_ns(&engine, &component, n)?;
                (sync, async_call_ns(&engine, &component, n)?)
            } else {
                let async_ns = async_call_ns(&engine, &component, n)?;
                (sync_call_ns(&engine, &component, n)?, async_ns)
            };
            println!(
                "| {round} | {n} | {sync:.0} | {async_ns:.0} | {:+.0} | {yielded} |",
                async_ns - sync
            );
        }
    }
    Ok(())
}
