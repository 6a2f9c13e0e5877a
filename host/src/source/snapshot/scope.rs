//! Which collections a snapshot reads: the pipeline's scope narrowed by the stream's own
//! namespace filters, or what a signal's `data-collections` names within it. Filters and
//! patterns are evaluated by the server, so that regexes behave exactly as in the stream.

use bson::{doc, Document};
use futures::TryStreamExt;

use crate::config::PipelineConfig;
use crate::model::Namespace;

/// The collections a snapshot reads: the pipeline's scope, narrowed by the same namespace
/// filters as its change stream (evaluated by the server on synthetic events, so regexes
/// behave exactly alike).
pub async fn namespaces(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    filters: Vec<Document>,
) -> Result<Vec<Namespace>, mongodb::error::Error> {
    let candidates = in_scope(client, pipeline).await?;
    filter_namespaces(client, candidates, filters).await
}

/// Every collection in the pipeline's database/collections scope (or its
/// `collections_file`'s rows, listed whether they exist yet or not, as `collections` are),
/// sorted.
async fn in_scope(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
) -> Result<Vec<(String, String)>, mongodb::error::Error> {
    if !pipeline.collection_list.is_empty() {
        return Ok(pipeline
            .collection_list
            .namespaces()
            .map(|(db, coll)| (db.clone(), coll.clone()))
            .collect());
    }
    let databases = match &pipeline.database {
        Some(db) => vec![db.clone()],
        None => client
            .list_database_names()
            .await?
            .into_iter()
            .filter(|db| !["admin", "local", "config"].contains(&db.as_str()))
            .collect(),
    };
    let mut candidates = Vec::new();
    for db in databases {
        let mut names = match pipeline.collections.is_empty() {
            true => client.database(&db).list_collection_names().await?,
            false => pipeline.collections.clone(),
        };
        names.retain(|name| !name.starts_with("system."));
        names.sort();
        candidates.extend(names.into_iter().map(|coll| (db.clone(), coll)));
    }
    Ok(candidates)
}

/// The namespaces of the pipeline's scope (after its namespace `filters`) that a signal's
/// `data-collections` name; see [`match_patterns`].
pub async fn requested_namespaces(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    filters: Vec<Document>,
    patterns: &[String],
) -> Result<Matched, mongodb::error::Error> {
    let scope = in_scope(client, pipeline).await?;
    let candidates = filter_namespaces(client, scope, filters).await?;
    match_patterns(client, candidates, patterns).await
}

/// The namespaces anchored regular `patterns` match, and the patterns that matched none.
#[derive(Debug, Default)]
pub struct Matched {
    /// Every candidate some pattern matches, in the candidates' order.
    pub namespaces: Vec<Namespace>,
    /// Indexes of the patterns that matched no candidate.
    pub unmatched: Vec<usize>,
}

/// Matches `db.coll` of every candidate against `patterns` (anchored regular expressions),
/// evaluated by the server so that they behave as the stream's own regex filters. An
/// invalid expression is the server's command error.
pub async fn match_patterns(
    client: &mongodb::Client,
    candidates: Vec<Namespace>,
    patterns: &[String],
) -> Result<Matched, mongodb::error::Error> {
    if candidates.is_empty() || patterns.is_empty() {
        return Ok(Matched {
            namespaces: Vec::new(),
            unmatched: (0..patterns.len()).collect(),
        });
    }
    let documents: Vec<Document> = candidates
        .iter()
        .enumerate()
        .map(|(i, ns)| doc! { "i": i as i64, "ns": ns.to_string() })
        .collect();
    let hits: Vec<Document> = patterns
        .iter()
        .map(|p| doc! { "$regexMatch": { "input": "$ns", "regex": p } })
        .collect();
    let stages = vec![
        doc! { "$documents": documents },
        doc! { "$project": { "i": 1, "hits": hits } },
    ];
    let mut rows = client.database("admin").aggregate(stages).await?;
    let mut matched = Matched::default();
    let mut used = vec![false; patterns.len()];
    while let Some(row) = rows.try_next().await? {
        let index = row.get_i64("i").unwrap_or(-1);
        let hits = row.get_array("hits").cloned().unwrap_or_default();
        let mut any = false;
        for (p, hit) in hits.iter().enumerate() {
            if hit.as_bool() == Some(true) {
                any = true;
                if let Some(u) = used.get_mut(p) {
                    *u = true;
                }
            }
        }
        if let (true, Some(ns)) = (
            any,
            usize::try_from(index).ok().and_then(|i| candidates.get(i)),
        ) {
            matched.namespaces.push(ns.clone());
        }
    }
    matched.unmatched = (0..patterns.len()).filter(|p| !used[*p]).collect();
    Ok(matched)
}

/// Checks that `filter` is a query the server accepts on `namespace` (one document read),
/// so that a bad filter is refused with the signal instead of failing every chunk.
pub async fn check_filter(
    client: &mongodb::Client,
    namespace: &Namespace,
    filter: &Document,
) -> Result<(), mongodb::error::Error> {
    client
        .database(&namespace.db)
        .collection::<Document>(namespace.coll.as_deref().unwrap_or_default())
        .find_one(filter.clone())
        .await
        .map(|_| ())
}

/// Keeps the candidates the namespace `filters` let through, run by the server on synthetic
/// events so that regexes behave as in the change stream.
async fn filter_namespaces(
    client: &mongodb::Client,
    candidates: Vec<(String, String)>,
    filters: Vec<Document>,
) -> Result<Vec<Namespace>, mongodb::error::Error> {
    if candidates.is_empty() || filters.is_empty() {
        return Ok(candidates
            .into_iter()
            .map(|(db, coll)| Namespace {
                db,
                coll: Some(coll),
            })
            .collect());
    }
    let documents: Vec<Document> = candidates
        .iter()
        .map(|(db, coll)| doc! { "ns": { "db": db, "coll": coll } })
        .collect();
    let mut stages = vec![doc! { "$documents": documents }];
    stages.extend(filters);
    let mut kept = client.database("admin").aggregate(stages).await?;
    let mut out = Vec::new();
    while let Some(found) = kept.try_next().await? {
        let ns = found.get_document("ns").ok();
        if let (Some(db), Some(coll)) = (
            ns.and_then(|n| n.get_str("db").ok()),
            ns.and_then(|n| n.get_str("coll").ok()),
        ) {
            out.push(Namespace {
                db: db.to_string(),
                coll: Some(coll.to_string()),
            });
        }
    }
    Ok(out)
}
