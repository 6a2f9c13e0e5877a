//! What tidegate's integration tests share: real servers, a config written for them, and
//! tidegate itself, either in-process (`tidegate::run`) or as the real binary.

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::message::StreamMessage;
use bson::doc;
use tidegate_testkit::{
    plugin_dir, stream_len, stream_messages, wait_until, ChildProcess, MongoReplicaSet, NatsServer,
};

/// SIGTERM, for `ChildProcess::signal`.
pub const SIGTERM: i32 = 15;
/// SIGSTOP (Linux), for `ChildProcess::signal`.
pub const SIGSTOP: i32 = 19;
/// SIGCONT (Linux), for `ChildProcess::signal`.
pub const SIGCONT: i32 = 18;

pub const PIPELINE: &str = "orders";
pub const STREAM: &str = "ORDERS";
pub const DB: &str = "shop";
pub const COLL: &str = "orders";

/// A MongoDB replica set, a NATS server, the built plugins and a scratch folder.
pub struct Harness {
    pub mongo: MongoReplicaSet,
    pub nats: NatsServer,
    pub plugins: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Harness {
    /// Waits until every unit of `units` has checkpointed (its change stream is open).
    pub async fn wait_checkpoints<S: AsRef<str>>(&self, units: &[S]) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(self.nats_client().await?);
        for unit in units {
            let key = unit.as_ref().to_string();
            wait_until(
                &format!("checkpoint of {key}"),
                Duration::from_secs(120),
                || {
                    let (js, key) = (js.clone(), key.clone());
                    async move {
                        match js.get_key_value("tidegate-checkpoints").await {
                            Ok(kv) => matches!(kv.get(&key).await, Ok(Some(_))),
                            Err(_) => false,
                        }
                    }
                },
            )
            .await?;
        }
        Ok(())
    }

    pub async fn start() -> anyhow::Result<Harness> {
        let (mongo, nats) = tokio::try_join!(MongoReplicaSet::start(), NatsServer::start())?;
        Harness::start_on(mongo, nats).await
    }

    /// A harness on servers the test started its own way (an older `mongod`, a NATS server
    /// with a larger `max_payload`, …).
    pub async fn start_on(mongo: MongoReplicaSet, nats: NatsServer) -> anyhow::Result<Harness> {
        let plugins = tokio::task::spawn_blocking(plugin_dir).await??;
        Ok(Harness {
            mongo,
            nats,
            plugins,
            dir: tempfile::tempdir()?,
        })
    }

    /// A config for one pipeline watching `shop.orders`, with `plugins` (TOML
    /// `[[pipeline.plugins]]` tables) and `extra_sink` lines appended to `[pipeline.sink]`.
    pub fn config(&self, plugins: &str, extra_sink: &str) -> String {
        format!(
            r#"
plugin_dir = "{plugin_dir}"

[nats]
url = "{nats}"
ack_timeout_ms = 2000

[[pipeline]]
id = "{PIPELINE}"
mongodb_uri = "{mongo}"
database = "{DB}"
collections = ["{COLL}"]
full_document = "update-lookup"

[pipeline.sink]
stream = "{STREAM}"
subject_prefix = "cdc"
{extra_sink}

[pipeline.checkpoint]
interval_ms = 200

{plugins}
"#,
            plugin_dir = self.plugins.display(),
            nats = self.nats.url(),
            mongo = self.mongo.uri(),
        )
    }

    pub fn write_config(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    }

    pub async fn collection(&self) -> anyhow::Result<mongodb::Collection<bson::Document>> {
        Ok(self.mongo.client().await?.database(DB).collection(COLL))
    }

    pub async fn nats_client(&self) -> anyhow::Result<async_nats::Client> {
        self.nats.client().await
    }

    /// Creates the pipeline's stream beforehand, as an operator might have.
    pub async fn create_stream(
        &self,
        subjects: &[&str],
        duplicate_window: Duration,
    ) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(self.nats_client().await?);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: STREAM.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            duplicate_window,
            ..Default::default()
        })
        .await?;
        Ok(())
    }

    /// Waits until the pipeline has saved a checkpoint in NATS KV: proof that its change
    /// stream is open (the first empty batch's token is checkpointed as a heartbeat).
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = self.nats_client().await?;
        let js = async_nats::jetstream::new(client);
        // Generous: the first start of a 12–18 MB guest (JavaScript, Python) compiles it with
        // cranelift, which on a loaded 2-core machine beside other tests takes minutes.
        wait_until(
            "pipeline checkpoint in KV",
            Duration::from_secs(300),
            || {
                let js = js.clone();
                async move {
                    match js.get_key_value("tidegate-checkpoints").await {
                        Ok(kv) => matches!(kv.get(PIPELINE).await, Ok(Some(_))),
                        Err(_) => false,
                    }
                }
            },
        )
        .await
    }

    /// The common shape of a pipeline test: runs tidegate in-process on the standard pipeline
    /// with `plugins` and `extra_sink` (see [`Harness::config`]), waits until its change
    /// stream is open, lets `write` change the watched collection, and returns the stream
    /// once it holds `expected` messages (and has settled), after stopping tidegate cleanly.
    pub async fn relay<F, Fut>(
        &self,
        plugins: &str,
        extra_sink: &str,
        expected: u64,
        write: F,
    ) -> anyhow::Result<Vec<StreamMessage>>
    where
        F: FnOnce(mongodb::Collection<bson::Document>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let path = self.write_config("tidegate.toml", &self.config(plugins, extra_sink))?;
        let running = InProcess::start(&path)?;
        self.wait_ready().await?;
        write(self.collection().await?).await?;
        let messages = self
            .wait_settled(STREAM, expected, Duration::from_secs(120))
            .await?;
        running.stop().await?;
        Ok(messages)
    }

    /// Waits until `stream` holds at least `count` messages, then returns them all.
    pub async fn wait_for_messages(
        &self,
        stream: &str,
        count: u64,
        timeout: Duration,
    ) -> anyhow::Result<Vec<StreamMessage>> {
        let client = self.nats_client().await?;
        wait_until(&format!("{count} messages in {stream}"), timeout, || {
            let client = client.clone();
            async move { stream_len(&client, stream).await >= count }
        })
        .await?;
        stream_messages(&client, stream).await
    }

    /// Waits for `count` messages, then a little longer so that a late extra message (a
    /// duplicate, say) would show, and returns everything in the stream.
    pub async fn wait_settled(
        &self,
        stream: &str,
        count: u64,
        timeout: Duration,
    ) -> anyhow::Result<Vec<StreamMessage>> {
        self.wait_for_messages(stream, count, timeout).await?;
        tokio::time::sleep(Duration::from_millis(750)).await;
        self.messages(stream).await
    }

    /// Every message in `stream` now.
    pub async fn messages(&self, stream: &str) -> anyhow::Result<Vec<StreamMessage>> {
        stream_messages(&self.nats_client().await?, stream).await
    }

    /// Starts the real `tidegate run` binary on a config file.
    pub fn spawn_binary(&self, config: &std::path::Path) -> anyhow::Result<ChildProcess> {
        self.spawn_binary_with_env(config, &[])
    }

    /// Starts the real `tidegate run` binary with extra environment variables.
    pub fn spawn_binary_with_env(
        &self,
        config: &std::path::Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<ChildProcess> {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"));
        cmd.arg("run").arg("--config").arg(config);
        cmd.envs(env.iter().copied());
        ChildProcess::spawn(cmd)
    }
}

/// tidegate running inside the test process.
pub struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tidegate::Error>>,
}

impl InProcess {
    pub fn start(config_path: &std::path::Path) -> anyhow::Result<InProcess> {
        let config = tidegate::Config::load(config_path)?;
        // Captured per test by the test harness: shown only when a test fails.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,async_nats=warn"))
            .with_test_writer()
            .try_init();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(tidegate::run(config, async move {
            let _ = stopped.await;
        }));
        Ok(InProcess {
            stop: Some(stop),
            task,
        })
    }

    /// Asks it to drain and stop, and returns its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(120), &mut self.task)
            .await
            .context("tidegate did not stop within 120 s")??
            .context("tidegate returned an error")
    }
}

/// Builds a component from an inline WIT world and a WAT core module with `wasm-tools`.
pub fn component(
    dir: &std::path::Path,
    name: &str,
    wit: &str,
    world: &str,
    wat: &str,
) -> std::path::PathBuf {
    let tools = tidegate_testkit::wasm_tools_path().expect("wasm-tools installed");
    std::fs::write(dir.join(format!("{name}.wit")), wit).expect("write wit");
    std::fs::write(dir.join(format!("{name}.wat")), wat).expect("write wat");
    let core = dir.join(format!("{name}.core.wasm"));
    let out = dir.join(format!("{name}.wasm"));
    let run = |args: &[&std::ffi::OsStr]| {
        let status = std::process::Command::new(&tools)
            .args(args)
            .status()
            .expect("run wasm-tools");
        assert!(status.success(), "wasm-tools {args:?}");
    };
    run(&[
        "component".as_ref(),
        "embed".as_ref(),
        "--world".as_ref(),
        world.as_ref(),
        dir.join(format!("{name}.wit")).as_os_str(),
        dir.join(format!("{name}.wat")).as_os_str(),
        "-o".as_ref(),
        core.as_os_str(),
    ]);
    run(&[
        "component".as_ref(),
        "new".as_ref(),
        core.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    out
}

/// A resume token numbered `n` (`_data` = `n` in four digits), for publisher-level tests.
pub fn numbered_token(n: u32) -> anyhow::Result<mongodb::change_stream::event::ResumeToken> {
    Ok(bson::deserialize_from_bson(bson::Bson::Document(
        bson::doc! { "_data": format!("{n:04}") },
    ))?)
}

/// The message a pipeline `p` would publish for event `n`.
pub fn numbered_message(n: u32) -> tidegate::sink::Message {
    tidegate::sink::Message {
        subject: format!("cdc.test.{n}"),
        msg_id: format!("p:{n:04}:0"),
        headers: tidegate::sink::Headers::default(),
        payload: format!("event {n}").into(),
    }
}

/// Stores `numbered_message(n)` for every `n` in `range` directly (as an earlier writer
/// would have), each acknowledged before the next.
pub async fn store_numbered(
    js: &async_nats::jetstream::Context,
    range: std::ops::Range<u32>,
) -> anyhow::Result<()> {
    for n in range {
        let m = numbered_message(n);
        js.send_publish(
            m.subject.clone(),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(m.payload.clone())
                .message_id(&m.msg_id),
        )
        .await?
        .await?;
    }
    Ok(())
}

/// A header's value, if present.
/// (Names are compared as text: async-nats keys well-known names such as `Nats-Msg-Id`
/// differently from custom ones.)
pub fn header(message: &StreamMessage, name: &str) -> Option<String> {
    message
        .headers
        .iter()
        .find(|(key, _)| key.to_string().eq_ignore_ascii_case(name))
        .and_then(|(_, values)| values.first())
        .map(|v| v.as_str().to_string())
}

/// Asserts that `message` is a dead letter of kind `kind`.
pub fn assert_dead_letter(message: &StreamMessage, kind: &str) {
    assert_eq!(message.subject.as_str(), "cdc.dead-letter");
    assert_eq!(
        header(message, "Tidegate-Error-Kind").as_deref(),
        Some(kind)
    );
    assert!(
        header(message, "Nats-Msg-Id")
            .unwrap_or_default()
            .ends_with(":dead-letter"),
        "dead letters have their own message id"
    );
}

/// The payload as JSON.
pub fn json(message: &StreamMessage) -> serde_json::Value {
    serde_json::from_slice(&message.payload).unwrap_or(serde_json::Value::Null)
}

/// The `seq` field of each message's document, in stream order.
pub fn seqs(messages: &[StreamMessage]) -> Vec<i64> {
    messages
        .iter()
        .map(|m| json(m)["fullDocument"]["seq"].as_i64().unwrap_or(-1))
        .collect()
}

/// Asserts the stream holds exactly the events 0..n, once each, in order, with unique ids.
pub fn assert_exactly_once_in_order(messages: &[StreamMessage], n: i64) {
    let seqs = seqs(messages);
    let expected: Vec<i64> = (0..n).collect();
    if seqs != expected {
        let dupes = seqs.len() - seqs.iter().collect::<HashSet<_>>().len();
        let first_bad = seqs.iter().zip(&expected).position(|(a, b)| a != b);
        panic!(
            "stream holds {} messages ({} duplicates), expected {}; first mismatch at index {:?}",
            seqs.len(),
            dupes,
            n,
            first_bad
        );
    }
    let ids: HashSet<String> = messages
        .iter()
        .filter_map(|m| header(m, "Nats-Msg-Id"))
        .collect();
    assert_eq!(ids.len(), messages.len(), "message ids are unique");
}

/// Inserts documents `{seq: from..to}` in ordered batches, pausing between batches so that
/// faults land mid-stream.
pub async fn write_range(
    coll: mongodb::Collection<bson::Document>,
    from: i64,
    to: i64,
    batch: i64,
    pause: Duration,
) -> anyhow::Result<()> {
    let mut next = from;
    while next < to {
        let end = (next + batch).min(to);
        let docs: Vec<bson::Document> = (next..end)
            .map(|seq| doc! { "seq": seq, "email": format!("user{seq}@example.com"), "pad": "x".repeat(200) })
            .collect();
        coll.insert_many(docs).await?;
        next = end;
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

/// `GET path` from an HTTP server at `address` (one request, `Connection: close`): the status
/// code and the body.
pub async fn http_get(address: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8(response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("HTTP response without a blank line")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("HTTP status line")?;
    Ok((status, body.to_string()))
}

/// A `filter` plugin for the real contract (`wit/plugin-0.1`), written in WAT: the hostile
/// fixtures of the sandbox tests. Its core module has memory 0 of `pages` pages (exported),
/// `extra` module fields (more memories, tables, data at addresses 64..4096, globals), the
/// log import as `$log` (level, address, length), a bump `cabi_realloc` from 4096 on, an
/// `init` that runs `init_body` and succeeds, and a `filter` that runs `filter_body` and
/// keeps the event (`filter_body` may `return` a result address of its own instead; 16 is
/// the result area: a byte 0/1 for ok/err at 16, the payload from 20).
pub fn wat_filter(
    dir: &std::path::Path,
    name: &str,
    pages: u32,
    extra: &str,
    init_body: &str,
    filter_body: &str,
) -> std::path::PathBuf {
    let wit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../wit/plugin-0.1/types.wit"
    ))
    .expect("read the contract's WIT");
    let wat = format!(
        r#"(module
  (import "tidegate:plugin/log@0.1.0" "write" (func $log (param i32 i32 i32)))
  (memory (export "memory") {pages})
  {extra}
  (global $heap (mut i32) (i32.const 4096))
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $p i32)
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.const 7)) (i32.const -8)))
    (global.set $heap (i32.add (local.get $p) (local.get 3)))
    (block $done
      (loop $more
        (br_if $done (i32.le_u (global.get $heap) (i32.shl (memory.size) (i32.const 16))))
        (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
        (br $more)))
    (local.get $p))
  (func (export "init") (result i32)
    {init_body}
    (i32.const 0))
  (func (export "filter") (param i32) (result i32)
    {filter_body}
    (i32.store8 (i32.const 16) (i32.const 0))
    (i32.store8 (i32.const 20) (i32.const 1))
    (i32.const 16))
)"#
    );
    component(dir, name, &wit, "filter", &wat)
}

/// prometheus_parse::Scrapes `/metrics` at `address` with a Prometheus text parser.
pub async fn scrape(address: &str) -> anyhow::Result<prometheus_parse::Scrape> {
    let (status, text) = http_get(address, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(prometheus_parse::Scrape::parse(
        text.lines().map(|l| Ok(l.to_string())),
    )?)
}

/// The value of metric `name` for tenant `tenant` whose other labels include `labels` (0 when
/// absent).
pub fn metric(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    tenant: &str,
    labels: &[(&str, &str)],
) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.get("tenant") == Some(tenant)
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or(0.0)
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files
/// in `dir`.
pub fn make_certificates(dir: &std::path::Path) -> anyhow::Result<()> {
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
