//! Cross-encoders: a (query, document) pair in, a relevance probability out. Two families of
//! Hugging Face checkpoints load: `BertForSequenceClassification` (our BERT body, then the
//! pooler's dense + tanh over [CLS], then `classifier`) and `XLMRobertaForSequenceClassification`
//! / `RobertaForSequenceClassification` (candle-transformers' implementation; the bge-reranker
//! family). One label is a logit (sigmoid gives the probability); two labels are softmaxed and
//! label 1 is "relevant".
use std::path::Path;

use candle_core::{DType, Device, Module};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::bert::Config as BertConfig;
use candle_transformers::models::xlm_roberta::{Config as XlmRobertaConfig, XLMRobertaForSequenceClassification};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::body::BertBody;
use super::{EmbedModel, EncodeError, TokenizedText, padded_batch};

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
    /// "bert" or "xlm-roberta".
    pub family: &'static str,
}

#[derive(Debug, Deserialize)]
struct HeadConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    num_labels: Option<usize>,
    #[serde(default)]
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pad_token_id: Option<u32>,
}

enum Arch {
    Bert { body: BertBody, pooler: Linear, classifier: Linear },
    XlmRoberta(XLMRobertaForSequenceClassification),
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

impl CrossEncoderModel {
    /// Loads config.json, tokenizer.json and model.safetensors from `dir`, in f32. `max_tokens`
    /// 0 takes the model's position limit (at most 512).
    pub fn load(dir: &Path, max_tokens: usize, device: &Device) -> Result<LoadedCross, EncodeError> {
        Self::load_on(dir, max_tokens, device, DType::F32)
    }

    /// As [`CrossEncoderModel::load`], with the body in `dtype`. A BERT model's pooler and
    /// classifier stay in f32 (they are tiny, and the logits are what gets compared to
    /// thresholds); logits come out in f32.
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
        let weights = read("model.safetensors")?;
        let mut hasher = Sha256::new();
        hasher.update(&config_bytes);
        hasher.update(&weights);
        let fingerprint = hex::encode(hasher.finalize());
        let vb = VarBuilder::from_buffered_safetensors(weights, dtype, device)
            .map_err(|e| load_err(dir, format!("model.safetensors: {e}")))?;
        let mismatch = |e: candle_core::Error| load_err(dir, format!("model.safetensors does not match config.json: {e}"));
        let Some(model_type) = head.model_type.as_deref() else {
            return Err(load_err(dir, "config.json model_type: missing"));
        };
        let (arch, family, positions) = match model_type {
            "xlm-roberta" | "roberta" => {
                // candle-transformers builds this family's attention mask in f32 and adds it to
                // the scores, so its forward pass only runs in f32.
                if dtype != DType::F32 {
                    return Err(EncodeError::Unsupported(format!(
                        "{}: {model_type} cross-encoders run in f32 only; set the dtype to \"f32\"",
                        dir.display()
                    )));
                }
                let cfg: XlmRobertaConfig =
                    serde_json::from_slice(&config_bytes).map_err(|e| load_err(dir, format!("config.json: {e}")))?;
                let model = XLMRobertaForSequenceClassification::new(num_labels, &cfg, vb).map_err(mismatch)?;
                // Positions start after the padding index.
                let positions = cfg.max_position_embeddings.saturating_sub(cfg.pad_token_id as usize + 1);
                (Arch::XlmRoberta(model), "xlm-roberta", positions)
            }
            "bert" => {
                let cfg: BertConfig =
                    serde_json::from_slice(&config_bytes).map_err(|e| load_err(dir, format!("config.json: {e}")))?;
                let body = BertBody::load(vb.clone(), &cfg).map_err(mismatch)?;
                let head = vb.to_dtype(DType::F32);
                let root = if head.contains_tensor("bert.pooler.dense.weight") { head.pp("bert") } else { head.clone() };
                let pooler = linear(root.pp("pooler.dense"), cfg.hidden_size, cfg.hidden_size).map_err(mismatch)?;
                let classifier = linear(head.pp("classifier"), cfg.hidden_size, num_labels).map_err(mismatch)?;
                (Arch::Bert { body, pooler, classifier }, "bert", cfg.max_position_embeddings)
            }
            other => {
                return Err(load_err(dir, format!("config.json model_type: {other:?} is not supported (bert, roberta, xlm-roberta)")));
            }
        };
        // The weights were copied on this thread's stream; the model runs on another thread.
        device.synchronize().map_err(|e| load_err(dir, format!("copying the weights to the device: {e}")))?;
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| load_err(dir, format!("tokenizer.json: {e}")))?;
        let limit = positions.min(512);
        let max_tokens = if max_tokens == 0 { limit } else { max_tokens.min(limit) }.max(4);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(LoadedCross {
            model: CrossEncoderModel {
                arch,
                num_labels,
                pad_id: head.pad_token_id.unwrap_or(if family == "bert" { 0 } else { 1 }),
                device: device.clone(),
            },
            tokenizer,
            info: CrossEncoderInfo { name, fingerprint, num_labels, max_tokens, family },
        })
    }

    fn forward(&self, batch: &[&TokenizedText]) -> candle_core::Result<Vec<Vec<f32>>> {
        let (ids, types, mask) = padded_batch(batch, self.pad_id, &self.device)?;
        let logits = match &self.arch {
            Arch::Bert { body, pooler, classifier } => {
                let hidden = body.forward(&ids, &types, &mask)?;
                let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?.to_dtype(DType::F32)?;
                classifier.forward(&pooler.forward(&cls)?.tanh()?)?
            }
            // RoBERTa models have one token type; the pair's segments are told apart by
            // separators alone.
            Arch::XlmRoberta(model) => model.forward(&ids, &mask, &types.zeros_like()?)?,
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
