//! The durable corpus store (redb, ACID): collection manifests, documents, the string id to
//! u64 key mapping, the documents' vectors per index generation (the current one, and one
//! being built by a refresh), and the keys removed since the last index save (so a saved
//! index can be brought up to date instead of rebuilt). Anything acknowledged to a client has
//! been committed here first; indexes can always be rebuilt from it. Making a built
//! generation current is one commit.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

const COLLECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("collections");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Redb(#[from] redb::Error),
    #[error("corrupt record in {table}: {reason}")]
    Corrupt { table: String, reason: String },
    #[error("collection {0:?} is not in the store")]
    Missing(String),
    /// A generation operation that does not fit the collection's state.
    #[error("{0}")]
    Busy(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Redb(e.into()) }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Where a generation's vectors came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderKind {
    /// The server's configured encoder (encoder.model_dir).
    Server,
    /// A checkpoint directory under encoder.models_root, named by a re-encode refresh.
    Checkpoint,
    /// Vectors the trainer computed and uploaded; the server cannot encode text for them.
    Trainer,
}

/// The encoder a generation's vectors belong to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderRef {
    pub kind: EncoderKind,
    /// Model directory name, or the name the trainer gave.
    pub name: String,
    /// sha256 of the model's config and weights; empty for trainer vectors.
    pub fingerprint: String,
    /// The checkpoint directory, for `Checkpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// The prompts the vectors were encoded with (none for trainer vectors).
    #[serde(default, skip_serializing_if = "PromptOverrides::is_empty")]
    pub prompts: PromptOverrides,
}

/// Prompts by side. In a collection's manifest: what the collection sets in place of its
/// encoder's own (`None`: the encoder's; `Some("")`: no prompt). In a generation's encoder:
/// the prompts in force when its vectors were made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
}

impl PromptOverrides {
    pub fn is_empty(&self) -> bool {
        self.query.is_none() && self.document.is_none()
    }
}

/// A generation: the vectors of the collection's documents under one encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationMeta {
    pub number: u64,
    pub encoder: EncoderRef,
    pub dims: u32,
    pub created_at_unix: u64,
}

/// A collection's manifest: what its vectors mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionMeta {
    pub name: String,
    /// "cosine" or "ip".
    pub metric: String,
    /// "f32", "f16" or "i8".
    pub quantization: String,
    /// The generation that answers queries.
    pub current: GenerationMeta,
    /// A generation being built (re-encode) or filled (trainer vectors), when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub building: Option<GenerationMeta>,
    /// Next unused document key; keys are never reused, so an update gets a fresh one.
    pub next_key: u64,
    /// Bumped by every committed write; a saved index records the version it reflects.
    pub version: u64,
    pub doc_count: u64,
    pub created_at_unix: u64,
    /// Prompts set at creation in place of the encoder's own.
    #[serde(default, skip_serializing_if = "PromptOverrides::is_empty")]
    pub prompts: PromptOverrides,
    /// Created with its own dims: documents carry their vectors, the server encodes no text.
    /// Cleared when a checkpoint's generation becomes current.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vectors_only: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDoc {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub text: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl StoredDoc {
    /// What the encoder sees: title + " " + text when a title is present.
    pub fn encoded_text(&self) -> String {
        match self.title.as_deref().map(str::trim) {
            Some(t) if !t.is_empty() => format!("{t} {}", self.text),
            _ => self.text.clone(),
        }
    }
}

/// One document's outcome in an upsert.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub key: u64,
    /// The key this document had before, now gone.
    pub replaced: Option<u64>,
}

pub struct Store {
    db: Database,
}

fn docs_table(name: &str) -> String {
    format!("docs/{name}")
}
fn ids_table(name: &str) -> String {
    format!("ids/{name}")
}
/// The vectors of generation `generation`.
fn vecs_table(name: &str, generation: u64) -> String {
    format!("vecs/{name}/{generation}")
}
/// Keys removed (deleted, or replaced by an update) with the manifest version that removed
/// them; pruned up to the version of the last saved index.
fn gone_table(name: &str) -> String {
    format!("gone/{name}")
}

type GoneDef<'a> = TableDefinition<'a, u64, u64>;

type VecsDef<'a> = TableDefinition<'a, u64, &'static [u8]>;

fn vec_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_to_vec(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn decode<T: for<'de> Deserialize<'de>>(table: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { table: table.to_string(), reason: e.to_string() })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store records always serialize")
}

impl Store {
    /// Opens (or creates) the store with a page cache of at most `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let db = redb::Builder::new().set_cache_size(cache_bytes).create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(COLLECTIONS)?;
        tx.commit()?;
        Ok(Self { db })
    }

    pub fn collections(&self) -> Result<Vec<CollectionMeta>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(COLLECTIONS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, v) = row?;
            out.push(decode("collections", v.value())?);
        }
        Ok(out)
    }

    /// Creates the manifest and empty tables; false when the name is taken.
    pub fn create_collection(&self, meta: &CollectionMeta) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(COLLECTIONS)?;
            if table.get(meta.name.as_str())?.is_some() {
                return Ok(false);
            }
            table.insert(meta.name.as_str(), encode(meta).as_slice())?;
            let (d, i, v) = (docs_table(&meta.name), ids_table(&meta.name), vecs_table(&meta.name, meta.current.number));
            tx.open_table(TableDefinition::<u64, &[u8]>::new(&d))?;
            tx.open_table(TableDefinition::<&str, u64>::new(&i))?;
            tx.open_table(VecsDef::new(&v))?;
            tx.open_table(GoneDef::new(&gone_table(&meta.name)))?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// Removes the manifest and every table of the collection; false when absent.
    pub fn drop_collection(&self, name: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(COLLECTIONS)?;
            let Some(raw) = table.remove(name)? else {
                return Ok(false);
            };
            let meta: CollectionMeta = decode("collections", raw.value())?;
            let (d, i) = (docs_table(name), ids_table(name));
            tx.delete_table(TableDefinition::<u64, &[u8]>::new(&d))?;
            tx.delete_table(TableDefinition::<&str, u64>::new(&i))?;
            for g in std::iter::once(&meta.current).chain(&meta.building) {
                tx.delete_table(VecsDef::new(&vecs_table(name, g.number)))?;
            }
            tx.delete_table(GoneDef::new(&gone_table(name)))?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn meta_in(
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        name: &str,
    ) -> Result<CollectionMeta, StoreError> {
        let raw = table.get(name)?.ok_or_else(|| StoreError::Missing(name.to_string()))?;
        decode("collections", raw.value())
    }

    /// Writes documents, with their vectors in the current generation when given (`None`: the
    /// generation's encoder is the trainer's, and the document waits for its next vectors), in
    /// one durable transaction. Documents whose id exists replace it under a fresh key. Returns
    /// the new manifest and each document's keys.
    pub fn upsert(
        &self,
        name: &str,
        docs: &[(StoredDoc, Option<Vec<f32>>)],
    ) -> Result<(CollectionMeta, Vec<Written>), StoreError> {
        let tx = self.db.begin_write()?;
        let mut written = Vec::with_capacity(docs.len());
        let meta = {
            let mut collections = tx.open_table(COLLECTIONS)?;
            let mut meta = Self::meta_in(&collections, name)?;
            let (d, i, v) = (docs_table(name), ids_table(name), vecs_table(name, meta.current.number));
            let mut docs_t = tx.open_table(TableDefinition::<u64, &[u8]>::new(&d))?;
            let mut ids_t = tx.open_table(TableDefinition::<&str, u64>::new(&i))?;
            let mut vecs_t = tx.open_table(VecsDef::new(&v))?;
            let building = meta.building.as_ref().map(|b| vecs_table(name, b.number));
            let mut building_t = building.as_ref().map(|b| tx.open_table(VecsDef::new(b))).transpose()?;
            let mut gone_t = tx.open_table(GoneDef::new(&gone_table(name)))?;
            let version = meta.version + 1;
            for (doc, vector) in docs {
                let key = meta.next_key;
                meta.next_key += 1;
                let replaced = ids_t.insert(doc.id.as_str(), key)?.map(|old| old.value());
                if let Some(old) = replaced {
                    docs_t.remove(old)?;
                    vecs_t.remove(old)?;
                    gone_t.insert(old, version)?;
                    if let Some(t) = building_t.as_mut() {
                        t.remove(old)?;
                    }
                } else {
                    meta.doc_count += 1;
                }
                docs_t.insert(key, encode(doc).as_slice())?;
                if let Some(vector) = vector {
                    vecs_t.insert(key, vec_to_bytes(vector).as_slice())?;
                }
                written.push(Written { key, replaced });
            }
            meta.version = version;
            collections.insert(name, encode(&meta).as_slice())?;
            meta
        };
        tx.commit()?;
        Ok((meta, written))
    }

    /// Deletes documents by id in one durable transaction; returns the removed keys and the
    /// ids that were not there.
    pub fn delete(
        &self,
        name: &str,
        ids: &[String],
    ) -> Result<(CollectionMeta, Vec<u64>, Vec<String>), StoreError> {
        let tx = self.db.begin_write()?;
        let mut removed = Vec::new();
        let mut missing = Vec::new();
        let meta = {
            let mut collections = tx.open_table(COLLECTIONS)?;
            let mut meta = Self::meta_in(&collections, name)?;
            let (d, i, v) = (docs_table(name), ids_table(name), vecs_table(name, meta.current.number));
            let mut docs_t = tx.open_table(TableDefinition::<u64, &[u8]>::new(&d))?;
            let mut ids_t = tx.open_table(TableDefinition::<&str, u64>::new(&i))?;
            let mut vecs_t = tx.open_table(VecsDef::new(&v))?;
            let building = meta.building.as_ref().map(|b| vecs_table(name, b.number));
            let mut building_t = building.as_ref().map(|b| tx.open_table(VecsDef::new(b))).transpose()?;
            let mut gone_t = tx.open_table(GoneDef::new(&gone_table(name)))?;
            for id in ids {
                match ids_t.remove(id.as_str())?.map(|k| k.value()) {
                    Some(key) => {
                        docs_t.remove(key)?;
                        vecs_t.remove(key)?;
                        gone_t.insert(key, meta.version + 1)?;
                        if let Some(t) = building_t.as_mut() {
                            t.remove(key)?;
                        }
                        removed.push(key);
                        meta.doc_count -= 1;
                    }
                    None => missing.push(id.clone()),
                }
            }
            meta.version += 1;
            collections.insert(name, encode(&meta).as_slice())?;
            meta
        };
        tx.commit()?;
        Ok((meta, removed, missing))
    }

    /// Every document with its key, in key order.
    pub fn scan(&self, name: &str) -> Result<Vec<(u64, StoredDoc)>, StoreError> {
        let tx = self.db.begin_read()?;
        let d = docs_table(name);
        let docs_t = tx.open_table(TableDefinition::<u64, &[u8]>::new(&d))?;
        let mut out = Vec::with_capacity(docs_t.len()? as usize);
        for row in docs_t.iter()? {
            let (k, raw) = row?;
            out.push((k.value(), decode(&d, raw.value())?));
        }
        Ok(out)
    }

    /// Every vector of a generation with its key, in key order (the tests' view; the server
    /// reads vectors a chunk at a time).
    #[cfg(test)]
    pub fn scan_vectors(&self, name: &str, generation: u64) -> Result<Vec<(u64, Vec<f32>)>, StoreError> {
        let mut out = Vec::new();
        self.for_each_vector_chunk(name, generation, 0, usize::MAX, |chunk| -> Result<(), StoreError> {
            out.extend(chunk);
            Ok(())
        })?;
        Ok(out)
    }

    /// The vectors of a generation with keys from `from_key` on, in key order, handed to `f`
    /// `chunk` at a time, so that no more than one chunk is in memory at once.
    pub fn for_each_vector_chunk<E: From<StoreError>>(
        &self,
        name: &str,
        generation: u64,
        from_key: u64,
        chunk: usize,
        mut f: impl FnMut(Vec<(u64, Vec<f32>)>) -> Result<(), E>,
    ) -> Result<(), E> {
        let tx = self.db.begin_read().map_err(StoreError::from)?;
        let v = vecs_table(name, generation);
        let table = tx.open_table(VecsDef::new(&v)).map_err(StoreError::from)?;
        let mut rows = Vec::new();
        for row in table.range(from_key..).map_err(StoreError::from)? {
            let (k, raw) = row.map_err(StoreError::from)?;
            rows.push((k.value(), bytes_to_vec(raw.value())));
            if rows.len() >= chunk {
                f(std::mem::take(&mut rows))?;
            }
        }
        if !rows.is_empty() {
            f(rows)?;
        }
        Ok(())
    }

    /// The keys of a generation's vectors, in key order.
    pub fn vector_keys(&self, name: &str, generation: u64) -> Result<Vec<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(VecsDef::new(&vecs_table(name, generation)))?;
        let mut out = Vec::with_capacity(table.len()? as usize);
        for row in table.iter()? {
            out.push(row?.0.value());
        }
        Ok(out)
    }

    /// Keys removed by writes after manifest version `version` (a collection made before the
    /// store kept them has none recorded).
    pub fn removed_since(&self, name: &str, version: u64) -> Result<Vec<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = match tx.open_table(GoneDef::new(&gone_table(name))) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            if v.value() > version {
                out.push(k.value());
            }
        }
        Ok(out)
    }

    /// Forgets removals up to manifest version `version` (an index saved at that version
    /// reflects them).
    pub fn prune_removed(&self, name: &str, version: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let collections = tx.open_table(COLLECTIONS)?;
            if collections.get(name)?.is_none() {
                return Ok(());
            }
            tx.open_table(GoneDef::new(&gone_table(name)))?.retain(|_, v| v > version)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Starts a generation: records it as being built and creates its (empty) vector table.
    /// Fails with [`StoreError::Busy`] when one is already being built.
    pub fn begin_generation(&self, name: &str, generation: &GenerationMeta) -> Result<CollectionMeta, StoreError> {
        let tx = self.db.begin_write()?;
        let meta = {
            let mut collections = tx.open_table(COLLECTIONS)?;
            let mut meta = Self::meta_in(&collections, name)?;
            if let Some(b) = &meta.building {
                return Err(StoreError::Busy(format!("generation {} of {name:?} is being built", b.number)));
            }
            tx.open_table(VecsDef::new(&vecs_table(name, generation.number)))?;
            meta.building = Some(generation.clone());
            collections.insert(name, encode(&meta).as_slice())?;
            meta
        };
        tx.commit()?;
        Ok(meta)
    }

    /// Writes vectors into the generation being built; keys of documents deleted meanwhile
    /// are skipped. Returns how many were written.
    pub fn put_vectors(&self, name: &str, generation: u64, rows: &[(u64, Vec<f32>)]) -> Result<usize, StoreError> {
        let tx = self.db.begin_write()?;
        let mut written = 0;
        {
            let collections = tx.open_table(COLLECTIONS)?;
            let meta = Self::meta_in(&collections, name)?;
            if meta.building.as_ref().map(|b| b.number) != Some(generation) {
                return Err(StoreError::Busy(format!("generation {generation} of {name:?} is not being built")));
            }
            let docs_t = tx.open_table(TableDefinition::<u64, &[u8]>::new(&docs_table(name)))?;
            let mut table = tx.open_table(VecsDef::new(&vecs_table(name, generation)))?;
            for (key, v) in rows {
                if docs_t.get(*key)?.is_some() {
                    table.insert(*key, vec_to_bytes(v).as_slice())?;
                    written += 1;
                }
            }
        }
        tx.commit()?;
        Ok(written)
    }

    /// How many vectors a generation holds.
    pub fn count_vectors(&self, name: &str, generation: u64) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(VecsDef::new(&vecs_table(name, generation)))?;
        Ok(table.len()?)
    }

    /// Makes the generation being built current, dropping the previous one's vectors, in one
    /// commit: after a crash either the old or the new generation is current, never a mix.
    pub fn commit_generation(&self, name: &str, generation: u64) -> Result<CollectionMeta, StoreError> {
        let tx = self.db.begin_write()?;
        let meta = {
            let mut collections = tx.open_table(COLLECTIONS)?;
            let mut meta = Self::meta_in(&collections, name)?;
            let Some(building) = meta.building.take().filter(|b| b.number == generation) else {
                return Err(StoreError::Busy(format!("generation {generation} of {name:?} is not being built")));
            };
            tx.delete_table(VecsDef::new(&vecs_table(name, meta.current.number)))?;
            if building.encoder.kind != EncoderKind::Trainer {
                meta.vectors_only = false;
            }
            meta.current = building;
            meta.version += 1;
            collections.insert(name, encode(&meta).as_slice())?;
            meta
        };
        tx.commit()?;
        Ok(meta)
    }

    /// Forgets the generation being built and its vectors; None when there was none.
    pub fn abort_generation(&self, name: &str) -> Result<Option<GenerationMeta>, StoreError> {
        let tx = self.db.begin_write()?;
        let aborted = {
            let mut collections = tx.open_table(COLLECTIONS)?;
            let mut meta = Self::meta_in(&collections, name)?;
            let aborted = meta.building.take();
            if let Some(b) = &aborted {
                tx.delete_table(VecsDef::new(&vecs_table(name, b.number)))?;
                collections.insert(name, encode(&meta).as_slice())?;
            }
            aborted
        };
        tx.commit()?;
        Ok(aborted)
    }

    /// Documents by key; absent keys (deleted meanwhile) are left out.
    pub fn docs(&self, name: &str, keys: &[u64]) -> Result<HashMap<u64, StoredDoc>, StoreError> {
        let tx = self.db.begin_read()?;
        let d = docs_table(name);
        let table = tx.open_table(TableDefinition::<u64, &[u8]>::new(&d))?;
        let mut out = HashMap::with_capacity(keys.len());
        for &key in keys {
            if let Some(raw) = table.get(key)? {
                out.insert(key, decode(&d, raw.value())?);
            }
        }
        Ok(out)
    }

    /// Vectors of a generation by key; absent keys are left out.
    pub fn vectors(&self, name: &str, generation: u64, keys: &[u64]) -> Result<HashMap<u64, Vec<f32>>, StoreError> {
        let tx = self.db.begin_read()?;
        let v = vecs_table(name, generation);
        let table = tx.open_table(VecsDef::new(&v))?;
        let mut out = HashMap::with_capacity(keys.len());
        for &key in keys {
            if let Some(raw) = table.get(key)? {
                out.insert(key, bytes_to_vec(raw.value()));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str) -> CollectionMeta {
        CollectionMeta {
            name: name.into(),
            metric: "cosine".into(),
            quantization: "f32".into(),
            current: generation(1, "tiny"),
            building: None,
            next_key: 0,
            version: 0,
            doc_count: 0,
            created_at_unix: 0,
            prompts: Default::default(),
            vectors_only: false,
        }
    }

    fn generation(number: u64, name: &str) -> GenerationMeta {
        GenerationMeta {
            number,
            encoder: EncoderRef {
                kind: EncoderKind::Server,
                name: name.into(),
                fingerprint: "fp".into(),
                dir: None,
                prompts: Default::default(),
            },
            dims: 2,
            created_at_unix: 0,
        }
    }

    fn doc(id: &str, text: &str) -> StoredDoc {
        StoredDoc { id: id.into(), title: None, text: text.into(), metadata: BTreeMap::new() }
    }

    #[test]
    fn upserts_and_deletes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let store = Store::open(&path, 1 << 20).unwrap();
            assert!(store.create_collection(&meta("c")).unwrap());
            assert!(!store.create_collection(&meta("c")).unwrap(), "name taken");
            let (m, w) = store
                .upsert("c", &[(doc("a", "alpha"), Some(vec![1.0, 0.0])), (doc("b", "beta"), Some(vec![0.0, 1.0]))])
                .unwrap();
            assert_eq!(m.doc_count, 2);
            assert_eq!(w, vec![Written { key: 0, replaced: None }, Written { key: 1, replaced: None }]);
            let (m, w) = store.upsert("c", &[(doc("a", "alpha 2"), Some(vec![0.5, 0.5]))]).unwrap();
            assert_eq!(m.doc_count, 2, "update keeps the count");
            assert_eq!(w, vec![Written { key: 2, replaced: Some(0) }]);
            let (m, removed, missing) = store.delete("c", &["b".into(), "zz".into()]).unwrap();
            assert_eq!((m.doc_count, removed, missing), (1, vec![1], vec!["zz".to_string()]));
        }
        let store = Store::open(&path, 1 << 20).unwrap();
        let metas = store.collections().unwrap();
        assert_eq!(metas.len(), 1);
        assert_eq!(metas[0].version, 3);
        assert_eq!(metas[0].next_key, 3);
        assert_eq!(store.scan("c").unwrap(), vec![(2, doc("a", "alpha 2"))]);
        assert_eq!(store.scan_vectors("c", 1).unwrap(), vec![(2, vec![0.5, 0.5])]);
        assert_eq!(store.vectors("c", 1, &[2, 0]).unwrap().len(), 1);
        assert!(store.drop_collection("c").unwrap());
        assert!(store.collections().unwrap().is_empty());
        assert!(matches!(store.upsert("c", &[]), Err(StoreError::Missing(_))));
    }

    #[test]
    fn a_generation_becomes_current_in_one_commit_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = Store::open(&path, 1 << 20).unwrap();
        store.create_collection(&meta("c")).unwrap();
        store.upsert("c", &[(doc("a", "alpha"), Some(vec![1.0, 0.0])), (doc("b", "beta"), Some(vec![0.0, 1.0]))]).unwrap();
        let m = store.begin_generation("c", &generation(2, "next")).unwrap();
        assert_eq!(m.building.as_ref().unwrap().number, 2);
        assert!(matches!(store.begin_generation("c", &generation(3, "other")), Err(StoreError::Busy(_))), "one at a time");
        assert_eq!(store.put_vectors("c", 2, &[(0, vec![0.1, 0.9]), (99, vec![1.0, 1.0])]).unwrap(), 1, "unknown keys skipped");
        // Writes during the build: an update drops the old key's pending vector; a delete too.
        store.upsert("c", &[(doc("a", "alpha 2"), Some(vec![0.2, 0.8])), (doc("c", "gamma"), None)]).unwrap();
        assert!(store.scan_vectors("c", 2).unwrap().is_empty(), "key 0 was replaced by key 2");
        assert_eq!(store.scan_vectors("c", 1).unwrap().len(), 2, "b and the new a; c has no vector");
        store.put_vectors("c", 2, &[(1, vec![0.3, 0.7])]).unwrap();
        // A crash before the commit: reopen, the old generation is current and the build is
        // still recorded, so the server can drop it.
        drop(store);
        let store = Store::open(&path, 1 << 20).unwrap();
        let m = &store.collections().unwrap()[0];
        assert_eq!((m.current.number, m.building.as_ref().map(|b| b.number)), (1, Some(2)));
        let m = store.commit_generation("c", 2).unwrap();
        assert_eq!((m.current.number, m.current.encoder.name.as_str(), m.building.is_none()), (2, "next", true));
        assert_eq!(store.scan_vectors("c", 2).unwrap(), vec![(1, vec![0.3, 0.7])]);
        assert!(store.scan_vectors("c", 1).is_err(), "the old generation's vectors are gone");
        assert!(matches!(store.commit_generation("c", 2), Err(StoreError::Busy(_))));
        store.begin_generation("c", &generation(3, "x")).unwrap();
        assert_eq!(store.abort_generation("c").unwrap().unwrap().number, 3);
        assert!(store.collections().unwrap()[0].building.is_none());
        assert!(store.drop_collection("c").unwrap());
    }

    #[test]
    fn removals_are_kept_until_a_save_covers_them_and_vectors_come_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb"), 1 << 20).unwrap();
        store.create_collection(&meta("c")).unwrap();
        let docs: Vec<(StoredDoc, Option<Vec<f32>>)> = (0..5).map(|i| (doc(&format!("d{i}"), "t"), Some(vec![i as f32, 1.0]))).collect();
        let (m, _) = store.upsert("c", &docs).unwrap();
        assert_eq!(m.version, 1);
        store.upsert("c", &[(doc("d1", "t2"), Some(vec![9.0, 9.0]))]).unwrap(); // version 2: key 1 replaced by 5
        store.delete("c", &["d3".into()]).unwrap(); // version 3: key 3 removed
        assert_eq!(store.removed_since("c", 0).unwrap(), vec![1, 3]);
        assert_eq!(store.removed_since("c", 2).unwrap(), vec![3]);
        store.prune_removed("c", 2).unwrap();
        assert_eq!(store.removed_since("c", 0).unwrap(), vec![3], "pruned up to version 2");
        let mut chunks = Vec::new();
        store
            .for_each_vector_chunk("c", 1, 2, 2, |chunk| -> Result<(), StoreError> {
                chunks.push(chunk.iter().map(|(k, _)| *k).collect::<Vec<_>>());
                Ok(())
            })
            .unwrap();
        assert_eq!(chunks, vec![vec![2, 4], vec![5]], "keys from 2 on, two at a time");
        assert_eq!(store.vector_keys("c", 1).unwrap(), vec![0, 2, 4, 5]);
        assert!(store.drop_collection("c").unwrap());
        assert!(store.removed_since("c", 0).unwrap().is_empty());
    }

    #[test]
    fn encoded_text_joins_title() {
        let mut d = doc("x", "body");
        assert_eq!(d.encoded_text(), "body");
        d.title = Some("Title".into());
        assert_eq!(d.encoded_text(), "Title body");
    }
}
