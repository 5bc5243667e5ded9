//! The gRPC surface: validation at the edge (every message names the offending field), then
//! the engine. Unary and streaming mining share one inner function.
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::config::Config;
use crate::engine::{Engine, MineParams};
use crate::error::{Error, Result};
use crate::index::{Metric, Quantization};
use crate::mine::{Filters, RerankFilters, Sampling};
use crate::proto as pb;
use crate::store::StoredDoc;

/// Mine requests a stream works on at once; responses still leave in request order.
const STREAM_IN_FLIGHT: usize = 4;

pub struct MinerService {
    engine: Arc<Engine>,
}

impl MinerService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

/// 1-64 characters of letters, digits, '_', '-', '.', not starting with '.'.
pub fn validate_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "is empty"));
    }
    if name.len() > 64 {
        return Err(Error::invalid(field, format!("is {} bytes long, the limit is 64", name.len())));
    }
    if name.starts_with('.') || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
        return Err(Error::invalid(field, format!("{name:?} may hold only letters, digits, '_', '-', '.' and must not start with '.'")));
    }
    Ok(())
}

fn check_text(field: &str, text: &str, limit: usize) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::invalid(field, "is empty"));
    }
    let chars = text.chars().count();
    if chars > limit {
        return Err(Error::invalid(field, format!("is {chars} characters long, the limit is {limit}")));
    }
    Ok(())
}

fn check_finite(field: &str, value: Option<f32>) -> Result<()> {
    match value {
        Some(v) if !v.is_finite() => Err(Error::invalid(field, format!("must be finite, got {v}"))),
        _ => Ok(()),
    }
}

/// Checks everything that does not depend on the collection, and resolves the options.
pub fn validate_mine(req: &pb::MineRequest, cfg: &Config) -> Result<MineParams> {
    let limits = &cfg.limits;
    validate_name("collection", &req.collection)?;
    if req.queries.is_empty() {
        return Err(Error::invalid("queries", "is empty: send at least one query"));
    }
    if req.queries.len() > limits.max_batch_queries {
        return Err(Error::invalid(
            "queries",
            format!("holds {} queries, the limit is {} (limits.max_batch_queries)", req.queries.len(), limits.max_batch_queries),
        ));
    }
    for (i, q) in req.queries.iter().enumerate() {
        if q.vector.is_empty() {
            check_text(&format!("queries[{i}].text"), &q.text, limits.max_text_chars)
                .map_err(|e| match e {
                    Error::InvalidArgument { field, reason } if reason == "is empty" => {
                        Error::InvalidArgument { field, reason: "is empty and no vector is given".into() }
                    }
                    e => e,
                })?;
        } else {
            if let Some(j) = q.vector.iter().position(|x| !x.is_finite()) {
                return Err(Error::invalid(format!("queries[{i}].vector[{j}]"), format!("must be finite, got {}", q.vector[j])));
            }
            if q.text.chars().count() > limits.max_text_chars {
                return Err(Error::invalid(format!("queries[{i}].text"), format!("is longer than {} characters", limits.max_text_chars)));
            }
        }
        let positives = q.positive_ids.len() + q.positive_texts.len();
        if positives > limits.max_positives_per_query {
            return Err(Error::invalid(
                format!("queries[{i}].positive_ids"),
                format!("{positives} positives, the limit is {} (limits.max_positives_per_query)", limits.max_positives_per_query),
            ));
        }
        for (j, id) in q.positive_ids.iter().enumerate() {
            if id.is_empty() {
                return Err(Error::invalid(format!("queries[{i}].positive_ids[{j}]"), "is empty"));
            }
        }
        for (j, t) in q.positive_texts.iter().enumerate() {
            check_text(&format!("queries[{i}].positive_texts[{j}]"), t, limits.max_text_chars)?;
        }
    }
    let mut o = req.options.clone().unwrap_or_default();
    match pb::Preset::try_from(o.preset) {
        Ok(pb::Preset::Unspecified) => {}
        Ok(pb::Preset::Denoised) => apply_denoised(&mut o),
        Err(_) => return Err(Error::invalid("options.preset", format!("unknown value {}", o.preset))),
    }
    if o.num_negatives == 0 {
        return Err(Error::invalid("options.num_negatives", "must be at least 1"));
    }
    if o.num_negatives > limits.max_num_negatives {
        return Err(Error::invalid(
            "options.num_negatives",
            format!("is {}, the limit is {} (limits.max_num_negatives)", o.num_negatives, limits.max_num_negatives),
        ));
    }
    let range_max = o.range_max.unwrap_or(cfg.mining.default_range_max);
    if range_max > limits.max_range {
        return Err(Error::invalid("options.range_max", format!("is {range_max}, the limit is {} (limits.max_range)", limits.max_range)));
    }
    if o.range_min >= range_max {
        return Err(Error::invalid("options.range_min", format!("must be below range_max ({range_max}), got {}", o.range_min)));
    }
    for (field, v) in [
        ("options.min_score", o.min_score),
        ("options.max_score", o.max_score),
        ("options.absolute_margin", o.absolute_margin),
        ("options.relative_margin", o.relative_margin),
        ("options.temperature", o.temperature),
        ("options.ce_max_score", o.ce_max_score),
        ("options.ce_relative_margin", o.ce_relative_margin),
        ("options.max_positive_similarity", o.max_positive_similarity),
    ] {
        check_finite(field, v)?;
    }
    if let (Some(lo), Some(hi)) = (o.min_score, o.max_score) {
        if lo > hi {
            return Err(Error::invalid("options.min_score", format!("{lo} is above max_score {hi}")));
        }
    }
    if o.absolute_margin.is_some_and(|m| m < 0.0) {
        return Err(Error::invalid("options.absolute_margin", "must not be negative"));
    }
    if o.relative_margin.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
        return Err(Error::invalid("options.relative_margin", "must lie in [0, 1]"));
    }
    if o.max_positive_similarity.is_some_and(|m| !(-1.0..=1.0).contains(&m)) {
        return Err(Error::invalid("options.max_positive_similarity", "must lie in [-1, 1] (a cosine similarity)"));
    }
    let rerank = if o.rerank.unwrap_or(false) {
        let limit = limits.max_rerank_candidates;
        let candidates = o.rerank_candidates.unwrap_or_else(|| o.num_negatives.saturating_mul(3)).min(limit.max(o.num_negatives));
        if o.rerank_candidates.is_some_and(|c| c == 0) {
            return Err(Error::invalid("options.rerank_candidates", "must be at least 1"));
        }
        if o.rerank_candidates.is_some_and(|c| c > limit) {
            return Err(Error::invalid(
                "options.rerank_candidates",
                format!("is {}, the limit is {limit} (limits.max_rerank_candidates)", o.rerank_candidates.unwrap_or(0)),
            ));
        }
        if o.ce_max_score.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
            return Err(Error::invalid("options.ce_max_score", "must lie in [0, 1] (a probability)"));
        }
        if o.ce_relative_margin.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
            return Err(Error::invalid("options.ce_relative_margin", "must lie in [0, 1]"));
        }
        for (i, q) in req.queries.iter().enumerate() {
            if q.text.trim().is_empty() {
                return Err(Error::invalid(format!("queries[{i}].text"), "is empty: rerank scores (query text, document) pairs"));
            }
        }
        Some(RerankFilters {
            candidates: candidates as usize,
            max_scored: limit.max(candidates) as usize,
            max_score: o.ce_max_score,
            relative_margin: o.ce_relative_margin,
        })
    } else {
        for (field, set) in [
            ("options.rerank_candidates", o.rerank_candidates.is_some()),
            ("options.ce_max_score", o.ce_max_score.is_some()),
            ("options.ce_relative_margin", o.ce_relative_margin.is_some()),
        ] {
            if set {
                return Err(Error::invalid(field, "applies only when options.rerank is true"));
            }
        }
        None
    };
    let temperature = o.temperature.unwrap_or(cfg.mining.default_temperature);
    if temperature <= 0.0 {
        return Err(Error::invalid("options.temperature", "must be greater than 0"));
    }
    let sampling = match pb::Sampling::try_from(o.sampling) {
        Ok(pb::Sampling::Unspecified | pb::Sampling::Top) => Sampling::Top,
        Ok(pb::Sampling::Uniform) => Sampling::Uniform,
        Ok(pb::Sampling::Softmax) => Sampling::Softmax { temperature },
        Err(_) => return Err(Error::invalid("options.sampling", format!("unknown value {}", o.sampling))),
    };
    Ok(MineParams {
        num_negatives: o.num_negatives as usize,
        range_max: range_max as usize,
        filters: Filters {
            range_min: o.range_min as usize,
            min_score: o.min_score,
            max_score: o.max_score,
            absolute_margin: o.absolute_margin,
            relative_margin: o.relative_margin,
            max_positive_similarity: o.max_positive_similarity,
            exclude_batch_positives: o.exclude_batch_positives.unwrap_or(true),
        },
        sampling,
        seed: o.seed,
        adaptive_depth: o.adaptive_depth.unwrap_or(true),
        return_text: o.return_text,
        rerank,
    })
}

/// The `denoised` preset: relative margin 0.05 to the positive's score (NV-Retriever's
/// TopK-PercPos), candidates more similar than MAX_POSITIVE_SIMILARITY to a positive dropped,
/// and adaptive depth so the filters do not cost yield. Fields the request sets win.
pub const DENOISED_RELATIVE_MARGIN: f32 = 0.05;
pub const DENOISED_MAX_POSITIVE_SIMILARITY: f32 = 0.65;

fn apply_denoised(o: &mut pb::MineOptions) {
    o.relative_margin.get_or_insert(DENOISED_RELATIVE_MARGIN);
    o.max_positive_similarity.get_or_insert(DENOISED_MAX_POSITIVE_SIMILARITY);
    o.adaptive_depth.get_or_insert(true);
}

/// Validates, checks the collection and its dims, then mines: the one path behind Mine and
/// MineStream.
async fn mine_one(engine: &Engine, req: pb::MineRequest) -> Result<pb::MineResponse> {
    let params = validate_mine(&req, &engine.cfg)?;
    let coll = engine.get(&req.collection)?;
    let dims = coll.meta.read().dims as usize;
    for (i, q) in req.queries.iter().enumerate() {
        if !q.vector.is_empty() && q.vector.len() != dims {
            return Err(Error::invalid(
                format!("queries[{i}].vector"),
                format!("has {} dims, collection {:?} has {dims}", q.vector.len(), req.collection),
            ));
        }
    }
    drop(coll);
    engine.mine(&req, &params).await
}

fn validate_docs(docs: &[pb::Document], cfg: &Config) -> Result<Vec<StoredDoc>> {
    if docs.len() > cfg.limits.max_docs_per_message {
        return Err(Error::invalid(
            "documents",
            format!("{} documents in one message, the limit is {} (limits.max_docs_per_message)", docs.len(), cfg.limits.max_docs_per_message),
        ));
    }
    docs.iter()
        .enumerate()
        .map(|(i, d)| {
            if d.id.is_empty() {
                return Err(Error::invalid(format!("documents[{i}].id"), "is empty"));
            }
            if d.id.len() > 512 {
                return Err(Error::invalid(format!("documents[{i}].id"), "is longer than 512 bytes"));
            }
            if d.text.trim().is_empty() && d.title.as_deref().is_none_or(|t| t.trim().is_empty()) {
                return Err(Error::invalid(format!("documents[{i}].text"), "is empty and the document has no title"));
            }
            if d.text.chars().count() > cfg.limits.max_text_chars {
                return Err(Error::invalid(format!("documents[{i}].text"), format!("is longer than {} characters", cfg.limits.max_text_chars)));
            }
            if let Some(t) = &d.title {
                if t.chars().count() > cfg.limits.max_text_chars {
                    return Err(Error::invalid(format!("documents[{i}].title"), format!("is longer than {} characters", cfg.limits.max_text_chars)));
                }
            }
            Ok(StoredDoc {
                id: d.id.clone(),
                title: d.title.clone().filter(|t| !t.trim().is_empty()),
                text: d.text.clone(),
                metadata: d.metadata.clone().into_iter().collect(),
            })
        })
        .collect()
}

/// Ids per Delete or GetDocuments request: at most limits.max_docs_per_message.
fn check_id_count(ids: &[String], cfg: &Config) -> Result<()> {
    let limit = cfg.limits.max_docs_per_message;
    if ids.len() > limit {
        return Err(Error::invalid("ids", format!("{} ids, the limit is {limit}", ids.len())));
    }
    Ok(())
}

type MineStreamOut = Pin<Box<dyn Stream<Item = Result<pb::MineResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::negative_miner_server::NegativeMiner for MinerService {
    async fn create_collection(
        &self,
        request: Request<pb::CreateCollectionRequest>,
    ) -> Result<Response<pb::CollectionInfo>, Status> {
        let req = request.into_inner();
        validate_name("name", &req.name)?;
        let metric = match pb::Metric::try_from(req.metric) {
            Ok(pb::Metric::Unspecified | pb::Metric::Cosine) => Metric::Cosine,
            Ok(pb::Metric::InnerProduct) => Metric::InnerProduct,
            Err(_) => return Err(Error::invalid("metric", format!("unknown value {}", req.metric)).into()),
        };
        let quantization = match pb::Quantization::try_from(req.quantization) {
            Ok(pb::Quantization::Unspecified | pb::Quantization::F32) => Quantization::F32,
            Ok(pb::Quantization::F16) => Quantization::F16,
            Ok(pb::Quantization::I8) => Quantization::I8,
            Err(_) => return Err(Error::invalid("quantization", format!("unknown value {}", req.quantization)).into()),
        };
        Ok(Response::new(self.engine.create(&req.name, metric, quantization).await?))
    }

    async fn get_collection(
        &self,
        request: Request<pb::GetCollectionRequest>,
    ) -> Result<Response<pb::CollectionInfo>, Status> {
        let req = request.into_inner();
        validate_name("name", &req.name)?;
        let coll = self.engine.get(&req.name)?;
        Ok(Response::new(self.engine.info(&coll)))
    }

    async fn list_collections(
        &self,
        _request: Request<pb::ListCollectionsRequest>,
    ) -> Result<Response<pb::ListCollectionsResponse>, Status> {
        Ok(Response::new(pb::ListCollectionsResponse { collections: self.engine.list() }))
    }

    async fn drop_collection(
        &self,
        request: Request<pb::DropCollectionRequest>,
    ) -> Result<Response<pb::DropCollectionResponse>, Status> {
        let req = request.into_inner();
        validate_name("name", &req.name)?;
        let dropped = self.engine.drop_collection(&req.name).await?;
        Ok(Response::new(pb::DropCollectionResponse { dropped }))
    }

    async fn upsert(
        &self,
        request: Request<Streaming<pb::UpsertRequest>>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        let mut stream = request.into_inner();
        let mut collection: Option<String> = None;
        let (mut inserted, mut updated) = (0, 0);
        let mut coll = None;
        while let Some(msg) = stream.message().await? {
            let name = match (&collection, msg.collection.as_str()) {
                (None, "") => return Err(Error::invalid("collection", "is empty in the first message").into()),
                (None, n) => {
                    validate_name("collection", n)?;
                    collection = Some(n.to_string());
                    coll = Some(self.engine.get(n)?);
                    n.to_string()
                }
                (Some(c), n) if n.is_empty() || n == c => c.clone(),
                (Some(c), n) => {
                    return Err(Error::invalid("collection", format!("changed from {c:?} to {n:?} within one stream")).into());
                }
            };
            let docs = validate_docs(&msg.documents, &self.engine.cfg)?;
            let coll = coll.as_ref().expect("set with the first message");
            let (i, u) = self.engine.upsert(coll, docs).await.map_err(|e| {
                tracing::debug!(collection = %name, error = %e, "upsert failed");
                e
            })?;
            inserted += i;
            updated += u;
        }
        let doc_count = coll.map(|c| c.meta.read().doc_count).unwrap_or(0);
        Ok(Response::new(pb::UpsertResponse { inserted, updated, doc_count }))
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = request.into_inner();
        validate_name("collection", &req.collection)?;
        check_id_count(&req.ids, &self.engine.cfg)?;
        if let Some(i) = req.ids.iter().position(String::is_empty) {
            return Err(Error::invalid(format!("ids[{i}]"), "is empty").into());
        }
        let coll = self.engine.get(&req.collection)?;
        let (deleted, not_found) = self.engine.delete(&coll, req.ids).await?;
        Ok(Response::new(pb::DeleteResponse { deleted, not_found }))
    }

    async fn get_documents(
        &self,
        request: Request<pb::GetDocumentsRequest>,
    ) -> Result<Response<pb::GetDocumentsResponse>, Status> {
        let req = request.into_inner();
        validate_name("collection", &req.collection)?;
        check_id_count(&req.ids, &self.engine.cfg)?;
        let coll = self.engine.get(&req.collection)?;
        let (docs, missing) = self.engine.documents(&coll, req.ids).await?;
        let documents = docs
            .into_iter()
            .map(|d| pb::Document { id: d.id, text: d.text, title: d.title, metadata: d.metadata.into_iter().collect() })
            .collect();
        Ok(Response::new(pb::GetDocumentsResponse { documents, missing }))
    }

    async fn mine(&self, request: Request<pb::MineRequest>) -> Result<Response<pb::MineResponse>, Status> {
        Ok(Response::new(mine_one(&self.engine, request.into_inner()).await?))
    }

    type MineStreamStream = MineStreamOut;

    /// Up to STREAM_IN_FLIGHT batches are mined at once; answers keep request order. An
    /// invalid batch ends the stream with its status (the message names the batch id).
    async fn mine_stream(
        &self,
        request: Request<Streaming<pb::MineRequest>>,
    ) -> Result<Response<Self::MineStreamStream>, Status> {
        let engine = self.engine.clone();
        let input = request.into_inner();
        let output = input
            .map(move |msg| {
                let engine = engine.clone();
                async move {
                    let req = msg?;
                    let batch_id = req.batch_id;
                    mine_one(&engine, req).await.map_err(|e| {
                        let status = Status::from(e);
                        Status::new(status.code(), format!("batch {batch_id}: {}", status.message()))
                    })
                }
            })
            .buffered(STREAM_IN_FLIGHT);
        // Stop after the first error: a gRPC stream ends with one status.
        let output = output.scan(false, |failed, item| {
            if *failed {
                return futures::future::ready(None);
            }
            *failed = item.is_err();
            futures::future::ready(Some(item))
        });
        Ok(Response::new(Box::pin(output)))
    }
}
