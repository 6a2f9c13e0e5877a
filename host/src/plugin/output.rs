//! What a transform's outputs must respect besides running within its limits: their count
//! and bytes (`output-too-large`) and the contract (`invalid-output`: the event id kept,
//! subjects under the unit's prefix, no reserved or malformed headers). The one check of the
//! pipeline and of `tidegate plugin test` (see `Plugin::call_checked`).

use super::contract::v0_1::types as wit;
use super::{CallError, Decision, OutputRules, Plugin};
use crate::model::failure::FailureKind;
use crate::model::subject::{is_under_prefix, is_valid_subject};

/// Checks a transform's outputs against its limits (count and bytes: `output-too-large`;
/// the byte limit capped by `rules`) and the contract (`invalid-output`, see
/// [`check_output`]).
pub(super) fn check_outputs(
    plugin: &Plugin,
    decision: &Decision,
    input: &wit::ChangeEvent,
    rules: &OutputRules,
) -> Result<(), CallError> {
    let Decision::Replace(outputs) = decision else {
        return Ok(());
    };
    let limits = &plugin.settings.limits;
    if outputs.len() > limits.max_outputs as usize {
        return Err(plugin.error(
            FailureKind::OutputTooLarge,
            format!(
                "{} outputs for one event; the limit is {} (limits.max_outputs)",
                outputs.len(),
                limits.max_outputs
            ),
        ));
    }
    let bytes: u64 = outputs.iter().map(|o| output_bytes(o) as u64).sum();
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
    for out in outputs {
        check_output(out, input, &rules.subject_prefix)
            .map_err(|message| plugin.error(FailureKind::InvalidOutput, message))?;
    }
    Ok(())
}

/// Bytes of documents and headers in one output: what it costs the host to carry.
fn output_bytes(out: &wit::Output) -> usize {
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

/// What a transform may not do to an output: change the event id, leave the pipeline's
/// subjects, or set reserved or malformed headers.
fn check_output(out: &wit::Output, input: &wit::ChangeEvent, prefix: &str) -> Result<(), String> {
    if out.event.id != input.id {
        return Err(format!(
            "output changed the event id from '{}' to '{}'; ids are how duplicates are dropped",
            input.id, out.event.id
        ));
    }
    if let Some(subject) = &out.subject {
        if !is_valid_subject(subject, false) || !is_under_prefix(subject, prefix) {
            return Err(format!(
                "output subject '{subject}' is not a valid subject under '{prefix}.'"
            ));
        }
    }
    for header in &out.headers {
        let lower = header.name.to_ascii_lowercase();
        if lower.starts_with("nats-") || lower.starts_with("tidegate-") {
            return Err(format!("header '{}' is reserved", header.name));
        }
        let valid_name = !header.name.is_empty()
            && header
                .name
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b':');
        if !valid_name || header.value.contains(['\r', '\n']) {
            return Err(format!(
                "header '{}' has an invalid name or value",
                header.name
            ));
        }
    }
    Ok(())
}
