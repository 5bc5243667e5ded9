//! The vector index of a collection: usearch HNSW (cosine or inner product; f32, f16 or i8),
//! searched exactly while the collection is small. Calls run on blocking threads, never on
//! the async runtime, and no more of them at once than the thread slots usearch reserved.
use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::Semaphore;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::config::IndexConfig;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("usearch: {0}")]
    Usearch(String),
    #[error("vector has {got} dims, the index has {want}")]
    Dims { got: usize, want: usize },
    #[error("index task failed: {0}")]
    Task(String),
}

fn usearch_err(e: impl std::fmt::Display) -> IndexError {
    IndexError::Usearch(e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Cosine,
    InnerProduct,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::InnerProduct => "ip",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cosine" => Some(Metric::Cosine),
            "ip" => Some(Metric::InnerProduct),
            _ => None,
        }
    }
    /// Similarity of two vectors as the index scores it (1 - distance).
    pub fn score(self, a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        match self {
            Metric::InnerProduct => dot,
            Metric::Cosine => {
                let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
                let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
                if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    F32,
    F16,
    I8,
}

impl Quantization {
    pub fn as_str(self) -> &'static str {
        match self {
            Quantization::F32 => "f32",
            Quantization::F16 => "f16",
            Quantization::I8 => "i8",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(Quantization::F32),
            "f16" => Some(Quantization::F16),
            "i8" => Some(Quantization::I8),
            _ => None,
        }
    }
}

/// A search hit: document key and similarity (1 - distance), best first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub key: u64,
    pub score: f32,
}

pub struct VectorIndex {
    index: Arc<RwLock<Index>>,
    slots: Arc<Semaphore>,
    dims: usize,
    exact_below: usize,
    /// Thread slots reserved in usearch: every permit plus the grower/saver.
    threads: usize,
}

impl VectorIndex {
    pub fn new(dims: usize, metric: Metric, quant: Quantization, cfg: &IndexConfig) -> Result<Self, IndexError> {
        let options = IndexOptions {
            dimensions: dims,
            metric: match metric {
                Metric::Cosine => MetricKind::Cos,
                Metric::InnerProduct => MetricKind::IP,
            },
            quantization: match quant {
                Quantization::F32 => ScalarKind::F32,
                Quantization::F16 => ScalarKind::F16,
                Quantization::I8 => ScalarKind::I8,
            },
            connectivity: cfg.connectivity,
            expansion_add: cfg.expansion_add,
            expansion_search: cfg.expansion_search,
            multi: false,
        };
        let index = Index::new(&options).map_err(usearch_err)?;
        // One slot per permit plus one for the thread that grows or saves the index.
        index.reserve_capacity_and_threads(1024, cfg.threads + 1).map_err(usearch_err)?;
        Ok(Self {
            index: Arc::new(RwLock::new(index)),
            slots: Arc::new(Semaphore::new(cfg.threads)),
            dims,
            exact_below: cfg.exact_search_below,
            threads: cfg.threads + 1,
        })
    }

    /// Restores a saved index; the caller has checked its manifest.
    pub fn load(path: &Path, dims: usize, metric: Metric, quant: Quantization, cfg: &IndexConfig) -> Result<Self, IndexError> {
        let this = Self::new(dims, metric, quant, cfg)?;
        {
            let index = this.index.write();
            index.load(&path.to_string_lossy()).map_err(usearch_err)?;
            if index.dimensions() != dims {
                return Err(IndexError::Dims { got: index.dimensions(), want: dims });
            }
            let capacity = index.size().max(1024);
            index.reserve_capacity_and_threads(capacity, cfg.threads + 1).map_err(usearch_err)?;
            index.change_expansion_search(cfg.expansion_search);
            index.change_expansion_add(cfg.expansion_add);
        }
        Ok(this)
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Searches exactly below `n` vectors, HNSW from there (benchmarks compare both).
    pub fn set_exact_below(&mut self, n: usize) {
        self.exact_below = n;
    }

    pub fn len(&self) -> usize {
        self.index.read().size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Index) -> Result<T, IndexError> + Send + 'static,
    ) -> Result<T, IndexError> {
        let _permit = self.slots.clone().acquire_owned().await.map_err(|e| IndexError::Task(e.to_string()))?;
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || f(&index.read()))
            .await
            .map_err(|e| IndexError::Task(e.to_string()))?
    }

    /// Adds vectors, growing capacity as needed; removes `replaced` keys first.
    pub async fn add(&self, items: Vec<(u64, Vec<f32>)>, replaced: Vec<u64>) -> Result<(), IndexError> {
        for (_, v) in &items {
            if v.len() != self.dims {
                return Err(IndexError::Dims { got: v.len(), want: self.dims });
            }
        }
        let _permit = self.slots.clone().acquire_owned().await.map_err(|e| IndexError::Task(e.to_string()))?;
        let index = self.index.clone();
        let threads = self.threads;
        tokio::task::spawn_blocking(move || add_sync(&index, threads, &items, &replaced))
            .await
            .map_err(|e| IndexError::Task(e.to_string()))?
    }

    /// [`VectorIndex::add`] for callers already on a blocking thread (startup rebuilds).
    pub fn add_blocking(&self, items: &[(u64, Vec<f32>)]) -> Result<(), IndexError> {
        add_sync(&self.index, self.threads, items, &[])
    }

    pub async fn remove(&self, keys: Vec<u64>) -> Result<(), IndexError> {
        self.blocking(move |index| {
            for key in keys {
                index.remove(key).map_err(usearch_err)?;
            }
            Ok(())
        })
        .await
    }

    /// For each (query, count), the `count` nearest documents, best first.
    pub async fn search(&self, queries: Vec<(Vec<f32>, usize)>) -> Result<Vec<Vec<Hit>>, IndexError> {
        let exact_below = self.exact_below;
        self.blocking(move |index| {
            let exact = index.size() < exact_below;
            queries
                .iter()
                .map(|(q, count)| {
                    let m = if exact { index.exact_search(q, *count) } else { index.search(q, *count) }
                        .map_err(usearch_err)?;
                    Ok(m.keys.iter().zip(&m.distances).map(|(&key, &d)| Hit { key, score: 1.0 - d }).collect())
                })
                .collect()
        })
        .await
    }

    /// Writes the index to `path` (the caller renames it into place).
    pub fn save_blocking(&self, path: &Path) -> Result<(), IndexError> {
        self.index.write().save(&path.to_string_lossy()).map_err(usearch_err)
    }
}

fn add_sync(
    index: &RwLock<Index>,
    threads: usize,
    items: &[(u64, Vec<f32>)],
    replaced: &[u64],
) -> Result<(), IndexError> {
    {
        let guard = index.read();
        for &key in replaced {
            guard.remove(key).map_err(usearch_err)?;
        }
    }
    let needed = index.read().size() + items.len();
    if needed > index.read().capacity() {
        let guard = index.write();
        let capacity = needed.max(guard.capacity() * 2);
        guard.reserve_capacity_and_threads(capacity, threads).map_err(usearch_err)?;
    }
    let guard = index.read();
    for (key, v) in items {
        guard.add(*key, v).map_err(usearch_err)?;
    }
    Ok(())
}
