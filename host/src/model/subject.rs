//! NATS subjects: the template a pipeline renders per event, and the grammar every
//! configured subject is checked against.

use super::{key, Change};

/// A parsed subject template (`{prefix}.{db}.{coll}.{operation}`), rendered per event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Db,
    Coll,
    Operation,
    Key,
}

impl SubjectTemplate {
    /// Parses `template`, substituting `prefix` for `{prefix}` once and for all. Placeholders:
    /// `{prefix}`, `{db}`, `{coll}`, `{operation}`, `{key}`; anything else in braces is an
    /// error.
    pub fn parse(template: &str, prefix: &str) -> Result<SubjectTemplate, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in '{template}'"))?;
            let part = match &rest[open + 1..open + close] {
                "prefix" => {
                    literal.push_str(prefix);
                    None
                }
                "db" => Some(Part::Db),
                "coll" => Some(Part::Coll),
                "operation" => Some(Part::Operation),
                "key" => Some(Part::Key),
                other => return Err(format!("unknown placeholder '{{{other}}}' in '{template}'")),
            };
            if let Some(part) = part {
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(part);
            }
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched '}}' in '{template}'"));
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(SubjectTemplate { parts })
    }

    /// The subject of `change`. Characters that would split or wildcard a subject token (`.`,
    /// `*`, `>`, whitespace) in database or collection names become `_`; `{key}` is the
    /// document key's injective token ([`key::subject_token`]), or
    /// [`key::NO_KEY_TOKEN`] for an event without one (or one that cannot be read).
    pub fn render(&self, change: &Change) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Db => push_token(&mut out, &change.namespace().db),
                Part::Coll => {
                    push_token(&mut out, change.namespace().coll.as_deref().unwrap_or(""))
                }
                Part::Operation => push_token(&mut out, change.operation().as_str()),
                Part::Key => out.push_str(
                    &key::key_id(change)
                        .and_then(|id| key::subject_token(id).ok())
                        .unwrap_or_else(|| key::NO_KEY_TOKEN.to_string()),
                ),
            }
        }
        out
    }
}

fn push_token(out: &mut String, name: &str) {
    if name.is_empty() {
        out.push('_');
        return;
    }
    out.extend(name.chars().map(|c| {
        if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
            '_'
        } else {
            c
        }
    }));
}

/// Whether `subject` is a literal NATS subject (or, with `wildcards`, a pattern).
pub fn is_valid_subject(subject: &str, wildcards: bool) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token.chars().all(|c| !c.is_whitespace() && !c.is_control())
                && (wildcards || (token != "*" && token != ">"))
                && (token.len() == 1 || !token.contains(['*', '>']))
        })
}

/// Whether literal `subject` lies under `prefix.` (and is not the prefix itself).
pub fn is_under_prefix(subject: &str, prefix: &str) -> bool {
    subject.len() > prefix.len() + 1
        && subject.starts_with(prefix)
        && subject.as_bytes()[prefix.len()] == b'.'
}

/// Whether subject pattern `pattern` matches every subject `target` (itself possibly a
/// pattern) matches.
pub fn subject_covers(pattern: &str, target: &str) -> bool {
    let mut p = pattern.split('.');
    let mut t = target.split('.');
    loop {
        match (p.next(), t.next()) {
            (Some(">"), Some(_)) => return true,
            (Some(_), Some(">")) => return false,
            (Some("*"), Some(tt)) if tt != ">" => continue,
            (Some(pp), Some(tt)) if pp == tt => continue,
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Fields, Namespace, Operation};

    fn change_in(coll: Option<&str>) -> Change {
        let namespace = Namespace {
            db: "shop".into(),
            coll: coll.map(String::from),
        };
        Change::from_fields(Fields::new("1", Operation::Insert, namespace), None).unwrap()
    }

    /// Dots in collection names must not create extra subject tokens.
    #[test]
    fn subject_escapes_dots() {
        let template = SubjectTemplate::parse("{prefix}.{db}.{coll}.{operation}", "cdc").unwrap();
        assert_eq!(
            template.render(&change_in(Some("orders.v2"))),
            "cdc.shop.orders_v2.insert"
        );
        assert_eq!(template.render(&change_in(None)), "cdc.shop._.insert");
    }

    /// `{key}` is the key's token, and `_` without a key.
    #[test]
    fn key_placeholder() {
        let template = SubjectTemplate::parse("{prefix}.{coll}.{key}", "cdc").unwrap();
        let keyed = |key: bson::RawDocumentBuf| {
            let namespace = Namespace {
                db: "shop".into(),
                coll: Some("orders".into()),
            };
            let fields = Fields {
                document_key: Some(std::borrow::Cow::Owned(key)),
                ..Fields::new("1", Operation::Update, namespace)
            };
            template.render(&Change::from_fields(fields, None).unwrap())
        };
        assert_eq!(keyed(bson::rawdoc! { "_id": "1" }), "cdc.orders.s:1");
        assert_eq!(keyed(bson::rawdoc! { "_id": 1 }), "cdc.orders.i:1");
        assert_eq!(keyed(bson::rawdoc! { "_id": "a.b" }), "cdc.orders.s:a%2Eb");
        assert_eq!(template.render(&change_in(Some("orders"))), "cdc.orders._");
    }

    /// Unknown or unbalanced placeholders are errors naming the template.
    #[test]
    fn bad_templates_are_refused() {
        assert!(SubjectTemplate::parse("{prefix}.{nope}", "p")
            .unwrap_err()
            .contains("{nope}"));
        assert!(SubjectTemplate::parse("{prefix}.{db", "p")
            .unwrap_err()
            .contains("unclosed"));
        assert!(SubjectTemplate::parse("{prefix}.db}", "p")
            .unwrap_err()
            .contains("unmatched"));
    }

    /// Patterns cover what they match, literal or pattern.
    #[test]
    fn patterns_cover_subjects() {
        assert!(subject_covers("cdc.>", "cdc.shop.orders"));
        assert!(subject_covers("cdc.*.orders", "cdc.shop.orders"));
        assert!(!subject_covers("cdc.*", "cdc.shop.orders"));
        assert!(!subject_covers("cdc.shop.orders", "cdc.>"));
        assert!(is_under_prefix("cdc.x", "cdc") && !is_under_prefix("cdc", "cdc"));
        assert!(is_valid_subject("a.*", true) && !is_valid_subject("a.*", false));
    }
}
