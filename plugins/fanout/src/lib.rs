//! `fanout`: a tidegate `transform` test and demo plugin that publishes every event several
//! times. It exercises the host's handling of transforms that return many outputs (ordering,
//! per-output subjects and headers, message ids of the copies) or none at all.
//!
//! Config keys (all optional):
//! - `copies`: how many outputs per event, 0 to 1000 (default 2). `0` drops every event.
//! - `subject-prefix`: when set, copy `i` is published on `<subject-prefix>.copy<i>`; otherwise
//!   every copy goes to the pipeline's usual subject.
//!
//! Every copy is the unchanged event with a header `X-Copy` holding its 0-based index.

use tidegate_plugin::{Config, ConfigKeys, Error, Event, Output, Transform};

/// Copies per event when `copies` is not set.
pub const DEFAULT_COPIES: u32 = 2;

/// Upper bound on `copies`: a typo such as `copies = "1000000"` should fail at start-up, not
/// exhaust the instance's memory on the first event.
pub const MAX_COPIES: u32 = 1000;

/// The keys this plugin reads; `init` refuses any other key (a typo must not be ignored).
pub const KNOWN_KEYS: &[&str] = &["copies", "subject-prefix"];

/// The parsed configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fanout {
    pub copies: u32,
    pub subject_prefix: Option<String>,
}

impl Fanout {
    /// The subject of copy `index`: `<subject-prefix>.copy<index>`, or `None` (the pipeline's
    /// own subject) when no prefix is configured.
    pub fn subject(&self, index: u32) -> Option<String> {
        self.subject_prefix
            .as_ref()
            .map(|p| format!("{p}.copy{index}"))
    }
}

impl Transform for Fanout {
    const CONFIG_KEYS: ConfigKeys = ConfigKeys::Only(KNOWN_KEYS);

    fn init(config: &Config) -> Result<Self, Error> {
        let copies = match config.get("copies").map(str::trim) {
            None => DEFAULT_COPIES,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n <= MAX_COPIES => n,
                _ => {
                    return Err(Error::invalid_config(format!(
                        "`copies` must be an integer from 0 to {MAX_COPIES}, got {v:?}"
                    )))
                }
            },
        };
        let subject_prefix = match config.get("subject-prefix") {
            None => None,
            Some(p) => {
                check_subject_prefix(p)?;
                Some(p.to_owned())
            }
        };
        Ok(Fanout {
            copies,
            subject_prefix,
        })
    }

    fn transform(&self, event: Event) -> Result<Vec<Output>, Error> {
        Ok((0..self.copies)
            .map(|i| {
                let out = Output::new(event.clone()).header("X-Copy", i.to_string());
                match self.subject(i) {
                    Some(subject) => out.subject(subject),
                    None => out,
                }
            })
            .collect())
    }
}

tidegate_plugin::transform!(Fanout);

/// A prefix must be a valid NATS publish subject: dot-separated non-empty tokens without
/// blanks or wildcards. (Whether it lies under the pipeline's prefix is checked by the host.)
fn check_subject_prefix(p: &str) -> Result<(), Error> {
    let ok = !p.is_empty()
        && p.split('.').all(|token| {
            !token.is_empty()
                && !token
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_config(format!(
            "`subject-prefix` must be a NATS subject (dot-separated tokens, no blanks or \
             wildcards), got {p:?}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(copies: Option<&str>, prefix: Option<&str>) -> Result<Fanout, String> {
        let mut pairs = Vec::new();
        if let Some(c) = copies {
            pairs.push(("copies", c));
        }
        if let Some(p) = prefix {
            pairs.push(("subject-prefix", p));
        }
        Fanout::init_checked(&Config::from_pairs(pairs)).map_err(|e| e.message().to_owned())
    }

    #[test]
    fn defaults() {
        let c = parse(None, None).unwrap();
        assert_eq!(
            c,
            Fanout {
                copies: 2,
                subject_prefix: None
            }
        );
        assert_eq!(c.subject(1), None);
    }

    #[test]
    fn copies() {
        assert_eq!(parse(Some("0"), None).unwrap().copies, 0);
        assert_eq!(parse(Some(" 5 "), None).unwrap().copies, 5);
        assert_eq!(parse(Some("1000"), None).unwrap().copies, 1000);
        for bad in ["", "-1", "two", "1.5", "1001", "99999999999"] {
            let err = parse(Some(bad), None).unwrap_err();
            assert!(err.starts_with("`copies`"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn subjects() {
        let c = parse(Some("3"), Some("cdc.shop")).unwrap();
        assert_eq!(c.subject(0).as_deref(), Some("cdc.shop.copy0"));
        assert_eq!(c.subject(2).as_deref(), Some("cdc.shop.copy2"));
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a\r\n"] {
            let err = parse(None, Some(bad)).unwrap_err();
            assert!(err.starts_with("`subject-prefix`"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn copies_carry_index_header_and_subject() {
        let f = parse(Some("2"), Some("cdc.c")).unwrap();
        let out = f
            .transform(Event::insert("a", "b", serde_json::json!({"_id": 1})))
            .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].subject.as_deref(), Some("cdc.c.copy1"));
        assert_eq!(out[1].headers[0].value, "1");
        assert_eq!(out[0].event, out[1].event);
    }
}
