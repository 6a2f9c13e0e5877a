//! A change's own document as bytes: the change stream's event (`operationType`, `ns`,
//! `documentKey`, `fullDocument`, …, in the server's field order) so that anyone who knows
//! MongoDB change events can read it, with `id` (the resume token's `_data`) in place of
//! `_id`. Dead letters carry exactly this; published events go through
//! [`format`](super::format), whose `change-event` shape adds `tsMs`.

use crate::config::Encoding;
use crate::model::ejson::{write_document, Mode};
use crate::model::Change;

/// Encodes a change as a message payload: its document (see [`Change`]: the server's event
/// with `_id` replaced by `id`), as the server's BSON bytes, or written from them as relaxed or
/// canonical Extended JSON in the same field order.
pub fn payload(change: &Change, encoding: Encoding) -> Result<Vec<u8>, String> {
    let document = change.document();
    let mode = match encoding {
        Encoding::Bson => return Ok(document.as_bytes().to_vec()),
        Encoding::RelaxedJson => Mode::Relaxed,
        Encoding::CanonicalJson => Mode::Canonical,
    };
    let mut out = Vec::with_capacity(document.as_bytes().len() + document.as_bytes().len() / 4);
    write_document(document, mode, &mut out)
        .map_err(|err| format!("cannot encode the event as JSON: {err}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Fields, Namespace, Operation};
    use bson::{doc, rawdoc, Bson, Document, RawDocumentBuf};
    use std::borrow::Cow;

    fn change_with(full: RawDocumentBuf) -> Change {
        let fields = Fields {
            document_key: Some(Cow::Owned(rawdoc! { "_id": 1 })),
            full_document: Some(Cow::Owned(full)),
            cluster_time: Some(bson::Timestamp {
                time: 10,
                increment: 2,
            }),
            ..Fields::new(
                "82abc",
                Operation::Insert,
                Namespace {
                    db: "shop".into(),
                    coll: Some("orders.v2".into()),
                },
            )
        };
        Change::from_fields(fields, None).unwrap()
    }

    fn change() -> Change {
        change_with(rawdoc! { "_id": 1, "n": 5_i64 })
    }

    fn json(change: &Change, encoding: Encoding) -> String {
        String::from_utf8(payload(change, encoding).unwrap()).unwrap()
    }

    /// Every BSON type in the relaxed form the Extended JSON spec gives it, in the
    /// document's field order; dates outside 1970..=9999 and non-finite doubles keep the
    /// canonical form.
    #[test]
    fn relaxed_follows_the_spec() {
        let full = rawdoc! {
            "s": "quote \" and \\ and \u{1}",
            "i32": 1, "i64": 1_i64 << 40, "f": 1.5, "whole": 2.0, "negzero": -0.0, "big": 1e300,
            "nan": f64::NAN, "inf": f64::INFINITY, "ninf": f64::NEG_INFINITY,
            "b": true, "null": bson::RawBson::Null,
            "oid": bson::oid::ObjectId::parse_str("5f0c9a0e8e1b2c3d4e5f6a7b").unwrap(),
            "epoch": bson::DateTime::from_millis(0),
            "date": bson::DateTime::from_millis(1_700_000_000_123),
            "before1970": bson::DateTime::from_millis(-5),
            "last": bson::DateTime::from_millis(253_402_300_799_999),
            "after9999": bson::DateTime::from_millis(253_402_300_800_000),
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 3] },
            "dec": "1.25".parse::<bson::Decimal128>().unwrap(),
            "re": bson::Regex { pattern: "a+".try_into().unwrap(), options: "xi".try_into().unwrap() },
            "arr": [1, "two", { "three": [3.5] }],
            "ts": bson::Timestamp { time: 1, increment: 2 },
            "min": bson::RawBson::MinKey, "max": bson::RawBson::MaxKey,
            "code": bson::RawBson::JavaScriptCode("f()".into()),
        };
        let text = json(&change_with(full), Encoding::RelaxedJson);
        let expected = concat!(
            r#""fullDocument":{"s":"quote \" and \\ and \u0001","i32":1,"i64":1099511627776,"#,
            r#""f":1.5,"whole":2.0,"negzero":-0.0,"big":1e+300,"#,
            r#""nan":{"$numberDouble":"NaN"},"inf":{"$numberDouble":"Infinity"},"#,
            r#""ninf":{"$numberDouble":"-Infinity"},"b":true,"null":null,"#,
            r#""oid":{"$oid":"5f0c9a0e8e1b2c3d4e5f6a7b"},"epoch":{"$date":"1970-01-01T00:00:00Z"},"#,
            r#""date":{"$date":"2023-11-14T22:13:20.123Z"},"#,
            r#""before1970":{"$date":{"$numberLong":"-5"}},"#,
            r#""last":{"$date":"9999-12-31T23:59:59.999Z"},"#,
            r#""after9999":{"$date":{"$numberLong":"253402300800000"}},"#,
            r#""bin":{"$binary":{"base64":"AQID","subType":"00"}},"#,
            r#""dec":{"$numberDecimal":"1.25"},"#,
            r#""re":{"$regularExpression":{"pattern":"a+","options":"ix"}},"#,
            r#""arr":[1,"two",{"three":[3.5]}],"ts":{"$timestamp":{"t":1,"i":2}},"#,
            r#""min":{"$minKey":1},"max":{"$maxKey":1},"code":{"$code":"f()"}}"#,
        );
        assert!(text.contains(expected), "{text}");
        assert!(
            text.starts_with(r#"{"id":"82abc","operationType":"insert","#),
            "{text}"
        );
    }

    /// Canonical JSON wraps every number and date and keeps the document's field order
    /// (it used to come out sorted alphabetically).
    #[test]
    fn canonical_keeps_field_order() {
        let full = rawdoc! { "zeta": 1, "alpha": 2_i64, "mid": { "y": 1.5, "b": bson::DateTime::from_millis(7) } };
        let text = json(&change_with(full), Encoding::CanonicalJson);
        let expected = concat!(
            r#""fullDocument":{"zeta":{"$numberInt":"1"},"alpha":{"$numberLong":"2"},"#,
            r#""mid":{"y":{"$numberDouble":"1.5"},"b":{"$date":{"$numberLong":"7"}}}}"#,
        );
        assert!(text.contains(expected), "{text}");
        assert!(
            text.starts_with(r#"{"id":"82abc","operationType":"insert","ns":{"db":"shop","coll":"orders.v2"},"documentKey":{"_id":{"$numberInt":"1"}}"#),
            "{text}"
        );
    }

    /// Sub-documents whose keys look like type wrappers are written as the documents they
    /// are, and the BSON payload is the change's document byte for byte.
    #[test]
    fn dollar_keys_stay_documents() {
        let full = rawdoc! {
            "x": { "$oid": "not-an-oid" },
            "n": { "$numberLong": "5" },
            "list": [{ "$date": 5 }],
        };
        let change = change_with(full.clone());
        let text = json(&change, Encoding::RelaxedJson);
        assert!(
            text.contains(r#""fullDocument":{"x":{"$oid":"not-an-oid"},"n":{"$numberLong":"5"},"list":[{"$date":5}]}"#),
            "{text}"
        );
        let raw = payload(&change, Encoding::Bson).unwrap();
        assert_eq!(raw, change.document().as_bytes());
        let back = bson::RawDocument::from_bytes(&raw).unwrap();
        assert_eq!(
            back.get_document("fullDocument").unwrap().as_bytes(),
            full.as_bytes()
        );
    }

    /// The direct writer agrees with the bson crate's `into_relaxed_extjson` wherever the
    /// crate follows the spec (it clamps dates after 9999 and writes `-NaN`, so those are
    /// left out here and checked above).
    #[test]
    fn relaxed_writer_matches_bson_crate() {
        let full = doc! {
            "s": "x", "i32": 1, "i64": 1_i64 << 40, "f": 1.5, "whole": 2.0, "inf": f64::NEG_INFINITY,
            "b": true, "null": Bson::Null, "oid": bson::oid::ObjectId::new(),
            "date": bson::DateTime::from_millis(1_700_000_000_000), "old": bson::DateTime::from_millis(-5),
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Uuid, bytes: vec![7; 16] },
            "dec": "1.25".parse::<bson::Decimal128>().unwrap(),
            "arr": [1, "two", { "three": [3.5] }], "nested": { "a": { "b": [] } },
            "ts": bson::Timestamp { time: 1, increment: 2 }, "min": Bson::MinKey,
        };
        let raw = RawDocumentBuf::try_from(&full).unwrap();
        let ours: serde_json::Value =
            serde_json::from_slice(&crate::model::ejson::relaxed(&raw).unwrap()).unwrap();
        assert_eq!(ours, Bson::Document(full).into_relaxed_extjson());
    }

    /// Canonical JSON keeps int64 distinct from int32; relaxed JSON does not; BSON is exact.
    #[test]
    fn encodings_differ_in_fidelity() {
        let relaxed: serde_json::Value =
            serde_json::from_slice(&payload(&change(), Encoding::RelaxedJson).unwrap()).unwrap();
        assert_eq!(relaxed["fullDocument"]["n"], 5);
        assert_eq!(relaxed["operationType"], "insert");
        let canonical: serde_json::Value =
            serde_json::from_slice(&payload(&change(), Encoding::CanonicalJson).unwrap()).unwrap();
        assert_eq!(canonical["fullDocument"]["n"]["$numberLong"], "5");
        let raw = payload(&change(), Encoding::Bson).unwrap();
        let back: Document = bson::deserialize_from_slice(&raw).unwrap();
        assert_eq!(
            back.get_document("fullDocument")
                .unwrap()
                .get_i64("n")
                .unwrap(),
            5
        );
    }
}
