//! The BERT encoder body (embeddings + transformer layers), written for inference speed on
//! CPU: query, key and value projections fused into one matmul over all tokens of the batch,
//! GELU computed with a vectorizable erf instead of libm's scalar one, and, on the CPU kernels
//! of [`super::cpu`], only the batch's real tokens through the layers (right padding is cut
//! out, attention runs per sequence). Weights load from Hugging Face checkpoints (`BertModel`
//! or `bert.`-prefixed task models); the result matches candle-transformers' `BertModel` at
//! every unpadded position (checked in tests).
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};

use super::cpu::{self, dense::Dense, packed::Packed};

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
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
    /// First position id: 0 for BERT, padding index + 1 for (XLM-)RoBERTa.
    position_offset: u32,
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

impl BertBody {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Self::load_with_offset(vb, cfg, 0)
    }

    /// As [`BertBody::load`], with position ids starting at `position_offset` (XLM-RoBERTa's
    /// start after its padding index). Weights may sit under `bert.` or `roberta.`.
    pub fn load_with_offset(vb: VarBuilder, cfg: &Config, position_offset: u32) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else if vb.contains_tensor("roberta.embeddings.word_embeddings.weight") {
            vb.pp("roberta")
        } else {
            vb
        };
        if position_offset as usize + 2 > cfg.max_position_embeddings {
            candle_core::bail!("max_position_embeddings {} leaves no positions after the offset {position_offset}", cfg.max_position_embeddings);
        }
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let embeddings = Embeddings {
            word: Embedding::new(e.get((cfg.vocab_size, h), "word_embeddings.weight")?, h),
            position: Embedding::new(e.get((cfg.max_position_embeddings, h), "position_embeddings.weight")?, h),
            token_type: Embedding::new(e.get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?, h),
            norm: layer_norm(e.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let s = l.pp("attention.self");
            let weights = ["query", "key", "value"].map(|n| s.get((h, h), &format!("{n}.weight")));
            let biases = ["query", "key", "value"].map(|n| s.get(h, &format!("{n}.bias")));
            let [wq, wk, wv] = weights;
            let [bq, bk, bv] = biases;
            let qkv = Dense::new(Tensor::cat(&[wq?, wk?, wv?], 0)?, Some(Tensor::cat(&[bq?, bk?, bv?], 0)?))?;
            layers.push(Layer {
                qkv,
                attn_out: linear(l.pp("attention.output.dense"), h, h)?,
                attn_norm: layer_norm(l.pp("attention.output.LayerNorm"), h, cfg.layer_norm_eps)?,
                intermediate: linear(l.pp("intermediate.dense"), h, cfg.intermediate_size)?,
                output: linear(l.pp("output.dense"), cfg.intermediate_size, h)?,
                out_norm: layer_norm(l.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
            });
        }
        if !h.is_multiple_of(cfg.num_attention_heads) {
            candle_core::bail!("hidden_size {h} is not a multiple of num_attention_heads {}", cfg.num_attention_heads);
        }
        Ok(Self {
            embeddings,
            layers,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            hidden: h,
            act: cfg.hidden_act,
            position_offset,
            device: vb.device().clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Hidden states (batch, len, hidden) for token ids, token type ids and an attention mask
    /// (1 for tokens, 0 for padding), each (batch, len) u32.
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let start = self.position_offset;
        let positions = Tensor::arange(start, start + l as u32, &self.device)?;
        let x = self
            .embeddings
            .word
            .forward(ids)?
            .broadcast_add(&self.embeddings.position.forward(&positions)?)?
            .add(&self.embeddings.token_type.forward(types)?)?;
        let x = self.embeddings.norm.forward(&x)?.reshape((b * l, self.hidden))?;
        if let Some(packed) = Packed::new(&x, mask)? {
            return self.forward_packed(&x, &packed);
        }
        let mut x = x;
        // Padding gets a large negative bias before the softmax: (b, 1, 1, l), made in f32 and
        // held in the activations' dtype (f16 tops out at 65504; the softmax accumulates in f32).
        let dtype = x.dtype();
        let big = if dtype == DType::F16 { 6.0e4 } else { 1e9 };
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * big)?.to_dtype(dtype)?.reshape((b, 1, 1, l))?;
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
        for layer in &self.layers {
            let ctx = cpu::attention::attention(&layer.qkv.forward(&x)?, &packed.lens, self.heads, self.head_dim)?;
            x = layer.attn_norm.forward(&layer.attn_out.forward_residual(&ctx, &x)?)?;
            let inter = activation(&layer.intermediate.forward(&x)?, self.act)?;
            x = layer.out_norm.forward(&layer.output.forward_residual(&inter, &x)?)?;
        }
        packed.scatter(&x)
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
