//! The BERT encoder body (embeddings + post-norm transformer layers), written for inference
//! speed on CPU: query, key and value projections fused into one matmul over all tokens of the
//! batch, GELU computed with a vectorizable erf instead of libm's scalar one, and, on the CPU
//! kernels of [`super::cpu`], only the batch's real tokens through the layers (right padding is
//! cut out, attention runs per sequence). Weights load from Hugging Face checkpoints (`BertModel`
//! or `bert.`-prefixed task models); the result matches candle-transformers' `BertModel` at
//! every unpadded position (checked in tests).
//!
//! Families that compute the same layers under other tensor names run on it too
//! ([`Names`]): DistilBERT (no token types) and MPNet (no token types, positions from the ids,
//! a relative-position bias on the attention scores).
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};

use super::cpu::attention::{self, Options, RelativeBias};
use super::cpu::{self, dense::Dense, packed::Packed};

/// Where a checkpoint keeps a BERT-shaped body's tensors, relative to the body's root.
pub struct Names {
    /// Task models' prefixes for the body (`bert.` in `BertForSequenceClassification`).
    pub prefixes: &'static [&'static str],
    /// The layers' prefix; layer `i` is under `{layers}.{i}`.
    pub layers: &'static str,
    /// Within a layer: the query, key, value and attention output projections, the norm after
    /// the attention, the MLP's two projections and the norm after it.
    pub query: &'static str,
    pub key: &'static str,
    pub value: &'static str,
    pub attn_out: &'static str,
    pub attn_norm: &'static str,
    pub intermediate: &'static str,
    pub output: &'static str,
    pub out_norm: &'static str,
    /// Whether the embeddings add token type embeddings.
    pub token_types: bool,
}

/// BERT's and (XLM-)RoBERTa's names.
pub const BERT: Names = Names {
    prefixes: &["bert", "roberta"],
    layers: "encoder.layer",
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    attn_out: "attention.output.dense",
    attn_norm: "attention.output.LayerNorm",
    intermediate: "intermediate.dense",
    output: "output.dense",
    out_norm: "output.LayerNorm",
    token_types: true,
};

/// How position ids are made.
#[derive(Debug, Clone, Copy)]
pub enum Positions {
    /// 0, 1, 2, ... plus an offset: 0 for BERT and DistilBERT.
    Offset(u32),
    /// From the ids, as fairseq-style models count them: tokens other than `padding_idx`
    /// numbered from `padding_idx + 1` in order, `padding_idx` itself at `padding_idx`
    /// (XLM-RoBERTa; MPNet, whose padding index is 1 whatever the config says). A padding
    /// token inside a text takes the padding position and shifts the rest back.
    FromIds { padding_idx: u32 },
}

impl Positions {
    /// The position of a text's first token: the table holds that many fewer positions.
    pub fn first(self) -> u32 {
        match self {
            Positions::Offset(offset) => offset,
            Positions::FromIds { padding_idx } => padding_idx + 1,
        }
    }
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Option<Embedding>,
    norm: LayerNorm,
}

struct Layer {
    qkv: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    out_norm: LayerNorm,
}

pub struct BertBody {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    act: HiddenAct,
    positions: Positions,
    /// MPNet's bias on every layer's attention scores by relative position.
    relative: Option<RelativeBias>,
    device: Device,
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> Result<LayerNorm> {
    let (weight, bias) = match (vb.get(size, "weight"), vb.get(size, "bias")) {
        (Ok(w), Ok(b)) => (w, b),
        // Old TF-converted checkpoints name them gamma/beta.
        _ => (vb.get(size, "gamma")?, vb.get(size, "beta")?),
    };
    Ok(LayerNorm::new(weight, bias, eps))
}

fn linear(vb: VarBuilder, input: usize, output: usize) -> Result<Dense> {
    Dense::new(vb.get((output, input), "weight")?, Some(vb.get(output, "bias")?))
}

/// The body's root in `vb`: under one of the task models' prefixes when the checkpoint has
/// one, else `vb` itself.
pub fn root<'a>(vb: VarBuilder<'a>, names: &Names) -> VarBuilder<'a> {
    for prefix in names.prefixes {
        if vb.contains_tensor(&format!("{prefix}.embeddings.word_embeddings.weight")) {
            return vb.pp(*prefix);
        }
    }
    vb
}

impl BertBody {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Self::load_positioned(vb, cfg, Positions::Offset(0))
    }

    /// As [`BertBody::load`], with position ids made as `positions` says (XLM-RoBERTa counts
    /// them on the ids from its padding index). Weights may sit under `bert.` or `roberta.`.
    pub fn load_positioned(vb: VarBuilder, cfg: &Config, positions: Positions) -> Result<Self> {
        Self::load_named(root(vb, &BERT), cfg, &BERT, positions)
    }

    /// A BERT-shaped body under `names` in `vb` (the body's root), its positions made as
    /// `positions` says. `cfg.type_vocab_size` is read only when the family has token types.
    pub fn load_named(vb: VarBuilder, cfg: &Config, names: &Names, positions: Positions) -> Result<Self> {
        let offset = positions.first();
        if offset as usize + 2 > cfg.max_position_embeddings {
            candle_core::bail!("max_position_embeddings {} leaves no positions after the offset {offset}", cfg.max_position_embeddings);
        }
        let h = cfg.hidden_size;
        if cfg.num_attention_heads == 0 || !h.is_multiple_of(cfg.num_attention_heads) {
            candle_core::bail!("hidden_size {h} is not a multiple of num_attention_heads {}", cfg.num_attention_heads);
        }
        let e = vb.pp("embeddings");
        let token_type = if names.token_types {
            Some(Embedding::new(e.get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?, h))
        } else {
            None
        };
        let embeddings = Embeddings {
            word: Embedding::new(e.get((cfg.vocab_size, h), "word_embeddings.weight")?, h),
            position: Embedding::new(e.get((cfg.max_position_embeddings, h), "position_embeddings.weight")?, h),
            token_type,
            norm: layer_norm(e.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("{}.{i}", names.layers));
            let weights = [names.query, names.key, names.value].map(|n| l.get((h, h), &format!("{n}.weight")));
            let biases = [names.query, names.key, names.value].map(|n| l.get(h, &format!("{n}.bias")));
            let [wq, wk, wv] = weights;
            let [bq, bk, bv] = biases;
            let qkv = Dense::new(Tensor::cat(&[wq?, wk?, wv?], 0)?, Some(Tensor::cat(&[bq?, bk?, bv?], 0)?))?;
            layers.push(Layer {
                qkv,
                attn_out: linear(l.pp(names.attn_out), h, h)?,
                attn_norm: layer_norm(l.pp(names.attn_norm), h, cfg.layer_norm_eps)?,
                intermediate: linear(l.pp(names.intermediate), h, cfg.intermediate_size)?,
                output: linear(l.pp(names.output), cfg.intermediate_size, h)?,
                out_norm: layer_norm(l.pp(names.out_norm), h, cfg.layer_norm_eps)?,
            });
        }
        Ok(Self {
            embeddings,
            layers,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            hidden: h,
            act: cfg.hidden_act,
            positions,
            relative: None,
            device: vb.device().clone(),
        })
    }

    /// The body with `bias` added to every layer's attention scores by relative position.
    pub fn with_relative_bias(mut self, bias: RelativeBias) -> Result<Self> {
        if bias.heads() != self.heads {
            candle_core::bail!("relative attention bias for {} heads, the body has {}", bias.heads(), self.heads);
        }
        self.relative = Some(bias);
        Ok(self)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Hidden states (batch, len, hidden) for token ids, token type ids (read only by families
    /// that have them) and an attention mask (1 for tokens, 0 for padding), each (batch, len) u32.
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let words = self.embeddings.word.forward(ids)?;
        let x = match self.positions {
            Positions::Offset(start) => {
                let positions = Tensor::arange(start, start + l as u32, &self.device)?;
                words.broadcast_add(&self.embeddings.position.forward(&positions)?)?
            }
            Positions::FromIds { padding_idx } => {
                let ids = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
                let positions: Vec<u32> = ids
                    .iter()
                    .flat_map(|row| {
                        let mut seen = padding_idx;
                        row.iter().map(move |&id| {
                            if id == padding_idx {
                                padding_idx
                            } else {
                                seen += 1;
                                seen
                            }
                        })
                    })
                    .collect();
                let positions = Tensor::from_vec(positions, (b, l), &self.device)?;
                (words + self.embeddings.position.forward(&positions)?)?
            }
        };
        let x = match &self.embeddings.token_type {
            Some(token_type) => x.add(&token_type.forward(types)?)?,
            None => x,
        };
        let x = self.embeddings.norm.forward(&x)?.reshape((b * l, self.hidden))?;
        if let Some(packed) = Packed::new(&x, mask)? {
            return self.forward_packed(&x, &packed);
        }
        let mut x = x;
        // Padding gets a large negative bias before the softmax: (b, 1, 1, l), made in f32 and
        // held in the activations' dtype (f16 tops out at 65504; the softmax accumulates in f32).
        let dtype = x.dtype();
        let big = if dtype == DType::F16 { 6.0e4 } else { 1e9 };
        let mut bias = ((mask.to_dtype(DType::F32)? - 1.0)? * big)?.to_dtype(dtype)?.reshape((b, 1, 1, l))?;
        if let Some(relative) = &self.relative {
            bias = bias.broadcast_add(&relative.tensor(l, dtype, &self.device)?)?;
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?.reshape((b, l, 3, self.heads, self.head_dim))?;
            let qkv = qkv.permute((2, 0, 3, 1, 4))?.contiguous()?; // (3, b, heads, l, d)
            let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b * l, self.hidden))?;
            x = layer.attn_norm.forward(&layer.attn_out.forward_residual(&ctx, &x)?)?;
            let inter = activation(&layer.intermediate.forward(&x)?, self.act)?;
            x = layer.out_norm.forward(&layer.output.forward_residual(&inter, &x)?)?;
        }
        x.reshape((b, l, self.hidden))
    }

    /// The layers on the CPU kernels over the batch's real tokens only (attention per
    /// sequence), scattered back to (batch, len, hidden).
    fn forward_packed(&self, x: &Tensor, packed: &Packed) -> Result<Tensor> {
        let mut x = packed.gather(x)?;
        let options = Options { relative: self.relative.as_ref(), ..Options::default() };
        for layer in &self.layers {
            let ctx = attention::attention_with(&layer.qkv.forward(&x)?, &packed.lens, self.heads, self.head_dim, options)?;
            x = layer.attn_norm.forward(&layer.attn_out.forward_residual(&ctx, &x)?)?;
            let inter = activation(&layer.intermediate.forward(&x)?, self.act)?;
            x = layer.out_norm.forward(&layer.output.forward_residual(&inter, &x)?)?;
        }
        packed.scatter(&x)
    }
}

/// transformers' BertConfig defaults for absent keys, shared by the families whose configs
/// copy them (BERT, XLM-RoBERTa, MPNet; DistilBERT's activation).
pub fn d768() -> usize {
    768
}
pub fn d12() -> usize {
    12
}
pub fn d3072() -> usize {
    3072
}
pub fn d512() -> usize {
    512
}
pub fn eps12() -> f64 {
    1e-12
}
pub fn gelu() -> String {
    "gelu".into()
}

/// The activation a config's `key` names (`hidden_act`; DistilBERT's `activation`), as
/// transformers' `ACT2FN` reads it, or why it cannot run here.
pub fn hidden_act(key: &str, name: &str) -> std::result::Result<HiddenAct, String> {
    match name {
        "gelu" => Ok(HiddenAct::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" => Ok(HiddenAct::GeluApproximate),
        "relu" => Ok(HiddenAct::Relu),
        other => Err(format!("config.json {key}: {other:?} is not supported (gelu, gelu_new, relu)")),
    }
}

fn activation(x: &Tensor, act: HiddenAct) -> Result<Tensor> {
    match act {
        HiddenAct::Gelu if x.device().is_cpu() && x.dtype() == DType::F32 => x.apply_op1_no_bwd(&FastGeluErf),
        HiddenAct::Gelu => x.gelu_erf(),
        HiddenAct::GeluApproximate => x.gelu(),
        HiddenAct::Relu => x.relu(),
    }
}

/// GELU (the exact, erf form) over contiguous f32, split across threads.
struct FastGeluErf;

impl CustomOp1 for FastGeluErf {
    fn name(&self) -> &'static str {
        "fast-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = cpu::contiguous_f32(storage, layout, "fast-gelu-erf", "the input")?;
        // Element-wise: rows of one value, chunked by par_rows.
        let out = cpu::par_rows(input.len(), 1, |first, dst| cpu::simd::gelu_erf(&input[first..][..dst.len()], dst));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_op_matches_candle_gelu_erf() {
        let x = Tensor::arange(-5000f32, 5000f32, &Device::Cpu).unwrap().affine(1e-3, 0.0).unwrap();
        let ours = activation(&x, HiddenAct::Gelu).unwrap().to_vec1::<f32>().unwrap();
        let reference = x.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        let worst = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 2e-6, "max |gelu difference| {worst}");
    }
}
