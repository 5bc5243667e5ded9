//! Saved indexes: each collection's current generation is saved with a manifest naming the
//! store version and vector space it reflects; at start a saved index is loaded only when its
//! manifest matches the store, otherwise the index is rebuilt from the stored vectors.
use std::collections::HashSet;
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
        }
    }
}

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
    /// Saves every collection's current index with its manifest.
    pub async fn save_indexes(&self) -> Result<()> {
        let colls: Vec<Arc<super::Collection>> = self.collections.read().values().cloned().collect();
        for coll in colls {
            let _w = coll.write.lock().await;
            if coll.is_dropped() {
                continue;
            }
            let meta = coll.meta.read().clone();
            let dir = self.index_dir.join(&meta.name);
            let generation = coll.current();
            blocking(move || save_index(&generation.index, &dir, &IndexManifest::of(&meta))).await?;
        }
        Ok(())
    }

    /// Saves a new generation's index (a failed save costs only a rebuild at the next start).
    pub(super) async fn save_new_generation(&self, meta: &CollectionMeta, index: VectorIndex) -> Result<VectorIndex> {
        let dir = self.index_dir.join(&meta.name);
        let index = Arc::new(index);
        let saved = index.clone();
        let manifest = IndexManifest::of(meta);
        if let Err(e) = blocking(move || save_index(&saved, &dir, &manifest)).await {
            tracing::warn!(collection = %meta.name, generation = meta.current.number, error = %e, "could not save the new generation's index; it will be rebuilt at start");
        }
        Arc::try_unwrap(index).map_err(|_| Error::Internal("the index is still shared after its save".into()))
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

    /// The current generation's index, loaded from its saved file when the manifest matches
    /// the store, else rebuilt from the stored vectors; with the keys that have a vector.
    pub(super) fn load_index(&self, meta: &CollectionMeta, metric: Metric, quantization: Quantization) -> anyhow::Result<(VectorIndex, HashSet<u64>)> {
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
        Ok((index, vectors.iter().map(|(k, _)| *k).collect()))
    }
}
