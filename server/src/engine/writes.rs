//! Writes: upserts and deletes. Each commits to the store first (durable once it returns),
//! then updates the document table, the manifest and the index, under the collection's write
//! lock and in its own task, so a caller that goes away mid-write cannot leave them apart.
use std::sync::Arc;

use super::collection::{Collection, Generation};
use super::{Engine, blocking};
use crate::encode::TextKind;
use crate::error::{Error, Result};
use crate::index::Metric;
use crate::store::{EncoderKind, Store, StoredDoc};

/// A document to write, with the vector it carries (if any).
pub type NewDoc = (StoredDoc, Option<Vec<f32>>);

impl Engine {
    /// Upserts documents that carry no vector (see [`Engine::upsert_docs`]).
    pub async fn upsert(&self, coll: &Arc<Collection>, docs: Vec<StoredDoc>) -> Result<(u64, u64)> {
        self.upsert_docs(coll, docs.into_iter().map(|d| (d, None)).collect()).await
    }

    /// Stores durably, then indexes one message's documents; returns (inserted, updated).
    /// Their vectors come from one source, the current generation's: the server's encoder
    /// (documents carry none), or the trainer's (each document carries its own; one that
    /// carries none waits for the next vector refresh, unless the collection is vectors-only,
    /// which refuses it). When a generation swap lands between encoding and commit, the
    /// documents are checked and encoded again for the new one.
    pub async fn upsert_docs(&self, coll: &Arc<Collection>, docs: Vec<NewDoc>) -> Result<(u64, u64)> {
        if docs.is_empty() {
            return Ok((0, 0));
        }
        loop {
            let generation = coll.current();
            check_vectors(coll, &generation, &docs)?;
            let rows = match &generation.encoder {
                Some(encoder) if generation.meta.encoder.kind != EncoderKind::Trainer => {
                    let texts: Vec<(TextKind, String)> = docs.iter().map(|(d, _)| (TextKind::Document, d.encoded_text())).collect();
                    let mut vectors = Vec::with_capacity(texts.len());
                    for chunk in texts.chunks(256) {
                        vectors.extend(encoder.encode_as(chunk.to_vec(), &generation.prompts).await?);
                    }
                    docs.iter().map(|(d, _)| d.clone()).zip(vectors.into_iter().map(Some)).collect()
                }
                _ if generation.meta.encoder.kind == EncoderKind::Trainer => docs.clone(),
                _ => return Err(Error::FailedPrecondition(generation.no_text.clone())),
            };
            if let Some(done) = self.commit(coll, rows, generation.meta.number).await? {
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
        self.commit(coll, docs.into_iter().zip(vectors.into_iter().map(Some)).collect(), generation.meta.number)
            .await?
            .ok_or_else(|| Error::Unavailable("the collection's generation changed during the write; retry".into()))
    }

    /// Commits in its own task. None: `generation` is no longer current, nothing was written.
    async fn commit(&self, coll: &Arc<Collection>, rows: Vec<NewDoc>, generation: u64) -> Result<Option<(u64, u64)>> {
        let (store, coll) = (self.store.clone(), coll.clone());
        tokio::spawn(commit_upsert(store, coll, rows, generation))
            .await
            .map_err(|e| Error::Internal(format!("upsert task: {e}")))?
    }

    /// Deletes documents by id; returns (deleted, not found).
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
        let name = coll.name();
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
}

/// Checks the vectors documents carry against the generation they would join: only trainer
/// generations take them, a vectors-only collection needs them, and each has the generation's
/// dims (and, for cosine, a direction). Errors name `documents[i].vector`.
fn check_vectors(coll: &Collection, generation: &Generation, docs: &[NewDoc]) -> Result<()> {
    let (name, vectors_only) = {
        let meta = coll.meta.read();
        (meta.name.clone(), meta.vectors_only)
    };
    let dims = generation.dims();
    let trainer = generation.meta.encoder.kind == EncoderKind::Trainer;
    for (i, (_, vector)) in docs.iter().enumerate() {
        let field = || format!("documents[{i}].vector");
        match vector {
            None if vectors_only => {
                return Err(Error::invalid(field(), format!("is empty: collection {name:?} is vectors-only ({dims} dims), so every document carries its vector")));
            }
            None => {}
            Some(_) if !trainer => {
                return Err(Error::invalid(
                    field(),
                    format!(
                        "is given, but collection {name:?} is encoded by the server (generation {}, encoder {:?}): send documents without vectors (a generation has one source of vectors), or create a vectors-only collection (dims)",
                        generation.meta.number, generation.meta.encoder.name
                    ),
                ));
            }
            Some(v) if v.len() != dims => {
                return Err(Error::invalid(field(), format!("has {} dims, collection {name:?} (generation {}) has {dims}", v.len(), generation.meta.number)));
            }
            Some(v) if coll.metric == Metric::Cosine && v.iter().all(|x| *x == 0.0) => {
                return Err(Error::invalid(field(), format!("is all zeros: collection {name:?} is cosine, which no zero vector can be compared by")));
            }
            Some(_) => {}
        }
    }
    Ok(())
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

/// Deletes under the write lock: the store first, then the table, the manifest and the index.
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
