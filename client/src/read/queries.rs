//! Queries to mine, read from BEIR files (queries.jsonl with qrels) or from a JSONL of pairs.
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::bail;
use hardneg_client::beir::{self, BeirQuery};

/// One query to mine, as read from the input.
#[derive(Clone)]
pub struct QueryIn {
    pub id: String,
    pub text: String,
    pub positive_id: Option<String>,
    pub positive_text: Option<String>,
}

/// BEIR queries with qrels: each query's positive is its highest-scored judged document.
pub fn beir_queries(queries: &PathBuf, qrels: &PathBuf) -> anyhow::Result<(Vec<QueryIn>, HashMap<String, beir::Judgments>)> {
    let qs: Vec<BeirQuery> = beir::read_jsonl(queries)?;
    let judgments = beir::read_qrels(qrels)?;
    let out = qs
        .into_iter()
        .filter_map(|q| {
            let positive = judgments.get(&q.id)?.positive()?.to_string();
            Some(QueryIn { id: q.id, text: q.text, positive_id: Some(positive), positive_text: None })
        })
        .collect();
    Ok((out, judgments))
}

/// JSONL of {"query", "positive"} or {"query", "positive_id"} (and an optional "id").
pub fn pair_queries(path: &PathBuf) -> anyhow::Result<Vec<QueryIn>> {
    #[derive(serde::Deserialize)]
    struct Pair {
        #[serde(default)]
        id: Option<String>,
        query: String,
        #[serde(default)]
        positive: Option<String>,
        #[serde(default)]
        positive_id: Option<String>,
    }
    let pairs: Vec<Pair> = beir::read_jsonl(path)?;
    pairs
        .into_iter()
        .enumerate()
        .map(|(n, p)| {
            if p.positive.is_none() && p.positive_id.is_none() {
                bail!("{}:{}: needs \"positive\" or \"positive_id\"", path.display(), n + 1);
            }
            Ok(QueryIn { id: p.id.unwrap_or_else(|| n.to_string()), text: p.query, positive_id: p.positive_id, positive_text: p.positive })
        })
        .collect()
}
