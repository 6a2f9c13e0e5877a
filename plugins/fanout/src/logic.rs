//! Parsing the configuration and naming each copy, free of WIT bindings so it can be
//! unit-tested natively.

/// Copies per event when `copies` is not set.
pub const DEFAULT_COPIES: u32 = 2;

/// Upper bound on `copies`: a typo such as `copies = "1000000"` should fail at start-up, not
/// exhaust the instance's memory on the first event.
pub const MAX_COPIES: u32 = 1000;

/// The keys this plugin reads; `init` warns about any other key (probably a typo).
pub const KNOWN_KEYS: &[&str] = &["copies", "subject-prefix"];

/// The parsed configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub copies: u32,
    pub subject_prefix: Option<String>,
}

impl Config {
    pub fn parse(copies: Option<&str>, subject_prefix: Option<&str>) -> Result<Config, String> {
        let copies = match copies.map(str::trim) {
            None => DEFAULT_COPIES,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n <= MAX_COPIES => n,
                _ => {
                    return Err(format!(
                        "`copies` must be an integer from 0 to {MAX_COPIES}, got {v:?}"
                    ))
                }
            },
        };
        let subject_prefix = match subject_prefix {
            None => None,
            Some(p) => {
                check_subject_prefix(p)?;
                Some(p.to_owned())
            }
        };
        Ok(Config {
            copies,
            subject_prefix,
        })
    }

    /// The subject of copy `index`: `<subject-prefix>.copy<index>`, or `None` (the pipeline's
    /// own subject) when no prefix is configured.
    pub fn subject(&self, index: u32) -> Option<String> {
        self.subject_prefix
            .as_ref()
            .map(|p| format!("{p}.copy{index}"))
    }
}

/// A prefix must be a valid NATS publish subject: dot-separated non-empty tokens without
/// blanks or wildcards. (Whether it lies under the pipeline's prefix is checked by the host.)
fn check_subject_prefix(p: &str) -> Result<(), String> {
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
        Err(format!(
            "`subject-prefix` must be a NATS subject (dot-separated tokens, no blanks or \
             wildcards), got {p:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::parse(None, None).unwrap();
        assert_eq!(
            c,
            Config {
                copies: 2,
                subject_prefix: None
            }
        );
        assert_eq!(c.subject(1), None);
    }

    #[test]
    fn copies() {
        assert_eq!(Config::parse(Some("0"), None).unwrap().copies, 0);
        assert_eq!(Config::parse(Some(" 5 "), None).unwrap().copies, 5);
        assert_eq!(Config::parse(Some("1000"), None).unwrap().copies, 1000);
        for bad in ["", "-1", "two", "1.5", "1001", "99999999999"] {
            let err = Config::parse(Some(bad), None).unwrap_err();
            assert!(err.starts_with("`copies`"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn subjects() {
        let c = Config::parse(Some("3"), Some("cdc.shop")).unwrap();
        assert_eq!(c.subject(0).as_deref(), Some("cdc.shop.copy0"));
        assert_eq!(c.subject(2).as_deref(), Some("cdc.shop.copy2"));
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a\r\n"] {
            let err = Config::parse(None, Some(bad)).unwrap_err();
            assert!(err.starts_with("`subject-prefix`"), "{bad:?}: {err}");
        }
    }
}
