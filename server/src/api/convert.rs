//! Wire <-> domain: every conversion between the generated `pb` types and the engine's.
use crate::engine::{CollectionSummary, RefreshProgress};
use crate::error::{Error, Result};
use crate::index::{Metric, Quantization};
use crate::mine::{DropCounts, MineBatch, MineOutcome, MineParams, MineQuery, QueryOutcome};
use crate::proto as pb;
use crate::store::{EncoderKind, StoredDoc};

/// A validated Mine request as the engine takes it.
pub fn mine_batch(req: pb::MineRequest, params: MineParams) -> MineBatch {
    MineBatch {
        collection: req.collection,
        batch_id: req.batch_id,
        queries: req
            .queries
            .into_iter()
            .map(|q| MineQuery { id: q.id, text: q.text, vector: q.vector, positive_ids: q.positive_ids, positive_texts: q.positive_texts })
            .collect(),
        min_generation: req.min_generation,
        params,
    }
}

pub fn mine_response(outcome: MineOutcome) -> pb::MineResponse {
    let t = outcome.timings;
    pb::MineResponse {
        batch_id: outcome.batch_id,
        generation: outcome.generation,
        results: outcome.results.into_iter().map(query_result).collect(),
        timings: Some(pb::StageTimings {
            encode_seconds: t.encode_seconds,
            search_seconds: t.search_seconds,
            filter_seconds: t.filter_seconds,
            total_seconds: t.total_seconds,
            rerank_seconds: t.rerank_seconds,
        }),
    }
}

fn query_result(r: QueryOutcome) -> pb::QueryResult {
    pb::QueryResult {
        query_id: r.query_id,
        negatives: r
            .negatives
            .into_iter()
            .map(|n| pb::Negative { id: n.id, text: n.text, score: n.score, rank: n.rank, ce_score: n.ce_score })
            .collect(),
        dropped: Some(drop_counts(&r.dropped)),
        depth: r.depth,
        positive_score: r.positive_score,
        positive_ce_score: r.positive_ce_score,
    }
}

fn drop_counts(d: &DropCounts) -> pb::DropCounts {
    pb::DropCounts {
        positive: d.positive,
        duplicate_text: d.duplicate_text,
        batch_positive: d.batch_positive,
        window: d.window,
        score_bound: d.score_bound,
        margin: d.margin,
        ce_score: d.ce_score,
        ce_margin: d.ce_margin,
        positive_similarity: d.positive_similarity,
    }
}

pub fn collection_info(s: CollectionSummary) -> pb::CollectionInfo {
    pb::CollectionInfo {
        name: s.name,
        doc_count: s.doc_count,
        dims: s.dims,
        metric: match s.metric {
            Metric::Cosine => pb::Metric::Cosine,
            Metric::InnerProduct => pb::Metric::InnerProduct,
        } as i32,
        quantization: match s.quantization {
            Quantization::F32 => pb::Quantization::F32,
            Quantization::F16 => pb::Quantization::F16,
            Quantization::I8 => pb::Quantization::I8,
        } as i32,
        encoder_fingerprint: s.encoder_fingerprint,
        generation: s.generation,
        encoder_name: s.encoder_name,
        encoder_kind: match s.encoder_kind {
            EncoderKind::Server => "server",
            EncoderKind::Checkpoint => "checkpoint",
            EncoderKind::Trainer => "trainer",
        }
        .into(),
        generation_created_at_unix: s.generation_created_at_unix,
        pending_documents: s.pending_documents,
        building_generation: s.building_generation,
        refresh: s.refresh.as_ref().map(refresh_progress),
        vectors_only: s.vectors_only,
        query_prompt: s.prompts.query.clone().unwrap_or_default(),
        document_prompt: s.prompts.document.clone().unwrap_or_default(),
    }
}

pub fn refresh_progress(p: &RefreshProgress) -> pb::RefreshProgress {
    pb::RefreshProgress {
        collection: p.collection.clone(),
        generation: p.generation,
        phase: p.phase.as_str().into(),
        done: p.done,
        total: p.total,
        docs_per_second: p.docs_per_second,
        elapsed_seconds: p.elapsed_seconds,
        error: p.error.clone(),
    }
}

/// A CreateCollection metric (unset: cosine).
pub fn metric(value: i32) -> Result<Metric> {
    match pb::Metric::try_from(value) {
        Ok(pb::Metric::Unspecified | pb::Metric::Cosine) => Ok(Metric::Cosine),
        Ok(pb::Metric::InnerProduct) => Ok(Metric::InnerProduct),
        Err(_) => Err(Error::invalid("metric", format!("unknown value {value}"))),
    }
}

/// A CreateCollection quantization (unset: f32).
pub fn quantization(value: i32) -> Result<Quantization> {
    match pb::Quantization::try_from(value) {
        Ok(pb::Quantization::Unspecified | pb::Quantization::F32) => Ok(Quantization::F32),
        Ok(pb::Quantization::F16) => Ok(Quantization::F16),
        Ok(pb::Quantization::I8) => Ok(Quantization::I8),
        Err(_) => Err(Error::invalid("quantization", format!("unknown value {value}"))),
    }
}

pub fn document(d: StoredDoc) -> pb::Document {
    pb::Document { id: d.id, text: d.text, title: d.title, metadata: d.metadata.into_iter().collect(), vector: Vec::new() }
}
