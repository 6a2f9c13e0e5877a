//! Connecting to secured servers: NATS authentication and TLS, MongoDB defaults, and
//! secrets read from the environment or files.
//!
//! Secrets never appear in logs or error messages: [`Secret`]'s `Debug` shows where the
//! secret comes from, never its value, and errors name the variable or file only. As a
//! second line of defence every secret value tidegate learns (from [`Secret::read`], from
//! credentials in `nats.url` and from `mongodb_uri`) is remembered with [`remember_secret`],
//! and [`scrub`] replaces it with `***` in every log line, error message and HTTP response,
//! whatever a client library chose to print.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

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
    /// The secret's value, remembered for [`scrub`]; the error names where it was looked
    /// for, never a value.
    pub fn read(&self) -> Result<String, String> {
        let value = match self {
            Secret::Env { env } => std::env::var(env)
                .map_err(|_| format!("environment variable {env} is not set (or not UTF-8)")),
            Secret::File { file } => std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|err| format!("cannot read {}: {err}", file.display())),
            Secret::Literal(value) => Ok(value.clone()),
        }?;
        remember_secret(&value);
        remember_secret(value.trim());
        Ok(value)
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
    /// Whether any method is configured.
    pub fn is_configured(&self) -> bool {
        self.user.is_some()
            || self.password.is_some()
            || self.token.is_some()
            || self.nkey_seed.is_some()
            || self.credentials_file.is_some()
    }

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

/// Credentials given in `nats.url` (`nats://user:password@host`, `nats://token@host`).
#[derive(Clone, PartialEq, Eq)]
pub enum UrlCredentials {
    /// `user:password@`.
    UserPassword {
        /// The user name.
        user: String,
        /// Its password.
        password: String,
    },
    /// `token@`.
    Token(String),
}

impl fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlCredentials::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            UrlCredentials::Token(_) => write!(f, "Token(***)"),
        }
    }
}

/// `nats.url` taken apart: the server addresses without credentials, and the credentials
/// they carried. The NATS client ignores credentials inside URLs, so tidegate takes them
/// out and passes them as authentication options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrls {
    /// Every server, as given but without `…@`.
    pub servers: Vec<String>,
    /// The credentials, if any URL carried some (all that do must carry the same).
    pub credentials: Option<UrlCredentials>,
}

/// Splits comma-separated `url` into servers and credentials (percent-decoded). Errors
/// name the server by position, never echo the URL: it may hold a password.
pub fn parse_nats_urls(url: &str) -> Result<NatsUrls, String> {
    let mut servers = Vec::new();
    let mut credentials: Option<UrlCredentials> = None;
    for (index, one) in url.split(',').map(str::trim).enumerate() {
        let at = |problem: &str| format!("nats.url: server {} of the list {problem}", index + 1);
        if one.is_empty() {
            return Err(at("is empty (a stray comma?)"));
        }
        let authority_start = one.find("://").map_or(0, |i| i + 3);
        let authority_end = one[authority_start..]
            .find(['/', '?', '#'])
            .map_or(one.len(), |i| authority_start + i);
        let authority = &one[authority_start..authority_end];
        let Some(split) = authority.rfind('@') else {
            if authority.is_empty() {
                return Err(at("has no host"));
            }
            servers.push(one.to_string());
            continue;
        };
        let (userinfo, host) = (&authority[..split], &authority[split + 1..]);
        if host.is_empty() {
            return Err(at("has no host after its credentials"));
        }
        let these = match userinfo.split_once(':') {
            Some((user, raw_password)) => {
                let user = percent_decode(user).ok_or_else(|| at("has a badly %-encoded user"))?;
                if user.is_empty() {
                    return Err(at("has a password but no user name"));
                }
                let password = percent_decode(raw_password)
                    .ok_or_else(|| at("has a badly %-encoded password"))?;
                remember_secret(raw_password);
                remember_secret(&password);
                UrlCredentials::UserPassword { user, password }
            }
            None => {
                let token =
                    percent_decode(userinfo).ok_or_else(|| at("has a badly %-encoded token"))?;
                if token.is_empty() {
                    return Err(at("has an empty token before '@'"));
                }
                remember_secret(&token);
                UrlCredentials::Token(token)
            }
        };
        remember_secret(userinfo);
        match &credentials {
            Some(known) if *known != these => {
                return Err(at(
                    "carries other credentials than an earlier one; give them once, in [nats.auth]",
                ))
            }
            _ => credentials = Some(these),
        }
        servers.push(format!(
            "{}{host}{}",
            &one[..authority_start],
            &one[authority_end..]
        ));
    }
    Ok(NatsUrls {
        servers,
        credentials,
    })
}

/// `%XX` sequences decoded; `None` when one is malformed or the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Remembers the password of a MongoDB connection string for [`scrub`] (the driver parses
/// the string itself; this only has to find what must never be printed).
pub fn remember_mongodb_uri_secret(uri: &str) {
    let Some(rest) = uri.split_once("://").map(|(_, rest)| rest) else {
        return;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    // The driver takes the last '@' of the host part as the end of the credentials.
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return;
    };
    remember_secret(userinfo);
    if let Some((_, password)) = userinfo.split_once(':') {
        remember_secret(password);
        if let Some(decoded) = percent_decode(password) {
            remember_secret(&decoded);
        }
    }
}

/// Every secret value tidegate has learnt, longest first (so that a secret containing
/// another is replaced whole).
static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Adds `value` to the secrets [`scrub`] removes. Empty values are ignored.
pub fn remember_secret(value: &str) {
    if value.is_empty() {
        return;
    }
    let mut secrets = SECRETS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !secrets.iter().any(|known| known == value) {
        secrets.push(value.to_string());
        secrets.sort_by_key(|known| std::cmp::Reverse(known.len()));
    }
}

/// `text` with every remembered secret replaced by `***`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let secrets = SECRETS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut text = Cow::Borrowed(text);
    for secret in secrets.iter() {
        if text.contains(secret.as_str()) {
            text = Cow::Owned(text.replace(secret.as_str(), "***"));
        }
    }
    text
}

/// Connection options carrying the configured authentication (from `[nats.auth]` or the
/// URL's credentials; the config refuses both at once) and TLS.
pub async fn nats_options(
    auth: &NatsAuth,
    url_credentials: Option<&UrlCredentials>,
    tls: Option<&NatsTls>,
) -> Result<async_nats::ConnectOptions, Error> {
    let fail = |what: &str, message: String| Error::Startup {
        message: format!("nats.auth.{what}: {message}"),
    };
    let mut options = async_nats::ConnectOptions::new();
    match url_credentials {
        Some(UrlCredentials::UserPassword { user, password }) => {
            options = options.user_and_password(user.clone(), password.clone());
        }
        Some(UrlCredentials::Token(token)) => options = options.token(token.clone()),
        None => {}
    }
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
    mongo_client_watched(uri, None).await
}

/// Like [`mongo_client`], with `topology` told of every change the driver sees in the
/// deployment (servers up or down, elections), e.g. to log them.
pub async fn mongo_client_watched(
    uri: &str,
    topology: Option<mongodb::event::EventHandler<mongodb::event::sdam::SdamEvent>>,
) -> Result<mongodb::Client, mongodb::error::Error> {
    remember_mongodb_uri_secret(uri);
    let mut options = mongodb::options::ClientOptions::parse(uri).await?;
    apply_mongo_defaults(&mut options);
    options.sdam_event_handler = topology;
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

    /// Credentials come out of the URLs (percent-decoded) and are remembered for `scrub`;
    /// mistakes are named without echoing the URL.
    #[test]
    fn url_credentials_are_taken_out() {
        let urls = parse_nats_urls("nats://tide:p%40ss-Url-1@h1:4222, tls://tide:p%40ss-Url-1@h2")
            .expect("valid");
        assert_eq!(urls.servers, ["nats://h1:4222", "tls://h2"]);
        assert_eq!(
            urls.credentials,
            Some(UrlCredentials::UserPassword {
                user: "tide".into(),
                password: "p@ss-Url-1".into()
            })
        );
        assert_eq!(scrub("x p@ss-Url-1 y p%40ss-Url-1"), "x *** y ***");
        let urls = parse_nats_urls("tok-Url-2@h:4222,nats://h2").expect("valid");
        assert_eq!(urls.servers, ["h:4222", "nats://h2"]);
        assert_eq!(
            urls.credentials,
            Some(UrlCredentials::Token("tok-Url-2".into()))
        );
        assert_eq!(
            parse_nats_urls("nats://h").expect("valid").credentials,
            None
        );
        for (url, expected) in [
            (
                "nats://a:b-Url-3@h,nats://a:c-Url-3@h",
                "server 2 of the list carries other",
            ),
            ("nats://h,,nats://g", "server 2 of the list is empty"),
            ("nats://:b-Url-3@h", "no user name"),
            ("nats://a:b-Url-3@", "no host"),
            ("nats://a:%zz-Url-3@h", "badly %-encoded password"),
        ] {
            let err = parse_nats_urls(url).expect_err(url);
            assert!(err.contains(expected), "{url}: {err}");
            assert!(!err.contains("-Url-3"), "{err}");
        }
    }

    #[test]
    fn mongodb_passwords_are_remembered() {
        remember_mongodb_uri_secret("mongodb://u:pw%2FMongo-5@h1,h2/db?replicaSet=rs0");
        assert_eq!(scrub("a pw/Mongo-5 b pw%2FMongo-5 c"), "a *** b *** c");
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
