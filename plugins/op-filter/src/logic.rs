//! The filter's configuration and decision, free of WIT bindings so it can be unit-tested
//! natively.

use std::collections::BTreeSet;

/// An event's operation, mirroring the WIT `operation` variant.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Insert,
    Update,
    Replace,
    Delete,
    Drop,
    Rename,
    DropDatabase,
    Invalidate,
    SnapshotRead,
    /// The server's `operationType`, verbatim (e.g. `createIndexes`).
    Other(String),
}

/// `operationType` values the server emits that the contract carries as `other(...)`. Knowing
/// them lets `init` refuse typos such as `insrt`, which would otherwise silently drop every event.
const KNOWN_OTHER: &[&str] = &[
    "create",
    "createIndexes",
    "dropIndexes",
    "modify",
    "shardCollection",
    "reshardCollection",
    "refineCollectionShardKey",
];

/// Parses one entry of the `operations` list.
///
/// Accepts the WIT names (`drop-database`, `snapshot-read`), the server's spellings of the same
/// operations (`dropDatabase`), the server's other `operationType`s listed in [`KNOWN_OTHER`],
/// and `other:<name>` for an `operationType` this plugin does not know yet.
pub fn parse_op(name: &str) -> Result<Op, String> {
    Ok(match name {
        "insert" => Op::Insert,
        "update" => Op::Update,
        "replace" => Op::Replace,
        "delete" => Op::Delete,
        "drop" => Op::Drop,
        "rename" => Op::Rename,
        "drop-database" | "dropDatabase" => Op::DropDatabase,
        "invalidate" => Op::Invalidate,
        "snapshot-read" => Op::SnapshotRead,
        other if KNOWN_OTHER.contains(&other) => Op::Other(other.to_owned()),
        other => match other.strip_prefix("other:") {
            Some(raw) if !raw.is_empty() && raw.chars().all(|c| c.is_ascii_alphanumeric()) => {
                Op::Other(raw.to_owned())
            }
            _ => {
                return Err(format!(
                    "unknown operation {other:?}; expected insert, update, replace, delete, \
                     drop, rename, drop-database, invalidate, snapshot-read, one of {}, or \
                     other:<operationType>",
                    KNOWN_OTHER.join(", ")
                ))
            }
        },
    })
}

/// One entry of the `namespaces` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NsPattern {
    /// `db.coll`: exactly that collection.
    Collection { db: String, coll: String },
    /// `db.*`: every collection of `db`, and database-wide events (`drop-database`,
    /// database-level `invalidate`) of `db`.
    Database(String),
}

impl NsPattern {
    /// Parses `db.coll` or `db.*`. The first dot separates the database from the collection,
    /// because database names cannot contain dots but collection names can (`system.views`).
    pub fn parse(s: &str) -> Result<NsPattern, String> {
        let bad = |why: &str| Err(format!("bad namespace pattern {s:?}: {why}"));
        let Some((db, coll)) = s.split_once('.') else {
            return bad("expected db.collection or db.*");
        };
        if db.is_empty() || coll.is_empty() {
            return bad("expected db.collection or db.*");
        }
        if db.contains('*') {
            return bad("the database part cannot be a wildcard");
        }
        if coll == "*" {
            return Ok(NsPattern::Database(db.to_owned()));
        }
        if coll.contains('*') {
            return bad("only a whole-collection wildcard (db.*) is supported");
        }
        Ok(NsPattern::Collection {
            db: db.to_owned(),
            coll: coll.to_owned(),
        })
    }

    pub fn matches(&self, db: &str, coll: Option<&str>) -> bool {
        match self {
            NsPattern::Database(d) => d == db,
            NsPattern::Collection { db: d, coll: c } => d == db && coll == Some(c.as_str()),
        }
    }
}

/// The parsed configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `None`: every operation passes.
    pub operations: Option<BTreeSet<Op>>,
    /// `None`: every namespace passes.
    pub namespaces: Option<Vec<NsPattern>>,
}

/// The keys this plugin reads; `init` warns about any other key (probably a typo).
pub const KNOWN_KEYS: &[&str] = &["operations", "namespaces"];

/// Splits a comma-separated list, trimming blanks around entries. An empty entry (`a,,b`, a
/// trailing comma, or an empty value) is an error: it is almost always a mistake.
pub fn split_list<'a>(key: &str, value: &'a str) -> Result<Vec<&'a str>, String> {
    value
        .split(',')
        .map(str::trim)
        .map(|item| {
            if item.is_empty() {
                Err(format!("`{key}` has an empty entry in {value:?}"))
            } else {
                Ok(item)
            }
        })
        .collect()
}

impl Config {
    /// Builds the configuration from the values of `operations` and `namespaces`.
    pub fn parse(operations: Option<&str>, namespaces: Option<&str>) -> Result<Config, String> {
        let operations = match operations {
            None => None,
            Some(v) => Some(
                split_list("operations", v)?
                    .into_iter()
                    .map(|name| parse_op(name).map_err(|e| format!("`operations`: {e}")))
                    .collect::<Result<BTreeSet<_>, _>>()?,
            ),
        };
        let namespaces = match namespaces {
            None => None,
            Some(v) => Some(
                split_list("namespaces", v)?
                    .into_iter()
                    .map(|p| NsPattern::parse(p).map_err(|e| format!("`namespaces`: {e}")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(Config {
            operations,
            namespaces,
        })
    }

    /// Whether an event with this operation and namespace goes on down the chain.
    pub fn keeps(&self, op: &Op, db: &str, coll: Option<&str>) -> bool {
        let op_ok = self.operations.as_ref().is_none_or(|ops| ops.contains(op));
        let ns_ok = self
            .namespaces
            .as_ref()
            .is_none_or(|pats| pats.iter().any(|p| p.matches(db, coll)));
        op_ok && ns_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_config_keeps_everything() {
        let c = Config::parse(None, None).unwrap();
        assert!(c.keeps(&Op::Insert, "a", Some("b")));
        assert!(c.keeps(&Op::Other("modify".into()), "a", None));
    }

    #[test]
    fn operations_list() {
        let c = Config::parse(Some("insert, update ,drop-database"), None).unwrap();
        assert!(c.keeps(&Op::Insert, "a", Some("b")));
        assert!(c.keeps(&Op::Update, "a", Some("b")));
        assert!(c.keeps(&Op::DropDatabase, "a", None));
        assert!(!c.keeps(&Op::Delete, "a", Some("b")));
        assert!(!c.keeps(&Op::Other("create".into()), "a", Some("b")));
    }

    #[test]
    fn server_spellings_and_other() {
        let c = Config::parse(Some("dropDatabase,createIndexes,other:futureThing"), None).unwrap();
        assert!(c.keeps(&Op::DropDatabase, "a", None));
        assert!(c.keeps(&Op::Other("createIndexes".into()), "a", Some("b")));
        assert!(c.keeps(&Op::Other("futureThing".into()), "a", Some("b")));
        assert!(!c.keeps(&Op::Other("dropIndexes".into()), "a", Some("b")));
    }

    #[test]
    fn bad_operations() {
        for bad in [
            "",
            "insert,",
            "insert,,update",
            " , ",
            "insrt",
            "other:",
            "other:a b",
            "INSERT",
        ] {
            let err = Config::parse(Some(bad), None).unwrap_err();
            assert!(err.starts_with("`operations`"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn namespace_patterns() {
        let c = Config::parse(None, Some("shop.orders, audit.*, app.system.views")).unwrap();
        assert!(c.keeps(&Op::Insert, "shop", Some("orders")));
        assert!(!c.keeps(&Op::Insert, "shop", Some("users")));
        assert!(!c.keeps(&Op::DropDatabase, "shop", None));
        assert!(c.keeps(&Op::Insert, "audit", Some("anything")));
        assert!(c.keeps(&Op::DropDatabase, "audit", None));
        assert!(c.keeps(&Op::Insert, "app", Some("system.views")));
        assert!(!c.keeps(&Op::Insert, "app", Some("system")));
        assert!(!c.keeps(&Op::Insert, "other", Some("orders")));
    }

    #[test]
    fn bad_namespaces() {
        for bad in [
            "",
            "shop",
            "shop.",
            ".orders",
            "*.orders",
            "shop.ord*",
            "a.b,,c.d",
        ] {
            let err = Config::parse(None, Some(bad)).unwrap_err();
            assert!(err.starts_with("`namespaces`"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn both_must_match() {
        let c = Config::parse(Some("insert"), Some("shop.*")).unwrap();
        assert!(c.keeps(&Op::Insert, "shop", Some("orders")));
        assert!(!c.keeps(&Op::Update, "shop", Some("orders")));
        assert!(!c.keeps(&Op::Insert, "other", Some("orders")));
    }
}
