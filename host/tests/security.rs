//! Secured NATS, for real: a nats-server configured for each authentication method (and for
//! mutual TLS), and the real binary relaying events through it with its secret taken from a
//! file or the environment, never printed. (JWT `.creds` files: see the manual check in
//! the README.)
//!
//! Then the secrets matrix: every place a secret can be configured (`[nats.auth]` password,
//! token and NKey seed, credentials in `nats.url` and `TIDEGATE_NATS_URL`, `mongodb_uri` and
//! `TIDEGATE_PIPELINE_<ID>_MONGODB_URI`, a plugin's config value) × a mistake on its line ×
//! log levels info, debug and trace × every HTTP endpoint: the secret is never printed.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::ConnectOptions;
use support::{http_get, make_certificates, write_range, Harness, SIGTERM, STREAM};
use tidegate_testkit::{free_port, stream_len, wait_until, ChildProcess, NatsServer};

/// Starts the harness with a NATS server configured by `server_config`, reached by test
/// clients with `options`; runs the binary on the standard pipeline with `tidegate_nats`
/// (TOML appended to the config, e.g. a `[nats.auth]` table) and `env`; checks that 20 events
/// arrive, that it stops cleanly, and that `secret` is nowhere in its log.
async fn relays_through(
    server_config: &str,
    options: impl Fn() -> ConnectOptions + Send + Sync + 'static,
    tidegate_nats: &str,
    files: &[(&str, &str)],
    env: &[(&str, &str)],
    secret: &str,
) -> anyhow::Result<()> {
    let nats = NatsServer::start_with_config(server_config, Arc::new(options)).await?;
    let mut h = Harness::start().await?;
    h.nats = nats;
    for (name, content) in files {
        h.write_config(name, content)?;
    }
    let config = format!("{}\n{tidegate_nats}\n", h.config("", ""));
    let path = h.write_config("tidegate.toml", &config)?;
    let mut tidegate = h.spawn_binary_with_env(&path, env)?;
    h.wait_ready()
        .await
        .with_context(|| format!("tidegate log:\n{}", tidegate.log()))?;
    write_range(h.collection().await?, 0, 20, 20, Duration::ZERO).await?;
    let messages = h.wait_settled(STREAM, 20, Duration::from_secs(120)).await?;
    assert_eq!(messages.len(), 20);
    tidegate.signal(SIGTERM)?;
    let status = tidegate.wait_exit(Duration::from_secs(120)).await?;
    let log = tidegate.log();
    assert!(status.success(), "{log}");
    assert!(
        !log.contains(secret),
        "the secret leaked into the log:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_from_a_file() -> anyhow::Result<()> {
    relays_through(
        r#"authorization { user: "tidegate", password: "pw-Secret-1" }"#,
        || ConnectOptions::new().user_and_password("tidegate".into(), "pw-Secret-1".into()),
        "[nats.auth]\nuser = \"tidegate\"\npassword = { file = \"nats-password\" }",
        &[("nats-password", "pw-Secret-1\n")],
        &[],
        "pw-Secret-1",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_from_the_environment() -> anyhow::Result<()> {
    relays_through(
        r#"authorization { token: "tok-Secret-2" }"#,
        || ConnectOptions::new().token("tok-Secret-2".into()),
        "[nats.auth]\ntoken = { env = \"TIDEGATE_TEST_NATS_TOKEN\" }",
        &[],
        &[("TIDEGATE_TEST_NATS_TOKEN", "tok-Secret-2")],
        "tok-Secret-2",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_seed_from_a_file() -> anyhow::Result<()> {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed()?;
    let client_seed = seed.clone();
    relays_through(
        &format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
            user.public_key()
        ),
        move || ConnectOptions::new().nkey(client_seed.clone()),
        "[nats.auth]\nnkey_seed = { file = \"user.nk\" }",
        &[("user.nk", &format!("{seed}\n"))],
        &[],
        &seed,
    )
    .await
}

/// Mutual TLS: the server verifies tidegate's client certificate, tidegate verifies the
/// server's against a private CA. Certificates are made with the openssl command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_private_ca() -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    make_certificates(certs.path())?;
    let file = |name: &str| certs.path().join(name).display().to_string();
    let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client.key"));
    let client = {
        let (ca, cert, key) = (ca.clone(), cert.clone(), key.clone());
        move || {
            ConnectOptions::new()
                .require_tls(true)
                .add_root_certificates(ca.clone().into())
                .add_client_certificate(cert.clone().into(), key.clone().into())
        }
    };
    let server_config = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{ca}\", verify: true, timeout: 5 }}",
        file("server.pem"),
        file("server.key"),
    );
    relays_through(
        &server_config,
        client,
        &format!("[nats.tls]\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\""),
        &[],
        &[],
        "PRIVATE KEY",
    )
    .await
}

/// Operator (JWT) mode: an operator, an account with JetStream enabled and a user, their
/// JWTs signed here with NKeys, and tidegate authenticating with a `.creds` file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_file_in_operator_mode() -> anyhow::Result<()> {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    // JetStream needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        serde_json::json!({ "type": "account", "version": 2 }),
    )?;
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        serde_json::json!({ "type": "operator", "version": 2 }),
    )?;
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        serde_json::json!({
            "type": "account", "version": 2,
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
            },
        }),
    )?;
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        serde_json::json!({ "type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1 }),
    )?;
    let seed = user.seed()?;
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    let server_config = format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {acc}: \"{account_jwt}\"\n  {sys}: \"{system_jwt}\"\n}}\n",
        acc = account.public_key(),
        sys = system.public_key(),
    );
    let client_creds = creds.clone();
    relays_through(
        &server_config,
        move || {
            ConnectOptions::with_credentials(&client_creds)
                .unwrap_or_else(|_| ConnectOptions::new())
        },
        "[nats.auth]\ncredentials_file = \"user.creds\"",
        &[("user.creds", &creds)],
        &[],
        &seed,
    )
    .await
}

/// A NATS JWT (`ed25519-nkey`) for `subject`, signed by `issuer`, with `nats` claims.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, nats: serde_json::Value) -> anyhow::Result<String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let header = b64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("tidegate-test-{subject}"),
        "iat": now,
        "iss": issuer.public_key(),
        "name": "tidegate-test",
        "sub": subject,
        "nats": nats,
    });
    let body = b64.encode(serde_json::to_vec(&claims)?);
    let signed = format!("{header}.{body}");
    let signature = b64.encode(issuer.sign(signed.as_bytes())?);
    Ok(format!("{signed}.{signature}"))
}

/// MongoDB SCRAM-SHA-256: the connection string (from the environment, so the secret is not
/// in the file) carries a user's credentials; tidegate relays with them, and with a wrong
/// password it stops (exit 1) saying authentication failed. Neither password reaches the log. (The test
/// mongod does not enforce access control, but it does verify a client's SCRAM handshake.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_scram_credentials_from_the_environment() -> anyhow::Result<()> {
    const URI_VAR: &str = "TIDEGATE_PIPELINE_ORDERS_MONGODB_URI";
    let h = Harness::start().await?;
    h.mongo
        .client()
        .await?
        .database("admin")
        .run_command(bson::doc! {
            "createUser": "tidegate",
            "pwd": "mongo-Secret-3",
            "roles": [{ "role": "root", "db": "admin" }],
        })
        .await?;
    let uri = format!(
        "{}&authSource=admin&authMechanism=SCRAM-SHA-256",
        h.mongo
            .uri()
            .replace("mongodb://", "mongodb://tidegate:mongo-Secret-3@")
    );
    let path = h.write_config("tidegate.toml", &h.config("", ""))?;
    let mut tidegate = h.spawn_binary_with_env(&path, &[(URI_VAR, &uri)])?;
    h.wait_ready().await?;
    write_range(h.collection().await?, 0, 20, 20, Duration::ZERO).await?;
    assert_eq!(
        h.wait_settled(STREAM, 20, Duration::from_secs(120))
            .await?
            .len(),
        20
    );
    tidegate.signal(SIGTERM)?;
    assert!(tidegate
        .wait_exit(Duration::from_secs(120))
        .await?
        .success());
    assert!(
        !tidegate.log().contains("mongo-Secret-3"),
        "{}",
        tidegate.log()
    );

    let wrong = uri.replace("mongo-Secret-3", "wrong-Secret-4");
    let mut tidegate = h.spawn_binary_with_env(&path, &[(URI_VAR, &wrong)])?;
    let status = tidegate.wait_exit(Duration::from_secs(120)).await?;
    let log = tidegate.log();
    assert_eq!(status.code(), Some(1), "a fatal error: {log}");
    assert!(log.contains("Authentication failed"), "{log}");
    assert!(!log.contains("wrong-Secret-4"), "{log}");
    Ok(())
}

/// Where a mistake in the file puts a secret: each line below, written with one of
/// [`MISTAKES`], must make `tidegate check` fail naming the line without printing the secret.
const SECRET_LINES: &[(&str, &str)] = &[
    ("[nats.auth]\nuser = \"u\"", "password = \"{S}\""),
    ("[nats.auth]", "token = \"{S}\""),
    ("[nats.auth]", "nkey_seed = \"SU{S}\""),
    ("", "url = \"nats://u:{S}@127.0.0.1:4222\""),
    (
        "",
        "url = \"nats://{S}@127.0.0.1:4222,nats://{S}@127.0.0.1:4223\"",
    ),
    (
        "",
        "mongodb_uri = \"mongodb://u:{S}@127.0.0.1:1/?replicaSet=rs0\"",
    ),
    ("", "config = { fields = \"email\", hash-key = \"{S}\" }"),
];

/// Typos on a `key = "value"` line: each makes the file invalid TOML or an invalid config.
const MISTAKES: &[&str] = &[
    "misspelt key",
    "trailing garbage",
    "unterminated string",
    "unterminated literal string",
    "missing =",
    "duplicate key",
    "value without quotes",
    "unterminated multi-line string",
];

/// `line` (`key = "value"`) with `mistake` made in it.
fn with_mistake(line: &str, mistake: &str) -> String {
    let (key, value) = line.split_once(" = ").expect("key = value");
    let bare = value.replace('"', "");
    match mistake {
        "misspelt key" => format!("{key}x = {value}"),
        "trailing garbage" => format!("{line} garbage"),
        "unterminated string" => format!("{key} = \"{bare}"),
        "unterminated literal string" => format!("{key} = '{bare}"),
        "missing =" => format!("{key} {value}"),
        "duplicate key" => format!("{line}\n{line}"),
        "value without quotes" => format!("{key} = {bare}"),
        "unterminated multi-line string" => format!("{key} = \"\"\"{bare}"),
        other => unreachable!("{other}"),
    }
}

/// A config file where each secret line can be placed: `[nats]` (for `url`), the pipeline
/// (for `mongodb_uri`), a redact plugin (for `config`), or `[nats.auth]` at the end.
fn config_with(table: &str, line: &str) -> String {
    let nats_url = if line.starts_with("url") {
        line
    } else {
        "url = \"nats://127.0.0.1:4222\""
    };
    let mongodb_uri = if line.starts_with("mongodb_uri") {
        line
    } else {
        "mongodb_uri = \"mongodb://127.0.0.1:1/?replicaSet=rs0\""
    };
    let plugin_config = if line.starts_with("config") {
        line
    } else {
        "config = { fields = \"email\" }"
    };
    let auth = if table.is_empty() {
        String::new()
    } else {
        format!("{table}\n{line}\n")
    };
    format!(
        "[nats]\n{nats_url}\n\n[[pipeline]]\nid = \"p\"\n{mongodb_uri}\ndatabase = \"d\"\n\
         [pipeline.sink]\nstream = \"S\"\nsubject_prefix = \"cdc\"\n\
         [[pipeline.plugins]]\nname = \"redact\"\n{plugin_config}\n\n{auth}"
    )
}

/// Every place a secret can be written in the file × every typo on its line: `tidegate
/// check` fails (exit 2) naming the line, and the secret is not in its output. Values from
/// the environment that are malformed are refused without being echoed too.
#[test]
fn config_mistakes_never_print_a_secret() -> anyhow::Result<()> {
    const SECRET: &str = "Mistake-Secret-7f3a9c";
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tidegate.toml");
    let check = |text: &str, env: &[(&str, &str)]| -> anyhow::Result<(Option<i32>, String)> {
        std::fs::write(&path, text)?;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .output()?;
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.code(), output))
    };
    let mut tried = 0;
    for (table, line) in SECRET_LINES {
        let line = line.replace("{S}", SECRET);
        // The line as written is valid: the mistakes below are what makes it fail.
        let (_, output) = check(&config_with(table, &line), &[])?;
        assert!(!output.contains(SECRET), "valid {line}: {output}");
        for mistake in MISTAKES {
            let text = config_with(table, &with_mistake(&line, mistake));
            let (code, output) = check(&text, &[])?;
            assert_eq!(code, Some(2), "{mistake} in {line}: {output}");
            assert!(
                !output.contains(SECRET),
                "{mistake} in {line} printed the secret:\n{output}"
            );
            assert!(output.contains("line "), "{mistake} in {line}: {output}");
            tried += 1;
        }
    }
    assert_eq!(tried, SECRET_LINES.len() * MISTAKES.len());
    let valid = config_with("", "url = \"nats://127.0.0.1:4222\"");
    for url in [
        format!("nats://:{SECRET}@127.0.0.1:4222"),
        format!("nats://u:{SECRET}@"),
        format!("nats://u:{SECRET}%zz@127.0.0.1:4222"),
        format!("nats://u:{SECRET}@h1,nats://u:other-{SECRET}@h2"),
    ] {
        let (code, output) = check(&valid, &[("TIDEGATE_NATS_URL", &url)])?;
        assert_eq!(code, Some(2), "{output}");
        assert!(output.contains("nats.url"), "{output}");
        assert!(!output.contains(SECRET), "{output}");
    }
    let both = format!("{valid}\n[nats.auth]\ntoken = \"t\"\n");
    let (code, output) = check(
        &both,
        &[(
            "TIDEGATE_NATS_URL",
            &format!("nats://u:{SECRET}@127.0.0.1:4222"),
        )],
    )?;
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("give them in one place only"), "{output}");
    assert!(!output.contains(SECRET), "{output}");
    Ok(())
}

/// The HTTP endpoints, all checked for secrets.
const ENDPOINTS: &[&str] = &["/", "/status", "/metrics", "/healthz", "/readyz"];

/// Runs the binary once per log level (info, debug, trace) on `config` (a complete file
/// without `[log]` and `[http]`) with `env`: waits until `/readyz` says ready (so every
/// connection is made: NATS authenticated, MongoDB authenticated), relays 5 events, reads
/// every endpoint, stops it, and checks that no `secrets` appear in its output or in any
/// response.
async fn never_leaks(
    h: &Harness,
    config: &str,
    env: &[(&str, &str)],
    secrets: &[&str],
) -> anyhow::Result<()> {
    let client = h.nats_client().await?;
    let coll = h.collection().await?;
    for level in ["info", "debug", "trace"] {
        let address = format!("127.0.0.1:{}", free_port());
        let text =
            format!("{config}\n[log]\nlevel = \"{level}\"\n\n[http]\naddress = \"{address}\"\n");
        let path = h.write_config("tidegate.toml", &text)?;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"));
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG");
        cmd.envs(env.iter().copied());
        let mut tidegate = ChildProcess::spawn(cmd)?;
        wait_until("/readyz says ready", Duration::from_secs(120), || {
            let address = address.clone();
            async move { matches!(http_get(&address, "/readyz").await, Ok((200, _))) }
        })
        .await
        .with_context(|| format!("level {level}, tidegate log:\n{}", tidegate.log()))?;
        let before = stream_len(&client, STREAM).await;
        let from = i64::try_from(before)?;
        write_range(coll.clone(), from, from + 5, 5, Duration::ZERO).await?;
        wait_until("5 more messages", Duration::from_secs(120), || {
            let client = client.clone();
            async move { stream_len(&client, STREAM).await >= before + 5 }
        })
        .await
        .with_context(|| format!("level {level}, tidegate log:\n{}", tidegate.log()))?;
        for endpoint in ENDPOINTS {
            let (status, body) = http_get(&address, endpoint).await?;
            assert_eq!(status, 200, "{endpoint}: {body}");
            for secret in secrets {
                assert!(
                    !body.contains(secret),
                    "level {level}: {endpoint} shows a secret:\n{body}"
                );
            }
        }
        tidegate.signal(SIGTERM)?;
        let status = tidegate.wait_exit(Duration::from_secs(60)).await?;
        let log = tidegate.log();
        assert!(status.success(), "level {level}:\n{log}");
        let marker = format!(" {} ", level.to_uppercase());
        assert!(
            log.contains(&marker),
            "level {level} took no effect:\n{log}"
        );
        for secret in secrets {
            assert!(
                !log.contains(secret),
                "level {level}: the log shows a secret:\n{log}"
            );
        }
    }
    Ok(())
}

/// A harness whose NATS server requires `authorization`, reached by test clients with
/// `options`, and whose MongoDB has a SCRAM user `tidegate` with `mongo_password`. Returns it
/// with the MongoDB URI carrying those credentials.
async fn secured_harness(
    authorization: &str,
    options: impl Fn() -> ConnectOptions + Send + Sync + 'static,
    mongo_password: &str,
) -> anyhow::Result<(Harness, String)> {
    let nats = NatsServer::start_with_config(authorization, Arc::new(options)).await?;
    let mut h = Harness::start().await?;
    h.nats = nats;
    h.mongo
        .client()
        .await?
        .database("admin")
        .run_command(bson::doc! {
            "createUser": "tidegate",
            "pwd": mongo_password,
            "roles": [{ "role": "root", "db": "admin" }],
        })
        .await?;
    let uri = format!(
        "{}&authSource=admin&authMechanism=SCRAM-SHA-256",
        h.mongo.uri().replace(
            "mongodb://",
            &format!("mongodb://tidegate:{mongo_password}@")
        )
    );
    Ok((h, uri))
}

/// The standard pipeline with a `redact` plugin whose `hash-key` is `hash_key`, and
/// `nats_url` and `mongodb_uri` in the file.
fn matrix_config(h: &Harness, nats_url: &str, mongodb_uri: &str, hash_key: &str) -> String {
    let plugins = format!(
        "[[pipeline.plugins]]\nname = \"redact\"\nconfig = {{ hash = \"email\", hash-key = \"{hash_key}\" }}\n"
    );
    h.config(&plugins, "")
        .replacen(
            &format!("url = \"{}\"", h.nats.url()),
            &format!("url = \"{nats_url}\""),
            1,
        )
        .replacen(
            &format!("mongodb_uri = \"{}\"", h.mongo.uri()),
            &format!("mongodb_uri = \"{mongodb_uri}\""),
            1,
        )
}

/// Secrets written in the file: a `[nats.auth]` password, credentials in `mongodb_uri`, and
/// a plugin's `hash-key`, at info, debug and trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_secrets_never_leak_at_any_level() -> anyhow::Result<()> {
    let (nats_pw, mongo_pw, hash_key) = (
        "File-Nats-Secret-1",
        "File-Mongo-Secret-2",
        "File-Hash-Key-Secret-3",
    );
    let (h, uri) = secured_harness(
        r#"authorization { user: "tidegate", password: "File-Nats-Secret-1" }"#,
        || ConnectOptions::new().user_and_password("tidegate".into(), "File-Nats-Secret-1".into()),
        mongo_pw,
    )
    .await?;
    let config = format!(
        "{}\n[nats.auth]\nuser = \"tidegate\"\npassword = \"{nats_pw}\"\n",
        matrix_config(&h, &h.nats.url(), &uri, hash_key)
    );
    never_leaks(&h, &config, &[], &[nats_pw, mongo_pw, hash_key]).await
}

/// The documented `nats://user:password@host` form authenticates against a server with
/// authorization (with two comma-separated URLs), from the file and from
/// `TIDEGATE_NATS_URL`, with MongoDB's credentials from `TIDEGATE_PIPELINE_ORDERS_MONGODB_URI`;
/// no secret is printed at any level. A malformed MongoDB URI from the environment stops
/// the pipeline without printing its password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_credentials_authenticate_and_never_leak() -> anyhow::Result<()> {
    const MONGO_VAR: &str = "TIDEGATE_PIPELINE_ORDERS_MONGODB_URI";
    let (nats_pw, mongo_pw) = ("Url-Nats-Secret-4", "Env-Mongo-Secret-5");
    let (h, uri) = secured_harness(
        r#"authorization { user: "tidegate", password: "Url-Nats-Secret-4" }"#,
        || ConnectOptions::new().user_and_password("tidegate".into(), "Url-Nats-Secret-4".into()),
        mongo_pw,
    )
    .await?;
    let port = h.nats.port();
    let url = format!(
        "nats://tidegate:{nats_pw}@127.0.0.1:{port},nats://tidegate:{nats_pw}@localhost:{port}"
    );
    let in_file = matrix_config(&h, &url, &h.mongo.uri(), "Url-Hash-Key-Secret-6");
    never_leaks(
        &h,
        &in_file,
        &[(MONGO_VAR, &uri)],
        &[nats_pw, mongo_pw, "Url-Hash-Key-Secret-6"],
    )
    .await?;
    let from_env = matrix_config(&h, &h.nats.url(), &h.mongo.uri(), "Url-Hash-Key-Secret-6");
    never_leaks(
        &h,
        &from_env,
        &[("TIDEGATE_NATS_URL", &url), (MONGO_VAR, &uri)],
        &[nats_pw, mongo_pw],
    )
    .await?;

    let path = h.write_config("tidegate.toml", &from_env)?;
    let bad = format!("mongodb://tidegate:{mongo_pw}@127.0.0.1:notaport/?replicaSet=rs0");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"));
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "trace");
    cmd.envs([
        ("TIDEGATE_NATS_URL", url.as_str()),
        (MONGO_VAR, bad.as_str()),
    ]);
    let mut tidegate = ChildProcess::spawn(cmd)?;
    let status = tidegate.wait_exit(Duration::from_secs(120)).await?;
    let log = tidegate.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("invalid MongoDB URI"), "{log}");
    assert!(!log.contains(mongo_pw) && !log.contains(nats_pw), "{log}");
    Ok(())
}

/// A token (in `[nats.auth]`, then as `nats://token@host`) and an NKey seed, at every level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_nkey_secrets_never_leak_at_any_level() -> anyhow::Result<()> {
    let token = "Tok-Nats-Secret-7";
    let (h, uri) = secured_harness(
        r#"authorization { token: "Tok-Nats-Secret-7" }"#,
        || ConnectOptions::new().token("Tok-Nats-Secret-7".into()),
        "Tok-Mongo-Secret-8",
    )
    .await?;
    let base = matrix_config(&h, &h.nats.url(), &uri, "Tok-Hash-Key-Secret-9");
    let secrets = [token, "Tok-Mongo-Secret-8", "Tok-Hash-Key-Secret-9"];
    never_leaks(
        &h,
        &format!("{base}\n[nats.auth]\ntoken = \"{token}\"\n"),
        &[],
        &secrets,
    )
    .await?;
    let url = format!("nats://{token}@127.0.0.1:{}", h.nats.port());
    let in_url = matrix_config(&h, &url, &uri, "Tok-Hash-Key-Secret-9");
    never_leaks(&h, &in_url, &[], &secrets).await?;
    drop(h);

    let user = nkeys::KeyPair::new_user();
    let seed = user.seed()?;
    let client_seed = seed.clone();
    let (h, uri) = secured_harness(
        &format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
            user.public_key()
        ),
        move || ConnectOptions::new().nkey(client_seed.clone()),
        "Nkey-Mongo-Secret-10",
    )
    .await?;
    let config = format!(
        "{}\n[nats.auth]\nnkey_seed = \"{seed}\"\n",
        matrix_config(&h, &h.nats.url(), &uri, "Nkey-Hash-Key-Secret-11")
    );
    never_leaks(
        &h,
        &config,
        &[],
        &[&seed, "Nkey-Mongo-Secret-10", "Nkey-Hash-Key-Secret-11"],
    )
    .await
}
