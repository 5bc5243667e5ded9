//! Cross-encoders: a (query, document) pair in, a relevance probability out, scored as
//! sentence-transformers 6.2's `CrossEncoder` scores a Hugging Face sequence-classification
//! checkpoint. Families, by `config.json` `model_type`:
//!
//! - `bert`: `BertForSequenceClassification` (our BERT body, the pooler's dense + tanh over
//!   [CLS], `classifier`);
//! - `xlm-roberta`, `roberta`: `XLMRobertaForSequenceClassification` /
//!   `RobertaForSequenceClassification` (candle-transformers'; the bge-reranker family);
//! - `modernbert`: `ModernBertForSequenceClassification` (our ModernBERT body, then the head's
//!   dense + activation + norm over [CLS] or the mean of the real tokens, as
//!   `classifier_pooling` says, then `classifier`; gte-reranker-modernbert-base);
//! - `deberta-v2`: `DebertaV2ForSequenceClassification` ([`super::deberta`]'s body, the
//!   ContextPooler's dense + activation over [CLS], `classifier`; DeBERTa-v3 and
//!   mxbai-rerank-v1), its tokenizer rebuilt as transformers 5's `DebertaV2Tokenizer` rebuilds it;
//! - `qwen3`: `Qwen3ForSequenceClassification` (our Qwen3 body, `score` read at the last token
//!   that is not `pad_token_id`, transformers' rule whichever side the tokenizer pads).
//!
//! One label is a logit (sigmoid gives the probability: `CrossEncoder`'s default activation
//! for one label); two labels are softmaxed and label 1 is "relevant" (`CrossEncoder.predict`
//! returns both logits there, its default activation being the identity; the probability is
//! its `apply_softmax=True` column 1). A prompt the model saved as its default
//! (`config_sentence_transformers.json` `default_prompt_name`) is prepended to the query, as
//! `predict` does. What `CrossEncoder` would score otherwise (a generative reranker, a chat
//! template, another pipeline) is refused by name.
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use candle_transformers::models::bert::Config as BertConfig;
use candle_transformers::models::xlm_roberta::{Config as XlmRobertaConfig, XLMRobertaForSequenceClassification};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::arch::{Body, LoadFailure};
use super::body::BertBody;
use super::deberta::{DebertaV2Body, DebertaV2Config};
use super::st_format::{chat_template, saved_class};
use super::{EmbedModel, EncodeError, TokenizedText, padded_batch};

/// The `model_type`s served.
pub const SUPPORTED: &str = "bert, roberta, xlm-roberta, modernbert, deberta-v2, qwen3";

/// What identifies a cross-encoder, for logs and responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossEncoderInfo {
    /// Model directory name, for humans.
    pub name: String,
    /// sha256 over config.json and the weights.
    pub fingerprint: String,
    pub num_labels: usize,
    /// Truncation length of a pair, special tokens included.
    pub max_tokens: usize,
    /// "bert", "xlm-roberta", "modernbert", "deberta-v2" or "qwen3".
    pub family: &'static str,
    /// Prepended to each query: the model's default prompt (`config_sentence_transformers.json`).
    pub prompt: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HeadConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Option<Vec<String>>,
    #[serde(default)]
    num_labels: Option<usize>,
    #[serde(default)]
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pad_token_id: Option<u32>,
}

/// `ModernBertForSequenceClassification`'s head settings (transformers' defaults).
#[derive(Debug, Deserialize)]
struct ModernBertHeadConfig {
    hidden_size: usize,
    #[serde(default = "cls")]
    classifier_pooling: String,
    #[serde(default = "gelu")]
    classifier_activation: String,
    #[serde(default)]
    classifier_bias: bool,
    #[serde(default = "eps5")]
    norm_eps: f64,
}

fn cls() -> String {
    "cls".into()
}
fn gelu() -> String {
    "gelu".into()
}
fn eps5() -> f64 {
    1e-5
}

/// A head's activation, as transformers' `ACT2FN` names it.
#[derive(Debug, Clone, Copy)]
enum Act {
    Gelu,
    GeluTanh,
    Relu,
    Silu,
    Tanh,
}

impl Act {
    fn parse(key: &str, name: &str) -> Result<Act, String> {
        Ok(match name {
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            "relu" => Act::Relu,
            "silu" | "swish" => Act::Silu,
            "tanh" => Act::Tanh,
            other => return Err(format!("config.json {key}: {other:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu, silu, swish, tanh)")),
        })
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Act::Gelu => x.gelu_erf(),
            Act::GeluTanh => x.gelu(),
            Act::Relu => x.relu(),
            Act::Silu => candle_nn::ops::silu(x),
            Act::Tanh => x.tanh(),
        }
    }
}

enum Arch {
    Bert { body: BertBody, pooler: Linear, classifier: Linear },
    XlmRoberta(XLMRobertaForSequenceClassification),
    ModernBert { body: Body, dense: Linear, act: Act, norm: LayerNorm, classifier: Linear, mean: bool },
    Deberta { body: DebertaV2Body, pooler: Linear, act: Act, classifier: Linear },
    /// `pad`: transformers reads the score at the last token that is not this id (the last
    /// token when the config has none).
    Qwen3 { body: Body, score: Linear, pad: Option<u32> },
}

/// A loaded cross-encoder; [`EmbedModel::embed`] returns each pair's logits.
pub struct CrossEncoderModel {
    arch: Arch,
    num_labels: usize,
    pad_id: u32,
    device: Device,
}

pub struct LoadedCross {
    pub model: CrossEncoderModel,
    pub tokenizer: Tokenizer,
    pub info: CrossEncoderInfo,
}

fn load_err(dir: &Path, reason: impl std::fmt::Display) -> EncodeError {
    EncodeError::Load { dir: dir.display().to_string(), reason: reason.to_string() }
}

fn linear(vb: VarBuilder, input: usize, output: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(vb.get((output, input), "weight")?, Some(vb.get(output, "bias")?)))
}

fn linear_no_bias(vb: VarBuilder, input: usize, output: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(vb.get((output, input), "weight")?, None))
}

/// The probability that the pair is relevant, from its logits.
pub fn probability(logits: &[f32]) -> f32 {
    match logits {
        [logit] => 1.0 / (1.0 + (-logit).exp()),
        [a, b] => {
            let m = a.max(*b);
            let (ea, eb) = ((a - m).exp(), (b - m).exp());
            eb / (ea + eb)
        }
        // Refused at load: a cross-encoder has one or two labels.
        _ => 0.0,
    }
}

/// A JSON file of the model directory, if there is one.
fn optional_json(dir: &Path, name: &str) -> Result<Option<Value>, EncodeError> {
    match std::fs::read(dir.join(name)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| load_err(dir, format!("{name}: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(load_err(dir, format!("{name}: {e}"))),
    }
}

/// What sentence-transformers would run besides the sequence-classification model, refused by
/// name; else the prompt `predict` prepends to each query by default.
///
/// The library reads its own files only from a directory it saved as a CrossEncoder
/// (modules.json, and config_sentence_transformers.json's `model_type`). Anything else gets its
/// default modules: a sequence-classification Transformer made from the directory alone (no
/// prompt), which renders every pair through the tokenizer's chat template when there is one.
fn sentence_transformers_pipeline(dir: &Path, head: &HeadConfig, tokenizer_config: Option<&Value>) -> Result<Option<String>, EncodeError> {
    if let Some(arch) = head.architectures.iter().flatten().next().filter(|a| a.ends_with("ForCausalLM")) {
        return Err(load_err(
            dir,
            format!("config.json architectures: {arch:?} is a generative reranker (sentence-transformers scores it by the next-token logits of \"yes\" and \"no\"); not supported: convert it to a *ForSequenceClassification checkpoint"),
        ));
    }
    let chat_template_refused = |source: &str| {
        load_err(
            dir,
            format!("{source}: sentence-transformers renders each pair through the tokenizer's chat template (query and document messages); chat-template cross-encoders are not supported"),
        )
    };
    if saved_class(dir)?.as_deref() != Some("CrossEncoder") {
        return match chat_template(dir, tokenizer_config) {
            Some(source) => Err(chat_template_refused(source)),
            None => Ok(None),
        };
    }
    if let Some(modules) = optional_json(dir, "modules.json")? {
        let list = modules.as_array().cloned().unwrap_or_default();
        for m in &list {
            let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
            if !kind.ends_with(".Transformer") {
                return Err(load_err(dir, format!("modules.json: module type {kind:?} is not supported (a cross-encoder of one Transformer module)")));
            }
        }
        if list.len() > 1 {
            return Err(load_err(dir, format!("modules.json: {} modules; a cross-encoder of one Transformer module is supported", list.len())));
        }
    }
    let st = optional_json(dir, "sentence_bert_config.json")?;
    if let Some(task) = st.as_ref().and_then(|c| c.get("transformer_task")).and_then(Value::as_str)
        && task != "sequence-classification"
    {
        return Err(load_err(dir, format!("sentence_bert_config.json transformer_task: {task:?} is not supported (sequence-classification)")));
    }
    // A saved Transformer takes the modalities it was saved with; one saved before they were
    // recorded is text-only.
    if st.as_ref().and_then(|c| c.get("modality_config")).is_some_and(|m| m.get("message").is_some()) {
        return Err(chat_template_refused("sentence_bert_config.json modality_config.message"));
    }
    let Some(config) = optional_json(dir, "config_sentence_transformers.json")? else { return Ok(None) };
    let Some(name) = config.get("default_prompt_name").and_then(Value::as_str) else { return Ok(None) };
    let prompt = config.get("prompts").and_then(|p| p.get(name)).and_then(Value::as_str).unwrap_or("");
    Ok(Some(prompt.to_string()).filter(|p| !p.is_empty()))
}

/// The tokenizer as transformers 5's `DebertaV2Tokenizer` builds it: only the Unigram
/// vocabulary comes from tokenizer.json; the normalizer (lower-casing when `do_lower_case`,
/// runs of whitespace and any tab or newline to one space, NFC, right strip), the
/// pre-tokenizer (punctuation split when `split_by_punct`, then Metaspace, prepending "▁"
/// always unless `add_prefix_space` is false) and the pair template (`[CLS] A [SEP] B [SEP]`,
/// B's type 1) come from tokenizer_config.json, whatever tokenizer.json says.
fn deberta_tokenizer(dir: &Path, config: Option<&Value>) -> Result<Tokenizer, EncodeError> {
    let err = |e: String| load_err(dir, format!("tokenizer.json: {e}"));
    let bytes = std::fs::read(dir.join("tokenizer.json")).map_err(|e| err(e.to_string()))?;
    let mut file: Value = serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
    let empty = json!({});
    let config = config.unwrap_or(&empty);
    let flag = |key: &str, default: bool| config.get(key).and_then(Value::as_bool).unwrap_or(default);
    let token = |key: &str, default: &str| config.get(key).and_then(Value::as_str).unwrap_or(default).to_string();
    let (cls, sep, unk) = (token("cls_token", "[CLS]"), token("sep_token", "[SEP]"), token("unk_token", "[UNK]"));
    let model = file.get_mut("model").ok_or_else(|| err("no model".into()))?;
    if model.get("type").and_then(Value::as_str) != Some("Unigram") {
        return Err(err("a DebertaV2Tokenizer needs a Unigram model".into()));
    }
    let vocab = model.get("vocab").and_then(Value::as_array).cloned().unwrap_or_default();
    let unk_id = vocab
        .iter()
        .position(|piece| piece.get(0).and_then(Value::as_str) == Some(unk.as_str()) && piece.get(1).and_then(Value::as_f64) == Some(0.0))
        .or_else(|| config.get("unk_id").and_then(Value::as_u64).map(|x| x as usize))
        .unwrap_or(1);
    model["unk_id"] = json!(unk_id);
    model["byte_fallback"] = json!(false);
    let mut normalizers = Vec::new();
    if flag("do_lower_case", false) {
        normalizers.push(json!({"type": "Lowercase"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"Regex": "\\s{2,}|[\\n\\r\\t]"}, "content": " "}));
    normalizers.push(json!({"type": "NFC"}));
    normalizers.push(json!({"type": "Strip", "strip_left": false, "strip_right": true}));
    file["normalizer"] = json!({"type": "Sequence", "normalizers": normalizers});
    let mut pre = Vec::new();
    if flag("split_by_punct", false) {
        pre.push(json!({"type": "Punctuation", "behavior": "Isolated"}));
    }
    let scheme = if flag("add_prefix_space", true) { "always" } else { "first" };
    pre.push(json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": true}));
    file["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": pre});
    let base = Tokenizer::from_bytes(serde_json::to_vec(&file).map_err(|e| err(e.to_string()))?).map_err(|e| err(e.to_string()))?;
    let id = |t: &str| base.token_to_id(t).unwrap_or(0);
    let special = |t: &str| json!({"id": t, "ids": [id(t)], "tokens": [t]});
    let piece = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut specials = serde_json::Map::new();
    specials.insert(cls.clone(), special(&cls));
    specials.insert(sep.clone(), special(&sep));
    file["post_processor"] = json!({
        "type": "TemplateProcessing",
        "single": [piece(&cls, 0), seq("A", 0), piece(&sep, 0)],
        "pair": [piece(&cls, 0), seq("A", 0), piece(&sep, 0), seq("B", 1), piece(&sep, 1)],
        "special_tokens": specials,
    });
    Tokenizer::from_bytes(serde_json::to_vec(&file).map_err(|e| err(e.to_string()))?).map_err(|e| err(e.to_string()))
}

/// A cross-encoder's body and head as read from its weights, with what loading needs of its
/// family: the family's name, its position limit and its padding id.
struct Built {
    arch: Arch,
    family: &'static str,
    positions: usize,
    default_pad: u32,
}

/// Builds `model_type`'s body (in `dtype`) and head (in f32) from `vb`; `config_bytes` is
/// config.json, `head` its classification fields.
fn build(dir: &Path, model_type: &str, config_bytes: &[u8], head: &HeadConfig, num_labels: usize, vb: VarBuilder, dtype: DType) -> Result<Built, EncodeError> {
    let mismatch = |e: candle_core::Error| load_err(dir, format!("model.safetensors does not match config.json: {e}"));
    let f32_only = || EncodeError::Unsupported(format!("{}: {model_type} cross-encoders run in f32 only; set the dtype to \"f32\"", dir.display()));
    let body_failure = |e: LoadFailure| match e {
        LoadFailure::Config(reason) if reason.contains("f32 only") => f32_only(),
        LoadFailure::Config(reason) => load_err(dir, reason),
        LoadFailure::Weights(e) => mismatch(e),
    };
    let parse = |what: &str| -> Result<Value, EncodeError> { serde_json::from_slice(config_bytes).map_err(|e| load_err(dir, format!("config.json ({what}): {e}"))) };
    let f32_head = vb.to_dtype(DType::F32);
    let (arch, family, positions, default_pad) = match model_type {
        "xlm-roberta" | "roberta" => {
            // candle-transformers builds this family's attention mask in f32 and adds it to
            // the scores, so its forward pass only runs in f32.
            if dtype != DType::F32 {
                return Err(f32_only());
            }
            let cfg: XlmRobertaConfig =
                serde_json::from_slice(config_bytes).map_err(|e| load_err(dir, format!("config.json: {e}")))?;
            let model = XLMRobertaForSequenceClassification::new(num_labels, &cfg, vb).map_err(mismatch)?;
            // Positions start after the padding index.
            let positions = cfg.max_position_embeddings.saturating_sub(cfg.pad_token_id as usize + 1);
            (Arch::XlmRoberta(model), "xlm-roberta", positions, 1)
        }
        "bert" => {
            let cfg: BertConfig =
                serde_json::from_slice(config_bytes).map_err(|e| load_err(dir, format!("config.json: {e}")))?;
            let body = BertBody::load(vb.clone(), &cfg).map_err(mismatch)?;
            let root = if f32_head.contains_tensor("bert.pooler.dense.weight") { f32_head.pp("bert") } else { f32_head.clone() };
            let pooler = linear(root.pp("pooler.dense"), cfg.hidden_size, cfg.hidden_size).map_err(mismatch)?;
            let classifier = linear(f32_head.pp("classifier"), cfg.hidden_size, num_labels).map_err(mismatch)?;
            (Arch::Bert { body, pooler, classifier }, "bert", cfg.max_position_embeddings, 0)
        }
        "modernbert" => {
            let (body, info) = Body::load("modernbert", config_bytes, vb.clone()).map_err(body_failure)?;
            let cfg: ModernBertHeadConfig = serde_json::from_value(parse("head")?).map_err(|e| load_err(dir, format!("config.json: {e}")))?;
            let mean = match cfg.classifier_pooling.as_str() {
                "cls" => false,
                "mean" => true,
                other => return Err(load_err(dir, format!("config.json classifier_pooling: {other:?} is not supported (cls, mean)"))),
            };
            let act = Act::parse("classifier_activation", &cfg.classifier_activation).map_err(|e| load_err(dir, e))?;
            let h = cfg.hidden_size;
            let d = f32_head.pp("head.dense");
            let dense = if cfg.classifier_bias { linear(d, h, h) } else { linear_no_bias(d, h, h) }.map_err(mismatch)?;
            let norm = LayerNorm::new_no_bias(f32_head.pp("head.norm").get(h, "weight").map_err(mismatch)?, cfg.norm_eps);
            let classifier = linear(f32_head.pp("classifier"), h, num_labels).map_err(mismatch)?;
            (Arch::ModernBert { body, dense, act, norm, classifier, mean }, "modernbert", info.max_positions, info.pad_id)
        }
        "deberta-v2" => {
            let cfg: DebertaV2Config = serde_json::from_value(parse("deberta-v2")?).map_err(|e| load_err(dir, format!("config.json: {e}")))?;
            cfg.check().map_err(|e| load_err(dir, e))?;
            let act = Act::parse("pooler_hidden_act", &cfg.pooler_hidden_act).map_err(|e| load_err(dir, e))?;
            let body = DebertaV2Body::load(vb.clone(), &cfg).map_err(mismatch)?;
            let h = cfg.hidden_size;
            let pooler = linear(f32_head.pp("pooler.dense"), h, h).map_err(mismatch)?;
            let classifier = linear(f32_head.pp("classifier"), h, num_labels).map_err(mismatch)?;
            (Arch::Deberta { body, pooler, act, classifier }, "deberta-v2", cfg.max_position_embeddings, cfg.pad_id())
        }
        "qwen3" => {
            let (body, info) = Body::load("qwen3", config_bytes, vb.clone()).map_err(body_failure)?;
            let score = linear_no_bias(f32_head.pp("score"), info.hidden, num_labels).map_err(mismatch)?;
            let pad = head.pad_token_id;
            (Arch::Qwen3 { body, score, pad }, "qwen3", info.max_positions, pad.unwrap_or(0))
        }
        other => unreachable!("{other} passed the supported check"),
    };
    Ok(Built { arch, family, positions, default_pad })
}

impl CrossEncoderModel {
    /// Loads config.json, tokenizer.json and model.safetensors from `dir`, in f32. `max_tokens`
    /// 0 takes the model's position limit (at most 512).
    pub fn load(dir: &Path, max_tokens: usize, device: &Device) -> Result<LoadedCross, EncodeError> {
        Self::load_on(dir, max_tokens, device, DType::F32)
    }

    /// As [`CrossEncoderModel::load`], with the body in `dtype`. Heads (pooler, classifier,
    /// score) stay in f32 (they are tiny, and the logits are what gets compared to
    /// thresholds); logits come out in f32. XLM-RoBERTa and ModernBERT bodies are f32-only.
    pub fn load_on(dir: &Path, max_tokens: usize, device: &Device, dtype: DType) -> Result<LoadedCross, EncodeError> {
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| load_err(dir, format!("{name}: {e}")));
        let config_bytes = read("config.json")?;
        let head: HeadConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| load_err(dir, format!("config.json: {e}")))?;
        let num_labels = head.num_labels.or(head.id2label.as_ref().map(|m| m.len())).unwrap_or(2);
        if !(1..=2).contains(&num_labels) {
            return Err(load_err(
                dir,
                format!("config.json: {num_labels} labels; a cross-encoder has 1 (a relevance logit) or 2 (not relevant, relevant)"),
            ));
        }
        let Some(model_type) = head.model_type.clone() else {
            return Err(load_err(dir, "config.json model_type: missing"));
        };
        if !SUPPORTED.split(", ").any(|t| t == model_type) {
            return Err(load_err(dir, format!("config.json model_type: {model_type:?} is not supported ({SUPPORTED})")));
        }
        let tokenizer_config = optional_json(dir, "tokenizer_config.json")?;
        let prompt = sentence_transformers_pipeline(dir, &head, tokenizer_config.as_ref())?;
        let weights = read("model.safetensors")?;
        let mut hasher = Sha256::new();
        hasher.update(&config_bytes);
        hasher.update(&weights);
        let fingerprint = hex::encode(hasher.finalize());
        let vb = VarBuilder::from_buffered_safetensors(weights, dtype, device)
            .map_err(|e| load_err(dir, format!("model.safetensors: {e}")))?;
        let Built { arch, family, positions, default_pad } = build(dir, &model_type, &config_bytes, &head, num_labels, vb, dtype)?;
        // The weights were copied on this thread's stream; the model runs on another thread.
        device.synchronize().map_err(|e| load_err(dir, format!("copying the weights to the device: {e}")))?;
        let tokenizer = if family == "deberta-v2" {
            deberta_tokenizer(dir, tokenizer_config.as_ref())?
        } else {
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| load_err(dir, format!("tokenizer.json: {e}")))?
        };
        let limit = positions.min(512);
        let max_tokens = if max_tokens == 0 { limit } else { max_tokens.min(limit) }.max(4);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let pad_id = if matches!(arch, Arch::Bert { .. } | Arch::XlmRoberta(_)) { head.pad_token_id.unwrap_or(default_pad) } else { default_pad };
        Ok(LoadedCross {
            model: CrossEncoderModel { arch, num_labels, pad_id, device: device.clone() },
            tokenizer,
            info: CrossEncoderInfo { name, fingerprint, num_labels, max_tokens, family, prompt },
        })
    }

    fn forward(&self, batch: &[&TokenizedText]) -> candle_core::Result<Vec<Vec<f32>>> {
        let (ids, types, mask) = padded_batch(batch, self.pad_id, &self.device)?;
        let first = |hidden: &Tensor| -> candle_core::Result<Tensor> { hidden.narrow(1, 0, 1)?.squeeze(1)?.to_dtype(DType::F32) };
        let logits = match &self.arch {
            Arch::Bert { body, pooler, classifier } => {
                let hidden = body.forward(&ids, &types, &mask)?;
                classifier.forward(&pooler.forward(&first(&hidden)?)?.tanh()?)?
            }
            // RoBERTa models have one token type; the pair's segments are told apart by
            // separators alone.
            Arch::XlmRoberta(model) => model.forward(&ids, &mask, &types.zeros_like()?)?,
            Arch::ModernBert { body, dense, act, norm, classifier, mean } => {
                let hidden = body.forward(&ids, &types, &mask)?.to_dtype(DType::F32)?;
                let pooled = if *mean {
                    let keep = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                    hidden.broadcast_mul(&keep)?.sum(1)?.broadcast_div(&keep.sum(1)?)?
                } else {
                    first(&hidden)?
                };
                classifier.forward(&norm.forward(&act.apply(&dense.forward(&pooled)?)?)?)?
            }
            Arch::Deberta { body, pooler, act, classifier } => {
                let hidden = body.forward(&ids, &types, &mask)?;
                classifier.forward(&act.apply(&pooler.forward(&first(&hidden)?)?)?)?
            }
            Arch::Qwen3 { body, score, pad } => {
                let hidden = body.forward(&ids, &types, &mask)?;
                let (b, l, h) = hidden.dims3()?;
                // transformers: the rightmost position whose id is not pad_token_id (position 0
                // when every id is), or the last one when the config has no pad_token_id. The
                // batch is right-padded here; a left-padded one reads the same token.
                let rows: Vec<u32> = batch
                    .iter()
                    .enumerate()
                    .map(|(row, t)| {
                        let at = match pad {
                            Some(pad) => t.ids.iter().rposition(|id| id != pad).unwrap_or(0),
                            None => t.ids.len().saturating_sub(1),
                        };
                        (row * l + at) as u32
                    })
                    .collect();
                let rows = Tensor::from_vec(rows, b, &self.device)?;
                let last = hidden.reshape((b * l, h))?.index_select(&rows, 0)?.to_dtype(DType::F32)?;
                score.forward(&last)?
            }
        };
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        if logits.iter().flatten().any(|x| !x.is_finite()) {
            candle_core::bail!("the cross-encoder produced a non-finite logit");
        }
        Ok(logits)
    }
}

impl EmbedModel for CrossEncoderModel {
    fn embed(&mut self, batch: &[&TokenizedText]) -> Result<Vec<Vec<f32>>, EncodeError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.forward(batch)?)
    }

    fn dims(&self) -> usize {
        self.num_labels
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{real_model_dir, seeded_cross_encoder, tiny_model, tiny_xlm_roberta};
    use super::super::{BatchConfig, Reranker};
    use super::*;

    const CFG: BatchConfig = BatchConfig { token_budget: 4096, max_batch_texts: 64, queue_capacity: 64 };

    fn pairs() -> Vec<(String, String)> {
        [
            ("the quick fox", "a lazy dog sleeps"),
            ("wing flow", "boundary layer flow over the wing and the plate"),
            ("heat transfer", "shock wave"),
            ("fox", "the quick brown fox jumps over the lazy dog"),
        ]
        .map(|(q, d)| (q.to_string(), d.to_string()))
        .to_vec()
    }

    #[test]
    fn probability_follows_the_head() {
        assert!((probability(&[0.0]) - 0.5).abs() < 1e-6);
        assert!((probability(&[2.0]) - 0.880_797).abs() < 1e-5);
        assert!((probability(&[1.0, 3.0]) - 0.880_797).abs() < 1e-5, "softmax, label 1");
        assert!((probability(&[1000.0, -1000.0])).abs() < 1e-6, "no overflow");
    }

    /// Every family and head size: batched scores equal one-at-a-time scores, pairs are
    /// tokenized as two segments, and truncation keeps pairs within max_tokens.
    #[tokio::test]
    async fn batched_equals_alone_for_each_family() {
        for (family, labels) in [("bert", 1), ("bert", 2), ("xlm-roberta", 1)] {
            let dir = tempfile::tempdir().unwrap();
            if family == "bert" {
                let body = tempfile::tempdir().unwrap();
                tiny_model(body.path(), "mean");
                seeded_cross_encoder(body.path(), dir.path(), labels, 7);
            } else {
                tiny_xlm_roberta(dir.path());
            }
            let rr = Reranker::load(dir.path(), 0, CFG).unwrap();
            assert_eq!(rr.info().family, family);
            assert_eq!(rr.info().num_labels, labels);
            let batched = rr.logits(pairs()).await.unwrap();
            for (pair, b) in pairs().into_iter().zip(&batched) {
                assert_eq!(b.len(), labels);
                let alone = rr.logits(vec![pair]).await.unwrap();
                for (x, y) in alone[0].iter().zip(b) {
                    assert!((x - y).abs() < 1e-5, "{family}/{labels}: alone {x} batched {y}");
                }
            }
            let scores = rr.score(pairs()).await.unwrap();
            assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
            assert!(scores.windows(2).any(|w| (w[0] - w[1]).abs() > 1e-6), "{family}: scores depend on the pair");
            if family == "bert" {
                let toks = rr.tokenize_pairs(&pairs()[..1]).unwrap();
                let t = &toks[0];
                assert_eq!(t.type_ids.iter().filter(|&&x| x == 0).count(), 5, "[CLS] the quick fox [SEP]");
                assert!(t.type_ids.ends_with(&[1]), "document segment");
                let long = vec![("fox ".repeat(300), "dog ".repeat(300))];
                assert_eq!(rr.tokenize_pairs(&long).unwrap()[0].ids.len(), rr.info().max_tokens);
            }
        }
    }

    #[test]
    fn missing_files_and_unknown_families_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = CrossEncoderModel::load(dir.path(), 0, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::write(dir.path().join("config.json"), r#"{"model_type":"t5","max_position_embeddings":512}"#).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
        let err = CrossEncoderModel::load(dir.path(), 0, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("t5") || err.contains("model.safetensors"), "{err}");
    }

    /// A BERT cross-encoder with its body in bf16 or f16 (head in f32) scores like f32: logits
    /// within 0.05 and probabilities within 0.01 on the real MiniLM body. XLM-RoBERTa models are
    /// f32-only, and say so when asked for anything else.
    #[tokio::test]
    async fn half_precision_scores_match_f32_and_xlm_roberta_refuses() {
        use super::super::Placement;
        use crate::config::{DTypeSpec, DeviceSpec};
        let dir = tempfile::tempdir().unwrap();
        seeded_cross_encoder(&real_model_dir(), dir.path(), 1, 42);
        let reference = Reranker::load(dir.path(), 0, CFG).unwrap();
        let want = reference.logits(pairs()).await.unwrap();
        for dtype in [DTypeSpec::F16, DTypeSpec::Bf16] {
            let rr = Reranker::load_on(dir.path(), 0, CFG, Placement { device: DeviceSpec::Cpu, dtype }).unwrap();
            let got = rr.logits(pairs()).await.unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g[0] - w[0]).abs() < 0.05, "{dtype:?}: logit {} vs f32 {}", g[0], w[0]);
                assert!((probability(g) - probability(w)).abs() < 0.01, "{dtype:?}");
            }
        }
        let xlm = tempfile::tempdir().unwrap();
        tiny_xlm_roberta(xlm.path());
        let err = Reranker::load_on(xlm.path(), 0, CFG, Placement { device: DeviceSpec::Cpu, dtype: DTypeSpec::Bf16 })
            .err()
            .expect("xlm-roberta in bf16 is refused");
        assert_eq!(err.config_field("reranker"), "reranker.device / reranker.dtype");
        assert!(err.to_string().contains("f32 only"), "{err}");
    }

    /// Pairs truncate as Python tokenizers 0.23.3 (what transformers calls) truncates them,
    /// measured there: the shorter side keeps half the budget, the longer the rest, whichever
    /// comes first; a short side stays whole.
    #[test]
    fn pairs_truncate_longest_first_as_python_tokenizers() {
        use super::super::longest_first;
        for ((n1, n2), want) in [((3, 5), (2, 3)), ((5, 3), (3, 2)), ((30, 50), (2, 3)), ((50, 30), (3, 2)), ((372, 527), (18, 19)), ((4, 90), (4, 33)), ((2, 2), (2, 2))] {
            let budget = if n1 > 100 || n2 > 80 { 37 } else { 5 };
            assert_eq!(longest_first(n1, n2, budget), want, "{n1} + {n2} in {budget}");
        }
    }

    /// The DeBERTa-v2 tokenizer rebuilt from a Hub-style tokenizer.json (deberta-v3-rel keeps
    /// transformers 4's normalizer) tokenizes every fixture text, untruncated, as the one
    /// transformers 5 saved (deberta-v2-c2p-abs: lower-casing, punctuation split) and as the
    /// rebuild of its own files.
    #[test]
    fn deberta_tokenizer_is_rebuilt_as_transformers_does() {
        let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cross_encoders");
        for name in ["deberta-v3-rel", "deberta-v2-c2p-abs"] {
            let dir = fixtures.join(name);
            let config: Value = serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).unwrap()).unwrap();
            let rebuilt = deberta_tokenizer(&dir, Some(&config)).unwrap();
            let expected: Value = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
            for pair in expected["pairs"].as_array().unwrap() {
                for text in pair.as_array().unwrap() {
                    let text = text.as_str().unwrap();
                    let ours = rebuilt.encode(text, false).unwrap();
                    if name == "deberta-v2-c2p-abs" {
                        let saved = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap().encode(text, false).unwrap();
                        assert_eq!(ours.get_tokens(), saved.get_tokens(), "{name}: {text:?}");
                    }
                    assert!(!text.is_empty() || ours.get_ids().is_empty(), "{name}: {text:?}: {:?}", ours.get_tokens());
                }
            }
        }
    }

    /// The real MiniLM body under a seeded head loads as a cross-encoder with MiniLM's limits.
    #[test]
    fn real_body_with_a_seeded_head_loads() {
        let dir = tempfile::tempdir().unwrap();
        seeded_cross_encoder(&real_model_dir(), dir.path(), 1, 42);
        let loaded = CrossEncoderModel::load(dir.path(), 0, &Device::Cpu).unwrap();
        assert_eq!(loaded.info.max_tokens, 512);
        assert_eq!(loaded.info.family, "bert");
    }
}
