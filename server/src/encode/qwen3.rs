//! The Qwen3 decoder body (Qwen3-Embedding and models trained from it), for embeddings: no
//! cache, a causal mask, batches padded on the right. With causal attention a right-padded
//! row's real tokens never see its padding, and rotary positions only enter through their
//! differences, so each text's states equal those of the text alone (or left-padded, as
//! sentence-transformers pads decoders). On the CPU kernels of [`super::cpu`] only the
//! batch's real tokens go through the layers, with attention fused per sequence (head norms,
//! rotation, causal mask and grouped key/value heads inside); elsewhere the padded batch runs
//! on candle's operations. Both agree (tests) and match transformers (library tests).
use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

use super::cpu::attention::{self, HeadNorm, Options, Rotary};
use super::cpu::{self, Gate, dense::Dense, packed::Packed};

#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_max_positions() -> usize {
    32768
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl Qwen3Config {
    /// The rotary base, from `rope_theta` or `rope_parameters`; refuses scaled rotary
    /// embeddings by key.
    pub fn rope_theta(&self) -> std::result::Result<f64, String> {
        for (key, v) in [("rope_parameters", &self.rope_parameters), ("rope_scaling", &self.rope_scaling)] {
            if let Some(p) = v.as_ref().filter(|p| !p.is_null()) {
                let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
                if kind != "default" {
                    return Err(format!("config.json {key}.rope_type: {kind:?} is not supported (default)"));
                }
            }
        }
        let from_params = self.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(Value::as_f64);
        Ok(from_params.or(self.rope_theta).unwrap_or(1_000_000.0))
    }

    /// What this body cannot reproduce, named by key.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.use_sliding_window {
            return Err("config.json use_sliding_window: true is not supported".into());
        }
        if self.hidden_act != "silu" {
            return Err(format!("config.json hidden_act: {:?} is not supported (silu)", self.hidden_act));
        }
        self.rope_theta().map(|_| ())
    }
}

struct Layer {
    /// Queries, keys and values in one product: (heads + 2 kv_heads) · head_dim outputs.
    qkv: Dense,
    o: Dense,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    /// The head norms' weights as plain values, for the fused attention.
    q_norm_values: Vec<f32>,
    k_norm_values: Vec<f32>,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    /// Gate and up projections in one product: 2 · intermediate outputs.
    gate_up: Dense,
    down: Dense,
}

pub struct Qwen3Body {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    intermediate: usize,
    eps: f64,
    rotary: Rotary,
    device: Device,
}

/// One dense layer from several of the checkpoint's, their outputs side by side.
fn fused(parts: &[(VarBuilder, usize)], input: usize, bias: bool) -> Result<Dense> {
    let weights = parts.iter().map(|(vb, output)| vb.get((*output, input), "weight")).collect::<Result<Vec<_>>>()?;
    let bias = if bias { Some(Tensor::cat(&parts.iter().map(|(vb, output)| vb.get(*output, "bias")).collect::<Result<Vec<_>>>()?, 0)?) } else { None };
    Dense::new(Tensor::cat(&weights, 0)?, bias)
}

fn rms(vb: VarBuilder, size: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get(size, "weight")?, eps))
}

impl Qwen3Body {
    pub fn load(vb: VarBuilder, cfg: &Qwen3Config) -> Result<Self> {
        let theta = cfg.rope_theta().map_err(candle_core::Error::msg)?;
        let vb = if vb.contains_tensor("model.embed_tokens.weight") { vb.pp("model") } else { vb };
        let h = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_key_value_heads.unwrap_or(heads);
        let hd = cfg.head_dim.unwrap_or(h / heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            candle_core::bail!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}");
        }
        let eps = cfg.rms_norm_eps;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        if !hd.is_multiple_of(2) {
            candle_core::bail!("rotary embeddings need an even head_dim, not {hd}");
        }
        let inter = cfg.intermediate_size;
        let values = |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.to_vec1::<f32>() };
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            let (q_norm, k_norm) = (a.pp("q_norm").get(hd, "weight")?, a.pp("k_norm").get(hd, "weight")?);
            layers.push(Layer {
                qkv: fused(&[(a.pp("q_proj"), heads * hd), (a.pp("k_proj"), kv_heads * hd), (a.pp("v_proj"), kv_heads * hd)], h, cfg.attention_bias)?,
                o: fused(&[(a.pp("o_proj"), h)], heads * hd, false)?,
                q_norm_values: values(&q_norm)?,
                k_norm_values: values(&k_norm)?,
                q_norm: RmsNorm::new(q_norm, eps),
                k_norm: RmsNorm::new(k_norm, eps),
                input_norm: rms(l.pp("input_layernorm"), h, eps)?,
                post_norm: rms(l.pp("post_attention_layernorm"), h, eps)?,
                gate_up: fused(&[(m.pp("gate_proj"), inter), (m.pp("up_proj"), inter)], h, false)?,
                down: fused(&[(m.pp("down_proj"), h)], inter, false)?,
            });
        }
        Ok(Self {
            embed: Embedding::new(vb.get((cfg.vocab_size, h), "embed_tokens.weight")?, h),
            layers,
            norm: rms(vb.pp("norm"), h, eps)?,
            heads,
            kv_heads,
            head_dim: hd,
            hidden: h,
            intermediate: inter,
            eps,
            rotary: Rotary::new(hd, theta, cfg.max_position_embeddings),
            device: vb.device().clone(),
        })
    }

    /// Hidden states (batch, len, hidden) after the final norm, for right-padded ids.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if l > self.rotary.positions() {
            candle_core::bail!("{l} tokens, the model has {} positions", self.rotary.positions());
        }
        let x = self.embed.forward(ids)?;
        if let Some(packed) = Packed::new(&x, mask)? {
            return self.forward_packed(&x.reshape((b * l, self.hidden))?, &packed);
        }
        self.forward_padded(x, mask, b, l)
    }

    /// The MLP (SwiGLU) and its residual.
    fn mlp(&self, layer: &Layer, x: &Tensor) -> Result<Tensor> {
        let inner = cpu::gated(&layer.gate_up.forward(&layer.post_norm.forward(x)?)?, self.intermediate, Gate::Silu)?;
        layer.down.forward_residual(&inner, x)
    }

    /// The layers over the batch's real tokens only, scattered back to (batch, len, hidden).
    fn forward_packed(&self, x: &Tensor, packed: &Packed) -> Result<Tensor> {
        let mut x = packed.gather(x)?;
        for layer in &self.layers {
            let options = Options {
                rotary: Some(&self.rotary),
                head_norm: Some(HeadNorm { query: &layer.q_norm_values, key: &layer.k_norm_values, eps: self.eps as f32 }),
                causal: true,
                kv_heads: Some(self.kv_heads),
                ..Options::default()
            };
            let qkv = layer.qkv.forward(&layer.input_norm.forward(&x)?)?;
            let ctx = attention::attention_with(&qkv, &packed.lens, self.heads, self.head_dim, options)?;
            x = self.mlp(layer, &layer.o.forward_residual(&ctx, &x)?)?;
        }
        packed.scatter(&self.norm.forward(&x)?)
    }

    fn forward_padded(&self, mut x: Tensor, mask: &Tensor, b: usize, l: usize) -> Result<Tensor> {
        let dtype = x.dtype();
        let (cos, sin) = self.rotary.tables(l, &self.device)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        // Causal and key-padding bias, (b, 1, l, l).
        let keys = mask.to_dtype(DType::F32)?.reshape((b, 1, 1, l))?;
        let causal: Vec<f32> = (0..l).flat_map(|i| (0..l).map(move |j| if j <= i { 0.0 } else { 1.0 })).collect();
        let causal = Tensor::from_vec(causal, (1, 1, l, l), &self.device)?;
        let blocked = causal.broadcast_add(&(1.0 - keys)?)?.clamp(0f32, 1f32)?;
        let big = if dtype == DType::F16 { 6.0e4 } else { 1e9 };
        let bias = (blocked * -big)?.to_dtype(dtype)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let groups = self.heads / self.kv_heads;
        let (qw, kvw) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        for layer in &self.layers {
            let residual = x.clone();
            let qkv = layer.qkv.forward(&layer.input_norm.forward(&x)?)?;
            let heads = |at: usize, width: usize, n: usize, norm: &RmsNorm| -> Result<Tensor> {
                let t = qkv.narrow(D::Minus1, at, width)?.contiguous()?.reshape((b, l, n, self.head_dim))?;
                norm.forward(&t)?.transpose(1, 2)?.contiguous()
            };
            let q = heads(0, qw, self.heads, &layer.q_norm)?;
            let k = heads(qw, kvw, self.kv_heads, &layer.k_norm)?;
            let v = qkv.narrow(D::Minus1, qw + kvw, kvw)?.reshape((b, l, self.kv_heads, self.head_dim))?.transpose(1, 2)?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            let (k, v) = if groups > 1 {
                let rep = |t: Tensor| -> Result<Tensor> {
                    let (b, n, l, d) = t.dims4()?;
                    t.unsqueeze(2)?.expand((b, n, groups, l, d))?.reshape((b, n * groups, l, d))
                };
                (rep(k)?, rep(v.contiguous()?)?)
            } else {
                (k, v.contiguous()?)
            };
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, self.heads * self.head_dim))?;
            x = self.mlp(layer, &layer.o.forward_residual(&ctx, &residual)?)?;
        }
        let out = self.norm.forward(&x)?;
        debug_assert_eq!(out.dim(D::Minus1)?, self.hidden);
        Ok(out)
    }
}
