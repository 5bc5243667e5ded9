//! One collection in memory: its documents' ids and text hashes, the generation answering now
//! (manifest, index, encoder), and the locks that order its writers. Fields are the engine's;
//! everyone else goes through methods.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;

use super::progress::RefreshJob;
use crate::encode::{Encoder, EncoderInfo, Prompts};
use crate::error::{Error, Result};
use crate::index::{Metric, Quantization, VectorIndex};
use crate::mine::{self, TextHashes};
use crate::store::{CollectionMeta, GenerationMeta, PromptOverrides, StoredDoc};

/// What the engine keeps in memory per document.
#[derive(Debug, Clone)]
pub(super) struct DocEntry {
    pub(super) id: Arc<str>,
    pub(super) hashes: TextHashes,
}

#[derive(Default)]
pub(super) struct DocTable {
    pub(super) by_key: HashMap<u64, DocEntry>,
    pub(super) by_id: HashMap<Arc<str>, u64>,
    /// Keys with no vector in the current generation (its encoder is the trainer's): stored,
    /// not searchable until the next vector refresh.
    pub(super) pending: HashSet<u64>,
}

impl DocTable {
    pub(super) fn insert(&mut self, key: u64, doc: &StoredDoc) {
        let id: Arc<str> = Arc::from(doc.id.as_str());
        if let Some(old) = self.by_id.insert(id.clone(), key) {
            self.by_key.remove(&old);
            self.pending.remove(&old);
        }
        self.by_key.insert(key, DocEntry { id, hashes: doc_hashes(doc) });
    }

    pub(super) fn remove(&mut self, key: u64) {
        if let Some(entry) = self.by_key.remove(&key) {
            self.by_id.remove(&entry.id);
        }
        self.pending.remove(&key);
    }
}

/// The document's text hashes: its text alone and title + text (both the latter when the text
/// is blank, so title-only documents are not all duplicates of each other).
pub(super) fn doc_hashes(doc: &StoredDoc) -> TextHashes {
    let full = mine::text_hash(&doc.encoded_text());
    if doc.text.trim().is_empty() { [full, full] } else { [mine::text_hash(&doc.text), full] }
}

/// The prompts in force for vectors made by `encoder` in a collection that sets `overrides`:
/// each side's override, else the encoder's own prompt.
pub(super) fn prompts_in_force(overrides: &PromptOverrides, encoder: &EncoderInfo) -> Prompts {
    Prompts {
        query: overrides.query.clone().or_else(|| encoder.prompts.query.clone()),
        document: overrides.document.clone().or_else(|| encoder.prompts.document.clone()),
    }
}

/// Prompts as a generation's manifest records them (empty ones left out).
pub(super) fn recorded(prompts: &Prompts) -> PromptOverrides {
    use crate::encode::TextKind;
    PromptOverrides {
        query: prompts.get(TextKind::Query).map(str::to_string),
        document: prompts.get(TextKind::Document).map(str::to_string),
    }
}

/// One generation in memory: its manifest, its index, and the encoder that turns text into
/// its vector space (none for trainer vectors, or when the encoder cannot be loaded).
pub(super) struct Generation {
    pub(super) meta: GenerationMeta,
    pub(super) index: VectorIndex,
    pub(super) encoder: Option<Encoder>,
    /// Why text cannot be encoded for this generation, when `encoder` is None.
    pub(super) no_text: String,
    /// The prompts its texts are encoded with (the collection's, else the encoder's own).
    pub(super) prompts: Prompts,
}

impl Generation {
    pub(super) fn dims(&self) -> usize {
        self.meta.dims as usize
    }

    /// The encoder for query, positive and document texts, or why there is none.
    pub(super) fn text_encoder(&self) -> Result<&Encoder> {
        self.encoder.as_ref().ok_or_else(|| Error::FailedPrecondition(self.no_text.clone()))
    }
}

pub struct Collection {
    pub(super) meta: RwLock<CollectionMeta>,
    pub(super) metric: Metric,
    pub(super) quantization: Quantization,
    /// The generation that answers; swapped whole, so a request that took it sees one
    /// generation throughout.
    current: RwLock<Arc<Generation>>,
    generation_tx: tokio::sync::watch::Sender<u64>,
    pub(super) docs: RwLock<DocTable>,
    /// Serializes writers (upsert, delete, save, generation swaps) of this collection.
    pub(super) write: tokio::sync::Mutex<()>,
    /// The re-encode refresh running for this collection, if any.
    pub(super) refresh: parking_lot::Mutex<Option<RefreshJob>>,
    /// Set by DropCollection under the write lock: writers still holding this collection
    /// must not touch a new one created under the same name.
    dropped: AtomicBool,
    /// The manifest version the current generation's saved index reflects.
    saved_version: AtomicU64,
}

impl Collection {
    pub(super) fn new(meta: CollectionMeta, metric: Metric, quantization: Quantization, generation: Generation, docs: DocTable) -> Self {
        let (generation_tx, _) = tokio::sync::watch::channel(generation.meta.number);
        let saved_version = AtomicU64::new(meta.version);
        Self {
            meta: RwLock::new(meta),
            metric,
            quantization,
            current: RwLock::new(Arc::new(generation)),
            generation_tx,
            docs: RwLock::new(docs),
            write: tokio::sync::Mutex::new(()),
            refresh: parking_lot::Mutex::new(None),
            dropped: AtomicBool::new(false),
            saved_version,
        }
    }

    /// The manifest version of the last index save of the current generation.
    pub(super) fn saved_version(&self) -> u64 {
        self.saved_version.load(Ordering::Acquire)
    }

    pub(super) fn set_saved_version(&self, version: u64) {
        self.saved_version.store(version, Ordering::Release);
    }

    pub fn name(&self) -> String {
        self.meta.read().name.clone()
    }

    /// Live documents, and those of them not searchable yet (no vector in this generation).
    pub fn counts(&self) -> (u64, u64) {
        let pending = self.docs.read().pending.len() as u64;
        (self.meta.read().doc_count, pending)
    }

    /// The name, while the collection has not been dropped (call under the write lock).
    pub(super) fn live_name(&self) -> Result<String> {
        let name = self.meta.read().name.clone();
        if self.is_dropped() {
            return Err(Error::CollectionNotFound(name));
        }
        Ok(name)
    }

    pub(super) fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }

    /// Marks the collection dropped (call under the write lock).
    pub(super) fn mark_dropped(&self) {
        self.dropped.store(true, Ordering::Release);
    }

    /// Asks the running re-encode, if any, to stop at its next safe point.
    pub(super) fn cancel_refresh_job(&self) {
        if let Some(job) = self.refresh.lock().as_ref() {
            job.cancel();
        }
    }

    /// The generation answering now.
    pub(super) fn current(&self) -> Arc<Generation> {
        self.current.read().clone()
    }

    /// Makes `generation` current (call under the write lock, after the store commit), with
    /// whether its index was saved at `meta`'s version.
    pub(super) fn swap(&self, meta: CollectionMeta, generation: Generation, saved: bool) {
        let number = generation.meta.number;
        self.set_saved_version(if saved { meta.version } else { 0 });
        *self.current.write() = Arc::new(generation);
        *self.meta.write() = meta;
        self.docs.write().pending.clear();
        self.generation_tx.send_replace(number);
    }

    /// Waits up to `limit` for generation `min` (or a later one) to be current.
    pub(super) async fn wait_for_generation(&self, min: u64, limit: std::time::Duration) -> Result<()> {
        let mut rx = self.generation_tx.subscribe();
        match tokio::time::timeout(limit, rx.wait_for(|g| *g >= min)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(format!(
                "min_generation {min}: collection {:?} is at generation {} after waiting {:?}",
                self.meta.read().name,
                *self.generation_tx.borrow(),
                limit
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(title: Option<&str>, text: &str) -> StoredDoc {
        StoredDoc { id: "x".into(), title: title.map(String::from), text: text.into(), metadata: Default::default() }
    }

    #[test]
    fn title_only_documents_are_not_duplicates_of_each_other() {
        let a = doc_hashes(&doc(Some("Wing flutter"), ""));
        let b = doc_hashes(&doc(Some("Panel buckling"), " "));
        assert!(a.iter().all(|h| !b.contains(h)));
        let c = doc_hashes(&doc(Some("T"), "Body text"));
        assert_eq!(c[0], mine::text_hash("body   TEXT"), "the text alone matches a positive given without title");
        assert_eq!(c[1], mine::text_hash("t body text"));
    }
}
