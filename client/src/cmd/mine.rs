//! `hardneg mine`: mine every query of a file through MineStream; JSONL or triplets out.
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use futures::StreamExt;
use hardneg_client::{Client, proto};
use serde_json::json;

use crate::cli::{Format, MineFlags};
use crate::read::queries::{QueryIn, beir_queries, pair_queries};

/// Mines every query through MineStream, batches in flight, answers in input order.
pub async fn mine_all(
    client: &mut Client,
    collection: &str,
    queries: &[QueryIn],
    options: proto::MineOptions,
    batch_size: usize,
) -> anyhow::Result<Vec<proto::QueryResult>> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let requests: Vec<proto::MineRequest> = queries
        .chunks(batch_size)
        .enumerate()
        .map(|(b, chunk)| proto::MineRequest {
            collection: collection.to_string(),
            batch_id: b as u64,
            queries: chunk
                .iter()
                .map(|q| proto::Query {
                    id: q.id.clone(),
                    text: q.text.clone(),
                    vector: q.vector.clone(),
                    positive_ids: q.positive_id.iter().cloned().collect(),
                    positive_texts: q.positive_text.iter().cloned().collect(),
                })
                .collect(),
            options: Some(options.clone()),
            min_generation: None,
        })
        .collect();
    let expected = requests.len();
    let mut stream = client.mine_stream(futures::stream::iter(requests)).await?;
    let mut results = Vec::with_capacity(queries.len());
    let mut next_batch = 0u64;
    while let Some(resp) = stream.next().await {
        let resp = resp.map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
        if resp.batch_id != next_batch {
            bail!("responses out of order: got batch {} expecting {next_batch}", resp.batch_id);
        }
        next_batch += 1;
        results.extend(resp.results);
    }
    if next_batch as usize != expected {
        bail!("stream ended after {next_batch} of {expected} batches");
    }
    Ok(results)
}

/// A query's drop counts as JSON.
pub fn drop_json(d: &Option<proto::DropCounts>) -> serde_json::Value {
    let d = d.clone().unwrap_or_default();
    json!({
        "positive": d.positive, "duplicate_text": d.duplicate_text, "batch_positive": d.batch_positive,
        "window": d.window, "score_bound": d.score_bound, "margin": d.margin,
        "positive_similarity": d.positive_similarity, "ce_score": d.ce_score, "ce_margin": d.ce_margin,
    })
}

/// `hardneg mine`: one JSON line per query, or triplets.
pub async fn mine(
    client: &mut Client,
    collection: &str,
    queries: Option<PathBuf>,
    qrels: Option<PathBuf>,
    pairs: Option<PathBuf>,
    format: Format,
    opts: &MineFlags,
) -> anyhow::Result<()> {
    let inputs = match (queries, qrels, pairs) {
        (Some(q), Some(r), _) => beir_queries(&q, &r)?.0,
        (_, _, Some(p)) => pair_queries(&p)?,
        _ => bail!("give --queries with --qrels, or --pairs"),
    };
    let triplets = format == Format::Triplet;
    if triplets && let Some(q) = inputs.iter().find(|q| q.text.trim().is_empty()) {
        bail!("--format triplet uses each query's text as the anchor, but query {:?} has only a vector", q.id);
    }
    let results = mine_all(client, collection, &inputs, opts.options(true), opts.batch_size).await?;
    let mut positive_texts: HashMap<String, String> = HashMap::new();
    if triplets {
        let ids: Vec<String> = inputs
            .iter()
            .filter(|q| q.positive_text.is_none())
            .filter_map(|q| q.positive_id.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for chunk in ids.chunks(1024) {
            let resp = client.get_documents(collection, chunk.to_vec()).await?;
            for d in resp.documents {
                let text = match d.title.as_deref().map(str::trim) {
                    Some(t) if !t.is_empty() => format!("{t} {}", d.text),
                    _ => d.text,
                };
                positive_texts.insert(d.id, text);
            }
        }
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (q, r) in inputs.iter().zip(&results) {
        if triplets {
            let positive = q
                .positive_text
                .clone()
                .or_else(|| q.positive_id.as_ref().and_then(|id| positive_texts.get(id).cloned()));
            let Some(positive) = positive else {
                eprintln!("query {:?}: positive {:?} is not in the collection; no triplets", q.id, q.positive_id);
                continue;
            };
            for n in &r.negatives {
                writeln!(out, "{}", json!({"anchor": q.text, "positive": positive, "negative": n.text}))?;
            }
        } else {
            let negatives: Vec<serde_json::Value> = r
                .negatives
                .iter()
                .map(|n| json!({"id": n.id, "text": n.text, "score": n.score, "rank": n.rank, "ce_score": n.ce_score}))
                .collect();
            writeln!(
                out,
                "{}",
                json!({"query_id": q.id, "query": q.text, "positive_id": q.positive_id, "negatives": negatives,
                       "dropped": drop_json(&r.dropped), "depth": r.depth, "positive_score": r.positive_score,
                       "positive_ce_score": r.positive_ce_score})
            )?;
        }
    }
    out.flush()?;
    Ok(())
}
