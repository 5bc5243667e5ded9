//! DistilBERT (transformers' `DistilBertModel`; sentence-transformers/msmarco-distilbert-base-v4
//! and its kin): BERT's post-norm layers under other names, with no token type embeddings,
//! positions from 0 and every norm at eps 1e-12 (transformers fixes it; the config has no key
//! for it). It runs on [`BertBody`]. Sinusoidal position embeddings (`sinusoidal_pos_embds`)
//! need nothing of their own: transformers 5 reads the table saved in the checkpoint, as here.
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, PositionEmbeddingType};
use serde::Deserialize;

use super::body::{self, BertBody, Names, Positions, gelu};

/// `DistilBertModel`'s names (`distilbert.` in task models).
const NAMES: Names = Names {
    prefixes: &["distilbert"],
    layers: "transformer.layer",
    query: "attention.q_lin",
    key: "attention.k_lin",
    value: "attention.v_lin",
    attn_out: "attention.out_lin",
    attn_norm: "sa_layer_norm",
    intermediate: "ffn.lin1",
    output: "ffn.lin2",
    out_norm: "output_layer_norm",
    token_types: false,
};

/// transformers' DistilBertConfig, with its defaults for absent keys; `hidden_size`,
/// `num_attention_heads` and `num_hidden_layers` are its aliases (`attribute_map`).
#[derive(Debug, Deserialize)]
pub struct DistilBertConfig {
    #[serde(default = "vocab")]
    vocab_size: usize,
    #[serde(default = "positions")]
    max_position_embeddings: usize,
    #[serde(default = "layers", alias = "num_hidden_layers")]
    n_layers: usize,
    #[serde(default = "heads", alias = "num_attention_heads")]
    n_heads: usize,
    #[serde(default = "dim", alias = "hidden_size")]
    dim: usize,
    #[serde(default = "hidden_dim")]
    hidden_dim: usize,
    #[serde(default = "gelu")]
    activation: String,
    #[serde(default)]
    pad_token_id: Option<u32>,
}

fn vocab() -> usize {
    30522
}
fn positions() -> usize {
    512
}
fn layers() -> usize {
    6
}
fn heads() -> usize {
    12
}
fn dim() -> usize {
    768
}
fn hidden_dim() -> usize {
    4 * 768
}

impl DistilBertConfig {
    /// The body's settings in BERT's terms, or why transformers' forward pass cannot be
    /// reproduced (by key).
    pub fn to_bert(&self) -> Result<Config, String> {
        let hidden_act = body::hidden_act("activation", &self.activation)?;
        if self.n_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            return Err(format!("config.json n_heads: {} does not divide dim {}", self.n_heads, self.dim));
        }
        Ok(Config {
            vocab_size: self.vocab_size,
            hidden_size: self.dim,
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            intermediate_size: self.hidden_dim,
            hidden_act,
            hidden_dropout_prob: 0.0,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: 0,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: self.pad_token_id.unwrap_or(0) as usize,
            position_embedding_type: PositionEmbeddingType::Absolute,
            use_cache: false,
            classifier_dropout: None,
            model_type: None,
        })
    }

    /// The padding id (transformers' default 0).
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }
}

/// The body from a `DistilBertModel` checkpoint, or a task model's (`distilbert.` prefix).
pub fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<BertBody> {
    BertBody::load_named(body::root(vb, &NAMES), cfg, &NAMES, Positions::Offset(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_keys_take_transformers_defaults_and_aliases_count() {
        let cfg: DistilBertConfig = serde_json::from_str("{}").unwrap();
        let bert = cfg.to_bert().unwrap();
        assert_eq!((bert.vocab_size, bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads), (30522, 768, 6, 12));
        assert_eq!((bert.intermediate_size, bert.max_position_embeddings, cfg.pad_id()), (3072, 512, 0));
        let aliased: DistilBertConfig = serde_json::from_str(r#"{"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2}"#).unwrap();
        let bert = aliased.to_bert().unwrap();
        assert_eq!((bert.hidden_size, bert.num_attention_heads, bert.num_hidden_layers), (32, 4, 2));
        let silu: DistilBertConfig = serde_json::from_str(r#"{"activation": "silu"}"#).unwrap();
        assert_eq!(silu.to_bert().unwrap_err(), "config.json activation: \"silu\" is not supported (gelu, gelu_new, relu)");
    }
}
