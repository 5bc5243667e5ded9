//! `hardneg eval`: the quality protocol (leak rate, hardness, yield) on a BEIR collection.
use std::collections::HashSet;
use std::path::PathBuf;

use hardneg_client::{Client, proto};
use serde_json::json;

use super::mine::{drop_json, mine_all};
use crate::cli::MineFlags;
use crate::read::queries::beir_queries;

/// `hardneg eval`: mine with every judged document but the positive hidden; count leaks.
pub async fn eval(client: &mut Client, collection: &str, queries: &PathBuf, qrels: &PathBuf, opts: &MineFlags) -> anyhow::Result<()> {
    let (inputs, judgments) = beir_queries(queries, qrels)?;
    let results = mine_all(client, collection, &inputs, opts.options(false), opts.batch_size).await?;
    let (mut returned, mut leaked, mut with_leak, mut full) = (0usize, 0usize, 0usize, 0usize);
    let (mut score_sum, mut ratio_sum, mut ratio_n, mut depth_sum, mut rank_sum) = (0f64, 0f64, 0usize, 0f64, 0f64);
    let mut dropped = proto::DropCounts::default();
    for (q, r) in inputs.iter().zip(&results) {
        let d = r.dropped.clone().unwrap_or_default();
        for (acc, v) in [
            (&mut dropped.positive, d.positive),
            (&mut dropped.duplicate_text, d.duplicate_text),
            (&mut dropped.batch_positive, d.batch_positive),
            (&mut dropped.window, d.window),
            (&mut dropped.score_bound, d.score_bound),
            (&mut dropped.margin, d.margin),
            (&mut dropped.positive_similarity, d.positive_similarity),
            (&mut dropped.ce_score, d.ce_score),
            (&mut dropped.ce_margin, d.ce_margin),
        ] {
            *acc += v;
        }
        let positive = q.positive_id.as_deref().expect("BEIR queries carry a positive");
        let hidden: HashSet<&str> = judgments[&q.id].relevant().filter(|d| *d != positive).collect();
        let leaks = r.negatives.iter().filter(|n| hidden.contains(n.id.as_str())).count();
        returned += r.negatives.len();
        leaked += leaks;
        with_leak += usize::from(leaks > 0);
        full += usize::from(r.negatives.len() >= opts.num_negatives as usize);
        depth_sum += r.depth as f64;
        for n in &r.negatives {
            score_sum += n.score as f64;
            rank_sum += n.rank as f64;
            if let Some(p) = r.positive_score.filter(|p| *p > 0.0) {
                ratio_sum += (n.score / p) as f64;
                ratio_n += 1;
            }
        }
    }
    let n = inputs.len().max(1) as f64;
    let per_neg = |x: f64| if returned == 0 { 0.0 } else { x / returned as f64 };
    println!(
        "{}",
        json!({
            "queries": inputs.len(),
            "negatives": returned,
            "leak_rate": per_neg(leaked as f64),
            "queries_with_leak": with_leak,
            "yield": full as f64 / n,
            "mean_neg_score": per_neg(score_sum),
            "mean_neg_over_pos": if ratio_n == 0 { 0.0 } else { ratio_sum / ratio_n as f64 },
            "mean_neg_rank": per_neg(rank_sum),
            "mean_depth": depth_sum / n,
            "dropped": drop_json(&Some(dropped)),
        })
    );
    Ok(())
}
