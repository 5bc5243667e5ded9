//! The durable corpus store (redb, ACID): collection manifests, documents, the string id to
//! u64 key mapping and every document's vector. Anything acknowledged to a client has been
//! committed here first; indexes can always be rebuilt from it.
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

/// A collection's manifest: what its vectors mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionMeta {
    pub name: String,
    /// "cosine" or "ip".
    pub metric: String,
    /// "f32", "f16" or "i8".
    pub quantization: String,
    pub dims: u32,
    pub encoder_fingerprint: String,
    pub encoder_name: String,
    pub generation: u64,
    /// Next unused document key; keys are never reused, so an update gets a fresh one.
    pub next_key: u64,
    /// Bumped by every committed write; a saved index records the version it reflects.
    pub version: u64,
    pub doc_count: u64,
    pub created_at_unix: u64,
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
fn vecs_table(name: &str) -> String {
    format!("vecs/{name}")
}

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
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
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
            let (d, i, v) = (docs_table(&meta.name), ids_table(&meta.name), vecs_table(&meta.name));
            tx.open_table(TableDefinition::<u64, &[u8]>::new(&d))?;
            tx.open_table(TableDefinition::<&str, u64>::new(&i))?;
            tx.open_table(TableDefinition::<u64, &[u8]>::new(&v))?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// Removes the manifest and every table of the collection; false when absent.
    pub fn drop_collection(&self, name: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(COLLECTIONS)?;
            if table.remove(name)?.is_none() {
                return Ok(false);
            }
            let (d, i, v) = (docs_table(name), ids_table(name), vecs_table(name));
            tx.delete_table(TableDefinition::<u64, &[u8]>::new(&d))?;
            tx.delete_table(TableDefinition::<&str, u64>::new(&i))?;
            tx.delete_table(TableDefinition::<u64, &[u8]>::new(&v))?;
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

    /// Writes documents with their vectors in one durable transaction. Documents whose id
    /// exists replace it under a fresh key. Returns the new manifest and each document's keys.
    pub fn upsert(
        &self,
        name: &str,
        docs: &[(StoredDoc, Vec<f32>)],
    ) -> Result<(CollectionMeta, Vec<Written>), StoreError> {
        let tx = self.db.begin_write()?;
        let mut written = Vec::with_capacity(docs.len());
        let meta = {
            let mut collections = tx.open_table(COLLECTIONS)?;
            let mut meta = Self::meta_in(&collections, name)?;
            let (d, i, v) = (docs_table(name), ids_table(name), vecs_table(name));
            let mut docs_t = tx.open_table(TableDefinition::<u64, &[u8]>::new(&d))?;
            let mut ids_t = tx.open_table(TableDefinition::<&str, u64>::new(&i))?;
            let mut vecs_t = tx.open_table(TableDefinition::<u64, &[u8]>::new(&v))?;
            for (doc, vector) in docs {
                let key = meta.next_key;
                meta.next_key += 1;
                let replaced = ids_t.insert(doc.id.as_str(), key)?.map(|old| old.value());
                if let Some(old) = replaced {
                    docs_t.remove(old)?;
                    vecs_t.remove(old)?;
                } else {
                    meta.doc_count += 1;
                }
                docs_t.insert(key, encode(doc).as_slice())?;
                vecs_t.insert(key, vec_to_bytes(vector).as_slice())?;
                written.push(Written { key, replaced });
            }
            meta.version += 1;
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
            let (d, i, v) = (docs_table(name), ids_table(name), vecs_table(name));
            let mut docs_t = tx.open_table(TableDefinition::<u64, &[u8]>::new(&d))?;
            let mut ids_t = tx.open_table(TableDefinition::<&str, u64>::new(&i))?;
            let mut vecs_t = tx.open_table(TableDefinition::<u64, &[u8]>::new(&v))?;
            for id in ids {
                match ids_t.remove(id.as_str())?.map(|k| k.value()) {
                    Some(key) => {
                        docs_t.remove(key)?;
                        vecs_t.remove(key)?;
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

    /// Every document with its key and vector, in key order.
    pub fn scan(&self, name: &str) -> Result<Vec<(u64, StoredDoc, Vec<f32>)>, StoreError> {
        let tx = self.db.begin_read()?;
        let (d, v) = (docs_table(name), vecs_table(name));
        let docs_t = tx.open_table(TableDefinition::<u64, &[u8]>::new(&d))?;
        let vecs_t = tx.open_table(TableDefinition::<u64, &[u8]>::new(&v))?;
        let mut out = Vec::with_capacity(docs_t.len()? as usize);
        for row in docs_t.iter()? {
            let (k, raw) = row?;
            let key = k.value();
            let doc: StoredDoc = decode(&d, raw.value())?;
            let vector = vecs_t
                .get(key)?
                .map(|b| bytes_to_vec(b.value()))
                .ok_or_else(|| StoreError::Corrupt { table: v.clone(), reason: format!("no vector for key {key}") })?;
            out.push((key, doc, vector));
        }
        Ok(out)
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

    /// Vectors by key; absent keys are left out.
    pub fn vectors(&self, name: &str, keys: &[u64]) -> Result<HashMap<u64, Vec<f32>>, StoreError> {
        let tx = self.db.begin_read()?;
        let v = vecs_table(name);
        let table = tx.open_table(TableDefinition::<u64, &[u8]>::new(&v))?;
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
            dims: 2,
            encoder_fingerprint: "fp".into(),
            encoder_name: "tiny".into(),
            generation: 1,
            next_key: 0,
            version: 0,
            doc_count: 0,
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
            let store = Store::open(&path).unwrap();
            assert!(store.create_collection(&meta("c")).unwrap());
            assert!(!store.create_collection(&meta("c")).unwrap(), "name taken");
            let (m, w) = store
                .upsert("c", &[(doc("a", "alpha"), vec![1.0, 0.0]), (doc("b", "beta"), vec![0.0, 1.0])])
                .unwrap();
            assert_eq!(m.doc_count, 2);
            assert_eq!(w, vec![Written { key: 0, replaced: None }, Written { key: 1, replaced: None }]);
            let (m, w) = store.upsert("c", &[(doc("a", "alpha 2"), vec![0.5, 0.5])]).unwrap();
            assert_eq!(m.doc_count, 2, "update keeps the count");
            assert_eq!(w, vec![Written { key: 2, replaced: Some(0) }]);
            let (m, removed, missing) = store.delete("c", &["b".into(), "zz".into()]).unwrap();
            assert_eq!((m.doc_count, removed, missing), (1, vec![1], vec!["zz".to_string()]));
        }
        let store = Store::open(&path).unwrap();
        let metas = store.collections().unwrap();
        assert_eq!(metas.len(), 1);
        assert_eq!(metas[0].version, 3);
        assert_eq!(metas[0].next_key, 3);
        let rows = store.scan("c").unwrap();
        assert_eq!(rows, vec![(2, doc("a", "alpha 2"), vec![0.5, 0.5])]);
        assert_eq!(store.vectors("c", &[2, 0]).unwrap().len(), 1);
        assert!(store.drop_collection("c").unwrap());
        assert!(store.collections().unwrap().is_empty());
        assert!(matches!(store.upsert("c", &[]), Err(StoreError::Missing(_))));
    }

    #[test]
    fn encoded_text_joins_title() {
        let mut d = doc("x", "body");
        assert_eq!(d.encoded_text(), "body");
        d.title = Some("Title".into());
        assert_eq!(d.encoded_text(), "Title body");
    }
}
