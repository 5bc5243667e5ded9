//! Transformer bodies by `config.json` `model_type`: BERT and XLM-RoBERTa (our fused body,
//! positions counted on the ids from the padding index for the latter), DistilBERT and MPNet (the same body
//! under their own names; MPNet with its relative attention bias), ModernBERT (our body:
//! global and sliding-window attention layers in any order, two rotary bases), Qwen3 and Qwen2
//! (our decoder body: Qwen3's head norms, Qwen2's projection biases and sliding window) and
//! Gemma 3 text (EmbeddingGemma: bidirectional, sliding and global layers). Any other
//! `model_type` is refused by name, never loaded as something else. A new family is one file
//! plus one match arm here.
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config as BertConfig, PositionEmbeddingType};
use serde::Deserialize;
use serde_json::Value;

use super::body::{BertBody, Positions, d12, d512, d768, d3072, eps12, gelu, hidden_act};
use super::distilbert::{self, DistilBertConfig};
use super::gemma3::{Gemma3Body, Gemma3Config};
use super::modernbert::{ModernBertBody, ModernBertSpec};
use super::mpnet::{self, MpnetConfig};
use super::qwen2::Qwen2Config;
use super::qwen3::{Qwen3Body, Qwen3Config};

pub const SUPPORTED: &str = "bert, xlm-roberta, distilbert, mpnet, modernbert, qwen3, qwen2, gemma3_text";

/// A loaded body: token ids in, hidden states (batch, len, hidden) out.
pub enum Body {
    Bert(BertBody),
    ModernBert(ModernBertBody),
    /// The Qwen decoder body: Qwen3 and Qwen2.
    Qwen3(Qwen3Body),
    Gemma3(Gemma3Body),
}

/// What the rest of the pipeline needs to know about a body.
#[derive(Debug, Clone, Copy)]
pub struct BodyInfo {
    pub hidden: usize,
    /// The longest input the body's positions allow, special tokens included.
    pub max_positions: usize,
    pub pad_id: u32,
}

/// Why a body could not load: a refusal of the config (by key) or a weights mismatch.
pub enum LoadFailure {
    Config(String),
    Weights(candle_core::Error),
}

impl From<candle_core::Error> for LoadFailure {
    fn from(e: candle_core::Error) -> Self {
        LoadFailure::Weights(e)
    }
}

fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> std::result::Result<T, LoadFailure> {
    serde_json::from_slice(bytes).map_err(|e| LoadFailure::Config(format!("config.json: {e}")))
}

/// transformers' BertConfig / XLMRobertaConfig, with its defaults for absent keys.
#[derive(Debug, Deserialize)]
struct BertFamilyConfig {
    vocab_size: usize,
    #[serde(default = "d768")]
    hidden_size: usize,
    #[serde(default = "d12")]
    num_hidden_layers: usize,
    #[serde(default = "d12")]
    num_attention_heads: usize,
    #[serde(default = "d3072")]
    intermediate_size: usize,
    #[serde(default = "gelu")]
    hidden_act: String,
    #[serde(default = "d512")]
    max_position_embeddings: usize,
    #[serde(default = "d2")]
    type_vocab_size: usize,
    #[serde(default = "eps12")]
    layer_norm_eps: f64,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

fn d2() -> usize {
    2
}

impl BertFamilyConfig {
    fn to_candle(&self) -> std::result::Result<BertConfig, LoadFailure> {
        let hidden_act = hidden_act("hidden_act", &self.hidden_act).map_err(LoadFailure::Config)?;
        match self.position_embedding_type.as_deref() {
            None | Some("absolute") => {}
            Some(other) => {
                return Err(LoadFailure::Config(format!("config.json position_embedding_type: {other:?} is not supported (absolute)")));
            }
        }
        Ok(BertConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act,
            hidden_dropout_prob: 0.0,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            initializer_range: 0.02,
            layer_norm_eps: self.layer_norm_eps,
            pad_token_id: self.pad_token_id.unwrap_or(0) as usize,
            position_embedding_type: PositionEmbeddingType::Absolute,
            use_cache: false,
            classifier_dropout: None,
            model_type: None,
        })
    }
}

/// transformers' ModernBertConfig (4.x keys and 5.x `rope_parameters` / `layer_types`).
#[derive(Debug, Deserialize)]
struct ModernBertFileConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "d8192")]
    max_position_embeddings: usize,
    #[serde(default = "eps5")]
    norm_eps: f64,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default = "d3")]
    global_attn_every_n_layers: usize,
    #[serde(default)]
    global_rope_theta: Option<f64>,
    #[serde(default)]
    local_rope_theta: Option<f64>,
    #[serde(default = "d128")]
    local_attention: usize,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default = "gelu")]
    hidden_activation: String,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    norm_bias: bool,
}

fn d8192() -> usize {
    8192
}
fn d3() -> usize {
    3
}
fn d128() -> usize {
    128
}
fn eps5() -> f64 {
    1e-5
}

impl ModernBertFileConfig {
    fn to_spec(&self) -> std::result::Result<ModernBertSpec, LoadFailure> {
        let refuse = |key: &str, what: String| Err(LoadFailure::Config(format!("config.json {key}: {what}")));
        for (key, on) in [("attention_bias", self.attention_bias), ("mlp_bias", self.mlp_bias), ("norm_bias", self.norm_bias)] {
            if on {
                return refuse(key, "true is not supported".into());
            }
        }
        if self.hidden_activation != "gelu" {
            return refuse("hidden_activation", format!("{:?} is not supported (gelu)", self.hidden_activation));
        }
        // transformers' default when layer_types is absent: layer i is global when
        // i % global_attn_every_n_layers == 0.
        let every = self.global_attn_every_n_layers.max(1);
        let sliding: Vec<bool> = match &self.layer_types {
            Some(types) => {
                if types.len() != self.num_hidden_layers {
                    return refuse("layer_types", format!("{} entries for {} layers", types.len(), self.num_hidden_layers));
                }
                let mut out = Vec::with_capacity(types.len());
                for (i, t) in types.iter().enumerate() {
                    out.push(match t.as_str() {
                        "full_attention" => false,
                        "sliding_attention" => true,
                        other => return refuse("layer_types", format!("layer {i} is {other:?} (full_attention, sliding_attention)")),
                    });
                }
                out
            }
            None => (0..self.num_hidden_layers).map(|i| i % every != 0).collect(),
        };
        let theta = |layer: &str, legacy: Option<f64>, default: f64| -> std::result::Result<f64, LoadFailure> {
            let params = self.rope_parameters.as_ref().and_then(|p| p.get(layer));
            if let Some(p) = params {
                let kind = p.get("rope_type").and_then(Value::as_str).unwrap_or("default");
                if kind != "default" {
                    return Err(LoadFailure::Config(format!("config.json rope_parameters.{layer}.rope_type: {kind:?} is not supported (default)")));
                }
                if let Some(t) = p.get("rope_theta").and_then(Value::as_f64) {
                    return Ok(t);
                }
            }
            Ok(legacy.unwrap_or(default))
        };
        Ok(ModernBertSpec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
            norm_eps: self.norm_eps,
            pad_token_id: self.pad_token_id.unwrap_or(0),
            sliding,
            global_rope_theta: theta("full_attention", self.global_rope_theta, 160_000.0)?,
            local_rope_theta: theta("sliding_attention", self.local_rope_theta, 10_000.0)?,
            local_attention: self.local_attention,
        })
    }
}

impl Body {
    /// Loads the body `model_type` names from `config` and the weights in `vb`.
    pub fn load(model_type: &str, config: &[u8], vb: VarBuilder) -> std::result::Result<(Body, BodyInfo), LoadFailure> {
        let dtype = vb.dtype();
        match model_type {
            "bert" | "xlm-roberta" => {
                let file: BertFamilyConfig = parse(config)?;
                let cfg = file.to_candle()?;
                let (positions, pad) = if model_type == "bert" {
                    (Positions::Offset(0), file.pad_token_id.unwrap_or(0))
                } else {
                    let pad = file.pad_token_id.unwrap_or(1);
                    (Positions::FromIds { padding_idx: pad }, pad)
                };
                let body = BertBody::load_positioned(vb, &cfg, positions)?;
                let info = BodyInfo {
                    hidden: cfg.hidden_size,
                    max_positions: cfg.max_position_embeddings.saturating_sub(positions.first() as usize),
                    pad_id: pad,
                };
                Ok((Body::Bert(body), info))
            }
            "distilbert" => {
                let file: DistilBertConfig = parse(config)?;
                let cfg = file.to_bert().map_err(LoadFailure::Config)?;
                let body = distilbert::load(vb, &cfg)?;
                let info = BodyInfo { hidden: cfg.hidden_size, max_positions: cfg.max_position_embeddings, pad_id: file.pad_id() };
                Ok((Body::Bert(body), info))
            }
            "mpnet" => {
                let file: MpnetConfig = parse(config)?;
                let cfg = file.to_bert().map_err(LoadFailure::Config)?;
                let body = mpnet::load(vb, &file, &cfg)?;
                let info = BodyInfo { hidden: cfg.hidden_size, max_positions: file.max_positions(), pad_id: file.pad_id() };
                Ok((Body::Bert(body), info))
            }
            "modernbert" => {
                if dtype != DType::F32 {
                    return Err(LoadFailure::Config("modernbert runs in f32 only; set the dtype to \"f32\"".into()));
                }
                let file: ModernBertFileConfig = parse(config)?;
                let spec = file.to_spec()?;
                let body = ModernBertBody::load(vb, &spec)?;
                let info = BodyInfo { hidden: spec.hidden_size, max_positions: spec.max_position_embeddings, pad_id: spec.pad_token_id };
                Ok((Body::ModernBert(body), info))
            }
            "qwen3" => {
                let cfg: Qwen3Config = parse(config)?;
                cfg.check_file(config).map_err(LoadFailure::Config)?;
                let body = Qwen3Body::load(vb, &cfg)?;
                let info = BodyInfo { hidden: cfg.hidden_size, max_positions: cfg.max_position_embeddings, pad_id: 0 };
                Ok((Body::Qwen3(body), info))
            }
            "qwen2" => {
                let cfg: Qwen2Config = parse(config)?;
                let spec = cfg.spec().map_err(LoadFailure::Config)?;
                let body = Qwen3Body::load_spec(vb, &spec)?;
                let info = BodyInfo { hidden: spec.hidden_size, max_positions: spec.max_position_embeddings, pad_id: 0 };
                Ok((Body::Qwen3(body), info))
            }
            "gemma3_text" => {
                let cfg: Gemma3Config = parse(config)?;
                let spec = cfg.spec().map_err(LoadFailure::Config)?;
                let body = Gemma3Body::load(vb, &spec)?;
                let info = BodyInfo { hidden: spec.hidden_size, max_positions: spec.max_position_embeddings, pad_id: spec.pad_token_id };
                Ok((Body::Gemma3(body), info))
            }
            other => Err(LoadFailure::Config(format!("config.json model_type: {other:?} is not supported ({SUPPORTED})"))),
        }
    }

    /// Hidden states (batch, len, hidden) for right-padded ids, type ids and mask (u32).
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match self {
            Body::Bert(b) => b.forward(ids, types, mask),
            Body::ModernBert(m) => m.forward(ids, mask),
            Body::Qwen3(q) => q.forward(ids, mask),
            Body::Gemma3(g) => g.forward(ids, mask),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> std::result::Result<ModernBertSpec, String> {
        let json = format!(r#"{{"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 12{extra}}}"#);
        let file: ModernBertFileConfig = serde_json::from_str(&json).unwrap();
        file.to_spec().map_err(|e| match e {
            LoadFailure::Config(reason) => reason,
            LoadFailure::Weights(e) => e.to_string(),
        })
    }

    #[test]
    fn modernbert_layers_follow_layer_types_in_any_order() {
        // Without layer_types: every global_attn_every_n_layers-th layer is global, from 0.
        assert_eq!(spec("").unwrap().sliding, [false, true, true, false]);
        assert_eq!(spec(r#", "global_attn_every_n_layers": 2"#).unwrap().sliding, [false, true, false, true]);
        let types = r#", "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]"#;
        assert_eq!(spec(types).unwrap().sliding, [true, false, false, true]);
        let short = spec(r#", "layer_types": ["full_attention"]"#).unwrap_err();
        assert!(short.contains("layer_types") && short.contains("1 entries for 4 layers"), "{short}");
        let unknown = spec(r#", "layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention"]"#).unwrap_err();
        assert!(unknown.contains("layer_types") && unknown.contains("layer 1 is \"chunked_attention\""), "{unknown}");
        // Rotary bases: 5.x rope_parameters, else the 4.x keys, else the defaults.
        let v5 = spec(r#", "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 80000.0}, "sliding_attention": {"rope_theta": 5000.0}}"#).unwrap();
        assert_eq!((v5.global_rope_theta, v5.local_rope_theta), (80000.0, 5000.0));
        let v4 = spec(r#", "global_rope_theta": 90000.0"#).unwrap();
        assert_eq!((v4.global_rope_theta, v4.local_rope_theta), (90000.0, 10000.0));
    }
}
