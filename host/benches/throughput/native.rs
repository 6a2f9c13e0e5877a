//! Native baselines of the per-call table (5a) that take more than a few lines: Rust doing
//! on the raw change what a first-party plugin does, so a plugin's cost reads as a ratio.

use bson::raw::RawBsonRef;
use tidegate::model::ejson::{self, Mode};
use tidegate::model::Change;
use tidegate::plugin::contract::v0_2::types as wit;
use tidegate::plugin::{edit, path};

/// `encode` with `arrays = "string"`: every top-level array of `fullDocument` set to its
/// relaxed Extended JSON text (one `set` edit each, applied to the raw change).
pub fn encode_arrays(change: &Change) -> Option<Change> {
    let full = change.full_document()?;
    let mut edits = Vec::new();
    for element in full.iter() {
        let (key, value) = element.ok()?;
        if let RawBsonRef::Array(_) = value {
            let mut text = Vec::new();
            ejson::write_value(value, Mode::Relaxed, &mut text).ok()?;
            let text = String::from_utf8(text).ok()?;
            edits.push(wit::Edit::Set(wit::SetValue {
                part: wit::Part::FullDocument,
                path: vec![key.as_str().to_string()],
                value: serde_json::Value::String(text).to_string(),
            }));
        }
    }
    let output = wit::Output {
        edits,
        metadata: None,
        subject: None,
        headers: Vec::new(),
        payload: None,
    };
    edit::apply(change, &output).ok()?
}

/// `map` with `payload = "csv"`: the mapped values of `fullDocument` as one CSV line (each
/// value's relaxed Extended JSON text, strings unquoted).
pub fn csv_line(change: &Change, fields: &[&[&str]]) -> Option<Vec<u8>> {
    let full = change.full_document()?;
    let mut line = Vec::with_capacity(64);
    for (i, at) in fields.iter().enumerate() {
        if i > 0 {
            line.push(b',');
        }
        let at: Vec<String> = at.iter().map(|s| s.to_string()).collect();
        match path::get(full, &at) {
            Some(RawBsonRef::String(s)) => line.extend_from_slice(s.as_bytes()),
            Some(value) => ejson::write_value(value, Mode::Relaxed, &mut line).ok()?,
            None => {}
        }
    }
    line.push(b'\n');
    Some(line)
}

/// The 5a row of `map` with `payload = "csv"` (0.2 only: 0.1 cannot carry a payload): the
/// call, and [`csv_line`] as its native baseline.
pub fn map_csv_row(
    sandbox: &tidegate::sandbox::Sandbox,
    plugins: &std::path::Path,
    settings: tidegate::plugin::PluginSettings,
    change: &Change,
    iters: usize,
) -> anyhow::Result<Vec<String>> {
    use std::hint::black_box;
    use tidegate::plugin::{Decision, Input, Plugin};
    let input = Input::new(change.clone());
    let file = plugins.join("map.wasm");
    let mut plugin = Plugin::load(sandbox, "map", &file, &settings)?;
    match plugin.call(&input) {
        Ok(Decision::Edit(outputs)) if outputs.iter().all(|o| o.payload.is_some()) => {}
        other => anyhow::bail!("map with payload = csv: no payload ({other:?})"),
    }
    let ns = super::best_ns(iters, || {
        if let Ok(Decision::Edit(outputs)) = plugin.call(black_box(&input)) {
            for out in &outputs {
                black_box(edit::apply(change, out).ok());
            }
        }
    });
    let fields: [&[&str]; 3] = [&["_id"], &["email"], &["address", "city"]];
    let native = super::best_ns(iters, || {
        black_box(csv_line(black_box(change), &fields));
    });
    Ok(vec![
        "map, payload = csv".into(),
        "—".into(),
        format!("{ns:.0}"),
        format!("{native:.0}"),
        format!("{:.1}×", ns / native.max(1e-9)),
        "raw get of 3 fields, CSV line".into(),
    ])
}

/// Where a one-field edit's time goes (issue 16's "≤ 2 × native" goal): `redact`'s 0.2 call
/// taken apart into what the host does (the edit applied to the raw change; the body of the
/// `find` import), what any 0.2 transform call costs (`fanout` with one copy: the same event in,
/// one unedited output with one header out), and the rest, which is the guest's own work plus
/// the crossing of its `find` import. Each part is the best of rounds, like table 5a.
pub fn redact_split(
    sandbox: &tidegate::sandbox::Sandbox,
    plugins: &std::path::Path,
    settings: impl Fn(&[(&str, &str)]) -> tidegate::plugin::PluginSettings,
    change: &Change,
    iters: usize,
) -> anyhow::Result<Vec<String>> {
    use std::hint::black_box;
    use tidegate::plugin::{Decision, Input, Plugin};
    let input = Input::new(change.clone());
    let load = |name: &str, config: &[(&str, &str)]| {
        Plugin::load(
            sandbox,
            name,
            &plugins.join(format!("{name}.wasm")),
            &settings(config),
        )
    };
    let mut redact = load("redact", &[("fields", "email")])?;
    let mut fanout = load("fanout", &[("copies", "1")])?;
    let outputs = match redact.call(&input) {
        Ok(Decision::Edit(outputs)) if !outputs.is_empty() => outputs,
        other => anyhow::bail!("redact: no output ({other:?})"),
    };
    let full = change
        .full_document()
        .ok_or_else(|| anyhow::anyhow!("the sample change has no fullDocument"))?;
    let at = vec!["email".to_string()];

    // A line per part, so that a profiler can be attached to one part of a long run.
    eprintln!("micro: one-field edit, part by part: redact's call…");
    let call = super::best_ns(iters, || {
        black_box(redact.call(black_box(&input)).ok());
    });
    eprintln!("micro: one-field edit, part by part: its edit applied…");
    let apply = super::best_ns(iters, || {
        black_box(edit::apply(black_box(change), &outputs[0]).ok());
    });
    eprintln!("micro: one-field edit, part by part: a transform call that edits nothing…");
    let bare = super::best_ns(iters, || {
        black_box(fanout.call(black_box(&input)).ok());
    });
    eprintln!("micro: one-field edit, part by part: the find import's body…");
    let find = super::best_ns(iters, || {
        for (path, value) in path::find(black_box(full), &at) {
            let mut text = Vec::with_capacity(32);
            black_box(ejson::write_value(value, Mode::Relaxed, &mut text).ok());
            black_box((path, text));
        }
    });
    let own = call - bare - find;
    Ok(vec![
        format!(
            "A one-field edit, part by part (redact `fields = \"email\"`, 0.2, ns): the call \
             alone {call:.0}; the host applying its edit to the raw change {apply:.0}; of the \
             call, a transform call that edits nothing (fanout, one copy) {bare:.0}, the `find` \
             import's host body (raw find + the value's EJSON text) {find:.0}, and the rest — \
             the guest's own work and the import's crossing — {own:.0}."
        ),
        format!(
            "So redact ÷ native = ({call:.0} + {apply:.0}) ÷ native: the edit applied is the \
             same code in both; the excess is the transform call's fixed cost ({bare:.0}) and \
             the guest's own work ({own:.0})."
        ),
    ])
}
