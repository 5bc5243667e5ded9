//! A vectors-only collection at scale, through the real server binary, each figure beside a
//! baseline measured in the same run:
//! - ingest: vectors/s through gRPC Upsert (one stream, messages of 1000 documents) against
//!   usearch's own add rate on the same vectors with the server's index settings and threads;
//! - memory: the server's resident memory per document (after ingest, less the empty server's)
//!   against the bytes of the vector (f32 as sent, and as the index stores it), text and id;
//! - Mine latency: p50/p99 of 32 query vectors, 8 negatives, client-measured;
//! - restart: start to serving after SIGTERM (index saved at shutdown; answers checked equal),
//!   and after kill -9 following writes made after the last save (1% new documents, 0.1%
//!   updated, 0.1% deleted; the overlap of the answers with those before the kill reported).
//!
//! `cargo bench -p hardneg-server --bench scale` (needs scripts/fetch-models for the server's
//! encoder). HARDNEG_SCALE_N=100000,1000000 sets the collection sizes (default 100000),
//! HARDNEG_SCALE_QUANT=f32,i8 the quantizations (default f32), HARDNEG_SCALE_DIMS the dims
//! (default 384).
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hardneg_server::config::Config;
use hardneg_server::index::{Metric, Quantization, VectorIndex};
use hardneg_server::proto as pb;
use pb::negative_miner_client::NegativeMinerClient;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tonic::transport::Channel;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model_dir() -> PathBuf {
    std::env::var_os("HARDNEG_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models/all-MiniLM-L6-v2"))
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name).unwrap_or_else(|_| default.into()).split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

/// `n` unit vectors around 1000 centres: neighbourhoods like an embedding model's.
fn vectors(n: usize, dims: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let centers: Vec<Vec<f32>> = (0..1000).map(|_| (0..dims).map(|_| rng.random::<f32>() - 0.5).collect()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let c = &centers[rng.random_range(0..centers.len())];
            let mut v: Vec<f32> = c.iter().map(|x| x + 0.25 * (rng.random::<f32>() - 0.5)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            v
        })
        .collect()
}

fn text(i: usize) -> String {
    format!("passage {i} of the synthetic corpus")
}

fn id(i: usize) -> String {
    format!("d{i}")
}

/// Resident and peak resident memory of a process, bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts the server over `data` and waits until it serves; with the time that took.
    async fn start(data: &std::path::Path, quiet_saves: bool) -> (Self, Duration, NegativeMinerClient<Channel>) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = data.with_extension(format!("{port}.log"));
        let started = Instant::now();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hardneg-server"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data)
            .arg("--model-dir")
            .arg(model_dir())
            .env("HARDNEG__LIMITS__MAX_MESSAGE_BYTES", (64 << 20).to_string())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if quiet_saves {
            cmd.env("HARDNEG__INDEX__SAVE_INTERVAL_SECONDS", "0");
        }
        let mut child = cmd.spawn().expect("spawn hardneg-server");
        let addr = format!("http://127.0.0.1:{port}");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("server exited with {status}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            if let Ok(mut client) = NegativeMinerClient::connect(addr.clone()).await {
                if client.list_collections(pb::ListCollectionsRequest {}).await.is_ok() {
                    let client = client.max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
                    return (Self { child, log }, started.elapsed(), client);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: &str) {
        Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
    }

    /// SIGTERM and wait for the exit; how long the shutdown (with its index save) took.
    fn stop(mut self) -> Duration {
        let t = Instant::now();
        self.signal("-TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        t.elapsed()
    }

    fn kill(mut self) {
        self.signal("-KILL");
        self.child.wait().unwrap();
    }
}

/// Upserts documents `range` in messages of 1000 on one stream.
async fn upsert(client: &mut NegativeMinerClient<Channel>, name: &str, docs: &[Vec<f32>], range: std::ops::Range<usize>, text_of: fn(usize) -> String) {
    let name = name.to_string();
    let messages: Vec<pb::UpsertRequest> = range
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(|chunk| pb::UpsertRequest {
            collection: name.clone(),
            documents: chunk.iter().map(|&i| pb::Document { id: id(i), text: text_of(i), vector: docs[i].clone(), ..Default::default() }).collect(),
        })
        .collect();
    client.upsert(futures::stream::iter(messages)).await.expect("upsert");
}

fn mine_req(name: &str, queries: &[Vec<f32>]) -> pb::MineRequest {
    pb::MineRequest {
        collection: name.into(),
        queries: queries.iter().map(|q| pb::Query { vector: q.clone(), ..Default::default() }).collect(),
        options: Some(pb::MineOptions { num_negatives: 8, seed: Some(1), ..Default::default() }),
        ..Default::default()
    }
}

fn ids(resp: &pb::MineResponse) -> Vec<Vec<String>> {
    resp.results.iter().map(|r| r.negatives.iter().map(|n| n.id.clone()).collect()).collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn mib(b: f64) -> f64 {
    b / (1 << 20) as f64
}

async fn run(n: usize, dims: usize, quant: &str) {
    let quantization = Quantization::parse(quant).unwrap_or_else(|| panic!("quantization {quant:?}"));
    println!("\n== {n} vectors, {dims} dims, {quant} ==");
    let t = Instant::now();
    let docs = vectors(n, dims, 1);
    let queries = vectors(32 * 50, dims, 2);
    println!("generated in {:.1} s", t.elapsed().as_secs_f64());

    // Baseline: usearch's own add rate with the server's index settings.
    let cfg = Config::load(None, &Default::default()).expect("default configuration");
    let index = VectorIndex::new(dims, Metric::Cosine, quantization, &cfg.index).unwrap();
    let items: Vec<(u64, Vec<f32>)> = docs.iter().cloned().enumerate().map(|(k, v)| (k as u64, v)).collect();
    let (rss_before, _) = rss(std::process::id());
    let t = Instant::now();
    index.add_blocking(&items).unwrap();
    let usearch_rate = n as f64 / t.elapsed().as_secs_f64();
    let (rss_after, _) = rss(std::process::id());
    drop((index, items));
    println!(
        "usearch add (same vectors, same settings): {usearch_rate:.0} vectors/s; its resident memory {:.0} B/vector",
        rss_after.saturating_sub(rss_before) as f64 / n as f64
    );

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (server, start_empty, mut client) = Server::start(&data, true).await;
    let (empty_rss, _) = rss(server.child.id());
    client
        .create_collection(pb::CreateCollectionRequest {
            name: "scale".into(),
            dims: dims as u32,
            quantization: match quantization {
                Quantization::F32 => pb::Quantization::F32,
                Quantization::F16 => pb::Quantization::F16,
                Quantization::I8 => pb::Quantization::I8,
            } as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let t = Instant::now();
    upsert(&mut client, "scale", &docs, 0..n, text).await;
    let ingest_rate = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "gRPC ingest: {ingest_rate:.0} vectors/s = {:.2}x usearch's add rate (server start, empty: {:.2} s)",
        ingest_rate / usearch_rate,
        start_empty.as_secs_f64()
    );
    let (after_rss, peak_rss) = rss(server.child.id());
    let text_bytes: usize = (0..n).map(|i| text(i).len() + id(i).len()).sum();
    let stored_vector = match quantization {
        Quantization::F32 => 4,
        Quantization::F16 => 2,
        Quantization::I8 => 1,
    } * dims;
    let per_doc = (after_rss.saturating_sub(empty_rss)) as f64 / n as f64;
    let sent = (dims * 4) as f64 + text_bytes as f64 / n as f64;
    let stored = stored_vector as f64 + text_bytes as f64 / n as f64;
    println!(
        "memory: RSS {:.0} MiB (empty server {:.0} MiB, peak {:.0} MiB): {per_doc:.0} B/document = {:.2}x of f32 vector + text + id ({sent:.0} B), {:.2}x with the vector as stored ({stored:.0} B)",
        mib(after_rss as f64),
        mib(empty_rss as f64),
        mib(peak_rss as f64),
        per_doc / sent,
        per_doc / stored
    );

    // Mine latency, 50 distinct batches, 4 rounds after one warm-up round.
    let batches: Vec<pb::MineRequest> = queries.chunks(32).map(|q| mine_req("scale", q)).collect();
    for b in &batches {
        client.mine(b.clone()).await.unwrap();
    }
    let mut latencies = Vec::new();
    let mut server_ms = Vec::new();
    for _ in 0..4 {
        for b in &batches {
            let t = Instant::now();
            let resp = client.mine(b.clone()).await.unwrap().into_inner();
            latencies.push(t.elapsed().as_secs_f64() * 1e3);
            server_ms.push(resp.timings.map(|t| t.total_seconds * 1e3).unwrap_or(0.0));
        }
    }
    latencies.sort_by(f64::total_cmp);
    server_ms.sort_by(f64::total_cmp);
    println!(
        "Mine, 32 query vectors, 8 negatives: p50 {:.1} ms, p99 {:.1} ms end to end ({} batches; server time p50 {:.1} ms)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.len(),
        percentile(&server_ms, 0.5)
    );
    let probe = mine_req("scale", &queries[..32]);
    let before = ids(&client.mine(probe.clone()).await.unwrap().into_inner());

    // Restart after SIGTERM: the index is saved at shutdown and loaded at start.
    drop(client);
    let shutdown = server.stop();
    let (server, start_term, mut client) = Server::start(&data, true).await;
    assert_eq!(ids(&client.mine(probe.clone()).await.unwrap().into_inner()), before, "same answers after SIGTERM");
    println!("restart after SIGTERM: shutdown (with index save) {:.2} s, start to serving {:.2} s", shutdown.as_secs_f64(), start_term.as_secs_f64());

    // A minute's writes after that save, then kill -9.
    let extra = vectors(n / 100, dims, 3);
    let mut all = docs;
    all.extend(extra);
    let t = Instant::now();
    upsert(&mut client, "scale", &all, n..n + n / 100, text).await;
    let updated: Vec<usize> = (0..n / 1000).map(|i| i * 997 % n).collect();
    let moved = |i: usize| format!("updated passage {i}");
    for chunk in updated.chunks(1000) {
        let docs: Vec<pb::Document> = chunk.iter().map(|&i| pb::Document { id: id(i), text: moved(i), vector: all[(i + 1) % n].clone(), ..Default::default() }).collect();
        client.upsert(futures::stream::iter([pb::UpsertRequest { collection: "scale".into(), documents: docs }])).await.unwrap();
    }
    let deleted: Vec<String> = (0..n / 1000).map(|i| id((i * 991 + 5) % n)).collect();
    for chunk in deleted.chunks(1000) {
        client.delete(pb::DeleteRequest { collection: "scale".into(), ids: chunk.to_vec() }).await.unwrap();
    }
    let writes = t.elapsed();
    let expected = ids(&client.mine(probe.clone()).await.unwrap().into_inner());
    drop(client);
    server.kill();
    let (server, start_kill, mut client) = Server::start(&data, true).await;
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    let replayed = log.contains("brought up to date");
    // The replayed graph gets the same vectors in another order (and HNSW inserts run on
    // several threads), so an approximate search may differ at the margin: count the overlap.
    let after = ids(&client.mine(probe).await.unwrap().into_inner());
    let same: usize = after.iter().zip(&expected).map(|(a, e)| a.iter().filter(|id| e.contains(id)).count()).sum();
    let total: usize = expected.iter().map(Vec::len).sum();
    assert!(same as f64 >= 0.95 * total as f64, "after kill -9, {same} of {total} negatives as before");
    println!(
        "restart after kill -9 with {} new, {} updated, {} deleted documents written in the {:.1} s before it: start to serving {:.2} s ({}); {same} of {total} negatives as before the kill",
        n / 100,
        n / 1000,
        n / 1000,
        writes.as_secs_f64(),
        start_kill.as_secs_f64(),
        if replayed { "saved index brought up to date" } else { "index rebuilt" }
    );
    drop(client);
    server.stop();
}

fn main() {
    let dims: usize = std::env::var("HARDNEG_SCALE_DIMS").ok().and_then(|d| d.parse().ok()).unwrap_or(384);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    for n in env_list("HARDNEG_SCALE_N", "100000") {
        let n: usize = n.parse().expect("HARDNEG_SCALE_N: sizes");
        for quant in env_list("HARDNEG_SCALE_QUANT", "f32") {
            rt.block_on(run(n, dims, &quant));
        }
    }
}
