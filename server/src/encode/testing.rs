//! Test models: a tiny random BERT written as a real model directory, and the path of the
//! real all-MiniLM-L6-v2 fetched by scripts/fetch-models.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config};

pub const TINY_WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "a", "lazy", "dog", "sleeps", "and", "jumps", "over", "wing",
    "flow", "boundary", "layer", "shock", "wave", "heat", "transfer", "plate", "##s", "##ing",
];

/// Writes config.json, model.safetensors (random weights), tokenizer.json (WordPiece, with a
/// fixed padding the encoder must override) and 1_Pooling/config.json with `pooling`
/// ("mean", "cls" or "max") into `dir`.
pub fn tiny_model(dir: &Path, pooling: &str) {
    let config = serde_json::json!({
        "vocab_size": 5 + TINY_WORDS.len(),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "model_type": "bert"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cfg: Config = serde_json::from_value(config).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    BertModel::load(vb, &cfg).unwrap();
    varmap.save(dir.join("model.safetensors")).unwrap();

    let mut vocab = serde_json::Map::new();
    for (i, tok) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].iter().chain(TINY_WORDS).enumerate() {
        vocab.insert(tok.to_string(), serde_json::json!(i));
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
            "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"), special(3, "[SEP]"), special(4, "[MASK]")],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    let pooling_cfg = serde_json::json!({
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": false
    });
    std::fs::write(dir.join("1_Pooling/config.json"), pooling_cfg.to_string()).unwrap();
}

/// models/all-MiniLM-L6-v2 (or $HARDNEG_MODEL_DIR); panics with the fix when absent.
pub fn real_model_dir() -> PathBuf {
    let dir = std::env::var_os("HARDNEG_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2")
    });
    assert!(
        dir.join("model.safetensors").exists(),
        "{} has no model.safetensors: run scripts/fetch-models",
        dir.display()
    );
    dir
}
