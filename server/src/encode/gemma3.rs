//! The Gemma 3 text body (transformers' `Gemma3TextModel`) as EmbeddingGemma runs it:
//! bidirectional attention, sliding-window and global layers in the order `layer_types`
//! gives, each kind with its own rotary base, per-head query and key norms, scores scaled by
//! `query_pre_attn_scalar ** -0.5`, norms before and after both the attention and the GeGLU
//! MLP, token embeddings multiplied by sqrt(hidden size), and Gemma's RMS norm (weights
//! applied as 1 + weight). On the CPU kernels of [`super::cpu`] only the batch's real tokens
//! go through the layers (attention fused per sequence: head norms, rotation, window and
//! grouped key/value heads inside); elsewhere the padded batch runs on candle's operations.
//! Both agree (tests) and match transformers (library tests). What transformers 5.23 would run
//! otherwise (causal Gemma 3, biases, scaled rotary embeddings) is refused by key when the
//! config is read.
use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

use super::cpu::attention::{self, HeadNorm, Options, Rotary};
use super::cpu::{self, Gate, dense::Dense, packed::Packed};
use super::qwen3::{attention_bias, fused};

/// transformers' Gemma3TextConfig (4.x and 5.x keys), with its defaults for absent keys.
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma3Config {
    #[serde(default = "d262208")]
    pub vocab_size: usize,
    #[serde(default = "d2304")]
    pub hidden_size: usize,
    #[serde(default = "d9216")]
    pub intermediate_size: usize,
    #[serde(default = "d26")]
    pub num_hidden_layers: usize,
    #[serde(default = "d8")]
    pub num_attention_heads: usize,
    #[serde(default = "d4")]
    pub num_key_value_heads: usize,
    #[serde(default = "d256")]
    pub head_dim: usize,
    #[serde(default = "gelu_tanh")]
    pub hidden_activation: String,
    #[serde(default = "d131072")]
    pub max_position_embeddings: usize,
    #[serde(default = "eps6")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "f256")]
    pub query_pre_attn_scalar: f64,
    /// As saved: absent 4096, `null` none.
    #[serde(default = "some4096")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// transformers 4's pattern (layer i global when (i + 1) % pattern == 0), used only without
    /// `layer_types`.
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
    #[serde(default)]
    pub is_causal: Option<bool>,
}

fn d262208() -> usize {
    262_208
}
fn d2304() -> usize {
    2304
}
fn d9216() -> usize {
    9216
}
fn d26() -> usize {
    26
}
fn d8() -> usize {
    8
}
fn d4() -> usize {
    4
}
fn d256() -> usize {
    256
}
fn f256() -> f64 {
    256.0
}
fn d131072() -> usize {
    131_072
}
fn some4096() -> Option<usize> {
    Some(4096)
}
fn eps6() -> f64 {
    1e-6
}
fn gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}

/// What the Gemma 3 body computes.
#[derive(Debug, Clone)]
pub struct Gemma3Spec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub pad_token_id: u32,
    /// What the attention scores are multiplied by: `query_pre_attn_scalar ** -0.5`.
    pub scale: f64,
    /// Per layer: true for sliding-window attention, false for global.
    pub sliding: Vec<bool>,
    /// The positions a sliding layer's token sees on each side.
    pub window: usize,
    pub global_rope_theta: f64,
    pub local_rope_theta: f64,
    pub gate: Gate,
}

impl Gemma3Config {
    /// What the body computes, or what cannot run here, named by key.
    pub fn spec(&self) -> std::result::Result<Gemma3Spec, String> {
        let refuse = |key: &str, what: String| Err(format!("config.json {key}: {what}"));
        if self.use_bidirectional_attention != Some(true) {
            // Gemma 3's language models attend causally; only EmbeddingGemma's bidirectional
            // attention is checked against the library here.
            return refuse("use_bidirectional_attention", format!("{:?} is not supported (true, as EmbeddingGemma)", self.use_bidirectional_attention.unwrap_or(false)));
        }
        if self.is_causal == Some(false) {
            // transformers 5.23 then widens the sliding layers' window by one on each side.
            return refuse("is_causal", "false is not supported".into());
        }
        if self.attention_bias {
            return refuse("attention_bias", "true is not supported".into());
        }
        let gate = match self.hidden_activation.as_str() {
            "gelu_pytorch_tanh" | "gelu_new" => Gate::GeluTanh,
            "gelu" => Gate::Gelu,
            other => return refuse("hidden_activation", format!("{other:?} is not supported (gelu_pytorch_tanh, gelu_new, gelu)")),
        };
        if self.query_pre_attn_scalar.is_nan() || self.query_pre_attn_scalar <= 0.0 {
            return refuse("query_pre_attn_scalar", format!("{} is not positive", self.query_pre_attn_scalar));
        }
        let layers = self.num_hidden_layers;
        let sliding: Vec<bool> = match &self.layer_types {
            Some(types) => {
                if types.len() != layers {
                    return refuse("layer_types", format!("{} entries for {layers} layers", types.len()));
                }
                let mut out = Vec::with_capacity(layers);
                for (i, t) in types.iter().enumerate() {
                    out.push(match t.as_str() {
                        "full_attention" => false,
                        "sliding_attention" => true,
                        other => return refuse("layer_types", format!("layer {i} is {other:?} (full_attention, sliding_attention)")),
                    });
                }
                out
            }
            None => {
                let pattern = self.sliding_window_pattern.unwrap_or(6);
                if pattern == 0 {
                    return refuse("sliding_window_pattern", "0 is not supported".into());
                }
                (0..layers).map(|i| !(i + 1).is_multiple_of(pattern)).collect()
            }
        };
        // Gemma3TextConfig.__post_init__ makes the window (w // 2) + 1 when bidirectional, and
        // the sliding layers keep keys with |q - k| < that: w // 2 on each side.
        let Some(w) = self.sliding_window else {
            return refuse("sliding_window", "null is not supported with use_bidirectional_attention".into());
        };
        let rope = |layer: &str, legacy: Option<f64>, default: f64| -> std::result::Result<f64, String> {
            let params = self.rope_parameters.as_ref().filter(|p| !p.is_null());
            if let Some(p) = params
                && p.get("full_attention").is_none()
                && p.get("sliding_attention").is_none()
            {
                return Err("config.json rope_parameters: expected full_attention and sliding_attention entries".into());
            }
            let mut kinds: Vec<(String, Option<&Value>)> = vec![(format!("rope_parameters.{layer}"), params.and_then(|p| p.get(layer)).filter(|p| !p.is_null()))];
            if layer == "full_attention" {
                // transformers 4's rope_scaling applies to the global layers.
                kinds.push(("rope_scaling".into(), self.rope_scaling.as_ref().filter(|p| !p.is_null())));
            }
            for (key, p) in &kinds {
                if let Some(p) = p {
                    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
                    if kind != "default" {
                        return Err(format!("config.json {key}.rope_type: {kind:?} is not supported (default)"));
                    }
                }
            }
            Ok(kinds[0].1.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(legacy).unwrap_or(default))
        };
        Ok(Gemma3Spec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            pad_token_id: self.pad_token_id.unwrap_or(0),
            scale: self.query_pre_attn_scalar.powf(-0.5),
            sliding,
            window: w / 2,
            global_rope_theta: rope("full_attention", self.rope_theta, 1_000_000.0)?,
            local_rope_theta: rope("sliding_attention", self.rope_local_base_freq, 10_000.0)?,
            gate,
        })
    }
}

/// A layer's per-head query and key norms, as candle norms and as plain weights (1 + the
/// stored ones) for the fused attention.
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
    head_norms: HeadNorms,
    input_norm: RmsNorm,
    post_attention_norm: RmsNorm,
    pre_feedforward_norm: RmsNorm,
    post_feedforward_norm: RmsNorm,
    /// Gate and up projections in one product: 2 · intermediate outputs.
    gate_up: Dense,
    down: Dense,
    sliding: bool,
}

pub struct Gemma3Body {
    embed: Embedding,
    /// sqrt(hidden size), rounded to the weights' dtype as transformers rounds it.
    embed_scale: f64,
    layers: Vec<Layer>,
    norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    intermediate: usize,
    eps: f64,
    scale: f64,
    window: usize,
    gate: Gate,
    global_rotary: Rotary,
    local_rotary: Rotary,
    device: Device,
}

/// Gemma's RMS norm: x / sqrt(mean(x²) + eps) · (1 + weight), as a candle norm whose weight is
/// 1 + the stored one (computed in f32, held in the weights' dtype).
fn gemma_norm(weight: &Tensor, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm::new((weight.to_dtype(DType::F32)? + 1.0)?.to_dtype(weight.dtype())?, eps))
}

impl Gemma3Body {
    /// Weights from a `Gemma3TextModel` checkpoint (EmbeddingGemma's) or a causal LM's
    /// (`model.` prefix).
    pub fn load(vb: VarBuilder, spec: &Gemma3Spec) -> Result<Self> {
        let vb = if vb.contains_tensor("model.embed_tokens.weight") { vb.pp("model") } else { vb };
        let (h, heads, kv_heads, hd) = (spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            candle_core::bail!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}");
        }
        if !hd.is_multiple_of(2) {
            candle_core::bail!("rotary embeddings need an even head_dim, not {hd}");
        }
        let (eps, inter) = (spec.rms_norm_eps, spec.intermediate_size);
        let norm = |vb: VarBuilder, size: usize| -> Result<RmsNorm> { gemma_norm(&vb.get(size, "weight")?, eps) };
        let plus_one = |t: &Tensor| -> Result<Vec<f32>> { (t.to_dtype(DType::F32)? + 1.0)?.to_vec1::<f32>() };
        let mut layers = Vec::with_capacity(spec.sliding.len());
        for (i, &sliding) in spec.sliding.iter().enumerate() {
            let l = vb.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            let (q, k) = (a.pp("q_norm").get(hd, "weight")?, a.pp("k_norm").get(hd, "weight")?);
            layers.push(Layer {
                qkv: fused(&[(a.pp("q_proj"), heads * hd), (a.pp("k_proj"), kv_heads * hd), (a.pp("v_proj"), kv_heads * hd)], h, false)?,
                o: fused(&[(a.pp("o_proj"), h)], heads * hd, false)?,
                head_norms: HeadNorms { q_values: plus_one(&q)?, k_values: plus_one(&k)?, q: gemma_norm(&q, eps)?, k: gemma_norm(&k, eps)? },
                input_norm: norm(l.pp("input_layernorm"), h)?,
                post_attention_norm: norm(l.pp("post_attention_layernorm"), h)?,
                pre_feedforward_norm: norm(l.pp("pre_feedforward_layernorm"), h)?,
                post_feedforward_norm: norm(l.pp("post_feedforward_layernorm"), h)?,
                gate_up: fused(&[(m.pp("gate_proj"), inter), (m.pp("up_proj"), inter)], h, false)?,
                down: fused(&[(m.pp("down_proj"), h)], inter, false)?,
                sliding,
            });
        }
        // transformers multiplies by a float32 buffer of sqrt(hidden) cast to the weights' dtype.
        let embed_scale = Tensor::new((h as f64).sqrt() as f32, vb.device())?.to_dtype(vb.dtype())?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let positions = spec.max_position_embeddings;
        Ok(Self {
            embed: Embedding::new(vb.get((spec.vocab_size, h), "embed_tokens.weight")?, h),
            embed_scale,
            layers,
            norm: norm(vb.pp("norm"), h)?,
            heads,
            kv_heads,
            head_dim: hd,
            hidden: h,
            intermediate: inter,
            eps,
            scale: spec.scale,
            window: spec.window,
            gate: spec.gate,
            global_rotary: Rotary::new(hd, spec.global_rope_theta, positions),
            local_rotary: Rotary::new(hd, spec.local_rope_theta, positions),
            device: vb.device().clone(),
        })
    }

    /// Hidden states (batch, len, hidden) after the final norm, for token ids and an attention
    /// mask (1 for tokens, 0 for padding), each (batch, len) u32.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if l > self.global_rotary.positions() {
            candle_core::bail!("{l} tokens, the model has {} positions", self.global_rotary.positions());
        }
        let x = self.embed.forward(ids)?.affine(self.embed_scale, 0.0)?.reshape((b * l, self.hidden))?;
        if let Some(packed) = Packed::new(&x, mask)? {
            return self.forward_packed(&x, &packed);
        }
        self.forward_padded(x, mask, b, l)
    }

    fn rotary(&self, layer: &Layer) -> &Rotary {
        if layer.sliding { &self.local_rotary } else { &self.global_rotary }
    }

    /// The rest of a layer after the attention's context: the output projection and its norm,
    /// the residual, then the normed GeGLU MLP, its norm and the residual.
    fn finish_layer(&self, layer: &Layer, ctx: &Tensor, x: &Tensor) -> Result<Tensor> {
        let x = (x + layer.post_attention_norm.forward(&layer.o.forward(ctx)?)?)?;
        let inner = cpu::gated(&layer.gate_up.forward(&layer.pre_feedforward_norm.forward(&x)?)?, self.intermediate, self.gate)?;
        x + layer.post_feedforward_norm.forward(&layer.down.forward(&inner)?)?
    }

    /// The layers over the batch's real tokens only, scattered back to (batch, len, hidden).
    fn forward_packed(&self, x: &Tensor, packed: &Packed) -> Result<Tensor> {
        let mut x = packed.gather(x)?;
        for layer in &self.layers {
            let norms = &layer.head_norms;
            let options = Options {
                rotary: Some(self.rotary(layer)),
                head_norm: Some(HeadNorm { query: &norms.q_values, key: &norms.k_values, eps: self.eps as f32 }),
                window: layer.sliding.then_some(self.window),
                kv_heads: Some(self.kv_heads),
                scale: Some(self.scale as f32),
                ..Options::default()
            };
            let qkv = layer.qkv.forward(&layer.input_norm.forward(&x)?)?;
            let ctx = attention::attention_with(&qkv, &packed.lens, self.heads, self.head_dim, options)?;
            x = self.finish_layer(layer, &ctx, &x)?;
        }
        packed.scatter(&self.norm.forward(&x)?)
    }

    /// The padded batch on candle's operations: padding and the window as additive biases.
    fn forward_padded(&self, mut x: Tensor, mask: &Tensor, b: usize, l: usize) -> Result<Tensor> {
        let dtype = x.dtype();
        let global_bias = attention_bias(mask, false, None, dtype)?;
        let local_bias = attention_bias(mask, false, Some(self.window), dtype)?;
        let tables = |rotary: &Rotary| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = rotary.tables(l, &self.device)?;
            Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
        };
        let (global, local) = (tables(&self.global_rotary)?, tables(&self.local_rotary)?);
        let groups = self.heads / self.kv_heads;
        let (qw, kvw) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&layer.input_norm.forward(&x)?)?.reshape((b, l, qw + 2 * kvw))?;
            let heads = |at: usize, width: usize, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
                let t = qkv.narrow(D::Minus1, at, width)?.contiguous()?.reshape((b, l, n, self.head_dim))?;
                let t = match norm {
                    Some(norm) => norm.forward(&t)?,
                    None => t,
                };
                t.transpose(1, 2)?.contiguous()
            };
            let q = heads(0, qw, self.heads, Some(&layer.head_norms.q))?;
            let k = heads(qw, kvw, self.kv_heads, Some(&layer.head_norms.k))?;
            let v = heads(qw + kvw, kvw, self.kv_heads, None)?;
            let (cos, sin) = if layer.sliding { &local } else { &global };
            let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
            let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
            let (k, v) = if groups > 1 {
                let rep = |t: Tensor| -> Result<Tensor> {
                    let (b, n, l, d) = t.dims4()?;
                    t.unsqueeze(2)?.expand((b, n, groups, l, d))?.reshape((b, n * groups, l, d))
                };
                (rep(k)?, rep(v)?)
            } else {
                (k, v)
            };
            let bias = if layer.sliding { &local_bias } else { &global_bias };
            let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b * l, qw))?;
            x = self.finish_layer(layer, &ctx, &x)?;
        }
        self.norm.forward(&x)?.reshape((b, l, self.hidden))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> std::result::Result<Gemma3Spec, String> {
        let json = format!(
            r#"{{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "use_bidirectional_attention": true{extra}}}"#
        );
        serde_json::from_str::<Gemma3Config>(&json).unwrap().spec()
    }

    #[test]
    fn layers_windows_and_rotary_bases_follow_transformers() {
        // Without layer_types: every sliding_window_pattern-th layer (from 1) is global; 6 by default.
        assert_eq!(spec("").unwrap().sliding, [true, true, true, true]);
        assert_eq!(spec(r#", "sliding_window_pattern": 2"#).unwrap().sliding, [true, false, true, false]);
        let types = r#", "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]"#;
        assert_eq!(spec(types).unwrap().sliding, [false, true, true, false]);
        // Bidirectional: (w // 2) + 1 exclusive, i.e. w // 2 on each side; 4096 by default.
        assert_eq!(spec(r#", "sliding_window": 512"#).unwrap().window, 256);
        assert_eq!(spec(r#", "sliding_window": 513"#).unwrap().window, 256);
        assert_eq!(spec("").unwrap().window, 2048);
        // Rotary bases: 5.x rope_parameters, else the 4.x keys, else 1e6 global / 1e4 local.
        let v5 = spec(r#", "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 80000.0}, "sliding_attention": {"rope_theta": 5000.0}}"#).unwrap();
        assert_eq!((v5.global_rope_theta, v5.local_rope_theta), (80000.0, 5000.0));
        let v4 = spec(r#", "rope_theta": 90000.0, "rope_local_base_freq": 7000.0, "rope_scaling": null"#).unwrap();
        assert_eq!((v4.global_rope_theta, v4.local_rope_theta), (90000.0, 7000.0));
        let plain = spec("").unwrap();
        assert_eq!((plain.global_rope_theta, plain.local_rope_theta), (1e6, 1e4));
        // query_pre_attn_scalar, not head_dim, scales the scores (256 by default).
        assert_eq!(plain.scale, 1.0 / 16.0);
        assert_eq!(spec(r#", "query_pre_attn_scalar": 64"#).unwrap().scale, 0.125);
        assert_eq!(plain.gate, Gate::GeluTanh);
        // The softcapping keys change nothing transformers 5.23's Gemma3TextModel computes.
        assert!(spec(r#", "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0"#).is_ok());
    }

    #[test]
    fn what_cannot_run_is_named() {
        let causal = serde_json::from_str::<Gemma3Config>(r#"{"num_hidden_layers": 2}"#).unwrap().spec().unwrap_err();
        assert!(causal.contains("use_bidirectional_attention: false"), "{causal}");
        let cases = [
            (r#", "is_causal": false"#, "is_causal: false"),
            (r#", "attention_bias": true"#, "attention_bias: true"),
            (r#", "hidden_activation": "silu""#, "hidden_activation: \"silu\""),
            (r#", "rope_scaling": {"rope_type": "linear", "factor": 8.0}"#, "rope_scaling.rope_type: \"linear\""),
            (r#", "rope_parameters": {"full_attention": {"rope_type": "yarn"}, "sliding_attention": {}}"#, "rope_parameters.full_attention.rope_type: \"yarn\""),
            (r#", "layer_types": ["full_attention"]"#, "1 entries for 4 layers"),
            (r#", "layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention"]"#, "layer 1 is \"chunked_attention\""),
            (r#", "sliding_window": null"#, "sliding_window: null"),
        ];
        for (extra, needle) in cases {
            let err = spec(extra).unwrap_err();
            assert!(err.contains(needle), "{extra}: {err}");
        }
    }
}
