//! The user's extra change-stream stages: which operators are allowed and where.

use super::pipeline::{OversizePolicy, PipelineConfig, EVENT_FIELDS, SPLIT_STAGE};

/// Checks one user stage: an allowed operator that leaves `_id` and the fields tidegate
/// reads alone.
pub fn check_stage(stage: &toml::Table) -> Result<bson::Document, String> {
    let json = serde_json::to_value(stage).map_err(|e| e.to_string())?;
    let document = json
        .as_object()
        .cloned()
        .map(bson::Document::try_from)
        .ok_or("a stage must be a table")?
        .map_err(|e| e.to_string())?;
    let mut keys = document.keys();
    let (Some(operator), None) = (keys.next(), keys.next()) else {
        return Err(
            "each stage must have exactly one operator, like { \"$match\" = { … } }".into(),
        );
    };
    let touched = |field: &str| {
        let top = field.split('.').next().unwrap_or(field);
        EVENT_FIELDS.contains(&top)
    };
    let body = document.get(operator);
    match (operator.as_str(), body) {
        ("$match", Some(bson::Bson::Document(_))) => {}
        ("$project", Some(bson::Bson::Document(fields))) => {
            for (field, value) in fields {
                let excluded = matches!(value, bson::Bson::Int32(0) | bson::Bson::Int64(0) | bson::Bson::Boolean(false));
                if !excluded {
                    return Err(format!(
                        "$project may only exclude fields (`{field}` would keep only some and drop what tidegate reads)"
                    ));
                }
                if touched(field) {
                    return Err(format!("$project may not remove `{field}`, which tidegate reads"));
                }
            }
        }
        ("$addFields" | "$set", Some(bson::Bson::Document(fields))) => {
            if let Some(field) = fields.keys().find(|f| touched(f)) {
                return Err(format!("{operator} may not change `{field}`, which tidegate reads"));
            }
        }
        ("$unset", Some(body)) => {
            let fields: Vec<String> = match body {
                bson::Bson::String(one) => vec![one.clone()],
                bson::Bson::Array(many) => many.iter().filter_map(|f| f.as_str().map(str::to_string)).collect(),
                _ => return Err("$unset takes a field name or a list of them".into()),
            };
            if let Some(field) = fields.iter().find(|f| touched(f)) {
                return Err(format!("$unset may not remove `{field}`, which tidegate reads"));
            }
        }
        (SPLIT_STAGE, Some(bson::Bson::Document(options))) if options.is_empty() => {}
        ("$match" | "$project" | "$addFields" | "$set", _) => {
            return Err(format!("{operator} takes a table"));
        }
        (SPLIT_STAGE, _) => return Err(format!("{SPLIT_STAGE} takes an empty table: {{}}")),
        (other, _) => {
            return Err(format!(
                "{other} is not allowed (allowed: $match, $project with exclusions, $addFields, $set, $unset, and last {SPLIT_STAGE})"
            ))
        }
    }
    Ok(document)
}

/// `$changeStreamSplitLargeEvent` among the user's stages: only last (as MongoDB requires),
/// where tidegate reassembles the fragments exactly as with `oversize = "split"`; not with
/// `oversize = "skip"`, which would then never see an oversize event.
pub(super) fn check_split_stage(pipeline: &PipelineConfig) -> Result<(), String> {
    let is_split = |stage: &toml::Table| stage.contains_key(SPLIT_STAGE);
    let Some(at) = pipeline.stages.iter().position(is_split) else {
        return Ok(());
    };
    if at + 1 != pipeline.stages.len() {
        return Err(format!(
            "{SPLIT_STAGE} must be the last stage (MongoDB's rule); better still, drop it and \
             set `oversize = \"split\"`, which appends it and reassembles the fragments"
        ));
    }
    if pipeline.oversize == OversizePolicy::Skip {
        return Err(format!(
            "{SPLIT_STAGE} splits oversize events, which contradicts `oversize = \"skip\"`: \
             keep one of them"
        ));
    }
    Ok(())
}
