//! Parsing and validation of whole config files.

use std::path::Path;

use super::*;
use crate::model::subject::{is_under_prefix, is_valid_subject};

const MINIMAL: &str = r#"
    [nats]
    url = "nats://127.0.0.1:4222"
    [[pipeline]]
    id = "orders"
    mongodb_uri = "mongodb://127.0.0.1:27017/?replicaSet=rs0"
    database = "shop"
    collections = ["orders"]
    [pipeline.sink]
    stream = "ORDERS"
    subject_prefix = "cdc"
"#;

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("/etc/tidegate"), |_| None)
}

/// Each case edits `base` (its first `from` becomes `to`, which must change it) into a
/// config that is refused with an error containing `expected`.
pub(super) fn assert_refused(base: &str, cases: &[(&str, &str, &str)]) {
    for &(from, to, expected) in cases {
        let text = base.replacen(from, to, 1);
        assert_ne!(text, base, "{from}");
        let err = parse(&text).expect_err(expected);
        assert!(err.contains(expected), "{expected}: {err}");
    }
}

/// Defaults are applied and relative paths resolved against the file's folder.
#[test]
fn minimal_config_gets_documented_defaults() {
    let config = parse(MINIMAL).expect("valid");
    let p = &config.pipelines[0];
    assert_eq!(config.plugin_dir, Path::new("/etc/tidegate/plugins"));
    assert_eq!(p.sink.subject_template, "{prefix}.{db}.{coll}.{operation}");
    assert_eq!(p.sink.encoding, Encoding::RelaxedJson);
    assert_eq!(p.sink.max_in_flight, 256);
    assert_eq!(p.dead_letter_subject(), "cdc.dead-letter");
    assert_eq!(p.checkpoint.store, CheckpointStoreKind::NatsKv);
}

/// MongoDB's own camelCase spellings of the document-image options are aliases.
#[test]
fn mongodb_spellings_of_image_options_are_accepted() {
    let with = |full: &str, before: &str| {
        let text = MINIMAL.replace(
            "collections = [\"orders\"]",
            &format!(
                "collections = [\"orders\"]\nfull_document = \"{full}\"\n\
                 full_document_before_change = \"{before}\""
            ),
        );
        let config = parse(&text).expect("valid");
        let p = &config.pipelines[0];
        (p.full_document, p.full_document_before_change)
    };
    use FullDocument as F;
    use FullDocumentBeforeChange as B;
    assert_eq!(
        with("updateLookup", "whenAvailable"),
        (F::UpdateLookup, B::WhenAvailable)
    );
    assert_eq!(
        with("whenAvailable", "required"),
        (F::WhenAvailable, B::Required)
    );
    assert_eq!(with("required", "off"), (F::Required, B::Off));
    assert_eq!(with("default", "off"), (F::Off, B::Off));
    assert_eq!(
        with("update-lookup", "when-available"),
        (F::UpdateLookup, B::WhenAvailable)
    );
}

/// A signal collection in another database than a collection-scoped pipeline's (the
/// stream is widened to see it).
#[test]
fn signal_collection_may_be_outside_the_scope() {
    let text = MINIMAL.replace(
        "collections = [\"orders\"]",
        "collections = [\"orders\"]\nsignal_collection = \"streamkap.streamkap_signal\"",
    );
    let config = parse(&text).expect("valid");
    assert_eq!(
        config.pipelines[0].signal_collection.as_deref(),
        Some("streamkap.streamkap_signal")
    );
}

/// A misspelt key is an error that names it, not a silent default.
#[test]
fn unknown_keys_are_rejected_by_name() {
    let text = MINIMAL.replace("subject_prefix", "subject_prefx");
    let err = parse(&text).expect_err("typo must fail");
    assert!(err.contains("subject_prefx"), "{err}");
}

/// A mistake on a line that holds a secret is reported by line, column and key, never
/// by showing the line (or the value, when a message quotes it).
#[test]
fn config_errors_never_show_a_secret() {
    const SECRET: &str = "Typo-Secret-9";
    let with = |extra: &str| format!("{MINIMAL}\n{extra}\n");
    let auth = |line: &str| with(&format!("[nats.auth]\nuser = \"u\"\n{line}"));
    let uri = format!("mongodb://u:{SECRET}@h/?replicaSet=rs0");
    let cases = [
        (
            auth(&format!("pasword = \"{SECRET}\"")),
            "key `pasword` in [nats.auth]",
        ),
        (
            auth(&format!("password = \"{SECRET}\" x")),
            "key `password`",
        ),
        (auth(&format!("password = \"{SECRET}")), "line 15"),
        (auth(&format!("password = '{SECRET}")), "line 15"),
        // Reported where the file ends, still naming the table.
        (
            auth(&format!("password = \"\"\"{SECRET}")),
            "in [nats.auth]",
        ),
        (auth(&format!("password = {SECRET}")), "key `password`"),
        (
            auth(&format!("password = \"{SECRET}\"\npassword = \"{SECRET}\"")),
            "line 16",
        ),
        (
            auth(&format!("token = {{ value = \"{SECRET}\" }}")),
            "key `token`",
        ),
        (
            MINIMAL.replace(
                "url = \"nats://127.0.0.1:4222\"",
                &format!("url = \"nats://127.0.0.1:4222\"\nack_timeout_ms = \"{SECRET}\""),
            ),
            "key `ack_timeout_ms` in [nats]",
        ),
        (
            MINIMAL.replace(
                "mongodb_uri = \"mongodb://127.0.0.1:27017/?replicaSet=rs0\"",
                &format!("mongodb_uri = \"{uri}\" trailing"),
            ),
            "key `mongodb_uri` in [[pipeline]]",
        ),
        (
            MINIMAL.replace(
                "mongodb_uri = \"mongodb://127.0.0.1:27017/?replicaSet=rs0\"",
                &format!("mongodb_uri \"{uri}\""),
            ),
            "line 6",
        ),
        (
            with(&format!(
                "[[pipeline.plugins]]\nname = \"x\"\nconfig = {{ key = \"{SECRET}\" x }}"
            )),
            "key `config` in [[pipeline.plugins]]",
        ),
    ];
    for (text, expected) in cases {
        let err = parse(&text).expect_err(&text);
        assert!(!err.contains(SECRET), "{err}");
        assert!(err.contains(expected), "{expected}: {err}");
        assert!(err.contains("line "), "{err}");
    }
}

/// Credentials in `nats.url` and `[nats.auth]` at once are refused, without echoing them.
#[test]
fn url_credentials_conflict_with_nats_auth() {
    let text = MINIMAL.replace("nats://127.0.0.1", "nats://u:Url-Secret-8@127.0.0.1")
        + "\n[nats.auth]\ntoken = \"t\"\n";
    let err = parse(&text).expect_err("conflict");
    assert!(err.contains("give them in one place only"), "{err}");
    assert!(!err.contains("Url-Secret-8"), "{err}");
    let text = MINIMAL.replace("nats://127.0.0.1", "nats://u:Url-Secret-8@127.0.0.1");
    assert!(parse(&text).is_ok());
}

/// Secrets such as URIs can come from the environment instead of the file.
#[test]
fn environment_overrides_uris() {
    let config = Config::parse(MINIMAL, Path::new("."), |name| match name {
        "TIDEGATE_NATS_URL" => Some("nats://secret@n:4222".into()),
        "TIDEGATE_PIPELINE_ORDERS_MONGODB_URI" => Some("mongodb://user:pw@m/".into()),
        _ => None,
    })
    .expect("valid");
    assert_eq!(config.nats.url, "nats://secret@n:4222");
    assert_eq!(config.pipelines[0].mongodb_uri, "mongodb://user:pw@m/");
}

/// Two pipelines writing one stream would break the ordering chain: refused.
#[test]
fn shared_stream_is_refused() {
    let second = MINIMAL
        .split("[[pipeline]]")
        .nth(1)
        .expect("has pipeline")
        .replace("\"orders\"\n", "\"orders2\"\n");
    let text = format!("{MINIMAL}\n[[pipeline]]{second}");
    let err = parse(&text).expect_err("shared stream");
    assert!(err.contains("already used by another pipeline"), "{err}");
}

/// Templates that would publish outside the stream's subjects are refused.
#[test]
fn subject_template_must_stay_under_prefix() {
    let text = MINIMAL.replace(
        "subject_prefix = \"cdc\"",
        "subject_prefix = \"cdc\"\nsubject_template = \"other.{db}\"",
    );
    assert!(parse(&text)
        .expect_err("bad template")
        .contains("{prefix}."));
    let text = MINIMAL.replace(
        "subject_prefix = \"cdc\"",
        "subject_prefix = \"cdc\"\nsubject_template = \"{prefix}.{nope}\"",
    );
    assert!(parse(&text)
        .expect_err("bad placeholder")
        .contains("placeholders"));
}

const TENANTS: &str = r#"
    [nats]
    url = "nats://127.0.0.1:4222"
    [[pipeline]]
    id = "shop"
    mongodb_uri = "mongodb://127.0.0.1:27017/?replicaSet=rs0"
    database = "shop"
    [[pipeline.tenant]]
    id = "acme"
    namespaces = ["shop.orders", "shop.returns"]
    limits = { memory_mib = 16, timeout_ms = 200 }
    capabilities = { clock = true }
    [pipeline.tenant.sink]
    stream = "ACME"
    subject_prefix = "tenants.acme"
    [[pipeline.tenant.plugins]]
    name = "redact"
    limits = { timeout_ms = 50 }
    [[pipeline.tenant]]
    id = "globex"
    namespaces = ["shop.*"]
    [pipeline.tenant.sink]
    stream = "GLOBEX"
    subject_prefix = "tenants.globex"
"#;

/// Each tenant becomes a unit of its own, inheriting the source and keeping its own
/// sink, plugins, limits (merged key by key) and capabilities.
#[test]
fn tenants_become_units() {
    let config = parse(TENANTS).expect("valid");
    let ids: Vec<&str> = config.pipelines.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["shop.acme", "shop.globex"]);
    let acme = &config.pipelines[0];
    assert_eq!(acme.database.as_deref(), Some("shop"));
    assert_eq!(acme.sink.stream, "ACME");
    assert_eq!(acme.dead_letter_subject(), "tenants.acme.dead-letter");
    assert!(acme.capabilities.clock && !acme.capabilities.random);
    let limits = acme.plugin_limits(&acme.plugins[0]);
    assert_eq!((limits.memory_mib, limits.timeout_ms), (16, 50));
    assert_eq!(
        limits.fuel_per_call, 100_000_000,
        "unset keys keep the default"
    );
    let scope = acme.tenant.as_ref().expect("tenant scope");
    assert_eq!(scope.id, "acme");
    let ns = |db: &str, coll: Option<&str>| crate::model::Namespace {
        db: db.into(),
        coll: coll.map(Into::into),
    };
    assert!(acme.may_see(&ns("shop", Some("orders"))));
    assert!(!acme.may_see(&ns("shop", Some("secrets"))));
    assert!(!acme.may_see(&ns("other", Some("orders"))));
    assert!(
        acme.may_see(&ns("shop", None)),
        "dropDatabase of its database"
    );
    assert!(acme.may_see(&ns("", None)), "invalidate");
    assert!(config.pipelines[1].may_see(&ns("shop", Some("anything"))));
}

/// Tenant mistakes are named precisely.
#[test]
fn tenant_mistakes_are_refused() {
    let cases = [
        (
            "\"shop.*\"]",
            "\"other.*\"]",
            "outside what the pipeline watches",
        ),
        ("\"shop.*\"]", "\"shop.ord*\"]", "only a whole database"),
        (
            "namespaces = [\"shop.*\"]",
            "namespaces = []",
            "list what the tenant may see",
        ),
        ("id = \"globex\"", "id = \"acme\"", "used twice"),
        (
            "stream = \"GLOBEX\"",
            "stream = \"ACME\"",
            "already used by another pipeline",
        ),
        (
            "database = \"shop\"",
            "database = \"shop\"\nplugins = [{ name = \"x\" }]",
            "belong in each",
        ),
    ];
    assert_refused(TENANTS, &cases);
    let no_sink = MINIMAL
        .replace("[pipeline.sink]", "[pipeline.checkpoint]")
        .replace("stream = \"ORDERS\"\n", "")
        .replace("subject_prefix = \"cdc\"\n", "");
    assert!(parse(&no_sink)
        .expect_err("no sink")
        .contains("[pipeline.sink]"));
}

/// Tenants without a sink of their own share the pipeline's stream, each under
/// `<prefix>.<tenant id>`; a tenant with its own keeps it. The shared stream is still the
/// pipeline's alone, and its tenants' dead letters stay in their own subject spaces.
#[test]
fn tenants_may_share_the_pipelines_stream() {
    let shared = TENANTS
        .replacen(
            "database = \"shop\"",
            "database = \"shop\"\n[pipeline.sink]\nstream = \"ALL\"\nsubject_prefix = \"t\"",
            1,
        )
        .replacen(
            "[pipeline.tenant.sink]\n    stream = \"ACME\"\n    subject_prefix = \"tenants.acme\"\n",
            "",
            1,
        );
    assert_ne!(shared, TENANTS);
    let config = parse(&shared).expect("valid");
    let (acme, globex) = (&config.pipelines[0], &config.pipelines[1]);
    assert_eq!(acme.sink.stream, "ALL");
    assert_eq!(acme.sink.subject_prefix, "t.acme");
    assert_eq!(acme.sink.shared_prefix.as_deref(), Some("t"));
    assert_eq!(acme.dead_letter_subject(), "t.acme.dead-letter");
    assert_eq!(globex.sink.stream, "GLOBEX");
    assert_eq!(globex.sink.shared_prefix, None);

    let cases = [
        (
            "stream = \"GLOBEX\"",
            "stream = \"ALL\"",
            "already used by another pipeline",
        ),
        (
            "subject_prefix = \"t\"",
            "subject_prefix = \"t\"\ndead_letter_subject = \"dl\"",
            "dead_letter_subject cannot be set on a stream the tenants share",
        ),
        (
            "stream = \"ALL\"\n",
            "stream = \"\"\n",
            "needs both `stream` and `subject_prefix`",
        ),
        (
            "database = \"shop\"",
            "database = \"shop\"\ntenant_reader = \"own\"",
            "needs tenant_reader = \"shared\"",
        ),
    ];
    assert_refused(&shared, &cases);
    let second = format!(
        "{shared}\n[[pipeline]]\nid = \"other\"\nmongodb_uri = \"mongodb://h/?replicaSet=rs0\"\n\
         [pipeline.sink]\nstream = \"ALL\"\nsubject_prefix = \"o\"\n"
    );
    assert!(parse(&second)
        .expect_err("a second pipeline on the shared stream")
        .contains("already used by another pipeline"));
    let no_sink = TENANTS.replacen(
        "[pipeline.tenant.sink]\n    stream = \"ACME\"\n    subject_prefix = \"tenants.acme\"\n",
        "",
        1,
    );
    assert!(parse(&no_sink)
        .expect_err("a tenant without a sink")
        .contains("a tenant needs a [pipeline.tenant.sink] of its own"));
}

/// User stages may filter and add fields but never touch the resume token or what
/// tidegate reads.
#[test]
fn user_stages_are_checked() {
    let stage = |text: &str| -> Result<bson::Document, String> {
        let table: toml::Table =
            toml::from_str(&format!("s = {text}")).map_err(|e| e.to_string())?;
        match table.get("s") {
            Some(toml::Value::Table(t)) => check_stage(t),
            _ => Err("not a table".into()),
        }
    };
    assert!(stage(r#"{ "$match" = { "fullDocument.paid" = true } }"#).is_ok());
    assert!(stage(r#"{ "$project" = { "fullDocument.secret" = 0 } }"#).is_ok());
    assert!(stage(r#"{ "$set" = { "fullDocument.x" = 1 } }"#).is_ok());
    for (text, expected) in [
        (r#"{ "$project" = { "_id" = 0 } }"#, "may not remove `_id`"),
        (
            r#"{ "$project" = { "fullDocument" = 1 } }"#,
            "may only exclude",
        ),
        (r#"{ "$set" = { "_id" = "x" } }"#, "may not change `_id`"),
        (r#"{ "$unset" = ["ns.coll"] }"#, "may not remove `ns.coll`"),
        (
            r#"{ "$replaceRoot" = { "newRoot" = "$fullDocument" } }"#,
            "not allowed",
        ),
        (
            r#"{ "$match" = { "a" = 1 }, "$set" = { "b" = 1 } }"#,
            "exactly one operator",
        ),
    ] {
        let err = stage(text).expect_err(text);
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
fn start_positions_parse() {
    assert_eq!(parse_start_at("now"), Ok(StartAt::Now));
    assert_eq!(
        parse_start_at("1732270000.3"),
        Ok(StartAt::ClusterTime(bson::Timestamp {
            time: 1_732_270_000,
            increment: 3
        }))
    );
    assert_eq!(
        parse_start_at("2026-11-22T10:00:00Z"),
        Ok(StartAt::ClusterTime(bson::Timestamp {
            time: 1_795_341_600,
            increment: 0
        }))
    );
    assert!(parse_start_at("yesterday").is_err());
    assert!(parse_token(r#"{"_data": "8263"}"#).is_ok());
    assert!(parse_token(r#"{"data": 1}"#).unwrap_err().contains("_data"));
    assert!(parse_token("not json").is_err());
    let text = MINIMAL.replace(
        "database = \"shop\"",
        "database = \"shop\"\nskip_operations = [\"invalidate\"]",
    );
    assert!(parse(&text).unwrap_err().contains("cannot be skipped"));
    let text = MINIMAL.replace(
        "database = \"shop\"",
        "database = \"shop\"\ninclude = [\"//\"]",
    );
    assert!(parse(&text).unwrap_err().contains("empty regex"));
}

#[test]
fn subject_helpers() {
    assert!(is_valid_subject("a.b.c", false));
    assert!(!is_valid_subject("a..b", false));
    assert!(!is_valid_subject("a.*", false));
    assert!(is_valid_subject("a.>", true));
    assert!(!is_valid_subject("a b", false));
    assert!(is_under_prefix("cdc.x", "cdc"));
    assert!(!is_under_prefix("cdcx.y", "cdc"));
    assert!(!is_under_prefix("cdc", "cdc"));
}

/// Every mistake of a file is reported in one run: one per line, each naming its key, in
/// the order of the file.
#[test]
fn several_problems_are_reported_together() {
    let text = MINIMAL
        .replace(
            "url = \"nats://127.0.0.1:4222\"",
            "url = \"nats://127.0.0.1:4222\"\n[sandbox]\nmax_instances = 0\ncache_max_mib = 0",
        )
        .replace(
            "database = \"shop\"",
            "database = \"shop\"\nskip_operations = [\"invalidate\"]\nstart_at = \"yesterday\"",
        )
        .replace(
            "subject_prefix = \"cdc\"",
            "subject_prefix = \"cdc\"\nmax_in_flight = 0",
        )
        + r#"
        [[pipeline]]
        id = "shop"
        mongodb_uri = "mongodb://127.0.0.1:27017/?replicaSet=rs0"
        database = "shop"
        [[pipeline.tenant]]
        id = "acme"
        namespaces = ["other.orders"]
        [pipeline.tenant.sink]
        stream = "ACME"
        subject_prefix = "tenants.acme"
    "#;
    let err = parse(&text).expect_err("several problems");
    let lines: Vec<&str> = err.lines().collect();
    let expected = [
        "6 problems:",
        "sandbox.cache_max_mib: must be at least 1",
        "sandbox.max_instances: must be at least 1",
        "pipeline 'orders': skip_operations: invalidate cannot be skipped",
        "pipeline 'orders': start_at: 'yesterday' is not `now`",
        "pipeline 'orders': sink.max_in_flight: must be at least 1",
        "pipeline 'shop', tenant 'acme': namespaces: 'other.orders' lies outside",
    ];
    assert_eq!(lines.len(), expected.len(), "{err}");
    for (line, expected) in lines.iter().zip(expected) {
        assert!(line.contains(expected), "{expected}: {err}");
    }
}

/// A problem that makes later checks meaningless stops them: an invalid subject prefix is
/// reported alone, not with every subject built on it.
#[test]
fn problems_do_not_cascade() {
    let text = MINIMAL.replace("subject_prefix = \"cdc\"", "subject_prefix = \"c d\"");
    let err = parse(&text).expect_err("bad prefix");
    assert!(err.contains("sink.subject_prefix"), "{err}");
    assert!(!err.contains("dead_letter_subject"), "{err}");
    assert!(!err.contains("problems:"), "{err}");
}

/// Payload formats with the encodings and change stream options they need, and stream
/// settings within JetStream's bounds: each mistake named by its key, all at once.
#[test]
fn formats_and_stream_settings_are_checked() {
    let with_sink = |sink: &str, pipeline: &str| {
        let text = MINIMAL
            .replace(
                "subject_prefix = \"cdc\"",
                &format!("subject_prefix = \"cdc\"\n{sink}"),
            )
            .replace(
                "collections = [\"orders\"]",
                &format!("collections = [\"orders\"]\n{pipeline}"),
            );
        parse(&text)
    };
    let good = with_sink(
        "format = \"debezium\"\nsubject_template = \"{prefix}.{coll}.{key}\"\nreplicas = 3\n\
         storage = \"memory\"\nmax_age_secs = 86400\nmax_bytes = 1000000\nmax_msgs_per_subject = 1",
        "",
    )
    .expect("valid");
    let sink = &good.pipelines[0].sink;
    assert_eq!(sink.format, Format::Debezium);
    assert_eq!(sink.storage, Storage::Memory);
    assert_eq!((sink.replicas, sink.max_msgs_per_subject), (3, Some(1)));
    assert_eq!(
        parse(MINIMAL).expect("valid").pipelines[0].sink.format,
        Format::ChangeEvent
    );
    with_sink(
        "format = \"full-document\"",
        "full_document = \"update-lookup\"",
    )
    .expect("valid");

    let err = with_sink("format = \"debezium\"\nencoding = \"bson\"", "").unwrap_err();
    assert!(
        err.contains("sink.format") && err.contains("cannot be encoded as bson"),
        "{err}"
    );
    let err = with_sink("format = \"full-document\"", "").unwrap_err();
    assert!(
        err.contains("sink.format") && err.contains("full_document = \"off\""),
        "{err}"
    );
    let err = with_sink("format = \"envelope\"", "").unwrap_err();
    assert!(err.contains("envelope"), "{err}");

    let err = with_sink(
        "replicas = 7\nmax_bytes = 0\nmax_age_secs = 60\nstorage = \"tape\"",
        "",
    )
    .unwrap_err();
    assert!(err.contains("tape"), "{err}");
    let err = with_sink("replicas = 7\nmax_bytes = 0\nmax_age_secs = 60", "").unwrap_err();
    assert!(err.contains("3 problems"), "{err}");
    assert!(
        err.contains("sink.replicas: 7 is not a replica count"),
        "{err}"
    );
    assert!(err.contains("sink.max_bytes: must be at least 1"), "{err}");
    assert!(
        err.contains("sink.max_age_secs: 60 s is shorter than sink.duplicate_window_secs"),
        "{err}"
    );
    let err = with_sink("subject_template = \"{prefix}.{keys}\"", "").unwrap_err();
    assert!(err.contains("{key}"), "{err}");
}

/// A config in a temporary folder (so that the files it names can be written beside it),
/// `MINIMAL` with `from` replaced by `to`.
fn parse_in(dir: &tempfile::TempDir, from: &str, to: &str) -> Result<Config, String> {
    let text = MINIMAL.replacen(from, to, 1);
    assert_ne!(text, MINIMAL, "{from}");
    Config::parse(&text, dir.path(), |_| None)
}

const SCOPE: &str = "database = \"shop\"\n    collections = [\"orders\"]";

/// `collections_file` is read relative to the config file's folder, and its rows are the
/// pipeline's scope, across databases.
#[test]
fn collections_file_sets_the_capture_list() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("lists")).expect("mkdir");
    std::fs::write(
        dir.path().join("lists/capture.csv"),
        "shop,orders\r\ncrm,users\r\n",
    )
    .expect("write");
    let config = parse_in(&dir, SCOPE, "collections_file = \"lists/capture.csv\"").expect("valid");
    let p = &config.pipelines[0];
    assert_eq!(
        p.collections_file.as_deref(),
        Some(dir.path().join("lists/capture.csv").as_path())
    );
    assert!(p.collection_list.contains("shop", "orders"));
    assert!(p.collection_list.contains("crm", "users"));
    let ns = |db: &str, coll: Option<&str>| crate::model::Namespace {
        db: db.into(),
        coll: coll.map(Into::into),
    };
    assert!(p.may_see(&ns("crm", Some("users"))));
    assert!(
        !p.may_see(&ns("crm", Some("orders"))),
        "unlisted collection"
    );
    assert!(!p.may_see(&ns("crm", None)), "a database-level event");
    assert!(p.may_see(&ns("", None)), "invalidate");
}

/// The file replaces `collections`; with `database`, every row must be in it; its problems
/// name the pipeline, the key, the file and the line.
#[test]
fn collections_file_mistakes_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("capture.csv");
    std::fs::write(&file, "shop,orders\ncrm,users,x\n").expect("write");
    let err = parse_in(&dir, SCOPE, "collections_file = \"capture.csv\"").expect_err("3 fields");
    assert!(
        err.contains(&format!(
            "pipeline 'orders': collections_file: {}:2: 3 fields",
            file.display()
        )),
        "{err}"
    );
    std::fs::write(&file, "shop,orders\ncrm,users\n").expect("write");
    let err = parse_in(
        &dir,
        "collections = [\"orders\"]",
        "collections_file = \"capture.csv\"",
    )
    .expect_err("rows outside `database`");
    assert!(err.contains(":2: database \"crm\" is not"), "{err}");
    let err = parse_in(
        &dir,
        "collections = [\"orders\"]",
        "collections = [\"orders\"]\n collections_file = \"capture.csv\"",
    )
    .expect_err("two lists");
    assert!(err.contains("in one place"), "{err}");
    let err = parse_in(&dir, SCOPE, "collections_file = \"missing.csv\"").expect_err("missing");
    assert!(err.contains("missing.csv: cannot read it"), "{err}");
}

/// A tenant of a pipeline with a capture list may only see listed collections.
#[test]
fn tenants_stay_inside_the_collections_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("capture.csv"),
        "shop,orders\nshop,returns\n",
    )
    .expect("write");
    let with_file = TENANTS.replacen(
        "database = \"shop\"",
        "collections_file = \"capture.csv\"",
        1,
    );
    assert_ne!(with_file, TENANTS);
    let err = Config::parse(&with_file, dir.path(), |_| None).expect_err("shop.* is wider");
    assert!(
        err.contains("tenant 'globex': namespaces: 'shop.*' lies outside"),
        "{err}"
    );
    let narrowed = with_file.replace("[\"shop.*\"]", "[\"shop.orders\"]");
    let config = Config::parse(&narrowed, dir.path(), |_| None).expect("valid");
    assert!(config
        .pipelines
        .iter()
        .all(|unit| unit.collection_list.contains("shop", "orders")));
}

/// A plugin's `config_file` is read relative to the config file's folder and merged into
/// its `config`; a key in both places is refused without showing either value.
#[test]
fn plugin_config_file_merges_into_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("map.json"),
        r#"{"discriminator": "kind", "variants": {"*": {"fields": "_id"}}}"#,
    )
    .expect("write");
    let plugin = |config: &str| {
        format!(
            "collections = [\"orders\"]\n    [[pipeline.plugins]]\n    name = \"map\"\n    \
             config_file = \"map.json\"\n    config = {{ {config} }}"
        )
    };
    let config = parse_in(
        &dir,
        "collections = [\"orders\"]",
        &plugin("unmatched = \"drop\""),
    )
    .expect("valid");
    let map = &config.pipelines[0].plugins[0];
    assert_eq!(
        map.config_file.as_deref(),
        Some(dir.path().join("map.json").as_path())
    );
    assert_eq!(map.config["discriminator"], "kind");
    assert_eq!(map.config["variants"], r#"{"*":{"fields":"_id"}}"#);
    assert_eq!(map.config["unmatched"], "drop");
    let err = parse_in(
        &dir,
        "collections = [\"orders\"]",
        &plugin("discriminator = \"s3cret-kind\""),
    )
    .expect_err("a key in both");
    assert!(
        err.contains("plugin 'map': config_file: key `discriminator` is given both"),
        "{err}"
    );
    assert!(
        !err.contains("s3cret") && !err.contains("\"kind\""),
        "{err}"
    );
}

/// A pipeline's checkpoint writes are paced at 100 a second unless configured, and a pace of
/// zero is refused by name (it would stop every tenant's checkpoint).
#[test]
fn checkpoint_write_pace_defaults_and_is_checked() {
    let config = parse(MINIMAL).expect("minimal config");
    assert_eq!(config.pipelines[0].checkpoint.max_writes_per_sec, 100);
    let paced = format!("{MINIMAL}    [pipeline.checkpoint]\n    max_writes_per_sec = 20\n");
    let config = parse(&paced).expect("paced config");
    assert_eq!(config.pipelines[0].checkpoint.max_writes_per_sec, 20);
    let err = parse(&paced.replace("= 20", "= 0")).expect_err("zero pace");
    assert!(
        err.contains("pipeline 'orders': checkpoint.max_writes_per_sec: must be at least 1"),
        "{err}"
    );
}
