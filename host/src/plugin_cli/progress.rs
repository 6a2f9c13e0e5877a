//! Progress for slow steps: compiling a large Python or JavaScript component takes tens of
//! seconds the first time, and a silent terminal looks hung. Only stderr is written, so
//! scripts that parse a command's stdout see the same text whether it was slow or not.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long a step may run before it is announced: quick ones (a cached component loads in
/// milliseconds) print nothing.
const QUIET_FOR: Duration = Duration::from_millis(800);

/// How often a step still running says how long it has taken so far.
const EVERY: Duration = Duration::from_secs(10);

/// Runs `work`. If it takes longer than [`QUIET_FOR`], prints `what…` on stderr, the elapsed
/// time every [`EVERY`], and the total when it ends.
pub fn report_if_slow<T>(what: &str, work: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let (done, finished) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let announcer = scope.spawn(move || {
            let mut wait = QUIET_FOR;
            let mut announced = false;
            while let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(wait) {
                if announced {
                    eprintln!("  … {} s", started.elapsed().as_secs());
                } else {
                    eprintln!("{what}…");
                    announced = true;
                }
                wait = EVERY;
            }
            announced
        });
        let out = work();
        drop(done);
        if announcer.join().unwrap_or(false) {
            eprintln!("  done in {:.1} s", started.elapsed().as_secs_f64());
        }
        out
    })
}

/// A file size for people: `18.2 MB`, `14.6 kB`, `512 bytes`.
pub fn size(bytes: u64) -> String {
    match bytes {
        0..1_000 => format!("{bytes} bytes"),
        1_000..1_000_000 => format!("{:.1} kB", bytes as f64 / 1e3),
        _ => format!("{:.1} MB", bytes as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_what_the_work_returns() {
        assert_eq!(report_if_slow("quick", || 7), 7);
        let slow = report_if_slow("slow", || {
            std::thread::sleep(QUIET_FOR + Duration::from_millis(200));
            "done"
        });
        assert_eq!(slow, "done");
    }

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(size(512), "512 bytes");
        assert_eq!(size(14_600), "14.6 kB");
        assert_eq!(size(18_234_567), "18.2 MB");
    }
}
