//! A model directory read the way sentence-transformers reads it: `modules.json` names the
//! pipeline (Transformer, Pooling, optional Dense, optional Normalize), the pooling config in
//! either format (the <= 5 `pooling_mode_*` booleans or the 6.x `pooling_mode` string/list),
//! the maximum length from wherever the saved model keeps it, and the prompts of
//! `config_sentence_transformers.json`. Anything this service cannot reproduce exactly is
//! refused with the file and key that names it.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::EncodeError;
use super::pooling::{PoolMode, PoolingSpec};

/// The activation after a Dense module's linear layer, as `2_Dense/config.json` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Tanh,
    Relu,
    Gelu,
    Sigmoid,
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        // Saved as the class's full name, e.g. "torch.nn.modules.activation.Tanh".
        Some(match name.rsplit('.').next()? {
            "Identity" => Activation::Identity,
            "Tanh" => Activation::Tanh,
            "ReLU" => Activation::Relu,
            "GELU" => Activation::Gelu,
            "Sigmoid" => Activation::Sigmoid,
            "SiLU" => Activation::Silu,
            _ => return None,
        })
    }
}

/// One Dense module: `linear` (and `residual` when it projects) from its own weights file.
#[derive(Debug, Clone)]
pub struct DenseSpec {
    pub dir: PathBuf,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    pub activation: Activation,
    pub use_residual: bool,
}

/// The prompts a model defines and which one applies by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptConfig {
    pub prompts: BTreeMap<String, String>,
    pub default_prompt_name: Option<String>,
}

impl PromptConfig {
    /// The prompt `encode_query` uses. sentence-transformers 6 always defines the `query` and
    /// `document` prompt names (empty unless saved), so `encode_query` resolves `query` and
    /// never falls back to `default_prompt_name`.
    pub fn query(&self) -> Option<String> {
        self.prompts.get("query").cloned()
    }

    /// The prompt `encode_document` uses: `document`, for the same reason (its `passage` and
    /// `corpus` fallbacks are never reached, since `document` is always defined).
    pub fn document(&self) -> Option<String> {
        self.prompts.get("document").cloned()
    }
}

/// A sentence-transformers model directory, read but not yet loaded.
#[derive(Debug, Clone)]
pub struct StModel {
    /// Where the Transformer module's config.json, weights and tokenizer live.
    pub transformer_dir: PathBuf,
    pub config_bytes: Vec<u8>,
    pub model_type: String,
    pub pooling: PoolingSpec,
    /// Bytes of the pooling config file (empty when the pooling is implied), for the fingerprint.
    pub pooling_bytes: Vec<u8>,
    pub dense: Vec<DenseSpec>,
    pub normalize: bool,
    /// The Transformer's maximum length before the service's own cap; `None` when the model
    /// keeps none (the position limit applies).
    pub max_seq_length: Option<usize>,
    pub query_length: Option<usize>,
    pub document_length: Option<usize>,
    pub do_lower_case: bool,
    pub prompts: PromptConfig,
}

fn load_err(dir: &Path, reason: impl std::fmt::Display) -> EncodeError {
    EncodeError::Load { dir: dir.display().to_string(), reason: reason.to_string() }
}

fn read_json(dir: &Path, name: &str) -> Result<Option<(Value, Vec<u8>)>, EncodeError> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| load_err(dir, format!("{name}: {e}")))?;
    let value = serde_json::from_slice(&bytes).map_err(|e| load_err(dir, format!("{name}: {e}")))?;
    Ok(Some((value, bytes)))
}

#[derive(Debug, Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().map(|n| n as usize)
}

impl StModel {
    /// Reads `dir`. Fails with the file and key of anything not supported.
    pub fn read(dir: &Path) -> Result<StModel, EncodeError> {
        // A directory the library did not save as a SentenceTransformer (no modules.json, or
        // another class's save) gets its default modules, whatever else the directory holds.
        let modules = match read_json(dir, "modules.json")? {
            Some((modules, _)) if saved_class(dir)?.as_deref() == Some("SentenceTransformer") => modules,
            _ => return Self::implied(dir),
        };
        let entries: Vec<ModuleEntry> =
            serde_json::from_value(modules).map_err(|e| load_err(dir, format!("modules.json: {e}")))?;
        let mut transformer: Option<PathBuf> = None;
        let mut pooling: Option<(PoolingSpec, Vec<u8>)> = None;
        let mut dense = Vec::new();
        let mut normalize = false;
        for (i, entry) in entries.iter().enumerate() {
            let class = entry.kind.rsplit('.').next().unwrap_or(&entry.kind);
            let module_dir = dir.join(&entry.path);
            let out_of_order = |what: &str| {
                load_err(dir, format!("modules.json: module {i} ({}) {what}", entry.kind))
            };
            match class {
                "Transformer" if i == 0 => transformer = Some(module_dir),
                "Pooling" if transformer.is_some() && pooling.is_none() && dense.is_empty() && !normalize => {
                    pooling = Some(read_pooling(dir, &entry.path)?)
                }
                "Dense" if pooling.is_some() && !normalize => dense.push(read_dense(dir, &entry.path)?),
                "Normalize" if pooling.is_some() && !normalize => normalize = true,
                "Transformer" | "Pooling" | "Dense" | "Normalize" => {
                    return Err(out_of_order(
                        "is out of the order this service supports: Transformer, Pooling, Dense..., Normalize",
                    ));
                }
                _ => {
                    return Err(load_err(
                        dir,
                        format!(
                            "modules.json: module type {:?} (module {i}) is not supported; supported: Transformer, Pooling, Dense, Normalize",
                            entry.kind
                        ),
                    ));
                }
            }
        }
        let Some(transformer_dir) = transformer else {
            return Err(load_err(dir, "modules.json: the first module must be a Transformer"));
        };
        let Some((pooling, pooling_bytes)) = pooling else {
            return Err(load_err(dir, "modules.json: no Pooling module; this service serves sentence embeddings"));
        };
        let mut model = Self::transformer(dir, transformer_dir, pooling, pooling_bytes, true)?;
        model.dense = dense;
        model.normalize = normalize;
        model.prompts = read_prompts(dir)?;
        Ok(model)
    }

    /// The default modules sentence-transformers 6 builds for a directory it did not save as a
    /// SentenceTransformer (`_load_default_modules`): a Transformer made from the directory
    /// alone (sentence_bert_config.json and config_sentence_transformers.json are not read: no
    /// prompts, no saved maximum length, no Normalize), then last-token pooling when
    /// `architectures[0]` is a `*ForCausalLM` (unless `is_causal` is false), else mean. Such a
    /// Transformer renders every text through the tokenizer's chat template when it has one;
    /// that is refused.
    fn implied(dir: &Path) -> Result<StModel, EncodeError> {
        let tokenizer_config = read_json(dir, "tokenizer_config.json")?.map(|(v, _)| v);
        if let Some(source) = chat_template(dir, tokenizer_config.as_ref()) {
            return Err(load_err(
                dir,
                format!(
                    "{source}: without a sentence-transformers save (modules.json) the library renders every text through the tokenizer's chat template; not supported: save the model with sentence-transformers, whose Transformer then reads plain text"
                ),
            ));
        }
        let config = read_json(dir, "config.json")?.map(|(v, _)| v).unwrap_or_default();
        let causal_lm = config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .is_some_and(|a| a.ends_with("ForCausalLM"))
            && config.get("is_causal").and_then(Value::as_bool).unwrap_or(true);
        let mode = if causal_lm { PoolMode::LastToken } else { PoolMode::Mean };
        let pooling = PoolingSpec { modes: vec![mode], include_prompt: true };
        Self::transformer(dir, dir.to_path_buf(), pooling, Vec::new(), false)
    }

    fn transformer(
        root: &Path,
        transformer_dir: PathBuf,
        pooling: PoolingSpec,
        pooling_bytes: Vec<u8>,
        saved: bool,
    ) -> Result<StModel, EncodeError> {
        let tdir = transformer_dir.as_path();
        let Some((config, config_bytes)) = read_json(tdir, "config.json")? else {
            return Err(load_err(root, format!("config.json: not found in {}", tdir.display())));
        };
        let model_type = match config.get("model_type").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => return Err(load_err(root, "config.json model_type: missing")),
        };
        // sentence_bert_config.json (or one of its legacy names) holds a saved Transformer's options.
        let mut sbert: Option<(Value, String)> = None;
        for name in if saved { SBERT_CONFIGS.as_slice() } else { &[] } {
            if let Some((v, _)) = read_json(tdir, name)? {
                sbert = Some((v, name.to_string()));
                break;
            }
        }
        let (mut max_seq_length, mut query_length, mut document_length, mut do_lower_case) = (None, None, None, false);
        if let Some((v, name)) = &sbert {
            max_seq_length = v.get("max_seq_length").and_then(as_usize).or_else(|| {
                ["processor_kwargs", "tokenizer_args"]
                    .iter()
                    .find_map(|k| v.get(*k).and_then(|a| a.get("model_max_length")).and_then(as_usize))
            });
            if v.get("modality_config").and_then(|m| m.get("message")).is_some() {
                return Err(load_err(root, format!("{name} modality_config: chat-template (message) inputs are not supported")));
            }
            query_length = v.get("query_length").and_then(as_usize);
            document_length = v.get("document_length").and_then(as_usize);
            do_lower_case = v.get("do_lower_case").and_then(Value::as_bool).unwrap_or(false);
            if let Some(task) = v.get("transformer_task").and_then(Value::as_str)
                && task != "feature-extraction"
            {
                return Err(load_err(
                    root,
                    format!("{name} transformer_task: {task:?} is not supported (feature-extraction)"),
                ));
            }
            if v.get("query_expansion").is_some_and(|q| !q.is_null()) {
                return Err(load_err(root, format!("{name} query_expansion: not supported")));
            }
            if let Some(pk) = v.get("processing_kwargs").and_then(Value::as_object)
                && !pk.is_empty()
            {
                return Err(load_err(root, format!("{name} processing_kwargs: not supported")));
            }
        }
        if max_seq_length.is_none() {
            // Else the tokenizer's model_max_length, capped by the position limit (applied later).
            if let Some((v, _)) = read_json(tdir, "tokenizer_config.json")? {
                max_seq_length = v.get("model_max_length").and_then(|m| {
                    // Tokenizers without a limit save a huge sentinel (int(1e30)).
                    m.as_u64().map(|n| n as usize).or_else(|| m.as_f64().map(|f| f.min(usize::MAX as f64) as usize))
                });
            }
        }
        Ok(StModel {
            transformer_dir,
            config_bytes,
            model_type,
            pooling,
            pooling_bytes,
            dense: Vec::new(),
            normalize: false,
            max_seq_length,
            query_length,
            document_length,
            do_lower_case,
            prompts: PromptConfig::default(),
        })
    }
}

/// sentence_bert_config.json and the legacy names sentence-transformers still reads.
const SBERT_CONFIGS: [&str; 7] = [
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
];

/// The class sentence-transformers saved `dir` as, which decides how the library loads it:
/// config_sentence_transformers.json's `model_type`, "SentenceTransformer" when the file or the
/// key is absent (the library's own default). `None` without modules.json: the library did
/// not save it, and builds its default modules instead.
pub fn saved_class(dir: &Path) -> Result<Option<String>, EncodeError> {
    if !dir.join("modules.json").exists() {
        return Ok(None);
    }
    let class = read_json(dir, "config_sentence_transformers.json")?
        .and_then(|(v, _)| v.get("model_type").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| "SentenceTransformer".to_string());
    Ok(Some(class))
}

/// Where the tokenizer in `dir` keeps a chat template, if it has one (transformers reads it
/// from tokenizer_config.json, chat_template.jinja, chat_template.json, or the named templates
/// of additional_chat_templates/). A Transformer that sentence-transformers builds rather than
/// loads from its own save renders text through it.
pub fn chat_template(dir: &Path, tokenizer_config: Option<&Value>) -> Option<&'static str> {
    if tokenizer_config.and_then(|c| c.get("chat_template")).is_some_and(|t| !t.is_null()) {
        return Some("tokenizer_config.json chat_template");
    }
    if let Some(file) = ["chat_template.jinja", "chat_template.json"].into_iter().find(|f| dir.join(f).exists()) {
        return Some(file);
    }
    let named = std::fs::read_dir(dir.join("additional_chat_templates")).is_ok_and(|mut d| d.next().is_some());
    named.then_some("additional_chat_templates/")
}

fn read_pooling(dir: &Path, path: &str) -> Result<(PoolingSpec, Vec<u8>), EncodeError> {
    let name = format!("{}config.json", if path.is_empty() { String::new() } else { format!("{path}/") });
    let Some((v, bytes)) = read_json(dir, &name)? else {
        return Err(load_err(dir, format!("{name}: not found")));
    };
    let modes = match v.get("pooling_mode") {
        Some(Value::String(s)) => vec![parse_mode(dir, &name, s)?],
        Some(Value::Array(list)) if !list.is_empty() => list
            .iter()
            .map(|m| match m.as_str() {
                Some(s) => parse_mode(dir, &name, s),
                None => Err(load_err(dir, format!("{name} pooling_mode: {m} is not a mode name"))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(load_err(dir, format!("{name} pooling_mode: {other} is not a mode name"))),
        None => {
            // The <= 5 format: one boolean per mode, concatenated in this order; mean if none.
            let legacy = [
                ("pooling_mode_cls_token", PoolMode::Cls),
                ("pooling_mode_max_tokens", PoolMode::Max),
                ("pooling_mode_mean_tokens", PoolMode::Mean),
                ("pooling_mode_mean_sqrt_len_tokens", PoolMode::MeanSqrtLen),
                ("pooling_mode_weightedmean_tokens", PoolMode::WeightedMean),
                ("pooling_mode_lasttoken", PoolMode::LastToken),
            ];
            let on: Vec<PoolMode> = legacy
                .iter()
                .filter(|(key, _)| v.get(*key).and_then(Value::as_bool).unwrap_or(false))
                .map(|(_, m)| *m)
                .collect();
            if on.is_empty() { vec![PoolMode::Mean] } else { on }
        }
    };
    let include_prompt = v.get("include_prompt").and_then(Value::as_bool).unwrap_or(true);
    Ok((PoolingSpec { modes, include_prompt }, bytes))
}

fn parse_mode(dir: &Path, file: &str, s: &str) -> Result<PoolMode, EncodeError> {
    PoolMode::parse(s).ok_or_else(|| {
        load_err(
            dir,
            format!(
                "{file} pooling_mode: {s:?} is not supported (cls, mean, max, mean_sqrt_len_tokens, weightedmean, lasttoken)"
            ),
        )
    })
}

fn read_dense(dir: &Path, path: &str) -> Result<DenseSpec, EncodeError> {
    let name = format!("{path}/config.json");
    let Some((v, _)) = read_json(dir, &name)? else {
        return Err(load_err(dir, format!("{name}: not found")));
    };
    let field = |key: &str| v.get(key).and_then(as_usize).ok_or_else(|| load_err(dir, format!("{name} {key}: missing")));
    let in_features = field("in_features")?;
    let out_features = field("out_features")?;
    let activation_name = v.get("activation_function").and_then(Value::as_str).unwrap_or("torch.nn.modules.activation.Tanh");
    let activation = Activation::parse(activation_name).ok_or_else(|| {
        load_err(
            dir,
            format!("{name} activation_function: {activation_name:?} is not supported (Identity, Tanh, ReLU, GELU, Sigmoid, SiLU)"),
        )
    })?;
    for key in ["module_input_name", "module_output_name"] {
        if let Some(s) = v.get(key).and_then(Value::as_str)
            && s != "sentence_embedding"
        {
            return Err(load_err(dir, format!("{name} {key}: {s:?} is not supported (sentence_embedding)")));
        }
    }
    let module_dir = dir.join(path);
    if !module_dir.join("model.safetensors").exists() {
        let reason = if module_dir.join("pytorch_model.bin").exists() {
            "pytorch_model.bin is not supported; save the model with safetensors"
        } else {
            "not found"
        };
        return Err(load_err(dir, format!("{path}/model.safetensors: {reason}")));
    }
    Ok(DenseSpec {
        dir: module_dir,
        in_features,
        out_features,
        bias: v.get("bias").and_then(Value::as_bool).unwrap_or(true),
        activation,
        use_residual: v.get("use_residual").and_then(Value::as_bool).unwrap_or(false),
    })
}

fn read_prompts(dir: &Path) -> Result<PromptConfig, EncodeError> {
    let name = "config_sentence_transformers.json";
    let Some((v, _)) = read_json(dir, name)? else {
        return Ok(PromptConfig::default());
    };
    let mut prompts = BTreeMap::new();
    if let Some(map) = v.get("prompts").and_then(Value::as_object) {
        for (key, value) in map {
            let Some(text) = value.as_str() else {
                return Err(load_err(dir, format!("{name} prompts.{key}: not a string")));
            };
            prompts.insert(key.clone(), text.to_string());
        }
    }
    let default_prompt_name = v.get("default_prompt_name").and_then(Value::as_str).map(str::to_string);
    if let Some(name_) = &default_prompt_name
        && !prompts.contains_key(name_)
        && name_ != "query"
        && name_ != "document"
    {
        return Err(load_err(dir, format!("{name} default_prompt_name: {name_:?} is not among the prompts")));
    }
    if let Some(t) = v.get("truncate_dim").filter(|t| !t.is_null()) {
        return Err(load_err(dir, format!("{name} truncate_dim: {t} is not supported")));
    }
    Ok(PromptConfig { prompts, default_prompt_name })
}
