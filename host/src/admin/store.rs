//! Where tenants and plugins live: tenant records in a NATS KV bucket (one key per unit,
//! `<pipeline>.<tenant>`), plugin components in an Object Store named by their SHA-256, and
//! a local copy of each component an instance runs, checked against its digest.
//!
//! Every instance opens the same buckets, so every instance sees the same tenants and can
//! run any of them without plugin files of its own.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use async_nats::jetstream::{self, kv, object_store};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::config::admin::AdminConfig;
use crate::config::TenantConfig;
use crate::error::Error;

/// One tenant as stored: its spec (a `[[pipeline.tenant]]` table as JSON), whether it is
/// suspended, and the hash of its token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantRecord {
    /// The `tenants_from = "nats"` pipeline it belongs to.
    pub pipeline: String,
    /// The tenant, in [`TenantConfig`]'s shape; plugins name their component by `sha256`.
    pub tenant: serde_json::Value,
    /// Suspended: not running (its checkpoint kept), until resumed.
    #[serde(default)]
    pub suspended: bool,
    /// SHA-256 (hex) of the tenant's token; the token itself is shown once and never kept.
    pub token_sha256: String,
}

impl TenantRecord {
    /// The tenant's spec, parsed.
    pub fn tenant_config(&self) -> Result<TenantConfig, String> {
        serde_json::from_value(self.tenant.clone()).map_err(|err| format!("tenant: {err}"))
    }

    /// `(name, sha256)` of each plugin of the spec, in chain order.
    pub fn plugins(&self) -> Vec<(String, Option<String>)> {
        let plugins = self.tenant.get("plugins").and_then(|p| p.as_array());
        plugins
            .into_iter()
            .flatten()
            .map(|p| {
                let text = |key: &str| p.get(key).and_then(|v| v.as_str()).map(str::to_string);
                (text("name").unwrap_or_default(), text("sha256"))
            })
            .collect()
    }

    /// Records `sha256` as plugin `name`'s component; `false` when the spec has no such
    /// plugin.
    pub fn set_plugin(&mut self, name: &str, sha256: &str) -> bool {
        let plugins = self
            .tenant
            .get_mut("plugins")
            .and_then(|p| p.as_array_mut());
        let Some(plugin) = plugins
            .into_iter()
            .flatten()
            .find(|p| p.get("name").and_then(|n| n.as_str()) == Some(name))
        else {
            return false;
        };
        plugin["sha256"] = serde_json::Value::String(sha256.to_string());
        true
    }
}

/// Why a conditional write did not happen.
#[derive(Debug)]
pub enum WriteError {
    /// The key exists (create) or changed since it was read (update).
    Conflict,
    /// NATS failed.
    Failed(String),
}

/// The tenant bucket, the component bucket and this instance's copies of components.
pub struct TenantStore {
    kv: kv::Store,
    objects: object_store::ObjectStore,
    cache: PathBuf,
    /// `admin.object_cache_max_mib`, in bytes.
    cache_max_bytes: u64,
}

impl TenantStore {
    /// Opens (creating if needed) both buckets and the local component folder.
    pub async fn open(js: &jetstream::Context, config: &AdminConfig) -> Result<TenantStore, Error> {
        let fail = |message: String| Error::Startup { message };
        let kv = match js.get_key_value(&config.tenants_bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: config.tenants_bucket.clone(),
                    description: "tidegate tenants (admin API)".into(),
                    history: 5,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|err| {
                    fail(format!(
                        "admin.tenants_bucket: cannot open or create KV bucket '{}': {err}",
                        config.tenants_bucket
                    ))
                })?,
        };
        let objects = match js.get_object_store(&config.plugins_bucket).await {
            Ok(objects) => objects,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: config.plugins_bucket.clone(),
                    description: Some("tidegate plugin components by SHA-256".into()),
                    ..Default::default()
                })
                .await
                .map_err(|err| {
                    fail(format!(
                        "admin.plugins_bucket: cannot open or create object store '{}': {err}",
                        config.plugins_bucket
                    ))
                })?,
        };
        let cache = config.object_cache().map_err(fail)?;
        std::fs::create_dir_all(&cache).map_err(|err| {
            fail(format!(
                "admin.object_cache_dir: cannot create {}: {err}",
                cache.display()
            ))
        })?;
        Ok(TenantStore {
            kv,
            objects,
            cache,
            cache_max_bytes: config.object_cache_max_mib.saturating_mul(1024 * 1024),
        })
    }

    /// The tenant bucket, for the runtime's watch.
    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    /// The folder components are copied to.
    pub fn cache(&self) -> &Path {
        &self.cache
    }

    /// Tenant `id` and its revision, if it exists.
    pub async fn get(&self, id: &str) -> Result<Option<(TenantRecord, u64)>, String> {
        let entry = self
            .kv
            .entry(id)
            .await
            .map_err(|err| format!("cannot read tenant '{id}' from NATS: {err}"))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(None);
        };
        let record = serde_json::from_slice(&entry.value)
            .map_err(|err| format!("tenant '{id}': the stored record does not parse: {err}"))?;
        Ok(Some((record, entry.revision)))
    }

    /// Every tenant, by id.
    pub async fn list(&self) -> Result<Vec<(String, TenantRecord)>, String> {
        use futures::StreamExt;
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|err| format!("cannot list tenants in NATS: {err}"))?;
        let mut ids = Vec::new();
        while let Some(key) = keys.next().await {
            ids.push(key.map_err(|err| format!("cannot list tenants in NATS: {err}"))?);
        }
        ids.sort();
        let mut all = Vec::new();
        for id in ids {
            if let Some((record, _)) = self.get(&id).await? {
                all.push((id, record));
            }
        }
        Ok(all)
    }

    /// Stores a new tenant; [`WriteError::Conflict`] if `id` exists.
    pub async fn create(&self, id: &str, record: &TenantRecord) -> Result<(), WriteError> {
        let value = encode(record)?;
        match self.kv.create(id, value).await {
            Ok(_) => Ok(()),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(WriteError::Conflict)
            }
            Err(err) => Err(WriteError::Failed(format!(
                "cannot store tenant '{id}': {err}"
            ))),
        }
    }

    /// Replaces tenant `id` if it is still at `revision`.
    pub async fn update(
        &self,
        id: &str,
        record: &TenantRecord,
        revision: u64,
    ) -> Result<(), WriteError> {
        let value = encode(record)?;
        match self.kv.update(id, value, revision).await {
            Ok(_) => Ok(()),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(WriteError::Conflict)
            }
            Err(err) => Err(WriteError::Failed(format!(
                "cannot store tenant '{id}': {err}"
            ))),
        }
    }

    /// Deletes tenant `id`'s record (its data is purged apart: `admin::purge`).
    pub async fn delete(&self, id: &str) -> Result<(), String> {
        self.kv
            .delete(id)
            .await
            .map_err(|err| format!("cannot delete tenant '{id}': {err}"))
    }

    /// Deletes component `digest` from the object store and this instance's copy.
    pub async fn delete_component(&self, digest: &str) -> Result<(), String> {
        self.objects
            .delete(digest)
            .await
            .map_err(|err| format!("cannot delete component sha256 {digest}: {err}"))?;
        let _ = std::fs::remove_file(self.cache.join(format!("{digest}.wasm")));
        Ok(())
    }

    /// Deletes those of `digests` that no tenant's record names, but tenant `leaving`'s (a
    /// tenant being purged); returns the ones deleted. Components are content-addressed:
    /// tenants that pushed the same bytes share one object, which stays while any of them
    /// names it.
    pub async fn delete_unused(
        &self,
        digests: Vec<String>,
        leaving: Option<&str>,
    ) -> Result<Vec<String>, String> {
        if digests.is_empty() {
            return Ok(Vec::new());
        }
        let in_use: HashSet<String> = self
            .list()
            .await?
            .iter()
            .filter(|(id, _)| Some(id.as_str()) != leaving)
            .flat_map(|(_, record)| record.plugins())
            .filter_map(|(_, digest)| digest)
            .collect();
        let mut deleted = Vec::new();
        for digest in digests.into_iter().filter(|d| !in_use.contains(d)) {
            self.delete_component(&digest).await?;
            deleted.push(digest);
        }
        Ok(deleted)
    }

    /// Stores a component (once per content) and keeps a local copy; returns its SHA-256.
    pub async fn put_component(&self, bytes: &[u8]) -> Result<String, String> {
        let digest = sha256_hex(bytes);
        self.keep_stored(&digest, bytes).await?;
        self.write_copy(&digest, bytes)?;
        Ok(digest)
    }

    /// Stores component `bytes` (of SHA-256 `digest`) in the object store unless it is there.
    pub async fn keep_stored(&self, digest: &str, bytes: &[u8]) -> Result<(), String> {
        // A deleted object (a purge, a replaced version) keeps its info, marked deleted:
        // upload it again then.
        let stored = self
            .objects
            .info(digest)
            .await
            .is_ok_and(|info| !info.deleted);
        if !stored {
            let mut reader = bytes;
            self.objects
                .put(digest, &mut reader)
                .await
                .map_err(|err| format!("cannot store the component in NATS: {err}"))?;
        }
        Ok(())
    }

    /// The local copy of component `digest`, fetched from the object store unless a copy
    /// with that digest is already there.
    pub async fn component_path(&self, digest: &str) -> Result<PathBuf, String> {
        let path = self.cache.join(format!("{digest}.wasm"));
        if std::fs::read(&path).is_ok_and(|bytes| sha256_hex(&bytes) == digest) {
            crate::sandbox::mark_cache_file_used(&path);
            return Ok(path);
        }
        let mut object = self.objects.get(digest).await.map_err(|err| {
            format!("component sha256 {digest}: cannot fetch it from the object store: {err}")
        })?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|err| format!("component sha256 {digest}: fetch failed: {err}"))?;
        if sha256_hex(&bytes) != digest {
            return Err(format!(
                "component sha256 {digest}: the object store returned other bytes"
            ));
        }
        self.write_copy(digest, &bytes)?;
        Ok(path)
    }

    /// Writes `<cache>/<digest>.wasm` whole or not at all.
    fn write_copy(&self, digest: &str, bytes: &[u8]) -> Result<(), String> {
        let path = self.cache.join(format!("{digest}.wasm"));
        let partial = self
            .cache
            .join(format!(".{digest}.{}.partial", std::process::id()));
        std::fs::write(&partial, bytes)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        crate::sandbox::trim_cache_dir(&self.cache, ".wasm", self.cache_max_bytes, &path);
        Ok(())
    }
}

fn encode(record: &TenantRecord) -> Result<bytes::Bytes, WriteError> {
    serde_json::to_vec(record)
        .map(bytes::Bytes::from)
        .map_err(|err| WriteError::Failed(format!("cannot encode the tenant record: {err}")))
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}
