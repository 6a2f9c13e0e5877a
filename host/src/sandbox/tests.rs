//! The cache's trust rules and admission's bounds; the limits themselves are exercised by
//! real guests in tests/sandbox.rs.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

/// The smallest valid component: the header alone.
const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\x00\x01\x00";

fn sandbox(dir: &Path) -> Sandbox {
    let config = SandboxConfig {
        cache_dir: Some(dir.to_path_buf()),
        pooling: false,
        ..SandboxConfig::default()
    };
    Sandbox::new(&config, 64).expect("sandbox")
}

/// A second start loads what the first compiled; a file someone else could have written
/// is never loaded, only recompiled and replaced.
#[test]
fn cache_loads_only_its_own_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = sandbox(dir.path())
        .compile(EMPTY_COMPONENT)
        .expect("compile");
    assert!(!first.cached);
    assert!(first.hash.starts_with("sha256:"));
    let again = sandbox(dir.path())
        .compile(EMPTY_COMPONENT)
        .expect("compile");
    assert!(again.cached);
    assert_eq!(again.hash, first.hash);

    let file = std::fs::read_dir(dir.path())
        .expect("read cache")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("a cached file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let writable = sandbox(dir.path())
        .compile(EMPTY_COMPONENT)
        .expect("compile");
    assert!(!writable.cached, "a world-writable file is not trusted");
    let meta = std::fs::metadata(&file).expect("rewritten");
    assert_eq!(meta.mode() & 0o077, 0, "rewritten private");
    assert!(
        sandbox(dir.path())
            .compile(EMPTY_COMPONENT)
            .expect("compile")
            .cached
    );

    // Owned by someone else (the test may run as root, which can chown).
    if std::os::unix::fs::chown(&file, Some(65534), None).is_ok() {
        let foreign = sandbox(dir.path())
            .compile(EMPTY_COMPONENT)
            .expect("compile");
        assert!(!foreign.cached, "a file of another user is not trusted");
    }
    // Garbage in place of a compiled file is recompiled, not trusted.
    std::fs::write(&file, b"garbage").expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert!(
        !sandbox(dir.path())
            .compile(EMPTY_COMPONENT)
            .expect("compile")
            .cached
    );
}

/// K loads of one file share one compiled component: the second is the memo's, even with
/// the on-disk cache off.
#[test]
fn one_compile_per_file_in_a_process() {
    let config = SandboxConfig {
        cache: false,
        pooling: false,
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::new(&config, 64).expect("sandbox");
    let first = sandbox.compile(EMPTY_COMPONENT).expect("compile");
    assert!(!first.cached);
    let again = sandbox.compile(EMPTY_COMPONENT).expect("compile");
    assert!(again.cached, "the second load reuses the first's component");
    assert_eq!(again.hash, first.hash);
}

/// Admission refuses instances past `max_instances` and frees slots on drop.
#[test]
fn admission_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SandboxConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        max_instances: 2,
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::new(&config, 64).expect("sandbox");
    let admission = sandbox.admission();
    let limits = PluginLimits::default();
    let a = admission.admit(&limits).expect("first");
    let _b = admission.admit(&limits).expect("second");
    let err = admission.admit(&limits).err().expect("third is refused");
    assert!(err.contains("sandbox.max_instances"), "{err}");
    drop(a);
    assert!(admission.admit(&limits).is_ok());
    if sandbox.is_pooled() {
        let big = PluginLimits {
            memory_mib: 1024,
            ..limits
        };
        let err = admission.admit(&big).err().expect("larger than the pool");
        assert!(err.contains("restart"), "{err}");
    }
}

/// Plugins compile on threads at nice 10, whatever the caller's priority.
#[cfg(target_os = "linux")]
#[test]
fn plugins_compile_at_a_lower_priority() {
    let pool = engine::compile_pool().expect("the compiler's threads");
    // SAFETY: `gettid` takes no arguments; `getpriority` only reads its integer arguments.
    let nice = pool.install(|| unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    });
    assert_eq!(nice, engine::COMPILE_NICE);
    let name = pool.install(|| std::thread::current().name().map(str::to_string));
    assert!(name.is_some_and(|n| n.starts_with("tidegate-compile-")));
}
