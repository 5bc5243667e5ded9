//! Model fixtures for tests and benchmarks: a tiny random BERT written as a real model
//! directory, a cross-encoder checkpoint made from any BERT body and a seeded random head, a
//! tiny XLM-RoBERTa cross-encoder, and the path of the real all-MiniLM-L6-v2 fetched by
//! scripts/fetch-models.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config};
use candle_transformers::models::xlm_roberta::{Config as XlmRobertaConfig, XLMRobertaForSequenceClassification};
use rand::{Rng, SeedableRng};

pub const TINY_WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "a", "lazy", "dog", "sleeps", "and", "jumps", "over", "wing",
    "flow", "boundary", "layer", "shock", "wave", "heat", "transfer", "plate", "##s", "##ing",
];

/// Writes config.json, model.safetensors (random weights), tokenizer.json (WordPiece, with a
/// fixed padding the encoder must override), modules.json (Transformer, Pooling, Normalize)
/// and 1_Pooling/config.json with `pooling`
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

    let tokenizer = wordpiece_tokenizer(&["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], false);
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
    let modules = serde_json::json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]);
    std::fs::write(dir.join("modules.json"), modules.to_string()).unwrap();
}

/// A WordPiece tokenizer over `specials` then [`TINY_WORDS`]: BERT's [CLS] a [SEP] b [SEP]
/// (specials [PAD] [UNK] [CLS] [SEP] ...), or RoBERTa's <s> a </s></s> b </s> (specials
/// <s> <pad> </s> <unk>). It pads and truncates to 16, which the service must override.
fn wordpiece_tokenizer(specials: &[&str], roberta: bool) -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, tok) in specials.iter().chain(TINY_WORDS).enumerate() {
        vocab.insert(tok.to_string(), serde_json::json!(i));
    }
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let (unk, pad, post) = if roberta {
        ("<unk>", (1, "<pad>"), serde_json::json!({"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0],
            "trim_offsets": true, "add_prefix_space": false}))
    } else {
        ("[UNK]", (0, "[PAD]"), serde_json::json!({"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]}))
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
            "pad_id": pad.0, "pad_type_id": 0, "pad_token": pad.1},
        "added_tokens": specials.iter().enumerate().map(|(i, s)| special(i, s)).collect::<Vec<_>>(),
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": post,
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": unk, "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    })
}

/// Normal(0, std) samples from a seeded generator (Box-Muller).
fn seeded_normal(rng: &mut rand_chacha::ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random::<f32>();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

/// Writes a `BertForSequenceClassification` checkpoint into `dst`: the BERT body of the model
/// in `body_dir` (its config.json, tokenizer.json and weights, under `bert.` names) and a
/// pooler and `num_labels`-way classifier drawn from `seed`. Large enough weights that scores
/// differ from pair to pair.
pub fn seeded_cross_encoder(body_dir: &Path, dst: &Path, num_labels: usize, seed: u64) {
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(body_dir.join("config.json")).unwrap()).unwrap();
    let hidden = config["hidden_size"].as_u64().unwrap() as usize;
    config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    config["num_labels"] = serde_json::json!(num_labels);
    config["id2label"] = (0..num_labels).map(|i| (i.to_string(), serde_json::json!(format!("LABEL_{i}")))).collect();
    config["model_type"] = serde_json::json!("bert");
    std::fs::write(dst.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(body_dir.join("tokenizer.json"), dst.join("tokenizer.json")).unwrap();
    let body = candle_core::safetensors::load(body_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors: HashMap<String, Tensor> = body
        .into_iter()
        .filter(|(name, _)| !name.contains("pooler."))
        .map(|(name, t)| (if name.starts_with("bert.") { name } else { format!("bert.{name}") }, t))
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut put = |name: &str, shape: &[usize], std: f32, rng: &mut rand_chacha::ChaCha8Rng| {
        let n = shape.iter().product();
        tensors.insert(name.to_string(), Tensor::from_vec(seeded_normal(rng, n, std), shape, &Device::Cpu).unwrap());
    };
    let std = 1.0 / (hidden as f32).sqrt();
    put("bert.pooler.dense.weight", &[hidden, hidden], 2.0 * std, &mut rng);
    put("bert.pooler.dense.bias", &[hidden], 0.1, &mut rng);
    put("classifier.weight", &[num_labels, hidden], 2.0 * std, &mut rng);
    put("classifier.bias", &[num_labels], 0.1, &mut rng);
    candle_core::safetensors::save(&tensors, dst.join("model.safetensors")).unwrap();
}

/// Copies the bi-encoder in `src` to `dst` with seeded noise (std `noise`) added to every
/// layer's output projection: a "later checkpoint" of the same model, with its own
/// fingerprint and slightly different vectors.
pub fn perturbed_checkpoint(src: &Path, dst: &Path, seed: u64, noise: f32) {
    std::fs::create_dir_all(dst).unwrap();
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
    ] {
        if src.join(file).exists() {
            std::fs::create_dir_all(dst.join(file).parent().unwrap()).unwrap();
            std::fs::copy(src.join(file), dst.join(file)).unwrap();
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<String> = tensors.keys().filter(|n| n.ends_with("output.dense.weight")).cloned().collect();
    names.sort();
    for name in names {
        let t = &tensors[&name];
        let delta = Tensor::from_vec(seeded_normal(&mut rng, t.elem_count(), noise), t.shape(), &Device::Cpu).unwrap();
        let perturbed = (t + delta).unwrap();
        tensors.insert(name, perturbed);
    }
    candle_core::safetensors::save(&tensors, dst.join("model.safetensors")).unwrap();
}

/// Writes a tiny random `XLMRobertaForSequenceClassification` (one label) into `dir`.
pub fn tiny_xlm_roberta(dir: &Path) {
    let specials = ["<s>", "<pad>", "</s>", "<unk>"];
    let config = serde_json::json!({
        "architectures": ["XLMRobertaForSequenceClassification"],
        "model_type": "xlm-roberta",
        "vocab_size": specials.len() + TINY_WORDS.len(),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 66,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
        "position_embedding_type": "absolute",
        "num_labels": 1
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cfg: XlmRobertaConfig = serde_json::from_value(config).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    XLMRobertaForSequenceClassification::new(1, &cfg, vb).unwrap();
    varmap.save(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), wordpiece_tokenizer(&specials, true).to_string()).unwrap();
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
