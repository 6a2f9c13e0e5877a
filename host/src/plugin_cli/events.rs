//! Reading change events for `tidegate plugin test` from JSON lines in the published payload's
//! shape — so a message copied from the stream is a valid test event.

use anyhow::{anyhow, bail, Context};
use bson::{Bson, Document};
use tidegate::event::{Change, Namespace, Operation, UpdateDescription};

/// Every non-blank, non-`//` line of `text` as `(line number, change)`.
pub fn parse_lines(text: &str) -> anyhow::Result<Vec<(usize, Change)>> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with("//"))
        .map(|(n, l)| {
            parse(n, l)
                .map(|c| (n, c))
                .with_context(|| format!("line {n}"))
        })
        .collect()
}

/// The `operationType` spelling back to an [`Operation`] (the inverse of `Operation::as_str`).
fn operation(name: &str) -> Operation {
    match name {
        "insert" => Operation::Insert,
        "update" => Operation::Update,
        "replace" => Operation::Replace,
        "delete" => Operation::Delete,
        "drop" => Operation::Drop,
        "rename" => Operation::Rename,
        "dropDatabase" => Operation::DropDatabase,
        "invalidate" => Operation::Invalidate,
        "read" => Operation::SnapshotRead,
        other => Operation::Other(other.to_owned()),
    }
}

fn namespace(doc: &Document) -> anyhow::Result<Namespace> {
    Ok(Namespace {
        db: doc
            .get_str("db")
            .map_err(|_| anyhow!("ns.db must be a string"))?
            .to_owned(),
        coll: doc.get_str("coll").ok().map(str::to_owned),
    })
}

fn optional_doc(doc: &Document, key: &str) -> anyhow::Result<Option<Document>> {
    match doc.get(key) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Document(d)) => Ok(Some(d.clone())),
        Some(_) => bail!("`{key}` must be an object"),
    }
}

fn parse(line: usize, text: &str) -> anyhow::Result<Change> {
    let value: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
    let doc = match Bson::try_from(value).context("not valid Extended JSON")? {
        Bson::Document(doc) => doc,
        _ => bail!("an event must be a JSON object"),
    };
    let op = doc
        .get_str("operationType")
        .map_err(|_| anyhow!("`operationType` (a string) is required"))?;
    let ns = doc
        .get_document("ns")
        .map_err(|_| anyhow!("`ns` ({{\"db\": …, \"coll\": …}}) is required"))?;
    let update_description = optional_doc(&doc, "updateDescription")?.map(|u| UpdateDescription {
        updated_fields: u.get_document("updatedFields").cloned().unwrap_or_default(),
        removed_fields: u
            .get_array("removedFields")
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        truncated_arrays: u
            .get_array("truncatedArrays")
            .map(|a| {
                a.iter()
                    .filter_map(Bson::as_document)
                    .filter_map(|t| {
                        let field = t.get_str("field").ok()?.to_owned();
                        let size = t
                            .get_i64("newSize")
                            .ok()
                            .or_else(|| t.get_i32("newSize").ok().map(i64::from))?;
                        Some((field, size.max(0) as u32))
                    })
                    .collect()
            })
            .unwrap_or_default(),
    });
    Ok(Change {
        id: doc
            .get_str("id")
            .map(str::to_owned)
            .unwrap_or_else(|_| format!("line-{line}")),
        operation: operation(op),
        namespace: namespace(ns)?,
        to: optional_doc(&doc, "to")?
            .map(|d| namespace(&d))
            .transpose()?,
        document_key: optional_doc(&doc, "documentKey")?,
        full_document: optional_doc(&doc, "fullDocument")?,
        full_document_before_change: optional_doc(&doc, "fullDocumentBeforeChange")?,
        update_description,
        cluster_time: doc.get_timestamp("clusterTime").ok(),
        wall_time: doc.get_datetime("wallTime").ok().copied(),
        lsid: optional_doc(&doc, "lsid")?,
        txn_number: doc
            .get_i64("txnNumber")
            .ok()
            .or_else(|| doc.get_i32("txnNumber").ok().map(i64::from)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_shape_round_trips() {
        let line = r#"{"id": "82AB", "operationType": "update", "ns": {"db": "shop", "coll": "orders"},
            "documentKey": {"_id": 1}, "updateDescription": {"updatedFields": {"a.b": 2},
            "removedFields": ["c"], "truncatedArrays": [{"field": "l", "newSize": 1}]},
            "fullDocument": {"_id": 1, "when": {"$date": "2024-01-01T00:00:00Z"}}, "txnNumber": 3}"#;
        let change = parse(1, &line.replace('\n', " ")).unwrap();
        assert_eq!(change.id, "82AB");
        assert_eq!(change.operation, Operation::Update);
        assert_eq!(change.namespace.coll.as_deref(), Some("orders"));
        let u = change.update_description.unwrap();
        assert_eq!(u.removed_fields, ["c"]);
        assert_eq!(u.truncated_arrays, [("l".to_owned(), 1)]);
        assert!(matches!(
            change.full_document.unwrap().get("when"),
            Some(Bson::DateTime(_))
        ));
        assert_eq!(change.txn_number, Some(3));
    }

    #[test]
    fn lines_and_errors() {
        let text = "// comment\n\n{\"operationType\": \"dropDatabase\", \"ns\": {\"db\": \"x\"}}\n";
        let events = parse_lines(text).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, 3);
        assert_eq!(events[0].1.id, "line-3");
        assert_eq!(events[0].1.operation, Operation::DropDatabase);
        for bad in [
            "{",
            "[]",
            r#"{"ns": {"db": "x"}}"#,
            r#"{"operationType": "insert"}"#,
        ] {
            assert!(parse_lines(bad).is_err(), "{bad}");
        }
    }
}
