//! The `where` query: a subset of MongoDB's query language, evaluated against the event in its
//! published shape.
//!
//! Paths start with a part of the change-stream event: `operationType`, `ns.db`, `ns.coll`,
//! `to.db`, `to.coll`, `documentKey.…`, `fullDocument.…`, `fullDocumentBeforeChange.…`,
//! `updateDescription.updatedFields.<key>`, `updateDescription.removedFields`, `wallTime`,
//! `txnNumber`, `id`. Within documents, paths are dotted, a numeric segment indexes an array,
//! and a path through an array of objects reaches every element (`lines.sku`).
//!
//! | form | matches when |
//! | --- | --- |
//! | `{"path": value}` | the value at `path` equals `value`, or is an array containing it |
//! | `{"path": {"$eq": v}}`, `$ne` | equal / not equal (`$ne` also matches a missing field) |
//! | `$gt`, `$gte`, `$lt`, `$lte` | ordered comparison of numbers, strings, dates (`{"$date": "2024-01-01T00:00:00Z"}`) or booleans; values of different kinds never match |
//! | `$in`, `$nin` | equal to one of / none of a list |
//! | `$exists: true/false` | the path reaches a value / does not |
//! | `$regex: "…"` (+ `"$options": "i"`) | a string matches the regular expression |
//! | `$prefix: "…"` | a string starts with the prefix (tidegate's addition) |
//! | `{"path": {"$not": {…}}}` | the operators inside do not match |
//! | `{"$and": [q, …]}`, `$or`, `$nor` | all / any / none of the queries match |
//! | `{"$not": q}` | the query does not match (tidegate's addition) |
//!
//! Several fields (or operators) in one object must all match. Numbers compare by value across
//! EJSON wrappers (`{"$numberLong": "5"}` equals `5`); other EJSON values (`{"$oid": …}`)
//! compare as written.

use std::cmp::Ordering;

use regex_lite::Regex;
use serde_json::{Map, Value};
use tidegate_plugin::document::{as_f64, date_millis};
use tidegate_plugin::{Error, Event};

/// The first path segments the event has.
const ROOTS: &[&str] = &[
    "id",
    "operationType",
    "ns",
    "to",
    "documentKey",
    "fullDocument",
    "fullDocumentBeforeChange",
    "updateDescription",
    "wallTime",
    "txnNumber",
];

/// A parsed query.
#[derive(Debug)]
pub enum Query {
    /// Every part matches.
    And(Vec<Query>),
    /// At least one part matches.
    Or(Vec<Query>),
    /// No part matches.
    Nor(Vec<Query>),
    /// The inner query does not match.
    Not(Box<Query>),
    /// Conditions on the values at one path.
    Field(String, Vec<Cond>),
}

/// One condition on a field.
#[derive(Debug)]
pub enum Cond {
    /// Equal (or an array containing it).
    Eq(Value),
    /// Not [`Cond::Eq`].
    Ne(Value),
    /// Ordered comparison; true when the ordering is one of the listed ones.
    Cmp(Value, &'static [Ordering]),
    /// Equal to one of.
    In(Vec<Value>),
    /// Equal to none of.
    Nin(Vec<Value>),
    /// Present or absent.
    Exists(bool),
    /// A string matching the expression.
    Regex(Regex),
    /// A string with this prefix.
    Prefix(String),
    /// None of the inner conditions hold together.
    Not(Vec<Cond>),
}

fn bad(message: impl Into<String>) -> Error {
    Error::invalid_config(message.into())
}

impl Query {
    /// Parses a query object.
    pub fn parse(value: &Value) -> Result<Query, Error> {
        let Value::Object(map) = value else {
            return Err(bad("a query must be a JSON object"));
        };
        let mut parts = Vec::new();
        for (key, v) in map {
            parts.push(match key.as_str() {
                "$and" | "$or" | "$nor" => {
                    let Value::Array(items) = v else {
                        return Err(bad(format!("{key} takes an array of queries")));
                    };
                    if items.is_empty() {
                        return Err(bad(format!("{key} needs at least one query")));
                    }
                    let qs = items.iter().map(Query::parse).collect::<Result<_, _>>()?;
                    match key.as_str() {
                        "$and" => Query::And(qs),
                        "$or" => Query::Or(qs),
                        _ => Query::Nor(qs),
                    }
                }
                "$not" => Query::Not(Box::new(Query::parse(v)?)),
                op if op.starts_with('$') => {
                    return Err(bad(format!(
                        "unknown top-level operator {op} (use $and, $or, $nor, $not)"
                    )))
                }
                path => {
                    let root = path.split('.').next().unwrap_or_default();
                    if !ROOTS.contains(&root) {
                        return Err(bad(format!(
                            "path {path:?} must start with one of {} (e.g. fullDocument.{path})",
                            ROOTS.join(", ")
                        )));
                    }
                    Query::Field(path.to_owned(), parse_conds(v)?)
                }
            });
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Query::And(parts)
        })
    }

    /// Whether `event` matches.
    pub fn matches(&self, event: &Event) -> Result<bool, Error> {
        Ok(match self {
            Query::And(qs) => {
                for q in qs {
                    if !q.matches(event)? {
                        return Ok(false);
                    }
                }
                true
            }
            Query::Or(qs) => {
                for q in qs {
                    if q.matches(event)? {
                        return Ok(true);
                    }
                }
                false
            }
            Query::Nor(qs) => {
                for q in qs {
                    if q.matches(event)? {
                        return Ok(false);
                    }
                }
                true
            }
            Query::Not(q) => !q.matches(event)?,
            Query::Field(path, conds) => {
                let found = event.lookup(path)?;
                let values: Vec<&Value> = found.iter().map(|v| v.as_ref()).collect();
                conds.iter().all(|c| c.holds(&values))
            }
        })
    }
}

/// Whether an object is an operator object (`{"$gt": 1}`) rather than a literal (`{"a": 1}`,
/// or an EJSON value such as `{"$oid": "…"}`).
fn is_operator_object(map: &Map<String, Value>) -> bool {
    map.keys().next().is_some_and(|k| {
        matches!(
            k.as_str(),
            "$eq"
                | "$ne"
                | "$gt"
                | "$gte"
                | "$lt"
                | "$lte"
                | "$in"
                | "$nin"
                | "$exists"
                | "$regex"
                | "$options"
                | "$prefix"
                | "$not"
        )
    })
}

fn parse_conds(value: &Value) -> Result<Vec<Cond>, Error> {
    let Value::Object(map) = value else {
        return Ok(vec![Cond::Eq(value.clone())]);
    };
    if !is_operator_object(map) {
        return Ok(vec![Cond::Eq(value.clone())]);
    }
    let list = |op: &str, v: &Value| -> Result<Vec<Value>, Error> {
        match v {
            Value::Array(items) => Ok(items.clone()),
            _ => Err(bad(format!("{op} takes an array"))),
        }
    };
    let mut conds = Vec::new();
    for (op, v) in map {
        conds.push(match op.as_str() {
            "$eq" => Cond::Eq(v.clone()),
            "$ne" => Cond::Ne(v.clone()),
            "$gt" => Cond::Cmp(v.clone(), &[Ordering::Greater]),
            "$gte" => Cond::Cmp(v.clone(), &[Ordering::Greater, Ordering::Equal]),
            "$lt" => Cond::Cmp(v.clone(), &[Ordering::Less]),
            "$lte" => Cond::Cmp(v.clone(), &[Ordering::Less, Ordering::Equal]),
            "$in" => Cond::In(list(op, v)?),
            "$nin" => Cond::Nin(list(op, v)?),
            "$exists" => match v {
                Value::Bool(b) => Cond::Exists(*b),
                _ => return Err(bad("$exists takes true or false")),
            },
            "$regex" => {
                let Value::String(pattern) = v else {
                    return Err(bad("$regex takes a string"));
                };
                let options = match map.get("$options") {
                    None => "",
                    Some(Value::String(o)) if o.chars().all(|c| "imsx".contains(c)) => o,
                    Some(_) => return Err(bad("$options takes a string of i, m, s, x")),
                };
                let pattern = if options.is_empty() {
                    pattern.clone()
                } else {
                    format!("(?{options}){pattern}")
                };
                Cond::Regex(Regex::new(&pattern).map_err(|e| bad(format!("bad $regex: {e}")))?)
            }
            "$options" if map.contains_key("$regex") => continue,
            "$prefix" => match v {
                Value::String(p) => Cond::Prefix(p.clone()),
                _ => return Err(bad("$prefix takes a string")),
            },
            "$not" => match v {
                Value::Object(inner) if is_operator_object(inner) => Cond::Not(parse_conds(v)?),
                _ => return Err(bad("$not takes an operator object, e.g. {\"$gt\": 5}")),
            },
            other => {
                return Err(bad(format!(
                    "unknown operator {other} (or mixed operators and fields in one object)"
                )))
            }
        });
    }
    Ok(conds)
}

impl Cond {
    /// Whether the condition holds for the values a path reached (empty: missing).
    fn holds(&self, values: &[&Value]) -> bool {
        // MongoDB's array rule: a condition matches an array if it matches the array itself
        // or any of its elements.
        let any = |f: &dyn Fn(&Value) -> bool| {
            values
                .iter()
                .any(|v| f(v) || matches!(v, Value::Array(items) if items.iter().any(f)))
        };
        match self {
            Cond::Eq(x) => any(&|v| equal(v, x)),
            Cond::Ne(x) => !any(&|v| equal(v, x)),
            Cond::Cmp(x, orderings) => {
                any(&|v| compare(v, x).is_some_and(|o| orderings.contains(&o)))
            }
            Cond::In(xs) => any(&|v| xs.iter().any(|x| equal(v, x))),
            Cond::Nin(xs) => !any(&|v| xs.iter().any(|x| equal(v, x))),
            Cond::Exists(want) => values.is_empty() != *want,
            Cond::Regex(re) => any(&|v| v.as_str().is_some_and(|s| re.is_match(s))),
            Cond::Prefix(p) => any(&|v| v.as_str().is_some_and(|s| s.starts_with(p.as_str()))),
            Cond::Not(inner) => !inner.iter().all(|c| c.holds(values)),
        }
    }
}

/// A value reduced to what comparisons need.
enum Scalar<'a> {
    Num(f64),
    Str(&'a str),
    Date(i64),
    Bool(bool),
}

fn scalar(v: &Value) -> Option<Scalar<'_>> {
    match v {
        Value::String(s) => Some(Scalar::Str(s)),
        Value::Bool(b) => Some(Scalar::Bool(*b)),
        Value::Object(map) if map.len() == 1 && map.contains_key("$date") => {
            date_millis(&map["$date"]).map(Scalar::Date)
        }
        other => as_f64(other).map(Scalar::Num),
    }
}

fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (scalar(a)?, scalar(b)?) {
        (Scalar::Num(x), Scalar::Num(y)) => x.partial_cmp(&y),
        (Scalar::Str(x), Scalar::Str(y)) => Some(x.cmp(y)),
        (Scalar::Date(x), Scalar::Date(y)) => Some(x.cmp(&y)),
        (Scalar::Bool(x), Scalar::Bool(y)) => Some(x.cmp(&y)),
        _ => None,
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    a == b || compare(a, b) == Some(Ordering::Equal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(query: Value) -> Query {
        Query::parse(&query).unwrap()
    }

    fn order(doc: Value) -> Event {
        Event::insert("shop", "orders", doc)
    }

    #[test]
    fn equality_and_arrays() {
        let e = order(json!({"status": "paid", "tags": ["vip", "eu"], "n": {"$numberLong": "5"}}));
        assert!(q(json!({"fullDocument.status": "paid"}))
            .matches(&e)
            .unwrap());
        assert!(!q(json!({"fullDocument.status": "open"}))
            .matches(&e)
            .unwrap());
        assert!(q(json!({"fullDocument.tags": "vip"})).matches(&e).unwrap());
        assert!(q(json!({"fullDocument.tags": ["vip", "eu"]}))
            .matches(&e)
            .unwrap());
        assert!(q(json!({"fullDocument.n": 5})).matches(&e).unwrap());
        assert!(q(json!({"fullDocument.status": {"$ne": "open"}}))
            .matches(&e)
            .unwrap());
        assert!(q(json!({"fullDocument.missing": {"$ne": 1}}))
            .matches(&e)
            .unwrap());
        assert!(!q(json!({"fullDocument.tags": {"$ne": "eu"}}))
            .matches(&e)
            .unwrap());
    }

    #[test]
    fn comparisons() {
        let e =
            order(json!({"total": 12.5, "name": "m", "at": {"$date": "2024-05-01T10:00:00.5Z"}}));
        assert!(q(json!({"fullDocument.total": {"$gt": 12, "$lte": 12.5}}))
            .matches(&e)
            .unwrap());
        assert!(!q(json!({"fullDocument.total": {"$lt": 12.5}}))
            .matches(&e)
            .unwrap());
        assert!(
            !q(json!({"fullDocument.total": {"$gt": "1"}}))
                .matches(&e)
                .unwrap(),
            "kinds differ"
        );
        assert!(q(json!({"fullDocument.name": {"$gte": "a", "$lt": "n"}}))
            .matches(&e)
            .unwrap());
        let after = json!({"fullDocument.at": {"$gt": {"$date": "2024-05-01T10:00:00Z"}}});
        assert!(q(after).matches(&e).unwrap(), "fractions order correctly");
        let before = json!({"fullDocument.at": {"$lt": {"$date": "2024-05-01T10:30:00+01:00"}}});
        assert!(!q(before).matches(&e).unwrap(), "offsets count");
    }

    #[test]
    fn sets_exists_regex_prefix() {
        let e = order(
            json!({"status": "paid", "email": "Ada@Example.com", "lines": [{"sku": "a-1"}, {"sku": "b-2"}]}),
        );
        assert!(q(json!({"fullDocument.status": {"$in": ["paid", "sent"]}}))
            .matches(&e)
            .unwrap());
        assert!(q(json!({"fullDocument.status": {"$nin": ["open"]}}))
            .matches(&e)
            .unwrap());
        assert!(q(json!({"fullDocument.email": {"$exists": true}}))
            .matches(&e)
            .unwrap());
        assert!(q(json!({"fullDocument.phone": {"$exists": false}}))
            .matches(&e)
            .unwrap());
        assert!(
            q(json!({"fullDocument.email": {"$regex": "@example\\.com$", "$options": "i"}}))
                .matches(&e)
                .unwrap()
        );
        assert!(
            !q(json!({"fullDocument.email": {"$regex": "@example\\.com$"}}))
                .matches(&e)
                .unwrap()
        );
        assert!(q(json!({"fullDocument.lines.sku": {"$prefix": "b-"}}))
            .matches(&e)
            .unwrap());
        assert!(
            q(json!({"fullDocument.lines.sku": {"$not": {"$prefix": "c-"}}}))
                .matches(&e)
                .unwrap()
        );
    }

    #[test]
    fn logic() {
        let e = order(json!({"a": 1, "b": 2}));
        assert!(q(json!({"fullDocument.a": 1, "fullDocument.b": 2}))
            .matches(&e)
            .unwrap());
        assert!(!q(json!({"fullDocument.a": 1, "fullDocument.b": 3}))
            .matches(&e)
            .unwrap());
        assert!(
            q(json!({"$or": [{"fullDocument.a": 9}, {"fullDocument.b": 2}]}))
                .matches(&e)
                .unwrap()
        );
        assert!(
            !q(json!({"$nor": [{"fullDocument.a": 9}, {"fullDocument.b": 2}]}))
                .matches(&e)
                .unwrap()
        );
        assert!(q(json!({"$nor": [{"fullDocument.a": 9}]}))
            .matches(&e)
            .unwrap());
        assert!(q(json!({"$not": {"fullDocument.a": 9}}))
            .matches(&e)
            .unwrap());
        assert!(
            q(json!({"$and": [{"ns.coll": "orders"}, {"operationType": "insert"}]}))
                .matches(&e)
                .unwrap()
        );
    }

    #[test]
    fn ejson_literals_and_updates() {
        let e = order(json!({"_id": {"$oid": "65a1b2c3d4e5f60718293a4b"}}));
        assert!(
            q(json!({"documentKey._id": {"$oid": "65a1b2c3d4e5f60718293a4b"}}))
                .matches(&e)
                .unwrap()
        );
        let u = Event::update(
            "shop",
            "orders",
            json!(1),
            json!({"status": "paid", "a.b": 1}),
            None,
        );
        assert!(q(json!({"updateDescription.updatedFields.status": "paid"}))
            .matches(&u)
            .unwrap());
        assert!(q(json!({"updateDescription.updatedFields.a.b": 1}))
            .matches(&u)
            .unwrap());
    }

    #[test]
    fn bad_queries() {
        for bad in [
            json!([]),
            json!({"total": 1}),
            json!({"$or": {}}),
            json!({"$or": []}),
            json!({"$where": "x"}),
            json!({"fullDocument.a": {"$gt": 1, "b": 2}}),
            json!({"fullDocument.a": {"$exists": 1}}),
            json!({"fullDocument.a": {"$regex": "("}}),
            json!({"fullDocument.a": {"$in": 1}}),
            json!({"fullDocument.a": {"$not": 1}}),
        ] {
            assert!(Query::parse(&bad).is_err(), "{bad}");
        }
    }
}
