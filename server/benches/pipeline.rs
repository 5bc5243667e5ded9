//! Benchmarks of the pipeline's stages, each reported beside a baseline measured in the same
//! run: encoder tokens/s (batched by length vs a plain unsorted forward pass), search
//! queries/s (HNSW vs exact) on 100k vectors, cross-encoder pairs/s (batched by length vs a
//! plain forward pass; the all-MiniLM-L6-v2 body under a seeded head, which costs what a
//! MiniLM-L6 cross-encoder costs), and Mine latency with the share of each stage on Cranfield
//! (with and without reranking) and on 100k documents.
//!
//! `cargo bench -p hardneg-server --bench pipeline` (needs scripts/fetch-models and
//! ../shared/datasets). HARDNEG_BENCH=encode,archs,search,rerank,mine,refresh picks parts (archs: per
//! architecture on the tiny fixtures of tests/fixtures/models) (refresh:
//! re-encode and trainer-vector refresh times, peak memory, Mine latency during a re-encode);
//! HARDNEG_BENCH_DOCS sets the large collection's size (default 100000).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use hardneg_server::config::{Config, Overrides};
use hardneg_server::encode::embedder::SentenceEmbedder;
use hardneg_server::encode::cpu::{self, KernelsSpec};
use hardneg_server::encode::cross::CrossEncoderModel;
use hardneg_server::encode::testing::seeded_cross_encoder;
use hardneg_server::encode::{BatchConfig, EmbedModel, Encoder, Reranker};
use hardneg_server::engine::Engine;
use hardneg_server::index::{Metric, Quantization, VectorIndex};
use hardneg_server::proto as pb;
use hardneg_server::store::StoredDoc;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model_dir() -> PathBuf {
    std::env::var_os("HARDNEG_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models/all-MiniLM-L6-v2"))
}

fn dataset(name: &str) -> PathBuf {
    std::env::var_os("HARDNEG_DATASETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/datasets"))
        .join(name)
}

#[derive(Deserialize)]
struct Line {
    #[serde(rename = "_id")]
    id: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    text: String,
}

fn read_lines(path: PathBuf) -> Vec<Line> {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn cranfield_docs() -> Vec<StoredDoc> {
    read_lines(dataset("cranfield").join("corpus.jsonl"))
        .into_iter()
        .filter(|d| !(d.title.trim().is_empty() && d.text.trim().is_empty()))
        .map(|d| StoredDoc { id: d.id, title: Some(d.title).filter(|t| !t.is_empty()), text: d.text, metadata: Default::default() })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn part(name: &str) -> bool {
    std::env::var("HARDNEG_BENCH").map(|v| v.split(',').any(|p| p == name)).unwrap_or(true)
}

/// The CPU kernels this machine can run, in the order the tables list them; each is selected
/// for the whole process in turn.
/// HARDNEG_BENCH_KERNELS=blas,fused narrows them.
fn kernel_choices() -> Vec<KernelsSpec> {
    let wanted = |name: &str| std::env::var("HARDNEG_BENCH_KERNELS").map(|v| v.split(',').any(|p| p == name)).unwrap_or(true);
    let mut choices: Vec<KernelsSpec> = [("candle", KernelsSpec::Candle), ("fused", KernelsSpec::Fused)].into_iter().filter(|(n, _)| wanted(n)).map(|(_, c)| c).collect();
    if wanted("blas") {
        match cpu::select(KernelsSpec::Blas, &blas_library()) {
            Ok(line) => {
                println!("{line}");
                choices.push(KernelsSpec::Blas);
            }
            Err(e) => println!("(no blas column: {e})"),
        }
    }
    choices
}

/// HARDNEG_BENCH_BLAS names the BLAS library (default: the server's search).
fn blas_library() -> String {
    std::env::var("HARDNEG_BENCH_BLAS").unwrap_or_default()
}

fn kernels_header(first: &str, choices: &[KernelsSpec], unit: &str) {
    let names: Vec<String> = choices.iter().map(|c| format!("{c:?} ({unit})").to_lowercase()).collect();
    println!("| {first} | {} | best / candle |", names.join(" | "));
    println!("|{}", " --- |".repeat(choices.len() + 2));
}

fn bench_encoder(rt: &tokio::runtime::Runtime) {
    let texts: Vec<String> = cranfield_docs().iter().map(StoredDoc::encoded_text).collect();
    println!("\n## encoder: all-MiniLM-L6-v2, {} Cranfield documents, batch 32, by CPU kernels", texts.len());
    let choices = kernel_choices();
    kernels_header("max length", &choices, "tokens/s");
    // HARDNEG_BENCH_LENGTHS=128 narrows the documents' rows (empty: queries only).
    let lengths: Vec<usize> = std::env::var("HARDNEG_BENCH_LENGTHS").map(|v| v.split(',').filter_map(|l| l.parse().ok()).collect()).unwrap_or(vec![128, 256]);
    for max_len in lengths {
        let cfg = BatchConfig { token_budget: 32 * max_len, max_batch_texts: 32, queue_capacity: 64 };
        let rates: Vec<f64> = choices.iter().map(|&c| {
            cpu::select(c, &blas_library()).unwrap();
            encoder_rate(rt, &model_dir(), max_len, cfg, &texts)
        }).collect();
        let cells: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        println!("| {max_len} | {} | {:.2}x |", cells.join(" | "), rates.iter().cloned().fold(0.0, f64::max) / rates[0]);
    }
    // Queries: short texts, one call per 32 as a Mine request sends them.
    let queries: Vec<String> = read_lines(dataset("cranfield").join("queries.jsonl")).into_iter().map(|q| q.text).collect();
    let cfg = BatchConfig { token_budget: 32 * 256, max_batch_texts: 32, queue_capacity: 64 };
    let rates: Vec<f64> = choices
        .iter()
        .map(|&c| {
            cpu::select(c, &blas_library()).unwrap();
            let encoder = Encoder::load(&model_dir(), 256, cfg).unwrap();
            let tokens: usize = encoder.tokenize(&queries).unwrap().iter().map(|t| t.ids.len()).sum();
            rt.block_on(encoder.encode(queries[..32].to_vec())).unwrap();
            let started = Instant::now();
            for chunk in queries.chunks(32) {
                rt.block_on(encoder.encode(chunk.to_vec())).unwrap();
            }
            tokens as f64 / started.elapsed().as_secs_f64()
        })
        .collect();
    let cells: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    println!("| {} queries, 32 per call | {} | {:.2}x |", queries.len(), cells.join(" | "), rates.iter().cloned().fold(0.0, f64::max) / rates[0]);
    cpu::select(KernelsSpec::Auto, "").unwrap();
}

/// Tokens/s of the model in `dir` called directly on 32 texts at a time in the given order
/// (the baseline), then of the encoder (batched by length across the whole job), same texts.
fn encoder_throughput(rt: &tokio::runtime::Runtime, dir: &std::path::Path, max_len: usize, cfg: BatchConfig, texts: &[String]) -> (f64, f64) {
    let encoder = Encoder::load(dir, max_len, cfg).unwrap();
    let tokenized = encoder.tokenize(texts).unwrap();
    let tokens: usize = tokenized.iter().map(|t| t.ids.len()).sum();
    let mut plain = SentenceEmbedder::load(dir, max_len).unwrap().model;
    let started = Instant::now();
    for chunk in tokenized.chunks(32) {
        let refs: Vec<_> = chunk.iter().collect();
        plain.embed(&refs).unwrap();
    }
    let base = tokens as f64 / started.elapsed().as_secs_f64();
    (base, encoder_rate(rt, dir, max_len, cfg, texts))
}

/// Tokens/s of the encoder (batched by length across the whole job) on `texts`.
fn encoder_rate(rt: &tokio::runtime::Runtime, dir: &std::path::Path, max_len: usize, cfg: BatchConfig, texts: &[String]) -> f64 {
    let encoder = Encoder::load(dir, max_len, cfg).unwrap();
    let tokens: usize = encoder.tokenize(texts).unwrap().iter().map(|t| t.ids.len()).sum();
    // Warm: first-use allocations and the library's buffers are not what is measured.
    rt.block_on(encoder.encode(texts.iter().take(64).cloned().collect())).unwrap();
    let started = Instant::now();
    rt.block_on(encoder.encode(texts.to_vec())).unwrap();
    tokens as f64 / started.elapsed().as_secs_f64()
}

/// A MiniLM-L6 cross-encoder checkpoint (real body, seeded head) in a temporary directory.
fn cross_encoder_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    seeded_cross_encoder(&model_dir(), dir.path(), 1, 42);
    dir
}

/// (query, document) pairs: each Cranfield query with 24 documents.
fn cranfield_pairs(n: usize) -> Vec<(String, String)> {
    let docs: Vec<String> = cranfield_docs().iter().map(StoredDoc::encoded_text).collect();
    let queries = read_lines(dataset("cranfield").join("queries.jsonl"));
    (0..n).map(|i| (queries[(i / 24) % queries.len()].text.clone(), docs[(i * 61) % docs.len()].clone())).collect()
}

fn bench_rerank(rt: &tokio::runtime::Runtime) {
    let dir = cross_encoder_dir();
    let pairs = cranfield_pairs(768);
    println!("\n## cross-encoder: MiniLM-L6 body + classification head, {} Cranfield (query, document) pairs, batch 32", pairs.len());
    println!("| max length | plain forward, file order (pairs/s) | hardneg reranker (pairs/s) | ratio | hardneg tokens/s | mean tokens/pair |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for max_len in [128usize, 256] {
        let cfg = BatchConfig { token_budget: 32 * max_len, max_batch_texts: 32, queue_capacity: 64 };
        let reranker = Reranker::load(dir.path(), max_len, cfg).unwrap();
        let tokenized = reranker.tokenize_pairs(&pairs).unwrap();
        let tokens: usize = tokenized.iter().map(|t| t.ids.len()).sum();

        let mut plain = CrossEncoderModel::load(dir.path(), max_len, &candle_core::Device::Cpu).unwrap().model;
        let started = Instant::now();
        for chunk in tokenized.chunks(32) {
            let refs: Vec<_> = chunk.iter().collect();
            plain.embed(&refs).unwrap();
        }
        let base = pairs.len() as f64 / started.elapsed().as_secs_f64();

        let started = Instant::now();
        rt.block_on(reranker.score(pairs.clone())).unwrap();
        let secs = started.elapsed().as_secs_f64();
        let ours = pairs.len() as f64 / secs;
        println!(
            "| {max_len} | {base:.1} | {ours:.1} | {:.2}x | {:.0} | {:.0} |",
            ours / base,
            tokens as f64 / secs,
            tokens as f64 / pairs.len() as f64
        );
    }
}

/// Clustered unit vectors: recall means something on them, unlike uniform noise.
fn clustered(n: usize, dims: usize, clusters: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<f32>> {
    let centers: Vec<Vec<f32>> = (0..clusters).map(|_| (0..dims).map(|_| rng.random_range(-1.0f32..1.0)).collect()).collect();
    (0..n)
        .map(|_| {
            let c = &centers[rng.random_range(0..clusters)];
            let mut v: Vec<f32> = c.iter().map(|x| x + rng.random_range(-0.6f32..0.6)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            v
        })
        .collect()
}

fn bench_search(rt: &tokio::runtime::Runtime, cfg: &Config, n: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let vectors = clustered(n + 1024, 384, 1000, &mut rng);
    let (docs, queries) = vectors.split_at(n);
    let mut index_cfg = cfg.index.clone();
    index_cfg.exact_search_below = 0;
    let mut index = VectorIndex::new(384, Metric::Cosine, Quantization::F32, &index_cfg).unwrap();
    let started = Instant::now();
    let items: Vec<(u64, Vec<f32>)> = docs.iter().cloned().enumerate().map(|(k, v)| (k as u64, v)).collect();
    index.add_blocking(&items).unwrap();
    let build = started.elapsed().as_secs_f64();
    let k = 64;
    let run = |index: &VectorIndex| {
        let started = Instant::now();
        let mut hits = Vec::new();
        for chunk in queries.chunks(32) {
            hits.extend(rt.block_on(index.search(chunk.iter().map(|q| (q.clone(), k)).collect())).unwrap());
        }
        (queries.len() as f64 / started.elapsed().as_secs_f64(), hits)
    };
    let (hnsw_qps, approx) = run(&index);
    index.set_exact_below(usize::MAX);
    let (exact_qps, exact) = run(&index);
    let mut found = 0;
    for (a, e) in approx.iter().zip(&exact) {
        let truth: std::collections::HashSet<u64> = e.iter().map(|h| h.key).collect();
        found += a.iter().filter(|h| truth.contains(&h.key)).count();
    }
    let recall = found as f64 / (exact.len() * k) as f64;
    println!("\n## search: {n} clustered 384-d vectors, f32 cosine, top-{k}, 32 queries per call");
    println!("| exact (queries/s) | HNSW (queries/s) | ratio | HNSW recall@{k} | build (vectors/s) |");
    println!("| --- | --- | --- | --- | --- |");
    println!("| {exact_qps:.0} | {hnsw_qps:.0} | {:.1}x | {recall:.3} | {:.0} |", hnsw_qps / exact_qps, n as f64 / build);
}

fn mine_latency(
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    collection: &str,
    queries: &[(String, Option<String>)],
    label: &str,
    rerank_candidates: Option<u32>,
) {
    let iterations = if rerank_candidates.is_some() { 8 } else { 30 };
    let mut latencies = Vec::new();
    let mut stages = [0f64; 5];
    for it in 0..iterations + 2 {
        let req = pb::MineRequest {
            collection: collection.into(),
            batch_id: it as u64,
            queries: (0..32)
                .map(|j| {
                    let (text, positive) = &queries[(it * 32 + j) % queries.len()];
                    pb::Query { text: text.clone(), positive_ids: positive.iter().cloned().collect(), ..Default::default() }
                })
                .collect(),
            options: Some(pb::MineOptions {
                num_negatives: 8,
                seed: Some(it as u64),
                rerank: rerank_candidates.map(|_| true),
                rerank_candidates,
                ..Default::default()
            }),
            min_generation: None,
        };
        let params = hardneg_server::api::validate_mine(&req, engine.config()).unwrap();
        let batch = hardneg_server::api::convert::mine_batch(req, params);
        let started = Instant::now();
        let resp = rt.block_on(engine.mine(&batch)).unwrap();
        let elapsed = started.elapsed().as_secs_f64();
        if it < 2 {
            continue;
        }
        latencies.push(elapsed);
        let t = resp.timings;
        for (acc, v) in stages.iter_mut().zip([t.encode_seconds, t.search_seconds, t.filter_seconds, t.total_seconds, t.rerank_seconds]) {
            *acc += v;
        }
    }
    latencies.sort_by(f64::total_cmp);
    let total = stages[3];
    println!(
        "| {label} | {:.1} | {:.1} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.1}% |",
        percentile(&latencies, 0.5) * 1e3,
        percentile(&latencies, 0.99) * 1e3,
        100.0 * stages[0] / total,
        100.0 * stages[1] / total,
        100.0 * stages[2] / total,
        100.0 * stages[4] / total,
        100.0 * (total - stages[0] - stages[1] - stages[2] - stages[4]) / total,
        100.0 * (total - stages[0] - stages[4]) / total,
    );
}

fn bench_mine(rt: &tokio::runtime::Runtime, cfg: Config, n: usize) {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = cfg;
    cfg.server.data_dir = data.path().to_path_buf();
    let cfg = Arc::new(cfg);
    let batch = BatchConfig { token_budget: cfg.encoder.token_budget, max_batch_texts: cfg.encoder.max_batch_texts, queue_capacity: 1024 };
    let encoder = Encoder::load(&cfg.encoder.model_dir, cfg.encoder.max_tokens, batch).unwrap();
    let ce_dir = cross_encoder_dir();
    let reranker = Reranker::load(ce_dir.path(), 256, batch).unwrap();
    let engine = Engine::open(cfg.clone(), encoder, Some(reranker)).unwrap();

    let qrels = std::fs::read_to_string(dataset("cranfield").join("qrels/test.tsv")).unwrap();
    let mut positive: std::collections::HashMap<String, (String, f64)> = std::collections::HashMap::new();
    for line in qrels.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        let score: f64 = f[2].parse().unwrap();
        let e = positive.entry(f[0].to_string()).or_insert((f[1].to_string(), score));
        if score > e.1 {
            *e = (f[1].to_string(), score);
        }
    }
    let queries: Vec<(String, Option<String>)> = read_lines(dataset("cranfield").join("queries.jsonl"))
        .into_iter()
        .map(|q| {
            let p = positive.get(&q.id).map(|p| p.0.clone());
            (q.text, p)
        })
        .collect();

    let cran = rt.block_on(engine.create("cranfield", Metric::Cosine, Quantization::F32, Default::default())).unwrap();
    let coll = engine.get(&cran.name).unwrap();
    let started = Instant::now();
    rt.block_on(engine.upsert(&coll, cranfield_docs())).unwrap();
    let ingest = started.elapsed().as_secs_f64();

    rt.block_on(engine.create("synthetic", Metric::Cosine, Quantization::F32, Default::default())).unwrap();
    let coll = engine.get("synthetic").unwrap();
    let words: Vec<String> = (0..5000).map(|i| format!("w{i:x}")).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let vectors = clustered(n, 384, 1000, &mut rng);
    let started = Instant::now();
    for (c, chunk) in vectors.chunks(5000).enumerate() {
        let docs = (0..chunk.len())
            .map(|i| StoredDoc {
                id: format!("s{}", c * 5000 + i),
                title: None,
                text: (0..24).map(|_| words[rng.random_range(0..words.len())].as_str()).collect::<Vec<_>>().join(" "),
                metadata: Default::default(),
            })
            .collect();
        rt.block_on(engine.upsert_encoded(&coll, docs, chunk.to_vec())).unwrap();
    }
    let load = started.elapsed().as_secs_f64();
    println!("\n## Mine: 32 text queries (Cranfield), 8 negatives, top sampling, default options");
    println!("(Cranfield ingest through the encoder: {:.1} docs/s; {n} precomputed vectors stored and indexed: {:.0} docs/s)", 1398.0 / ingest, n as f64 / load);
    println!("| collection | p50 ms | p99 ms | encode | search | filter+sample | rerank | other | all but encode and rerank |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    mine_latency(rt, &engine, "cranfield", &queries, "Cranfield, 1398 docs (exact search)", None);
    mine_latency(rt, &engine, "cranfield", &queries, "Cranfield, rerank 24 candidates/query (256 tokens)", Some(24));
    let no_positives: Vec<(String, Option<String>)> = queries.iter().map(|(t, _)| (t.clone(), None)).collect();
    mine_latency(rt, &engine, "synthetic", &no_positives, &format!("synthetic, {n} docs (HNSW)"), None);
}

/// Resident memory of this process, in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs `f`, sampling resident memory every 50 ms; returns its result, seconds, and the
/// peak rise over the resident memory at the start (MiB).
fn measured<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let start = rss_mib();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0f64;
        while !flag.load(std::sync::atomic::Ordering::Acquire) {
            peak = peak.max(rss_mib());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        peak
    });
    let started = Instant::now();
    let out = f();
    let secs = started.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Release);
    let peak = sampler.join().unwrap().max(rss_mib());
    (out, secs, (peak - start).max(0.0))
}

fn bench_refresh(rt: &tokio::runtime::Runtime, cfg: Config, n: usize) {
    let data = tempfile::tempdir().unwrap();
    let models = data.path().join("models");
    hardneg_server::encode::testing::perturbed_checkpoint(&model_dir(), &models.join("step-2"), 2, 0.02);
    let mut cfg = cfg;
    cfg.server.data_dir = data.path().join("data");
    cfg.encoder.models_root = models.clone();
    let cfg = Arc::new(cfg);
    let batch = BatchConfig { token_budget: cfg.encoder.token_budget, max_batch_texts: cfg.encoder.max_batch_texts, queue_capacity: 1024 };
    let encoder = Encoder::load(&cfg.encoder.model_dir, cfg.encoder.max_tokens, batch).unwrap();
    let engine = Arc::new(Engine::open(cfg.clone(), encoder, None).unwrap());
    rt.block_on(engine.create("cranfield", Metric::Cosine, Quantization::F32, Default::default())).unwrap();
    let coll = engine.get("cranfield").unwrap();
    rt.block_on(engine.upsert(&coll, cranfield_docs())).unwrap();
    let queries: Vec<(String, Option<String>)> =
        read_lines(dataset("cranfield").join("queries.jsonl")).into_iter().map(|q| (q.text, None)).collect();

    println!("\n## refresh (1398 Cranfield documents; {n} synthetic documents with precomputed vectors)");
    println!("| collection | mode | documents | seconds | documents/s | peak memory rise |");
    println!("| --- | --- | --- | --- | --- | --- |");
    // Mine latency alone, then while a re-encode runs.
    let alone = mine_p50(rt, &engine, "cranfield", &queries, 12);
    let dir = models.join("step-2");
    let (during, secs, mem) = measured(|| {
        rt.block_on(async {
            let progress = engine.start_reencode(&coll, &dir).await.unwrap();
            let mut latencies = Vec::new();
            while !["done", "failed", "cancelled"].contains(&progress.borrow().phase.as_str()) {
                latencies.push(mine_once(&engine, "cranfield", &queries, latencies.len()).await);
            }
            assert_eq!(progress.borrow().phase.as_str(), "done", "{:?}", progress.borrow().error);
            latencies
        })
    });
    let reencode_rate = 1398.0 / secs;
    println!("| Cranfield | re-encode (while mining) | 1398 | {secs:.1} | {:.1} | {mem:.0} MiB |", 1398.0 / secs);
    let vectors: Vec<(String, Vec<f32>)> = {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let docs = cranfield_docs();
        let vs = clustered(docs.len(), 384, 50, &mut rng);
        docs.into_iter().map(|d| d.id).zip(vs).collect()
    };
    let (_, secs, mem) = measured(|| {
        rt.block_on(async {
            engine.upload_vectors(&coll, "trainer", vectors.clone()).await.unwrap();
            engine.commit_vectors(&coll).await.unwrap();
        })
    });
    println!("| Cranfield | trainer vectors (upload + commit) | 1398 | {secs:.2} | {:.0} | {mem:.0} MiB |", 1398.0 / secs);

    rt.block_on(engine.create("synthetic", Metric::Cosine, Quantization::F32, Default::default())).unwrap();
    let syn = engine.get("synthetic").unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let base = clustered(n, 384, 1000, &mut rng);
    for (c, chunk) in base.chunks(5000).enumerate() {
        let docs = (0..chunk.len())
            .map(|i| StoredDoc { id: format!("s{}", c * 5000 + i), title: None, text: format!("document {}", c * 5000 + i), metadata: Default::default() })
            .collect();
        rt.block_on(engine.upsert_encoded(&syn, docs, chunk.to_vec())).unwrap();
    }
    let fresh = clustered(n, 384, 1000, &mut rng);
    let (_, secs, mem) = measured(|| {
        rt.block_on(async {
            for (c, chunk) in fresh.chunks(5000).enumerate() {
                let rows = chunk.iter().enumerate().map(|(i, v)| (format!("s{}", c * 5000 + i), v.clone())).collect();
                engine.upload_vectors(&syn, "trainer", rows).await.unwrap();
            }
            engine.commit_vectors(&syn).await.unwrap();
        })
    });
    println!("| synthetic | trainer vectors (upload + commit) | {n} | {secs:.1} | {:.0} | {mem:.0} MiB |", n as f64 / secs);
    let mut during = during;
    during.sort_by(f64::total_cmp);
    println!(
        "\nMine, 32 Cranfield text queries, 8 negatives: p50 {:.0} ms alone, {:.0} ms during the re-encode ({:.2}x; {} requests during it)",
        alone * 1e3,
        percentile(&during, 0.5) * 1e3,
        percentile(&during, 0.5) / alone,
        during.len()
    );
    println!(
        "(a re-encode of {n} documents at the rate measured above would take about {:.0} minutes on this machine; not run)",
        n as f64 / reencode_rate / 60.0
    );
}

async fn mine_once(engine: &Engine, collection: &str, queries: &[(String, Option<String>)], it: usize) -> f64 {
    let req = pb::MineRequest {
        collection: collection.into(),
        batch_id: it as u64,
        queries: (0..32).map(|j| pb::Query { text: queries[(it * 32 + j) % queries.len()].0.clone(), ..Default::default() }).collect(),
        options: Some(pb::MineOptions { num_negatives: 8, seed: Some(it as u64), ..Default::default() }),
        min_generation: None,
    };
    let params = hardneg_server::api::validate_mine(&req, engine.config()).unwrap();
    let batch = hardneg_server::api::convert::mine_batch(req, params);
    let started = Instant::now();
    engine.mine(&batch).await.unwrap();
    started.elapsed().as_secs_f64()
}

fn mine_p50(rt: &tokio::runtime::Runtime, engine: &Engine, collection: &str, queries: &[(String, Option<String>)], n: usize) -> f64 {
    let mut latencies: Vec<f64> = (0..n + 2).map(|it| rt.block_on(mine_once(engine, collection, queries, it))).skip(2).collect();
    latencies.sort_by(f64::total_cmp);
    percentile(&latencies, 0.5)
}

/// Encoder throughput per architecture on the tiny fixtures of tests/fixtures/models (the
/// plumbing's cost: tokenizer, batching, pooling, Dense, norm), beside the plain model call on
/// the same tokenized batches in the same run.
fn bench_architectures(rt: &tokio::runtime::Runtime) {
    let fixtures = root().join("tests/fixtures/models");
    println!("\n## encoder per architecture: tiny random fixtures (hidden 32, 2-3 layers), their 9-10 texts x 64, batch 32");
    println!("| fixture | plain forward (tokens/s) | hardneg encoder (tokens/s) | ratio |");
    println!("| --- | --- | --- | --- |");
    let names = [
        "bert-mean-normalize",
        "bert-mean-dense-normalize",
        "xlm-roberta-mean-normalize",
        "distilbert-mean",
        "mpnet-mean-normalize",
        "modernbert-mean-normalize",
        "qwen3-lasttoken-normalize",
        "qwen2-lasttoken-left",
        "qwen2-sliding-lasttoken",
        "gemma3-mean-dense-normalize",
    ];
    for name in names {
        let dir = fixtures.join(name);
        let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
        let texts: Vec<String> = expected["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        let texts: Vec<String> = (0..64).flat_map(|_| texts.iter().cloned()).collect();
        let cfg = BatchConfig { token_budget: 32 * 64, max_batch_texts: 32, queue_capacity: 64 };
        let (base, ours) = encoder_throughput(rt, &dir, 0, cfg, &texts);
        println!("| {name} | {base:.0} | {ours:.0} | {:.2}x |", ours / base);
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut cfg = Config::load(None, &Overrides { model_dir: Some(model_dir()), ..Default::default() }).unwrap();
    cfg.encoder.max_tokens = 256;
    let n: usize = std::env::var("HARDNEG_BENCH_DOCS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    println!("# hardneg pipeline benchmark ({} threads available)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    if part("encode") {
        bench_encoder(&rt);
    }
    if part("archs") {
        bench_architectures(&rt);
    }
    if part("search") {
        bench_search(&rt, &cfg, n);
    }
    if part("rerank") {
        bench_rerank(&rt);
    }
    if part("mine") {
        bench_mine(&rt, cfg.clone(), n);
    }
    if part("refresh") {
        bench_refresh(&rt, cfg, n);
    }
}
