//! The on-disk cache of compiled components: compiling a large guest (Python, JavaScript)
//! takes seconds, loading it back milliseconds.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::Engine;

/// Compiled components on disk, named `<sha256>-<engine>.cwasm`.
///
/// Loading a compiled component runs native code from the file, so only files tidegate
/// wrote itself are loaded: the folder must belong to this user and be private to it
/// (checked at start), and each file must belong to this user and be writable by no one
/// else. A file that fails to load is recompiled and overwritten.
pub(super) struct ComponentCache {
    dir: PathBuf,
    engine_key: String,
    uid: u32,
}

impl ComponentCache {
    pub(super) fn open(dir: Option<PathBuf>, engine: &Engine) -> Result<ComponentCache, String> {
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
            Ok(component) => Some(component),
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
                std::fs::rename(&temp, &path).map_err(|err| err.to_string())
            });
        if let Err(err) = result {
            tracing::warn!(dir = %self.dir.display(), error = %err, "cannot cache compiled plugin");
        }
    }
}
