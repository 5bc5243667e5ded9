//! The state of a refresh as the engine reports it: a phase, counts, and how it ended.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::error::Error;

/// Where a re-encode refresh is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshPhase {
    Encoding,
    /// Writers wait while the last documents are encoded and the generation is swapped in.
    Swapping,
    Done,
    Cancelled,
    /// Stopped for shutdown; nothing of it was kept.
    Interrupted,
    Failed,
}

impl RefreshPhase {
    /// The phase's name, as progress reports and messages spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshPhase::Encoding => "encoding",
            RefreshPhase::Swapping => "swapping",
            RefreshPhase::Done => "done",
            RefreshPhase::Cancelled => "cancelled",
            RefreshPhase::Interrupted => "interrupted",
            RefreshPhase::Failed => "failed",
        }
    }

    /// True once the refresh has ended, one way or another.
    pub fn is_final(self) -> bool {
        !matches!(self, RefreshPhase::Encoding | RefreshPhase::Swapping)
    }
}

impl std::fmt::Display for RefreshPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A re-encode refresh's progress.
#[derive(Debug, Clone)]
pub struct RefreshProgress {
    pub collection: String,
    /// The generation being built.
    pub generation: u64,
    pub phase: RefreshPhase,
    pub done: u64,
    pub total: u64,
    pub docs_per_second: f64,
    pub elapsed_seconds: f64,
    /// Why it ended without a swap, in words (empty while it runs and when done).
    pub error: String,
    /// The error a failed refresh ended with.
    pub failure: Option<Arc<Error>>,
}

impl RefreshProgress {
    pub(super) fn start(collection: String, generation: u64, total: u64) -> Self {
        Self {
            collection,
            generation,
            phase: RefreshPhase::Encoding,
            done: 0,
            total,
            docs_per_second: 0.0,
            elapsed_seconds: 0.0,
            error: String::new(),
            failure: None,
        }
    }
}

/// A running re-encode: its progress and a way to stop it.
pub struct RefreshJob {
    progress: watch::Receiver<RefreshProgress>,
    cancelled: Arc<AtomicBool>,
}

impl RefreshJob {
    pub(super) fn new(progress: watch::Receiver<RefreshProgress>, cancelled: Arc<AtomicBool>) -> Self {
        Self { progress, cancelled }
    }

    pub fn progress(&self) -> RefreshProgress {
        self.progress.borrow().clone()
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }
}
