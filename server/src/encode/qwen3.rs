//! The Qwen decoder body (Qwen3-Embedding, gte-Qwen2 and models trained from them), for
//! embeddings: no cache, a causal mask, batches padded on the right. With causal attention a
//! right-padded row's real tokens never see its padding, and rotary positions only enter
//! through their differences, so each text's states equal those of the text alone (or
//! left-padded, as sentence-transformers pads decoders). Qwen3 and Qwen2 differ only in what
//! [`QwenSpec`] names: Qwen3's per-head query and key norms, Qwen2's query, key and value
//! biases and its optional sliding window (see [`super::qwen2`]). On the CPU kernels of
//! [`super::cpu`] only the batch's real tokens go through the layers, with attention fused per
//! sequence (head norms, rotation, causal mask, window and grouped key/value heads inside);
//! elsewhere the padded batch runs on candle's operations. Both agree (tests) and match
//! transformers (library tests).
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

/// transformers' default rotary base when a config names none (`default_theta`).
const DEFAULT_ROPE_THETA: f64 = 10_000.0;
/// Qwen3Config's `head_dim` when the config has none.
const QWEN3_HEAD_DIM: usize = 128;

/// The rotary base from `rope_parameters` (transformers 5), else `rope_theta`, else the
/// library's default; scaled rotary embeddings refused by key.
pub(super) fn rope_theta(rope_parameters: Option<&Value>, rope_scaling: Option<&Value>, legacy: Option<f64>) -> std::result::Result<f64, String> {
    for (key, v) in [("rope_parameters", rope_parameters), ("rope_scaling", rope_scaling)] {
        if let Some(p) = v.filter(|p| !p.is_null()) {
            let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
            if kind != "default" {
                return Err(format!("config.json {key}.rope_type: {kind:?} is not supported (default)"));
            }
        }
    }
    let from_params = rope_parameters.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64);
    Ok(from_params.or(legacy).unwrap_or(DEFAULT_ROPE_THETA))
}

/// Refuses a decoder config's `is_causal: false` (transformers 5.23 then attends both ways,
/// sliding windows on both sides: no fixture checks that here), layer types other than
/// global and sliding, and sliding layers when the config has no window (`sliding` false:
/// transformers fails on them).
pub(super) fn check_attention_keys(is_causal: Option<bool>, layer_types: Option<&[String]>, layers: usize, sliding: bool) -> std::result::Result<(), String> {
    if is_causal == Some(false) {
        return Err("config.json is_causal: false is not supported (causal attention only)".into());
    }
    if let Some(types) = layer_types {
        if types.len() != layers {
            return Err(format!("config.json layer_types: {} entries for {layers} layers", types.len()));
        }
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "full_attention" => {}
                "sliding_attention" if sliding => {}
                "sliding_attention" => {
                    return Err(format!("config.json layer_types: layer {i} is \"sliding_attention\" without a sliding window (use_sliding_window, sliding_window)"));
                }
                other => return Err(format!("config.json layer_types: layer {i} is {other:?} (full_attention, sliding_attention)")),
            }
        }
    }
    Ok(())
}

/// The keys of a decoder config read only to refuse them (see [`check_attention_keys`]).
#[derive(Debug, Default, Deserialize)]
pub struct AttentionKeys {
    #[serde(default)]
    pub is_causal: Option<bool>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

impl Qwen3Config {
    /// The rotary base, from `rope_theta` or `rope_parameters` (transformers' 10000 when
    /// neither is set); refuses scaled rotary embeddings by key.
    pub fn rope_theta(&self) -> std::result::Result<f64, String> {
        rope_theta(self.rope_parameters.as_ref(), self.rope_scaling.as_ref(), self.rope_theta)
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

    /// [`Qwen3Config::check`], and the keys of `config` (this config's file) that only
    /// refusals read: `is_causal`, `layer_types`.
    pub fn check_file(&self, config: &[u8]) -> std::result::Result<(), String> {
        self.check()?;
        let keys: AttentionKeys = serde_json::from_slice(config).map_err(|e| format!("config.json: {e}"))?;
        check_attention_keys(keys.is_causal, keys.layer_types.as_deref(), self.num_hidden_layers, false)
    }

    /// What the body computes (every layer global; see [`Qwen3Config::check`] for what is
    /// refused).
    pub fn spec(&self) -> std::result::Result<QwenSpec, String> {
        let heads = self.num_attention_heads;
        Ok(QwenSpec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.head_dim.unwrap_or(QWEN3_HEAD_DIM),
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta()?,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            head_norms: true,
            windows: vec![None; self.num_hidden_layers],
        })
    }
}

/// What the Qwen decoder body computes, from a Qwen3 or a Qwen2 config.
#[derive(Debug, Clone)]
pub struct QwenSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Biases on the query, key and value projections (Qwen2 always; Qwen3 with
    /// `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Qwen3 with `attention_bias`; never Qwen2).
    pub o_bias: bool,
    /// RMS norms over each head's queries and keys (Qwen3's `q_norm`, `k_norm`).
    pub head_norms: bool,
    /// One entry per layer: `Some(w)` when a token sees only itself and the `w` tokens before
    /// it (a sliding window), `None` when it sees every token before it.
    pub windows: Vec<Option<usize>>,
}

/// A layer's per-head query and key norms, as candle norms and as plain weights for the
/// fused attention.
struct HeadNorms {
    q: RmsNorm,
    k: RmsNorm,
    q_values: Vec<f32>,
    k_values: Vec<f32>,
}

struct Layer {
    /// Queries, keys and values in one product: (heads + 2 kv_heads) · head_dim outputs.
    qkv: Dense,
    o: Dense,
    head_norms: Option<HeadNorms>,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    /// Gate and up projections in one product: 2 · intermediate outputs.
    gate_up: Dense,
    down: Dense,
    /// Tokens before each token it sees besides itself; `None`: all.
    window: Option<usize>,
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
pub(super) fn fused(parts: &[(VarBuilder, usize)], input: usize, bias: bool) -> Result<Dense> {
    let weights = parts.iter().map(|(vb, output)| vb.get((*output, input), "weight")).collect::<Result<Vec<_>>>()?;
    let bias = if bias { Some(Tensor::cat(&parts.iter().map(|(vb, output)| vb.get(*output, "bias")).collect::<Result<Vec<_>>>()?, 0)?) } else { None };
    Dense::new(Tensor::cat(&weights, 0)?, bias)
}

pub(super) fn rms(vb: VarBuilder, size: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get(size, "weight")?, eps))
}

impl Qwen3Body {
    /// A Qwen3 body; `cfg` as read, see [`Qwen3Config::check`] for what it cannot run.
    pub fn load(vb: VarBuilder, cfg: &Qwen3Config) -> Result<Self> {
        Self::load_spec(vb, &cfg.spec().map_err(candle_core::Error::msg)?)
    }

    /// A Qwen3 or Qwen2 body, weights from a `*Model` checkpoint or a task model's (`model.`
    /// prefix).
    pub fn load_spec(vb: VarBuilder, spec: &QwenSpec) -> Result<Self> {
        let vb = if vb.contains_tensor("model.embed_tokens.weight") { vb.pp("model") } else { vb };
        let (h, heads, kv_heads, hd) = (spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            candle_core::bail!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}");
        }
        if !hd.is_multiple_of(2) {
            candle_core::bail!("rotary embeddings need an even head_dim, not {hd}");
        }
        let eps = spec.rms_norm_eps;
        let inter = spec.intermediate_size;
        let values = |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.to_vec1::<f32>() };
        let mut layers = Vec::with_capacity(spec.windows.len());
        for (i, &window) in spec.windows.iter().enumerate() {
            let l = vb.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            let head_norms = if spec.head_norms {
                let (q, k) = (a.pp("q_norm").get(hd, "weight")?, a.pp("k_norm").get(hd, "weight")?);
                Some(HeadNorms { q_values: values(&q)?, k_values: values(&k)?, q: RmsNorm::new(q, eps), k: RmsNorm::new(k, eps) })
            } else {
                None
            };
            layers.push(Layer {
                qkv: fused(&[(a.pp("q_proj"), heads * hd), (a.pp("k_proj"), kv_heads * hd), (a.pp("v_proj"), kv_heads * hd)], h, spec.qkv_bias)?,
                o: fused(&[(a.pp("o_proj"), h)], heads * hd, spec.o_bias)?,
                head_norms,
                input_norm: rms(l.pp("input_layernorm"), h, eps)?,
                post_norm: rms(l.pp("post_attention_layernorm"), h, eps)?,
                gate_up: fused(&[(m.pp("gate_proj"), inter), (m.pp("up_proj"), inter)], h, false)?,
                down: fused(&[(m.pp("down_proj"), h)], inter, false)?,
                window,
            });
        }
        Ok(Self {
            embed: Embedding::new(vb.get((spec.vocab_size, h), "embed_tokens.weight")?, h),
            layers,
            norm: rms(vb.pp("norm"), h, eps)?,
            heads,
            kv_heads,
            head_dim: hd,
            hidden: h,
            intermediate: inter,
            eps,
            rotary: Rotary::new(hd, spec.rope_theta, spec.max_position_embeddings),
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
                head_norm: layer.head_norms.as_ref().map(|n| HeadNorm { query: &n.q_values, key: &n.k_values, eps: self.eps as f32 }),
                causal: true,
                window: layer.window,
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
        // Causal, window and key-padding biases, (b, 1, l, l), one per window the layers use.
        let mut biases: Vec<(Option<usize>, Tensor)> = Vec::new();
        for layer in &self.layers {
            if !biases.iter().any(|(w, _)| *w == layer.window) {
                biases.push((layer.window, attention_bias(mask, true, layer.window, dtype)?));
            }
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let groups = self.heads / self.kv_heads;
        let (qw, kvw) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        for layer in &self.layers {
            let residual = x.clone();
            let qkv = layer.qkv.forward(&layer.input_norm.forward(&x)?)?;
            let heads = |at: usize, width: usize, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
                let t = qkv.narrow(D::Minus1, at, width)?.contiguous()?.reshape((b, l, n, self.head_dim))?;
                let t = match norm {
                    Some(norm) => norm.forward(&t)?,
                    None => t,
                };
                t.transpose(1, 2)?.contiguous()
            };
            let q = heads(0, qw, self.heads, layer.head_norms.as_ref().map(|n| &n.q))?;
            let k = heads(qw, kvw, self.kv_heads, layer.head_norms.as_ref().map(|n| &n.k))?;
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
            let bias = &biases.iter().find(|(w, _)| *w == layer.window).expect("a bias for every layer's window").1;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, self.heads * self.head_dim))?;
            x = self.mlp(layer, &layer.o.forward_residual(&ctx, &residual)?)?;
        }
        let out = self.norm.forward(&x)?;
        debug_assert_eq!(out.dim(D::Minus1)?, self.hidden);
        Ok(out)
    }
}

/// The additive attention bias (b, 1, l, l) in `dtype` for `mask` (b, l; 1 for tokens): 0 where
/// a query row sees a key column, a large negative number where the key is padding, after the
/// query (`causal`) or farther than `window` positions (before it, or on either side when not
/// causal), as [`Options`] decides for the fused attention.
pub(super) fn attention_bias(mask: &Tensor, causal: bool, window: Option<usize>, dtype: DType) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let keys = mask.to_dtype(DType::F32)?.reshape((b, 1, 1, l))?;
    let shape: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if (causal && j > i) || window.is_some_and(|w| i.abs_diff(j) > w) { 1.0 } else { 0.0 }))
        .collect();
    let shape = Tensor::from_vec(shape, (1, 1, l, l), mask.device())?;
    let blocked = shape.broadcast_add(&(1.0 - keys)?)?.clamp(0f32, 1f32)?;
    let big = if dtype == DType::F16 { 6.0e4 } else { 1e9 };
    (blocked * -big)?.to_dtype(dtype)
}
