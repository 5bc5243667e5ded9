//! The cross-encoder against a reference implementation: the real all-MiniLM-L6-v2 body with a
//! seeded classification head, scored by the service's model code (candle) and by
//! tests/reference/cross_encoder.py (numpy, float64, one pair at a time), on (query,
//! document) pairs from Cranfield. No trained cross-encoder can be fetched here; this proves
//! the plumbing (pair tokenization, body, pooler, head, probability) for any checkpoint.
//!
//! And the families beyond BERT against sentence-transformers 6.2 itself: tiny random
//! ModernBERT, DeBERTa-v2/v3 and Qwen3 sequence-classification checkpoints saved by its
//! CrossEncoder (tests/fixtures/cross_encoders, made by tests/reference/make_cross_encoders.py)
//! score here as CrossEncoder.predict scored them, in-process and through a real server's
//! `rerank`, and what it would score otherwise is refused by name.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hardneg_client::proto;
use hardneg_server::encode::testing::seeded_cross_encoder;
use hardneg_server::encode::{BatchConfig, Reranker};
use hardneg_tests::{Server, bin, dataset, model_dir, root};
use serde_json::Value;

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

// ------------------------------------------------------------------------------------------------
// Checkpoints saved by sentence-transformers 6.2's CrossEncoder (tests/fixtures/cross_encoders,
// made by tests/reference/make_cross_encoders.py): ModernBERT, DeBERTa-v2/v3 and Qwen3
// sequence-classification models score here as CrossEncoder.predict scores them.
// ------------------------------------------------------------------------------------------------

fn cross_fixtures() -> PathBuf {
    root().join("tests/fixtures/cross_encoders")
}

/// Every fixture folder with its expected.json, by name.
fn cross_cases() -> Vec<(String, PathBuf, Value)> {
    let mut out: Vec<_> = std::fs::read_dir(cross_fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").exists())
        .map(|p| {
            let expected: Value = serde_json::from_slice(&std::fs::read(p.join("expected.json")).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), p, expected)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    for family in ["modernbert", "deberta-v2", "qwen3"] {
        assert!(out.iter().any(|c| c.2["family"] == family), "no {family} fixture");
    }
    out
}

fn fixture_pairs(expected: &Value) -> Vec<(String, String)> {
    expected["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
        .collect()
}

fn u32_rows(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect()
}

fn f32_rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn reranker_for(dir: &Path, expected: &Value) -> Reranker {
    let max = expected["max_length"].as_u64().unwrap() as usize;
    let cfg = BatchConfig { token_budget: 4096, max_batch_texts: 64, queue_capacity: 64 };
    Reranker::load(dir, max, cfg).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// One fixture against what sentence-transformers recorded; the list of what differs, and the
/// largest |probability difference|.
async fn check_cross(name: &str, dir: &Path, expected: &Value) -> (Vec<String>, f32) {
    let mut problems = Vec::new();
    let rr = reranker_for(dir, expected);
    let info = rr.info();
    if info.family != expected["family"].as_str().unwrap() {
        problems.push(format!("{name}: family {} (expected {})", info.family, expected["family"]));
    }
    if info.num_labels as u64 != expected["num_labels"].as_u64().unwrap() {
        problems.push(format!("{name}: {} labels", info.num_labels));
    }
    if info.prompt.as_deref() != expected["prompt"].as_str() {
        problems.push(format!("{name}: prompt {:?}, sentence-transformers {:?}", info.prompt, expected["prompt"]));
    }
    let pairs = fixture_pairs(expected);
    let tokenized = rr.tokenize_pairs(&pairs).unwrap();
    let ids: Vec<Vec<u32>> = tokenized.iter().map(|t| t.ids.clone()).collect();
    if ids != u32_rows(&expected["input_ids"]) {
        problems.push(format!("{name}: token ids differ:\n  ours {ids:?}\n  st   {:?}", u32_rows(&expected["input_ids"])));
    }
    if !expected["token_type_ids"].is_null() {
        let types: Vec<Vec<u32>> = tokenized.iter().map(|t| t.type_ids.clone()).collect();
        if types != u32_rows(&expected["token_type_ids"]) {
            problems.push(format!("{name}: token type ids differ"));
        }
    }
    let logits = rr.logits(pairs.clone()).await.unwrap();
    let scores = rr.score(pairs.clone()).await.unwrap();
    let (want_logits, want_probability) = (f32_rows(&expected["logits"]), f32s(&expected["probability"]));
    let mut worst = 0f32;
    let mut worst_logit = 0f32;
    for (i, ((got, want), (s, ws))) in logits.iter().zip(&want_logits).zip(scores.iter().zip(&want_probability)).enumerate() {
        for (g, w) in got.iter().zip(want) {
            worst_logit = worst_logit.max((g - w).abs());
            if (g - w).abs().is_nan() || (g - w).abs() > TOLERANCE {
                problems.push(format!("{name}: pair {i}: logit {g} vs sentence-transformers {w}"));
            }
        }
        worst = worst.max((s - ws).abs());
        if (s - ws).abs().is_nan() || (s - ws).abs() > TOLERANCE {
            problems.push(format!("{name}: pair {i}: probability {s} vs {ws}"));
        }
        // One label: the probability is predict()'s score (CrossEncoder's default sigmoid).
        if expected["num_labels"] == 1 {
            let predicted = expected["predict"][i].as_f64().unwrap() as f32;
            if (s - predicted).abs() > TOLERANCE {
                problems.push(format!("{name}: pair {i}: probability {s} vs predict() {predicted}"));
            }
        }
    }
    // One pair at a time equals the batched answer.
    for (pair, b) in pairs.iter().zip(&logits) {
        let alone = rr.logits(vec![pair.clone()]).await.unwrap();
        if alone[0].iter().zip(b).any(|(x, y)| (x - y).abs() > TOLERANCE) {
            problems.push(format!("{name}: {pair:?} alone {:?} vs batched {b:?}", alone[0]));
        }
    }
    eprintln!("{name}: max |logit - sentence-transformers| = {worst_logit:.2e}");
    (problems, worst)
}

/// Every fixture: the same token ids (prompt, pair template, truncation at the library's
/// max length), logits within 1e-4 and the probability (sigmoid, or softmax label 1) within
/// 1e-4 of CrossEncoder.predict's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_cross_encoders_score_as_sentence_transformers() {
    let mut problems = Vec::new();
    for (name, dir, expected) in cross_cases() {
        let (found, worst) = check_cross(&name, &dir, &expected).await;
        eprintln!("{name}: max |probability - sentence-transformers| = {worst:.2e}");
        problems.extend(found);
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

/// Each fixture as the server's reranker: every returned `ce_score` is the library's
/// probability for (query, document) where the fixture has that pair, and the in-process
/// model's otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_ce_scores_are_sentence_transformers_probabilities() {
    for (name, dir, expected) in cross_cases() {
        let pairs = fixture_pairs(&expected);
        let probability = f32s(&expected["probability"]);
        let mut documents: Vec<String> = Vec::new();
        for (_, d) in &pairs {
            if !d.trim().is_empty() && !documents.contains(d) {
                documents.push(d.clone());
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let max = expected["max_length"].to_string();
        let env = [("HARDNEG__RERANKER__MODEL_DIR", dir.to_str().unwrap()), ("HARDNEG__RERANKER__MAX_TOKENS", max.as_str())];
        let server = Server::start_with(&tmp.path().join("data"), &env).await;
        assert!(server.log_text().contains("cross-encoder loaded"), "{}", server.log_text());
        let mut client = server.client().await;
        client.create_collection("c", proto::Quantization::F32).await.unwrap();
        let docs: Vec<proto::Document> = documents
            .iter()
            .enumerate()
            .map(|(i, t)| proto::Document { id: format!("d{i}"), text: t.clone(), title: None, metadata: Default::default(), vector: Vec::new() })
            .collect();
        let n = docs.len();
        client.upsert("c", futures::stream::iter([docs])).await.unwrap();
        let reference = reranker_for(&dir, &expected);
        let mut from_fixture = 0;
        // The first pair's query, its document as the positive; every other document comes back.
        for q in [0usize, 2] {
            let (query, positive) = &pairs[q];
            let positive_id = format!("d{}", documents.iter().position(|d| d == positive).unwrap());
            let req = proto::MineRequest {
                collection: "c".into(),
                queries: vec![proto::Query { text: query.clone(), positive_ids: vec![positive_id], ..Default::default() }],
                options: Some(proto::MineOptions {
                    num_negatives: (n - 1) as u32,
                    range_max: Some(n as u32),
                    rerank: Some(true),
                    rerank_candidates: Some(n as u32),
                    seed: Some(1),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let resp = client.mine(req).await.unwrap();
            let negatives = &resp.results[0].negatives;
            assert!(negatives.len() >= 3, "{name}: {} negatives", negatives.len());
            for neg in negatives {
                let ce = neg.ce_score.expect("reranked negatives carry ce_score");
                let text = &documents[neg.id[1..].parse::<usize>().unwrap()];
                let want = match pairs.iter().position(|(pq, pd)| pq == query && pd == text) {
                    Some(i) => {
                        from_fixture += 1;
                        probability[i]
                    }
                    None => reference.score(vec![(query.clone(), text.clone())]).await.unwrap()[0],
                };
                assert!((ce - want).abs() < TOLERANCE, "{name}: ({query:?}, {text:?}): ce_score {ce} vs {want}");
            }
        }
        assert!(from_fixture > 0, "{name}: no served pair was one sentence-transformers scored");
        server.stop(Duration::from_secs(30));
    }
}

/// A copy of a fixture with one JSON file edited (or removed, when `edit` returns false).
fn edited(tmp: &Path, name: &str, file: &str, edit: impl FnOnce(&mut Value) -> bool) -> PathBuf {
    let dir = tempfile::Builder::new().prefix(&format!("{name}-")).tempdir_in(tmp).unwrap().keep();
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(cross_fixtures().join(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let path = dir.join(file);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|_| b"{}".to_vec())).unwrap();
    if edit(&mut v) {
        std::fs::write(&path, v.to_string()).unwrap();
    } else {
        std::fs::remove_file(&path).unwrap();
    }
    dir
}

/// The library reads its own files only from a directory it saved as a CrossEncoder. Saved so,
/// a Transformer whose sentence_bert_config.json predates modality lists is text-only even when
/// its tokenizer carries a chat template, and the saved default prompt applies; saved as
/// another class (or not saved), the default modules take no prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_cross_encoder_save_is_read_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = BatchConfig { token_budget: 4096, max_batch_texts: 64, queue_capacity: 64 };
    let name = "qwen3-right-prompt";
    let expected: Value = serde_json::from_slice(&std::fs::read(cross_fixtures().join(name).join("expected.json")).unwrap()).unwrap();
    let templated = edited(tmp.path(), name, "tokenizer_config.json", |v| {
        v["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}".into();
        true
    });
    let sbert = templated.join("sentence_bert_config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&sbert).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("modality_config");
    std::fs::write(&sbert, v.to_string()).unwrap();
    let reranker = Reranker::load(&templated, 0, cfg).unwrap();
    assert!(reranker.info().prompt.is_some(), "the saved default prompt applies");
    let (problems, _) = check_cross(name, &templated, &expected).await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let converted = edited(tmp.path(), name, "config_sentence_transformers.json", |v| {
        v["model_type"] = "SentenceTransformer".into();
        true
    });
    assert_eq!(Reranker::load(&converted, 0, cfg).unwrap().info().prompt, None, "another class's prompts are not read");
}

/// What CrossEncoder would score otherwise is refused by name, in-process and at server start
/// (the server exits, its log naming `reranker.model_dir` and the reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_cross_encoders_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            edited(t, "deberta-v3-rel", "config.json", |v| {
                v["model_type"] = "t5".into();
                true
            }),
            "config.json model_type: \"t5\" is not supported (bert, roberta, xlm-roberta, modernbert, deberta-v2, qwen3)",
        ),
        (
            edited(t, "qwen3-right-prompt", "config.json", |v| {
                v["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
                true
            }),
            "config.json architectures: \"Qwen3ForCausalLM\" is a generative reranker",
        ),
        (
            // A Hub checkpoint without sentence-transformers' files whose tokenizer carries a
            // chat template: the library would render each pair through it.
            edited(t, "qwen3-left-eot", "tokenizer_config.json", |v| {
                v["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}".into();
                true
            }),
            "chat_template",
        ),
        (
            edited(t, "deberta-v3-rel", "config.json", |v| {
                v["conv_kernel_size"] = 3.into();
                true
            }),
            "config.json conv_kernel_size",
        ),
        (
            edited(t, "modernbert-cls", "config.json", |v| {
                v["classifier_pooling"] = "max".into();
                true
            }),
            "config.json classifier_pooling: \"max\"",
        ),
        (
            edited(t, "modernbert-cls", "modules.json", |v| {
                v.as_array_mut().unwrap().push(serde_json::json!({"idx": 1, "name": "1", "path": "1_LogitScore", "type": "sentence_transformers.cross_encoder.modules.LogitScore"}));
                true
            }),
            "modules.json: module type \"sentence_transformers.cross_encoder.modules.LogitScore\"",
        ),
    ];
    // The chat-template case needs the saved modality list gone (a plain Hub checkpoint).
    std::fs::remove_file(cases[2].0.join("sentence_bert_config.json")).unwrap();
    std::fs::remove_file(cases[2].0.join("modules.json")).unwrap();
    let cfg = BatchConfig { token_budget: 4096, max_batch_texts: 64, queue_capacity: 64 };
    for (dir, needle) in &cases {
        let err = Reranker::load(dir, 0, cfg).err().unwrap_or_else(|| panic!("{} loaded", dir.display())).to_string();
        assert!(err.contains(needle), "{}: {err:?} lacks {needle:?}", dir.display());
    }
    for (dir, needle) in &cases[..3] {
        let out = Command::new(bin("hardneg-server"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(t.join("start-data"))
            .arg("--model-dir")
            .arg(model_dir())
            .arg("--reranker-dir")
            .arg(dir)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} started", dir.display());
        assert!(log.contains(needle) && log.contains("reranker.model_dir"), "start with {}: log lacks {needle:?}:\n{log}", dir.display());
    }
}
