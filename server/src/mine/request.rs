//! A mining batch as the engine takes it and its outcome as the engine returns it; the API
//! converts both to and from the wire.
use super::{DropCounts, Filters, RerankFilters, Sampling};

/// Resolved mining options (defaults applied, validated).
#[derive(Debug, Clone)]
pub struct MineParams {
    pub num_negatives: usize,
    pub range_max: usize,
    pub filters: Filters,
    pub sampling: Sampling,
    pub seed: Option<u64>,
    pub adaptive_depth: bool,
    pub return_text: bool,
    /// Cross-encoder options, when the request reranks.
    pub rerank: Option<RerankFilters>,
}

/// One query of a batch.
#[derive(Debug, Clone, Default)]
pub struct MineQuery {
    pub id: String,
    pub text: String,
    /// The trainer's query vector; empty: the server encodes `text`.
    pub vector: Vec<f32>,
    pub positive_ids: Vec<String>,
    pub positive_texts: Vec<String>,
}

/// A validated batch: what to mine, where, and how.
#[derive(Debug, Clone)]
pub struct MineBatch {
    pub collection: String,
    pub batch_id: u64,
    pub queries: Vec<MineQuery>,
    /// Wait (a bounded time) for this generation, or a later one, to answer.
    pub min_generation: Option<u64>,
    pub params: MineParams,
}

/// A negative as returned.
#[derive(Debug, Clone, PartialEq)]
pub struct MinedNegative {
    pub id: String,
    /// The document's text (title + text), when the batch asked for it.
    pub text: String,
    pub score: f32,
    pub rank: u32,
    pub ce_score: Option<f32>,
}

/// One query's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryOutcome {
    pub query_id: String,
    pub negatives: Vec<MinedNegative>,
    pub dropped: DropCounts,
    /// The rank window the answer came from.
    pub depth: u32,
    pub positive_score: Option<f32>,
    pub positive_ce_score: Option<f32>,
}

/// Seconds spent per stage of one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    pub encode_seconds: f64,
    pub search_seconds: f64,
    pub filter_seconds: f64,
    pub rerank_seconds: f64,
    pub total_seconds: f64,
}

/// A batch's answer: per query, in request order, from one index generation.
#[derive(Debug, Clone, PartialEq)]
pub struct MineOutcome {
    pub batch_id: u64,
    pub generation: u64,
    pub results: Vec<QueryOutcome>,
    pub timings: StageTimings,
}
