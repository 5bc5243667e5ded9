//! Multi-head attention over packed sequences (their tokens back to back, no
//! padding), fused per (sequence, head, block of query rows) straight from the fused
//! query/key/value projection: scores = q·kᵀ·scale, softmax, then · v written into the context
//! at the head's columns. No copies to a head-major layout and back, no (batch, heads, len,
//! len) tensor, no work on padding, and scores for at most [`BLOCK_ROWS`] queries at a time
//! per thread, however long the sequence.
//!
//! Options cover ModernBERT's and Qwen3's layers: rotary position embeddings applied to
//! queries and keys on the way in (positions counted from each sequence's start), after an
//! RMS norm per head where the model has one; a sliding window (each token attends to those
//! at most `window` positions away); causal attention (each token attends to those before it
//! and itself); and fewer key/value heads than query heads (grouped-query attention). And
//! MPNet's: a bias per head added to the scores by the key's position relative to the query's.
use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{selected, simd};

/// Query rows whose scores one unit of work holds at a time.
pub const BLOCK_ROWS: usize = 256;

/// Rotary position embeddings in the rotate-half layout (transformers' `rotate_half`, candle's
/// `rope`): for position p and i < d/2, (x[i], x[i + d/2]) turns by p·θ^(-2i/d).
pub struct Rotary {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    positions: usize,
}

impl Rotary {
    /// Tables for `positions` positions of heads of `head_dim` (even) with base `theta`,
    /// computed as transformers does: inverse frequencies and angles in f32.
    pub fn new(head_dim: usize, theta: f64, positions: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half).map(|i| 1f32 / theta.powf((2 * i) as f64 / head_dim as f64) as f32).collect();
        let (mut cos, mut sin) = (Vec::with_capacity(positions * half), Vec::with_capacity(positions * half));
        for p in 0..positions {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Rotary { cos, sin, half, positions }
    }

    pub fn positions(&self) -> usize {
        self.positions
    }

    /// (cos, sin), each (len, head_dim / 2), for candle's `rope` on the padded path.
    pub fn tables(&self, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        if len > self.positions {
            candle_core::bail!("rotary embedding: {len} positions, the model has {}", self.positions);
        }
        let n = len * self.half;
        Ok((Tensor::from_slice(&self.cos[..n], (len, self.half), device)?, Tensor::from_slice(&self.sin[..n], (len, self.half), device)?))
    }

    /// `v` (one head's vector) turned in place for `position`.
    fn rotate(&self, position: usize, v: &mut [f32]) {
        let h = self.half;
        let (cos, sin) = (&self.cos[position * h..][..h], &self.sin[position * h..][..h]);
        let (x1, x2) = v[..2 * h].split_at_mut(h);
        for i in 0..h {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
        }
    }
}

/// An RMS norm over each head's vector of queries and of keys (Qwen3's `q_norm`, `k_norm`;
/// Gemma 3's, whose weights are given here as 1 + its stored ones):
/// x / sqrt(mean(x²) + eps) · weight.
#[derive(Clone, Copy)]
pub struct HeadNorm<'a> {
    pub query: &'a [f32],
    pub key: &'a [f32],
    pub eps: f32,
}

fn rms_norm(v: &mut [f32], weight: &[f32], eps: f32) {
    let mean = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for (x, w) in v.iter_mut().zip(weight) {
        *x = *x * inv * w;
    }
}

/// A bias added to each head's attention scores that depends only on the key's position
/// relative to the query's (MPNet's bucketed relative positions): `values[head][r + reach]` for
/// a key `r` positions after the query (before, when negative), the same beyond `reach`.
pub struct RelativeBias {
    values: Vec<f32>,
    heads: usize,
    reach: usize,
}

impl RelativeBias {
    /// `values` holds, per head, the biases for relative positions -`reach` ..= `reach`.
    pub fn new(values: Vec<f32>, heads: usize, reach: usize) -> Result<Self> {
        if values.len() != heads * (2 * reach + 1) {
            candle_core::bail!("relative attention bias: {} values for {heads} heads of -{reach}..={reach}", values.len());
        }
        Ok(RelativeBias { values, heads, reach })
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Adds head `head`'s biases to `row`, the scores of keys at relative positions `first`,
    /// `first + 1`, ...
    fn add_to(&self, head: usize, row: &mut [f32], first: isize) {
        let width = 2 * self.reach + 1;
        let table = &self.values[head * width..][..width];
        let reach = self.reach as isize;
        for (j, score) in row.iter_mut().enumerate() {
            *score += table[((first + j as isize).clamp(-reach, reach) + reach) as usize];
        }
    }

    /// The biases as a (1, heads, len, len) tensor (query rows, key columns) for the padded
    /// path on candle's operations.
    pub fn tensor(&self, len: usize, dtype: candle_core::DType, device: &Device) -> Result<Tensor> {
        let mut out = vec![0f32; self.heads * len * len];
        for (head, block) in out.chunks_exact_mut(len * len).enumerate() {
            for (i, row) in block.chunks_exact_mut(len).enumerate() {
                self.add_to(head, row, -(i as isize));
            }
        }
        Tensor::from_vec(out, (1, self.heads, len, len), device)?.to_dtype(dtype)
    }
}

/// What an attention layer adds to the plain form.
#[derive(Clone, Copy)]
pub struct Options<'a> {
    /// Turn queries and keys by their position in the sequence first.
    pub rotary: Option<&'a Rotary>,
    /// Normalize each head's queries and keys first (before turning them).
    pub head_norm: Option<HeadNorm<'a>>,
    /// Attend only to tokens at most this many positions away.
    pub window: Option<usize>,
    /// Attend only to tokens up to and including one's own position.
    pub causal: bool,
    /// Key/value heads, when fewer than the query heads (each serves heads / kv_heads of
    /// them, in order); `qkv` then holds heads, kv_heads and kv_heads vectors per token.
    pub kv_heads: Option<usize>,
    /// Add a bias by relative position to the scaled scores, before the softmax.
    pub relative: Option<&'a RelativeBias>,
    /// What the scores are multiplied by: 1/sqrt(head_dim) unless set (Gemma 3's
    /// `query_pre_attn_scalar ** -0.5`).
    pub scale: Option<f32>,
    /// Query rows per unit of work ([`BLOCK_ROWS`]; smaller in tests).
    pub block_rows: usize,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options { rotary: None, head_norm: None, window: None, causal: false, kv_heads: None, relative: None, scale: None, block_rows: BLOCK_ROWS }
    }
}

/// Context (tokens, heads·head_dim) from `qkv` (tokens, 3·heads·head_dim), laid out as the
/// projection gives it (queries, then keys, then values, each head-major within), for
/// sequences of `lens` tokens stored one after the other.
pub fn attention(qkv: &Tensor, lens: &[usize], heads: usize, head_dim: usize) -> Result<Tensor> {
    attention_with(qkv, lens, heads, head_dim, Options::default())
}

/// [`attention`] with any of the [`Options`].
pub fn attention_with(qkv: &Tensor, lens: &[usize], heads: usize, head_dim: usize, options: Options) -> Result<Tensor> {
    let kv_heads = options.kv_heads.unwrap_or(heads);
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        candle_core::bail!("fused attention: {heads} query heads for {kv_heads} key/value heads");
    }
    if let Some(norm) = options.head_norm
        && (norm.query.len() != head_dim || norm.key.len() != head_dim)
    {
        candle_core::bail!("fused attention: head norms of {} and {} for heads of {head_dim}", norm.query.len(), norm.key.len());
    }
    if let Some(rotary) = options.rotary {
        if rotary.half * 2 != head_dim {
            candle_core::bail!("fused attention: rotary tables for heads of {}, heads of {head_dim}", rotary.half * 2);
        }
        if let Some(&longest) = lens.iter().max()
            && longest > rotary.positions
        {
            candle_core::bail!("fused attention: a sequence of {longest} tokens, rotary tables for {}", rotary.positions);
        }
    }
    if let Some(relative) = options.relative
        && relative.heads != heads
    {
        candle_core::bail!("fused attention: relative biases for {} heads, {heads} heads", relative.heads);
    }
    qkv.contiguous()?.apply_op1_no_bwd(&Attention { lens: lens.to_vec(), heads, head_dim, options })
}

struct Attention<'a> {
    lens: Vec<usize>,
    heads: usize,
    head_dim: usize,
    options: Options<'a>,
}

/// The context buffer, written by many threads at once, each at its own (rows, head columns).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every unit of work writes a disjoint set of elements (its block's rows, its head's
// columns); nothing reads the buffer until all units are done.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `offset` must lie inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

/// A thread's working space: scores, and turned queries and keys.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Grows `buf` to at least `len` and returns its first `len` values (stale: the caller writes
/// every one before reading it).
fn room(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

impl Options<'_> {
    /// The keys query `t` of a sequence of `n` sees: [t - window, t + window], up to t
    /// itself when causal.
    fn seen(&self, t: usize, n: usize) -> (usize, usize) {
        let from = self.window.map_or(0, |w| t.saturating_sub(w));
        let to = if self.causal { t + 1 } else { self.window.map_or(n, |w| (t + w + 1).min(n)) };
        (from, to)
    }

    /// Whether queries and keys change before the product.
    fn transforms(&self) -> bool {
        self.rotary.is_some() || self.head_norm.is_some()
    }

    /// One head's query or key vector at `position`, normalized by `norm` (if the layer has
    /// head norms) and turned (if rotary), in place.
    fn prepare(&self, v: &mut [f32], position: usize, norm: Option<&[f32]>) {
        if let (Some(weight), Some(head_norm)) = (norm, self.head_norm) {
            rms_norm(v, weight, head_norm.eps);
        }
        if let Some(rotary) = self.rotary {
            rotary.rotate(position, v);
        }
    }
}

/// One unit of work: a block of a sequence's query rows at one head.
#[derive(Clone, Copy)]
struct Unit {
    /// The sequence's first token among all packed tokens, and its length.
    first: usize,
    n: usize,
    head: usize,
    /// The block's first query row within the sequence.
    r0: usize,
}

impl Attention<'_> {
    fn kv_heads(&self) -> usize {
        self.options.kv_heads.unwrap_or(self.heads)
    }

    /// Values per token in `qkv`.
    fn stride(&self) -> usize {
        (self.heads + 2 * self.kv_heads()) * self.head_dim
    }

    /// Scores, softmax and the weighted values for one unit, written into the context.
    fn run(&self, qkv: &[f32], unit: Unit, kernels: super::Kernels, out: SharedOut, scratch: &mut Scratch) {
        let Attention { heads, head_dim: d, options, .. } = *self;
        let (hidden, kv_heads, stride) = (heads * d, self.kv_heads(), self.stride());
        let Unit { first, n, head, r0 } = unit;
        let r1 = (r0 + options.block_rows.max(1)).min(n);
        let rows = r1 - r0;
        let (lo, hi) = (options.seen(r0, n).0, options.seen(r1 - 1, n).1);
        let keys = hi - lo;
        let seq = &qkv[first * stride..(first + n) * stride];
        let kv = head / (heads / kv_heads);
        let (q_at, k_at, v_at) = (head * d, hidden + kv * d, hidden + (kv_heads + kv) * d);
        let scale = options.scale.unwrap_or(1.0 / (d as f32).sqrt());
        let Scratch { scores, q, k } = scratch;
        let scores = room(scores, rows * keys);
        if options.transforms() {
            let (q, k) = (room(q, rows * d), room(k, keys * d));
            for (i, dst) in q.chunks_exact_mut(d).enumerate() {
                dst.copy_from_slice(&seq[(r0 + i) * stride + q_at..][..d]);
                options.prepare(dst, r0 + i, options.head_norm.map(|n| n.query));
            }
            for (j, dst) in k.chunks_exact_mut(d).enumerate() {
                dst.copy_from_slice(&seq[(lo + j) * stride + k_at..][..d]);
                options.prepare(dst, lo + j, options.head_norm.map(|n| n.key));
            }
            super::gemm_nt_single(kernels, rows, keys, d, scale, q, d, k, d, scores, keys);
        } else {
            let (q, k) = (&seq[r0 * stride + q_at..], &seq[lo * stride + k_at..]);
            super::gemm_nt_single(kernels, rows, keys, d, scale, q, stride, k, stride, scores, keys);
        }
        if let Some(relative) = options.relative {
            for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
                relative.add_to(head, row, lo as isize - (r0 + i) as isize);
            }
        }
        if options.window.is_none() && !options.causal {
            simd::softmax_rows(scores, keys);
        } else {
            for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
                let (from, to) = options.seen(r0 + i, n);
                let (from, to) = (from - lo, to - lo);
                simd::softmax_rows(&mut row[from..to], to - from);
                row[..from].fill(0.0);
                row[to..].fill(0.0);
            }
        }
        // SAFETY: the (rows, d) block at this block's rows and this head's columns lies
        // inside the context buffer, and this unit alone writes it.
        unsafe {
            let out = out.at((first + r0) * hidden + head * d);
            super::gemm_nn_single(kernels, rows, d, keys, scores, keys, &seq[lo * stride + v_at..], stride, out, hidden);
        }
    }
}

impl CustomOp1 for Attention<'_> {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = super::contiguous_f32(storage, layout, "fused attention", "the input")?;
        let (heads, kv_heads, head_dim) = (self.heads, self.kv_heads(), self.head_dim);
        let hidden = heads * head_dim;
        let tokens: usize = self.lens.iter().sum();
        if qkv.len() != tokens * self.stride() {
            candle_core::bail!("fused attention: qkv of {} values for {tokens} tokens x ({heads} + 2 x {kv_heads}) heads of {head_dim}", qkv.len());
        }
        let block = self.options.block_rows.max(1);
        let mut units = Vec::new();
        let mut first = 0;
        for &n in &self.lens {
            for head in 0..heads {
                units.extend((0..n).step_by(block).map(|r0| Unit { first, n, head, r0 }));
            }
            first += n;
        }
        // Filled below, every element by exactly one unit (its rows, its head's columns).
        let mut out: Vec<f32> = Vec::with_capacity(tokens * hidden);
        let shared = SharedOut(out.as_mut_ptr());
        let kernels = selected();
        units.into_par_iter().for_each(|unit| SCRATCH.with_borrow_mut(|scratch| self.run(qkv, unit, kernels, shared, scratch)));
        // SAFETY: the units above wrote every element: each sequence's rows, in blocks, at
        // every head.
        unsafe { out.set_len(tokens * hidden) };
        Ok((CpuStorage::F32(out), Shape::from((tokens, hidden))))
    }
}
