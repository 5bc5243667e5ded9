//! Queries to mine, read from BEIR files (queries.jsonl with qrels) or from a JSONL of pairs.
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::bail;
use hardneg_client::beir;

/// One query to mine, as read from the input: a text, a vector, or both.
#[derive(Clone, Debug)]
pub struct QueryIn {
    pub id: String,
    pub text: String,
    /// Mined with in place of the encoded text (empty: none given).
    pub vector: Vec<f32>,
    pub positive_id: Option<String>,
    pub positive_text: Option<String>,
}

/// BEIR queries with qrels: each query's positive is its highest-scored judged document.
pub fn beir_queries(queries: &PathBuf, qrels: &PathBuf) -> anyhow::Result<(Vec<QueryIn>, HashMap<String, beir::Judgments>)> {
    let qs = beir::read_queries(queries)?;
    let judgments = beir::read_qrels(qrels)?;
    let out = qs
        .into_iter()
        .filter_map(|q| {
            let positive = judgments.get(&q.id)?.positive()?.to_string();
            Some(QueryIn { id: q.id, text: q.text, vector: q.vector, positive_id: Some(positive), positive_text: None })
        })
        .collect();
    Ok((out, judgments))
}

/// JSONL of {"query", "positive"} or {"query", "positive_id"} (and an optional "id"); a
/// "vector" may stand in for, or go with, the query text.
pub fn pair_queries(path: &PathBuf) -> anyhow::Result<Vec<QueryIn>> {
    #[derive(serde::Deserialize)]
    struct Pair {
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        query: String,
        #[serde(default)]
        vector: Vec<f32>,
        #[serde(default)]
        positive: Option<String>,
        #[serde(default)]
        positive_id: Option<String>,
    }
    beir::jsonl_lines::<Pair>(path)?
        .enumerate()
        .map(|(n, r)| {
            let (line, p) = r?;
            if p.query.trim().is_empty() && p.vector.is_empty() {
                bail!("{}:{line}: needs \"query\" or \"vector\"", path.display());
            }
            if p.positive.is_none() && p.positive_id.is_none() {
                bail!("{}:{line}: needs \"positive\" or \"positive_id\"", path.display());
            }
            let id = p.id.unwrap_or_else(|| n.to_string());
            Ok(QueryIn { id, text: p.query, vector: p.vector, positive_id: p.positive_id, positive_text: p.positive })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(name: &str, body: &str) -> anyhow::Result<Vec<QueryIn>> {
        let dir = std::env::temp_dir().join(format!("hardneg-pairs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pairs.jsonl");
        std::fs::write(&path, body).unwrap();
        let out = pair_queries(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        out
    }

    #[test]
    fn a_pair_gives_its_query_as_text_or_vector() {
        let body = "{\"query\":\"wing\",\"positive_id\":\"7\"}\n\n{\"vector\":[1,0.5],\"positive\":\"a text\",\"id\":\"v\"}\n";
        let qs = pairs("ok", body).unwrap();
        assert_eq!((qs[0].id.as_str(), qs[0].text.as_str(), qs[0].vector.len()), ("0", "wing", 0));
        assert_eq!((qs[1].id.as_str(), qs[1].text.as_str(), qs[1].vector.clone()), ("v", "", vec![1.0, 0.5]));
        assert_eq!(qs[1].positive_text.as_deref(), Some("a text"));
    }

    #[test]
    fn a_pair_without_query_or_positive_names_its_line() {
        let err = pairs("noquery", "{\"query\":\"wing\",\"positive_id\":\"7\"}\n\n{\"vector\":[],\"positive_id\":\"7\"}\n").unwrap_err().to_string();
        assert!(err.ends_with("pairs.jsonl:3: needs \"query\" or \"vector\""), "{err}");
        let err = pairs("nopositive", "{\"vector\":[1]}\n").unwrap_err().to_string();
        assert!(err.ends_with("pairs.jsonl:1: needs \"positive\" or \"positive_id\""), "{err}");
    }
}
