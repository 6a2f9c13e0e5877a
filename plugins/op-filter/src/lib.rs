//! `op-filter`: a tidegate `filter` plugin that keeps only the events whose operation and
//! namespace are listed in its configuration.
//!
//! Config keys (all optional):
//! - `operations`: comma-separated operations to keep, e.g. `insert,update,replace`. Names are
//!   the WIT ones (`drop-database`, `snapshot-read`, …), the server's other `operationType`s
//!   (`createIndexes`, …), or `other:<operationType>` for one this plugin does not know.
//!   Absent: every operation is kept.
//! - `namespaces`: comma-separated `db.coll` or `db.*` patterns. Absent: every namespace is kept.
//!
//! Filtering in a plugin rather than in the change stream's `$match` lets one watch feed
//! pipelines that each keep a different slice. (The `match` plugin does this and more, from a
//! query; `op-filter` stays for its two-key simplicity.)

use std::collections::BTreeSet;

use tidegate_plugin::{Config, ConfigKeys, Error, Event, Filter, NamespacePattern, Operation};

/// The keys this plugin reads; `init` refuses any other key (a typo must not be ignored).
pub const KNOWN_KEYS: &[&str] = &["operations", "namespaces"];

/// The parsed configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpFilter {
    /// `None`: every operation passes.
    pub operations: Option<BTreeSet<Operation>>,
    /// `None`: every namespace passes.
    pub namespaces: Option<Vec<NamespacePattern>>,
}

/// Prefixes an error with the key it came from.
fn in_key(key: &str) -> impl Fn(Error) -> Error + '_ {
    move |e| Error::invalid_config(format!("`{key}`: {}", e.message()))
}

impl OpFilter {
    /// Whether an event with this operation and namespace goes on down the chain.
    pub fn keeps(&self, op: &Operation, db: &str, coll: Option<&str>) -> bool {
        let op_ok = self.operations.as_ref().is_none_or(|ops| ops.contains(op));
        let ns_ok = self
            .namespaces
            .as_ref()
            .is_none_or(|pats| pats.iter().any(|p| p.matches(db, coll)));
        op_ok && ns_ok
    }
}

impl Filter for OpFilter {
    const CONFIG_KEYS: ConfigKeys = ConfigKeys::Only(KNOWN_KEYS);

    fn init(config: &Config) -> Result<Self, Error> {
        let operations = match config.list("operations")? {
            None => None,
            Some(names) => Some(
                names
                    .iter()
                    .map(|n| Operation::parse(n).map_err(in_key("operations")))
                    .collect::<Result<BTreeSet<_>, _>>()?,
            ),
        };
        let namespaces = match config.list("namespaces")? {
            None => None,
            Some(patterns) => Some(
                patterns
                    .iter()
                    .map(|p| NamespacePattern::parse(p).map_err(in_key("namespaces")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(OpFilter {
            operations,
            namespaces,
        })
    }

    fn filter(&self, event: &Event) -> Result<bool, Error> {
        let ns = &event.namespace;
        Ok(self.keeps(&event.operation, &ns.db, ns.coll.as_deref()))
    }
}

tidegate_plugin::filter!(OpFilter);

#[cfg(test)]
mod tests {
    use super::*;
    use tidegate_plugin::Operation as Op;

    fn parse(ops: Option<&str>, nss: Option<&str>) -> Result<OpFilter, String> {
        let mut pairs = Vec::new();
        if let Some(o) = ops {
            pairs.push(("operations", o));
        }
        if let Some(n) = nss {
            pairs.push(("namespaces", n));
        }
        OpFilter::init_checked(&Config::from_pairs(pairs)).map_err(|e| e.message().to_owned())
    }

    #[test]
    fn no_config_keeps_everything() {
        let c = parse(None, None).unwrap();
        assert!(c.keeps(&Op::Insert, "a", Some("b")));
        assert!(c.keeps(&Op::Other("modify".into()), "a", None));
    }

    #[test]
    fn operations_list() {
        let c = parse(Some("insert, update ,drop-database"), None).unwrap();
        assert!(c.keeps(&Op::Insert, "a", Some("b")));
        assert!(c.keeps(&Op::Update, "a", Some("b")));
        assert!(c.keeps(&Op::DropDatabase, "a", None));
        assert!(!c.keeps(&Op::Delete, "a", Some("b")));
        assert!(!c.keeps(&Op::Other("create".into()), "a", Some("b")));
    }

    #[test]
    fn server_spellings_and_other() {
        let c = parse(Some("dropDatabase,createIndexes,other:futureThing"), None).unwrap();
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
            let err = parse(Some(bad), None).unwrap_err();
            assert!(err.starts_with("`operations`"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn namespace_patterns() {
        let c = parse(None, Some("shop.orders, audit.*, app.system.views")).unwrap();
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
            let err = parse(None, Some(bad)).unwrap_err();
            assert!(err.starts_with("`namespaces`"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn both_must_match() {
        let c = parse(Some("insert"), Some("shop.*")).unwrap();
        assert!(c.keeps(&Op::Insert, "shop", Some("orders")));
        assert!(!c.keeps(&Op::Update, "shop", Some("orders")));
        assert!(!c.keeps(&Op::Insert, "other", Some("orders")));
    }

    /// Through the trait, as the host would call it: an unknown key (`operation=` for
    /// `operations=`, which would keep deletes) fails `init`, naming it and the known keys.
    #[test]
    fn filter_events_and_refuse_unknown_keys() {
        let err = OpFilter::init_checked(&Config::from_pairs([("operation", "insert")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`operation`"), "{err}");
        assert!(
            err.contains("known keys: `operations`, `namespaces`"),
            "{err}"
        );
        let f = OpFilter::init_checked(&Config::from_pairs([("operations", "insert")])).unwrap();
        let insert = Event::insert("shop", "orders", serde_json::json!({"_id": 1}));
        assert!(f.filter(&insert).unwrap());
        assert!(!f
            .filter(&Event::delete("shop", "orders", serde_json::json!(1)))
            .unwrap());
    }
}
