//! Connecting to secured servers: NATS authentication and TLS, MongoDB defaults, and
//! secrets read from the environment or files.
//!
//! Secrets never appear in logs or error messages: [`Secret`]'s `Debug` shows where the
//! secret comes from, never its value, and errors name the variable or file only.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::Error;

/// A secret value: `{ env = "VAR" }`, `{ file = "/path" }` (trailing newline trimmed), or a
/// literal string (discouraged: the config file then holds the secret).
#[derive(Clone, Deserialize)]
#[serde(untagged)]
pub enum Secret {
    /// Read from an environment variable.
    Env {
        /// The variable's name.
        env: String,
    },
    /// Read from a file.
    File {
        /// The file; relative paths are resolved against the config file's folder.
        file: PathBuf,
    },
    /// Given in the config file.
    Literal(String),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Env { env } => write!(f, "Secret(env {env})"),
            Secret::File { file } => write!(f, "Secret(file {})", file.display()),
            Secret::Literal(_) => write!(f, "Secret(***)"),
        }
    }
}

impl Secret {
    /// The secret's value; the error names where it was looked for, never a value.
    pub fn read(&self) -> Result<String, String> {
        match self {
            Secret::Env { env } => std::env::var(env)
                .map_err(|_| format!("environment variable {env} is not set (or not UTF-8)")),
            Secret::File { file } => std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|err| format!("cannot read {}: {err}", file.display())),
            Secret::Literal(value) => Ok(value.clone()),
        }
    }

    fn resolve(&mut self, base: &Path) {
        if let Secret::File { file } = self {
            *file = base.join(&*file);
        }
    }
}

/// `[nats.auth]`: at most one way of authenticating.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsAuth {
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<Secret>,
    /// Authentication token.
    pub token: Option<Secret>,
    /// NKey seed (`SU…`) of a user authenticated by its public key.
    pub nkey_seed: Option<Secret>,
    /// A `.creds` file (user JWT and NKey seed), for servers in operator (JWT) mode.
    pub credentials_file: Option<PathBuf>,
}

/// `[nats.tls]`: TLS to NATS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// PEM file of the certificate authorities to trust (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl NatsAuth {
    /// Checks that one method at most is configured, completely.
    pub fn validate(&self) -> Result<(), String> {
        let methods = [
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some(),
            self.credentials_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err("nats.auth: set one of user/password, token, nkey_seed or \
                        credentials_file, not several"
                .into());
        }
        if self.user.is_some() != self.password.is_some() {
            return Err("nats.auth: user and password go together".into());
        }
        Ok(())
    }

    /// Resolves relative file paths against the config file's folder.
    pub fn resolve(&mut self, base: &Path) {
        for secret in [&mut self.password, &mut self.token, &mut self.nkey_seed]
            .into_iter()
            .flatten()
        {
            secret.resolve(base);
        }
        if let Some(file) = &mut self.credentials_file {
            *file = base.join(&*file);
        }
    }
}

impl NatsTls {
    /// Checks that a client certificate comes with its key.
    pub fn validate(&self) -> Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("nats.tls: cert_file and key_file go together".into());
        }
        Ok(())
    }

    /// Resolves relative file paths against the config file's folder.
    pub fn resolve(&mut self, base: &Path) {
        for file in [&mut self.ca_file, &mut self.cert_file, &mut self.key_file]
            .into_iter()
            .flatten()
        {
            *file = base.join(&*file);
        }
    }
}

/// Connection options carrying the configured authentication and TLS.
pub async fn nats_options(
    auth: &NatsAuth,
    tls: Option<&NatsTls>,
) -> Result<async_nats::ConnectOptions, Error> {
    let fail = |what: &str, message: String| Error::Startup {
        message: format!("nats.auth.{what}: {message}"),
    };
    let mut options = async_nats::ConnectOptions::new();
    if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
        let password = password.read().map_err(|m| fail("password", m))?;
        options = options.user_and_password(user.clone(), password);
    }
    if let Some(token) = &auth.token {
        options = options.token(token.read().map_err(|m| fail("token", m))?);
    }
    if let Some(seed) = &auth.nkey_seed {
        let seed = seed.read().map_err(|m| fail("nkey_seed", m))?;
        // Checked here so that a bad seed is a clear start-up error, not a failed handshake.
        nkeys::KeyPair::from_seed(seed.trim())
            .map_err(|_| fail("nkey_seed", "not a valid NKey seed".into()))?;
        options = options.nkey(seed.trim().to_string());
    }
    if let Some(file) = &auth.credentials_file {
        options = options.credentials_file(file).await.map_err(|err| {
            fail(
                "credentials_file",
                format!("cannot use {}: {err}", file.display()),
            )
        })?;
    }
    if let Some(tls) = tls {
        options = options.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    Ok(options)
}

/// A MongoDB client for `uri`: every option of the connection string applies (SCRAM, x509,
/// TLS, …), and where it says nothing, writes wait for a majority (`w=majority`) and reads
/// prefer the primary but survive its loss (`readPreference=primaryPreferred`).
pub async fn mongo_client(uri: &str) -> Result<mongodb::Client, mongodb::error::Error> {
    let mut options = mongodb::options::ClientOptions::parse(uri).await?;
    apply_mongo_defaults(&mut options);
    mongodb::Client::with_options(options)
}

/// How long an operation waits for a usable server unless the URI says
/// (`serverSelectionTimeoutMS`): the driver's 30 s left a wrong host or replica-set name
/// unreported for half a minute. Operations that time out are retried, so an election
/// (about 10 s) costs retries, not failures.
const SERVER_SELECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn apply_mongo_defaults(options: &mut mongodb::options::ClientOptions) {
    use mongodb::options::{ReadPreference, SelectionCriteria, WriteConcern};
    if options.server_selection_timeout.is_none() {
        options.server_selection_timeout = Some(SERVER_SELECTION_TIMEOUT);
    }
    if options.write_concern.is_none() {
        options.write_concern = Some(WriteConcern::majority());
    }
    if options.selection_criteria.is_none() {
        options.selection_criteria = Some(SelectionCriteria::ReadPreference(
            ReadPreference::PrimaryPreferred {
                options: Default::default(),
            },
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_output() {
        let secret = Secret::Literal("hunter2".into());
        assert!(!format!("{secret:?}").contains("hunter2"));
        let auth = NatsAuth {
            user: Some("u".into()),
            password: Some(secret),
            ..Default::default()
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
    }

    #[test]
    fn secrets_come_from_files_and_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pw"), "s3cret\n").expect("write");
        let mut secret = Secret::File { file: "pw".into() };
        secret.resolve(dir.path());
        assert_eq!(secret.read().as_deref(), Ok("s3cret"));
        let missing = Secret::Env {
            env: "TIDEGATE_TEST_SURELY_UNSET".into(),
        };
        assert!(missing
            .read()
            .unwrap_err()
            .contains("TIDEGATE_TEST_SURELY_UNSET"));
    }

    #[test]
    fn one_auth_method_at_most() {
        let both = NatsAuth {
            token: Some(Secret::Literal("t".into())),
            nkey_seed: Some(Secret::Literal("s".into())),
            ..Default::default()
        };
        assert!(both.validate().is_err());
        let half = NatsAuth {
            user: Some("u".into()),
            ..Default::default()
        };
        assert!(half.validate().is_err());
    }

    #[tokio::test]
    async fn mongo_defaults_apply_only_where_absent() {
        let mut options = mongodb::options::ClientOptions::parse(
            "mongodb://localhost/?w=1&readPreference=secondary",
        )
        .await
        .expect("uri");
        apply_mongo_defaults(&mut options);
        assert_eq!(
            options.write_concern.and_then(|w| w.w),
            Some(mongodb::options::Acknowledgment::Nodes(1))
        );
        let mut options = mongodb::options::ClientOptions::parse("mongodb://localhost/")
            .await
            .expect("uri");
        apply_mongo_defaults(&mut options);
        assert_eq!(
            options.write_concern.and_then(|w| w.w),
            Some(mongodb::options::Acknowledgment::Majority)
        );
        assert!(matches!(
            options.selection_criteria,
            Some(mongodb::options::SelectionCriteria::ReadPreference(
                mongodb::options::ReadPreference::PrimaryPreferred { .. }
            ))
        ));
    }
}
