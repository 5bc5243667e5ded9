//! The trainer's own model: checkpoints saved by sentence-transformers 6.2 (tests/fixtures/models,
//! made by tests/reference/make_models.py) encode here as the library encodes them, through the
//! encoder and end to end through a real server, and what cannot be served is refused by name.
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use hardneg_client::proto;
use hardneg_server::encode::{BatchConfig, Encoder, TextKind};
use hardneg_tests::{Server, bin, model_dir, root};
use serde_json::Value;

const CFG: BatchConfig = BatchConfig { token_budget: 4096, max_batch_texts: 64, queue_capacity: 64 };
/// Max |hardneg - sentence-transformers| per component (f32 on both sides).
const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    root().join("tests/fixtures/models")
}

/// Every fixture with its own weights (the re-saved MiniLM borrows the real model's).
fn cases() -> Vec<(String, PathBuf, Value)> {
    let mut out: Vec<_> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").exists() && p.join("model.safetensors").exists())
        .map(|p| {
            let expected: Value = serde_json::from_slice(&std::fs::read(p.join("expected.json")).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), p, expected)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 37, "fixtures missing: {}", out.len());
    out
}

fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect()
}

fn texts(expected: &Value) -> Vec<String> {
    expected["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
}

fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "dims differ");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0f32, f32::max)
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Checks one model directory against an expected.json; the list of what differs.
async fn check(name: &str, dir: &Path, expected: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let enc = match Encoder::load(dir, 0, CFG) {
        Ok(e) => e,
        Err(e) => return vec![format!("{name}: does not load: {e}")],
    };
    let want_len = expected["max_seq_length"].as_u64().unwrap() as usize;
    if enc.info().max_tokens != want_len {
        problems.push(format!("{name}: max length {} (sentence-transformers {want_len})", enc.info().max_tokens));
    }
    let texts = texts(expected);
    for (kind, key) in [(TextKind::Query, "encode_query"), (TextKind::Document, "encode_document")] {
        let mut side = &expected[key];
        let prompt = side["prompt"].as_str().filter(|p| !p.is_empty()).map(str::to_string);
        if let Some(other) = side["same_as"].as_str() {
            side = &expected[other];
        }
        if enc.info().prompts.get(kind).map(str::to_string) != prompt {
            problems.push(format!("{name} {key}: prompt {:?}, sentence-transformers {prompt:?}", enc.info().prompts.get(kind)));
        }
        let items: Vec<(TextKind, String)> = texts.iter().map(|t| (kind, t.clone())).collect();
        let tokenized = enc.tokenize_as(&items, &enc.info().prompts).unwrap();
        let got_ids: Vec<Vec<u32>> = tokenized.iter().map(|t| t.ids.clone()).collect();
        if got_ids != ids(&side["input_ids"]) {
            problems.push(format!("{name} {key}: token ids differ:\n  ours {got_ids:?}\n  st   {:?}", ids(&side["input_ids"])));
        }
        let got = enc.encode_as(items, &enc.info().prompts).await.unwrap();
        let diff = worst(&got, &matrix(&side["embeddings"]));
        // The measured agreement, for docs/models.md (shown with --no-capture).
        println!("{name} {key}: max |difference| {diff:.1e}");
        if diff.is_nan() || diff > TOLERANCE {
            problems.push(format!("{name} {key}: max |difference| {diff:e}"));
        }
    }
    problems
}

/// Every fixture: the same token ids, maximum length, prompts and vectors (within 1e-4) as
/// sentence-transformers' encode_query / encode_document, long texts included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_saved_model_encodes_as_sentence_transformers() {
    let mut problems = Vec::new();
    for (name, dir, expected) in cases() {
        problems.extend(check(&name, &dir, &expected).await);
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

/// all-MiniLM-L6-v2 loaded and saved again by sentence-transformers 6 (its config files, the
/// original weights and tokenizer, which the save leaves unchanged) encodes exactly as the
/// original directory, and as sentence-transformers does.
fn resaved_minilm(into: &Path) -> PathBuf {
    let dir = into.join("minilm-st6");
    let fixture = fixtures().join("minilm-st6-resaved");
    copy_tree(&fixture, &dir);
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(model_dir().join(file), dir.join(file)).unwrap();
    }
    dir
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let target = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_saved_again_by_sentence_transformers_6_matches_the_original() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = resaved_minilm(tmp.path());
    let expected: Value = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let problems = check("minilm-st6-resaved", &dir, &expected).await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let original = Encoder::load(&model_dir(), 0, CFG).unwrap();
    let resaved = Encoder::load(&dir, 0, CFG).unwrap();
    assert_eq!(resaved.info().max_tokens, 256);
    let texts = texts(&expected);
    let a = original.encode(texts.clone()).await.unwrap();
    let b = resaved.encode(texts).await.unwrap();
    assert!(worst(&a, &b) < 1e-6, "re-saved vectors differ by {}", worst(&a, &b));
}

/// A directory another sentence-transformers class saved (config_sentence_transformers.json's
/// `model_type`) is loaded as the library loads it: its default modules, as for a directory
/// without modules.json (bert-bare-mean's expectations, made by the library on the same body
/// and tokenizer); the saved prompts and pooling no longer apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_classes_save_gets_the_default_modules() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = broken(tmp.path(), "bert-mean-prompts", "config_sentence_transformers.json", |v| v["model_type"] = "SparseEncoder".into());
    let bare = fixtures().join("bert-bare-mean");
    let expected: Value = serde_json::from_slice(&std::fs::read(bare.join("expected.json")).unwrap()).unwrap();
    let problems = check("bert-mean-prompts saved as a SparseEncoder", &dir, &expected).await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn doc(i: usize, text: &str) -> proto::Document {
    proto::Document { id: format!("d{i}"), text: text.into(), title: None, metadata: Default::default(), vector: Vec::new() }
}

/// Serves `dir` and checks that Mine's scores are sentence-transformers' cosines between the
/// query (as encode_query) and each document (as encode_document).
async fn serve_and_check(dir: &Path, expected: &Value) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with_model(&tmp.path().join("data"), dir, &[]).await;
    let mut client = server.client().await;
    client.create_collection("c", proto::Quantization::F32).await.unwrap();
    let texts = texts(expected);
    let docs: Vec<proto::Document> =
        texts.iter().enumerate().filter(|(_, t)| !t.trim().is_empty()).map(|(i, t)| doc(i, t)).collect();
    let n = docs.len();
    client.upsert("c", futures::stream::iter([docs])).await.unwrap();
    let side = |key: &str| match expected[key]["same_as"].as_str() {
        Some(other) => &expected[other],
        None => &expected[key],
    };
    let queries = matrix(&side("encode_query")["embeddings"]);
    let documents = matrix(&side("encode_document")["embeddings"]);
    for q in [0usize, 3] {
        let req = proto::MineRequest {
            collection: "c".into(),
            queries: vec![proto::Query { text: texts[q].clone(), positive_ids: vec![format!("d{}", q + 1)], ..Default::default() }],
            options: Some(proto::MineOptions { num_negatives: (n - 2) as u32, range_max: Some(n as u32), seed: Some(1), ..Default::default() }),
            ..Default::default()
        };
        let resp = client.mine(req).await.unwrap();
        let negatives = &resp.results[0].negatives;
        assert!(negatives.len() >= 3, "{} negatives", negatives.len());
        for neg in negatives {
            let j: usize = neg.id[1..].parse().unwrap();
            let want = cos(&queries[q], &documents[j]);
            assert!((neg.score - want).abs() < TOLERANCE, "{}: query {q} doc {j}: score {} vs {want}", dir.display(), neg.score);
        }
    }
    server.stop(Duration::from_secs(30));
}

/// Every fixture through a real server: ingest, then Mine's scores are the library's cosines.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn served_scores_are_sentence_transformers_cosines() {
    for (_, dir, expected) in cases() {
        serve_and_check(&dir, &expected).await;
    }
}

/// A copy of a fixture with one JSON file edited.
fn broken(tmp: &Path, name: &str, file: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let dir = tmp.join(format!("{name}-{}", file.replace('/', "_")));
    copy_tree(&fixtures().join(name), &dir);
    let path = dir.join(file);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
    dir
}

/// The refusals: each names the file and key, at start (the server exits with it) and by
/// Refresh (INVALID_ARGUMENT, and the server keeps serving).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsupported_models_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    let cases: Vec<(PathBuf, &str)> = vec![
        (broken(&models, "bert-mean", "config.json", |v| v["model_type"] = "gpt2".into()), "config.json model_type: \"gpt2\""),
        (
            broken(&models, "bert-mean", "modules.json", |v| {
                v.as_array_mut().unwrap().insert(2, serde_json::json!({"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}))
            }),
            "modules.json: module type \"sentence_transformers.models.LayerNorm\"",
        ),
        (
            broken(&models, "bert-mean", "1_Pooling/config.json", |v| v["pooling_mode"] = "attention".into()),
            "1_Pooling/config.json pooling_mode: \"attention\"",
        ),
        (broken(&models, "distilbert-mean", "config.json", |v| v["activation"] = "silu".into()), "config.json activation: \"silu\""),
        (
            // transformers buckets into 32 whatever the table holds: a smaller table cannot run there.
            broken(&models, "mpnet-cls", "config.json", |v| v["relative_attention_num_buckets"] = 16.into()),
            "config.json relative_attention_num_buckets: 16",
        ),
        // transformers 5.23 attends both ways under is_causal: false; no fixture checks that.
        (broken(&models, "qwen2-lasttoken-left", "config.json", |v| v["is_causal"] = false.into()), "config.json is_causal: false"),
        (
            // Without a sentence-transformers save the library renders every text through the
            // tokenizer's chat template.
            broken(&models, "qwen3-bare-causallm", "tokenizer_config.json", |v| v["chat_template"] = "{{ messages[0].content }}".into()),
            "tokenizer_config.json chat_template: without a sentence-transformers save",
        ),
        (
            // Gemma 3's causal language models: only EmbeddingGemma's bidirectional attention runs.
            broken(&models, "gemma3-mean-hubconfig", "config.json", |v| v["use_bidirectional_attention"] = false.into()),
            "config.json use_bidirectional_attention: false",
        ),
    ];
    // At start: the process exits non-zero, its log naming the file and key.
    for (dir, needle) in &cases {
        let out = std::process::Command::new(bin("hardneg-server"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path().join("start-data"))
            .arg("--model-dir")
            .arg(dir)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} started", dir.display());
        assert!(log.contains(needle), "start with {}: log lacks {needle:?}:\n{log}", dir.display());
    }
    // By Refresh, against a server on a good model.
    let env = [("HARDNEG__ENCODER__MODELS_ROOT", models.to_str().unwrap())];
    let server = Server::start_with_model(&tmp.path().join("data"), &fixtures().join("bert-mean"), &env).await;
    let mut client = server.client().await;
    client.create_collection("c", proto::Quantization::F32).await.unwrap();
    client.upsert("c", futures::stream::iter([vec![doc(0, "a man is eating"), doc(1, "the girl")]])).await.unwrap();
    for (dir, needle) in &cases {
        let name = dir.file_name().unwrap().to_str().unwrap();
        let status = match client.refresh("c", name).await {
            Err(hardneg_client::ClientError::Status(s)) => s,
            Err(e) => panic!("refresh with {name}: {e}"),
            Ok(mut stream) => match stream.next().await {
                Some(Err(s)) => s,
                other => panic!("refresh with {name} was accepted: {other:?}"),
            },
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().contains(needle), "{name}: {:?} lacks {needle:?}", status.message());
        let info = client.get_collection("c").await.unwrap();
        assert_eq!(info.generation, 1, "a refused refresh changes nothing");
    }
    server.stop(Duration::from_secs(30));
}

/// A Refresh to all-MiniLM-L6-v2 as sentence-transformers 6 saves it runs to the end while a
/// client mines, and the new generation answers as the original model did.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_to_the_resaved_model_runs_under_load() {
    use hardneg_client::beir::{self, CorpusDoc};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    resaved_minilm(&models);
    let env = [("HARDNEG__ENCODER__MODELS_ROOT", models.to_str().unwrap())];
    let server = Server::start_with(&tmp.path().join("data"), &env).await;
    let mut client = server.client().await;
    client.create_collection("c", proto::Quantization::F32).await.unwrap();
    let docs: Vec<CorpusDoc> = beir::read_jsonl(&hardneg_tests::dataset("cranfield").join("corpus.jsonl")).unwrap();
    let docs: Vec<proto::Document> = docs
        .into_iter()
        .filter(|d| !d.text.trim().is_empty())
        .take(64)
        .map(|d| proto::Document { id: d.id, text: d.text, title: None, metadata: Default::default(), vector: Vec::new() })
        .collect();
    client.upsert("c", futures::stream::iter([docs])).await.unwrap();
    let request = || proto::MineRequest {
        collection: "c".into(),
        queries: ["what similarity laws must be obeyed when constructing aeroelastic models", "heat transfer in hypersonic flow"]
            .iter()
            .map(|t| proto::Query { text: t.to_string(), ..Default::default() })
            .collect(),
        options: Some(proto::MineOptions { num_negatives: 5, seed: Some(3), ..Default::default() }),
        ..Default::default()
    };
    let before = client.mine(request()).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, flag) = (server.addr.clone(), stop.clone());
    let miner = tokio::spawn(async move {
        let mut c = hardneg_client::Client::connect(&addr).await.unwrap();
        let mut generations = Vec::new();
        while !flag.load(Ordering::Acquire) {
            generations.push(c.mine(request()).await.expect("no request fails during the refresh").generation);
        }
        generations
    });
    let mut stream = client.refresh("c", "minilm-st6").await.unwrap();
    let mut last = None;
    while let Some(p) = stream.next().await {
        last = Some(p.unwrap());
    }
    let last = last.unwrap();
    assert_eq!((last.phase.as_str(), last.generation), ("done", 2));
    stop.store(true, Ordering::Release);
    let generations = miner.await.unwrap();
    assert!(!generations.is_empty() && generations.windows(2).all(|w| w[0] <= w[1]), "{generations:?}");
    let after = client.mine(request()).await.unwrap();
    assert_eq!(after.generation, 2);
    for (a, b) in before.results.iter().zip(&after.results) {
        let ids = |r: &proto::QueryResult| r.negatives.iter().map(|n| n.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(a), ids(b), "the re-saved model answers as the original");
        for (x, y) in a.negatives.iter().zip(&b.negatives) {
            assert!((x.score - y.score).abs() < 1e-5, "{} vs {}", x.score, y.score);
        }
    }
    server.stop(Duration::from_secs(30));
}

/// Mine's scores for query `q` against every document, as (id, score).
async fn scores(client: &mut hardneg_client::Client, collection: &str, text: &str, n: usize) -> Vec<(usize, f32)> {
    let req = proto::MineRequest {
        collection: collection.into(),
        queries: vec![proto::Query { text: text.into(), ..Default::default() }],
        options: Some(proto::MineOptions { num_negatives: n as u32, range_max: Some(n as u32), seed: Some(1), ..Default::default() }),
        ..Default::default()
    };
    let resp = client.mine(req).await.unwrap();
    resp.results[0].negatives.iter().map(|n| (n.id[1..].parse().unwrap(), n.score)).collect()
}

/// A collection's prompts: the model's own by default, or its own set at creation; shown by
/// GetCollection and `hardneg status`; part of the fingerprint, so a model whose prompts
/// change under a collection that used them refuses text queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn collection_prompts_override_the_models_and_count_in_the_fingerprint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_tree(&fixtures().join("bert-mean-prompts"), &model);
    let expected: Value = serde_json::from_slice(&std::fs::read(model.join("expected.json")).unwrap()).unwrap();
    let texts = texts(&expected);
    let data = tmp.path().join("data");
    let server = Server::start_with_model(&data, &model, &[]).await;
    let mut client = server.client().await;
    let own = client.create(proto::CreateCollectionRequest { name: "own".into(), ..Default::default() }).await.unwrap();
    let plain = client
        .create(proto::CreateCollectionRequest {
            name: "plain".into(),
            query_prompt: Some(String::new()),
            document_prompt: Some(String::new()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((own.query_prompt.as_str(), own.document_prompt.as_str()), ("query: ", "passage: "));
    assert_eq!((plain.query_prompt.as_str(), plain.document_prompt.as_str()), ("", ""));
    assert_ne!(own.encoder_fingerprint, plain.encoder_fingerprint, "the prompts are part of the fingerprint");
    let docs: Vec<proto::Document> = texts.iter().enumerate().filter(|(_, t)| !t.trim().is_empty()).map(|(i, t)| doc(i, t)).collect();
    let n = docs.len();
    for c in ["own", "plain"] {
        client.upsert(c, futures::stream::iter([docs.clone()])).await.unwrap();
    }
    let side = |key: &str| matrix(&expected[key]["embeddings"]);
    let (q, d, e) = (side("encode_query"), side("encode_document"), side("encode"));
    for (collection, queries, documents) in [("own", &q, &d), ("plain", &e, &e)] {
        for (j, score) in scores(&mut client, collection, &texts[1], n).await {
            let want = cos(&queries[1], &documents[j]);
            assert!((score - want).abs() < TOLERANCE, "{collection}: doc {j}: {score} vs {want}");
        }
    }
    let out = std::process::Command::new(bin("hardneg")).args(["--addr", &server.addr, "status"]).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains(r#""query_prompt":"query: ""#) && status.contains(r#""document_prompt":"passage: ""#), "{status}");
    server.stop(Duration::from_secs(30));

    // The model's query prompt changes: "own" was encoded with the old one and refuses text
    // queries; "plain" set its own prompts and still answers.
    let config = model.join("config_sentence_transformers.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    v["prompts"]["query"] = "search query: ".into();
    std::fs::write(&config, v.to_string()).unwrap();
    let server = Server::start_with_model(&data, &model, &[]).await;
    let mut client = server.client().await;
    let req = |c: &str| proto::MineRequest {
        collection: c.into(),
        queries: vec![proto::Query { text: texts[1].clone(), ..Default::default() }],
        options: Some(proto::MineOptions { num_negatives: 2, ..Default::default() }),
        ..Default::default()
    };
    let refused = client.mine(req("own")).await.unwrap_err();
    assert_eq!(refused.code(), Some(tonic::Code::FailedPrecondition), "{refused}");
    assert!(refused.to_string().contains("prompts included"), "{refused}");
    assert_eq!(client.mine(req("plain")).await.unwrap().results[0].negatives.len(), 2);
    server.stop(Duration::from_secs(30));
}
