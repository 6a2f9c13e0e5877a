//! Exact encodings, end to end: documents whose fields look like Extended JSON type wrappers
//! (legal since MongoDB 5.0) flow through every encoding, with and without a transform
//! plugin, and are published with the values MongoDB stored; relaxed JSON follows the spec
//! for dates outside 1970..9999, and canonical JSON keeps field order.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bson::{doc, Document, RawDocument, RawDocumentBuf};
use support::{InProcess, DB};
use tidegate_testkit::{stream_messages, wait_until};

/// One pipeline of the shared config: its own collection, stream and subjects.
struct Lane {
    id: String,
    coll: String,
    stream: String,
    encoding: &'static str,
    redact: bool,
}

impl Lane {
    fn new(name: &str, encoding: &'static str, redact: bool) -> Lane {
        Lane {
            id: name.to_string(),
            coll: name.to_string(),
            stream: name.to_uppercase(),
            encoding,
            redact,
        }
    }

    fn toml(&self, mongo: &str) -> String {
        let plugin = match self.redact {
            true => "[[pipeline.plugins]]\nname = \"redact\"\nconfig = { fields = \"email\" }\n",
            false => "",
        };
        format!(
            r#"
[[pipeline]]
id = "{id}"
mongodb_uri = "{mongo}"
database = "{DB}"
collections = ["{coll}"]
full_document = "when-available"
full_document_before_change = "when-available"

[pipeline.sink]
stream = "{stream}"
subject_prefix = "{id}"
encoding = "{encoding}"

[pipeline.checkpoint]
interval_ms = 200

{plugin}
"#,
            id = self.id,
            coll = self.coll,
            stream = self.stream,
            encoding = self.encoding,
        )
    }
}

/// Starts tidegate in-process on `lanes` (collections created with pre- and post-images),
/// waits until every lane's stream is open, runs `write` on each lane's collection, and
/// returns each lane's messages once it holds `expected`.
async fn relay_lanes<F, Fut>(
    h: &support::Harness,
    lanes: &[Lane],
    expected: u64,
    write: F,
) -> anyhow::Result<Vec<Vec<async_nats::jetstream::message::StreamMessage>>>
where
    F: Fn(mongodb::Collection<Document>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let client = h.mongo.client().await?;
    let mut text = format!(
        "plugin_dir = \"{}\"\n\n[nats]\nurl = \"{}\"\nack_timeout_ms = 2000\n",
        h.plugins.display(),
        h.nats.url()
    );
    for lane in lanes {
        client
            .database(DB)
            .run_command(
                doc! { "create": &lane.coll, "changeStreamPreAndPostImages": { "enabled": true } },
            )
            .await?;
        text.push_str(&lane.toml(&h.mongo.uri()));
    }
    let running = InProcess::start(&h.write_config("encodings.toml", &text)?)?;
    let nats = h.nats_client().await?;
    let js = async_nats::jetstream::new(nats.clone());
    for lane in lanes {
        let js = js.clone();
        wait_until(
            &format!("checkpoint of {}", lane.id),
            Duration::from_secs(120),
            || {
                let js = js.clone();
                async move {
                    match js.get_key_value("tidegate-checkpoints").await {
                        Ok(kv) => matches!(kv.get(&lane.id).await, Ok(Some(_))),
                        Err(_) => false,
                    }
                }
            },
        )
        .await?;
    }
    for lane in lanes {
        write(client.database(DB).collection(&lane.coll)).await?;
    }
    let mut all = Vec::new();
    for lane in lanes {
        let messages = h
            .wait_settled(&lane.stream, expected, Duration::from_secs(120))
            .await?;
        all.push(messages);
    }
    running.stop().await?;
    for (lane, messages) in lanes.iter().zip(&all) {
        assert_eq!(
            messages.len() as u64,
            expected,
            "{}: {:?}",
            lane.id,
            stream_messages(&nats, &lane.stream).await?.len()
        );
    }
    Ok(all)
}

/// A document whose sub-documents look like Extended JSON type wrappers but are documents.
fn tricky() -> Document {
    doc! {
        "_id": 1,
        "email": "a@example.com",
        "oid": { "$oid": "not-an-oid" },
        "long": { "$numberLong": "5" },
        "date": { "$date": { "$numberLong": "1000" } },
        "bin": { "$binary": { "base64": "AQID", "subType": "00" } },
        "re": { "$regex": "a+", "$options": "i" },
        "nested": { "deep": { "$date": "not-a-date" }, "list": [{ "$oid": "zz" }, { "$numberDecimal": "x" }] },
        "i64": 7_i64,
    }
}

/// The stored document as the driver reads it back, raw (no serde).
async fn stored(coll: &mongodb::Collection<Document>) -> anyhow::Result<RawDocumentBuf> {
    coll.clone_with_type::<RawDocumentBuf>()
        .find_one(doc! { "_id": 1 })
        .await?
        .ok_or_else(|| anyhow::anyhow!("document 1 not found"))
}

/// `doc` with `email` (if any) replaced by what the redact plugin writes.
fn redacted(doc: &RawDocument) -> anyhow::Result<RawDocumentBuf> {
    let mut out = RawDocumentBuf::new();
    for element in doc.iter() {
        let (key, value) = element?;
        match key.as_str() {
            "email" => out.append(key, "[redacted]"),
            _ => out.append(key, value),
        }
    }
    Ok(out)
}

/// Insert, pipeline update, replace and delete of documents with `$`-prefixed keys that
/// look like Extended JSON, then a plain insert: in all three encodings, with and without a
/// transform (redact) in the chain, every event is published (the stream keeps moving) and
/// every value is exactly the stored one: BSON payloads are compared byte for byte with the
/// documents read back with the driver, JSON payloads with the text those documents are.
/// Before raw-BSON events the `{"$oid": "not-an-oid"}` document stalled the change stream
/// for good, and `{"$numberLong": "5"}` was published as an Int64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_prefixed_fields_are_published_exactly() -> anyhow::Result<()> {
    let h = support::Harness::start().await?;
    let mut lanes = Vec::new();
    for (encoding, short) in [
        ("bson", "b"),
        ("canonical-json", "c"),
        ("relaxed-json", "r"),
    ] {
        lanes.push(Lane::new(&format!("enc{short}"), encoding, false));
        lanes.push(Lane::new(&format!("enc{short}x"), encoding, true));
    }
    let states = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let recorded = states.clone();
    let messages = relay_lanes(&h, &lanes, 5, move |coll| {
        let recorded = recorded.clone();
        async move {
            let mut states = Vec::new();
            coll.insert_one(tricky()).await?;
            states.push(stored(&coll).await?);
            // A pipeline update, so that `$`-keyed documents land in updatedFields.
            coll.update_one(
                doc! { "_id": 1 },
                vec![doc! { "$set": {
                    "upd": { "$literal": { "$numberLong": "6" } },
                    "arr": { "$literal": [{ "$oid": "also-not" }, { "$date": 5 }] },
                } }],
            )
            .await?;
            states.push(stored(&coll).await?);
            coll.replace_one(
                doc! { "_id": 1 },
                doc! { "email": "b@example.com", "other": { "$numberLong": "9" }, "when": { "$binary": "x" } },
            )
            .await?;
            states.push(stored(&coll).await?);
            coll.delete_one(doc! { "_id": 1 }).await?;
            coll.insert_one(doc! { "_id": 2, "plain": true }).await?;
            recorded.lock().await.push(states);
            Ok(())
        }
    })
    .await?;
    let states = states.lock().await;
    // The documents are stored as documents (the test's own premise).
    assert!(states[0][0].get_document("oid").is_ok());
    assert!(states[0][0].get_document("long").is_ok());

    for ((lane, messages), states) in lanes.iter().zip(&messages).zip(states.iter()) {
        let [inserted, updated, replaced] = [&states[0], &states[1], &states[2]];
        let ops: Vec<String> = messages
            .iter()
            .map(|m| m.subject.rsplit('.').next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            ops,
            ["insert", "update", "replace", "delete", "insert"],
            "{}",
            lane.id
        );
        let fix = |doc: &RawDocument| -> anyhow::Result<RawDocumentBuf> {
            match lane.redact {
                true => redacted(doc),
                false => Ok(doc.to_owned()),
            }
        };
        let updated_fields = bson::rawdoc! {
            "upd": { "$numberLong": "6" },
            "arr": [{ "$oid": "also-not" }, { "$date": 5 }],
        };
        // (message, field, expected document)
        let expectations: Vec<(usize, &str, RawDocumentBuf)> = vec![
            (0, "fullDocument", fix(inserted)?),
            (1, "fullDocument", fix(updated)?),
            (1, "fullDocumentBeforeChange", fix(inserted)?),
            (2, "fullDocument", fix(replaced)?),
            (2, "fullDocumentBeforeChange", fix(updated)?),
            (3, "fullDocumentBeforeChange", fix(replaced)?),
        ];
        match lane.encoding {
            "bson" => {
                for (index, field, expected) in &expectations {
                    let payload = RawDocument::from_bytes(&messages[*index].payload)?;
                    let got = payload.get_document(field)?;
                    assert_eq!(
                        got.as_bytes(),
                        expected.as_bytes(),
                        "{} message {index} {field}",
                        lane.id
                    );
                    assert!(payload.get_str("id").is_ok());
                }
                let update = RawDocument::from_bytes(&messages[1].payload)?;
                let got = update
                    .get_document("updateDescription")?
                    .get_document("updatedFields")?;
                assert_eq!(got.as_bytes(), updated_fields.as_bytes(), "{}", lane.id);
            }
            json_encoding => {
                let mode = match json_encoding {
                    "canonical-json" => tidegate::model::ejson::Mode::Canonical,
                    _ => tidegate::model::ejson::Mode::Relaxed,
                };
                let text = |i: usize| String::from_utf8_lossy(&messages[i].payload).to_string();
                // The JSON of each stored document, written by hand for the first one so the
                // writer is not only checked against itself.
                let first = match mode {
                    tidegate::model::ejson::Mode::Canonical => concat!(
                        r#"{"_id":{"$numberInt":"1"},"email":"EMAIL","oid":{"$oid":"not-an-oid"},"#,
                        r#""long":{"$numberLong":"5"},"date":{"$date":{"$numberLong":"1000"}},"#,
                        r#""bin":{"$binary":{"base64":"AQID","subType":"00"}},"re":{"$regex":"a+","$options":"i"},"#,
                        r#""nested":{"deep":{"$date":"not-a-date"},"list":[{"$oid":"zz"},{"$numberDecimal":"x"}]},"#,
                        r#""i64":{"$numberLong":"7"}}"#
                    ),
                    tidegate::model::ejson::Mode::Relaxed => concat!(
                        r#"{"_id":1,"email":"EMAIL","oid":{"$oid":"not-an-oid"},"#,
                        r#""long":{"$numberLong":"5"},"date":{"$date":{"$numberLong":"1000"}},"#,
                        r#""bin":{"$binary":{"base64":"AQID","subType":"00"}},"re":{"$regex":"a+","$options":"i"},"#,
                        r#""nested":{"deep":{"$date":"not-a-date"},"list":[{"$oid":"zz"},{"$numberDecimal":"x"}]},"#,
                        r#""i64":7}"#
                    ),
                };
                let email = if lane.redact {
                    "[redacted]"
                } else {
                    "a@example.com"
                };
                let first = first.replace("EMAIL", email);
                assert!(
                    text(0).contains(&format!(r#""fullDocument":{first}"#)),
                    "{}: {}",
                    lane.id,
                    text(0)
                );
                for (index, field, expected) in &expectations {
                    let mut json = Vec::new();
                    tidegate::model::ejson::write_document(expected, mode, &mut json)
                        .map_err(anyhow::Error::msg)?;
                    let json = String::from_utf8(json)?;
                    assert!(
                        text(*index).contains(&format!(r#""{field}":{json}"#)),
                        "{} message {index} {field}: {}",
                        lane.id,
                        text(*index)
                    );
                }
                assert!(
                    text(1).contains(
                        r#""updatedFields":{"upd":{"$numberLong":"6"},"arr":[{"$oid":"also-not"},{"$date":5}]}"#
                    ) || text(1).contains(
                        r#""updatedFields":{"upd":{"$numberLong":"6"},"arr":[{"$oid":"also-not"},{"$date":{"$numberInt":"5"}}]}"#
                    ),
                    "{}: {}",
                    lane.id,
                    text(1)
                );
            }
        }
    }
    Ok(())
}

/// Relaxed JSON writes dates before 1970 and after 9999 in the canonical form (it used to
/// clamp the later ones to 9999-12-31), and canonical JSON keeps the document's field order
/// (it used to sort keys alphabetically).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_dates_and_canonical_field_order() -> anyhow::Result<()> {
    let h = support::Harness::start().await?;
    let lanes = [
        Lane::new("relaxed", "relaxed-json", false),
        Lane::new("canonical", "canonical-json", false),
    ];
    let messages = relay_lanes(&h, &lanes, 1, |coll| async move {
        coll.insert_one(doc! {
            "_id": 1,
            "zeta": 1,
            "alpha": 2.5,
            "late": bson::DateTime::from_millis(253_402_300_800_001),
            "early": bson::DateTime::from_millis(-86_400_000),
            "when": bson::DateTime::from_millis(1_704_164_645_006),
        })
        .await?;
        Ok(())
    })
    .await?;
    let relaxed = String::from_utf8_lossy(&messages[0][0].payload).to_string();
    assert!(
        relaxed.contains(concat!(
            r#""fullDocument":{"_id":1,"zeta":1,"alpha":2.5,"#,
            r#""late":{"$date":{"$numberLong":"253402300800001"}},"#,
            r#""early":{"$date":{"$numberLong":"-86400000"}},"#,
            r#""when":{"$date":"2024-01-02T03:04:05.006Z"}}"#
        )),
        "{relaxed}"
    );
    let canonical = String::from_utf8_lossy(&messages[1][0].payload).to_string();
    assert!(
        canonical.contains(concat!(
            r#""fullDocument":{"_id":{"$numberInt":"1"},"zeta":{"$numberInt":"1"},"#,
            r#""alpha":{"$numberDouble":"2.5"},"#,
            r#""late":{"$date":{"$numberLong":"253402300800001"}},"#,
            r#""early":{"$date":{"$numberLong":"-86400000"}},"#,
            r#""when":{"$date":{"$numberLong":"1704164645006"}}}"#
        )),
        "{canonical}"
    );
    // The envelope too keeps the server's order: `id` first, then the server's fields.
    assert!(canonical.starts_with(r#"{"id":""#), "{canonical}");
    Ok(())
}
