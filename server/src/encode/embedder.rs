//! A sentence-transformers bi-encoder on candle: the body `config.json` names (see [`arch`]),
//! then the pooling, Dense and Normalize modules `modules.json` lists (see [`st_format`]).
//! Vectors are normalized only when the model has a Normalize module, as the library does.
use std::path::Path;

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::arch::{Body, LoadFailure};
use super::pooling::{PoolMode, PoolingSpec};
use super::st_format::{Activation, DenseSpec, StModel};
use super::{EmbedModel, EncodeError, EncoderInfo, Prompts, TokenizedText, padded_batch};

/// The loaded parts of a model directory.
pub struct Loaded {
    pub model: SentenceEmbedder,
    pub tokenizer: Tokenizer,
    pub info: EncoderInfo,
    /// Per-task maximum lengths (sentence-transformers' `query_length` / `document_length`).
    pub query_max_tokens: usize,
    pub document_max_tokens: usize,
    /// Prompt tokens are left out of pooling: the encoder must measure each prompt.
    pub exclude_prompt: bool,
}

struct Dense {
    linear: Linear,
    residual: Option<Linear>,
    activation: Activation,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.linear.forward(x)?;
        let y = match self.activation {
            Activation::Identity => y,
            Activation::Tanh => y.tanh()?,
            Activation::Relu => y.relu()?,
            Activation::Gelu => y.gelu_erf()?,
            Activation::Sigmoid => candle_nn::ops::sigmoid(&y)?,
            Activation::Silu => candle_nn::ops::silu(&y)?,
        };
        match &self.residual {
            Some(r) => y + r.forward(x)?,
            None => Ok(y),
        }
    }
}

pub struct SentenceEmbedder {
    body: Body,
    pooling: PoolingSpec,
    dense: Vec<Dense>,
    normalize: bool,
    dims: usize,
    pad_id: u32,
    device: Device,
}

fn load_err(dir: &Path, reason: impl std::fmt::Display) -> EncodeError {
    EncodeError::Load { dir: dir.display().to_string(), reason: reason.to_string() }
}

fn read_weights(root: &Path, dir: &Path) -> Result<Vec<u8>, EncodeError> {
    let rel = |name: &str| {
        let p = dir.join(name);
        p.strip_prefix(root).map(|r| r.display().to_string()).unwrap_or_else(|_| p.display().to_string())
    };
    match std::fs::read(dir.join("model.safetensors")) {
        Ok(bytes) => Ok(bytes),
        Err(e) => {
            let reason = if dir.join("model.safetensors.index.json").exists() {
                "sharded checkpoints are not supported; save the model as one model.safetensors".to_string()
            } else if dir.join("pytorch_model.bin").exists() {
                "pytorch_model.bin is not supported; save the model with safetensors".to_string()
            } else {
                e.to_string()
            };
            Err(load_err(root, format!("{}: {reason}", rel("model.safetensors"))))
        }
    }
}

fn load_dense(root: &Path, spec: &DenseSpec, device: &Device, fingerprint: &mut Sha256) -> Result<Dense, EncodeError> {
    let bytes = read_weights(root, &spec.dir)?;
    fingerprint.update(format!("dense {} {} {} {:?} {}", spec.in_features, spec.out_features, spec.bias, spec.activation, spec.use_residual));
    fingerprint.update(&bytes);
    let name = spec.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mismatch = |e: candle_core::Error| load_err(root, format!("{name}/model.safetensors does not match {name}/config.json: {e}"));
    let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device).map_err(mismatch)?;
    let l = vb.pp("linear");
    let weight = l.get((spec.out_features, spec.in_features), "weight").map_err(mismatch)?;
    let bias = if spec.bias { Some(l.get(spec.out_features, "bias").map_err(mismatch)?) } else { None };
    let residual = if spec.use_residual && spec.in_features != spec.out_features {
        Some(Linear::new(vb.pp("residual").get((spec.out_features, spec.in_features), "weight").map_err(mismatch)?, None))
    } else {
        None
    };
    if spec.use_residual && spec.in_features == spec.out_features {
        // Identity residual: a Linear would be wrong, so add x by hand.
        let eye = Tensor::eye(spec.in_features, DType::F32, device).map_err(mismatch)?;
        return Ok(Dense { linear: Linear::new(weight, bias), residual: Some(Linear::new(eye, None)), activation: spec.activation });
    }
    Ok(Dense { linear: Linear::new(weight, bias), residual, activation: spec.activation })
}

impl SentenceEmbedder {
    /// Loads `dir` on the CPU in f32. `max_tokens` 0 takes the length the model keeps.
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Loaded, EncodeError> {
        Self::load_on(dir, max_tokens, &Device::Cpu, DType::F32)
    }

    /// As [`SentenceEmbedder::load`], with the body on `device` in `dtype`. Pooling, Dense
    /// and the norm run in f32 whatever the dtype; vectors come out in f32. The fingerprint is
    /// of the files, so every placement of one model shares its collections.
    pub fn load_on(dir: &Path, max_tokens: usize, device: &Device, dtype: DType) -> Result<Loaded, EncodeError> {
        let st = StModel::read(dir)?;
        let tdir = st.transformer_dir.clone();
        let weights = read_weights(dir, &tdir)?;
        // config.json, the pooling config and the weights, as this service has always hashed
        // them; then whatever else changes the vectors, only when the model has it.
        let mut hasher = Sha256::new();
        hasher.update(&st.config_bytes);
        hasher.update(&st.pooling_bytes);
        hasher.update(&weights);
        if !st.normalize {
            hasher.update(b"\0no-normalize");
        }
        // A directory without a saved pooling config pools as its architecture implies.
        if st.pooling_bytes.is_empty() && st.pooling.modes != [PoolMode::Mean] {
            hasher.update(format!("\0implied {:?}", st.pooling.modes));
        }
        if st.do_lower_case {
            hasher.update(b"\0lowercase");
        }
        let dense = st.dense.iter().map(|d| load_dense(dir, d, device, &mut hasher)).collect::<Result<Vec<_>, _>>()?;

        let vb = VarBuilder::from_buffered_safetensors(weights, dtype, device)
            .map_err(|e| load_err(dir, format!("model.safetensors: {e}")))?;
        let (body, body_info) = Body::load(&st.model_type, &st.config_bytes, vb).map_err(|f| match f {
            LoadFailure::Config(reason) if reason.starts_with("modernbert runs in f32") => {
                EncodeError::Unsupported(format!("{}: {reason}", dir.display()))
            }
            LoadFailure::Config(reason) => load_err(dir, reason),
            LoadFailure::Weights(e) => load_err(dir, format!("model.safetensors does not match config.json: {e}")),
        })?;
        // The weights were copied on this thread's stream; the model runs on another thread.
        device.synchronize().map_err(|e| load_err(dir, format!("copying the weights to the device: {e}")))?;
        let mut tokenizer = Tokenizer::from_file(tdir.join("tokenizer.json"))
            .map_err(|e| load_err(dir, format!("tokenizer.json: {e}")))?;
        if st.do_lower_case {
            super::lowercase_first(&mut tokenizer)?;
        }

        let pooled_dims = body_info.hidden * st.pooling.modes.len();
        let mut dims = pooled_dims;
        for (i, d) in st.dense.iter().enumerate() {
            if d.in_features != dims {
                return Err(load_err(dir, format!("Dense module {i}: in_features {} but its input has {dims} dims", d.in_features)));
            }
            dims = d.out_features;
        }
        let limit = body_info.max_positions;
        let base = if max_tokens > 0 { max_tokens } else { st.max_seq_length.unwrap_or(limit) };
        let max = base.min(limit).max(2);
        let cap = |n: Option<usize>| if max_tokens > 0 { max } else { n.unwrap_or(max).min(limit).max(2) };
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let prompts = Prompts { query: st.prompts.query(), document: st.prompts.document() };
        let model_fingerprint = hex::encode(hasher.finalize());
        let info = EncoderInfo::new(name, model_fingerprint, dims, max, prompts);
        Ok(Loaded {
            model: SentenceEmbedder {
                body,
                pooling: st.pooling.clone(),
                dense,
                normalize: st.normalize,
                dims,
                pad_id: body_info.pad_id,
                device: device.clone(),
            },
            tokenizer,
            info,
            query_max_tokens: cap(st.query_length),
            document_max_tokens: cap(st.document_length),
            exclude_prompt: !st.pooling.include_prompt,
        })
    }

    fn forward(&self, batch: &[&TokenizedText]) -> candle_core::Result<Vec<Vec<f32>>> {
        let (ids, types, mask) = padded_batch(batch, self.pad_id, &self.device)?;
        let hidden = self.body.forward(&ids, &types, &mask)?.to_dtype(DType::F32)?; // (n, len, h)
        let len = hidden.dim(1)?;
        let rows: Vec<Vec<f32>> = batch
            .iter()
            .map(|t| (0..len).map(|j| if j < t.ids.len() { 1.0 } else { 0.0 }).collect())
            .collect();
        let prompt_lens: Vec<usize> = batch.iter().map(|t| t.prompt_len).collect();
        let mut x = self.pooling.pool(&hidden, &rows, &prompt_lens)?;
        for d in &self.dense {
            x = d.forward(&x)?;
        }
        if self.normalize {
            // As torch's F.normalize: x / max(||x||, 1e-12).
            let norms = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
            x = x.broadcast_div(&norms)?;
        }
        x.to_vec2::<f32>()
    }
}

impl EmbedModel for SentenceEmbedder {
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
    use candle_transformers::models::bert::Config as BertConfig;
    use super::super::body::BertBody;
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
        let err = SentenceEmbedder::load(dir.path(), 0).err().unwrap().to_string();
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
