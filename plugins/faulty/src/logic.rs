//! Deciding what to do with an event, free of WIT bindings so it can be unit-tested natively.

use serde_json::Value;

/// The keys this plugin reads; `init` refuses any other key (a typo must not be ignored).
pub const KNOWN_KEYS: &[&str] = &["fail-init"];

/// Refuses configured keys this plugin does not read, in the SDK's words
/// (`Config::check_keys`; `faulty` is written without the SDK).
pub fn check_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
    let unknown: Vec<String> = keys
        .into_iter()
        .filter(|key| !KNOWN_KEYS.contains(key))
        .map(|key| format!("`{key}`"))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let known: Vec<String> = KNOWN_KEYS.iter().map(|key| format!("`{key}`")).collect();
    Err(format!(
        "unknown config key{} {} (known keys: {})",
        if unknown.len() == 1 { "" } else { "s" },
        unknown.join(", "),
        known.join(", ")
    ))
}

/// What the event's `full-document` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Hand the event on unchanged.
    Pass,
    /// `"fail": true`: return `plugin-error::failed`.
    Fail,
    /// `"trap": true`: panic, which traps the instance.
    Trap,
    /// `"spin": true`: never return, until the host's deadline interrupts the instance.
    Spin,
    /// `"bomb": true`: allocate memory until the host's memory cap traps the instance.
    Bomb,
    /// `"huge": true`: return [`HUGE_COPIES`] copies of the event, past any sane output cap.
    Huge,
    /// `"escape": true`: publish to [`ESCAPE_SUBJECT`], outside every tenant's prefix.
    Escape,
    /// `"header_bomb": true`: the event with one header of [`HEADER_BOMB_BYTES`].
    HeaderBomb,
    /// `"header_flood": true`: the event with [`FLOOD_HEADERS`] headers of
    /// [`FLOOD_VALUE_BYTES`] each: under 1 MiB of names and values, over it on the wire.
    HeaderFlood,
    /// `"long_subject": "<prefix>"`: the event to `<prefix>.` followed by
    /// [`LONG_SUBJECT_BYTES`] letters (a valid subject under the prefix, but too long).
    LongSubject(String),
    /// `"reserved_header": true`: the event with a `Nats-Msg-Id` header of its own;
    /// `"reserved_header": "<name>"`: with a header of that name (e.g. `Tidegate-Key`).
    ReservedHeader(String),
    /// `"change_id": true`: the event with its id changed.
    ChangeId,
}

/// The value size of a `header_bomb` event's one header.
pub const HEADER_BOMB_BYTES: usize = 2 * 1024 * 1024;

/// How many headers a `header_flood` event gets.
pub const FLOOD_HEADERS: usize = 2500;

/// The value size of each `header_flood` header (names are `X-Flood-0000`…).
pub const FLOOD_VALUE_BYTES: usize = 406;

/// The letters a `long_subject` event's subject has after its prefix.
pub const LONG_SUBJECT_BYTES: usize = 8 * 1024;

/// How many outputs a `huge` event becomes.
pub const HUGE_COPIES: usize = 1_000;

/// Where an `escape` event tries to go.
pub const ESCAPE_SUBJECT: &str = "elsewhere.stolen";

/// Reads the flags from a relaxed-EJSON `full-document`. Only the JSON literal `true` counts;
/// when several flags are set, `fail` wins over `trap`, `trap` over `spin`, `spin` over `bomb`,
/// `bomb` over `huge`, `huge` over `escape`. Events without
/// a full document (deletes, DDL) and documents that are not objects pass.
pub fn action(full_document: Option<&[u8]>) -> Result<Action, String> {
    let Some(bytes) = full_document else {
        return Ok(Action::Pass);
    };
    let doc: Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("full-document is not valid JSON: {e}"))?;
    let flag = |name: &str| doc.get(name) == Some(&Value::Bool(true));
    Ok(if flag("fail") {
        Action::Fail
    } else if flag("trap") {
        Action::Trap
    } else if flag("spin") {
        Action::Spin
    } else if flag("bomb") {
        Action::Bomb
    } else if flag("huge") {
        Action::Huge
    } else if flag("escape") {
        Action::Escape
    } else if flag("header_bomb") {
        Action::HeaderBomb
    } else if flag("header_flood") {
        Action::HeaderFlood
    } else if let Some(Value::String(prefix)) = doc.get("long_subject") {
        Action::LongSubject(prefix.clone())
    } else if let Some(Value::String(name)) = doc.get("reserved_header") {
        Action::ReservedHeader(name.clone())
    } else if flag("reserved_header") {
        Action::ReservedHeader("Nats-Msg-Id".to_owned())
    } else if flag("change_id") {
        Action::ChangeId
    } else {
        Action::Pass
    })
}

/// Parses `fail-init` (`true` or `false`, default `false`): when true, `init` returns
/// `invalid-config`, to test that the host refuses to start.
pub fn parse_fail_init(value: Option<&str>) -> Result<bool, String> {
    match value.map(str::trim) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(format!("`fail-init` must be true or false, got {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused() {
        assert_eq!(check_keys(["fail-init"]), Ok(()));
        assert_eq!(
            check_keys(["fail-init", "fail-int"]),
            Err("unknown config key `fail-int` (known keys: `fail-init`)".to_owned())
        );
    }

    fn act(doc: &str) -> Result<Action, String> {
        action(Some(doc.as_bytes()))
    }

    #[test]
    fn flags() {
        assert_eq!(action(None), Ok(Action::Pass));
        assert_eq!(act(r#"{"_id": 1}"#), Ok(Action::Pass));
        assert_eq!(act(r#"{"fail": true}"#), Ok(Action::Fail));
        assert_eq!(act(r#"{"trap": true}"#), Ok(Action::Trap));
        assert_eq!(act(r#"{"spin": true}"#), Ok(Action::Spin));
        assert_eq!(
            act(r#"{"spin": true, "trap": true, "fail": true}"#),
            Ok(Action::Fail)
        );
        assert_eq!(act(r#"{"spin": true, "trap": true}"#), Ok(Action::Trap));
        assert_eq!(act(r#"{"bomb": true}"#), Ok(Action::Bomb));
        assert_eq!(act(r#"{"bomb": true, "spin": true}"#), Ok(Action::Spin));
        assert_eq!(act(r#"{"huge": true}"#), Ok(Action::Huge));
        assert_eq!(act(r#"{"escape": true}"#), Ok(Action::Escape));
        assert_eq!(act(r#"{"escape": true, "huge": true}"#), Ok(Action::Huge));
        assert_eq!(act(r#"{"header_bomb": true}"#), Ok(Action::HeaderBomb));
        assert_eq!(act(r#"{"header_flood": true}"#), Ok(Action::HeaderFlood));
        assert_eq!(
            act(r#"{"long_subject": "bad"}"#),
            Ok(Action::LongSubject("bad".into()))
        );
        assert_eq!(
            act(r#"{"reserved_header": true}"#),
            Ok(Action::ReservedHeader("Nats-Msg-Id".to_owned()))
        );
        assert_eq!(
            act(r#"{"reserved_header": "Tidegate-Key"}"#),
            Ok(Action::ReservedHeader("Tidegate-Key".to_owned()))
        );
        assert_eq!(act(r#"{"change_id": true}"#), Ok(Action::ChangeId));
    }

    #[test]
    fn only_literal_true_counts() {
        for doc in [
            r#"{"fail": "true"}"#,
            r#"{"fail": 1}"#,
            r#"{"fail": false}"#,
            r#"{"nested": {"fail": true}}"#,
            r#"[{"fail": true}]"#,
            r#""fail""#,
        ] {
            assert_eq!(act(doc), Ok(Action::Pass), "{doc}");
        }
    }

    #[test]
    fn bad_json() {
        assert!(act("{").unwrap_err().contains("not valid JSON"));
    }

    #[test]
    fn fail_init() {
        assert_eq!(parse_fail_init(None), Ok(false));
        assert_eq!(parse_fail_init(Some("false")), Ok(false));
        assert_eq!(parse_fail_init(Some("true")), Ok(true));
        assert!(parse_fail_init(Some("yes"))
            .unwrap_err()
            .starts_with("`fail-init`"));
    }
}
