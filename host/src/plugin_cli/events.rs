//! Reading change events for `tidegate plugin test` from JSON lines in the published payload's
//! shape — so a message copied from the stream is a valid test event.

use anyhow::{anyhow, bail, Context};
use tidegate::model::Change;

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

fn parse(line: usize, text: &str) -> anyhow::Result<Change> {
    let doc = tidegate::model::ejson::parse_document("event", text.as_bytes(), None)
        .map_err(|e| anyhow!("{e}"))?;
    if doc.get_str("operationType").is_err() {
        bail!("`operationType` (a string) is required");
    }
    if doc.get_document("ns").is_err() {
        bail!("`ns` ({{\"db\": …, \"coll\": …}}) is required");
    }
    Change::from_payload(&doc, &format!("line-{line}")).map_err(|e| anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidegate::model::Operation;

    #[test]
    fn published_shape_round_trips() {
        let line = r#"{"id": "82AB", "operationType": "update", "ns": {"db": "shop", "coll": "orders"},
            "documentKey": {"_id": 1}, "updateDescription": {"updatedFields": {"a.b": 2},
            "removedFields": ["c"], "truncatedArrays": [{"field": "l", "newSize": 1}]},
            "fullDocument": {"_id": 1, "when": {"$date": "2024-01-01T00:00:00Z"}}, "txnNumber": 3}"#;
        let change = parse(1, &line.replace('\n', " ")).unwrap();
        assert_eq!(change.id(), "82AB");
        assert_eq!(*change.operation(), Operation::Update);
        assert_eq!(change.namespace().coll.as_deref(), Some("orders"));
        let u = change.update_description().unwrap();
        assert_eq!(
            u.get_array("removedFields").unwrap().get_str(0).unwrap(),
            "c"
        );
        assert!(change.full_document().unwrap().get_datetime("when").is_ok());
        assert_eq!(change.txn_number(), Some(3));
        // Field order is the line's, `id` first.
        let keys: Vec<&str> = change
            .document()
            .iter_elements()
            .map(|e| e.unwrap().key().as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "id",
                "operationType",
                "ns",
                "documentKey",
                "updateDescription",
                "fullDocument",
                "txnNumber"
            ]
        );
    }

    #[test]
    fn lines_and_errors() {
        let text = "// comment\n\n{\"operationType\": \"dropDatabase\", \"ns\": {\"db\": \"x\"}}\n";
        let events = parse_lines(text).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, 3);
        assert_eq!(events[0].1.id(), "line-3");
        assert_eq!(*events[0].1.operation(), Operation::DropDatabase);
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
