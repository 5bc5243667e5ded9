//! The engine: collections in memory (documents' ids and text hashes, the vector index) over
//! the durable store, and the operations the API exposes. The API layer validates requests
//! before they reach this module.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::encode::{Encoder, Reranker, TextKind};
use crate::error::{Error, Result};
use crate::index::{Metric, Quantization, VectorIndex};
use crate::mine::{self, Candidate, DepthPlan, Filters, QueryContext, RerankFilters, RerankState, Sampling, TextHashes};
use crate::proto as pb;
use crate::store::{CollectionMeta, EncoderKind, EncoderRef, GenerationMeta, Store, StoredDoc};

/// What the engine keeps in memory per document.
#[derive(Debug, Clone)]
pub struct DocEntry {
    pub id: Arc<str>,
    pub hashes: TextHashes,
}

#[derive(Default)]
pub struct DocTable {
    pub by_key: HashMap<u64, DocEntry>,
    pub by_id: HashMap<Arc<str>, u64>,
    /// Keys with no vector in the current generation (its encoder is the trainer's): stored,
    /// not searchable until the next vector refresh.
    pub pending: HashSet<u64>,
}

impl DocTable {
    fn insert(&mut self, key: u64, doc: &StoredDoc) {
        let id: Arc<str> = Arc::from(doc.id.as_str());
        if let Some(old) = self.by_id.insert(id.clone(), key) {
            self.by_key.remove(&old);
            self.pending.remove(&old);
        }
        self.by_key.insert(key, DocEntry { id, hashes: doc_hashes(doc) });
    }

    fn remove(&mut self, key: u64) {
        if let Some(entry) = self.by_key.remove(&key) {
            self.by_id.remove(&entry.id);
        }
        self.pending.remove(&key);
    }
}

/// The document's text hashes: its text alone and title + text (both the latter when the text
/// is blank, so title-only documents are not all duplicates of each other).
pub fn doc_hashes(doc: &StoredDoc) -> TextHashes {
    let full = mine::text_hash(&doc.encoded_text());
    if doc.text.trim().is_empty() { [full, full] } else { [mine::text_hash(&doc.text), full] }
}

/// One generation in memory: its manifest, its index, and the encoder that turns text into
/// its vector space (none for trainer vectors, or when the encoder cannot be loaded).
pub struct Generation {
    pub meta: GenerationMeta,
    pub index: VectorIndex,
    pub encoder: Option<Encoder>,
    /// Why text cannot be encoded for this generation, when `encoder` is None.
    pub no_text: String,
}

impl Generation {
    pub fn dims(&self) -> usize {
        self.meta.dims as usize
    }

    /// The encoder for query, positive and document texts, or why there is none.
    pub fn text_encoder(&self) -> Result<&Encoder> {
        self.encoder.as_ref().ok_or_else(|| Error::FailedPrecondition(self.no_text.clone()))
    }
}

pub struct Collection {
    pub meta: RwLock<CollectionMeta>,
    pub metric: Metric,
    pub quantization: Quantization,
    /// The generation that answers; swapped whole, so a request that took it sees one
    /// generation throughout.
    current: RwLock<Arc<Generation>>,
    generation_tx: tokio::sync::watch::Sender<u64>,
    pub docs: RwLock<DocTable>,
    /// Serializes writers (upsert, delete, save, generation swaps) of this collection.
    pub(crate) write: tokio::sync::Mutex<()>,
    /// The re-encode refresh running for this collection, if any.
    pub(crate) refresh: parking_lot::Mutex<Option<crate::refresh::RefreshJob>>,
    /// Set by DropCollection under the write lock: writers still holding this collection
    /// must not touch a new one created under the same name.
    dropped: AtomicBool,
}

impl Collection {
    fn new(meta: CollectionMeta, metric: Metric, quantization: Quantization, generation: Generation, docs: DocTable) -> Self {
        let (generation_tx, _) = tokio::sync::watch::channel(generation.meta.number);
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
        }
    }

    /// The name, while the collection has not been dropped (call under the write lock).
    pub(crate) fn live_name(&self) -> Result<String> {
        let name = self.meta.read().name.clone();
        if self.dropped.load(Ordering::Acquire) {
            return Err(Error::CollectionNotFound(name));
        }
        Ok(name)
    }

    /// The generation answering now.
    pub fn current(&self) -> Arc<Generation> {
        self.current.read().clone()
    }

    /// Makes `generation` current (call under the write lock, after the store commit).
    pub(crate) fn swap(&self, meta: CollectionMeta, generation: Generation) {
        let number = generation.meta.number;
        *self.current.write() = Arc::new(generation);
        *self.meta.write() = meta;
        self.docs.write().pending.clear();
        self.generation_tx.send_replace(number);
    }

    /// Waits up to `limit` for generation `min` (or a later one) to be current.
    pub async fn wait_for_generation(&self, min: u64, limit: std::time::Duration) -> Result<()> {
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

/// The saved-index manifest: which store version and vector space the file reflects.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct IndexManifest {
    version: u64,
    generation: u64,
    dims: u32,
    metric: String,
    quantization: String,
    encoder_name: String,
    encoder_fingerprint: String,
    doc_count: u64,
    created_at_unix: u64,
}

impl IndexManifest {
    /// The manifest an index of the current generation saved now would carry.
    pub(crate) fn of(meta: &CollectionMeta) -> Self {
        Self {
            version: meta.version,
            generation: meta.current.number,
            dims: meta.current.dims,
            metric: meta.metric.clone(),
            quantization: meta.quantization.clone(),
            encoder_name: meta.current.encoder.name.clone(),
            encoder_fingerprint: meta.current.encoder.fingerprint.clone(),
            doc_count: meta.doc_count,
            created_at_unix: meta.current.created_at_unix,
        }
    }
}

pub struct Engine {
    pub cfg: Arc<Config>,
    pub(crate) store: Arc<Store>,
    /// The configured bi-encoder (encoder.model_dir).
    pub encoder: Encoder,
    /// The cross-encoder, when reranker.model_dir is set.
    pub reranker: Option<Reranker>,
    collections: RwLock<HashMap<String, Arc<Collection>>>,
    pub(crate) index_dir: PathBuf,
    /// True once shutdown begins: re-encodes and MineStream streams stop at their next safe point.
    shutdown: tokio::sync::watch::Sender<bool>,
}

/// Resolved mining options (defaults applied, validated).
#[derive(Debug, Clone)]
pub struct MineParams {
    pub num_negatives: usize,
    pub range_max: usize,
    pub filters: Filters,
    pub sampling: Sampling,
    pub seed: Option<u64>,
    pub adaptive_depth: bool,
    pub return_text: bool,
    /// Cross-encoder options, when the request reranks.
    pub rerank: Option<RerankFilters>,
}

pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("blocking task: {e}")))?
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The directory of generation `number`'s saved index.
pub(crate) fn generation_dir(collection_dir: &Path, number: u64) -> PathBuf {
    collection_dir.join(format!("gen-{number}"))
}

impl Engine {
    /// Opens the store under `data_dir` and brings every collection back: documents from the
    /// store, the current generation's index from its saved file when that reflects the
    /// store's latest version, otherwise rebuilt from the generation's stored vectors. A
    /// re-encode refresh that was interrupted is dropped; uploaded trainer vectors are kept.
    pub fn open(cfg: Arc<Config>, encoder: Encoder, reranker: Option<Reranker>) -> anyhow::Result<Self> {
        let data_dir = &cfg.server.data_dir;
        std::fs::create_dir_all(data_dir)?;
        let store = Arc::new(Store::open(&data_dir.join("store.redb"))?);
        let index_dir = data_dir.join("indexes");
        std::fs::create_dir_all(&index_dir)?;
        let engine = Self {
            cfg,
            store,
            encoder,
            reranker,
            collections: RwLock::new(HashMap::new()),
            index_dir,
            shutdown: tokio::sync::watch::Sender::new(false),
        };
        for mut meta in engine.store.collections()? {
            if let Some(b) = meta.building.clone().filter(|b| b.encoder.kind != EncoderKind::Trainer) {
                engine.store.abort_generation(&meta.name)?;
                meta.building = None;
                tracing::warn!(collection = %meta.name, generation = b.number, "removed the half-built generation of an interrupted re-encode refresh");
            }
            let name = meta.name.clone();
            let coll = engine.load_collection(meta)?;
            engine.collections.write().insert(name, Arc::new(coll));
        }
        Ok(engine)
    }

    /// Loads the encoder of a checkpoint directory. Each generation holds its own, so a model
    /// leaves memory with the last generation (and request) using it.
    pub(crate) fn checkpoint_encoder(&self, dir: &Path) -> std::result::Result<Encoder, crate::encode::EncodeError> {
        let cfg = &self.cfg.encoder;
        let batch = crate::encode::BatchConfig {
            token_budget: cfg.token_budget,
            max_batch_texts: cfg.max_batch_texts,
            queue_capacity: cfg.queue_capacity,
        };
        let placement = crate::encode::Placement { device: cfg.device_spec(), dtype: cfg.dtype_spec() };
        Encoder::load_on(dir, cfg.max_tokens, batch, placement)
    }

    /// The encoder that can encode text for a generation, or why none can.
    fn generation_encoder(&self, collection: &str, g: &GenerationMeta) -> (Option<Encoder>, String) {
        let short = |fp: &str| fp[..12.min(fp.len())].to_string();
        match g.encoder.kind {
            EncoderKind::Server => {
                let info = self.encoder.info();
                if info.fingerprint == g.encoder.fingerprint {
                    (Some(self.encoder.clone()), String::new())
                } else {
                    (None, format!(
                        "collection {collection:?} was encoded with encoder {} ({}), the server runs {} ({}): text cannot be encoded for it; send query vectors or refresh it",
                        g.encoder.name, short(&g.encoder.fingerprint), info.name, short(&info.fingerprint)
                    ))
                }
            }
            EncoderKind::Checkpoint => {
                let dir = PathBuf::from(g.encoder.dir.clone().unwrap_or_default());
                match self.checkpoint_encoder(&dir) {
                    Ok(e) if e.info().fingerprint == g.encoder.fingerprint => (Some(e), String::new()),
                    Ok(e) => (None, format!(
                        "collection {collection:?} generation {} was encoded with the checkpoint in {} ({}), which now holds {}: text cannot be encoded for it; send query vectors or refresh it",
                        g.number, dir.display(), short(&g.encoder.fingerprint), short(&e.info().fingerprint)
                    )),
                    Err(err) => (None, format!(
                        "collection {collection:?} generation {}: its encoder checkpoint cannot be loaded ({err}): send query vectors or refresh it",
                        g.number
                    )),
                }
            }
            EncoderKind::Trainer => (None, format!(
                "collection {collection:?} generation {} holds vectors from the trainer's encoder {:?}: the server cannot encode text for it; send query vectors (and upload vectors for new documents)",
                g.number, g.encoder.name
            )),
        }
    }

    fn load_collection(&self, meta: CollectionMeta) -> anyhow::Result<Collection> {
        let metric = Metric::parse(&meta.metric)
            .ok_or_else(|| anyhow::anyhow!("collection {}: unknown metric {:?}", meta.name, meta.metric))?;
        let quantization = Quantization::parse(&meta.quantization)
            .ok_or_else(|| anyhow::anyhow!("collection {}: unknown quantization {:?}", meta.name, meta.quantization))?;
        let (encoder, no_text) = self.generation_encoder(&meta.name, &meta.current);
        if encoder.is_none() && meta.current.encoder.kind != EncoderKind::Trainer {
            tracing::warn!("{no_text}");
        }
        let mut docs = DocTable::default();
        for (key, doc) in self.store.scan(&meta.name)? {
            docs.insert(key, &doc);
        }
        let coll_dir = self.index_dir.join(&meta.name);
        let gen_dir = generation_dir(&coll_dir, meta.current.number);
        // Everything but the current generation's saved index is left over from an older
        // generation or a save that did not finish.
        if let Ok(entries) = std::fs::read_dir(&coll_dir) {
            for entry in entries.flatten() {
                if entry.path() != gen_dir {
                    tracing::info!(collection = %meta.name, path = %entry.path().display(), "removing a stale or half-written index directory");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let expected = IndexManifest::of(&meta);
        let saved: Option<IndexManifest> = std::fs::read(gen_dir.join("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let dims = meta.current.dims as usize;
        let vectors = self.store.scan_vectors(&meta.name, meta.current.number)?;
        let index = match saved {
            Some(m) if m == expected => {
                let index = VectorIndex::load(&gen_dir.join("index.usearch"), dims, metric, quantization, &self.cfg.index)?;
                tracing::info!(collection = %meta.name, generation = meta.current.number, vectors = vectors.len(), "index loaded from its saved file");
                index
            }
            other => {
                if let Some(m) = other {
                    tracing::warn!(collection = %meta.name, saved = ?m, expected = ?expected, "saved index refused: its manifest does not match the store; rebuilding from the stored vectors");
                }
                let index = VectorIndex::new(dims, metric, quantization, &self.cfg.index)?;
                index.add_blocking(&vectors)?;
                tracing::info!(collection = %meta.name, generation = meta.current.number, vectors = vectors.len(), "index rebuilt from the store");
                index
            }
        };
        let with_vectors: HashSet<u64> = vectors.iter().map(|(k, _)| *k).collect();
        docs.pending = docs.by_key.keys().filter(|k| !with_vectors.contains(k)).copied().collect();
        let generation = Generation { meta: meta.current.clone(), index, encoder, no_text };
        Ok(Collection::new(meta, metric, quantization, generation, docs))
    }

    /// Saves every collection's current index with its manifest.
    /// Begins shutdown: every running re-encode stops at its next safe point (the end of the
    /// chunk it is encoding; its half-built generation is dropped) and its stream ends with
    /// UNAVAILABLE; MineStream streams finish the batches they have read and end with
    /// UNAVAILABLE. Pending trainer vectors stay in the store for a commit after the restart.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        for coll in self.collections.read().values() {
            if let Some(job) = coll.refresh.lock().as_ref() {
                job.cancel();
            }
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Watches for [`Engine::begin_shutdown`].
    pub fn shutdown_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Resolves once no re-encode refresh is running.
    pub async fn refreshes_stopped(&self) {
        loop {
            let running = self.collections.read().values().any(|c| c.refresh.lock().is_some());
            if !running {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn save_indexes(&self) -> Result<()> {
        let colls: Vec<Arc<Collection>> = self.collections.read().values().cloned().collect();
        for coll in colls {
            let _w = coll.write.lock().await;
            if coll.dropped.load(Ordering::Acquire) {
                continue;
            }
            let meta = coll.meta.read().clone();
            let dir = self.index_dir.join(&meta.name);
            let generation = coll.current();
            blocking(move || save_index(&generation.index, &dir, &IndexManifest::of(&meta))).await?;
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<Arc<Collection>> {
        self.collections.read().get(name).cloned().ok_or_else(|| Error::CollectionNotFound(name.to_string()))
    }

    pub fn info(&self, coll: &Collection) -> pb::CollectionInfo {
        // One lock at a time: the refresh slot, then the manifest.
        let refresh = coll.refresh.lock().as_ref().map(|job| job.progress());
        let pending_documents = coll.docs.read().pending.len() as u64;
        let meta = coll.meta.read();
        pb::CollectionInfo {
            name: meta.name.clone(),
            doc_count: meta.doc_count,
            dims: meta.current.dims,
            metric: match coll.metric {
                Metric::Cosine => pb::Metric::Cosine,
                Metric::InnerProduct => pb::Metric::InnerProduct,
            } as i32,
            quantization: match coll.quantization {
                Quantization::F32 => pb::Quantization::F32,
                Quantization::F16 => pb::Quantization::F16,
                Quantization::I8 => pb::Quantization::I8,
            } as i32,
            encoder_fingerprint: meta.current.encoder.fingerprint.clone(),
            generation: meta.current.number,
            encoder_name: meta.current.encoder.name.clone(),
            encoder_kind: match meta.current.encoder.kind {
                EncoderKind::Server => "server",
                EncoderKind::Checkpoint => "checkpoint",
                EncoderKind::Trainer => "trainer",
            }
            .into(),
            generation_created_at_unix: meta.current.created_at_unix,
            pending_documents,
            building_generation: meta.building.as_ref().map(|b| b.number),
            refresh,
        }
    }

    /// Sets the per-collection gauges (documents, pending, indexed vectors, generation).
    pub fn export_collection_gauges(&self) {
        let colls: Vec<Arc<Collection>> = self.collections.read().values().cloned().collect();
        for coll in colls {
            let (name, docs, generation) = {
                let meta = coll.meta.read();
                (meta.name.clone(), meta.doc_count, meta.current.number)
            };
            let pending = coll.docs.read().pending.len();
            let indexed = coll.current().index.len();
            metrics::gauge!(crate::metrics::COLLECTION_DOCUMENTS, "collection" => name.clone()).set(docs as f64);
            metrics::gauge!(crate::metrics::COLLECTION_PENDING, "collection" => name.clone()).set(pending as f64);
            metrics::gauge!(crate::metrics::COLLECTION_INDEXED, "collection" => name.clone()).set(indexed as f64);
            metrics::gauge!(crate::metrics::COLLECTION_GENERATION, "collection" => name).set(generation as f64);
        }
    }

    pub fn list(&self) -> Vec<pb::CollectionInfo> {
        let mut colls: Vec<Arc<Collection>> = self.collections.read().values().cloned().collect();
        colls.sort_by(|a, b| a.meta.read().name.cmp(&b.meta.read().name));
        colls.iter().map(|c| self.info(c)).collect()
    }

    pub async fn create(&self, name: &str, metric: Metric, quantization: Quantization) -> Result<pb::CollectionInfo> {
        let info = self.encoder.info();
        let now = now_unix();
        let current = GenerationMeta {
            number: 1,
            encoder: EncoderRef { kind: EncoderKind::Server, name: info.name.clone(), fingerprint: info.fingerprint.clone(), dir: None },
            dims: info.dims as u32,
            created_at_unix: now,
        };
        let meta = CollectionMeta {
            name: name.to_string(),
            metric: metric.as_str().into(),
            quantization: quantization.as_str().into(),
            current: current.clone(),
            building: None,
            next_key: 0,
            version: 0,
            doc_count: 0,
            created_at_unix: now,
        };
        if self.collections.read().contains_key(name) {
            return Err(Error::CollectionExists(name.to_string()));
        }
        let index = VectorIndex::new(info.dims, metric, quantization, &self.cfg.index)?;
        let store = self.store.clone();
        let m = meta.clone();
        if !blocking(move || Ok(store.create_collection(&m)?)).await? {
            return Err(Error::CollectionExists(name.to_string()));
        }
        let generation = Generation { meta: current, index, encoder: Some(self.encoder.clone()), no_text: String::new() };
        let coll = Arc::new(Collection::new(meta, metric, quantization, generation, DocTable::default()));
        let info = self.info(&coll);
        self.collections.write().insert(name.to_string(), coll);
        Ok(info)
    }

    pub async fn drop_collection(&self, name: &str) -> Result<bool> {
        let Some(coll) = self.collections.write().remove(name) else {
            return Err(Error::CollectionNotFound(name.to_string()));
        };
        if let Some(job) = coll.refresh.lock().as_ref() {
            job.cancel();
        }
        let _w = coll.write.lock().await;
        coll.dropped.store(true, Ordering::Release);
        let store = self.store.clone();
        let n = name.to_string();
        let dropped = blocking(move || Ok(store.drop_collection(&n)?)).await?;
        let _ = std::fs::remove_dir_all(self.index_dir.join(name));
        Ok(dropped)
    }

    /// Encodes with the current generation's encoder (when it has one), stores durably, then
    /// indexes one message's documents. Returns (inserted, updated). When a generation swap
    /// lands between encoding and commit, the documents are encoded again for the new one.
    pub async fn upsert(&self, coll: &Arc<Collection>, docs: Vec<StoredDoc>) -> Result<(u64, u64)> {
        if docs.is_empty() {
            return Ok((0, 0));
        }
        loop {
            let generation = coll.current();
            let vectors = match &generation.encoder {
                Some(encoder) => {
                    let texts: Vec<String> = docs.iter().map(StoredDoc::encoded_text).collect();
                    let mut vectors = Vec::with_capacity(texts.len());
                    for chunk in texts.chunks(256) {
                        vectors.extend(encoder.encode(chunk.to_vec()).await?);
                    }
                    Some(vectors)
                }
                None if generation.meta.encoder.kind == EncoderKind::Trainer => None,
                None => return Err(Error::FailedPrecondition(generation.no_text.clone())),
            };
            if let Some(done) = self.commit(coll, docs.clone(), vectors, generation.meta.number).await? {
                return Ok(done);
            }
        }
    }

    /// Stores durably, then indexes documents whose vectors are already computed (one per
    /// document, with the current generation's dims). Returns (inserted, updated).
    pub async fn upsert_encoded(&self, coll: &Arc<Collection>, docs: Vec<StoredDoc>, vectors: Vec<Vec<f32>>) -> Result<(u64, u64)> {
        let generation = coll.current();
        let dims = generation.dims();
        if vectors.len() != docs.len() {
            return Err(Error::Internal(format!("{} vectors for {} documents", vectors.len(), docs.len())));
        }
        if let Some(i) = vectors.iter().position(|v| v.len() != dims) {
            return Err(Error::invalid(format!("vectors[{i}]"), format!("has {} dims, the collection has {dims}", vectors[i].len())));
        }
        self.commit(coll, docs, Some(vectors), generation.meta.number)
            .await?
            .ok_or_else(|| Error::Unavailable("the collection's generation changed during the write; retry".into()))
    }

    /// Commits in its own task: a caller that goes away mid-write cannot leave the store
    /// committed and the in-memory table and index behind. None: `generation` is no longer
    /// current, nothing was written.
    async fn commit(
        &self,
        coll: &Arc<Collection>,
        docs: Vec<StoredDoc>,
        vectors: Option<Vec<Vec<f32>>>,
        generation: u64,
    ) -> Result<Option<(u64, u64)>> {
        let rows: Vec<(StoredDoc, Option<Vec<f32>>)> = match vectors {
            Some(v) => docs.into_iter().zip(v.into_iter().map(Some)).collect(),
            None => docs.into_iter().map(|d| (d, None)).collect(),
        };
        let (store, coll) = (self.store.clone(), coll.clone());
        tokio::spawn(commit_upsert(store, coll, rows, generation))
            .await
            .map_err(|e| Error::Internal(format!("upsert task: {e}")))?
    }

    pub async fn delete(&self, coll: &Arc<Collection>, ids: Vec<String>) -> Result<(u64, u64)> {
        let (store, coll) = (self.store.clone(), coll.clone());
        tokio::spawn(commit_delete(store, coll, ids))
            .await
            .map_err(|e| Error::Internal(format!("delete task: {e}")))?
    }

    /// Stored documents by id, in request order; ids not in the collection come back apart.
    pub async fn documents(&self, coll: &Arc<Collection>, ids: Vec<String>) -> Result<(Vec<StoredDoc>, Vec<String>)> {
        let keys: Vec<Option<u64>> = {
            let table = coll.docs.read();
            ids.iter().map(|id| table.by_id.get(id.as_str()).copied()).collect()
        };
        let wanted: Vec<u64> = keys.iter().flatten().copied().collect();
        let store = self.store.clone();
        let name = coll.meta.read().name.clone();
        let docs = blocking(move || Ok(store.docs(&name, &wanted)?)).await?;
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for (id, key) in ids.into_iter().zip(keys) {
            match key.and_then(|k| docs.get(&k).cloned()) {
                Some(doc) => found.push(doc),
                None => missing.push(id),
            }
        }
        Ok((found, missing))
    }

    /// Mines one validated batch.
    pub async fn mine(&self, req: &pb::MineRequest, params: &MineParams) -> Result<pb::MineResponse> {
        let started = Instant::now();
        let coll = self.get(&req.collection)?;
        let reranker = match (&params.rerank, &self.reranker) {
            (None, _) => None,
            (Some(f), Some(r)) => Some((r, f)),
            (Some(_), None) => {
                return Err(Error::FailedPrecondition(
                    "options.rerank: no cross-encoder is loaded; set reranker.model_dir (or --reranker-dir) on the server".into(),
                ));
            }
        };
        if let Some(min) = req.min_generation {
            let wait = std::time::Duration::from_secs_f64(self.cfg.mining.min_generation_wait_seconds);
            coll.wait_for_generation(min, wait).await?;
        }
        // One generation answers the whole request, even if a refresh swaps meanwhile.
        let current = coll.current();
        let index = &current.index;
        let dims = current.dims();
        let generation = current.meta.number;
        for (i, q) in req.queries.iter().enumerate() {
            if !q.vector.is_empty() && q.vector.len() != dims {
                return Err(Error::invalid(
                    format!("queries[{i}].vector"),
                    format!("has {} dims, collection {:?} (generation {generation}) has {dims}", q.vector.len(), req.collection),
                ));
            }
        }

        // Encode query texts (queries without a vector) and positive texts, in one job.
        // Queries as encode_query does, positive texts as encode_document does.
        let mut texts = Vec::new();
        for q in &req.queries {
            if q.vector.is_empty() {
                texts.push((TextKind::Query, q.text.clone()));
            }
            texts.extend(q.positive_texts.iter().map(|t| (TextKind::Document, t.clone())));
        }
        let t_encode = Instant::now();
        let mut encoded = if texts.is_empty() {
            Vec::new().into_iter()
        } else {
            let encoder = current.text_encoder()?;
            let prompts = encoder.info().prompts.clone();
            encoder.encode_as(texts, &prompts).await?.into_iter()
        };
        let encode_seconds = t_encode.elapsed().as_secs_f64();

        let mut query_vecs = Vec::with_capacity(req.queries.len());
        let mut positive_text_vecs: Vec<Vec<Vec<f32>>> = Vec::with_capacity(req.queries.len());
        for q in &req.queries {
            let v = if q.vector.is_empty() {
                encoded.next().expect("one encoded vector per query text")
            } else {
                q.vector.clone()
            };
            if v.len() != dims {
                return Err(Error::Internal(format!("query vector has {} dims, collection {}", v.len(), dims)));
            }
            query_vecs.push(v);
            positive_text_vecs.push(q.positive_texts.iter().map(|_| encoded.next().expect("one vector per positive text")).collect());
        }

        // Resolve positives against the collection.
        let mut contexts: Vec<QueryContext> = Vec::with_capacity(req.queries.len());
        // The batch's positives (ids and text hashes) are gathered in the same pass, under the
        // same lock, so they agree with each query's own.
        let mut all_positive_keys = Vec::new();
        let mut batch_keys = HashSet::new();
        let mut batch_hashes = HashSet::new();
        {
            let table = coll.docs.read();
            for q in &req.queries {
                let mut ctx = QueryContext::default();
                for id in &q.positive_ids {
                    if let Some(&key) = table.by_id.get(id.as_str()) {
                        let hashes = table.by_key[&key].hashes;
                        ctx.positive_keys.insert(key);
                        ctx.positive_hashes.extend(hashes);
                        all_positive_keys.push(key);
                        if params.filters.exclude_batch_positives {
                            batch_keys.insert(key);
                            batch_hashes.extend(hashes);
                        }
                    }
                }
                for t in &q.positive_texts {
                    let hash = mine::text_hash(t);
                    ctx.positive_hashes.insert(hash);
                    if params.filters.exclude_batch_positives {
                        batch_hashes.insert(hash);
                    }
                }
                if q.vector.is_empty() || !q.text.trim().is_empty() {
                    ctx.positive_hashes.insert(mine::text_hash(&q.text));
                }
                contexts.push(ctx);
            }
        }
        // The positives' vectors as this generation holds them (documents pending a vector
        // have none, and then no score).
        let positive_vecs = if all_positive_keys.is_empty() {
            HashMap::new()
        } else {
            index.vectors(all_positive_keys.clone()).await?
        };
        let (batch_keys, batch_hashes) = (Arc::new(batch_keys), Arc::new(batch_hashes));
        // Each query's positive vectors (stored ones, then encoded positive texts).
        let mut positives: Vec<Vec<Vec<f32>>> = Vec::with_capacity(contexts.len());
        for (i, ctx) in contexts.iter_mut().enumerate() {
            let mut keys: Vec<u64> = ctx.positive_keys.iter().copied().collect();
            keys.sort_unstable();
            let vecs: Vec<Vec<f32>> = keys
                .iter()
                .filter_map(|k| positive_vecs.get(k).cloned())
                .chain(positive_text_vecs[i].drain(..))
                .collect();
            let q = &query_vecs[i];
            ctx.positive_score = vecs.iter().map(|p| coll.metric.score(q, p)).reduce(f32::min);
            // Own positives are dropped as positives before the batch check, so the batch
            // sets may hold the whole batch.
            ctx.batch_keys = batch_keys.clone();
            ctx.batch_hashes = batch_hashes.clone();
            positives.push(vecs);
        }
        let neighbourhood = params.filters.max_positive_similarity.is_some();

        // Reranking: the positives' texts, scored with the first candidates.
        let mut rerank_seconds = 0.0;
        let mut states: Vec<RerankState> = match reranker {
            Some((_, f)) => req.queries.iter().map(|_| RerankState::new(f)).collect(),
            None => Vec::new(),
        };
        let mut positive_pairs: Vec<(usize, String)> = Vec::new();
        // The positives' cross-encoder scores matter only to the relative margin.
        if reranker.is_some_and(|(_, f)| f.relative_margin.is_some()) {
            let t = Instant::now();
            let stored = if all_positive_keys.is_empty() {
                HashMap::new()
            } else {
                let store = self.store.clone();
                let name = req.collection.clone();
                let keys = all_positive_keys.clone();
                blocking(move || Ok(store.docs(&name, &keys)?)).await?
            };
            for (i, (q, ctx)) in req.queries.iter().zip(&contexts).enumerate() {
                let mut keys: Vec<u64> = ctx.positive_keys.iter().copied().collect();
                keys.sort_unstable();
                positive_pairs.extend(keys.iter().filter_map(|k| stored.get(k)).map(|d| (i, d.encoded_text())));
                positive_pairs.extend(q.positive_texts.iter().map(|t| (i, t.clone())));
            }
            rerank_seconds += t.elapsed().as_secs_f64();
        }

        // Search, filter, rerank, and search deeper where needed.
        let max_depth = self.cfg.mining.max_depth as usize;
        let mut plans: Vec<DepthPlan> = contexts
            .iter()
            .map(|c| DepthPlan::initial(params.range_max, c.positive_keys.len() + c.batch_keys.len().min(256)))
            .collect();
        let mut selections: Vec<Option<mine::Selection>> = vec![None; plans.len()];
        let mut pending: Vec<usize> = (0..plans.len()).collect();
        let mut search_seconds = 0.0;
        let mut filter_seconds = 0.0;
        while !pending.is_empty() {
            let indexed = index.len().max(1);
            let t_search = Instant::now();
            let requests: Vec<(Vec<f32>, usize)> =
                pending.iter().map(|&i| (query_vecs[i].clone(), plans[i].search_depth.min(indexed))).collect();
            let results = index.search(requests).await?;
            let hit_vectors = if neighbourhood {
                let keys: Vec<u64> = pending
                    .iter()
                    .zip(&results)
                    .filter(|(i, _)| !positives[**i].is_empty())
                    .flat_map(|(_, hits)| hits.iter().map(|h| h.key))
                    .collect::<HashSet<u64>>()
                    .into_iter()
                    .collect();
                index.vectors(keys).await?
            } else {
                HashMap::new()
            };
            search_seconds += t_search.elapsed().as_secs_f64();
            let t_filter = Instant::now();
            let mut returned = Vec::with_capacity(pending.len());
            {
                let table = coll.docs.read();
                for (&i, hits) in pending.iter().zip(results) {
                    returned.push(hits.len());
                    let cands: Vec<Candidate> = hits
                        .into_iter()
                        .filter_map(|h| {
                            let d = table.by_key.get(&h.key)?;
                            let positive_similarity = hit_vectors.get(&h.key).and_then(|v| {
                                positives[i].iter().map(|p| Metric::Cosine.score(v, p)).reduce(f32::max)
                            });
                            Some(Candidate { key: h.key, score: h.score, hashes: d.hashes, positive_similarity })
                        })
                        .collect();
                    selections[i] = Some(mine::select(&cands, &contexts[i], &params.filters, plans[i].window_end));
                }
            }
            filter_seconds += t_filter.elapsed().as_secs_f64();
            if let Some((rr, f)) = reranker {
                let t = Instant::now();
                let mut to_score = pending.clone();
                while !to_score.is_empty() {
                    let mut wanted: Vec<(usize, u64)> = Vec::new();
                    for &i in &to_score {
                        let sel = selections[i].as_ref().expect("selected this round");
                        wanted.extend(states[i].unscored(sel).into_iter().map(|k| (i, k)));
                    }
                    let keys: Vec<u64> = wanted.iter().map(|&(_, k)| k).collect();
                    let docs = if keys.is_empty() {
                        HashMap::new()
                    } else {
                        let store = self.store.clone();
                        let name = req.collection.clone();
                        blocking(move || Ok(store.docs(&name, &keys)?)).await?
                    };
                    // A document deleted since the search cannot be scored: it is not returned.
                    wanted.retain(|(_, k)| docs.contains_key(k));
                    let mut pairs: Vec<(String, String)> = positive_pairs
                        .iter()
                        .map(|(i, text)| (req.queries[*i].text.clone(), text.clone()))
                        .collect();
                    pairs.extend(wanted.iter().map(|(i, k)| (req.queries[*i].text.clone(), docs[k].encoded_text())));
                    let scores = rr.score(pairs).await?;
                    let (pos_scores, cand_scores) = scores.split_at(positive_pairs.len());
                    for (&(i, _), &p) in positive_pairs.iter().zip(pos_scores) {
                        let state = &mut states[i];
                        state.positive_ce = Some(state.positive_ce.map_or(p, |q| q.min(p)));
                    }
                    positive_pairs.clear();
                    for (&(i, key), &ce) in wanted.iter().zip(cand_scores) {
                        states[i].scores.insert(key, ce);
                    }
                    let mut widened = Vec::new();
                    for &i in &to_score {
                        let sel = selections[i].as_ref().expect("selected this round");
                        let passed = states[i].apply(sel, f).survivors.len();
                        // Score the next survivors when the filter left too few; a survivor
                        // that vanished before scoring must not loop forever.
                        let before = states[i].budget;
                        if params.adaptive_depth
                            && states[i].widen(sel, passed, params.num_negatives, f)
                            && states[i].budget > before
                        {
                            widened.push(i);
                        }
                    }
                    to_score = widened;
                }
                rerank_seconds += t.elapsed().as_secs_f64();
            }
            let mut next_pending = Vec::new();
            for (&i, returned) in pending.iter().zip(returned) {
                let sel = selections[i].as_ref().expect("selected this round");
                let have = match reranker {
                    // Nothing more may be scored: a deeper search cannot help.
                    Some((_, f)) if states[i].scores.len() >= f.max_scored => usize::MAX,
                    Some((_, f)) => states[i].apply(sel, f).survivors.len(),
                    None => sel.survivors.len(),
                };
                if let Some(next) =
                    plans[i].next(sel, have, returned, indexed, params.num_negatives, params.adaptive_depth, max_depth)
                {
                    plans[i] = next;
                    next_pending.push(i);
                }
            }
            pending = next_pending;
        }

        // Sample, then look up ids (and texts when asked).
        let t_sample = Instant::now();
        let seed = params.seed.unwrap_or_else(rand::random);
        let mut dropped: Vec<mine::DropCounts> = Vec::with_capacity(selections.len());
        let picked: Vec<Vec<mine::Survivor>> = selections
            .iter()
            .enumerate()
            .map(|(i, sel)| {
                let sel = sel.as_ref().expect("every query ends with a selection");
                let mut counts = sel.dropped;
                let reranked;
                let survivors = match reranker {
                    Some((_, f)) => {
                        reranked = states[i].apply(sel, f);
                        counts.ce_score = reranked.dropped_score;
                        counts.ce_margin = reranked.dropped_margin;
                        &reranked.survivors
                    }
                    None => &sel.survivors,
                };
                dropped.push(counts);
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                mine::sample(survivors, params.num_negatives, params.sampling, &mut rng)
            })
            .collect();
        let texts: HashMap<u64, StoredDoc> = if params.return_text {
            let keys: Vec<u64> = picked.iter().flatten().map(|s| s.key).collect();
            let store = self.store.clone();
            let name = req.collection.clone();
            blocking(move || Ok(store.docs(&name, &keys)?)).await?
        } else {
            HashMap::new()
        };
        let table = coll.docs.read();
        let results: Vec<pb::QueryResult> = req
            .queries
            .iter()
            .enumerate()
            .zip(picked)
            .zip(dropped)
            .zip(&plans)
            .zip(&contexts)
            .map(|(((((i, q), picked), d), plan), ctx)| pb::QueryResult {
                query_id: q.id.clone(),
                negatives: picked
                    .into_iter()
                    .filter_map(|s| {
                        let entry = table.by_key.get(&s.key)?;
                        Some(pb::Negative {
                            id: entry.id.to_string(),
                            text: texts.get(&s.key).map(|d| d.encoded_text()).unwrap_or_default(),
                            score: s.score,
                            rank: s.rank,
                            ce_score: s.ce,
                        })
                    })
                    .collect(),
                dropped: Some(pb::DropCounts {
                    positive: d.positive,
                    duplicate_text: d.duplicate_text,
                    batch_positive: d.batch_positive,
                    window: d.window,
                    score_bound: d.score_bound,
                    margin: d.margin,
                    ce_score: d.ce_score,
                    ce_margin: d.ce_margin,
                    positive_similarity: d.positive_similarity,
                }),
                depth: plan.window_end as u32,
                positive_score: ctx.positive_score,
                positive_ce_score: states.get(i).and_then(|s| s.positive_ce),
            })
            .collect();
        filter_seconds += t_sample.elapsed().as_secs_f64();
        record_mine(&results, encode_seconds, search_seconds, filter_seconds, rerank_seconds);
        Ok(pb::MineResponse {
            batch_id: req.batch_id,
            generation,
            results,
            timings: Some(pb::StageTimings {
                encode_seconds,
                search_seconds,
                filter_seconds,
                total_seconds: started.elapsed().as_secs_f64(),
                rerank_seconds,
            }),
        })
    }
}

/// Stage durations, queries and negatives served, and candidates dropped by reason.
fn record_mine(results: &[pb::QueryResult], encode: f64, search: f64, filter: f64, rerank: f64) {
    use crate::metrics::{DROPPED, NEGATIVES, QUERIES, stage};
    stage("encode", encode);
    stage("search", search);
    stage("filter", filter);
    if rerank > 0.0 {
        stage("rerank", rerank);
    }
    metrics::counter!(QUERIES).increment(results.len() as u64);
    metrics::counter!(NEGATIVES).increment(results.iter().map(|r| r.negatives.len() as u64).sum());
    let mut totals = [0u64; 9];
    for d in results.iter().filter_map(|r| r.dropped.as_ref()) {
        let counts = [d.positive, d.duplicate_text, d.batch_positive, d.window, d.score_bound, d.margin, d.positive_similarity, d.ce_score, d.ce_margin];
        for (t, c) in totals.iter_mut().zip(counts) {
            *t += c as u64;
        }
    }
    let reasons = ["positive", "duplicate_text", "batch_positive", "window", "score_bound", "margin", "positive_similarity", "ce_score", "ce_margin"];
    for (reason, n) in reasons.into_iter().zip(totals) {
        metrics::counter!(DROPPED, "reason" => reason).increment(n);
    }
}

/// Takes the collection's write lock, commits to the store, then updates the document table,
/// the manifest and the index. Returns (inserted, updated), or None when `generation` is no
/// longer current (the vectors belong to another space; nothing is written).
async fn commit_upsert(
    store: Arc<Store>,
    coll: Arc<Collection>,
    rows: Vec<(StoredDoc, Option<Vec<f32>>)>,
    generation: u64,
) -> Result<Option<(u64, u64)>> {
    let _w = coll.write.lock().await;
    let name = coll.live_name()?;
    let current = coll.current();
    if current.meta.number != generation {
        return Ok(None);
    }
    let (meta, written, rows) = blocking(move || {
        let (meta, written) = store.upsert(&name, &rows)?;
        Ok((meta, written, rows))
    })
    .await?;
    let mut items = Vec::with_capacity(rows.len());
    let mut replaced = Vec::new();
    let mut updated = 0;
    {
        let mut table = coll.docs.write();
        for ((doc, vector), w) in rows.into_iter().zip(&written) {
            table.insert(w.key, &doc);
            if let Some(old) = w.replaced {
                updated += 1;
                // An id repeated within this message replaces a key not yet in the index.
                if items.iter().all(|(k, _): &(u64, Vec<f32>)| *k != old) {
                    replaced.push(old);
                } else {
                    items.retain(|(k, _)| *k != old);
                }
            }
            match vector {
                Some(v) => items.push((w.key, v)),
                None => {
                    table.pending.insert(w.key);
                }
            }
        }
    }
    *coll.meta.write() = meta;
    current.index.add(items, replaced).await?;
    Ok(Some((written.len() as u64 - updated, updated)))
}

async fn commit_delete(store: Arc<Store>, coll: Arc<Collection>, ids: Vec<String>) -> Result<(u64, u64)> {
    let _w = coll.write.lock().await;
    let name = coll.live_name()?;
    let (meta, removed, missing) = blocking(move || Ok(store.delete(&name, &ids)?)).await?;
    {
        let mut table = coll.docs.write();
        for key in &removed {
            table.remove(*key);
        }
    }
    *coll.meta.write() = meta;
    let deleted = removed.len() as u64;
    coll.current().index.remove(removed).await?;
    Ok((deleted, missing.len() as u64))
}

/// Writes the index and its manifest into `collection_dir/gen-N.tmp`, fsyncs both, then
/// renames the directory to `gen-N` (replacing an older save of the same generation).
pub(crate) fn save_index(index: &VectorIndex, collection_dir: &Path, manifest: &IndexManifest) -> Result<()> {
    let io = |e: std::io::Error| Error::Internal(format!("saving index to {}: {e}", collection_dir.display()));
    let target = generation_dir(collection_dir, manifest.generation);
    let tmp = target.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io)?;
    index.save_blocking(&tmp.join("index.usearch"))?;
    std::fs::write(tmp.join("manifest.json"), serde_json::to_vec(manifest).expect("manifest serializes")).map_err(io)?;
    for file in ["index.usearch", "manifest.json"] {
        std::fs::File::open(tmp.join(file)).and_then(|f| f.sync_all()).map_err(io)?;
    }
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
    let _ = std::fs::remove_dir_all(&target);
    std::fs::rename(&tmp, &target).map_err(io)?;
    std::fs::File::open(collection_dir).and_then(|f| f.sync_all()).map_err(io)?;
    Ok(())
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
