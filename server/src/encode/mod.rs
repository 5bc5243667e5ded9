//! Text models. A model sits behind the small synchronous [`EmbedModel`] trait and runs on
//! its own thread; [`Encoder`] (the bi-encoder) and [`Reranker`] (the cross-encoder) are the
//! async handles the service uses. Concurrent callers are grouped into model batches by a
//! padded-token budget (see [`batcher`]). Each model runs where its [`Placement`] says: the
//! CPU or, in a build with the `cuda` feature, a CUDA device, in f32, f16 or bf16 (see
//! [`device`]).
pub mod arch;
pub mod batcher;
pub mod body;
pub mod cpu;
pub mod cross;
pub mod deberta;
pub mod device;
pub mod distilbert;
pub mod embedder;
pub mod gemma3;
pub mod modernbert;
pub mod mpnet;
pub mod pooling;
pub mod qwen2;
pub mod qwen3;
pub mod st_format;
#[cfg(any(test, feature = "testing"))]
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
    /// Leading prompt tokens that pooling leaves out (0 unless the model excludes its prompt).
    pub prompt_len: usize,
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
        .map(|e| TokenizedText { ids: e.get_ids().to_vec(), type_ids: e.get_type_ids().to_vec(), prompt_len: 0 })
        .collect())
}

/// A model over tokenized texts: a batch in, one output vector per text out (a bi-encoder's
/// L2-normalized embedding, a cross-encoder's logits). Implementations pad the batch
/// themselves and run synchronously on the caller's thread.
pub trait EmbedModel: Send + 'static {
    fn embed(&mut self, batch: &[&TokenizedText]) -> Result<Vec<Vec<f32>>, EncodeError>;
    fn dims(&self) -> usize;
}

/// Which side of retrieval a text is on: queries get the model's query prompt, documents
/// and positive texts its document prompt (sentence-transformers' `encode_query` and
/// `encode_document`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    Query,
    Document,
}

/// The prompts in force: prepended to each text of that kind before tokenization.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prompts {
    pub query: Option<String>,
    pub document: Option<String>,
}

impl Prompts {
    pub fn get(&self, kind: TextKind) -> Option<&str> {
        match kind {
            TextKind::Query => self.query.as_deref(),
            TextKind::Document => self.document.as_deref(),
        }
        .filter(|p| !p.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.get(TextKind::Query).is_none() && self.get(TextKind::Document).is_none()
    }
}

/// What identifies an encoder: collections record it and refuse a mismatched one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderInfo {
    /// Model directory name, for humans.
    pub name: String,
    /// Identifies the vectors this encoder makes with its own prompts: see
    /// [`EncoderInfo::fingerprint_for`].
    pub fingerprint: String,
    /// sha256 over config.json, the pooling config and the weights, then anything else in
    /// the model that changes its vectors (Dense modules, no Normalize, lower-casing).
    pub model_fingerprint: String,
    pub dims: usize,
    pub max_tokens: usize,
    /// The model's own prompts (`config_sentence_transformers.json`).
    pub prompts: Prompts,
}

impl EncoderInfo {
    pub fn new(name: String, model_fingerprint: String, dims: usize, max_tokens: usize, prompts: Prompts) -> Self {
        let fingerprint = fingerprint_for(&model_fingerprint, &prompts);
        Self { name, fingerprint, model_fingerprint, dims, max_tokens, prompts }
    }

    /// The fingerprint of this model's vectors under `prompts`: the model's own when there
    /// are none, so models without prompts keep the fingerprint they always had.
    pub fn fingerprint_for(&self, prompts: &Prompts) -> String {
        fingerprint_for(&self.model_fingerprint, prompts)
    }
}

fn fingerprint_for(model: &str, prompts: &Prompts) -> String {
    use sha2::{Digest, Sha256};
    if prompts.is_empty() {
        return model.to_string();
    }
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    for (tag, p) in [("query", prompts.get(TextKind::Query)), ("document", prompts.get(TextKind::Document))] {
        h.update(format!("\0{tag}\0{}", p.unwrap_or("")).as_bytes());
    }
    hex::encode(h.finalize())
}

/// Lower-cases before the tokenizer's own normalizer, as sentence-transformers does for a
/// Transformer with `do_lower_case`.
pub(crate) fn lowercase_first(tokenizer: &mut Tokenizer) -> Result<(), EncodeError> {
    use tokenizers::normalizers::{Lowercase, NormalizerWrapper, Sequence};
    let mut chain: Vec<NormalizerWrapper> = vec![Lowercase.into()];
    if let Some(existing) = tokenizer.get_normalizer() {
        chain.push(existing.clone());
    }
    tokenizer.with_normalizer(Some(Sequence::new(chain))).map_err(|e| EncodeError::Tokenizer(e.to_string()))?;
    Ok(())
}

/// Async handle to an encoder running on its own thread. Cheap to clone.
#[derive(Clone)]
pub struct Encoder {
    inner: Arc<Inner>,
}

struct Inner {
    /// Truncates queries and documents at their own lengths (equal unless the model sets
    /// `query_length` / `document_length`).
    query_tokenizer: Tokenizer,
    document_tokenizer: Tokenizer,
    /// Prompt tokens are left out of pooling: each text carries its prompt's length.
    exclude_prompt: bool,
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
    /// Loads a sentence-transformers model directory (see [`embedder`]), on the CPU in f32.
    pub fn load(dir: &Path, max_tokens: usize, cfg: BatchConfig) -> Result<Self, EncodeError> {
        Self::load_on(dir, max_tokens, cfg, Placement::CPU_F32)
    }

    /// As [`Encoder::load`], on the given device and dtype.
    pub fn load_on(dir: &Path, max_tokens: usize, cfg: BatchConfig, placement: Placement) -> Result<Self, EncodeError> {
        let (device, dtype) = device::resolve(placement)?;
        let loaded = embedder::SentenceEmbedder::load_on(dir, max_tokens, &device, dtype)?;
        let mut query_tokenizer = loaded.tokenizer.clone();
        set_lengths(&mut query_tokenizer, loaded.query_max_tokens)?;
        let mut document_tokenizer = loaded.tokenizer;
        set_lengths(&mut document_tokenizer, loaded.document_max_tokens)?;
        let batcher = batcher::spawn(Box::new(loaded.model), cfg, "encoder");
        Ok(Self {
            inner: Arc::new(Inner {
                query_tokenizer,
                document_tokenizer,
                exclude_prompt: loaded.exclude_prompt,
                info: loaded.info,
                batcher,
            }),
        })
    }

    /// Starts the model thread for any [`EmbedModel`], with no prompts.
    pub fn start(
        model: Box<dyn EmbedModel>,
        mut tokenizer: Tokenizer,
        info: EncoderInfo,
        cfg: BatchConfig,
    ) -> Result<Self, EncodeError> {
        set_lengths(&mut tokenizer, info.max_tokens)?;
        let batcher = batcher::spawn(model, cfg, "encoder");
        Ok(Self {
            inner: Arc::new(Inner {
                query_tokenizer: tokenizer.clone(),
                document_tokenizer: tokenizer,
                exclude_prompt: false,
                info,
                batcher,
            }),
        })
    }

    pub fn info(&self) -> &EncoderInfo {
        &self.inner.info
    }

    /// Tokenizes documents with the model's own prompt, on the calling thread.
    pub fn tokenize(&self, texts: &[String]) -> Result<Vec<TokenizedText>, EncodeError> {
        let items: Vec<(TextKind, String)> = texts.iter().map(|t| (TextKind::Document, t.clone())).collect();
        self.tokenize_as(&items, &self.inner.info.prompts)
    }

    /// Tokenizes each text as its kind, its prompt from `prompts` prepended (use from a
    /// blocking context for large inputs).
    pub fn tokenize_as(&self, items: &[(TextKind, String)], prompts: &Prompts) -> Result<Vec<TokenizedText>, EncodeError> {
        let mut out: Vec<Option<TokenizedText>> = vec![None; items.len()];
        for kind in [TextKind::Query, TextKind::Document] {
            let tokenizer = match kind {
                TextKind::Query => &self.inner.query_tokenizer,
                TextKind::Document => &self.inner.document_tokenizer,
            };
            let prompt = prompts.get(kind);
            let picked: Vec<usize> = (0..items.len()).filter(|&i| items[i].0 == kind).collect();
            if picked.is_empty() {
                continue;
            }
            let texts: Vec<String> = picked
                .iter()
                .map(|&i| match prompt {
                    Some(p) => format!("{p}{}", items[i].1),
                    None => items[i].1.clone(),
                })
                .collect();
            let prompt_len = match prompt {
                Some(p) if self.inner.exclude_prompt => prompt_length(tokenizer, p)?,
                _ => 0,
            };
            let tokenized = tokenize_all(tokenizer, texts.iter().map(String::as_str).collect())?;
            for (i, mut t) in picked.into_iter().zip(tokenized) {
                t.prompt_len = prompt_len;
                out[i] = Some(t);
            }
        }
        Ok(out.into_iter().map(|t| t.expect("every text has a kind")).collect())
    }

    /// Encodes documents (the model's document prompt) into vectors, in order.
    pub async fn encode(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EncodeError> {
        let prompts = self.inner.info.prompts.clone();
        self.encode_as(texts.into_iter().map(|t| (TextKind::Document, t)).collect(), &prompts).await
    }

    /// Encodes queries and documents in one job, each with its prompt from `prompts`, in
    /// order. Tokenization runs off the async runtime; the forward pass runs on the model
    /// thread, batched with other callers.
    pub async fn encode_as(&self, items: Vec<(TextKind, String)>, prompts: &Prompts) -> Result<Vec<Vec<f32>>, EncodeError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let this = self.clone();
        let prompts = prompts.clone();
        let started = std::time::Instant::now();
        let tokenized = tokio::task::spawn_blocking(move || this.tokenize_as(&items, &prompts))
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

/// A prompt's length in tokens as sentence-transformers measures it: the prompt tokenized
/// alone with special tokens, less a trailing special token.
fn prompt_length(tokenizer: &Tokenizer, prompt: &str) -> Result<usize, EncodeError> {
    let enc = tokenizer.encode(prompt, true).map_err(|e| EncodeError::Tokenizer(e.to_string()))?;
    let ids = enc.get_ids();
    let special = |id: u32| tokenizer.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special);
    let trailing = ids.last().is_some_and(|&id| special(id) || enc.get_special_tokens_mask().last() == Some(&1));
    Ok(ids.len() - usize::from(trailing))
}

/// How many tokens of a pair's two segments (`n1`, `n2` long) stay within `budget`, by the
/// `longest_first` rule of the tokenizers library that transformers calls (Python
/// tokenizers 0.23.3): the shorter segment whole when the longer can give up the rest, else
/// half the budget each, the extra one to the longer.
fn longest_first(n1: usize, n2: usize, budget: usize) -> (usize, usize) {
    if n1 + n2 <= budget {
        return (n1, n2);
    }
    let swap = n1 > n2;
    let mut short = n1.min(n2);
    let mut long = if short > budget { short } else { short.max(budget - short) };
    if short + long > budget {
        short = budget / 2;
        long = short + budget % 2;
    }
    if swap { (long, short) } else { (short, long) }
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
        // Pairs are truncated here (see `tokenize_pairs`), not by the tokenizer.
        let mut tokenizer = loaded.tokenizer;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| EncodeError::Tokenizer(e.to_string()))?;
        let batcher = batcher::spawn(Box::new(loaded.model), cfg, "reranker");
        Ok(Self { inner: Arc::new(RerankerInner { tokenizer, info: loaded.info, batcher }) })
    }

    pub fn info(&self) -> &cross::CrossEncoderInfo {
        &self.inner.info
    }

    /// Tokenizes (query, document) pairs as two segments, truncated longest-first to the
    /// model's maximum length, the model's default prompt (if it has one) before each query, as
    /// `CrossEncoder.predict` does.
    pub fn tokenize_pairs(&self, pairs: &[(String, String)]) -> Result<Vec<TokenizedText>, EncodeError> {
        let tokenizer = &self.inner.tokenizer;
        let err = |e: tokenizers::Error| EncodeError::Tokenizer(e.to_string());
        let prompt = self.inner.info.prompt.as_deref().unwrap_or("");
        let queries: Vec<String> = pairs.iter().map(|(q, _)| format!("{prompt}{q}")).collect();
        let sides: Vec<&str> = queries.iter().map(String::as_str).chain(pairs.iter().map(|(_, d)| d.as_str())).collect();
        let mut encoded = tokenizer.encode_batch(sides, false).map_err(err)?;
        let documents = encoded.split_off(pairs.len());
        let added = tokenizer.get_post_processor().map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, true));
        let budget = self.inner.info.max_tokens.saturating_sub(added);
        let direction = tokenizers::TruncationDirection::Right;
        encoded
            .into_iter()
            .zip(documents)
            .map(|(mut query, mut document)| {
                let (n1, n2) = longest_first(query.len(), document.len(), budget);
                query.truncate(n1, 0, direction);
                document.truncate(n2, 0, direction);
                // The second segment's type, as encoding the pair would give it.
                document.set_type_ids(vec![1; document.len()]);
                let e = tokenizer.post_process(query, Some(document), true).map_err(err)?;
                Ok(TokenizedText { ids: e.get_ids().to_vec(), type_ids: e.get_type_ids().to_vec(), prompt_len: 0 })
            })
            .collect()
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
