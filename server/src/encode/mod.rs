//! Text encoders. A model sits behind the small synchronous [`EmbedModel`] trait and runs on
//! its own thread; [`Encoder`] is the async handle the service uses. Concurrent callers are
//! grouped into model batches by a padded-token budget (see [`batcher`]).
pub mod batcher;
pub mod bert;
pub mod body;
#[cfg(test)]
pub(crate) mod testing;

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
}

/// One tokenized text, truncated to the encoder's maximum length, special tokens included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// A bi-encoder model: a batch of tokenized texts in, one L2-normalized vector per text out.
/// Implementations pad the batch themselves and run synchronously on the caller's thread.
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

impl Encoder {
    /// Loads a BERT-family sentence encoder from an HF-style model directory.
    pub fn load(dir: &Path, max_tokens: usize, cfg: BatchConfig) -> Result<Self, EncodeError> {
        let loaded = bert::BertEmbedder::load(dir, max_tokens)?;
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
        // The shipped tokenizer.json may pad and truncate to a fixed length: padding is done
        // per batch by the model, truncation is ours to set.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: info.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| EncodeError::Tokenizer(e.to_string()))?;
        let batcher = batcher::spawn(model, cfg);
        Ok(Self { inner: Arc::new(Inner { tokenizer, info, batcher }) })
    }

    pub fn info(&self) -> &EncoderInfo {
        &self.inner.info
    }

    /// Tokenizes on the calling thread (use from a blocking context for large inputs).
    pub fn tokenize(&self, texts: &[String]) -> Result<Vec<TokenizedText>, EncodeError> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encodings = self
            .inner
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| EncodeError::Tokenizer(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| TokenizedText { ids: e.get_ids().to_vec(), type_ids: e.get_type_ids().to_vec() })
            .collect())
    }

    /// Encodes texts into L2-normalized vectors, in order. Tokenization runs off the async
    /// runtime; the forward pass runs on the model thread, batched with other callers.
    pub async fn encode(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EncodeError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let this = self.clone();
        let tokenized = tokio::task::spawn_blocking(move || this.tokenize(&texts))
            .await
            .map_err(|_| EncodeError::Stopped)??;
        self.inner.batcher.submit(tokenized).await
    }

    /// Work items dropped because their caller went away before the model reached them.
    pub fn abandoned_jobs(&self) -> u64 {
        self.inner.batcher.abandoned()
    }
}
