//! `hardneg-gpu-bench`: the encoder half of scripts/gpu-check, run where the models run.
//!
//! - `encoders`: correctness of a device placement against the CPU in f32 (bi-encoder
//!   cosines, cross-encoder logits) through the service's own Encoder/Reranker, then model
//!   throughput at fixed batch sizes and sequence lengths per dtype, one JSON document out.
//!   It also writes the exact token ids it timed, so a PyTorch run can time the same input.
//! - `convert-model`: a copy of a model directory with its weights in another dtype (the
//!   carried model is f16 to fit the transfer; runs widen it back to f32).
//! - `make-cross-encoder`: a BERT cross-encoder checkpoint from a bi-encoder body and a
//!   seeded classification head (no trained cross-encoder ships in the package registries).
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hardneg_server::config::{DTypeSpec, DeviceSpec, parse_device, parse_dtype};
use hardneg_server::encode::embedder::SentenceEmbedder;
use hardneg_server::encode::cross::{CrossEncoderModel, probability};
use hardneg_server::encode::{BatchConfig, EmbedModel, Encoder, Placement, Reranker, TokenizedText, device, testing};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "hardneg-gpu-bench", about = "Encoder correctness and throughput on a device, for scripts/gpu-check")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Correctness against CPU f32, then throughput per dtype, batch size and length.
    Encoders(Box<EncodersArgs>),
    /// Copy a model directory with model.safetensors converted to `dtype`.
    ConvertModel {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: PathBuf,
        #[arg(long, value_parser = parse_dtype)]
        dtype: DTypeSpec,
    },
    /// Write a BertForSequenceClassification checkpoint: `body`'s weights and a seeded head.
    MakeCrossEncoder {
        #[arg(long)]
        body: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct EncodersArgs {
    /// Bi-encoder model directory.
    #[arg(long)]
    model: PathBuf,
    /// Cross-encoder model directory (BERT family).
    #[arg(long)]
    cross_encoder: PathBuf,
    /// BEIR corpus.jsonl whose documents are the test texts.
    #[arg(long)]
    corpus: PathBuf,
    #[arg(long, value_parser = parse_device)]
    device: DeviceSpec,
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,f16", value_parser = parse_dtype)]
    dtypes: Vec<DTypeSpec>,
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    batches: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "128,256")]
    lengths: Vec<usize>,
    /// Cross-encoder throughput: pair length in tokens, and batch sizes.
    #[arg(long, default_value_t = 256)]
    pair_length: usize,
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    pair_batches: Vec<usize>,
    /// Texts (and pairs) compared against the CPU.
    #[arg(long, default_value_t = 256)]
    correctness_texts: usize,
    /// Each throughput point runs at least this long (after two warm-up passes) ...
    #[arg(long, default_value_t = 1.0)]
    min_seconds: f64,
    /// ... and at least this many passes.
    #[arg(long, default_value_t = 3)]
    min_passes: usize,
    /// JSON results.
    #[arg(long)]
    out: PathBuf,
    /// The timed token ids ({"<length>": [[ids]...]}, batch rows of the largest batch).
    #[arg(long)]
    inputs_out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Encoders(args) => encoders(*args),
        Command::ConvertModel { from, to, dtype } => convert_model(&from, &to, dtype),
        Command::MakeCrossEncoder { body, out, seed } => {
            std::fs::create_dir_all(&out)?;
            testing::seeded_cross_encoder(&body, &out, 1, seed);
            Ok(())
        }
    }
}

fn convert_model(from: &Path, to: &Path, dtype: DTypeSpec) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in walk(from)? {
        let rel = entry.strip_prefix(from)?;
        let dst = to.join(rel);
        std::fs::create_dir_all(dst.parent().expect("a file has a parent"))?;
        if rel == Path::new("model.safetensors") {
            let tensors = candle_core::safetensors::load(&entry, &candle_core::Device::Cpu)?;
            let converted = tensors
                .into_iter()
                .map(|(name, t)| {
                    let t = if t.dtype().is_float() { t.to_dtype(device::dtype(dtype))? } else { t };
                    Ok((name, t))
                })
                .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()?;
            candle_core::safetensors::save(&converted, &dst)?;
        } else {
            std::fs::copy(&entry, &dst)?;
        }
    }
    Ok(())
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.is_dir() { out.extend(walk(&path)?) } else { out.push(path) }
    }
    Ok(out)
}

fn corpus_texts(path: &Path) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::new();
    for line in std::fs::read_to_string(path).with_context(|| path.display().to_string())?.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let doc: Value = serde_json::from_str(line)?;
        let title = doc["title"].as_str().unwrap_or("").trim();
        let text = doc["text"].as_str().unwrap_or("").trim();
        let joined = format!("{title} {text}").trim().to_string();
        if !joined.is_empty() {
            texts.push(joined);
        }
    }
    if texts.is_empty() {
        bail!("{}: no documents", path.display());
    }
    Ok(texts)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

fn dtype_name(d: DTypeSpec) -> &'static str {
    match d {
        DTypeSpec::F32 => "f32",
        DTypeSpec::F16 => "f16",
        DTypeSpec::Bf16 => "bf16",
    }
}

/// The bar each dtype must clear against CPU f32: embedding cosine and logit correlation.
fn threshold(d: DTypeSpec) -> f64 {
    if d == DTypeSpec::F32 { 0.999 } else { 0.99 }
}

/// Sequences of exactly `len` tokens ([CLS] ... [SEP]) cut from the corpus run together.
fn fixed_length(encoder: &Encoder, texts: &[String], len: usize, count: usize) -> anyhow::Result<Vec<TokenizedText>> {
    let tokenized = encoder.tokenize(texts)?;
    let (cls, sep) = {
        let t = &tokenized[0].ids;
        (t[0], t[t.len() - 1])
    };
    let stream: Vec<u32> = tokenized.iter().flat_map(|t| t.ids[1..t.ids.len() - 1].iter().copied()).collect();
    let body = len - 2;
    if stream.len() < body {
        bail!("the corpus has {} tokens; {body} needed for one sequence", stream.len());
    }
    Ok((0..count)
        .map(|i| {
            let start = (i * body) % (stream.len() - body + 1);
            let mut ids = vec![cls];
            ids.extend_from_slice(&stream[start..start + body]);
            ids.push(sep);
            TokenizedText { type_ids: vec![0; ids.len()], ids, prompt_len: 0 }
        })
        .collect())
}

/// (query, document) pairs of exactly `len` tokens: [CLS] query [SEP] document [SEP].
fn fixed_pairs(rows: &[TokenizedText], len: usize) -> Vec<TokenizedText> {
    let query = 24.min(len / 4);
    rows.iter()
        .map(|t| {
            let mut ids = t.ids.clone();
            ids.truncate(len);
            let sep = *t.ids.last().expect("rows end with [SEP]");
            ids[query + 1] = sep;
            *ids.last_mut().expect("non-empty") = sep;
            let type_ids = (0..ids.len()).map(|i| u32::from(i > query + 1)).collect();
            TokenizedText { ids, type_ids, prompt_len: 0 }
        })
        .collect()
}

/// Passes of `model` over `batch` until both minimums are met, after two warm-up passes.
fn time_model(model: &mut dyn EmbedModel, batch: &[&TokenizedText], min_seconds: f64, min_passes: usize) -> anyhow::Result<Value> {
    for _ in 0..2 {
        model.embed(batch)?;
    }
    let started = Instant::now();
    let mut passes = 0;
    let mut times = Vec::new();
    while passes < min_passes || started.elapsed().as_secs_f64() < min_seconds {
        let t = Instant::now();
        model.embed(batch)?;
        times.push(t.elapsed().as_secs_f64());
        passes += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tokens: usize = batch.iter().map(|t| t.ids.len()).sum();
    times.sort_by(f64::total_cmp);
    Ok(json!({
        "passes": passes,
        "seconds": elapsed,
        "median_pass_ms": times[times.len() / 2] * 1e3,
        "tokens_per_s": (tokens * passes) as f64 / elapsed,
        "texts_per_s": (batch.len() * passes) as f64 / elapsed,
    }))
}

/// Forward-pass throughput of the bi-encoder (per length and batch) and of the cross-encoder
/// (per batch) on the benchmarked device in `dtype`.
fn throughputs(
    args: &EncodersArgs,
    dtype: DTypeSpec,
    rows_by_len: &[(usize, Vec<TokenizedText>)],
    pair_rows: &[TokenizedText],
) -> anyhow::Result<(Vec<Value>, Vec<Value>)> {
    let mut bi = SentenceEmbedder::load_on(&args.model, 0, &device::open(args.device)?, device::dtype(dtype))?.model;
    let mut throughput = Vec::new();
    for (len, rows) in rows_by_len {
        for &b in &args.batches {
            let batch: Vec<&TokenizedText> = rows.iter().take(b).collect();
            let mut point = time_model(&mut bi, &batch, args.min_seconds, args.min_passes)?;
            point["batch"] = json!(b);
            point["length"] = json!(len);
            eprintln!("gpu-bench:   bi-encoder b={b} len={len}: {:.0} tokens/s", point["tokens_per_s"].as_f64().unwrap_or(0.0));
            throughput.push(point);
        }
    }
    drop(bi);
    let mut ce = CrossEncoderModel::load_on(&args.cross_encoder, 256, &device::open(args.device)?, device::dtype(dtype))?.model;
    let mut ce_throughput = Vec::new();
    for &b in &args.pair_batches {
        let batch: Vec<&TokenizedText> = pair_rows.iter().take(b).collect();
        let mut point = time_model(&mut ce, &batch, args.min_seconds, args.min_passes)?;
        point["batch"] = json!(b);
        point["length"] = json!(args.pair_length);
        point["pairs_per_s"] = point["texts_per_s"].clone();
        eprintln!("gpu-bench:   cross-encoder b={b} len={}: {:.0} pairs/s", args.pair_length, point["pairs_per_s"].as_f64().unwrap_or(0.0));
        ce_throughput.push(point);
    }
    Ok((throughput, ce_throughput))
}

fn encoders(args: EncodersArgs) -> anyhow::Result<()> {
    let texts = corpus_texts(&args.corpus)?;
    let cfg = BatchConfig { token_budget: 65_536, max_batch_texts: 256, queue_capacity: 64 };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let cpu = Placement::CPU_F32;
    let sample: Vec<String> = texts.iter().cycle().take(args.correctness_texts).cloned().collect();
    let pairs: Vec<(String, String)> = sample
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let query: String = sample[(i * 7 + 3) % sample.len()].split_whitespace().take(12).collect::<Vec<_>>().join(" ");
            (query, t.clone())
        })
        .collect();

    eprintln!("gpu-bench: CPU f32 reference for {} texts and pairs", sample.len());
    let started = Instant::now();
    let reference_encoder = Encoder::load_on(&args.model, 0, cfg, cpu)?;
    let reference = rt.block_on(reference_encoder.encode(sample.clone()))?;
    let reference_reranker = Reranker::load_on(&args.cross_encoder, 256, cfg, cpu)?;
    let reference_logits = rt.block_on(reference_reranker.logits(pairs.clone()))?;
    let reference_seconds = started.elapsed().as_secs_f64();

    let largest = *args.batches.iter().max().unwrap_or(&64);
    let mut inputs = serde_json::Map::new();
    let mut rows_by_len = Vec::new();
    for &len in &args.lengths {
        let rows = fixed_length(&reference_encoder, &texts, len, largest)?;
        inputs.insert(len.to_string(), json!(rows.iter().map(|r| &r.ids).collect::<Vec<_>>()));
        rows_by_len.push((len, rows));
    }
    let pair_rows = fixed_pairs(
        &fixed_length(&reference_encoder, &texts, args.pair_length, *args.pair_batches.iter().max().unwrap_or(&64))?,
        args.pair_length,
    );
    if let Some(path) = &args.inputs_out {
        std::fs::write(path, serde_json::to_vec(&Value::Object(inputs))?)?;
    }

    let mut results = Vec::new();
    for &dtype in &args.dtypes {
        let placement = Placement { device: args.device, dtype };
        let name = device::describe(placement);
        eprintln!("gpu-bench: {name}");
        let load_started = Instant::now();
        let encoder = Encoder::load_on(&args.model, 0, cfg, placement).with_context(|| name.clone())?;
        let load_seconds = load_started.elapsed().as_secs_f64();
        let vectors = rt.block_on(encoder.encode(sample.clone()))?;
        let cosines: Vec<f64> = vectors.iter().zip(&reference).map(|(a, b)| cosine(a, b)).collect();
        let min_cos = cosines.iter().copied().fold(f64::INFINITY, f64::min);
        let mean_cos = cosines.iter().sum::<f64>() / cosines.len() as f64;
        drop(encoder);

        let reranker = Reranker::load_on(&args.cross_encoder, 256, cfg, placement).with_context(|| name.clone())?;
        let logits = rt.block_on(reranker.logits(pairs.clone()))?;
        drop(reranker);
        let (got, want): (Vec<f64>, Vec<f64>) =
            logits.iter().zip(&reference_logits).map(|(g, w)| (g[0] as f64, w[0] as f64)).unzip();
        let max_logit_diff = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f64, f64::max);
        let max_prob_diff = logits
            .iter()
            .zip(&reference_logits)
            .map(|(g, w)| (probability(g) - probability(w)).abs() as f64)
            .fold(0f64, f64::max);
        let correlation = pearson(&got, &want);

        let (throughput, ce_throughput) = throughputs(&args, dtype, &rows_by_len, &pair_rows)?;
        results.push(json!({
            "dtype": dtype_name(dtype),
            "placement": name,
            "load_seconds": load_seconds,
            "correctness": {
                "threshold": threshold(dtype),
                "texts": sample.len(),
                "embedding_cosine_min": min_cos,
                "embedding_cosine_mean": mean_cos,
                "cross_encoder_pairs": pairs.len(),
                "cross_encoder_logit_correlation": correlation,
                "cross_encoder_max_abs_logit_diff": max_logit_diff,
                "cross_encoder_max_abs_probability_diff": max_prob_diff,
                "pass": min_cos > threshold(dtype) && correlation > threshold(dtype),
            },
            "bi_encoder": throughput,
            "cross_encoder": ce_throughput,
        }));
    }
    let info = reference_encoder.info();
    let config: Value = serde_json::from_slice(&std::fs::read(args.model.join("config.json"))?)?;
    let out = json!({
        "device": match args.device { DeviceSpec::Cpu => "cpu".to_string(), DeviceSpec::Cuda(n) => format!("cuda:{n}") },
        "model": { "name": info.name, "fingerprint": info.fingerprint, "dims": info.dims, "config": config },
        "cross_encoder": args.cross_encoder.display().to_string(),
        "kernels_compute_cap": device::CUDA_COMPUTE_CAP,
        "cuda_feature": cfg!(feature = "cuda"),
        "cpu_reference_seconds": reference_seconds,
        "timing": "model forward only (tokenized input, host-to-device copy of ids, device-to-host copy of outputs), \
                   fixed-length rows without padding, two warm-up passes",
        "dtypes": results,
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&out)?)?;
    Ok(())
}
