//! Secured NATS, for real: a nats-server configured for each authentication method (and for
//! mutual TLS), and the real binary relaying events through it with its secret taken from a
//! file or the environment, never printed. (JWT `.creds` files: see the manual check in
//! the README.)

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::ConnectOptions;
use support::{write_range, Harness, SIGTERM, STREAM};
use tidegate_testkit::NatsServer;

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

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files
/// in `dir`.
fn make_certificates(dir: &Path) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (scripts/install-deps.sh installs it)")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = [
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tidegate test CA",
        ],
    ]
    .concat();
    openssl(&ca)?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    for name in ["server", "client"] {
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let subject = format!("/CN={name}");
        let request = [
            &["req"][..],
            &ec,
            &["-keyout", &key, "-out", &csr, "-subj", &subject],
        ]
        .concat();
        openssl(&request)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ])?;
    }
    Ok(())
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
