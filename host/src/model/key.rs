//! A change's document key (`documentKey._id`) as consumers route on it: one NATS subject
//! token for `{key}` in a subject template, and relaxed Extended JSON text for the
//! `Tidegate-Key` header.
//!
//! The subject token must be *injective*: "latest value per document" retention
//! (`max_msgs_per_subject = 1`) keeps one message per subject, so two documents sharing a
//! token would lose one of them. So the token names the BSON type before the value
//! (`s:1` for the string "1", `i:1` for the int32 1), and every byte outside
//! `[A-Za-z0-9_-]` of the text after the tag is percent-encoded (`%2E` for `.`): no `.`, `*`,
//! `>`, whitespace or control character can split or wildcard the subject, and different
//! texts stay different.

use bson::raw::RawBsonRef;

use super::ejson::{write_value, Mode};
use super::Change;

/// The token `{key}` renders to for an event without a document key (drop, rename,
/// invalidate, DDL): every key's token holds a `:`, so it is never a key's.
pub const NO_KEY_TOKEN: &str = "_";

/// `_id` of the change's document key, if it has one.
pub fn key_id(change: &Change) -> Option<RawBsonRef<'_>> {
    change.document_key()?.get("_id").ok().flatten()
}

/// `id` as relaxed Extended JSON text (`1`, `"abc"`, `{"$oid":"…"}`): the `Tidegate-Key`
/// header and the key Debezium consumers know. JSON escapes control characters, so the text
/// holds no CR or LF.
pub fn key_json(id: RawBsonRef<'_>) -> Result<String, String> {
    let mut out = Vec::with_capacity(32);
    write_value(id, Mode::Relaxed, &mut out)?;
    String::from_utf8(out).map_err(|e| format!("key is not UTF-8: {e}"))
}

/// `id` as one subject token, `<tag>:<text>` (see the module docs):
///
/// | `_id` | token |
/// | --- | --- |
/// | string `"a.b c"` | `s:a%2Eb%20c` |
/// | string `""` | `s:` |
/// | int32 `1` / int64 `1` | `i:1` / `l:1` |
/// | double `1.5` | `d:1%2E5` |
/// | ObjectId | `o:5f0c9a0e8e1b2c3d4e5f6a7b` |
/// | anything else (document, binary, date, decimal, …) | `x:` + its canonical Extended JSON, percent-encoded |
pub fn subject_token(id: RawBsonRef<'_>) -> Result<String, String> {
    let (tag, text) = match id {
        RawBsonRef::String(s) => ("s", s.to_string()),
        RawBsonRef::Int32(n) => ("i", n.to_string()),
        RawBsonRef::Int64(n) => ("l", n.to_string()),
        RawBsonRef::ObjectId(oid) => ("o", oid.to_hex()),
        RawBsonRef::Double(f) => {
            let mut out = Vec::new();
            write_value(RawBsonRef::Double(f), Mode::Canonical, &mut out)?;
            ("d", double_text(&out))
        }
        // Canonical Extended JSON keeps every type apart, except a sub-document whose keys
        // look like a type wrapper (`{"$oid": …}`), and MongoDB refuses `$`-prefixed
        // field names inside an `_id`.
        other => {
            let mut out = Vec::new();
            write_value(other, Mode::Canonical, &mut out)?;
            let text = String::from_utf8(out).map_err(|e| format!("key is not UTF-8: {e}"))?;
            ("x", text)
        }
    };
    Ok(format!("{tag}:{}", percent_encode(&text)))
}

/// The number inside `{"$numberDouble":"<text>"}`.
fn double_text(canonical: &[u8]) -> String {
    let text = String::from_utf8_lossy(canonical);
    text.trim_start_matches("{\"$numberDouble\":\"")
        .trim_end_matches("\"}")
        .to_string()
}

/// `text` with every byte outside `[A-Za-z0-9_-]` written as `%XX` (upper-case hex of each
/// UTF-8 byte): a valid subject token's characters only, and reversible.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::subject::is_valid_subject;
    use bson::{rawdoc, RawBson};

    fn token(value: RawBson) -> String {
        subject_token(value.as_raw_bson_ref()).unwrap()
    }

    /// Values that look alike but are different `_id`s never share a token, and every token
    /// is one valid subject token.
    #[test]
    fn tokens_are_injective_and_valid() {
        let oid = bson::oid::ObjectId::parse_str("5f0c9a0e8e1b2c3d4e5f6a7b").unwrap();
        let values = vec![
            RawBson::String("1".into()),
            RawBson::Int32(1),
            RawBson::Int64(1),
            RawBson::Double(1.0),
            RawBson::String("".into()),
            RawBson::String("a.b".into()),
            RawBson::String("a%2Eb".into()),
            RawBson::String("a_b".into()),
            RawBson::String("*".into()),
            RawBson::String(">".into()),
            RawBson::String(" ".into()),
            RawBson::String("\r\n".into()),
            RawBson::String("é".into()),
            RawBson::String("s:1".into()),
            RawBson::String("5f0c9a0e8e1b2c3d4e5f6a7b".into()),
            RawBson::ObjectId(oid),
            RawBson::Document(rawdoc! { "a": 1, "b": "x" }),
            RawBson::Document(rawdoc! { "b": "x", "a": 1 }),
            RawBson::Document(rawdoc! { "a": 1_i64, "b": "x" }),
            RawBson::String(r#"{"a":1,"b":"x"}"#.into()),
            RawBson::Boolean(true),
            RawBson::String("true".into()),
            RawBson::Null,
            RawBson::DateTime(bson::DateTime::from_millis(5)),
            RawBson::Int64(5),
        ];
        let tokens: Vec<String> = values.into_iter().map(token).collect();
        for (i, a) in tokens.iter().enumerate() {
            assert!(is_valid_subject(&format!("cdc.{a}"), false), "{a}");
            assert!(!a.contains('.') && a.as_str() != NO_KEY_TOKEN, "{a}");
            for b in &tokens[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    /// The exact renderings the documentation shows.
    #[test]
    fn documented_renderings() {
        let oid = bson::oid::ObjectId::parse_str("5f0c9a0e8e1b2c3d4e5f6a7b").unwrap();
        assert_eq!(token(RawBson::String("a.b c".into())), "s:a%2Eb%20c");
        assert_eq!(token(RawBson::String("".into())), "s:");
        assert_eq!(token(RawBson::String("1".into())), "s:1");
        assert_eq!(token(RawBson::Int32(1)), "i:1");
        assert_eq!(token(RawBson::Int32(-7)), "i:-7");
        assert_eq!(token(RawBson::Int64(1)), "l:1");
        assert_eq!(token(RawBson::Double(1.5)), "d:1%2E5");
        assert_eq!(token(RawBson::ObjectId(oid)), "o:5f0c9a0e8e1b2c3d4e5f6a7b");
        assert_eq!(
            token(RawBson::Document(rawdoc! { "a": 1, "b": "x" })),
            "x:%7B%22a%22%3A%7B%22%24numberInt%22%3A%221%22%7D%2C%22b%22%3A%22x%22%7D"
        );
        let id = RawBson::String("line\r\nbreak".into());
        assert_eq!(
            key_json(id.as_raw_bson_ref()).unwrap(),
            r#""line\r\nbreak""#
        );
        assert_eq!(
            key_json(RawBsonRef::ObjectId(oid)).unwrap(),
            r#"{"$oid":"5f0c9a0e8e1b2c3d4e5f6a7b"}"#
        );
    }
}
