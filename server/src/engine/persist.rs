//! Saved indexes: each collection's current generation is saved (at shutdown, after a refresh,
//! and in the background every `index.save_interval_seconds` once written to) with a manifest
//! naming the store version and vector space it reflects. At start a saved index of the
//! current generation is loaded and brought up to date with the writes made after it: the
//! keys removed since its version come out, the vectors of keys issued since its `next_key`
//! go in. Keys are never reused, so that is all that can have changed. Without a usable save,
//! the index is rebuilt from the stored vectors, a chunk at a time.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Engine, blocking};
use crate::error::{Error, Result};
use crate::index::{Metric, Quantization, VectorIndex};
use crate::store::CollectionMeta;

/// The saved-index manifest: which store version and vector space the file reflects.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(super) struct IndexManifest {
    version: u64,
    generation: u64,
    dims: u32,
    metric: String,
    quantization: String,
    encoder_name: String,
    encoder_fingerprint: String,
    doc_count: u64,
    created_at_unix: u64,
    /// The store's next key at the save: every key issued since is newer.
    #[serde(default)]
    next_key: u64,
}

impl IndexManifest {
    /// The manifest an index of the current generation saved now would carry.
    pub(super) fn of(meta: &CollectionMeta) -> Self {
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
            next_key: meta.next_key,
        }
    }

    /// Whether an index saved with this manifest holds the vector space `now` describes, at
    /// or before its store version, so that replaying the writes since brings it up to date.
    /// A manifest written before `next_key` was recorded (0) only matches exactly.
    fn replays_to(&self, now: &IndexManifest) -> bool {
        let same_space = self.generation == now.generation
            && self.dims == now.dims
            && self.metric == now.metric
            && self.quantization == now.quantization
            && self.encoder_name == now.encoder_name
            && self.encoder_fingerprint == now.encoder_fingerprint
            && self.created_at_unix == now.created_at_unix;
        let exact = self.version == now.version && self.doc_count == now.doc_count;
        same_space && (exact || (self.next_key > 0 && self.version < now.version && self.next_key <= now.next_key))
    }
}

/// Vectors added to an index per step of a rebuild or replay (bounds the memory it takes).
const REBUILD_CHUNK: usize = 16384;

/// The directory of generation `number`'s saved index.
fn generation_dir(collection_dir: &Path, number: u64) -> PathBuf {
    collection_dir.join(format!("gen-{number}"))
}

/// Writes the index and its manifest into `collection_dir/gen-N.tmp`, fsyncs both, then
/// renames the directory to `gen-N` (replacing an older save of the same generation).
pub(super) fn save_index(index: &VectorIndex, collection_dir: &Path, manifest: &IndexManifest) -> Result<()> {
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

impl Engine {
    /// Saves the current index of every collection written to since its last save.
    pub async fn save_indexes(&self) -> Result<()> {
        let colls: Vec<Arc<super::Collection>> = self.collections.read().values().cloned().collect();
        for coll in colls {
            self.save_collection_index(&coll).await?;
        }
        Ok(())
    }

    /// Saves the collection's current index when the store has moved on since its last save
    /// (holding its writers off meanwhile), then forgets the removals the save reflects.
    async fn save_collection_index(&self, coll: &super::Collection) -> Result<()> {
        if coll.meta.read().version == coll.saved_version() {
            return Ok(());
        }
        let _w = coll.write.lock().await;
        if coll.is_dropped() {
            return Ok(());
        }
        let meta = coll.meta.read().clone();
        let dir = self.index_dir.join(&meta.name);
        let generation = coll.current();
        let started = std::time::Instant::now();
        let (name, version) = (meta.name.clone(), meta.version);
        blocking(move || save_index(&generation.index, &dir, &IndexManifest::of(&meta))).await?;
        coll.set_saved_version(version);
        let store = self.store.clone();
        let n = name.clone();
        blocking(move || Ok(store.prune_removed(&n, version)?)).await?;
        tracing::info!(collection = %name, version, seconds = started.elapsed().as_secs_f64(), "index saved");
        Ok(())
    }

    /// Every `index.save_interval_seconds`, saves the indexes written to since their last
    /// save, until shutdown begins. A failed save is logged and tried again next time.
    pub async fn save_periodically(self: Arc<Self>) {
        let seconds = self.cfg.index.save_interval_seconds;
        if seconds <= 0.0 {
            return;
        }
        let mut shutdown = self.shutdown_watch();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs_f64(seconds));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let colls: Vec<Arc<super::Collection>> = self.collections.read().values().cloned().collect();
            for coll in colls {
                if self.is_shutting_down() {
                    return;
                }
                if let Err(e) = self.save_collection_index(&coll).await {
                    tracing::warn!(collection = %coll.name(), error = %e, "background index save failed; the next one tries again");
                }
            }
        }
    }

    /// Saves a new generation's index (a failed save costs only a rebuild at the next
    /// start); with whether it was saved.
    pub(super) async fn save_new_generation(&self, meta: &CollectionMeta, index: VectorIndex) -> Result<(VectorIndex, bool)> {
        let dir = self.index_dir.join(&meta.name);
        let index = Arc::new(index);
        let saved = index.clone();
        let manifest = IndexManifest::of(meta);
        let ok = match blocking(move || save_index(&saved, &dir, &manifest)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(collection = %meta.name, generation = meta.current.number, error = %e, "could not save the new generation's index; it will be rebuilt at start");
                false
            }
        };
        let index = Arc::try_unwrap(index).map_err(|_| Error::Internal("the index is still shared after its save".into()))?;
        Ok((index, ok))
    }

    /// Removes saved indexes of generations before `current`. In-memory generations go
    /// when the last request holding them ends.
    pub(super) fn remove_old_generations(&self, name: &str, current: u64) {
        let dir = self.index_dir.join(name);
        let keep = generation_dir(&dir, current);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.path() != keep && !entry.path().extension().is_some_and(|e| e == "tmp") {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    /// The current generation's index: its saved file brought up to date with the store when
    /// there is a usable one (see the module doc), else rebuilt from the stored vectors; with
    /// the store version it was last saved at (0: not saved).
    pub(super) fn load_index(&self, meta: &CollectionMeta, metric: Metric, quantization: Quantization) -> anyhow::Result<(VectorIndex, u64)> {
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
        let expected = IndexManifest::of(meta);
        let saved: Option<IndexManifest> = std::fs::read(gen_dir.join("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let dims = meta.current.dims as usize;
        let (name, number) = (meta.name.as_str(), meta.current.number);
        let add = |index: &VectorIndex, from_key: u64| -> anyhow::Result<usize> {
            let mut added = 0;
            self.store.for_each_vector_chunk(name, number, from_key, REBUILD_CHUNK, |chunk| -> anyhow::Result<()> {
                added += chunk.len();
                Ok(index.add_blocking(&chunk)?)
            })?;
            Ok(added)
        };
        match saved {
            Some(m) if m.replays_to(&expected) => {
                let index = VectorIndex::load(&gen_dir.join("index.usearch"), dims, metric, quantization, &self.cfg.index)?;
                if m.version == expected.version {
                    tracing::info!(collection = %name, generation = number, vectors = index.len(), "index loaded from its saved file");
                    return Ok((index, m.version));
                }
                let removed = self.store.removed_since(name, m.version)?;
                index.remove_blocking(&removed)?;
                let added = add(&index, m.next_key)?;
                tracing::info!(
                    collection = %name, generation = number, vectors = index.len(), saved_version = m.version, version = expected.version,
                    removed = removed.len(), added, "index loaded from its saved file and brought up to date with the later writes"
                );
                Ok((index, m.version))
            }
            other => {
                if let Some(m) = other {
                    tracing::warn!(collection = %name, saved = ?m, expected = ?expected, "saved index refused: its manifest does not match the store; rebuilding from the stored vectors");
                }
                let index = VectorIndex::new(dims, metric, quantization, &self.cfg.index)?;
                let added = add(&index, 0)?;
                tracing::info!(collection = %name, generation = number, vectors = added, "index rebuilt from the store");
                Ok((index, 0))
            }
        }
    }
}
