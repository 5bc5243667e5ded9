//! The collections by name: create, look up, list, drop; what each reports about itself; and
//! the per-collection gauges.
use std::sync::Arc;

use super::collection::{Collection, DocTable, Generation, prompts_in_force, recorded};
use super::progress::{RefreshJob, RefreshProgress};
use super::recovery::trainer_no_text;
use super::{Engine, blocking, now_unix};
use crate::error::{Error, Result};
use crate::index::{Metric, Quantization, VectorIndex};
use crate::store::{CollectionMeta, EncoderKind, EncoderRef, GenerationMeta, PromptOverrides};

/// What a collection reports about itself.
#[derive(Debug, Clone)]
pub struct CollectionSummary {
    pub name: String,
    pub doc_count: u64,
    pub dims: u32,
    pub metric: Metric,
    pub quantization: Quantization,
    pub encoder_fingerprint: String,
    /// The prompts the current generation's texts are encoded with.
    pub prompts: PromptOverrides,
    pub generation: u64,
    pub encoder_name: String,
    pub encoder_kind: EncoderKind,
    pub generation_created_at_unix: u64,
    /// Live documents without a vector in the current generation.
    pub pending_documents: u64,
    /// The generation being built (a re-encode, or pending trainer vectors), if any.
    pub building_generation: Option<u64>,
    /// The running re-encode's progress, if any.
    pub refresh: Option<RefreshProgress>,
    /// Created with its own dims: documents carry their vectors.
    pub vectors_only: bool,
}

impl Engine {
    pub fn get(&self, name: &str) -> Result<Arc<Collection>> {
        self.collections.read().get(name).cloned().ok_or_else(|| Error::CollectionNotFound(name.to_string()))
    }

    pub fn summary(&self, coll: &Collection) -> CollectionSummary {
        // One lock at a time: the refresh slot, then the manifest.
        let refresh = coll.refresh.lock().as_ref().map(RefreshJob::progress);
        let pending_documents = coll.docs.read().pending.len() as u64;
        let meta = coll.meta.read();
        CollectionSummary {
            name: meta.name.clone(),
            doc_count: meta.doc_count,
            dims: meta.current.dims,
            metric: coll.metric,
            quantization: coll.quantization,
            encoder_fingerprint: meta.current.encoder.fingerprint.clone(),
            prompts: meta.current.encoder.prompts.clone(),
            generation: meta.current.number,
            encoder_name: meta.current.encoder.name.clone(),
            encoder_kind: meta.current.encoder.kind,
            generation_created_at_unix: meta.current.created_at_unix,
            pending_documents,
            building_generation: meta.building.as_ref().map(|b| b.number),
            refresh,
            vectors_only: meta.vectors_only,
        }
    }

    /// Every collection, by name.
    pub fn list(&self) -> Vec<CollectionSummary> {
        let mut colls: Vec<Arc<Collection>> = self.collections.read().values().cloned().collect();
        colls.sort_by(|a, b| a.meta.read().name.cmp(&b.meta.read().name));
        colls.iter().map(|c| self.summary(c)).collect()
    }

    /// Sets the per-collection gauges (documents, pending, indexed vectors, generation).
    pub fn export_collection_gauges(&self) {
        use crate::metrics::{COLLECTION_DOCUMENTS, COLLECTION_GENERATION, COLLECTION_INDEXED, COLLECTION_PENDING};
        let colls: Vec<Arc<Collection>> = self.collections.read().values().cloned().collect();
        for coll in colls {
            let (name, docs, generation) = {
                let meta = coll.meta.read();
                (meta.name.clone(), meta.doc_count, meta.current.number)
            };
            let pending = coll.docs.read().pending.len();
            let indexed = coll.current().index.len();
            metrics::gauge!(COLLECTION_DOCUMENTS, "collection" => name.clone()).set(docs as f64);
            metrics::gauge!(COLLECTION_PENDING, "collection" => name.clone()).set(pending as f64);
            metrics::gauge!(COLLECTION_INDEXED, "collection" => name.clone()).set(indexed as f64);
            metrics::gauge!(COLLECTION_GENERATION, "collection" => name).set(generation as f64);
        }
    }

    /// A new, empty collection encoded by the server's encoder, with its prompts unless
    /// `prompts` sets a side's own.
    pub async fn create(&self, name: &str, metric: Metric, quantization: Quantization, prompts: PromptOverrides) -> Result<CollectionSummary> {
        let info = self.encoder.info();
        let now = now_unix();
        let in_force = prompts_in_force(&prompts, info);
        let current = GenerationMeta {
            number: 1,
            encoder: EncoderRef {
                kind: EncoderKind::Server,
                name: info.name.clone(),
                fingerprint: info.fingerprint_for(&in_force),
                dir: None,
                prompts: recorded(&in_force),
            },
            dims: info.dims as u32,
            created_at_unix: now,
        };
        let meta = new_meta(name, metric, quantization, current.clone(), prompts, false);
        let generation = |index| Generation { meta: current, index, encoder: Some(self.encoder.clone()), no_text: String::new(), prompts: in_force };
        self.insert_new(meta, metric, quantization, generation).await
    }

    /// A new, empty vectors-only collection: its documents and queries carry `dims`-dimensional
    /// vectors from the trainer's encoder `encoder_name`; the server encodes no text for it.
    pub async fn create_vectors_only(&self, name: &str, metric: Metric, quantization: Quantization, dims: u32, encoder_name: &str) -> Result<CollectionSummary> {
        let current = GenerationMeta {
            number: 1,
            encoder: EncoderRef { kind: EncoderKind::Trainer, name: encoder_name.to_string(), fingerprint: String::new(), dir: None, prompts: Default::default() },
            dims,
            created_at_unix: now_unix(),
        };
        let meta = new_meta(name, metric, quantization, current.clone(), PromptOverrides::default(), true);
        let no_text = trainer_no_text(name, &current);
        let generation = |index| Generation { meta: current, index, encoder: None, no_text, prompts: Default::default() };
        self.insert_new(meta, metric, quantization, generation).await
    }

    /// Creates the collection in the store and the registry, with a fresh index for its first
    /// generation; CollectionExists when the name is taken.
    async fn insert_new(
        &self,
        meta: CollectionMeta,
        metric: Metric,
        quantization: Quantization,
        generation: impl FnOnce(VectorIndex) -> Generation,
    ) -> Result<CollectionSummary> {
        let name = meta.name.clone();
        if self.collections.read().contains_key(&name) {
            return Err(Error::CollectionExists(name));
        }
        let index = VectorIndex::new(meta.current.dims as usize, metric, quantization, &self.cfg.index)?;
        let store = self.store.clone();
        let m = meta.clone();
        if !blocking(move || Ok(store.create_collection(&m)?)).await? {
            return Err(Error::CollectionExists(name));
        }
        // A saved index left by a collection of this name whose drop was cut short must not
        // be taken for this one's.
        let _ = std::fs::remove_dir_all(self.index_dir.join(&name));
        let coll = Arc::new(Collection::new(meta, metric, quantization, generation(index), DocTable::default()));
        let summary = self.summary(&coll);
        self.collections.write().insert(name, coll);
        Ok(summary)
    }

    /// Drops a collection: its re-encode is cancelled, its documents and saved indexes go.
    pub async fn drop_collection(&self, name: &str) -> Result<bool> {
        let Some(coll) = self.collections.write().remove(name) else {
            return Err(Error::CollectionNotFound(name.to_string()));
        };
        coll.cancel_refresh_job();
        let _w = coll.write.lock().await;
        coll.mark_dropped();
        let store = self.store.clone();
        let n = name.to_string();
        let dropped = blocking(move || Ok(store.drop_collection(&n)?)).await?;
        let _ = std::fs::remove_dir_all(self.index_dir.join(name));
        Ok(dropped)
    }
}

/// The manifest of a new, empty collection whose first generation is `current`.
fn new_meta(name: &str, metric: Metric, quantization: Quantization, current: GenerationMeta, prompts: PromptOverrides, vectors_only: bool) -> CollectionMeta {
    CollectionMeta {
        name: name.to_string(),
        metric: metric.as_str().into(),
        quantization: quantization.as_str().into(),
        created_at_unix: current.created_at_unix,
        current,
        building: None,
        next_key: 0,
        version: 0,
        doc_count: 0,
        prompts,
        vectors_only,
    }
}
