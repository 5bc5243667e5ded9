//! `hardneg`: the command-line client. JSONL in, JSONL out, so any language can pipe.
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
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
    /// Mine latency through gRPC: p50/p99 and the share of each server stage.
    Bench {
        #[arg(long)]
        collection: String,
        /// BEIR queries.jsonl to draw query texts from.
        #[arg(long)]
        queries: PathBuf,
        #[arg(long, default_value_t = 50)]
        iterations: usize,
        #[arg(long, default_value_t = 8)]
        num_negatives: u32,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Rerank with the server's cross-encoder, scoring this many candidates per query.
        #[arg(long)]
        rerank_candidates: Option<u32>,
    },
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

async fn bench(
    client: &mut Client,
    collection: &str,
    queries: &PathBuf,
    iterations: usize,
    k: u32,
    batch: usize,
    rerank_candidates: Option<u32>,
) -> anyhow::Result<()> {
    let qs: Vec<BeirQuery> = beir::read_jsonl(queries)?;
    if qs.is_empty() {
        bail!("{}: no queries", queries.display());
    }
    let mut latencies = Vec::with_capacity(iterations);
    let mut stages = [0f64; 5];
    for it in 0..iterations + 2 {
        let req = proto::MineRequest {
            collection: collection.into(),
            batch_id: it as u64,
            queries: (0..batch)
                .map(|j| {
                    let q = &qs[(it * batch + j) % qs.len()];
                    proto::Query { id: q.id.clone(), text: q.text.clone(), ..Default::default() }
                })
                .collect(),
            options: Some(proto::MineOptions {
                num_negatives: k,
                seed: Some(it as u64),
                rerank: rerank_candidates.map(|_| true),
                rerank_candidates,
                ..Default::default()
            }),
            min_generation: None,
        };
        let started = Instant::now();
        let resp = client.mine(req).await?;
        let elapsed = started.elapsed().as_secs_f64();
        if it < 2 {
            continue; // warm-up
        }
        latencies.push(elapsed);
        let t = resp.timings.unwrap_or_default();
        for (acc, v) in stages.iter_mut().zip([t.encode_seconds, t.search_seconds, t.filter_seconds, t.total_seconds, t.rerank_seconds]) {
            *acc += v;
        }
    }
    latencies.sort_by(f64::total_cmp);
    let total = stages[3].max(1e-12);
    println!(
        "{}",
        json!({
            "batch_queries": batch, "num_negatives": k, "iterations": iterations, "rerank_candidates": rerank_candidates,
            "p50_ms": percentile(&latencies, 0.5) * 1e3, "p99_ms": percentile(&latencies, 0.99) * 1e3,
            "server_share": {"encode": stages[0] / total, "search": stages[1] / total, "filter": stages[2] / total,
                             "rerank": stages[4] / total,
                             "other": (total - stages[0] - stages[1] - stages[2] - stages[4]) / total},
        })
    );
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let mut client = Client::connect_with_token(&cli.addr, cli.token.as_deref()).await.with_context(|| format!("is hardneg-server running at {}?", cli.addr))?;
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
        Command::Bench { collection, queries, iterations, num_negatives, batch_size, rerank_candidates } => {
            bench(&mut client, &collection, &queries, iterations, num_negatives, batch_size, rerank_candidates).await?
        }
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
