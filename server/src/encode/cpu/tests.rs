//! The kernels against candle's operations and plain formulas. Each test selects kernels for
//! its whole process (nextest runs every test in a process of its own).
use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::*;
use crate::encode::testing::{real_model_dir, seeded_cross_encoder};
use crate::encode::{BatchConfig, Encoder, Reranker};

const CFG: BatchConfig = BatchConfig { token_budget: 32 * 256, max_batch_texts: 32, queue_capacity: 64 };

/// One choice of kernels: `blas` once per library this machine has.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Choice(KernelsSpec, &'static str);

impl Choice {
    fn select(self) {
        select(self.0, self.1).unwrap();
    }
}

/// The choices this machine runs: `blas` with each library found (OpenBLAS, MKL).
fn choices() -> Vec<Choice> {
    let mut out = vec![Choice(KernelsSpec::Candle, ""), Choice(KernelsSpec::Fused, "")];
    out.extend(libraries_found().into_iter().map(|name| Choice(KernelsSpec::Blas, String::leak(name))));
    out
}

/// The first `n` Cranfield documents (title and text), from ../shared/datasets or
/// $HARDNEG_DATASETS.
fn cranfield_texts(n: usize) -> Vec<String> {
    let dir = std::env::var_os("HARDNEG_DATASETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/datasets"));
    let corpus = std::fs::read_to_string(dir.join("cranfield/corpus.jsonl")).expect("cranfield corpus: set HARDNEG_DATASETS");
    corpus
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|d| format!("{} {}", d["title"].as_str().unwrap_or(""), d["text"].as_str().unwrap_or("")).trim().to_string())
        .filter(|t| !t.is_empty())
        .take(n)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[tokio::test]
async fn every_choice_gives_candles_embeddings_on_cranfield() {
    // Lengths from a few tokens to past the 256 limit, so batches pad and truncate.
    let mut texts = cranfield_texts(48);
    texts.push("boundary layer".into());
    let mut reference: Option<Vec<Vec<f32>>> = None;
    for choice in choices() {
        choice.select();
        let enc = Encoder::load(&real_model_dir(), 0, CFG).unwrap();
        let vectors = enc.encode(texts.clone()).await.unwrap();
        match &reference {
            None => reference = Some(vectors),
            Some(want) => {
                for (i, (got, want)) in vectors.iter().zip(want).enumerate() {
                    let diff = max_abs_diff(got, want);
                    assert!(diff < 1e-5, "{choice:?}, text {i}: max |difference| {diff} from candle's");
                }
            }
        }
    }
}

#[tokio::test]
async fn every_choice_gives_candles_cross_encoder_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    seeded_cross_encoder(&real_model_dir(), dir.path(), 1, 42);
    let texts = cranfield_texts(17);
    let pairs: Vec<(String, String)> = texts.iter().skip(1).map(|d| (texts[0].clone(), d.clone())).collect();
    let mut reference: Option<Vec<f32>> = None;
    for choice in choices() {
        choice.select();
        let reranker = Reranker::load(dir.path(), 256, CFG).unwrap();
        let scores = reranker.score(pairs.clone()).await.unwrap();
        match &reference {
            None => reference = Some(scores),
            Some(want) => {
                let diff = max_abs_diff(&scores, want);
                assert!(diff < 1e-5, "{choice:?}: max |probability difference| {diff} from candle's");
            }
        }
    }
}

/// `x · wᵀ + b + r` by the plain loops, in f64.
fn dense_reference(x: &[f32], w: &[f32], b: Option<&[f32]>, r: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
            out[i * n + j] = (dot + b.map_or(0.0, |b| b[j] as f64) + r.map_or(0.0, |r| r[i * n + j] as f64)) as f32;
        }
    }
    out
}

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| (((i * 31 + seed * 17) % 97) as f32 - 48.0) / 50.0).collect()
}

#[test]
fn dense_layers_match_the_plain_product() {
    // One row (a query), a row count that splits unevenly, and one past the split threshold.
    for choice in choices() {
        choice.select();
        for (m, n, k) in [(1, 7, 5), (3, 33, 17), (257, 96, 64)] {
            let (x, w, b, r) = (values(m * k, 1), values(n * k, 2), values(n, 3), values(m * n, 4));
            let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
            let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu).unwrap();
            let bt = Tensor::from_slice(&b, n, &Device::Cpu).unwrap();
            let rt = Tensor::from_slice(&r, (m, n), &Device::Cpu).unwrap();
            let with_bias = dense::Dense::new(wt.clone(), Some(bt)).unwrap();
            let without = dense::Dense::new(wt, None).unwrap();
            let cases = [
                (with_bias.forward(&xt).unwrap(), dense_reference(&x, &w, Some(&b), None, m, n, k), "bias"),
                (with_bias.forward_residual(&xt, &rt).unwrap(), dense_reference(&x, &w, Some(&b), Some(&r), m, n, k), "bias + residual"),
                (without.forward(&xt).unwrap(), dense_reference(&x, &w, None, None, m, n, k), "no bias"),
                (without.forward_residual(&xt, &rt).unwrap(), dense_reference(&x, &w, None, Some(&r), m, n, k), "residual"),
            ];
            for (got, want, what) in cases {
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let diff = max_abs_diff(&got, &want);
                assert!(diff < 1e-4, "{choice:?} ({m}, {n}, {k}) {what}: max |difference| {diff}");
            }
        }
    }
}

/// What [`attention_reference`] computes beyond the plain form.
#[derive(Clone, Copy, Default)]
struct Variant {
    /// Turn queries and keys (rotate-half) with this base.
    theta: Option<f64>,
    /// Mask keys more than this far away.
    window: Option<usize>,
    /// Mask keys after the query.
    causal: bool,
    /// Key/value heads (default: as many as query heads).
    kv_heads: Option<usize>,
    /// Add `relative_bias(head, key - query)` to the scores.
    relative: bool,
    /// Multiply the scores by this instead of 1/sqrt(head_dim).
    scale: Option<f64>,
}

/// A bias by head and relative position for the tests: distinct per head and side, constant
/// beyond +-`RELATIVE_REACH`.
const RELATIVE_REACH: usize = 3;

fn relative_bias(head: usize, relative: isize) -> f32 {
    let r = relative.clamp(-(RELATIVE_REACH as isize), RELATIVE_REACH as isize);
    (head as f32 + 1.0) * 0.3 * r as f32 - 0.2 * (r * r) as f32 + 0.1
}

/// Attention by the formula in f64.
fn attention_reference(qkv: &[f32], lens: &[usize], heads: usize, d: usize, variant: Variant) -> Vec<f32> {
    let Variant { theta, window, causal, kv_heads, relative, scale } = variant;
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let kv_heads = kv_heads.unwrap_or(heads);
    let hidden = heads * d;
    let stride = hidden + 2 * kv_heads * d;
    let tokens: usize = lens.iter().sum();
    let mut want = vec![0f32; tokens * hidden];
    let turn = |v: &[f32], p: usize| -> Vec<f64> {
        let mut out: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        if let Some(theta) = theta {
            let h = d / 2;
            for i in 0..h {
                let angle = p as f64 * theta.powf(-((2 * i) as f64) / d as f64);
                let (x1, x2) = (v[i] as f64, v[i + h] as f64);
                out[i] = x1 * angle.cos() - x2 * angle.sin();
                out[i + h] = x2 * angle.cos() + x1 * angle.sin();
            }
        }
        out
    };
    let mut first = 0;
    for &n in lens {
        for h in 0..heads {
            let kv = h / (heads / kv_heads);
            let at = [h * d, hidden + kv * d, hidden + (kv_heads + kv) * d];
            let row = |u: usize, part: usize| &qkv[(first + u) * stride + at[part]..][..d];
            for t in 0..n {
                let q = turn(row(t, 0), t);
                let seen: Vec<usize> = (0..n).filter(|&u| window.is_none_or(|w| t.abs_diff(u) <= w) && (!causal || u <= t)).collect();
                let bias = |u: usize| if relative { relative_bias(h, u as isize - t as isize) as f64 } else { 0.0 };
                let scores: Vec<f64> =
                    seen.iter().map(|&u| q.iter().zip(turn(row(u, 1), u)).map(|(a, b)| a * b).sum::<f64>() * scale + bias(u)).collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|v| (v - max).exp()).sum();
                for c in 0..d {
                    let value: f64 = seen.iter().zip(&scores).map(|(&u, s)| (s - max).exp() / sum * row(u, 2)[c] as f64).sum();
                    want[(first + t) * hidden + h * d + c] = value as f32;
                }
            }
        }
        first += n;
    }
    want
}

#[test]
fn fused_attention_matches_the_formula_on_packed_sequences() {
    // Sequences of 9, 5, 0 and 1 tokens, back to back.
    let (lens, heads, d) = ([9usize, 5, 0, 1], 2, 4);
    let tokens: usize = lens.iter().sum();
    let qkv = values(tokens * 3 * heads * d, 5);
    let want = attention_reference(&qkv, &lens, heads, d, Variant::default());
    for choice in choices().into_iter().filter(|c| c.0 != KernelsSpec::Candle) {
        choice.select();
        let qkv_t = Tensor::from_slice(&qkv, (tokens, 3 * heads * d), &Device::Cpu).unwrap();
        let got = attention::attention(&qkv_t, &lens, heads, d).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-5, "{choice:?}: max |difference| {diff}");
    }
}

#[test]
fn fused_attention_turns_windows_and_blocks_as_the_formula_does() {
    // ModernBERT's layers (rotary embeddings, with and without a window of +-3), Qwen3's
    // (rotary, causal, 4 query heads on 2 key/value heads) and MPNet's (a bias by relative
    // position), in blocks of 4 query rows
    // (sequences longer than a block, one shorter, one of a single token) and whole.
    let (lens, heads, d) = ([13usize, 5, 0, 1, 9], 4, 8);
    let tokens: usize = lens.iter().sum();
    let rotary = attention::Rotary::new(d, 10_000.0, 16);
    let theta = Some(10_000.0);
    let reach = RELATIVE_REACH as isize;
    let table: Vec<f32> = (0..heads).flat_map(|h| (-reach..=reach).map(move |r| relative_bias(h, r))).collect();
    let relative = attention::RelativeBias::new(table, heads, RELATIVE_REACH).unwrap();
    let variants = [
        Variant { theta, ..Variant::default() },
        Variant { theta, window: Some(3), ..Variant::default() },
        Variant { theta, causal: true, kv_heads: Some(2), ..Variant::default() },
        Variant { causal: true, window: Some(2), ..Variant::default() },
        // Gemma 3's sliding layers: a window on both sides, grouped heads, its own scale.
        Variant { theta, window: Some(3), kv_heads: Some(2), scale: Some(0.2), ..Variant::default() },
        // MPNet's: a bias by relative position, constant past the table's reach.
        Variant { relative: true, ..Variant::default() },
    ];
    for variant in variants {
        let width = (heads + 2 * variant.kv_heads.unwrap_or(heads)) * d;
        let qkv = values(tokens * width, 7);
        let want = attention_reference(&qkv, &lens, heads, d, variant);
        for choice in choices().into_iter().filter(|c| c.0 != KernelsSpec::Candle) {
            choice.select();
            for block_rows in [4, attention::BLOCK_ROWS] {
                let options = attention::Options {
                    rotary: variant.theta.map(|_| &rotary),
                    window: variant.window,
                    causal: variant.causal,
                    kv_heads: variant.kv_heads,
                    relative: variant.relative.then_some(&relative),
                    scale: variant.scale.map(|s| s as f32),
                    block_rows,
                    ..attention::Options::default()
                };
                let qkv_t = Tensor::from_slice(&qkv, (tokens, width), &Device::Cpu).unwrap();
                let got = attention::attention_with(&qkv_t, &lens, heads, d, options).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff < 1e-5,
                    "{choice:?}, {:?} window, causal {}, relative {}, blocks of {block_rows}: max |difference| {diff}",
                    variant.window,
                    variant.causal,
                    variant.relative
                );
            }
        }
    }
    let qkv = values(tokens * 3 * heads * d, 7);
    // Sequences longer than the tables are refused, not read past them.
    let qkv_t = Tensor::from_slice(&qkv[..17 * 3 * heads * d], (17, 3 * heads * d), &Device::Cpu).unwrap();
    let options = attention::Options { rotary: Some(&rotary), ..attention::Options::default() };
    let err = attention::attention_with(&qkv_t, &[17], heads, d, options).unwrap_err().to_string();
    assert!(err.contains("17 tokens"), "{err}");
}

/// A committed fixture's body: right padding runs packed, any other mask padded; both give
/// the padded body's hidden states on candle's operations at every unmasked position, for
/// sequences of up to `l` (at least 20) tokens (ids below `vocab`, none of the first five).
fn body_matches_candle_with_any_mask(fixture: &str, model_type: &str, vocab: u32, l: usize) {
    use crate::encode::arch::Body;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(fixture);
    let config = std::fs::read(dir.join("config.json")).unwrap();
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let vb = candle_nn::VarBuilder::from_buffered_safetensors(weights, candle_core::DType::F32, &Device::Cpu).unwrap();
    let Ok((body, _)) = Body::load(model_type, &config, vb) else { panic!("{fixture} does not load") };
    let ids: Vec<u32> = (0..3 * l).map(|i| (i as u32 * 37 + 11) % (vocab - 5) + 5).collect();
    let ids = Tensor::from_vec(ids, (3, l), &Device::Cpu).unwrap();
    let types = ids.zeros_like().unwrap();
    let lengths = [l - 3, l, 6];
    let prefix: Vec<u32> = lengths.iter().flat_map(|&n| (0..l).map(move |t| (t < n) as u32)).collect();
    let gaps: Vec<u32> = (0..3 * l).map(|i| u32::from(!(i % l == 2 || i >= 2 * l + 15 || i < 2 * l && i >= l + 18))).collect();
    for mask in [prefix, gaps] {
        let mask = Tensor::from_vec(mask, (3, l), &Device::Cpu).unwrap();
        select(KernelsSpec::Candle, "").unwrap();
        let keep = mask.to_dtype(candle_core::DType::F32).unwrap().unsqueeze(2).unwrap();
        let want = body.forward(&ids, &types, &mask).unwrap().broadcast_mul(&keep).unwrap();
        for choice in choices().into_iter().filter(|c| c.0 != KernelsSpec::Candle) {
            choice.select();
            let got = body.forward(&ids, &types, &mask).unwrap().broadcast_mul(&keep).unwrap();
            let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{fixture}, {choice:?}: max |difference| {diff} at unmasked positions");
        }
    }
}

/// ModernBERT: global, sliding (+-4), global layers.
#[test]
fn the_modernbert_body_matches_candle_with_any_mask() {
    body_matches_candle_with_any_mask("modernbert-mean-normalize", "modernbert", 300, 20);
}

/// Qwen3: causal, 4 query heads on 2 key/value heads, head norms.
#[test]
fn the_qwen3_body_matches_candle_with_any_mask() {
    body_matches_candle_with_any_mask("qwen3-lasttoken-normalize", "qwen3", 330, 20);
}

/// Qwen2: causal, 4 query heads on 2 key/value heads, q/k/v biases, no head norms.
#[test]
fn the_qwen2_body_matches_candle_with_any_mask() {
    body_matches_candle_with_any_mask("qwen2-lasttoken-left", "qwen2", 330, 20);
}

/// Qwen2 with a sliding window of 8 on its second layer, over sequences longer than it.
#[test]
fn the_sliding_qwen2_body_matches_candle_with_any_mask() {
    body_matches_candle_with_any_mask("qwen2-sliding-lasttoken", "qwen2", 330, 30);
}

/// Gemma 3: bidirectional, sliding (+-8) and global layers, head norms, its own score scale,
/// scaled embeddings, norms around the attention and the MLP.
#[test]
fn the_gemma3_body_matches_candle_with_any_mask() {
    body_matches_candle_with_any_mask("gemma3-mean-dense-normalize", "gemma3_text", 420, 30);
}

/// DistilBERT: BERT's layers under other names, no token types.
#[test]
fn the_distilbert_body_matches_candle_with_any_mask() {
    body_matches_candle_with_any_mask("distilbert-mean", "distilbert", 240, 20);
}

/// MPNet: the relative attention bias in the fused attention and as a tensor on candle's,
/// over distances past the last bucket's (91).
#[test]
fn the_mpnet_body_matches_candle_with_any_mask() {
    body_matches_candle_with_any_mask("mpnet-mean-normalize", "mpnet", 240, 120);
}

#[test]
fn a_library_that_cannot_be_used_is_named() {
    let err = select(KernelsSpec::Blas, "/nonexistent/libnothing.so").unwrap_err();
    assert!(err.contains("/nonexistent/libnothing.so"), "{err}");
    // A library without cblas_sgemm (the C library itself) is refused for that reason.
    let err = select(KernelsSpec::Blas, "libc.so.6").unwrap_err();
    assert!(err.contains("no cblas_sgemm"), "{err}");
    // auto says why it fell back, and runs.
    let line = select(KernelsSpec::Auto, "/nonexistent/libnothing.so").unwrap();
    assert!(line.contains("fused") && line.contains("libnothing"), "{line}");
    assert!(matches!(selected(), Kernels::Fused));
    assert!(KernelsSpec::parse("mkl").unwrap_err().contains("\"auto\""));
    // With libraries, auto races each one found against the others and the built-in kernels
    // and says how it went; `blas` takes the fastest library.
    let found = libraries_found();
    if !found.is_empty() {
        let line = select(KernelsSpec::Auto, "").unwrap();
        assert!(line.contains("GFLOP/s") && (line.contains("for the built-in kernels") || line.contains("BLAS slower here")), "{line}");
        for name in &found {
            assert!(line.contains(name.as_str()), "{name} not in {line}");
        }
        select(KernelsSpec::Blas, "").unwrap();
        assert!(matches!(selected(), Kernels::Blas(blas) if found.contains(&blas.name)));
    }
}

#[test]
fn par_rows_gives_each_row_to_exactly_one_fill() {
    // Rows narrower than a chunk (many per chunk, the last chunk short), wider than one, none.
    for (rows, width) in [(1000usize, 7usize), (3, 20000), (0, 5), (5, 0)] {
        let out = par_rows(rows, width, |first, dst| {
            assert_eq!(dst.len() % width, 0);
            for (i, v) in dst.iter_mut().enumerate() {
                *v += (first * width + i) as f32;
            }
        });
        assert_eq!(out.len(), rows * width);
        assert!(out.iter().enumerate().all(|(i, &v)| v == i as f32), "({rows}, {width})");
    }
}
