//! The ModernBERT encoder body (transformers' `ModernBertModel`): token embeddings and a norm,
//! then pre-norm layers whose attention turns queries and keys by rotary embeddings (one base
//! for global layers, another for sliding-window ones) and whose MLP is a GeGLU, then a final
//! norm; no biases anywhere. On the CPU kernels of [`super::cpu`] only the batch's real tokens
//! go through the layers (right padding is cut out, attention runs per sequence with the
//! rotation and the window fused in); elsewhere the padded batch runs on candle's operations.
//! Both agree with each other (tests) and with transformers (the library-reference tests).
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use super::cpu::attention::{self, Options, Rotary};
use super::cpu::{self, Gate, dense::Dense, packed::Packed};

/// The architecture's settings, as read from `config.json` (transformers 4.x or 5.x keys).
#[derive(Debug, Clone)]
pub struct ModernBertSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    pub pad_token_id: u32,
    /// Per layer: true for sliding-window attention, false for global.
    pub sliding: Vec<bool>,
    pub global_rope_theta: f64,
    pub local_rope_theta: f64,
    /// The window's full width: a token sees those at most `local_attention / 2` away.
    pub local_attention: usize,
}

struct Layer {
    attn_norm: Option<LayerNorm>,
    qkv: Dense,
    attn_out: Dense,
    mlp_norm: LayerNorm,
    mlp_in: Dense,
    mlp_out: Dense,
    sliding: bool,
}

pub struct ModernBertBody {
    embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    global_rotary: Rotary,
    local_rotary: Rotary,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    intermediate: usize,
    /// Positions a sliding layer's token sees on each side.
    window: usize,
    device: Device,
}

impl ModernBertBody {
    /// Weights from a `ModernBertModel` checkpoint, or a task model's (`model.` prefix).
    pub fn load(vb: VarBuilder, spec: &ModernBertSpec) -> Result<Self> {
        let vb = if vb.contains_tensor("model.embeddings.tok_embeddings.weight") { vb.pp("model") } else { vb };
        let (h, inter) = (spec.hidden_size, spec.intermediate_size);
        if spec.num_attention_heads == 0 || !h.is_multiple_of(spec.num_attention_heads) {
            candle_core::bail!("hidden_size {h} is not a multiple of num_attention_heads {}", spec.num_attention_heads);
        }
        let head_dim = h / spec.num_attention_heads;
        if !head_dim.is_multiple_of(2) {
            candle_core::bail!("rotary embeddings need an even head size, not {head_dim}");
        }
        let norm = |vb: VarBuilder| -> Result<LayerNorm> { Ok(LayerNorm::new_no_bias(vb.get(h, "weight")?, spec.norm_eps)) };
        let dense = |vb: VarBuilder, input: usize, output: usize| Dense::new(vb.get((output, input), "weight")?, None);
        let mut layers = Vec::with_capacity(spec.sliding.len());
        for (i, &sliding) in spec.sliding.iter().enumerate() {
            let l = vb.pp(format!("layers.{i}"));
            // The first layer has no attention norm (the embeddings' norm stands in for it).
            let attn_norm = if l.contains_tensor("attn_norm.weight") { Some(norm(l.pp("attn_norm"))?) } else { None };
            layers.push(Layer {
                attn_norm,
                qkv: dense(l.pp("attn.Wqkv"), h, 3 * h)?,
                attn_out: dense(l.pp("attn.Wo"), h, h)?,
                mlp_norm: norm(l.pp("mlp_norm"))?,
                mlp_in: dense(l.pp("mlp.Wi"), h, 2 * inter)?,
                mlp_out: dense(l.pp("mlp.Wo"), inter, h)?,
                sliding,
            });
        }
        let positions = spec.max_position_embeddings;
        Ok(Self {
            embeddings: Embedding::new(vb.get((spec.vocab_size, h), "embeddings.tok_embeddings.weight")?, h),
            embeddings_norm: norm(vb.pp("embeddings.norm"))?,
            layers,
            final_norm: norm(vb.pp("final_norm"))?,
            global_rotary: Rotary::new(head_dim, spec.global_rope_theta, positions),
            local_rotary: Rotary::new(head_dim, spec.local_rope_theta, positions),
            heads: spec.num_attention_heads,
            head_dim,
            hidden: h,
            intermediate: inter,
            window: spec.local_attention / 2,
            device: vb.device().clone(),
        })
    }

    /// Hidden states (batch, len, hidden) for token ids and an attention mask (1 for tokens,
    /// 0 for padding), each (batch, len) u32.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if l > self.global_rotary.positions() {
            candle_core::bail!("{l} tokens, the model has {} positions", self.global_rotary.positions());
        }
        let x = self.embeddings_norm.forward(&self.embeddings.forward(ids)?)?.reshape((b * l, self.hidden))?;
        if let Some(packed) = Packed::new(&x, mask)? {
            return self.forward_packed(&x, &packed);
        }
        self.forward_padded(x, mask, b, l)
    }

    fn rotary(&self, layer: &Layer) -> &Rotary {
        if layer.sliding { &self.local_rotary } else { &self.global_rotary }
    }

    /// The attention's input: the layer's norm of `x`, or `x` in the first layer.
    fn attention_input(layer: &Layer, x: &Tensor) -> Result<Tensor> {
        match &layer.attn_norm {
            Some(norm) => norm.forward(x),
            None => Ok(x.clone()),
        }
    }

    /// The MLP and both residual additions around the attention's context.
    fn finish_layer(&self, layer: &Layer, ctx: &Tensor, x: &Tensor) -> Result<Tensor> {
        let x = layer.attn_out.forward_residual(ctx, x)?;
        let inner = cpu::gated(&layer.mlp_in.forward(&layer.mlp_norm.forward(&x)?)?, self.intermediate, Gate::Gelu)?;
        layer.mlp_out.forward_residual(&inner, &x)
    }

    /// The layers over the batch's real tokens only, scattered back to (batch, len, hidden).
    fn forward_packed(&self, x: &Tensor, packed: &Packed) -> Result<Tensor> {
        let mut x = packed.gather(x)?;
        for layer in &self.layers {
            let options = Options { rotary: Some(self.rotary(layer)), window: layer.sliding.then_some(self.window), ..Options::default() };
            let qkv = layer.qkv.forward(&Self::attention_input(layer, &x)?)?;
            let ctx = attention::attention_with(&qkv, &packed.lens, self.heads, self.head_dim, options)?;
            x = self.finish_layer(layer, &ctx, &x)?;
        }
        packed.scatter(&self.final_norm.forward(&x)?)
    }

    /// The padded batch on candle's operations: padding and the window as additive biases.
    fn forward_padded(&self, mut x: Tensor, mask: &Tensor, b: usize, l: usize) -> Result<Tensor> {
        const FAR: f32 = -1e9;
        let padding = ((mask.to_dtype(DType::F32)? - 1.0)? * -(FAR as f64))?.reshape((b, 1, 1, l))?;
        let w = self.window;
        let outside: Vec<f32> = (0..l * l).map(|at| if (at / l).abs_diff(at % l) > w { FAR } else { 0.0 }).collect();
        let windowed = padding.broadcast_add(&Tensor::from_vec(outside, (l, l), &self.device)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (global, local) = (self.global_rotary.tables(l, &self.device)?, self.local_rotary.tables(l, &self.device)?);
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&Self::attention_input(layer, &x)?)?.reshape((b, l, 3, self.heads, self.head_dim))?;
            let qkv = qkv.permute((2, 0, 3, 1, 4))?.contiguous()?; // (3, b, heads, l, d)
            let (cos, sin) = if layer.sliding { &local } else { &global };
            let q = candle_nn::rotary_emb::rope(&qkv.get(0)?, cos, sin)?;
            let k = candle_nn::rotary_emb::rope(&qkv.get(1)?, cos, sin)?;
            let bias = if layer.sliding { &windowed } else { &padding };
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs.matmul(&qkv.get(2)?)?.transpose(1, 2)?.contiguous()?.reshape((b * l, self.hidden))?;
            x = self.finish_layer(layer, &ctx, &x)?;
        }
        self.final_norm.forward(&x)?.reshape((b, l, self.hidden))
    }
}
