//! The on-disk cache of compiled components: compiling a large guest (Python, JavaScript)
//! takes seconds, loading it back milliseconds.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use wasmtime::component::Component;
use wasmtime::Engine;

/// Compiled components on disk, named `<sha256>-<engine>.cwasm`.
///
/// Loading a compiled component runs native code from the file, so only files tidegate
/// wrote itself are loaded: the folder must belong to this user and be private to it
/// (checked at start), and each file must belong to this user and be writable by no one
/// else. A file that fails to load is recompiled and overwritten. The folder holds at most
/// `sandbox.cache_max_mib` (see [`trim_cache_dir`]).
pub(super) struct ComponentCache {
    dir: PathBuf,
    engine_key: String,
    uid: u32,
    max_bytes: u64,
}

impl ComponentCache {
    pub(super) fn open(
        dir: Option<PathBuf>,
        max_mib: u64,
        engine: &Engine,
    ) -> Result<ComponentCache, String> {
        let dir = match dir {
            Some(dir) => dir,
            None => std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                .ok_or("neither XDG_CACHE_HOME nor HOME is set; set sandbox.cache_dir")?
                .join("tidegate")
                .join("compiled"),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        let uid = std::fs::metadata("/proc/self")
            .map_err(|err| format!("cannot tell this process's user: {err}"))?
            .uid();
        let meta = std::fs::metadata(&dir)
            .map_err(|err| format!("cannot read {}: {err}", dir.display()))?;
        if meta.uid() != uid {
            return Err(format!(
                "{} belongs to another user; compiled code is loaded only from a folder of \
                 tidegate's own user",
                dir.display()
            ));
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|err| format!("cannot make {} private: {err}", dir.display()))?;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(ComponentCache {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
            uid,
            max_bytes: max_mib.saturating_mul(1024 * 1024),
        })
    }

    fn path(&self, hash: &str) -> PathBuf {
        let hex = hash.trim_start_matches("sha256:");
        self.dir.join(format!("{hex}-{}.cwasm", self.engine_key))
    }

    pub(super) fn load(&self, engine: &Engine, hash: &str) -> Option<Component> {
        let path = self.path(hash);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !meta.is_file() || meta.uid() != self.uid || meta.mode() & 0o022 != 0 {
            tracing::warn!(file = %path.display(), "ignoring a compiled plugin tidegate did not write");
            return None;
        }
        // SAFETY: the file was written by `store` below from `Component::serialize` (it
        // belongs to this user, in a folder private to this user, and is not writable by
        // anyone else), and wasmtime checks that it matches this engine's version and
        // settings before using it.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => {
                mark_cache_file_used(&path);
                Some(component)
            }
            Err(err) => {
                tracing::warn!(file = %path.display(), error = %err, "cached plugin unusable; recompiling");
                None
            }
        }
    }

    pub(super) fn store(&self, hash: &str, component: &Component) {
        let result = component
            .serialize()
            .map_err(|err| err.to_string())
            .and_then(|bytes| {
                let path = self.path(hash);
                let temp = path.with_extension(format!("tmp{}", std::process::id()));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&temp)
                    .map_err(|err| err.to_string())?;
                file.write_all(&bytes).map_err(|err| err.to_string())?;
                std::fs::rename(&temp, &path).map_err(|err| err.to_string())?;
                trim_cache_dir(&self.dir, ".cwasm", self.max_bytes, &path);
                Ok(())
            });
        if let Err(err) = result {
            tracing::warn!(dir = %self.dir.display(), error = %err, "cannot cache compiled plugin");
        }
    }
}

/// Deletes the least recently used files of cache folder `dir` whose names end in `suffix`
/// (files being written have other names), but `keep`, until they hold at most `max_bytes`
/// together: a cache is a copy, and without a bound plugin versions pushed one after
/// another would fill the disk. Used is last written or marked by [`mark_cache_file_used`].
pub fn trim_cache_dir(dir: &Path, suffix: &str, max_bytes: u64, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(suffix))
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            meta.is_file().then(|| (used, meta.len(), entry.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= max_bytes {
            break;
        }
        if path != keep && std::fs::remove_file(&path).is_ok() {
            total -= len;
            tracing::info!(
                file = %path.display(),
                "cache over its size limit: least recently used file deleted"
            );
        }
    }
}

/// Marks cache file `path` as just used, so that [`trim_cache_dir`] deletes it last.
pub fn mark_cache_file_used(path: &Path) {
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::{mark_cache_file_used, trim_cache_dir};

    /// Past the budget the least recently used files go first, never the one just written
    /// nor files of other names; a file marked used goes after the others.
    #[test]
    fn least_recently_used_files_go_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, age_s: u64| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; 1000]).expect("write");
            let when = SystemTime::now() - Duration::from_secs(age_s);
            let handle = std::fs::File::open(&path).expect("open");
            handle.set_modified(when).expect("set mtime");
            path
        };
        let (old, older, oldest) = (file("a.wasm", 10), file("b.wasm", 20), file("c.wasm", 30));
        let other = file("d.wasm.partial", 40);
        let newest = file("e.wasm", 0);
        mark_cache_file_used(&oldest);
        // 4000 bytes of .wasm, 2500 allowed: the two least recently used go.
        trim_cache_dir(dir.path(), ".wasm", 2500, &newest);
        let left = |p: &std::path::Path| p.exists();
        assert!(!left(&older) && !left(&old), "the least recently used stay");
        assert!(left(&oldest), "a file marked used was deleted");
        assert!(left(&newest) && left(&other));
        // Even past the budget on its own, the file just written stays.
        trim_cache_dir(dir.path(), ".wasm", 10, &newest);
        assert!(!left(&oldest) && left(&newest));
    }
}
