//! The cross-encoder against a reference implementation: the real all-MiniLM-L6-v2 body with a
//! seeded classification head, scored by the service's model code (candle) and by
//! tests/reference/cross_encoder.py (numpy, float64, one pair at a time), on (query,
//! document) pairs from Cranfield. No trained cross-encoder can be fetched here; this proves
//! the plumbing (pair tokenization, body, pooler, head, probability) for any checkpoint.
use std::collections::HashMap;
use std::process::Command;

use hardneg_server::encode::testing::seeded_cross_encoder;
use hardneg_server::encode::{BatchConfig, Reranker};
use hardneg_tests::{dataset, model_dir, root};

const TOLERANCE: f32 = 1e-4;
const MAX_TOKENS: usize = 256;

fn read_jsonl(path: std::path::PathBuf) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// 60 pairs: each of the first 30 Cranfield queries with one judged document and one other.
fn cranfield_pairs() -> Vec<(String, String)> {
    let dir = dataset("cranfield");
    let docs: HashMap<String, String> = read_jsonl(dir.join("corpus.jsonl"))
        .into_iter()
        .map(|d| {
            let title = d["title"].as_str().unwrap_or("").trim().to_string();
            let text = d["text"].as_str().unwrap_or("").to_string();
            let full = if title.is_empty() { text } else { format!("{title} {text}") };
            (d["_id"].as_str().unwrap().to_string(), full)
        })
        .collect();
    let mut judged: HashMap<String, String> = HashMap::new();
    for line in std::fs::read_to_string(dir.join("qrels/test.tsv")).unwrap().lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        judged.entry(f[0].to_string()).or_insert_with(|| f[1].to_string());
    }
    let mut ids: Vec<&String> = docs.keys().collect();
    ids.sort();
    let mut pairs = Vec::new();
    for (i, q) in read_jsonl(dir.join("queries.jsonl")).into_iter().enumerate() {
        let qid = q["_id"].as_str().unwrap();
        let Some(rel) = judged.get(qid).and_then(|d| docs.get(d)) else { continue };
        let text = q["text"].as_str().unwrap().to_string();
        pairs.push((text.clone(), rel.clone()));
        let other = &docs[ids[(i * 37) % ids.len()]];
        if !other.trim().is_empty() {
            pairs.push((text, other.clone()));
        }
        if pairs.len() >= 60 {
            break;
        }
    }
    pairs
}

fn reference(dir: &std::path::Path, pairs: &[(String, String)]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let file = dir.join("pairs.json");
    let json: Vec<serde_json::Value> =
        pairs.iter().map(|(q, d)| serde_json::json!({"query": q, "document": d})).collect();
    std::fs::write(&file, serde_json::to_vec(&json).unwrap()).unwrap();
    let out = Command::new("python3")
        .arg(root().join("tests/reference/cross_encoder.py"))
        .arg(dir)
        .arg(&file)
        .arg(MAX_TOKENS.to_string())
        .output()
        .expect("python3 runs (scripts/test puts .venv, with numpy and tokenizers, first on PATH)");
    assert!(
        out.status.success(),
        "reference failed (needs numpy and tokenizers: run through scripts/test, which installs them in .venv): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect();
    let scores = v["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    (logits, scores)
}

#[tokio::test]
async fn seeded_minilm_cross_encoder_matches_the_numpy_reference() {
    let all = cranfield_pairs();
    assert!(all.len() >= 50, "{} pairs", all.len());
    // One label (a logit) on every pair; two labels (softmax) on a sample.
    for (labels, pairs) in [(1usize, all.clone()), (2, all[..12].to_vec())] {
        let dir = tempfile::tempdir().unwrap();
        seeded_cross_encoder(&model_dir(), dir.path(), labels, 42);
        let cfg = BatchConfig { token_budget: 8192, max_batch_texts: 64, queue_capacity: 64 };
        let rr = Reranker::load(dir.path(), MAX_TOKENS, cfg).unwrap();
        let batched = rr.logits(pairs.clone()).await.unwrap();
        let scores = rr.score(pairs.clone()).await.unwrap();
        let (want_logits, want_scores) = reference(dir.path(), &pairs);
        assert_eq!(want_logits.len(), pairs.len());
        let mut worst = 0f32;
        for (i, ((got, want), (s, ws))) in batched.iter().zip(&want_logits).zip(scores.iter().zip(&want_scores)).enumerate() {
            assert_eq!(got.len(), labels);
            for (g, w) in got.iter().zip(want) {
                worst = worst.max((g - w).abs());
                assert!((g - w).abs() < TOLERANCE, "{labels} label(s), pair {i}: logit {g} vs reference {w}");
            }
            assert!((s - ws).abs() < TOLERANCE, "{labels} label(s), pair {i}: probability {s} vs reference {ws}");
        }
        let spread = want_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max)
            - want_scores.iter().copied().fold(f32::INFINITY, f32::min);
        assert!(spread > 0.05, "the seeded head separates pairs (spread {spread})");
        // One pair at a time equals the batched answer.
        for (pair, b) in pairs.iter().zip(&batched).take(12) {
            let alone = rr.logits(vec![pair.clone()]).await.unwrap();
            for (x, y) in alone[0].iter().zip(b) {
                assert!((x - y).abs() < TOLERANCE, "alone {x} vs batched {y}");
            }
        }
        eprintln!("{labels} label(s): {} pairs, max |logit - reference| = {worst:.2e}", pairs.len());
    }
}
