//! Re-encode refresh: a collection moves to a new generation while it keeps answering from
//! the current one. The server loads a checkpoint from under `encoder.models_root`, encodes
//! every document in the background (bounded chunks, written to the store as they go), builds
//! the new index, catches up with writes made meanwhile, and swaps (the trainer-vectors way in
//! is in `vectors`).
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

use super::collection::{Collection, Generation, prompts_in_force, recorded};
use super::progress::{RefreshJob, RefreshPhase, RefreshProgress};
use super::{Engine, blocking, now_unix};
use crate::encode::{Encoder, Prompts, TextKind};
use crate::error::{Error, Result};
use crate::index::VectorIndex;
use crate::store::{CollectionMeta, EncoderKind, EncoderRef, GenerationMeta, StoreError};

/// Documents encoded (and written) per step of a re-encode: small enough for fine-grained
/// progress and prompt cancellation, large enough to fill model batches.
const CHUNK: usize = 64;

/// A store refusal because of an operation in progress is ABORTED, like the engine's own.
pub(super) fn busy(e: StoreError) -> Error {
    match e {
        StoreError::Busy(why) => Error::Aborted(why),
        e => Error::Store(e),
    }
}

/// Why the collection cannot start a refresh now, if it cannot.
pub(super) fn check_idle(coll: &Collection) -> Result<()> {
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

/// What one re-encode job works with.
struct Job {
    coll: Arc<Collection>,
    generation: GenerationMeta,
    encoder: Encoder,
    /// The prompts the new generation is encoded with.
    prompts: Prompts,
    progress: watch::Sender<RefreshProgress>,
    cancelled: Arc<AtomicBool>,
    started: Instant,
}

impl Engine {
    /// Starts re-encoding `coll` with the checkpoint in `dir` (already resolved under the
    /// models root); the job runs in the background and reports on the returned channel.
    pub async fn start_reencode(self: &Arc<Self>, coll: &Arc<Collection>, dir: &Path) -> Result<watch::Receiver<RefreshProgress>> {
        check_idle(coll)?;
        let this = self.clone();
        let d = dir.to_path_buf();
        let encoder = tokio::task::spawn_blocking(move || this.checkpoint_encoder(&d))
            .await
            .map_err(|e| Error::Internal(format!("loading the checkpoint: {e}")))?
            .map_err(|e| Error::invalid("encoder_dir", e.to_string()))?;
        let info = encoder.info().clone();
        let (name, number, total, prompts) = {
            let meta = coll.meta.read();
            (meta.name.clone(), meta.current.number + 1, meta.doc_count, prompts_in_force(&meta.prompts, &info))
        };
        let generation = GenerationMeta {
            number,
            encoder: EncoderRef {
                kind: EncoderKind::Checkpoint,
                name: info.name.clone(),
                fingerprint: info.fingerprint_for(&prompts),
                dir: Some(dir.display().to_string()),
                prompts: recorded(&prompts),
            },
            dims: info.dims as u32,
            created_at_unix: now_unix(),
        };
        let (tx, rx) = watch::channel(RefreshProgress::start(name.clone(), number, total));
        let cancelled = Arc::new(AtomicBool::new(false));
        self.begin_job(coll, &generation, RefreshJob::new(rx.clone(), cancelled.clone()), &cancelled).await?;
        tracing::info!(collection = %name, generation = number, encoder = %info.name, "re-encode refresh started");
        let job = Job { coll: coll.clone(), generation, encoder, prompts, progress: tx, cancelled, started: Instant::now() };
        let this = self.clone();
        tokio::spawn(async move { this.run_job(job).await });
        Ok(rx)
    }

    /// Records the new generation in the store and the job in the collection. Jobs start under
    /// the write lock, so no other can start between the check and the store's record.
    async fn begin_job(&self, coll: &Collection, generation: &GenerationMeta, job: RefreshJob, cancelled: &AtomicBool) -> Result<()> {
        let _w = coll.write.lock().await;
        let name = coll.live_name()?;
        check_idle(coll)?;
        if self.is_shutting_down() {
            return Err(Error::Unavailable("the server is shutting down: run the refresh once it is back".into()));
        }
        let store = self.store.clone();
        let g = generation.clone();
        let meta = blocking(move || store.begin_generation(&name, &g).map_err(busy)).await?;
        *coll.meta.write() = meta;
        *coll.refresh.lock() = Some(job);
        // Shutdown may have begun since the check: it then missed this job.
        if self.is_shutting_down() {
            cancelled.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Runs the job to its end and reports how it ended; the unfinished generation of a job
    /// that did not swap is dropped.
    async fn run_job(self: Arc<Self>, job: Job) {
        let (coll, tx, started, number) = (job.coll.clone(), job.progress.clone(), job.started, job.generation.number);
        // Its own task, so that even a panic ends in the cleanup below.
        let this = self.clone();
        let result = tokio::spawn(async move { this.reencode(&job).await })
            .await
            .unwrap_or_else(|e| Err(Error::Internal(format!("refresh task: {e}"))));
        let mut last = tx.borrow().clone();
        last.elapsed_seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                last.phase = RefreshPhase::Done;
                tracing::info!(collection = %last.collection, generation = number, seconds = last.elapsed_seconds, "re-encode refresh done");
            }
            Err(e) => {
                self.abort_job(&coll, &last.collection).await;
                self.record_failure(&mut last, e);
            }
        }
        metrics::counter!(crate::metrics::REFRESHES, "mode" => "reencode", "outcome" => last.phase.as_str().to_string()).increment(1);
        metrics::histogram!(crate::metrics::REFRESH_DURATION, "mode" => "reencode").record(last.elapsed_seconds);
        metrics::gauge!(crate::metrics::REFRESH_PROGRESS, "collection" => last.collection.clone()).set(0.0);
        coll.refresh.lock().take();
        tx.send_replace(last);
    }

    /// Drops the unfinished generation, under the write lock, and only while the collection
    /// is the one the job started on: a dropped (and maybe re-created) one is left alone.
    async fn abort_job(&self, coll: &Collection, name: &str) {
        let _w = coll.write.lock().await;
        if coll.live_name().is_ok() {
            let store = self.store.clone();
            let n = name.to_string();
            match blocking(move || Ok(store.abort_generation(&n)?)).await {
                Ok(_) => coll.meta.write().building = None,
                Err(abort) => tracing::error!(collection = %name, error = %abort, "could not drop the unfinished generation"),
            }
        }
    }

    /// How a job that ended without a swap reports: cancelled, interrupted by shutdown, or
    /// failed with its error.
    fn record_failure(&self, last: &mut RefreshProgress, e: Error) {
        let shutdown = self.is_shutting_down();
        let number = last.generation;
        last.phase = match e {
            Error::Cancelled if shutdown => RefreshPhase::Interrupted,
            Error::Cancelled => RefreshPhase::Cancelled,
            _ => RefreshPhase::Failed,
        };
        if shutdown && matches!(e, Error::Cancelled) {
            last.error = "stopped for shutdown".into();
            tracing::info!(collection = %last.collection, generation = number, done = last.done, total = last.total, "re-encode refresh stopped at a safe point for shutdown; its half-built generation was dropped");
        } else {
            last.error = e.to_string();
            tracing::warn!(collection = %last.collection, generation = number, error = %e, "re-encode refresh ended without a swap");
        }
        if last.phase == RefreshPhase::Failed {
            last.failure = Some(Arc::new(e));
        }
    }

    /// Encodes every document into the new generation, catches up with the writes made
    /// meanwhile under the write lock, and swaps.
    async fn reencode(&self, job: &Job) -> Result<()> {
        let coll = &job.coll;
        let name = coll.name();
        let number = job.generation.number;
        let keys: Vec<u64> = {
            let mut keys: Vec<u64> = coll.docs.read().by_key.keys().copied().collect();
            keys.sort_unstable();
            keys
        };
        let index = VectorIndex::new(job.generation.dims as usize, coll.metric, coll.quantization, &self.cfg.index)?;
        let mut done: HashSet<u64> = HashSet::with_capacity(keys.len());
        job.progress.send_modify(|p| p.total = keys.len() as u64);
        for chunk in keys.chunks(CHUNK) {
            if job.cancelled.load(Ordering::Acquire) {
                return Err(Error::Cancelled);
            }
            done.extend(self.encode_into(coll, number, chunk, job, &index).await?);
            let elapsed = job.started.elapsed().as_secs_f64();
            metrics::gauge!(crate::metrics::REFRESH_PROGRESS, "collection" => name.clone())
                .set(done.len() as f64 / keys.len().max(1) as f64);
            job.progress.send_modify(|p| {
                p.done = done.len() as u64;
                p.elapsed_seconds = elapsed;
                p.docs_per_second = done.len() as f64 / elapsed.max(1e-9);
            });
        }
        if job.cancelled.load(Ordering::Acquire) {
            return Err(Error::Cancelled);
        }
        job.progress.send_modify(|p| p.phase = RefreshPhase::Swapping);
        // Writers wait from here to the swap: documents written since the snapshot are
        // encoded too, deleted ones leave the new index.
        let _w = coll.write.lock().await;
        coll.live_name()?;
        let live: HashSet<u64> = coll.docs.read().by_key.keys().copied().collect();
        let mut added: Vec<u64> = live.difference(&done).copied().collect();
        added.sort_unstable();
        for chunk in added.chunks(CHUNK) {
            self.encode_into(coll, number, chunk, job, &index).await?;
        }
        let gone: Vec<u64> = done.difference(&live).copied().collect();
        index.remove(gone).await?;
        if job.cancelled.load(Ordering::Acquire) {
            return Err(Error::Cancelled);
        }
        let (meta, index, saved) = self.commit_generation(&name, number, index).await?;
        let generation = Generation {
            meta: job.generation.clone(),
            index,
            encoder: Some(job.encoder.clone()),
            no_text: String::new(),
            prompts: job.prompts.clone(),
        };
        coll.swap(meta, generation, saved);
        self.remove_old_generations(&name, number);
        Ok(())
    }

    /// Encodes the documents of `keys` still in the store, writes their vectors into
    /// generation `number` and adds them to `index`; returns the keys written.
    async fn encode_into(&self, coll: &Collection, number: u64, keys: &[u64], job: &Job, index: &VectorIndex) -> Result<Vec<u64>> {
        let name = &coll.live_name()?;
        let store = self.store.clone();
        let (n, k) = (name.to_string(), keys.to_vec());
        let docs = blocking(move || Ok(store.docs(&n, &k)?)).await?;
        let mut keys: Vec<u64> = docs.keys().copied().collect();
        keys.sort_unstable();
        let texts: Vec<(TextKind, String)> = keys.iter().map(|k| (TextKind::Document, docs[k].encoded_text())).collect();
        let vectors = job.encoder.encode_as(texts, &job.prompts).await?;
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
    /// lock); returns the new manifest and the index for the caller to swap in, with whether
    /// the index was saved.
    pub(super) async fn commit_generation(&self, name: &str, number: u64, index: VectorIndex) -> Result<(CollectionMeta, VectorIndex, bool)> {
        let store = self.store.clone();
        let n = name.to_string();
        let meta = blocking(move || store.commit_generation(&n, number).map_err(busy)).await?;
        let (index, saved) = self.save_new_generation(&meta, index).await?;
        Ok((meta, index, saved))
    }
}
