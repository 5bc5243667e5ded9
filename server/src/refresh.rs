//! Index refresh: a collection moves to a new generation while it keeps answering from the
//! current one. Two ways in:
//!
//! - re-encode: the server loads a checkpoint from under `encoder.models_root`, encodes every
//!   document in the background (bounded chunks, written to the store as they go), builds the
//!   new index, catches up with writes made meanwhile, and swaps;
//! - trainer vectors: the trainer uploads a vector per document into a pending generation,
//!   then commits it; the commit is refused unless every live document has one.
//!
//! One refresh per collection at a time: a second gets ABORTED. The swap happens under the
//! collection's write lock after a single store commit, so requests see the old generation or
//! the new one, never a mix, and a crash leaves the old one current.
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::watch;

use crate::encode::Encoder;
use crate::engine::{Collection, Engine, Generation, IndexManifest, blocking, now_unix, save_index};
use crate::error::{Error, Result};
use crate::index::VectorIndex;
use crate::proto as pb;
use crate::store::{EncoderKind, EncoderRef, GenerationMeta, StoreError};

/// Documents encoded (and written) per step of a re-encode: small enough for fine-grained
/// progress and prompt cancellation, large enough to fill model batches.
const CHUNK: usize = 64;

/// A running re-encode: its progress and a way to stop it.
pub struct RefreshJob {
    progress: watch::Receiver<pb::RefreshProgress>,
    cancelled: Arc<AtomicBool>,
}

impl RefreshJob {
    pub fn progress(&self) -> pb::RefreshProgress {
        self.progress.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<pb::RefreshProgress> {
        self.progress.clone()
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }
}

fn busy(e: StoreError) -> Error {
    match e {
        StoreError::Busy(why) => Error::Aborted(why),
        e => Error::Store(e),
    }
}

/// Why the collection cannot start a refresh now, if it cannot.
fn check_idle(coll: &Collection) -> Result<()> {
    // One lock at a time: never the refresh slot and the manifest together.
    let running = coll.refresh.lock().as_ref().map(RefreshJob::progress);
    let (name, building) = {
        let meta = coll.meta.read();
        (meta.name.clone(), meta.building.clone())
    };
    if let Some(p) = running {
        return Err(Error::Aborted(format!(
            "a re-encode refresh of {name:?} to generation {} is running ({}, {}/{} documents): wait for it or cancel it (CancelRefresh)",
            p.generation, p.phase, p.done, p.total
        )));
    }
    if let Some(b) = building {
        return Err(Error::Aborted(format!(
            "generation {} of {name:?} is pending (trainer vectors for {:?}): commit it (CommitVectors) or cancel it (CancelRefresh)",
            b.number, b.encoder.name
        )));
    }
    Ok(())
}

impl Engine {
    /// Starts re-encoding `coll` with the checkpoint in `dir` (already resolved under the
    /// models root); the job runs in the background and reports on the returned channel.
    pub async fn start_reencode(self: &Arc<Self>, coll: &Arc<Collection>, dir: &Path) -> Result<watch::Receiver<pb::RefreshProgress>> {
        check_idle(coll)?;
        let this = self.clone();
        let d = dir.to_path_buf();
        let encoder = tokio::task::spawn_blocking(move || this.checkpoint_encoder(&d))
            .await
            .map_err(|e| Error::Internal(format!("loading the checkpoint: {e}")))?
            .map_err(|e| Error::invalid("encoder_dir", e.to_string()))?;
        let info = encoder.info().clone();
        let (name, number) = {
            let meta = coll.meta.read();
            (meta.name.clone(), meta.current.number + 1)
        };
        let generation = GenerationMeta {
            number,
            encoder: EncoderRef {
                kind: EncoderKind::Checkpoint,
                name: info.name.clone(),
                fingerprint: info.fingerprint.clone(),
                dir: Some(dir.display().to_string()),
            },
            dims: info.dims as u32,
            created_at_unix: now_unix(),
        };
        let (tx, rx) = watch::channel(pb::RefreshProgress {
            collection: name.clone(),
            generation: number,
            phase: "encoding".into(),
            total: coll.meta.read().doc_count,
            ..Default::default()
        });
        let cancelled = Arc::new(AtomicBool::new(false));
        {
            // Jobs start under the write lock, so no other can start between the check and
            // the store's record of the new generation.
            let _w = coll.write.lock().await;
            coll.live_name()?;
            check_idle(coll)?;
            if self.is_shutting_down() {
                return Err(Error::Unavailable("the server is shutting down: run the refresh once it is back".into()));
            }
            let store = self.store.clone();
            let (n, g) = (name.clone(), generation.clone());
            let meta = blocking(move || store.begin_generation(&n, &g).map_err(busy)).await?;
            *coll.meta.write() = meta;
            *coll.refresh.lock() = Some(RefreshJob { progress: rx.clone(), cancelled: cancelled.clone() });
            // Shutdown may have begun since the check: it then missed this job.
            if self.is_shutting_down() {
                cancelled.store(true, Ordering::Release);
            }
        }
        tracing::info!(collection = %name, generation = number, encoder = %info.name, "re-encode refresh started");
        let (this, coll) = (self.clone(), coll.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            // Its own task, so that even a panic ends in the cleanup below.
            let job = {
                let (this, coll, tx, cancelled) = (this.clone(), coll.clone(), tx.clone(), cancelled.clone());
                tokio::spawn(async move { this.reencode(&coll, generation, encoder, &tx, &cancelled, started).await })
            };
            let result = job.await.unwrap_or_else(|e| Err(Error::Internal(format!("refresh task: {e}"))));
            let mut last = tx.borrow().clone();
            last.elapsed_seconds = started.elapsed().as_secs_f64();
            match &result {
                Ok(()) => {
                    last.phase = "done".into();
                    tracing::info!(collection = %last.collection, generation = number, seconds = last.elapsed_seconds, "re-encode refresh done");
                }
                Err(e) => {
                    // Under the write lock, and only while the collection is the one this job
                    // started on: a dropped (and maybe re-created) collection is left alone.
                    let _w = coll.write.lock().await;
                    if coll.live_name().is_ok() {
                        let store = this.store.clone();
                        let name = last.collection.clone();
                        match blocking(move || Ok(store.abort_generation(&name)?)).await {
                            Ok(_) => coll.meta.write().building = None,
                            Err(abort) => tracing::error!(collection = %last.collection, error = %abort, "could not drop the unfinished generation"),
                        }
                    }
                    let shutdown = this.is_shutting_down();
                    last.phase = match e {
                        Error::Cancelled if shutdown => "interrupted",
                        Error::Cancelled => "cancelled",
                        _ => "failed",
                    }
                    .into();
                    if shutdown && matches!(e, Error::Cancelled) {
                        last.error = "stopped for shutdown".into();
                        tracing::info!(collection = %last.collection, generation = number, done = last.done, total = last.total, "re-encode refresh stopped at a safe point for shutdown; its half-built generation was dropped");
                    } else {
                        last.error = e.to_string();
                        tracing::warn!(collection = %last.collection, generation = number, error = %e, "re-encode refresh ended without a swap");
                    }
                }
            }
            let outcome = if result.is_ok() { "done" } else { last.phase.as_str() };
            metrics::counter!(crate::metrics::REFRESHES, "mode" => "reencode", "outcome" => outcome.to_string()).increment(1);
            metrics::histogram!(crate::metrics::REFRESH_DURATION, "mode" => "reencode").record(last.elapsed_seconds);
            metrics::gauge!(crate::metrics::REFRESH_PROGRESS, "collection" => last.collection.clone()).set(0.0);
            coll.refresh.lock().take();
            tx.send_replace(last);
        });
        Ok(rx)
    }

    async fn reencode(
        &self,
        coll: &Arc<Collection>,
        generation: GenerationMeta,
        encoder: Encoder,
        progress: &watch::Sender<pb::RefreshProgress>,
        cancelled: &AtomicBool,
        started: Instant,
    ) -> Result<()> {
        let name = coll.meta.read().name.clone();
        let number = generation.number;
        let keys: Vec<u64> = {
            let mut keys: Vec<u64> = coll.docs.read().by_key.keys().copied().collect();
            keys.sort_unstable();
            keys
        };
        let index = VectorIndex::new(generation.dims as usize, coll.metric, coll.quantization, &self.cfg.index)?;
        let mut done: HashSet<u64> = HashSet::with_capacity(keys.len());
        progress.send_modify(|p| p.total = keys.len() as u64);
        for chunk in keys.chunks(CHUNK) {
            if cancelled.load(Ordering::Acquire) {
                return Err(Error::Cancelled);
            }
            let written = self.encode_into(coll, number, chunk, &encoder, &index).await?;
            done.extend(written);
            let elapsed = started.elapsed().as_secs_f64();
            metrics::gauge!(crate::metrics::REFRESH_PROGRESS, "collection" => name.clone())
                .set(done.len() as f64 / keys.len().max(1) as f64);
            progress.send_modify(|p| {
                p.done = done.len() as u64;
                p.elapsed_seconds = elapsed;
                p.docs_per_second = done.len() as f64 / elapsed.max(1e-9);
            });
        }
        if cancelled.load(Ordering::Acquire) {
            return Err(Error::Cancelled);
        }
        progress.send_modify(|p| p.phase = "swapping".into());
        // Writers wait from here to the swap: documents written since the snapshot are
        // encoded too, deleted ones leave the new index.
        let _w = coll.write.lock().await;
        coll.live_name()?;
        let live: HashSet<u64> = coll.docs.read().by_key.keys().copied().collect();
        let mut added: Vec<u64> = live.difference(&done).copied().collect();
        added.sort_unstable();
        for chunk in added.chunks(CHUNK) {
            self.encode_into(coll, number, chunk, &encoder, &index).await?;
        }
        let gone: Vec<u64> = done.difference(&live).copied().collect();
        index.remove(gone).await?;
        if cancelled.load(Ordering::Acquire) {
            return Err(Error::Cancelled);
        }
        let (meta, index) = self.commit_generation(&name, number, index).await?;
        coll.swap(meta, Generation { meta: generation, index, encoder: Some(encoder), no_text: String::new() });
        self.remove_old_generations(&name, number);
        Ok(())
    }

    /// Encodes the documents of `keys` still in the store, writes their vectors into
    /// generation `number` and adds them to `index`; returns the keys written.
    async fn encode_into(&self, coll: &Collection, number: u64, keys: &[u64], encoder: &Encoder, index: &VectorIndex) -> Result<Vec<u64>> {
        let name = &coll.live_name()?;
        let store = self.store.clone();
        let (n, k) = (name.to_string(), keys.to_vec());
        let docs = blocking(move || Ok(store.docs(&n, &k)?)).await?;
        let mut keys: Vec<u64> = docs.keys().copied().collect();
        keys.sort_unstable();
        let texts: Vec<String> = keys.iter().map(|k| docs[k].encoded_text()).collect();
        let vectors = encoder.encode(texts).await?;
        let rows: Vec<(u64, Vec<f32>)> = keys.iter().copied().zip(vectors).collect();
        // A collection dropped while this chunk was encoding is not written to (its name may
        // belong to a new one by now).
        coll.live_name()?;
        let store = self.store.clone();
        let n = name.to_string();
        let rows = blocking(move || {
            store.put_vectors(&n, number, &rows).map_err(busy)?;
            Ok(rows)
        })
        .await?;
        index.add(rows, Vec::new()).await?;
        Ok(keys)
    }

    /// Commits generation `number` in the store and saves its index (call under the write
    /// lock); returns the new manifest and the index for the caller to swap in.
    async fn commit_generation(&self, name: &str, number: u64, index: VectorIndex) -> Result<(crate::store::CollectionMeta, VectorIndex)> {
        let store = self.store.clone();
        let n = name.to_string();
        let meta = blocking(move || store.commit_generation(&n, number).map_err(busy)).await?;
        let dir = self.index_dir.join(name);
        let index = Arc::new(index);
        let saved = index.clone();
        // A failed save costs only a rebuild at the next start.
        let manifest = IndexManifest::of(&meta);
        if let Err(e) = blocking(move || save_index(&saved, &dir, &manifest)).await {
            tracing::warn!(collection = %name, generation = number, error = %e, "could not save the new generation's index; it will be rebuilt at start");
        }
        let index = Arc::try_unwrap(index).map_err(|_| Error::Internal("the index is still shared after its save".into()))?;
        Ok((meta, index))
    }

    /// Removes saved indexes of generations before `current`. In-memory generations go
    /// when the last request holding them ends.
    fn remove_old_generations(&self, name: &str, current: u64) {
        let dir = self.index_dir.join(name);
        let keep = crate::engine::generation_dir(&dir, current);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.path() != keep && !entry.path().extension().is_some_and(|e| e == "tmp") {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    /// Stores trainer vectors for documents (by id) in the collection's pending generation,
    /// starting one named `encoder_name` when none is pending. Returns (written, pending
    /// generation, live documents still without a vector there).
    pub async fn upload_vectors(&self, coll: &Arc<Collection>, encoder_name: &str, vectors: Vec<(String, Vec<f32>)>) -> Result<(u64, u64, u64)> {
        let dims = vectors.first().map(|(_, v)| v.len()).unwrap_or(0);
        let _w = coll.write.lock().await;
        let name = coll.live_name()?;
        let running = coll.refresh.lock().as_ref().map(RefreshJob::progress);
        if let Some(p) = running {
            return Err(Error::Aborted(format!(
                "a re-encode refresh of {name:?} to generation {} is running: wait for it or cancel it (CancelRefresh)",
                p.generation
            )));
        }
        let building = coll.meta.read().building.clone();
        let generation = match building {
            Some(b) if b.encoder.kind == EncoderKind::Trainer && b.encoder.name == encoder_name => {
                if dims != 0 && dims != b.dims as usize {
                    return Err(Error::invalid(
                        "vectors[0].vector",
                        format!("has {dims} dims, pending generation {} has {}", b.number, b.dims),
                    ));
                }
                b
            }
            Some(b) => {
                return Err(Error::Aborted(format!(
                    "generation {} of {name:?} is pending for encoder {:?}: commit or cancel it before uploading for {encoder_name:?}",
                    b.number, b.encoder.name
                )));
            }
            None => {
                if dims == 0 {
                    return Ok((0, 0, coll.meta.read().doc_count));
                }
                let g = GenerationMeta {
                    number: coll.meta.read().current.number + 1,
                    encoder: EncoderRef { kind: EncoderKind::Trainer, name: encoder_name.to_string(), fingerprint: String::new(), dir: None },
                    dims: dims as u32,
                    created_at_unix: now_unix(),
                };
                let store = self.store.clone();
                let (n, gm) = (name.clone(), g.clone());
                let meta = blocking(move || store.begin_generation(&n, &gm).map_err(busy)).await?;
                *coll.meta.write() = meta;
                tracing::info!(collection = %name, generation = g.number, encoder = %encoder_name, "trainer vector upload started");
                g
            }
        };
        let (rows, unknown): (Vec<(u64, Vec<f32>)>, Vec<String>) = {
            let table = coll.docs.read();
            let mut rows = Vec::with_capacity(vectors.len());
            let mut unknown = Vec::new();
            for (id, v) in vectors {
                match table.by_id.get(id.as_str()) {
                    Some(&key) => rows.push((key, v)),
                    None => unknown.push(id),
                }
            }
            (rows, unknown)
        };
        if !unknown.is_empty() {
            return Err(Error::invalid(
                "vectors[].id",
                format!("{} ids are not documents of {name:?} (e.g. {:?}); nothing from this message was stored", unknown.len(), &unknown[..unknown.len().min(3)]),
            ));
        }
        let store = self.store.clone();
        let number = generation.number;
        let n = name.clone();
        let (written, stored) = blocking(move || {
            let written = store.put_vectors(&n, number, &rows).map_err(busy)?;
            let stored = store.count_vectors(&n, number)?;
            Ok((written, stored))
        })
        .await?;
        let live = coll.meta.read().doc_count;
        Ok((written as u64, number, live.saturating_sub(stored)))
    }

    /// Makes the pending trainer generation current, when every live document has a vector
    /// in it; otherwise FAILED_PRECONDITION naming what is missing, and nothing changes.
    pub async fn commit_vectors(&self, coll: &Arc<Collection>) -> Result<u64> {
        let started = Instant::now();
        let _w = coll.write.lock().await;
        let name = coll.live_name()?;
        let Some(generation) = coll.meta.read().building.clone().filter(|b| b.encoder.kind == EncoderKind::Trainer) else {
            return Err(Error::FailedPrecondition(format!("collection {name:?} has no pending trainer vectors: upload them first (UploadVectors)")));
        };
        let store = self.store.clone();
        let (n, number) = (name.clone(), generation.number);
        let vectors = blocking(move || Ok(store.scan_vectors(&n, number)?)).await?;
        let missing: Vec<String> = {
            let table = coll.docs.read();
            let have: HashSet<u64> = vectors.iter().map(|(k, _)| *k).collect();
            let mut missing: Vec<String> = table.by_key.iter().filter(|(k, _)| !have.contains(k)).map(|(_, d)| d.id.to_string()).collect();
            missing.sort();
            missing
        };
        if !missing.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "pending generation {number} of {name:?} lacks vectors for {} live documents (e.g. {:?}); upload them, then commit again",
                missing.len(),
                &missing[..missing.len().min(5)]
            )));
        }
        let index = VectorIndex::new(generation.dims as usize, coll.metric, coll.quantization, &self.cfg.index)?;
        let index = Arc::new(index);
        let building = index.clone();
        blocking(move || Ok(building.add_blocking(&vectors)?)).await?;
        let index = Arc::try_unwrap(index).unwrap_or_else(|_| unreachable!("the build task has returned its handle"));
        let (meta, index) = self.commit_generation(&name, number, index).await?;
        let no_text = format!(
            "collection {name:?} generation {number} holds vectors from the trainer's encoder {:?}: the server cannot encode text for it; send query vectors (and upload vectors for new documents)",
            generation.encoder.name
        );
        coll.swap(meta, Generation { meta: generation, index, encoder: None, no_text });
        self.remove_old_generations(&name, number);
        tracing::info!(collection = %name, generation = number, "trainer vectors committed");
        metrics::counter!(crate::metrics::REFRESHES, "mode" => "vectors", "outcome" => "done").increment(1);
        metrics::histogram!(crate::metrics::REFRESH_DURATION, "mode" => "vectors").record(started.elapsed().as_secs_f64());
        Ok(number)
    }

    /// Cancels the running re-encode or discards the pending trainer vectors; says which.
    pub async fn cancel_refresh(&self, coll: &Arc<Collection>) -> Result<Option<String>> {
        let running = coll.refresh.lock().as_ref().map(|job| {
            job.cancel();
            job.progress()
        });
        if let Some(p) = running {
            return Ok(Some(format!(
                "cancel requested for the re-encode to generation {} (one already swapping completes; its stream says which)",
                p.generation
            )));
        }
        let _w = coll.write.lock().await;
        let name = coll.live_name()?;
        let store = self.store.clone();
        let n = name.clone();
        let aborted = blocking(move || Ok(store.abort_generation(&n)?)).await?;
        coll.meta.write().building = None;
        Ok(aborted.map(|g| format!("pending generation {} ({:?}) discarded", g.number, g.encoder.name)))
    }
}
