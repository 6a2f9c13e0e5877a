//! What a transform's outputs must respect, for every contract version: the plugin's limits
//! (count and bytes: `output-too-large`; the byte limit capped by the unit's rules) and the
//! contract (`invalid-output`: the event id kept, subjects under the pipeline's prefix,
//! headers neither reserved nor malformed, a payload's content type a plain header value).

use super::contract::v0_1;
use super::{CallError, Decision, OutputRules, Plugin};
use crate::model::failure::FailureKind;
use crate::model::subject::{is_under_prefix, is_valid_subject};

/// Checks what one call returned. `input_id` is the id of the event the plugin was given.
pub(super) fn check_outputs(
    plugin: &Plugin,
    decision: &Decision,
    input_id: &str,
    rules: &OutputRules,
) -> Result<(), CallError> {
    let (count, bytes) = match decision {
        Decision::Keep | Decision::Drop => return Ok(()),
        Decision::Replace(outputs) => (
            outputs.len(),
            outputs
                .iter()
                .map(|o| output_bytes_v0_1(o) as u64)
                .sum::<u64>(),
        ),
        Decision::Edit(outputs) => (
            outputs.len(),
            outputs
                .iter()
                .map(|o| super::edit::output_bytes(o) as u64)
                .sum::<u64>(),
        ),
    };
    let limits = &plugin.settings.limits;
    if count > limits.max_outputs as usize {
        return Err(plugin.error(
            FailureKind::OutputTooLarge,
            format!(
                "{count} outputs for one event; the limit is {} (limits.max_outputs)",
                limits.max_outputs
            ),
        ));
    }
    if bytes > limits.max_output_bytes.min(rules.max_output_bytes) {
        let limit = if limits.max_output_bytes <= rules.max_output_bytes {
            format!("{} (limits.max_output_bytes)", limits.max_output_bytes)
        } else {
            format!(
                "{} (the NATS server's max_payload; limits.max_output_bytes is {})",
                rules.max_output_bytes, limits.max_output_bytes
            )
        };
        return Err(plugin.error(
            FailureKind::OutputTooLarge,
            format!("outputs carry {bytes} bytes for one event; the limit is {limit}"),
        ));
    }
    let invalid = |message: String| plugin.error(FailureKind::InvalidOutput, message);
    match decision {
        Decision::Replace(outputs) => {
            for out in outputs {
                check_id(&out.event.id, input_id).map_err(invalid)?;
                let headers = out
                    .headers
                    .iter()
                    .map(|h| (h.name.as_str(), h.value.as_str()));
                check_routing(out.subject.as_deref(), headers, &rules.subject_prefix)
                    .map_err(invalid)?;
            }
        }
        Decision::Edit(outputs) => {
            for out in outputs {
                if let Some(meta) = &out.metadata {
                    check_id(&meta.id, input_id).map_err(invalid)?;
                }
                let headers = out
                    .headers
                    .iter()
                    .map(|h| (h.name.as_str(), h.value.as_str()));
                check_routing(out.subject.as_deref(), headers, &rules.subject_prefix)
                    .map_err(invalid)?;
                if let Some(payload) = &out.payload {
                    check_content_type(&payload.content_type).map_err(invalid)?;
                }
            }
        }
        Decision::Keep | Decision::Drop => {}
    }
    Ok(())
}

/// Bytes of documents and headers in one 0.1 output: what it costs the host to carry.
fn output_bytes_v0_1(out: &v0_1::types::Output) -> usize {
    let event = &out.event;
    let docs = [
        event.document_key.as_ref(),
        event.full_document.as_ref(),
        event.full_document_before_change.as_ref(),
    ];
    docs.iter().flatten().map(|d| d.len()).sum::<usize>()
        + event
            .update_description
            .as_ref()
            .map(|u| u.updated_fields.len())
            .unwrap_or(0)
        + out
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len())
            .sum::<usize>()
}

/// The longest `Content-Type` a payload may carry (the WIT's `payload.content-type`).
const MAX_CONTENT_TYPE_BYTES: usize = 256;

/// A payload's content type becomes a header value as is: printable ASCII and spaces, not
/// empty, not long.
fn check_content_type(content_type: &str) -> Result<(), String> {
    let printable = content_type
        .bytes()
        .all(|b| b == b' ' || b.is_ascii_graphic());
    if content_type.is_empty() || content_type.len() > MAX_CONTENT_TYPE_BYTES || !printable {
        return Err(format!(
            "payload content type '{content_type}' must be 1 to {MAX_CONTENT_TYPE_BYTES} bytes \
             of printable ASCII"
        ));
    }
    Ok(())
}

fn check_id(id: &str, input_id: &str) -> Result<(), String> {
    if id != input_id {
        return Err(format!(
            "output changed the event id from '{input_id}' to '{id}'; ids are how duplicates \
             are dropped"
        ));
    }
    Ok(())
}

/// What a transform may not do to an output's routing: leave the pipeline's subjects, or set
/// reserved or malformed headers.
fn check_routing<'a>(
    subject: Option<&str>,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    prefix: &str,
) -> Result<(), String> {
    if let Some(subject) = subject {
        if !is_valid_subject(subject, false) || !is_under_prefix(subject, prefix) {
            return Err(format!(
                "output subject '{subject}' is not a valid subject under '{prefix}.'"
            ));
        }
    }
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("nats-") || lower.starts_with("tidegate-") {
            return Err(format!("header '{name}' is reserved"));
        }
        let valid_name =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !valid_name || value.contains(['\r', '\n']) {
            return Err(format!("header '{name}' has an invalid name or value"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_content_type;

    /// A payload's content type becomes a header value as is, so only plain ones pass.
    #[test]
    fn content_types() {
        for good in ["text/csv", "application/x-protobuf; messageType=shop.Order"] {
            assert!(check_content_type(good).is_ok(), "{good}");
        }
        let long = "a".repeat(257);
        for bad in [
            "",
            "text/csv\r\nX-Evil: 1",
            "text/csv\u{7f}",
            "té/x",
            long.as_str(),
        ] {
            assert!(check_content_type(bad).is_err(), "{bad:?}");
        }
    }
}
