//! The engine: collections over the durable store, and the operations the API calls. It
//! speaks domain types (a mine batch and its outcome, a collection summary, refresh
//! progress); the API validates requests and converts them from and to the wire.
//!
//! - `collection`: one collection in memory (documents, current generation, locks);
//! - `registry`: the collections by name: create, get, list, drop, summaries and gauges;
//! - `recovery`: bringing every collection back at start;
//! - `persist`: saved indexes and their manifests;
//! - `writes`: upserts and deletes (store first, then the table and the index);
//! - `mining`: a Mine batch through the pipeline stages;
//! - `refresh`: re-encoding into a new generation and swapping it in; `vectors`: the same
//!   with the trainer's vectors; [`progress`]: what a refresh reports.
mod collection;
mod mining;
mod persist;
pub mod progress;
mod recovery;
mod refresh;
mod registry;
mod vectors;
mod writes;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;

pub use collection::Collection;
pub use progress::{RefreshPhase, RefreshProgress};
pub use registry::CollectionSummary;
pub use writes::NewDoc;

use crate::config::Config;
use crate::encode::{Encoder, Reranker};
use crate::error::{Error, Result};
use crate::store::Store;

pub struct Engine {
    cfg: Arc<Config>,
    store: Arc<Store>,
    /// The configured bi-encoder (encoder.model_dir).
    encoder: Encoder,
    /// The cross-encoder, when reranker.model_dir is set.
    reranker: Option<Reranker>,
    collections: RwLock<HashMap<String, Arc<Collection>>>,
    index_dir: PathBuf,
    /// True once shutdown begins: re-encodes and MineStream streams stop at their next safe point.
    shutdown: tokio::sync::watch::Sender<bool>,
}

/// Runs `f` on a blocking thread (store and index calls never run on the async runtime).
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("blocking task: {e}")))?
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Engine {
    /// Opens the store under `data_dir` and brings every collection back (see `recovery`).
    pub fn open(cfg: Arc<Config>, encoder: Encoder, reranker: Option<Reranker>) -> anyhow::Result<Self> {
        let data_dir = &cfg.server.data_dir;
        std::fs::create_dir_all(data_dir)?;
        let store = Arc::new(Store::open(&data_dir.join("store.redb"), cfg.server.store_cache_mb << 20)?);
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
        engine.recover()?;
        Ok(engine)
    }

    /// The configuration the engine was opened with.
    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    /// Begins shutdown: every running re-encode stops at its next safe point (the end of the
    /// chunk it is encoding; its half-built generation is dropped) and its stream ends with
    /// UNAVAILABLE; MineStream streams finish the batches they have read and end with
    /// UNAVAILABLE. Pending trainer vectors stay in the store for a commit after the restart.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        for coll in self.collections.read().values() {
            coll.cancel_refresh_job();
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
}
