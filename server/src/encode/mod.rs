//! Text models. A model sits behind the small synchronous [`EmbedModel`] trait and runs on
//! its own thread; [`Encoder`] (the bi-encoder) and [`Reranker`] (the cross-encoder) are the
//! async handles the service uses. Concurrent callers are grouped into model batches by a
//! padded-token budget (see [`batcher`]). Each model runs where its [`Placement`] says: the
//! CPU or, in a build with the `cuda` feature, a CUDA device, in f32, f16 or bf16 (see
//! [`device`]).
pub mod batcher;
pub mod bert;
pub mod body;
pub mod cross;
pub mod device;
pub mod testing;

use std::path::Path;
use std::sync::Arc;

use tokenizers::{Tokenizer, TruncationParams};

pub use batcher::BatchConfig;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("loading model from {dir}: {reason}")]
    Load { dir: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("model forward pass: {0}")]
    Model(#[from] candle_core::Error),
    /// The model thread is gone (shutdown or a panic).
    #[error("encoder is not running")]
    Stopped,
    /// The device or dtype asked for cannot be used by this build or machine.
    #[error("device: {0}")]
    Unsupported(String),
}

impl EncodeError {
    /// The configuration key a load failure points at, within `section` (`encoder`, `reranker`).
    pub fn config_field(&self, section: &str) -> String {
        match self {
            EncodeError::Unsupported(_) => format!("{section}.device / {section}.dtype"),
            _ => format!("{section}.model_dir"),
        }
    }
}

/// One tokenized text, truncated to the encoder's maximum length, special tokens included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// A batch as model inputs, each (texts, longest) u32: token ids (padding with `pad_id`),
/// token type ids, and the attention mask (1 for tokens, 0 for padding).
pub fn padded_batch(
    batch: &[&TokenizedText],
    pad_id: u32,
    device: &candle_core::Device,
) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor, candle_core::Tensor)> {
    let len = batch.iter().map(|t| t.ids.len()).max().unwrap_or(0).max(1);
    let n = batch.len();
    let mut ids = vec![pad_id; n * len];
    let mut types = vec![0u32; n * len];
    let mut mask = vec![0u32; n * len];
    for (row, text) in batch.iter().enumerate() {
        let at = row * len;
        ids[at..at + text.ids.len()].copy_from_slice(&text.ids);
        types[at..at + text.type_ids.len()].copy_from_slice(&text.type_ids);
        mask[at..at + text.ids.len()].fill(1);
    }
    let tensor = |v: Vec<u32>| candle_core::Tensor::from_vec(v, (n, len), device);
    Ok((tensor(ids)?, tensor(types)?, tensor(mask)?))
}

/// Texts or pairs through the tokenizer (special tokens added), as model input.
fn tokenize_all<'s, E>(tokenizer: &Tokenizer, inputs: Vec<E>) -> Result<Vec<TokenizedText>, EncodeError>
where
    E: Into<tokenizers::EncodeInput<'s>> + Send,
{
    let encodings = tokenizer.encode_batch(inputs, true).map_err(|e| EncodeError::Tokenizer(e.to_string()))?;
    Ok(encodings
        .into_iter()
        .map(|e| TokenizedText { ids: e.get_ids().to_vec(), type_ids: e.get_type_ids().to_vec() })
        .collect())
}

/// A model over tokenized texts: a batch in, one output vector per text out (a bi-encoder's
/// L2-normalized embedding, a cross-encoder's logits). Implementations pad the batch
/// themselves and run synchronously on the caller's thread.
pub trait EmbedModel: Send + 'static {
    fn embed(&mut self, batch: &[&TokenizedText]) -> Result<Vec<Vec<f32>>, EncodeError>;
    fn dims(&self) -> usize;
}

/// What identifies an encoder: collections record it and refuse a mismatched one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderInfo {
    /// Model directory name, for humans.
    pub name: String,
    /// sha256 over config.json, the pooling config and the weights.
    pub fingerprint: String,
    pub dims: usize,
    pub max_tokens: usize,
}

/// Async handle to an encoder running on its own thread. Cheap to clone.
#[derive(Clone)]
pub struct Encoder {
    inner: Arc<Inner>,
}

struct Inner {
    tokenizer: Tokenizer,
    info: EncoderInfo,
    batcher: batcher::Handle,
}

/// Where a model runs and in which dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub device: crate::config::DeviceSpec,
    pub dtype: crate::config::DTypeSpec,
}

impl Placement {
    pub const CPU_F32: Placement =
        Placement { device: crate::config::DeviceSpec::Cpu, dtype: crate::config::DTypeSpec::F32 };
}

impl Encoder {
    /// Loads a BERT-family sentence encoder from an HF-style model directory, on the CPU in f32.
    pub fn load(dir: &Path, max_tokens: usize, cfg: BatchConfig) -> Result<Self, EncodeError> {
        Self::load_on(dir, max_tokens, cfg, Placement::CPU_F32)
    }

    /// As [`Encoder::load`], on the given device and dtype.
    pub fn load_on(dir: &Path, max_tokens: usize, cfg: BatchConfig, placement: Placement) -> Result<Self, EncodeError> {
        let (device, dtype) = device::resolve(placement)?;
        let loaded = bert::BertEmbedder::load_on(dir, max_tokens, &device, dtype)?;
        let info = loaded.info.clone();
        Self::start(Box::new(loaded.model), loaded.tokenizer, info, cfg)
    }

    /// Starts the model thread for any [`EmbedModel`].
    pub fn start(
        model: Box<dyn EmbedModel>,
        mut tokenizer: Tokenizer,
        info: EncoderInfo,
        cfg: BatchConfig,
    ) -> Result<Self, EncodeError> {
        set_lengths(&mut tokenizer, info.max_tokens)?;
        let batcher = batcher::spawn(model, cfg, "encoder");
        Ok(Self { inner: Arc::new(Inner { tokenizer, info, batcher }) })
    }

    pub fn info(&self) -> &EncoderInfo {
        &self.inner.info
    }

    /// Tokenizes on the calling thread (use from a blocking context for large inputs).
    pub fn tokenize(&self, texts: &[String]) -> Result<Vec<TokenizedText>, EncodeError> {
        tokenize_all(&self.inner.tokenizer, texts.iter().map(String::as_str).collect())
    }

    /// Encodes texts into L2-normalized vectors, in order. Tokenization runs off the async
    /// runtime; the forward pass runs on the model thread, batched with other callers.
    pub async fn encode(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EncodeError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let this = self.clone();
        let started = std::time::Instant::now();
        let tokenized = tokio::task::spawn_blocking(move || this.tokenize(&texts))
            .await
            .map_err(|_| EncodeError::Stopped)??;
        crate::metrics::stage("tokenize", started.elapsed().as_secs_f64());
        self.inner.batcher.submit(tokenized).await
    }

    /// Work items dropped because their caller went away before the model reached them.
    pub fn abandoned_jobs(&self) -> u64 {
        self.inner.batcher.abandoned()
    }
}

/// The shipped tokenizer.json may pad and truncate to a fixed length: padding is done per
/// batch by the model, truncation (longest-first for pairs) is ours to set.
fn set_lengths(tokenizer: &mut Tokenizer, max_tokens: usize) -> Result<(), EncodeError> {
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams { max_length: max_tokens, ..Default::default() }))
        .map_err(|e| EncodeError::Tokenizer(e.to_string()))?;
    Ok(())
}

/// Async handle to a cross-encoder running on its own thread. Cheap to clone.
#[derive(Clone)]
pub struct Reranker {
    inner: Arc<RerankerInner>,
}

struct RerankerInner {
    tokenizer: Tokenizer,
    info: cross::CrossEncoderInfo,
    batcher: batcher::Handle,
}

impl Reranker {
    /// Loads a sequence-classification checkpoint (see [`cross`]) from an HF-style directory,
    /// on the CPU in f32.
    pub fn load(dir: &Path, max_tokens: usize, cfg: BatchConfig) -> Result<Self, EncodeError> {
        Self::load_on(dir, max_tokens, cfg, Placement::CPU_F32)
    }

    /// As [`Reranker::load`], on the given device and dtype.
    pub fn load_on(dir: &Path, max_tokens: usize, cfg: BatchConfig, placement: Placement) -> Result<Self, EncodeError> {
        let (device, dtype) = device::resolve(placement)?;
        let loaded = cross::CrossEncoderModel::load_on(dir, max_tokens, &device, dtype)?;
        let mut tokenizer = loaded.tokenizer;
        set_lengths(&mut tokenizer, loaded.info.max_tokens)?;
        let batcher = batcher::spawn(Box::new(loaded.model), cfg, "reranker");
        Ok(Self { inner: Arc::new(RerankerInner { tokenizer, info: loaded.info, batcher }) })
    }

    pub fn info(&self) -> &cross::CrossEncoderInfo {
        &self.inner.info
    }

    /// Tokenizes (query, document) pairs as two segments, truncated longest-first.
    pub fn tokenize_pairs(&self, pairs: &[(String, String)]) -> Result<Vec<TokenizedText>, EncodeError> {
        tokenize_all(&self.inner.tokenizer, pairs.iter().map(|(q, d)| (q.as_str(), d.as_str())).collect())
    }

    /// Each pair's logits, in order; pairs from concurrent callers share model batches.
    pub async fn logits(&self, pairs: Vec<(String, String)>) -> Result<Vec<Vec<f32>>, EncodeError> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let this = self.clone();
        let tokenized = tokio::task::spawn_blocking(move || this.tokenize_pairs(&pairs))
            .await
            .map_err(|_| EncodeError::Stopped)??;
        self.inner.batcher.submit(tokenized).await
    }

    /// Each pair's probability of relevance, in order.
    pub async fn score(&self, pairs: Vec<(String, String)>) -> Result<Vec<f32>, EncodeError> {
        Ok(self.logits(pairs).await?.iter().map(|l| cross::probability(l)).collect())
    }
}
