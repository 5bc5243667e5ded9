//! The Qwen3 decoder body (Qwen3-Embedding and models trained from it), for embeddings: no
//! cache, a causal mask, batches padded on the right. With causal attention a right-padded
//! row's real tokens never see its padding, and rotary positions only enter through their
//! differences, so each text's states equal those of the text alone (or left-padded, as
//! sentence-transformers pads decoders).
use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

use super::cpu::dense::Dense;

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
    q: Dense,
    k: Dense,
    v: Dense,
    o: Dense,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    gate: Dense,
    up: Dense,
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
    inv_freq: Vec<f32>,
    device: Device,
}

fn linear(vb: VarBuilder, input: usize, output: usize, bias: bool) -> Result<Dense> {
    let b = if bias { Some(vb.get(output, "bias")?) } else { None };
    Dense::new(vb.get((output, input), "weight")?, b)
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
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            layers.push(Layer {
                q: linear(a.pp("q_proj"), h, heads * hd, cfg.attention_bias)?,
                k: linear(a.pp("k_proj"), h, kv_heads * hd, cfg.attention_bias)?,
                v: linear(a.pp("v_proj"), h, kv_heads * hd, cfg.attention_bias)?,
                o: linear(a.pp("o_proj"), heads * hd, h, false)?,
                q_norm: rms(a.pp("q_norm"), hd, eps)?,
                k_norm: rms(a.pp("k_norm"), hd, eps)?,
                input_norm: rms(l.pp("input_layernorm"), h, eps)?,
                post_norm: rms(l.pp("post_attention_layernorm"), h, eps)?,
                gate: linear(m.pp("gate_proj"), h, cfg.intermediate_size, false)?,
                up: linear(m.pp("up_proj"), h, cfg.intermediate_size, false)?,
                down: linear(m.pp("down_proj"), cfg.intermediate_size, h, false)?,
            });
        }
        let inv_freq = (0..hd).step_by(2).map(|i| (1.0 / theta.powf(i as f64 / hd as f64)) as f32).collect();
        Ok(Self {
            embed: Embedding::new(vb.get((cfg.vocab_size, h), "embed_tokens.weight")?, h),
            layers,
            norm: rms(vb.pp("norm"), h, eps)?,
            heads,
            kv_heads,
            head_dim: hd,
            hidden: h,
            inv_freq,
            device: vb.device().clone(),
        })
    }

    fn rotary(&self, len: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let freqs: Vec<f32> =
            (0..len).flat_map(|p| self.inv_freq.iter().map(move |f| p as f32 * f)).collect();
        let freqs = Tensor::from_vec(freqs, (len, half), &self.device)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    /// Hidden states (batch, len, hidden) after the final norm, for right-padded ids.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let mut x = self.embed.forward(ids)?;
        let dtype = x.dtype();
        let (cos, sin) = self.rotary(l, dtype)?;
        // Causal and key-padding bias, (b, 1, l, l).
        let keys = mask.to_dtype(DType::F32)?.reshape((b, 1, 1, l))?;
        let causal: Vec<f32> = (0..l).flat_map(|i| (0..l).map(move |j| if j <= i { 0.0 } else { 1.0 })).collect();
        let causal = Tensor::from_vec(causal, (1, 1, l, l), &self.device)?;
        let blocked = causal.broadcast_add(&(1.0 - keys)?)?.clamp(0f32, 1f32)?;
        let big = if dtype == DType::F16 { 6.0e4 } else { 1e9 };
        let bias = (blocked * -big)?.to_dtype(dtype)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let groups = self.heads / self.kv_heads;
        for layer in &self.layers {
            let residual = x.clone();
            let hs = layer.input_norm.forward(&x)?;
            let heads = |lin: &Dense, norm: &RmsNorm, n: usize| -> Result<Tensor> {
                let t = lin.forward(&hs)?.reshape((b, l, n, self.head_dim))?;
                norm.forward(&t)?.transpose(1, 2)?.contiguous()
            };
            let q = heads(&layer.q, &layer.q_norm, self.heads)?;
            let k = heads(&layer.k, &layer.k_norm, self.kv_heads)?;
            let v = layer.v.forward(&hs)?.reshape((b, l, self.kv_heads, self.head_dim))?.transpose(1, 2)?;
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
            x = layer.o.forward_residual(&ctx, &residual)?;
            let residual = x.clone();
            let hs = layer.post_norm.forward(&x)?;
            let act = candle_nn::ops::silu(&layer.gate.forward(&hs)?)?;
            x = layer.down.forward_residual(&(act * layer.up.forward(&hs)?)?, &residual)?;
        }
        let out = self.norm.forward(&x)?;
        debug_assert_eq!(out.dim(D::Minus1)?, self.hidden);
        Ok(out)
    }
}
