//! MPNet (transformers' `MPNetModel`; all-mpnet-base-v2, multi-qa-mpnet-base-*): BERT's
//! post-norm layers under other names, with no token type embeddings, positions counted from
//! the ids as RoBERTa does (from padding index + 1; the padding index is 1 whatever the config
//! says), and one bias table shared by every layer, added to the attention scores by the key's
//! position relative to the query's, bucketed as transformers buckets it. It runs on
//! [`BertBody`], the bias inside the fused attention.
use candle_core::DType;
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, PositionEmbeddingType};
use serde::Deserialize;

use super::body::{self, BertBody, Names, Positions, d12, d512, d768, d3072, eps12, gelu};
use super::cpu::attention::RelativeBias;

/// `MPNetModel`'s names (`mpnet.` in task models).
const NAMES: Names = Names {
    prefixes: &["mpnet"],
    layers: "encoder.layer",
    query: "attention.attn.q",
    key: "attention.attn.k",
    value: "attention.attn.v",
    attn_out: "attention.attn.o",
    attn_norm: "attention.LayerNorm",
    intermediate: "intermediate.dense",
    output: "output.dense",
    out_norm: "output.LayerNorm",
    token_types: false,
};

/// `MPNetEmbeddings.padding_idx`: fixed at 1, not read from `pad_token_id`.
const PADDING_IDX: u32 = 1;

/// The buckets and distance `MPNetEncoder.compute_position_bias` always passes to
/// `relative_position_bucket`, whatever `relative_attention_num_buckets` says (that only
/// sizes the table).
const BUCKETS: usize = 32;
const MAX_DISTANCE: usize = 128;

/// transformers' MPNetConfig, with its defaults for absent keys.
#[derive(Debug, Deserialize)]
pub struct MpnetConfig {
    #[serde(default = "vocab")]
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
    #[serde(default = "eps12")]
    layer_norm_eps: f64,
    #[serde(default = "d32")]
    relative_attention_num_buckets: usize,
    #[serde(default)]
    pad_token_id: Option<u32>,
}

fn vocab() -> usize {
    30527
}
fn d32() -> usize {
    32
}

impl MpnetConfig {
    /// The body's settings in BERT's terms, or why transformers' forward pass cannot be
    /// reproduced (by key).
    pub fn to_bert(&self) -> Result<Config, String> {
        let hidden_act = body::hidden_act("hidden_act", &self.hidden_act)?;
        if self.relative_attention_num_buckets < BUCKETS {
            return Err(format!(
                "config.json relative_attention_num_buckets: {} is not supported (transformers buckets relative positions into {BUCKETS} whatever the table's size, so it needs at least {BUCKETS})",
                self.relative_attention_num_buckets
            ));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!("config.json num_attention_heads: {} does not divide hidden_size {}", self.num_attention_heads, self.hidden_size));
        }
        if self.max_position_embeddings < PADDING_IDX as usize + 3 {
            return Err(format!(
                "config.json max_position_embeddings: {} leaves no positions after the padding index {PADDING_IDX}",
                self.max_position_embeddings
            ));
        }
        Ok(Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act,
            hidden_dropout_prob: 0.0,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: 0,
            initializer_range: 0.02,
            layer_norm_eps: self.layer_norm_eps,
            pad_token_id: self.pad_id() as usize,
            position_embedding_type: PositionEmbeddingType::Absolute,
            use_cache: false,
            classifier_dropout: None,
            model_type: None,
        })
    }

    /// The padding id batches are padded with (transformers' default 1).
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(PADDING_IDX)
    }

    /// The longest input the positions allow: they start after the padding index.
    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings - (PADDING_IDX as usize + 1)
    }
}

/// transformers' `MPNetEncoder.relative_position_bucket(relative, 32, 128)` for a key
/// `relative` positions after the query (before, when negative): distances under 8 exactly,
/// then logarithmic buckets up to 128, in one half of the buckets for keys before the query
/// and the other for keys after. Computed in f32 as torch computes it, so the bucket edges
/// (distances 16, 32, 64) fall where they fall there.
fn bucket(relative: isize) -> usize {
    let half = (BUCKETS / 2) as isize;
    let exact = half / 2;
    let n = -relative;
    let base = if n < 0 { half } else { 0 };
    let n = n.abs();
    if n < exact {
        return (base + n) as usize;
    }
    let scale = (MAX_DISTANCE as f64 / exact as f64).ln() as f32;
    let large = exact + ((n as f32 / exact as f32).ln() / scale * (half - exact) as f32) as isize;
    (base + large.min(half - 1)) as usize
}

/// The body from an `MPNetModel` checkpoint, or a task model's (`mpnet.` prefix), with its
/// relative attention bias (`encoder.relative_attention_bias`, buckets x heads).
pub fn load(vb: VarBuilder, file: &MpnetConfig, cfg: &Config) -> candle_core::Result<BertBody> {
    let vb = body::root(vb, &NAMES);
    let heads = cfg.num_attention_heads;
    let table = vb
        .get((file.relative_attention_num_buckets, heads), "encoder.relative_attention_bias.weight")?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    // Past MAX_DISTANCE every bucket is the last of its half: one entry per relative position
    // in -MAX_DISTANCE..=MAX_DISTANCE covers all.
    let reach = MAX_DISTANCE as isize;
    let values = (0..heads).flat_map(|h| (-reach..=reach).map(|r| table[bucket(r)][h]).collect::<Vec<_>>()).collect();
    let relative = RelativeBias::new(values, heads, MAX_DISTANCE)?;
    BertBody::load_named(vb, cfg, &NAMES, Positions::FromIds { padding_idx: PADDING_IDX })?.with_relative_bias(relative)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest distance of each bucket, keys before the query, as torch 2 computes
    /// transformers 5.23's `relative_position_bucket(-n, 32, 128)` for n in 0..100000.
    const FIRST_DISTANCE: [isize; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 23, 32, 46, 64, 91];

    #[test]
    fn buckets_fall_where_transformers_puts_them() {
        for n in 0..100_000isize {
            let want = FIRST_DISTANCE.iter().rposition(|&first| first <= n).unwrap();
            assert_eq!(bucket(-n), want, "key {n} before the query");
            // Keys after the query take the upper half; the query itself is bucket 0.
            assert_eq!(bucket(n), if n == 0 { 0 } else { 16 + want }, "key {n} after the query");
        }
    }

    #[test]
    fn absent_keys_take_transformers_defaults_and_refusals_name_the_key() {
        let cfg: MpnetConfig = serde_json::from_str("{}").unwrap();
        let bert = cfg.to_bert().unwrap();
        assert_eq!((bert.vocab_size, bert.hidden_size, bert.num_hidden_layers, bert.intermediate_size), (30527, 768, 12, 3072));
        assert_eq!((cfg.relative_attention_num_buckets, cfg.pad_id(), cfg.max_positions()), (32, 1, 510));
        let few: MpnetConfig = serde_json::from_str(r#"{"relative_attention_num_buckets": 16}"#).unwrap();
        assert!(few.to_bert().unwrap_err().starts_with("config.json relative_attention_num_buckets: 16 is not supported"));
        let act: MpnetConfig = serde_json::from_str(r#"{"hidden_act": "swish"}"#).unwrap();
        assert!(act.to_bert().unwrap_err().starts_with("config.json hidden_act: \"swish\""));
    }
}
