//! `match`: a tidegate `filter` plugin that keeps the events matching a declarative query, so
//! most pipelines never need code to filter.
//!
//! Config keys (at least one):
//! - `operations`: comma-separated operations to keep (as in `op-filter`).
//! - `namespaces`: comma-separated `db.coll` / `db.*` patterns to keep (as in `op-filter`).
//! - `where`: a MongoDB query, as JSON, over the event in its published (change-stream) shape:
//!   `{"fullDocument.total": {"$gte": 100}, "$or": [{"fullDocument.status": "paid"},
//!   {"fullDocument.tags": "vip"}]}`. See [`query`] for the operators.
//!
//! An event is kept when it matches all the keys given. A field missing from the event (a
//! delete has no `fullDocument`) simply does not match, as in MongoDB: use `$exists` or an
//! `$or` with `operationType` to keep such events.

pub mod query;

use std::collections::BTreeSet;

use tidegate_plugin::{Config, ConfigKeys, Error, Event, Filter, NamespacePattern, Operation};

use crate::query::Query;

/// The keys this plugin reads; `init` refuses any other key (a typo must not be ignored).
pub const KNOWN_KEYS: &[&str] = &["operations", "namespaces", "where"];

/// The parsed configuration.
#[derive(Debug)]
pub struct Match {
    operations: Option<BTreeSet<Operation>>,
    namespaces: Option<Vec<NamespacePattern>>,
    query: Option<Query>,
}

/// Prefixes an error with the key it came from.
fn in_key(key: &str) -> impl Fn(Error) -> Error + '_ {
    move |e| Error::invalid_config(format!("`{key}`: {}", e.message()))
}

impl Filter for Match {
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
        let query = match config.json("where")? {
            None => None,
            Some(value) => Some(Query::parse(&value).map_err(in_key("where"))?),
        };
        if operations.is_none() && namespaces.is_none() && query.is_none() {
            return Err(Error::invalid_config(
                "set at least one of `operations`, `namespaces`, `where` (without them every \
                 event would pass, which is probably not what you meant)",
            ));
        }
        Ok(Match {
            operations,
            namespaces,
            query,
        })
    }

    fn filter(&self, event: &Event) -> Result<bool, Error> {
        if let Some(ops) = &self.operations {
            if !ops.contains(&event.operation) {
                return Ok(false);
            }
        }
        if let Some(patterns) = &self.namespaces {
            let ns = &event.namespace;
            if !patterns
                .iter()
                .any(|p| p.matches(&ns.db, ns.coll.as_deref()))
            {
                return Ok(false);
            }
        }
        match &self.query {
            Some(q) => q.matches(event),
            None => Ok(true),
        }
    }
}

tidegate_plugin::filter!(Match);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugin(pairs: &[(&str, &str)]) -> Result<Match, Error> {
        Match::init_checked(&Config::from_pairs(pairs.iter().copied()))
    }

    #[test]
    fn needs_some_config() {
        assert!(plugin(&[]).is_err());
        let err = plugin(&[("where", "{")]).unwrap_err();
        assert!(err.message().starts_with("`where`"), "{err}");
        let err = plugin(&[("operations", "insrt")]).unwrap_err();
        assert!(err.message().starts_with("`operations`"), "{err}");
    }

    #[test]
    fn all_keys_must_match() {
        let m = plugin(&[
            ("operations", "insert,update"),
            ("namespaces", "shop.*"),
            ("where", r#"{"fullDocument.total": {"$gt": 10}}"#),
        ])
        .unwrap();
        let big = Event::insert("shop", "orders", json!({"_id": 1, "total": 11}));
        let small = Event::insert("shop", "orders", json!({"_id": 2, "total": 10}));
        let elsewhere = Event::insert("audit", "orders", json!({"_id": 3, "total": 99}));
        let delete = Event::delete("shop", "orders", json!(1));
        assert!(m.filter(&big).unwrap());
        assert!(!m.filter(&small).unwrap());
        assert!(!m.filter(&elsewhere).unwrap());
        assert!(!m.filter(&delete).unwrap());
    }

    #[test]
    fn deletes_kept_with_an_or() {
        let m = plugin(&[(
            "where",
            r#"{"$or": [{"operationType": "delete"}, {"fullDocument.vip": true}]}"#,
        )])
        .unwrap();
        assert!(m.filter(&Event::delete("a", "b", json!(1))).unwrap());
        assert!(m
            .filter(&Event::insert("a", "b", json!({"vip": true})))
            .unwrap());
        assert!(!m.filter(&Event::insert("a", "b", json!({}))).unwrap());
    }
}
