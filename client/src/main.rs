//! `hardneg`: the command-line client. JSONL in, JSONL out, so any language can pipe.
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use hardneg_client::beir::{self, BeirQuery, CorpusDoc};
use hardneg_client::{Client, proto};
use serde_json::json;

#[derive(Parser)]
#[command(name = "hardneg", version, about = "Client for the hardneg hard-negative mining service")]
struct Cli {
    /// Server address.
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051", env = "HARDNEG_ADDR")]
    addr: String,
    /// Bearer token, for servers with auth on.
    #[arg(long, global = true, env = "HARDNEG_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file of the CA that signed the server's TLS certificate (https:// addresses; without
    /// it, the system's roots are trusted).
    #[arg(long, global = true, env = "HARDNEG_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The name the server's certificate is checked against, when not the address's host.
    #[arg(long, global = true, env = "HARDNEG_TLS_DOMAIN")]
    tls_domain: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a collection bound to the server's encoder.
    Create {
        #[arg(long)]
        collection: String,
        #[arg(long, value_enum, default_value_t = Quant::F32)]
        quantization: Quant,
    },
    /// Ingest a BEIR corpus.jsonl ({"_id","title","text"}); the encoded text is title + " " + text.
    Ingest {
        #[arg(long)]
        collection: String,
        #[arg(long)]
        corpus: PathBuf,
        /// Documents per Upsert call (each call is durable when it returns).
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
    },
    /// Mine hard negatives; one JSON line per query on stdout.
    Mine {
        #[arg(long)]
        collection: String,
        /// BEIR queries.jsonl (with --qrels).
        #[arg(long, requires = "qrels", conflicts_with = "pairs")]
        queries: Option<PathBuf>,
        /// BEIR qrels TSV: a query's positive is its highest-scored judged document.
        #[arg(long, requires = "queries")]
        qrels: Option<PathBuf>,
        /// JSONL of {"query": ..., "positive": ...} or {"query": ..., "positive_id": ...}.
        #[arg(long, required_unless_present = "queries")]
        pairs: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        #[command(flatten)]
        opts: MineFlags,
    },
    /// Quality protocol: hide every judged document but the positive, mine, and count leaks.
    Eval {
        #[arg(long)]
        collection: String,
        #[arg(long)]
        queries: PathBuf,
        #[arg(long)]
        qrels: PathBuf,
        #[command(flatten)]
        opts: MineFlags,
    },
    /// Move a collection to a new index generation: re-encode every document with a checkpoint
    /// (--encoder, a directory under the server's encoder.models_root), or upload the trainer's
    /// own vectors and commit them (--vectors with --encoder-name), or --cancel either.
    Refresh {
        #[arg(long)]
        collection: String,
        /// Checkpoint directory to re-encode with (relative to the server's models root).
        #[arg(long, conflicts_with_all = ["vectors", "cancel"], required_unless_present_any = ["vectors", "cancel"])]
        encoder: Option<String>,
        /// JSONL of {"id","vector"}, or a .npy float32/float64 matrix with --ids.
        #[arg(long, requires = "encoder_name", conflicts_with = "cancel")]
        vectors: Option<PathBuf>,
        /// For .npy vectors: document ids, one per line, in row order.
        #[arg(long, requires = "vectors")]
        ids: Option<PathBuf>,
        /// Names the encoder the uploaded vectors came from (e.g. a checkpoint step).
        #[arg(long)]
        encoder_name: Option<String>,
        /// Vectors per upload message.
        #[arg(long, default_value_t = 1024)]
        batch_size: usize,
        /// Cancel a running re-encode or discard pending uploaded vectors.
        #[arg(long)]
        cancel: bool,
    },
    /// Every collection with its size, generation and pending documents.
    Status,
    /// Exit 0 when the server is serving, 1 otherwise.
    Health,
    /// Drop a collection with all its documents.
    Drop {
        #[arg(long)]
        collection: String,
    },
    /// Load generator for Mine: concurrent clients, throughput, p50/p95/p99 latency, errors by
    /// gRPC code and the share of each server stage, as one JSON line.
    Bench(BenchFlags),
}

/// `hardneg bench` options.
#[derive(Args, Clone)]
struct BenchFlags {
    #[arg(long)]
    collection: String,
    /// BEIR queries.jsonl to draw query texts from (cycled through in file order).
    #[arg(long)]
    queries: PathBuf,
    /// Clients sending at once; each is a clone of the CLI's channel, so their calls share one
    /// HTTP/2 connection (and its TLS and token settings).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Measured requests in all clients together (50 when --duration-seconds is not given either).
    #[arg(long, visible_alias = "iterations")]
    requests: Option<usize>,
    /// Start no request after this many seconds; with --requests, whichever bound comes first.
    #[arg(long)]
    duration_seconds: Option<f64>,
    /// Unmeasured requests sent first, one at a time; a failure there stops the bench.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 8)]
    num_negatives: u32,
    /// Queries per request.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Rerank with the server's cross-encoder.
    #[arg(long)]
    rerank: bool,
    /// Candidates the cross-encoder scores per query (implies --rerank).
    #[arg(long)]
    rerank_candidates: Option<u32>,
    /// Drive MineStream instead of unary Mine: each client keeps one stream open.
    #[arg(long)]
    stream: bool,
    /// With --stream: batches each stream keeps in flight.
    #[arg(long, default_value_t = 2)]
    window: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Quant {
    F32,
    F16,
    I8,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Format {
    /// One line per query with its negatives and drop counts.
    Jsonl,
    /// sentence-transformers style: one {"anchor","positive","negative"} line per negative.
    Triplet,
}

#[derive(Clone, Copy, ValueEnum)]
enum SamplingFlag {
    Top,
    Uniform,
    Softmax,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum PresetFlag {
    /// Only the options given.
    None,
    /// relative_margin 0.05, max_positive_similarity and adaptive depth (see README).
    Denoised,
}

/// Mining options, named after their proto fields. Unset options take the preset's value,
/// then the server's default.
#[derive(Args, Clone)]
struct MineFlags {
    /// Settings to start from; the flags given here override them.
    #[arg(long, value_enum, default_value_t = PresetFlag::None)]
    preset: PresetFlag,
    #[arg(long, default_value_t = 5)]
    num_negatives: u32,
    #[arg(long, default_value_t = 0)]
    range_min: u32,
    #[arg(long)]
    range_max: Option<u32>,
    #[arg(long)]
    min_score: Option<f32>,
    #[arg(long)]
    max_score: Option<f32>,
    #[arg(long)]
    absolute_margin: Option<f32>,
    #[arg(long)]
    relative_margin: Option<f32>,
    #[arg(long, value_enum, default_value_t = SamplingFlag::Top)]
    sampling: SamplingFlag,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Search deeper when filters leave too few (server default: true).
    #[arg(long, action = clap::ArgAction::Set)]
    adaptive_depth: Option<bool>,
    /// Exclude the batch's other positives (server default: true).
    #[arg(long, action = clap::ArgAction::Set)]
    exclude_batch_positives: Option<bool>,
    /// Drop candidates whose cosine similarity to one of the query's positives is above this.
    #[arg(long)]
    max_positive_similarity: Option<f32>,
    /// Score candidates with the server's cross-encoder; filter, order and sample by it.
    #[arg(long)]
    rerank: bool,
    /// Candidates scored per query (default 3 x num-negatives).
    #[arg(long, requires = "rerank")]
    rerank_candidates: Option<u32>,
    /// Drop candidates whose cross-encoder probability is at least this.
    #[arg(long, requires = "rerank")]
    ce_max_score: Option<f32>,
    /// Drop candidates whose cross-encoder probability is at least the positive's x (1 - m).
    #[arg(long, requires = "rerank")]
    ce_relative_margin: Option<f32>,
    /// Queries per Mine request.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
}

impl MineFlags {
    fn options(&self, return_text: bool) -> proto::MineOptions {
        proto::MineOptions {
            num_negatives: self.num_negatives,
            range_min: self.range_min,
            range_max: self.range_max,
            min_score: self.min_score,
            max_score: self.max_score,
            absolute_margin: self.absolute_margin,
            relative_margin: self.relative_margin,
            sampling: match self.sampling {
                SamplingFlag::Top => proto::Sampling::Top,
                SamplingFlag::Uniform => proto::Sampling::Uniform,
                SamplingFlag::Softmax => proto::Sampling::Softmax,
            } as i32,
            temperature: self.temperature,
            seed: self.seed,
            adaptive_depth: self.adaptive_depth,
            exclude_batch_positives: self.exclude_batch_positives,
            return_text,
            preset: match self.preset {
                PresetFlag::None => proto::Preset::Unspecified,
                PresetFlag::Denoised => proto::Preset::Denoised,
            } as i32,
            rerank: self.rerank.then_some(true),
            rerank_candidates: self.rerank_candidates,
            ce_max_score: self.ce_max_score,
            ce_relative_margin: self.ce_relative_margin,
            max_positive_similarity: self.max_positive_similarity,
        }
    }
}

/// One query to mine, as read from the input.
#[derive(Clone)]
struct QueryIn {
    id: String,
    text: String,
    positive_id: Option<String>,
    positive_text: Option<String>,
}

fn beir_queries(queries: &PathBuf, qrels: &PathBuf) -> anyhow::Result<(Vec<QueryIn>, HashMap<String, beir::Judgments>)> {
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

fn pair_queries(path: &PathBuf) -> anyhow::Result<Vec<QueryIn>> {
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

/// Mines every query through MineStream, batches in flight, answers in input order.
async fn mine_all(
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
                    vector: Vec::new(),
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

fn drop_json(d: &Option<proto::DropCounts>) -> serde_json::Value {
    let d = d.clone().unwrap_or_default();
    json!({
        "positive": d.positive, "duplicate_text": d.duplicate_text, "batch_positive": d.batch_positive,
        "window": d.window, "score_bound": d.score_bound, "margin": d.margin,
        "positive_similarity": d.positive_similarity, "ce_score": d.ce_score, "ce_margin": d.ce_margin,
    })
}

async fn ingest(client: &mut Client, collection: &str, corpus: &PathBuf, batch_size: usize) -> anyhow::Result<()> {
    let docs: Vec<CorpusDoc> = beir::read_jsonl(corpus)?;
    let (docs, empty): (Vec<CorpusDoc>, Vec<CorpusDoc>) =
        docs.into_iter().partition(|d| !(d.title.trim().is_empty() && d.text.trim().is_empty()));
    for d in &empty {
        eprintln!("skipping document {:?}: no title and no text", d.id);
    }
    client.get_collection(collection).await?;
    let bar = indicatif::ProgressBar::new(docs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} docs {per_sec} eta {eta}")
            .expect("static progress template"),
    );
    let started = Instant::now();
    let (mut inserted, mut updated, mut doc_count) = (0, 0, 0);
    for chunk in docs.chunks(batch_size.max(1)) {
        let batch: Vec<proto::Document> = chunk
            .iter()
            .map(|d| proto::Document {
                id: d.id.clone(),
                text: d.text.clone(),
                title: (!d.title.trim().is_empty()).then(|| d.title.clone()),
                metadata: Default::default(),
            })
            .collect();
        let resp = client.upsert(collection, futures::stream::iter([batch])).await?;
        inserted += resp.inserted;
        updated += resp.updated;
        doc_count = resp.doc_count;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"inserted": inserted, "updated": updated, "skipped": empty.len(), "doc_count": doc_count,
               "seconds": secs, "docs_per_second": docs.len() as f64 / secs.max(1e-9)})
    );
    Ok(())
}

async fn mine(
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

async fn eval(client: &mut Client, collection: &str, queries: &PathBuf, qrels: &PathBuf, opts: &MineFlags) -> anyhow::Result<()> {
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

async fn reencode(client: &mut Client, collection: &str, dir: &str) -> anyhow::Result<()> {
    let mut stream = client.refresh(collection, dir).await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} docs ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut last = None;
    while let Some(p) = stream.next().await {
        let p = p.map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
        bar.set_length(p.total);
        bar.set_position(p.done);
        bar.set_message(format!("generation {} {}", p.generation, p.phase));
        last = Some(p);
    }
    bar.finish_and_clear();
    let p = last.context("the server sent no progress")?;
    println!(
        "{}",
        json!({"collection": p.collection, "generation": p.generation, "phase": p.phase, "documents": p.done,
               "seconds": p.elapsed_seconds, "docs_per_second": p.docs_per_second})
    );
    Ok(())
}

/// Reads (id, vector) rows: JSONL {"id","vector"}, or a .npy matrix with an id file.
fn read_vectors(path: &PathBuf, ids: Option<&PathBuf>) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    if path.extension().is_some_and(|e| e == "npy") {
        let ids_path = ids.context("a .npy file needs --ids (one document id per line, in row order)")?;
        let ids: Vec<String> = std::fs::read_to_string(ids_path)
            .with_context(|| ids_path.display().to_string())?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        let rows = read_npy(path)?;
        if rows.len() != ids.len() {
            bail!("{}: {} rows, {}: {} ids", path.display(), rows.len(), ids_path.display(), ids.len());
        }
        return Ok(ids.into_iter().zip(rows).collect());
    }
    #[derive(serde::Deserialize)]
    struct Row {
        id: String,
        vector: Vec<f32>,
    }
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let row: Row = serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))?;
            Ok((row.id, row.vector))
        })
        .collect()
}

/// A 2-d little-endian float32 or float64 .npy matrix (C order), as rows of f32.
fn read_npy(path: &PathBuf) -> anyhow::Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    let bad = |why: &str| anyhow::anyhow!("{}: {why}", path.display());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        _ => return Err(bad("unsupported .npy version")),
    };
    let header = std::str::from_utf8(bytes.get(start..start + header_len).ok_or_else(|| bad("truncated header"))?)
        .map_err(|_| bad("header is not text"))?;
    let width = if header.contains("'<f4'") {
        4
    } else if header.contains("'<f8'") {
        8
    } else {
        return Err(bad("dtype must be little-endian float32 or float64"));
    };
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order is not supported; save with numpy.ascontiguousarray"));
    }
    let shape = header
        .split("'shape':")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .map(|r| r.trim().trim_start_matches('(').split(',').filter_map(|d| d.trim().parse::<usize>().ok()).collect::<Vec<_>>())
        .ok_or_else(|| bad("no shape in the header"))?;
    let [rows, cols] = shape[..] else {
        return Err(bad("must be a 2-d matrix (documents x dims)"));
    };
    let data = &bytes[start + header_len..];
    if data.len() != rows * cols * width {
        return Err(bad("data size does not match the shape"));
    }
    let value = |i: usize| -> f32 {
        let b = &data[i * width..(i + 1) * width];
        if width == 4 { f32::from_le_bytes(b.try_into().expect("4 bytes")) } else { f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32 }
    };
    Ok((0..rows).map(|r| (0..cols).map(|c| value(r * cols + c)).collect()).collect())
}

async fn upload(client: &mut Client, collection: &str, path: &PathBuf, ids: Option<&PathBuf>, encoder_name: &str, batch_size: usize) -> anyhow::Result<()> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let rows = read_vectors(path, ids)?;
    let started = Instant::now();
    let batches: Vec<Vec<(String, Vec<f32>)>> = rows.chunks(batch_size).map(|c| c.to_vec()).collect();
    let uploaded = client.upload_vectors(collection, encoder_name, futures::stream::iter(batches)).await?;
    if uploaded.missing > 0 {
        bail!(
            "uploaded {} vectors into pending generation {}, but {} live documents still have none: upload them and run this again (or --cancel)",
            uploaded.received, uploaded.generation, uploaded.missing
        );
    }
    let committed = client.commit_vectors(collection).await?;
    let info = committed.collection.unwrap_or_default();
    println!(
        "{}",
        json!({"collection": collection, "generation": info.generation, "vectors": uploaded.received,
               "seconds": started.elapsed().as_secs_f64(), "commit_seconds": committed.seconds})
    );
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// What the bench clients saw: latencies of answered requests, summed server stage times
/// (encode, search, filter, total, rerank) and failures by gRPC code.
#[derive(Default)]
struct BenchTally {
    latencies: Vec<f64>,
    stages: [f64; 5],
    errors: std::collections::BTreeMap<String, u64>,
}

impl BenchTally {
    fn ok(&mut self, latency: f64, resp: &proto::MineResponse) {
        self.latencies.push(latency);
        let t = resp.timings.unwrap_or_default();
        for (acc, v) in self.stages.iter_mut().zip([t.encode_seconds, t.search_seconds, t.filter_seconds, t.total_seconds, t.rerank_seconds]) {
            *acc += v;
        }
    }

    fn failed(&mut self, code: Option<hardneg_client::Code>) {
        *self.errors.entry(code.map_or_else(|| "CLIENT".to_string(), code_name)).or_default() += 1;
    }

    fn merge(&mut self, other: BenchTally) {
        self.latencies.extend(other.latencies);
        for (acc, v) in self.stages.iter_mut().zip(other.stages) {
            *acc += v;
        }
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
    }
}

/// The canonical name of a gRPC code, e.g. `RESOURCE_EXHAUSTED`.
fn code_name(code: hardneg_client::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if i > 0 && c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Hands out request numbers to the bench clients until the count or the deadline is reached.
struct Tickets {
    next: std::sync::atomic::AtomicUsize,
    limit: Option<usize>,
    deadline: Option<Instant>,
}

impl Tickets {
    fn take(&self) -> Option<usize> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.limit.is_none_or(|l| n < l).then_some(n)
    }
}

/// Request number `n`: `batch_size` queries taken cyclically from the file, seeded by `n`.
fn bench_request(flags: &BenchFlags, qs: &[BeirQuery], n: usize) -> proto::MineRequest {
    let rerank = flags.rerank || flags.rerank_candidates.is_some();
    proto::MineRequest {
        collection: flags.collection.clone(),
        batch_id: n as u64,
        queries: (0..flags.batch_size)
            .map(|j| {
                let q = &qs[(n * flags.batch_size + j) % qs.len()];
                proto::Query { id: q.id.clone(), text: q.text.clone(), ..Default::default() }
            })
            .collect(),
        options: Some(proto::MineOptions {
            num_negatives: flags.num_negatives,
            seed: Some(n as u64),
            rerank: rerank.then_some(true),
            rerank_candidates: flags.rerank_candidates,
            ..Default::default()
        }),
        min_generation: None,
    }
}

/// One bench client on unary Mine: one request at a time.
async fn bench_unary(mut client: Client, flags: Arc<BenchFlags>, qs: Arc<Vec<BeirQuery>>, tickets: Arc<Tickets>) -> BenchTally {
    let mut tally = BenchTally::default();
    while let Some(t) = tickets.take() {
        let req = bench_request(&flags, &qs, flags.warmup + t);
        let started = Instant::now();
        match client.mine(req).await {
            Ok(resp) => tally.ok(started.elapsed().as_secs_f64(), &resp),
            Err(e) => tally.failed(e.code()),
        }
    }
    tally
}

/// One bench client on MineStream: up to `window` batches in flight on one stream; latency runs
/// from handing a batch to the stream to its response. A failed stream fails the batches in
/// flight on it, and the next batch opens a new one.
async fn bench_stream(mut client: Client, flags: Arc<BenchFlags>, qs: Arc<Vec<BeirQuery>>, tickets: Arc<Tickets>) -> BenchTally {
    let mut tally = BenchTally::default();
    let mut more = true;
    while more {
        let (tx, rx) = tokio::sync::mpsc::channel(flags.window);
        let mut in_flight = std::collections::VecDeque::new();
        let send = |tx: &tokio::sync::mpsc::Sender<proto::MineRequest>, in_flight: &mut std::collections::VecDeque<(u64, Instant)>| {
            let Some(t) = tickets.take() else { return false };
            let req = bench_request(&flags, &qs, flags.warmup + t);
            in_flight.push_back((req.batch_id, Instant::now()));
            // The channel holds `window` and at most `window` batches are unanswered.
            let _ = tx.try_send(req);
            true
        };
        while in_flight.len() < flags.window && send(&tx, &mut in_flight) {}
        if in_flight.is_empty() {
            break;
        }
        let mut responses = match client.mine_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(s) => s,
            Err(e) => {
                in_flight.drain(..).for_each(|_| tally.failed(e.code()));
                continue;
            }
        };
        let mut tx = Some(tx);
        while let Some(msg) = responses.next().await {
            match msg {
                Ok(resp) => {
                    let Some((batch_id, started)) = in_flight.pop_front() else { break };
                    if resp.batch_id == batch_id {
                        tally.ok(started.elapsed().as_secs_f64(), &resp);
                    } else {
                        tally.failed(None);
                    }
                    if let Some(s) = &tx
                        && !send(s, &mut in_flight)
                    {
                        // Closing the request stream lets the server end the response stream.
                        tx = None;
                        more = false;
                    }
                }
                Err(status) => {
                    in_flight.drain(..).for_each(|_| tally.failed(Some(status.code())));
                    break;
                }
            }
        }
        // A stream that ended early leaves its unanswered batches failed.
        in_flight.drain(..).for_each(|_| tally.failed(Some(hardneg_client::Code::Unknown)));
    }
    tally
}

/// Runs the load and prints its JSON line; false when no request was answered.
async fn bench(client: &mut Client, flags: BenchFlags) -> anyhow::Result<bool> {
    if flags.batch_size == 0 || flags.concurrency == 0 || flags.window == 0 || flags.requests == Some(0) {
        bail!("--batch-size, --concurrency, --window and --requests must be at least 1");
    }
    if flags.duration_seconds.is_some_and(|d| !(d > 0.0 && d.is_finite())) {
        bail!("--duration-seconds must be a positive number");
    }
    let qs: Vec<BeirQuery> = beir::read_jsonl(&flags.queries)?;
    if qs.is_empty() {
        bail!("{}: no queries", flags.queries.display());
    }
    for n in 0..flags.warmup {
        client.mine(bench_request(&flags, &qs, n)).await.context("warm-up request")?;
    }
    let limit = flags.requests.or(flags.duration_seconds.is_none().then_some(50));
    let started = Instant::now();
    let tickets = Arc::new(Tickets {
        next: Default::default(),
        limit,
        deadline: flags.duration_seconds.map(|d| started + std::time::Duration::from_secs_f64(d)),
    });
    let (flags, qs) = (Arc::new(flags), Arc::new(qs));
    let workers: Vec<_> = (0..flags.concurrency)
        .map(|_| {
            let (c, f, q, t) = (client.clone(), flags.clone(), qs.clone(), tickets.clone());
            if flags.stream { tokio::spawn(bench_stream(c, f, q, t)) } else { tokio::spawn(bench_unary(c, f, q, t)) }
        })
        .collect();
    let mut tally = BenchTally::default();
    for w in workers {
        tally.merge(w.await.context("a bench client panicked")?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies = tally.latencies;
    latencies.sort_by(f64::total_cmp);
    let ok = latencies.len();
    let failed: u64 = tally.errors.values().sum();
    let stages = tally.stages;
    let total = stages[3].max(1e-12);
    let ms = |p: f64| percentile(&latencies, p) * 1e3;
    println!(
        "{}",
        json!({
            "mode": if flags.stream { "stream" } else { "unary" }, "concurrency": flags.concurrency,
            "window": flags.stream.then_some(flags.window),
            "batch_queries": flags.batch_size, "num_negatives": flags.num_negatives,
            "rerank": flags.rerank || flags.rerank_candidates.is_some(), "rerank_candidates": flags.rerank_candidates,
            "requests": ok as u64 + failed, "ok": ok, "errors": failed, "errors_by_code": tally.errors,
            "seconds": seconds, "requests_per_second": ok as f64 / seconds.max(1e-9),
            "queries_per_second": (ok * flags.batch_size) as f64 / seconds.max(1e-9),
            "p50_ms": ms(0.5), "p95_ms": ms(0.95), "p99_ms": ms(0.99),
            "mean_ms": if ok == 0 { 0.0 } else { latencies.iter().sum::<f64>() / ok as f64 * 1e3 },
            "max_ms": latencies.last().copied().unwrap_or(0.0) * 1e3,
            "server_share": (ok > 0).then(|| json!({
                "encode": stages[0] / total, "search": stages[1] / total, "filter": stages[2] / total,
                "rerank": stages[4] / total, "other": (total - stages[0] - stages[1] - stages[2] - stages[4]) / total})),
        })
    );
    Ok(ok > 0)
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let tls_ca_pem = match &cli.tls_ca {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("--tls-ca {}", path.display()))?),
        None => None,
    };
    let options = hardneg_client::ConnectOptions { token: cli.token.clone(), tls_ca_pem, tls_domain: cli.tls_domain.clone() };
    let mut client = Client::connect_with(&cli.addr, &options).await.with_context(|| format!("is hardneg-server running at {}?", cli.addr))?;
    match cli.command {
        Command::Create { collection, quantization } => {
            let q = match quantization {
                Quant::F32 => proto::Quantization::F32,
                Quant::F16 => proto::Quantization::F16,
                Quant::I8 => proto::Quantization::I8,
            };
            let info = client.create_collection(&collection, q).await?;
            println!("{}", info_json(&info));
        }
        Command::Ingest { collection, corpus, batch_size } => ingest(&mut client, &collection, &corpus, batch_size).await?,
        Command::Mine { collection, queries, qrels, pairs, format, opts } => {
            mine(&mut client, &collection, queries, qrels, pairs, format, &opts).await?
        }
        Command::Eval { collection, queries, qrels, opts } => eval(&mut client, &collection, &queries, &qrels, &opts).await?,
        Command::Status => {
            for info in client.list_collections().await? {
                println!("{}", info_json(&info));
            }
        }
        Command::Health => return Ok(client.ready().await.unwrap_or(false)),
        Command::Refresh { collection, encoder, vectors, ids, encoder_name, batch_size, cancel } => {
            if cancel {
                let r = client.cancel_refresh(&collection).await?;
                println!("{}", json!({"collection": collection, "cancelled": r.cancelled, "what": r.what}));
            } else if let Some(dir) = encoder {
                reencode(&mut client, &collection, &dir).await?;
            } else if let (Some(path), Some(name)) = (vectors, encoder_name) {
                upload(&mut client, &collection, &path, ids.as_ref(), &name, batch_size).await?;
            }
        }
        Command::Drop { collection } => {
            let dropped = client.drop_collection(&collection).await?;
            println!("{}", json!({"collection": collection, "dropped": dropped}));
        }
        Command::Bench(flags) => return bench(&mut client, flags).await,
    }
    Ok(true)
}

fn info_json(info: &proto::CollectionInfo) -> serde_json::Value {
    let quant = match proto::Quantization::try_from(info.quantization) {
        Ok(proto::Quantization::F16) => "f16",
        Ok(proto::Quantization::I8) => "i8",
        _ => "f32",
    };
    let metric = match proto::Metric::try_from(info.metric) {
        Ok(proto::Metric::InnerProduct) => "ip",
        _ => "cosine",
    };
    json!({"name": info.name, "doc_count": info.doc_count, "dims": info.dims, "metric": metric, "quantization": quant,
           "generation": info.generation, "encoder": info.encoder_name, "encoder_kind": info.encoder_kind,
           "encoder_fingerprint": info.encoder_fingerprint, "pending_documents": info.pending_documents,
           "building_generation": info.building_generation,
           "refresh": info.refresh.as_ref().map(|p| json!({"generation": p.generation, "phase": p.phase, "done": p.done, "total": p.total}))})
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        // A closed stdout (`hardneg mine ... | head`) is the reader's choice, not a failure.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) => {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod bench_tests {
    use super::*;

    #[test]
    fn code_names_are_the_canonical_grpc_names() {
        assert_eq!(code_name(hardneg_client::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(hardneg_client::Code::Ok), "OK");
        assert_eq!(code_name(hardneg_client::Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(hardneg_client::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn tickets_stop_at_the_request_count_and_at_the_deadline() {
        let counted = Tickets { next: Default::default(), limit: Some(3), deadline: None };
        assert_eq!(std::iter::from_fn(|| counted.take()).collect::<Vec<_>>(), vec![0, 1, 2]);
        let past = Tickets { next: Default::default(), limit: None, deadline: Some(Instant::now()) };
        assert_eq!(past.take(), None);
    }

    #[test]
    fn requests_cycle_through_the_queries_with_their_own_seed() {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            flags: BenchFlags,
        }
        let args = ["bench", "--collection", "c", "--queries", "q.jsonl", "--batch-size", "3", "--rerank-candidates", "9"];
        let flags = Wrap::try_parse_from(args).expect("valid flags").flags;
        let qs: Vec<BeirQuery> = (0..4).map(|i| BeirQuery { id: i.to_string(), text: format!("query {i}") }).collect();
        let req = bench_request(&flags, &qs, 1);
        assert_eq!(req.queries.iter().map(|q| q.id.as_str()).collect::<Vec<_>>(), vec!["3", "0", "1"]);
        let options = req.options.expect("options set");
        assert_eq!((options.seed, options.rerank, options.rerank_candidates), (Some(1), Some(true), Some(9)));
    }
}
