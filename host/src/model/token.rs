//! Resume tokens: the change stream's position, its `_data` string (every message id starts
//! with it) and the cluster time it stands for.

use bson::raw::RawDocument;
use mongodb::change_stream::event::ResumeToken;

/// A resume token from its raw document (`{"_data": …}`).
pub fn token_from_raw(token: &RawDocument) -> Result<ResumeToken, String> {
    bson::deserialize_from_slice(token.as_bytes())
        .map_err(|e| format!("unreadable resume token: {e}"))
}

/// The `_data` string of a resume token; tokens from MongoDB 4.2+ are `{_data: "<hex>"}`.
/// Falls back to the token's canonical JSON for anything else, which is still unique.
pub fn token_id(token: &ResumeToken) -> String {
    match bson::serialize_to_bson(token) {
        Ok(bson::Bson::Document(doc)) => match doc.get_str("_data") {
            Ok(data) => data.to_string(),
            Err(_) => bson::Bson::Document(doc)
                .into_canonical_extjson()
                .to_string(),
        },
        Ok(other) => other.into_canonical_extjson().to_string(),
        Err(_) => String::new(),
    }
}

/// The cluster time a resume token stands for, read from its `_data` (MongoDB's KeyString
/// encoding starts with a timestamp: type byte 0x82, then seconds and increment, big-endian).
/// `None` for tokens of another shape.
pub fn token_time(token: &ResumeToken) -> Option<bson::Timestamp> {
    let data = token_id(token);
    let hex = data.strip_prefix("82")?;
    let time = u32::from_str_radix(hex.get(0..8)?, 16).ok()?;
    let increment = u32::from_str_radix(hex.get(8..16)?, 16).ok()?;
    Some(bson::Timestamp { time, increment })
}

/// A resume token from its document form (`{"_data": …}`).
pub fn token_from_document(document: bson::Document) -> Result<ResumeToken, String> {
    bson::deserialize_from_bson(bson::Bson::Document(document)).map_err(|e| e.to_string())
}
