//! The DeBERTa-v2/v3 encoder body (transformers' `DebertaV2Model`: microsoft/deberta-v3-*,
//! mixedbread-ai/mxbai-rerank-*-v1): BERT's post-norm layers, but attention adds disentangled
//! relative-position terms to the content scores. With `relative_attention`, each layer
//! projects a table of relative-position embeddings (2·span rows; `norm_rel_ebd` "layer_norm"
//! normalizes it first) with its own `pos_key_proj` / `pos_query_proj`, or with the content
//! projections when `share_att_key`; then for query i and key j at relative position
//! r = bucket(i - j) (log-bucketed past `position_buckets / 2` when `position_buckets` > 0):
//!
//! - c2p: q_i · pos_key[clamp(r + span)]
//! - p2c: k_j · pos_query[clamp(-bucket(j - i) + span)]
//!
//! added to q_i · k_j, all divided by sqrt(head_dim · (1 + the number of terms in
//! `pos_att_type`)). The tables do not depend on the input, so they are projected once at
//! load. Absolute position embeddings are added to the input only with `position_biased_input`.
//!
//! On the CPU kernels of [`super::cpu`] only the batch's real tokens run through the layers
//! (right padding cut out) and attention is fused per (sequence, head): content, c2p and p2c
//! scores from the selected matrix kernels, softmax, weighted values. Elsewhere the padded
//! batch runs on candle's operations (a gather per term). Both agree (tests) and match
//! transformers (tests/cross_encoder.rs against sentence-transformers).
use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use candle_transformers::models::bert::HiddenAct;
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::Value;

use super::body::hidden_act;
use super::cpu::{self, dense::Dense, packed::Packed};

/// transformers' DebertaV2Config, with its defaults for absent keys.
#[derive(Debug, Clone, Deserialize)]
pub struct DebertaV2Config {
    #[serde(default = "vocab")]
    pub vocab_size: usize,
    #[serde(default = "d1536")]
    pub hidden_size: usize,
    #[serde(default = "d24")]
    pub num_hidden_layers: usize,
    #[serde(default = "d24")]
    pub num_attention_heads: usize,
    #[serde(default = "d6144")]
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default = "d512")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "eps7")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub relative_attention: bool,
    #[serde(default = "minus1")]
    pub max_relative_positions: i64,
    #[serde(default = "minus1")]
    pub position_buckets: i64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "yes")]
    pub position_biased_input: bool,
    /// "p2c|c2p" or ["p2c", "c2p"].
    #[serde(default)]
    pub pos_att_type: Option<Value>,
    #[serde(default)]
    pub share_att_key: bool,
    #[serde(default)]
    pub norm_rel_ebd: Option<String>,
    #[serde(default)]
    pub conv_kernel_size: Option<usize>,
    #[serde(default)]
    pub embedding_size: Option<usize>,
    #[serde(default)]
    pub attention_head_size: Option<usize>,
    #[serde(default)]
    pub pooler_hidden_size: Option<usize>,
    #[serde(default = "gelu")]
    pub pooler_hidden_act: String,
}

fn vocab() -> usize {
    128100
}
fn d1536() -> usize {
    1536
}
fn d24() -> usize {
    24
}
fn d6144() -> usize {
    6144
}
fn d512() -> usize {
    512
}
fn eps7() -> f64 {
    1e-7
}
fn minus1() -> i64 {
    -1
}
fn yes() -> bool {
    true
}
fn gelu() -> String {
    "gelu".into()
}

impl DebertaV2Config {
    /// The relative attention terms `pos_att_type` names (transformers reads only these two).
    fn terms(&self) -> (bool, bool) {
        let names: Vec<String> = match &self.pos_att_type {
            Some(Value::String(s)) => s.to_lowercase().split('|').map(|x| x.trim().to_string()).collect(),
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_string).collect(),
            _ => Vec::new(),
        };
        (names.iter().any(|n| n == "c2p"), names.iter().any(|n| n == "p2c"))
    }

    /// `max_relative_positions`, or `max_position_embeddings` when below 1 (as transformers).
    fn max_relative(&self) -> i64 {
        if self.max_relative_positions < 1 { self.max_position_embeddings as i64 } else { self.max_relative_positions }
    }

    /// Half the relative embedding table: `position_buckets` when set, else the maximum distance.
    fn span(&self) -> usize {
        if self.position_buckets > 0 { self.position_buckets as usize } else { self.max_relative() as usize }
    }

    fn layer_norm_rel(&self) -> bool {
        self.norm_rel_ebd.as_deref().unwrap_or("none").to_lowercase().split('|').any(|x| x.trim() == "layer_norm")
    }

    /// What this body cannot reproduce, named by key.
    pub fn check(&self) -> std::result::Result<HiddenAct, String> {
        let act = hidden_act("hidden_act", &self.hidden_act)?;
        if self.conv_kernel_size.unwrap_or(0) > 0 {
            return Err("config.json conv_kernel_size: the convolution layer (DeBERTa-v2 xlarge and larger) is not supported".into());
        }
        if let Some(e) = self.embedding_size.filter(|&e| e != self.hidden_size) {
            return Err(format!("config.json embedding_size: {e} differs from hidden_size {}; the embedding projection is not supported", self.hidden_size));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!("config.json num_attention_heads: {} does not divide hidden_size {}", self.num_attention_heads, self.hidden_size));
        }
        if let Some(a) = self.attention_head_size.filter(|&a| a * self.num_attention_heads != self.hidden_size) {
            return Err(format!("config.json attention_head_size: {a} x {} heads differs from hidden_size {}; not supported", self.num_attention_heads, self.hidden_size));
        }
        if let Some(p) = self.pooler_hidden_size.filter(|&p| p != self.hidden_size) {
            return Err(format!("config.json pooler_hidden_size: {p} differs from hidden_size {}; not supported", self.hidden_size));
        }
        if self.relative_attention && self.span() == 0 {
            return Err("config.json max_relative_positions / position_buckets: no relative positions".into());
        }
        Ok(act)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }
}

/// transformers' `make_log_bucket_position` for one relative position, computed in f32 as torch
/// computes it: positions within `bucket_size / 2` stay, farther ones share log-spaced buckets up
/// to `max_position`.
pub fn log_bucket(rel: i64, bucket_size: i64, max_position: i64) -> i64 {
    if bucket_size <= 0 || max_position <= 0 {
        return rel;
    }
    let mid = bucket_size / 2;
    let abs = if rel < mid && rel > -mid { mid - 1 } else { rel.abs() };
    if abs <= mid {
        return rel;
    }
    let base = (((max_position - 1) as f64 / mid as f64) as f32).ln();
    let log_pos = ((abs as f32 / mid as f32).ln() / base * (mid - 1) as f32).ceil() + mid as f32;
    (log_pos * rel.signum() as f32) as i64
}

/// The relative-position side of the attention: which terms, the bucketing, and per layer the
/// projected tables.
struct Relative {
    c2p: bool,
    p2c: bool,
    span: usize,
    buckets: i64,
    max_relative: i64,
}

impl Relative {
    /// For relative positions -(n-1) ..= n-1 (index `rel + n - 1`): the c2p table row
    /// clamp(bucket(rel) + span), in [0, 2·span).
    fn rows(&self, n: usize) -> Vec<u32> {
        let top = 2 * self.span as i64 - 1;
        (-(n as i64 - 1)..=(n as i64 - 1)).map(|rel| (log_bucket(rel, self.buckets, self.max_relative) + self.span as i64).clamp(0, top) as u32).collect()
    }
}

struct Layer {
    /// Queries, keys and values in one product: 3 · hidden outputs.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    out_norm: LayerNorm,
    /// (2·span, hidden): the relative table through the key projection (c2p) and the query
    /// projection (p2c), biases included.
    pos_key: Option<Tensor>,
    pos_query: Option<Tensor>,
    /// The same as plain values, for the fused attention.
    pos_key_values: Option<Vec<f32>>,
    pos_query_values: Option<Vec<f32>>,
}

pub struct DebertaV2Body {
    word: Embedding,
    position: Option<Embedding>,
    token_type: Option<Embedding>,
    norm: LayerNorm,
    layers: Vec<Layer>,
    relative: Option<Relative>,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    /// 1 + the relative terms in use: scores are divided by sqrt(head_dim · this).
    scale_factor: usize,
    act: HiddenAct,
    device: Device,
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(vb.get(size, "weight")?, vb.get(size, "bias")?, eps))
}

fn dense(vb: VarBuilder, input: usize, output: usize) -> Result<Dense> {
    Dense::new(vb.get((output, input), "weight")?, Some(vb.get(output, "bias")?))
}

/// `x · Wᵀ + b` for the (out, in) weight and bias under `vb`, on candle's operations.
fn project(vb: &VarBuilder, x: &Tensor, size: usize) -> Result<Tensor> {
    let w = vb.get((size, size), "weight")?.to_dtype(x.dtype())?;
    let b = vb.get(size, "bias")?.to_dtype(x.dtype())?;
    x.matmul(&w.t()?)?.broadcast_add(&b)
}

impl DebertaV2Body {
    /// Weights from a `DebertaV2Model` checkpoint or a task model's (`deberta.` prefix).
    pub fn load(vb: VarBuilder, cfg: &DebertaV2Config) -> Result<Self> {
        let act = cfg.check().map_err(candle_core::Error::msg)?;
        let vb = if vb.contains_tensor("deberta.embeddings.word_embeddings.weight") { vb.pp("deberta") } else { vb };
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let e = vb.pp("embeddings");
        let position = if cfg.position_biased_input {
            Some(Embedding::new(e.get((cfg.max_position_embeddings, h), "position_embeddings.weight")?, h))
        } else {
            None
        };
        let token_type =
            if cfg.type_vocab_size > 0 { Some(Embedding::new(e.get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?, h)) } else { None };
        let (c2p, p2c) = cfg.terms();
        let relative = cfg.relative_attention.then(|| Relative { c2p, p2c, span: cfg.span(), buckets: cfg.position_buckets, max_relative: cfg.max_relative() });
        // The relative embedding table, as every layer sees it (in f32: it is projected once).
        let table = match &relative {
            Some(r) => {
                let enc = vb.pp("encoder");
                let t = enc.get((2 * r.span, h), "rel_embeddings.weight")?.to_dtype(DType::F32)?;
                let t = if cfg.layer_norm_rel() {
                    let f32vb = enc.pp("LayerNorm").to_dtype(DType::F32);
                    layer_norm(f32vb, h, eps)?.forward(&t)?
                } else {
                    t
                };
                Some(t)
            }
            None => None,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention.self");
            let names = ["query_proj", "key_proj", "value_proj"];
            let weights = names.map(|n| a.get((h, h), &format!("{n}.weight")));
            let biases = names.map(|n| a.get(h, &format!("{n}.bias")));
            let [wq, wk, wv] = weights;
            let [bq, bk, bv] = biases;
            let qkv = Dense::new(Tensor::cat(&[wq?, wk?, wv?], 0)?, Some(Tensor::cat(&[bq?, bk?, bv?], 0)?))?;
            let (mut pos_key, mut pos_query) = (None, None);
            if let (Some(r), Some(table)) = (&relative, &table) {
                let f = a.to_dtype(DType::F32);
                if r.c2p {
                    pos_key = Some(project(&f.pp(if cfg.share_att_key { "key_proj" } else { "pos_key_proj" }), table, h)?);
                }
                if r.p2c {
                    pos_query = Some(project(&f.pp(if cfg.share_att_key { "query_proj" } else { "pos_query_proj" }), table, h)?);
                }
            }
            let values = |t: &Option<Tensor>| -> Result<Option<Vec<f32>>> { t.as_ref().map(|t| t.flatten_all()?.to_vec1::<f32>()).transpose() };
            layers.push(Layer {
                qkv,
                attn_out: dense(l.pp("attention.output.dense"), h, h)?,
                attn_norm: layer_norm(l.pp("attention.output.LayerNorm"), h, eps)?,
                intermediate: dense(l.pp("intermediate.dense"), h, cfg.intermediate_size)?,
                output: dense(l.pp("output.dense"), cfg.intermediate_size, h)?,
                out_norm: layer_norm(l.pp("output.LayerNorm"), h, eps)?,
                pos_key_values: values(&pos_key)?,
                pos_query_values: values(&pos_query)?,
                pos_key: pos_key.map(|t| t.to_dtype(vb.dtype())).transpose()?,
                pos_query: pos_query.map(|t| t.to_dtype(vb.dtype())).transpose()?,
            });
        }
        Ok(Self {
            word: Embedding::new(e.get((cfg.vocab_size, h), "word_embeddings.weight")?, h),
            position,
            token_type,
            norm: layer_norm(e.pp("LayerNorm"), h, eps)?,
            layers,
            relative,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            hidden: h,
            scale_factor: 1 + usize::from(c2p) + usize::from(p2c),
            act,
            device: vb.device().clone(),
        })
    }

    /// Hidden states (batch, len, hidden) for right-padded token ids, token type ids and an
    /// attention mask (1 for tokens, 0 for padding), each (batch, len) u32.
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let mut x = self.word.forward(ids)?;
        if let Some(position) = &self.position {
            if l > position.embeddings().dim(0)? {
                candle_core::bail!("{l} tokens, the model has {} positions", position.embeddings().dim(0)?);
            }
            x = x.broadcast_add(&position.forward(&Tensor::arange(0u32, l as u32, &self.device)?)?)?;
        }
        if let Some(token_type) = &self.token_type {
            x = (x + token_type.forward(types)?)?;
        }
        let x = self.norm.forward(&x)?.reshape((b * l, self.hidden))?;
        if let Some(packed) = Packed::new(&x, mask)? {
            return self.forward_packed(&x, &packed);
        }
        self.forward_padded(x, mask, b, l)
    }

    fn scale(&self) -> f32 {
        ((self.head_dim * self.scale_factor) as f32).sqrt()
    }

    fn finish_layer(&self, layer: &Layer, ctx: &Tensor, x: &Tensor) -> Result<Tensor> {
        let x = layer.attn_norm.forward(&layer.attn_out.forward_residual(ctx, x)?)?;
        let inter = activation(&layer.intermediate.forward(&x)?, self.act)?;
        layer.out_norm.forward(&layer.output.forward_residual(&inter, &x)?)
    }

    /// The layers over the batch's real tokens only, scattered back to (batch, len, hidden).
    fn forward_packed(&self, x: &Tensor, packed: &Packed) -> Result<Tensor> {
        let mut x = packed.gather(x)?;
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?.contiguous()?;
            let op = Disentangled { body: self, layer, lens: &packed.lens };
            let ctx = qkv.apply_op1_no_bwd(&op)?;
            x = self.finish_layer(layer, &ctx, &x)?;
        }
        packed.scatter(&x)
    }

    /// The padded batch on candle's operations: each relative term a product with the
    /// projected table and a gather by relative position.
    fn forward_padded(&self, mut x: Tensor, mask: &Tensor, b: usize, l: usize) -> Result<Tensor> {
        let dtype = x.dtype();
        let big = if dtype == DType::F16 { 6.0e4 } else { 1e9 };
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * big)?.to_dtype(dtype)?.reshape((b, 1, 1, l))?;
        let (h, d) = (self.heads, self.head_dim);
        // Gather indices (b, heads, l, l): c2p reads row c2p[i][j] of query i's products, p2c
        // row p2c[j][i] of key j's (transposed after the gather).
        let index = |f: &dyn Fn(usize, usize) -> u32| -> Result<Tensor> {
            let v: Vec<u32> = (0..l * l).map(|at| f(at / l, at % l)).collect();
            Tensor::from_vec(v, (1, 1, l, l), &self.device)?.broadcast_as((b, h, l, l))?.contiguous()
        };
        let (c2p_index, p2c_index) = match &self.relative {
            Some(r) => {
                let rows = r.rows(l.max(1));
                let at = |rel: isize| rows[(rel + l as isize - 1) as usize];
                let c2p = if r.c2p { Some(index(&|i, j| at(i as isize - j as isize))?) } else { None };
                // p2c for (key j, query i): table row clamp(-bucket(j - i) + span).
                let top = 2 * r.span as i64 - 1;
                let p2c_row = |j: usize, i: usize| (-log_bucket(j as i64 - i as i64, r.buckets, r.max_relative) + r.span as i64).clamp(0, top) as u32;
                let p2c = if r.p2c { Some(index(&p2c_row)?) } else { None };
                (c2p, p2c)
            }
            None => (None, None),
        };
        let inv = 1.0 / self.scale() as f64;
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?.reshape((b, l, 3, h, d))?.permute((2, 0, 3, 1, 4))?.contiguous()?;
            let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
            let mut scores = (q.matmul(&k.t()?)? * inv)?;
            let heads_of = |t: &Tensor| -> Result<Tensor> {
                let rows = t.dim(0)?;
                t.reshape((rows, h, d))?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?.broadcast_as((b, h, rows, d))?.contiguous()
            };
            if let (Some(pk), Some(idx)) = (&layer.pos_key, &c2p_index) {
                let c2p = q.matmul(&heads_of(pk)?.t()?)?.gather(idx, 3)?;
                scores = (scores + (c2p * inv)?)?;
            }
            if let (Some(pq), Some(idx)) = (&layer.pos_query, &p2c_index) {
                let p2c = k.matmul(&heads_of(pq)?.t()?)?.gather(idx, 3)?.transpose(2, 3)?;
                scores = (scores + (p2c * inv)?)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&bias)?)?;
            let ctx = probs.matmul(&v.contiguous()?)?.transpose(1, 2)?.contiguous()?.reshape((b * l, self.hidden))?;
            x = self.finish_layer(layer, &ctx, &x)?;
        }
        x.reshape((b, l, self.hidden))
    }
}

fn activation(x: &Tensor, act: HiddenAct) -> Result<Tensor> {
    match act {
        HiddenAct::Gelu if x.device().is_cpu() && x.dtype() == DType::F32 => x.contiguous()?.apply_op1_no_bwd(&FastGeluErf),
        HiddenAct::Gelu => x.gelu_erf(),
        HiddenAct::GeluApproximate => x.gelu(),
        HiddenAct::Relu => x.relu(),
    }
}

/// GELU (the exact, erf form) over contiguous f32, split across threads.
struct FastGeluErf;

impl CustomOp1 for FastGeluErf {
    fn name(&self) -> &'static str {
        "deberta-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = cpu::contiguous_f32(storage, layout, "gelu", "the input")?;
        let out = cpu::par_rows(input.len(), 1, |first, dst| cpu::simd::gelu_erf(&input[first..][..dst.len()], dst));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// One layer's attention over packed sequences, fused per (sequence, head).
struct Disentangled<'a> {
    body: &'a DebertaV2Body,
    layer: &'a Layer,
    lens: &'a [usize],
}

#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    c2p: Vec<f32>,
    p2c: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn room(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: each (sequence, head) unit writes its own rows at its own head's columns; nothing
// reads the buffer until every unit is done.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl Disentangled<'_> {
    fn run(&self, qkv: &[f32], first: usize, n: usize, head: usize, rows: &[u32], kernels: cpu::Kernels, out: SharedOut, scratch: &mut Scratch) {
        let body = self.body;
        let (hidden, d) = (body.hidden, body.head_dim);
        let stride = 3 * hidden;
        let seq = &qkv[first * stride..(first + n) * stride];
        let (q_at, k_at, v_at) = (head * d, hidden + head * d, 2 * hidden + head * d);
        let alpha = 1.0 / body.scale();
        let Scratch { scores, c2p, p2c } = scratch;
        let scores = room(scores, n * n);
        cpu::gemm_nt_single(kernels, n, n, d, alpha, &seq[q_at..], stride, &seq[k_at..], stride, scores, n);
        if let Some(r) = &body.relative {
            // Table rows the sequence reaches: those of relative positions -(n-1) ..= n-1.
            let (lo, hi) = (rows[0] as usize, rows[rows.len() - 1] as usize + 1);
            let cols = hi - lo;
            if let (true, Some(pk)) = (r.c2p, &self.layer.pos_key_values) {
                let c = room(c2p, n * cols);
                cpu::gemm_nt_single(kernels, n, cols, d, alpha, &seq[q_at..], stride, &pk[lo * hidden + head * d..], hidden, c, cols);
                for i in 0..n {
                    let row = &mut scores[i * n..][..n];
                    let c = &c[i * cols..][..cols];
                    for (j, s) in row.iter_mut().enumerate() {
                        *s += c[rows[i + n - 1 - j] as usize - lo];
                    }
                }
            }
            if let (true, Some(pq)) = (r.p2c, &self.layer.pos_query_values) {
                let p = room(p2c, n * cols);
                cpu::gemm_nt_single(kernels, n, cols, d, alpha, &seq[k_at..], stride, &pq[lo * hidden + head * d..], hidden, p, cols);
                // Key j, query i: row clamp(-bucket(j - i) + span) = rows' entry for i - j when
                // the buckets are symmetric, which make_log_bucket_position's are (sign · f(|rel|)).
                for i in 0..n {
                    let row = &mut scores[i * n..][..n];
                    for (j, s) in row.iter_mut().enumerate() {
                        *s += p[j * cols + rows[i + n - 1 - j] as usize - lo];
                    }
                }
            }
        }
        cpu::simd::softmax_rows(scores, n);
        // SAFETY: the (n, d) block at this sequence's rows and this head's columns lies inside
        // the context buffer, and this unit alone writes it.
        unsafe {
            let out = out.0.add(first * hidden + head * d);
            cpu::gemm_nn_single(kernels, n, d, n, scores, n, &seq[v_at..], stride, out, hidden);
        }
    }
}

impl CustomOp1 for Disentangled<'_> {
    fn name(&self) -> &'static str {
        "deberta-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = cpu::contiguous_f32(storage, layout, "deberta attention", "the input")?;
        let (heads, hidden) = (self.body.heads, self.body.hidden);
        let tokens: usize = self.lens.iter().sum();
        if qkv.len() != tokens * 3 * hidden {
            candle_core::bail!("deberta attention: qkv of {} values for {tokens} tokens of 3 x {hidden}", qkv.len());
        }
        let mut units = Vec::new();
        let mut first = 0;
        for &n in self.lens {
            units.extend((0..heads).map(|head| (first, n, head)));
            first += n;
        }
        // Table rows per relative position, once per sequence length.
        let longest = self.lens.iter().copied().max().unwrap_or(0);
        let rows = match &self.body.relative {
            Some(r) if longest > 0 => r.rows(longest),
            _ => Vec::new(),
        };
        let mut out: Vec<f32> = Vec::with_capacity(tokens * hidden);
        let shared = SharedOut(out.as_mut_ptr());
        let kernels = cpu::selected();
        units.into_par_iter().filter(|u| u.1 > 0).for_each(|(first, n, head)| {
            // This sequence's relative positions -(n-1) ..= n-1 within the longest's table.
            let rows = if rows.is_empty() { &rows[..] } else { &rows[longest - n..longest + n - 1] };
            SCRATCH.with_borrow_mut(|scratch| self.run(qkv, first, n, head, rows, kernels, shared, scratch))
        });
        // SAFETY: the units wrote every element: each sequence's rows at every head.
        unsafe { out.set_len(tokens * hidden) };
        Ok((CpuStorage::F32(out), Shape::from((tokens, hidden))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KernelsSpec;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cross_encoders").join(name)
    }

    /// The buckets equal transformers' make_log_bucket_position (recorded by
    /// make_cross_encoders.py) at every relative position in -1024 ..= 1024, for DeBERTa-v3's
    /// own settings (256 buckets, 512 positions) and the fixture's.
    #[test]
    fn log_buckets_match_transformers() {
        let expected: Value = serde_json::from_slice(&std::fs::read(fixture("deberta-v3-rel").join("expected.json")).unwrap()).unwrap();
        let table = &expected["log_buckets"];
        let [from, to] = [0, 1].map(|i| table["relative_positions"][i].as_i64().unwrap());
        for key in ["deberta_v3_base", "this_model"] {
            let t = &table[key];
            let (b, m) = (t["position_buckets"].as_i64().unwrap(), t["max_relative_positions"].as_i64().unwrap());
            let want: Vec<i64> = t["buckets"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            let got: Vec<i64> = (from..=to).map(|rel| log_bucket(rel, b, m)).collect();
            assert_eq!(got, want, "{key}");
        }
    }

    /// Packed (fused, each kernel choice) and padded (candle's operations) forward passes agree
    /// at every real token, for both fixtures' settings and a batch of unequal lengths.
    #[test]
    fn packed_attention_matches_candle() {
        for name in ["deberta-v3-rel", "deberta-v2-c2p-abs"] {
            let dir = fixture(name);
            let cfg: DebertaV2Config = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
            let vb = VarBuilder::from_buffered_safetensors(std::fs::read(dir.join("model.safetensors")).unwrap(), DType::F32, &Device::Cpu).unwrap();
            let body = DebertaV2Body::load(vb, &cfg).unwrap();
            let l = 37;
            let ids: Vec<u32> = (0..3 * l).map(|i| (i as u32 * 37 + 11) % (cfg.vocab_size as u32 - 5) + 4).collect();
            let ids = Tensor::from_vec(ids, (3, l), &Device::Cpu).unwrap();
            let types: Vec<u32> = (0..3 * l).map(|i| u32::from(i % l > 10) * u32::from(cfg.type_vocab_size > 1)).collect();
            let types = Tensor::from_vec(types, (3, l), &Device::Cpu).unwrap();
            let lens = [l - 3, l, 6];
            let mask: Vec<u32> = lens.iter().flat_map(|&n| (0..l).map(move |t| (t < n) as u32)).collect();
            let mask = Tensor::from_vec(mask, (3, l), &Device::Cpu).unwrap();
            let keep = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
            cpu::select(KernelsSpec::Candle, "").unwrap();
            let want = body.forward(&ids, &types, &mask).unwrap().broadcast_mul(&keep).unwrap();
            cpu::select(KernelsSpec::Fused, "").unwrap();
            let got = body.forward(&ids, &types, &mask).unwrap().broadcast_mul(&keep).unwrap();
            let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{name}: max |packed - padded| {diff}");
        }
    }
}
