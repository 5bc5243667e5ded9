//! BERT-family sentence encoder on candle: `BertModel`, then the pooling that
//! `1_Pooling/config.json` names (mean by default), then L2 normalization.
use std::path::Path;

use candle_core::{D, DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::body::BertBody;
use super::{EmbedModel, EncodeError, EncoderInfo, TokenizedText, padded_batch};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
    MeanSqrtLen,
}

#[derive(Debug, Default, Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Debug, Deserialize)]
struct SentenceBertFile {
    max_seq_length: Option<usize>,
}

/// The loaded parts of a model directory.
pub struct Loaded {
    pub model: BertEmbedder,
    pub tokenizer: Tokenizer,
    pub info: EncoderInfo,
}

pub struct BertEmbedder {
    model: BertBody,
    pooling: Pooling,
    dims: usize,
    device: Device,
}

fn load_err(dir: &Path, reason: impl std::fmt::Display) -> EncodeError {
    EncodeError::Load { dir: dir.display().to_string(), reason: reason.to_string() }
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, EncodeError> {
    std::fs::read(dir.join(name)).map_err(|e| load_err(dir, format!("{name}: {e}")))
}

/// Pooling mode from `1_Pooling/config.json`; mean when the file is absent.
pub fn read_pooling(dir: &Path) -> Result<(Pooling, Vec<u8>), EncodeError> {
    let path = dir.join("1_Pooling/config.json");
    if !path.exists() {
        return Ok((Pooling::Mean, Vec::new()));
    }
    let bytes = read(dir, "1_Pooling/config.json")?;
    let file: PoolingFile = serde_json::from_slice(&bytes)
        .map_err(|e| load_err(dir, format!("1_Pooling/config.json: {e}")))?;
    let pooling = if file.pooling_mode_cls_token {
        Pooling::Cls
    } else if file.pooling_mode_max_tokens {
        Pooling::Max
    } else if file.pooling_mode_mean_sqrt_len_tokens {
        Pooling::MeanSqrtLen
    } else if file.pooling_mode_mean_tokens {
        Pooling::Mean
    } else {
        return Err(load_err(dir, "1_Pooling/config.json enables no pooling mode"));
    };
    Ok((pooling, bytes))
}

impl BertEmbedder {
    /// Loads config.json, tokenizer.json and model.safetensors from `dir`, on the CPU in f32.
    /// `max_tokens` 0 takes `max_seq_length` from sentence_bert_config.json, else
    /// `max_position_embeddings`.
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Loaded, EncodeError> {
        Self::load_on(dir, max_tokens, &Device::Cpu, DType::F32)
    }

    /// As [`BertEmbedder::load`], with weights and activations on `device` in `dtype`. The
    /// pooling and normalization run in f32 whatever the dtype; vectors come out in f32. The
    /// fingerprint is of the files, so every placement of one model shares its collections.
    pub fn load_on(dir: &Path, max_tokens: usize, device: &Device, dtype: DType) -> Result<Loaded, EncodeError> {
        let config_bytes = read(dir, "config.json")?;
        let config: BertConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| load_err(dir, format!("config.json: {e}")))?;
        let (pooling, pooling_bytes) = read_pooling(dir)?;
        let weights_path = dir.join("model.safetensors");
        let weights = std::fs::read(&weights_path)
            .map_err(|e| load_err(dir, format!("model.safetensors: {e}")))?;
        let mut hasher = Sha256::new();
        hasher.update(&config_bytes);
        hasher.update(&pooling_bytes);
        hasher.update(&weights);
        let fingerprint = hex::encode(hasher.finalize());

        let device = device.clone();
        let vb = VarBuilder::from_buffered_safetensors(weights, dtype, &device)
            .map_err(|e| load_err(dir, format!("model.safetensors: {e}")))?;
        let model = BertBody::load(vb, &config)
            .map_err(|e| load_err(dir, format!("model.safetensors does not match config.json: {e}")))?;
        // The weights were copied on this thread's stream; the model runs on another thread.
        device.synchronize().map_err(|e| load_err(dir, format!("copying the weights to the device: {e}")))?;
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| load_err(dir, format!("tokenizer.json: {e}")))?;

        let from_files = if max_tokens > 0 {
            max_tokens
        } else {
            let sbert = dir.join("sentence_bert_config.json");
            let configured = if sbert.exists() {
                let bytes = read(dir, "sentence_bert_config.json")?;
                serde_json::from_slice::<SentenceBertFile>(&bytes)
                    .map_err(|e| load_err(dir, format!("sentence_bert_config.json: {e}")))?
                    .max_seq_length
            } else {
                None
            };
            configured.unwrap_or(config.max_position_embeddings)
        };
        let max_tokens = from_files.min(config.max_position_embeddings).max(2);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let info = EncoderInfo { name, fingerprint, dims: config.hidden_size, max_tokens };
        Ok(Loaded {
            model: BertEmbedder { model, pooling, dims: config.hidden_size, device },
            tokenizer,
            info,
        })
    }

    fn forward(&self, batch: &[&TokenizedText]) -> candle_core::Result<Vec<Vec<f32>>> {
        let (ids, types, mask) = padded_batch(batch, 0, &self.device)?;
        // Pooling and the norm in f32: a half-precision sum over hundreds of tokens loses digits.
        let hidden = self.model.forward(&ids, &types, &mask)?.to_dtype(DType::F32)?; // (n, len, dims)
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let summed = hidden.broadcast_mul(&maskf)?.sum(1)?;
                let counts = maskf.sum(1)?; // (n, 1)
                let divisor = if self.pooling == Pooling::Mean { counts } else { counts.sqrt()? };
                summed.broadcast_div(&divisor)?
            }
            Pooling::Max => {
                // Padding must never win the max.
                let penalty = ((maskf.ones_like()? - &maskf)? * -1e9)?;
                hidden.broadcast_add(&penalty)?.max(1)?
            }
        };
        let norms = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        pooled.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}

impl EmbedModel for BertEmbedder {
    fn embed(&mut self, batch: &[&TokenizedText]) -> Result<Vec<Vec<f32>>, EncodeError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.forward(batch)?)
    }

    fn dims(&self) -> usize {
        self.dims
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{tiny_model, real_model_dir};
    use super::super::{BatchConfig, Encoder};
    use super::*;
    use candle_core::Tensor;

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    }

    const CFG: BatchConfig = BatchConfig { token_budget: 4096, max_batch_texts: 64, queue_capacity: 64 };

    fn texts() -> Vec<String> {
        [
            "the quick brown fox",
            "a lazy dog sleeps",
            "fox",
            "the dog and the fox and the quick lazy brown sleeps",
            "quick quick quick",
        ]
        .map(String::from)
        .to_vec()
    }

    #[tokio::test]
    async fn tiny_model_vectors_are_normalized_and_batch_independent() {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), "mean");
        let enc = Encoder::load(dir.path(), 0, CFG).unwrap();
        assert_eq!(enc.info().dims, 32);
        assert_eq!(enc.info().max_tokens, 64, "max_position_embeddings caps the length");
        let batched = enc.encode(texts()).await.unwrap();
        assert_eq!(batched.len(), 5);
        for (text, v) in texts().into_iter().zip(&batched) {
            assert_eq!(v.len(), 32);
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
            let alone = enc.encode(vec![text]).await.unwrap();
            assert!(cos(&alone[0], v) > 0.9999, "padding changed the embedding");
        }
        assert!(cos(&batched[0], &batched[1]) < 0.9999, "different texts, different vectors");
    }

    #[tokio::test]
    async fn truncation_is_explicit_and_pooling_follows_the_config() {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), "cls");
        let enc = Encoder::load(dir.path(), 8, CFG).unwrap();
        assert_eq!(enc.info().max_tokens, 8);
        let long = "fox ".repeat(500);
        let toks = enc.tokenize(std::slice::from_ref(&long)).unwrap();
        assert_eq!(toks[0].ids.len(), 8, "truncated to max_tokens, specials included");
        assert_eq!(enc.encode(vec![long]).await.unwrap()[0].len(), 32);

        let mean_dir = tempfile::tempdir().unwrap();
        tiny_model(mean_dir.path(), "mean");
        let mean = Encoder::load(mean_dir.path(), 8, CFG).unwrap();
        assert_eq!(mean.info().dims, enc.info().dims);
        assert_ne!(mean.info().fingerprint, enc.info().fingerprint, "different model files, different fingerprints");
        let a = enc.encode(texts()).await.unwrap();
        let b = mean.encode(texts()).await.unwrap();
        assert!(cos(&a[3], &b[3]) < 0.9999, "cls and mean pooling differ");
    }

    #[test]
    fn missing_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = BertEmbedder::load(dir.path(), 0).err().unwrap().to_string();
        assert!(err.contains("config.json"), "{err}");
    }

    /// Our encoder body against candle-transformers' BertModel on the real weights, with
    /// padding in the batch: hidden states of real tokens agree to 1e-4.
    #[test]
    fn body_matches_candle_bert_model() {
        use candle_transformers::models::bert::BertModel;
        let dir = real_model_dir();
        let config: BertConfig = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu).unwrap();
        let reference = BertModel::load(vb.clone(), &config).unwrap();
        let ours = BertBody::load(vb, &config).unwrap();
        let ids = Tensor::new(&[[101u32, 2023, 2003, 1037, 3231, 102, 0, 0], [101, 7592, 2088, 2005, 2256, 3899, 2015, 102]], &Device::Cpu).unwrap();
        let types = ids.zeros_like().unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let a = reference.forward(&ids, &types, Some(&mask)).unwrap();
        let b = ours.forward(&ids, &types, &mask).unwrap();
        let valid = [6usize, 8];
        for (row, &n) in valid.iter().enumerate() {
            let x = a.get(row).unwrap().narrow(0, 0, n).unwrap();
            let y = b.get(row).unwrap().narrow(0, 0, n).unwrap();
            let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "row {row}: max |difference| {diff}");
        }
    }

    /// f16 and bf16 (weights and activations; pooling and norm in f32) against f32 on the CPU,
    /// on the real model: same vectors to cosine > 0.99 (the bar the GPU check sets for
    /// half precision), the reference similarities within 0.02, and unit-norm f32 output.
    #[tokio::test]
    async fn half_precision_matches_f32_on_cpu() {
        use super::super::Placement;
        use crate::config::{DTypeSpec, DeviceSpec};
        let dir = real_model_dir();
        let mut corpus = vec![
            "A man is eating food.".to_string(),
            "A man is eating pasta.".to_string(),
            "A man is riding a horse.".to_string(),
        ];
        corpus.extend((0..5).map(|i| format!("experimental study {i} of {} heat transfer", "supersonic boundary layer ".repeat(i * 9))));
        let reference = Encoder::load(&dir, 0, CFG).unwrap().encode(corpus.clone()).await.unwrap();
        for dtype in [DTypeSpec::F16, DTypeSpec::Bf16] {
            let enc = Encoder::load_on(&dir, 0, CFG, Placement { device: DeviceSpec::Cpu, dtype }).unwrap();
            let v = enc.encode(corpus.clone()).await.unwrap();
            for (i, (a, b)) in v.iter().zip(&reference).enumerate() {
                let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-5, "{dtype:?} text {i}: norm {norm}");
                let c = cos(a, b);
                assert!(c > 0.99, "{dtype:?} text {i}: cosine to f32 {c}");
            }
            let pasta = cos(&v[0], &v[1]);
            let horse = cos(&v[0], &v[2]);
            assert!((pasta - 0.704).abs() < 0.02 && (horse - 0.247).abs() < 0.02, "{dtype:?}: {pasta} {horse}");
            assert_eq!(enc.info().fingerprint, Encoder::load(&dir, 0, CFG).unwrap().info().fingerprint);
        }
    }

    /// A CUDA placement in a build or on a machine that cannot serve it fails to load with an
    /// error that, as the server reports it, names the config keys and the device.
    #[test]
    fn unusable_placement_names_the_keys() {
        use super::super::Placement;
        use crate::config::{DTypeSpec, DeviceSpec};
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), "mean");
        let placement = Placement { device: DeviceSpec::Cuda(0), dtype: DTypeSpec::Bf16 };
        match Encoder::load_on(dir.path(), 0, CFG, placement) {
            Ok(_) => {
                #[cfg(not(feature = "cuda"))]
                panic!("a CPU build loaded onto cuda:0");
            }
            Err(e) => {
                let reported = format!("{}: {e}", e.config_field("encoder"));
                assert!(reported.starts_with("encoder.device / encoder.dtype: "), "{reported}");
                assert!(reported.contains("\"cuda:0\""), "{reported}");
            }
        }
    }

    /// Reference values for all-MiniLM-L6-v2 (sentence-transformers, mean pooling, normalized).
    #[tokio::test]
    async fn real_minilm_matches_reference_similarities() {
        let dir = real_model_dir();
        let enc = Encoder::load(&dir, 0, CFG).unwrap();
        assert_eq!(enc.info().dims, 384);
        assert_eq!(enc.info().max_tokens, 256, "from sentence_bert_config.json, not tokenizer.json's 128");
        let v = enc
            .encode(vec![
                "A man is eating food.".into(),
                "A man is eating pasta.".into(),
                "A man is riding a horse.".into(),
            ])
            .await
            .unwrap();
        let pasta = cos(&v[0], &v[1]);
        let horse = cos(&v[0], &v[2]);
        assert!((pasta - 0.704).abs() < 0.01, "food/pasta {pasta}");
        assert!((horse - 0.247).abs() < 0.01, "food/horse {horse}");

        let corpus: Vec<String> = (0..12)
            .map(|i| format!("document {i} about {} aerodynamic flow over wings", "boundary layer ".repeat(i * 7)))
            .collect();
        let batched = enc.encode(corpus.clone()).await.unwrap();
        for (text, b) in corpus.into_iter().zip(batched) {
            let alone = enc.encode(vec![text]).await.unwrap();
            assert!(cos(&alone[0], &b) > 0.999);
        }
    }
}
