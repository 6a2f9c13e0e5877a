//! `[admin]`: the admin API that manages tenants and plugins at run time (see
//! docs/platform.md), and where it keeps them in NATS.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The environment variable holding the operator token (it takes precedence over
/// `token_file`).
pub const ADMIN_TOKEN_ENV: &str = "TIDEGATE_ADMIN_TOKEN";

/// The shortest operator token accepted: shorter ones can be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// The `[admin]` section. Present: this instance serves the admin API and runs the tenants
/// of every `tenants_from = "nats"` pipeline from the tenant bucket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin API, e.g. `127.0.0.1:9465`. Its own listener, apart from the
    /// read-only `[http]` endpoint: it changes state, so it can be firewalled differently.
    pub address: String,
    /// A file holding the operator token (one line). The environment variable
    /// `TIDEGATE_ADMIN_TOKEN` takes precedence. One of the two is required.
    pub token_file: Option<PathBuf>,
    /// KV bucket of the tenant records (created if missing). Default: `tidegate-tenants`.
    #[serde(default = "default_tenants_bucket")]
    pub tenants_bucket: String,
    /// Object Store bucket of plugin components, named by SHA-256 (created if missing).
    /// Default: `tidegate-plugins`.
    #[serde(default = "default_plugins_bucket")]
    pub plugins_bucket: String,
    /// Largest plugin upload accepted, in MiB. Default: 32.
    #[serde(default = "default_max_upload_mib")]
    pub max_upload_mib: u32,
    /// Where components fetched from the object store are kept on this instance (checked
    /// against their digest on every load). Default: `$XDG_CACHE_HOME/tidegate/objects`,
    /// else `$HOME/.cache/tidegate/objects`.
    pub object_cache_dir: Option<PathBuf>,
    /// Most MiB of components kept in `object_cache_dir`: past it the least recently used
    /// are deleted (they are fetched again if needed). Default: 10240.
    #[serde(default = "super::plugins::default_cache_max_mib")]
    pub object_cache_max_mib: u64,
    /// `[admin.tls]`: serve the API over TLS. Absent: plain HTTP, which puts tokens on the
    /// wire in clear; tidegate warns when such a listener is not on a loopback address.
    pub tls: Option<AdminTls>,
}

/// `[admin.tls]`: the admin API's certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTls {
    /// PEM file of the server certificate, followed by any intermediates.
    pub cert_file: PathBuf,
    /// PEM file of its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

fn default_tenants_bucket() -> String {
    "tidegate-tenants".into()
}
fn default_plugins_bucket() -> String {
    "tidegate-plugins".into()
}
fn default_max_upload_mib() -> u32 {
    32
}

impl AdminConfig {
    /// Problems with the section, each naming its key.
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.address.trim().is_empty() {
            problems.push("admin.address: set the address to listen on".into());
        }
        if self.object_cache_max_mib == 0 {
            problems.push("admin.object_cache_max_mib: must be at least 1".into());
        }
        if self.max_upload_mib == 0 {
            problems.push("admin.max_upload_mib: must be at least 1".into());
        }
        for (key, bucket) in [
            ("tenants_bucket", &self.tenants_bucket),
            ("plugins_bucket", &self.plugins_bucket),
        ] {
            if bucket.is_empty()
                || !bucket
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(format!(
                    "admin.{key}: '{bucket}' must use only letters, digits, '-' and '_'"
                ));
            }
        }
        problems
    }

    /// Makes `token_file` and `object_cache_dir` absolute against the config's folder.
    pub(super) fn resolve(&mut self, base: &Path) {
        if let Some(file) = &self.token_file {
            self.token_file = Some(base.join(file));
        }
        if let Some(dir) = &self.object_cache_dir {
            self.object_cache_dir = Some(base.join(dir));
        }
        if let Some(tls) = &mut self.tls {
            tls.cert_file = base.join(&tls.cert_file);
            tls.key_file = base.join(&tls.key_file);
        }
    }

    /// The operator token: `TIDEGATE_ADMIN_TOKEN`, else the first line of `token_file`.
    /// Never logged; registered with the scrubber by the caller.
    pub fn operator_token(&self, env: impl Fn(&str) -> Option<String>) -> Result<String, String> {
        let token = match (env(ADMIN_TOKEN_ENV), &self.token_file) {
            (Some(token), _) => token,
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|err| format!("admin.token_file: cannot read {}: {err}", file.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            (None, None) => {
                return Err(format!(
                    "the admin API needs an operator token: set {ADMIN_TOKEN_ENV} or \
                     admin.token_file"
                ))
            }
        };
        let token = token.trim().to_string();
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the admin operator token is shorter than {MIN_TOKEN_LEN} characters; use a \
                 long random one (e.g. `openssl rand -hex 32`)"
            ));
        }
        Ok(token)
    }

    /// The folder for components fetched from the object store.
    pub fn object_cache(&self) -> Result<PathBuf, String> {
        match &self.object_cache_dir {
            Some(dir) => Ok(dir.clone()),
            None => std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                .map(|dir| dir.join("tidegate").join("objects"))
                .ok_or_else(|| {
                    "neither XDG_CACHE_HOME nor HOME is set; set admin.object_cache_dir".into()
                }),
        }
    }
}
