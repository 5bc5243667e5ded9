//! Refresh with the trainer's vectors: the trainer uploads a vector per document into a
//! pending generation, then commits it; the commit is refused unless every live document has
//! one. Also cancelling either kind of refresh.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::collection::{Collection, Generation};
use super::progress::RefreshJob;
use super::recovery::trainer_no_text;
use super::refresh::busy;
use super::{Engine, blocking, now_unix};
use crate::error::{Error, Result};
use crate::index::VectorIndex;
use crate::store::{EncoderKind, EncoderRef, GenerationMeta};

impl Engine {
    /// Stores trainer vectors for documents (by id) in the collection's pending generation,
    /// starting one named `encoder_name` when none is pending. Returns (written, pending
    /// generation, live documents still without a vector there).
    pub async fn upload_vectors(&self, coll: &Arc<Collection>, encoder_name: &str, vectors: Vec<(String, Vec<f32>)>) -> Result<(u64, u64, u64)> {
        let dims = vectors.first().map(|(_, v)| v.len()).unwrap_or(0);
        let _w = coll.write.lock().await;
        let name = coll.live_name()?;
        let Some(generation) = self.pending_generation(coll, &name, encoder_name, dims).await? else {
            return Ok((0, 0, coll.meta.read().doc_count));
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
        let (written, stored) = blocking(move || {
            let written = store.put_vectors(&name, number, &rows).map_err(busy)?;
            let stored = store.count_vectors(&name, number)?;
            Ok((written, stored))
        })
        .await?;
        let live = coll.meta.read().doc_count;
        Ok((written as u64, number, live.saturating_sub(stored)))
    }

    /// The pending trainer generation for `encoder_name`, started when none is pending (call
    /// under the write lock); None when there is none and nothing to start it with.
    async fn pending_generation(&self, coll: &Collection, name: &str, encoder_name: &str, dims: usize) -> Result<Option<GenerationMeta>> {
        let running = coll.refresh.lock().as_ref().map(RefreshJob::progress);
        if let Some(p) = running {
            return Err(Error::Aborted(format!(
                "a re-encode refresh of {name:?} to generation {} is running: wait for it or cancel it (CancelRefresh)",
                p.generation
            )));
        }
        let building = coll.meta.read().building.clone();
        match building {
            Some(b) if b.encoder.kind == EncoderKind::Trainer && b.encoder.name == encoder_name => {
                if dims != 0 && dims != b.dims as usize {
                    return Err(Error::invalid(
                        "vectors[0].vector",
                        format!("has {dims} dims, pending generation {} has {}", b.number, b.dims),
                    ));
                }
                Ok(Some(b))
            }
            Some(b) => Err(Error::Aborted(format!(
                "generation {} of {name:?} is pending for encoder {:?}: commit or cancel it before uploading for {encoder_name:?}",
                b.number, b.encoder.name
            ))),
            None if dims == 0 => Ok(None),
            None => {
                let g = GenerationMeta {
                    number: coll.meta.read().current.number + 1,
                    encoder: EncoderRef {
                        kind: EncoderKind::Trainer,
                        name: encoder_name.to_string(),
                        fingerprint: String::new(),
                        dir: None,
                        prompts: Default::default(),
                    },
                    dims: dims as u32,
                    created_at_unix: now_unix(),
                };
                let store = self.store.clone();
                let (n, gm) = (name.to_string(), g.clone());
                let meta = blocking(move || store.begin_generation(&n, &gm).map_err(busy)).await?;
                *coll.meta.write() = meta;
                tracing::info!(collection = %name, generation = g.number, encoder = %encoder_name, "trainer vector upload started");
                Ok(Some(g))
            }
        }
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
        let keys = blocking(move || Ok(store.vector_keys(&n, number)?)).await?;
        let missing: Vec<String> = {
            let table = coll.docs.read();
            let have: HashSet<u64> = keys.into_iter().collect();
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
        let (building, store, n) = (index.clone(), self.store.clone(), name.clone());
        blocking(move || {
            store.for_each_vector_chunk(&n, number, 0, 16384, |chunk| -> Result<()> { Ok(building.add_blocking(&chunk)?) })
        })
        .await?;
        let index = Arc::try_unwrap(index).unwrap_or_else(|_| unreachable!("the build task has returned its handle"));
        let (meta, index, saved) = self.commit_generation(&name, number, index).await?;
        let no_text = trainer_no_text(&name, &generation);
        coll.swap(meta, Generation { meta: generation, index, encoder: None, no_text, prompts: Default::default() }, saved);
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
        let aborted = blocking(move || Ok(store.abort_generation(&name)?)).await?;
        coll.meta.write().building = None;
        Ok(aborted.map(|g| format!("pending generation {} ({:?}) discarded", g.number, g.encoder.name)))
    }
}
