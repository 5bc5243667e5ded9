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
    /// Slots for data requests (unary calls and stream batches): limits.max_in_flight.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Open MineStream streams: limits.max_streams.
    streams: Arc<tokio::sync::Semaphore>,
}

impl MinerService {
    pub fn new(engine: Arc<Engine>) -> Self {
        let limits = &engine.cfg.limits;
        let in_flight = Arc::new(tokio::sync::Semaphore::new(limits.max_in_flight));
        let streams = Arc::new(tokio::sync::Semaphore::new(limits.max_streams));
        Self { engine, in_flight, streams }
    }

    /// A slot for a unary data request, or RESOURCE_EXHAUSTED at once when all are taken.
    fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| {
            Error::Overloaded(format!(
                "{} requests in flight, the limit is {} (limits.max_in_flight); retry with backoff",
                self.engine.cfg.limits.max_in_flight, self.engine.cfg.limits.max_in_flight
            ))
        })
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
        let candidates = o.rerank_candidates.unwrap_or_else(|| o.num_negatives.saturating_mul(3).min(limit));
        if candidates < o.num_negatives {
            return Err(Error::invalid(
                "options.rerank_candidates",
                format!("is {candidates}, below num_negatives ({}): score at least as many as you want back", o.num_negatives),
            ));
        }
        if candidates > limit {
            return Err(Error::invalid("options.rerank_candidates", format!("is {candidates}, the limit is {limit} (limits.max_rerank_candidates)")));
        }
        let pairs = candidates as usize * req.queries.len();
        if pairs > limits.max_rerank_pairs {
            return Err(Error::invalid(
                "options.rerank_candidates",
                format!(
                    "{candidates} candidates x {} queries = {pairs} pairs, the limit is {} (limits.max_rerank_pairs): send smaller batches or fewer candidates",
                    req.queries.len(),
                    limits.max_rerank_pairs
                ),
            ));
        }
        if o.ce_max_score.is_some_and(|m| !(m > 0.0 && m <= 1.0)) {
            return Err(Error::invalid("options.ce_max_score", "must lie in (0, 1] (a probability; 0 would drop everything)"));
        }
        if o.ce_relative_margin.is_some_and(|m| !(0.0..1.0).contains(&m)) {
            return Err(Error::invalid("options.ce_relative_margin", "must lie in [0, 1) (1 would drop everything)"));
        }
        for (i, q) in req.queries.iter().enumerate() {
            if q.text.trim().is_empty() {
                return Err(Error::invalid(format!("queries[{i}].text"), "is empty: rerank scores (query text, document) pairs"));
            }
        }
        Some(RerankFilters {
            candidates: candidates as usize,
            // Scoring deeper when too few pass stops at 4 rounds' worth.
            max_scored: candidates as usize * 4,
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

/// Validates, then mines (the engine checks dims against the generation that answers): the
/// one path behind Mine and MineStream.
async fn mine_one(engine: &Engine, req: pb::MineRequest) -> Result<pb::MineResponse> {
    let params = validate_mine(&req, &engine.cfg)?;
    let limit = std::time::Duration::from_secs_f64(engine.cfg.limits.mine_timeout_seconds);
    tokio::time::timeout(limit, engine.mine(&req, &params))
        .await
        .map_err(|_| Error::DeadlineExceeded(format!("mining took longer than {limit:?} (limits.mine_timeout_seconds)")))?
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

/// The checkpoint directory a Refresh names: relative paths are taken from `root`; `..` is
/// refused outright; the resolved directory must exist and lie under `root`.
pub fn resolve_checkpoint(dir: &str, root: &std::path::Path) -> Result<std::path::PathBuf> {
    let field = "encoder_dir";
    if dir.trim().is_empty() {
        return Err(Error::invalid(field, "is empty"));
    }
    let path = std::path::Path::new(dir);
    if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(Error::invalid(field, format!("{dir:?} contains \"..\"")));
    }
    let root = root
        .canonicalize()
        .map_err(|e| Error::FailedPrecondition(format!("encoder.models_root {}: {e}", root.display())))?;
    let joined = if path.is_absolute() { path.to_path_buf() } else { root.join(path) };
    let resolved = joined.canonicalize().map_err(|e| Error::invalid(field, format!("{}: {e}", joined.display())))?;
    if !resolved.starts_with(&root) || resolved == root {
        return Err(Error::invalid(field, format!("{} is not under encoder.models_root ({})", resolved.display(), root.display())));
    }
    if !resolved.is_dir() {
        return Err(Error::invalid(field, format!("{} is not a directory", resolved.display())));
    }
    Ok(resolved)
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
        crate::metrics::timed("CreateCollection", async move {
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
        })
        .await
    }

    async fn get_collection(
        &self,
        request: Request<pb::GetCollectionRequest>,
    ) -> Result<Response<pb::CollectionInfo>, Status> {
        crate::metrics::timed("GetCollection", async move {
            let req = request.into_inner();
            validate_name("name", &req.name)?;
            let coll = self.engine.get(&req.name)?;
            Ok(Response::new(self.engine.info(&coll)))
        })
        .await
    }

    async fn list_collections(
        &self,
        _request: Request<pb::ListCollectionsRequest>,
    ) -> Result<Response<pb::ListCollectionsResponse>, Status> {
        crate::metrics::timed("ListCollections", async move {
            Ok(Response::new(pb::ListCollectionsResponse { collections: self.engine.list() }))
        })
        .await
    }

    async fn drop_collection(
        &self,
        request: Request<pb::DropCollectionRequest>,
    ) -> Result<Response<pb::DropCollectionResponse>, Status> {
        crate::metrics::timed("DropCollection", async move {
            let req = request.into_inner();
            validate_name("name", &req.name)?;
            let dropped = self.engine.drop_collection(&req.name).await?;
            Ok(Response::new(pb::DropCollectionResponse { dropped }))
        })
        .await
    }

    async fn upsert(
        &self,
        request: Request<Streaming<pb::UpsertRequest>>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        crate::metrics::timed("Upsert", async move {
            let _slot = self.slot()?;
            let mut stream = request.into_inner();
            let mut collection: Option<String> = None;
            let (mut inserted, mut updated) = (0, 0);
            let mut coll = None;
            while let Some(msg) = stream.message().await.map_err(crate::error::inbound)? {
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
            let (doc_count, pending) = coll
                .map(|c| {
                    let pending = c.docs.read().pending.len() as u64;
                    (c.meta.read().doc_count, pending)
                })
                .unwrap_or((0, 0));
            Ok(Response::new(pb::UpsertResponse { inserted, updated, doc_count, pending }))
        })
        .await
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        crate::metrics::timed("Delete", async move {
            let _slot = self.slot()?;
            let req = request.into_inner();
            validate_name("collection", &req.collection)?;
            check_id_count(&req.ids, &self.engine.cfg)?;
            if let Some(i) = req.ids.iter().position(String::is_empty) {
                return Err(Error::invalid(format!("ids[{i}]"), "is empty").into());
            }
            let coll = self.engine.get(&req.collection)?;
            let (deleted, not_found) = self.engine.delete(&coll, req.ids).await?;
            Ok(Response::new(pb::DeleteResponse { deleted, not_found }))
        })
        .await
    }

    async fn get_documents(
        &self,
        request: Request<pb::GetDocumentsRequest>,
    ) -> Result<Response<pb::GetDocumentsResponse>, Status> {
        crate::metrics::timed("GetDocuments", async move {
            let _slot = self.slot()?;
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
        })
        .await
    }

    async fn mine(&self, request: Request<pb::MineRequest>) -> Result<Response<pb::MineResponse>, Status> {
        crate::metrics::timed("Mine", async move {
            let _slot = self.slot()?;
            Ok(Response::new(mine_one(&self.engine, request.into_inner()).await?))
        })
        .await
    }

    type MineStreamStream = MineStreamOut;

    /// Up to STREAM_IN_FLIGHT batches are mined at once; answers keep request order. An
    /// invalid batch ends the stream with its status (the message names the batch id).
    async fn mine_stream(
        &self,
        request: Request<Streaming<pb::MineRequest>>,
    ) -> Result<Response<Self::MineStreamStream>, Status> {
        crate::metrics::timed("MineStream", async move {
            let engine = self.engine.clone();
            let input = request.into_inner();
            let stream_slot = self.streams.clone().try_acquire_owned().map_err(|_| {
                Error::Overloaded(format!(
                    "{} MineStream streams are open, the limit is {} (limits.max_streams)",
                    self.engine.cfg.limits.max_streams, self.engine.cfg.limits.max_streams
                ))
            })?;
            let open = crate::metrics::OpenStream::new("MineStream");
            let in_flight = self.in_flight.clone();
            // From shutdown on, no further batch is read: those read are mined, then the
            // stream ends with UNAVAILABLE.
            let mut shutdown = engine.shutdown_watch();
            let input = async_stream::stream! {
                let mut input = input;
                loop {
                    tokio::select! {
                        biased;
                        _ = async { shutdown.wait_for(|stopping| *stopping).await.is_ok() } => {
                            yield Err(Status::unavailable("the server is shutting down: batches sent after the answered ones were not mined; send them again once it is back"));
                            break;
                        }
                        msg = input.next() => match msg {
                            Some(msg) => yield msg,
                            None => break,
                        },
                    }
                }
            };
            let output = input
                .map(move |msg| {
                    let _held = (&open, &stream_slot);
                    let engine = engine.clone();
                    let in_flight = in_flight.clone();
                    async move {
                        // Stream batches wait for a slot rather than fail.
                        let _slot = in_flight.acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
                        let req = msg.map_err(crate::error::inbound)?;
                        let batch_id = req.batch_id;
                        let result = mine_one(&engine, req).await.map_err(|e| {
                            let status = Status::from(e);
                            Status::new(status.code(), format!("batch {batch_id}: {}", status.message()))
                        });
                        let code = result.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
                        metrics::counter!(crate::metrics::STREAM_BATCHES, "rpc" => "MineStream", "code" => crate::metrics::code_name(code)).increment(1);
                        result
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
            Ok(Response::new(Box::pin(output) as Self::MineStreamStream))
        })
        .await
    }

    type RefreshStream = Pin<Box<dyn Stream<Item = Result<pb::RefreshProgress, Status>> + Send>>;

    async fn refresh(&self, request: Request<pb::RefreshRequest>) -> Result<Response<Self::RefreshStream>, Status> {
        crate::metrics::timed("Refresh", async move {
            let req = request.into_inner();
            validate_name("collection", &req.collection)?;
            let dir = resolve_checkpoint(&req.encoder_dir, &self.engine.cfg.encoder.models_root)?;
            let coll = self.engine.get(&req.collection)?;
            let rx = self.engine.start_reencode(&coll, &dir).await?;
            // Every change, then the end: a failed or cancelled refresh ends with its status.
            let stream = futures::stream::unfold((rx, false), |(mut rx, finished)| async move {
                if finished {
                    return None;
                }
                let p = rx.borrow_and_update().clone();
                let item = match p.phase.as_str() {
                    "done" => (Ok(p), true),
                    "cancelled" => (Err(Status::aborted(format!("refresh of {:?} to generation {} cancelled", p.collection, p.generation))), true),
                    "interrupted" => (Err(Status::unavailable(format!("refresh of {:?} to generation {} stopped: the server is shutting down; nothing of it was kept, run it again once the server is back", p.collection, p.generation))), true),
                    "failed" => (Err(Status::internal(format!("refresh of {:?} failed: {}", p.collection, p.error))), true),
                    _ => match rx.changed().await {
                        Ok(()) => (Ok(p), false),
                        // The job always sends a final state before its sender goes; this is a bug.
                        Err(_) => (Err(Status::internal(format!("refresh of {:?} ended without a final state", p.collection))), true),
                    },
                };
                Some((item.0, (rx, item.1)))
            });
            Ok(Response::new(Box::pin(stream) as Self::RefreshStream))
        })
        .await
    }

    async fn upload_vectors(
        &self,
        request: Request<Streaming<pb::UploadVectorsRequest>>,
    ) -> Result<Response<pb::UploadVectorsResponse>, Status> {
        crate::metrics::timed("UploadVectors", async move {
            let _slot = self.slot()?;
            let mut stream = request.into_inner();
            let mut target: Option<(Arc<crate::engine::Collection>, String)> = None;
            let mut out = pb::UploadVectorsResponse::default();
            while let Some(msg) = stream.message().await.map_err(crate::error::inbound)? {
                if target.is_none() {
                    validate_name("collection", &msg.collection)?;
                    let name = msg.encoder_name.trim();
                    if name.is_empty() || name.len() > 256 {
                        return Err(Error::invalid("encoder_name", "is required in the first message (1-256 bytes)").into());
                    }
                    target = Some((self.engine.get(&msg.collection)?, name.to_string()));
                }
                let (coll, encoder_name) = target.as_ref().expect("set by the first message");
                let current = coll.meta.read().name.clone();
                if !msg.collection.is_empty() && msg.collection != current {
                    return Err(Error::invalid("collection", format!("changed from {current:?} to {:?} within one stream", msg.collection)).into());
                }
                if !msg.encoder_name.is_empty() && msg.encoder_name.trim() != encoder_name {
                    return Err(Error::invalid("encoder_name", "changed within one stream").into());
                }
                if msg.vectors.len() > self.engine.cfg.limits.max_docs_per_message {
                    return Err(Error::invalid(
                        "vectors",
                        format!("{} vectors in one message, the limit is {} (limits.max_docs_per_message)", msg.vectors.len(), self.engine.cfg.limits.max_docs_per_message),
                    )
                    .into());
                }
                let dims = msg.vectors.first().map(|v| v.vector.len()).unwrap_or(0);
                for (i, v) in msg.vectors.iter().enumerate() {
                    if v.id.is_empty() {
                        return Err(Error::invalid(format!("vectors[{i}].id"), "is empty").into());
                    }
                    if v.vector.is_empty() || v.vector.len() != dims || dims > 65536 {
                        return Err(Error::invalid(format!("vectors[{i}].vector"), format!("has {} dims, vectors[0] has {dims}", v.vector.len())).into());
                    }
                    if let Some(j) = v.vector.iter().position(|x| !x.is_finite()) {
                        return Err(Error::invalid(format!("vectors[{i}].vector[{j}]"), format!("must be finite, got {}", v.vector[j])).into());
                    }
                }
                let items = msg.vectors.into_iter().map(|v| (v.id, v.vector)).collect();
                let (written, generation, missing) = self.engine.upload_vectors(coll, encoder_name, items).await?;
                out.received += written;
                out.generation = generation;
                out.missing = missing;
            }
            if target.is_none() {
                return Err(Error::invalid("collection", "no message received").into());
            }
            Ok(Response::new(out))
        })
        .await
    }

    async fn commit_vectors(&self, request: Request<pb::CommitVectorsRequest>) -> Result<Response<pb::CommitVectorsResponse>, Status> {
        crate::metrics::timed("CommitVectors", async move {
            let _slot = self.slot()?;
            let req = request.into_inner();
            validate_name("collection", &req.collection)?;
            let coll = self.engine.get(&req.collection)?;
            let started = std::time::Instant::now();
            self.engine.commit_vectors(&coll).await?;
            Ok(Response::new(pb::CommitVectorsResponse { collection: Some(self.engine.info(&coll)), seconds: started.elapsed().as_secs_f64() }))
        })
        .await
    }

    async fn cancel_refresh(&self, request: Request<pb::CancelRefreshRequest>) -> Result<Response<pb::CancelRefreshResponse>, Status> {
        crate::metrics::timed("CancelRefresh", async move {
            let req = request.into_inner();
            validate_name("collection", &req.collection)?;
            let coll = self.engine.get(&req.collection)?;
            let what = self.engine.cancel_refresh(&coll).await?;
            Ok(Response::new(pb::CancelRefreshResponse { cancelled: what.is_some(), what: what.unwrap_or_else(|| "nothing was running".into()) }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::load_with_env(None, &Default::default(), Some(Default::default())).unwrap()
    }

    fn req(queries: usize, options: pb::MineOptions) -> pb::MineRequest {
        pb::MineRequest {
            collection: "c".into(),
            batch_id: 0,
            queries: (0..queries).map(|_| pb::Query { text: "wing flutter".into(), ..Default::default() }).collect(),
            options: Some(options),
            min_generation: None,
        }
    }

    fn refused(options: pb::MineOptions, queries: usize) -> String {
        match validate_mine(&req(queries, options), &cfg()) {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("accepted or wrong error: {other:?}"),
        }
    }

    #[test]
    fn preset_fills_only_what_the_request_leaves_unset() {
        let base = pb::MineOptions { num_negatives: 5, preset: pb::Preset::Denoised as i32, ..Default::default() };
        let p = validate_mine(&req(1, base.clone()), &cfg()).unwrap();
        assert_eq!(p.filters.relative_margin, Some(DENOISED_RELATIVE_MARGIN));
        assert_eq!(p.filters.max_positive_similarity, Some(DENOISED_MAX_POSITIVE_SIMILARITY));
        assert!(p.adaptive_depth);
        let own = pb::MineOptions { relative_margin: Some(0.1), adaptive_depth: Some(false), ..base };
        let p = validate_mine(&req(1, own), &cfg()).unwrap();
        assert_eq!(p.filters.relative_margin, Some(0.1));
        assert_eq!(p.filters.max_positive_similarity, Some(DENOISED_MAX_POSITIVE_SIMILARITY));
        assert!(!p.adaptive_depth);
        let none = validate_mine(&req(1, pb::MineOptions { num_negatives: 5, ..Default::default() }), &cfg()).unwrap();
        assert_eq!((none.filters.relative_margin, none.filters.max_positive_similarity), (None, None));
    }

    #[test]
    fn rerank_options_are_bounded_and_named() {
        let rerank = pb::MineOptions { num_negatives: 5, rerank: Some(true), ..Default::default() };
        let p = validate_mine(&req(2, rerank.clone()), &cfg()).unwrap().rerank.unwrap();
        assert_eq!((p.candidates, p.max_scored), (15, 60), "3 x num_negatives, 4 rounds");
        let cases = [
            (pb::MineOptions { ce_max_score: Some(0.0), ..rerank.clone() }, 1, "options.ce_max_score"),
            (pb::MineOptions { ce_max_score: Some(f32::NAN), ..rerank.clone() }, 1, "options.ce_max_score"),
            (pb::MineOptions { ce_relative_margin: Some(1.0), ..rerank.clone() }, 1, "options.ce_relative_margin"),
            (pb::MineOptions { rerank_candidates: Some(4), ..rerank.clone() }, 1, "options.rerank_candidates"),
            (pb::MineOptions { rerank_candidates: Some(257), ..rerank.clone() }, 1, "options.rerank_candidates"),
            (pb::MineOptions { rerank_candidates: Some(200), ..rerank.clone() }, 21, "options.rerank_candidates"),
            (pb::MineOptions { ce_max_score: Some(0.1), rerank: None, ..rerank.clone() }, 1, "options.ce_max_score"),
            (pb::MineOptions { max_positive_similarity: Some(-1.5), ..rerank.clone() }, 1, "options.max_positive_similarity"),
        ];
        for (options, queries, field) in cases {
            assert_eq!(refused(options, queries), field);
        }
        let ok = pb::MineOptions { ce_max_score: Some(1.0), ce_relative_margin: Some(0.0), rerank_candidates: Some(5), ..rerank };
        assert!(validate_mine(&req(1, ok), &cfg()).is_ok());
    }

    #[test]
    fn checkpoint_paths_stay_under_the_models_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("models/step-1")).unwrap();
        std::fs::create_dir_all(root.path().join("elsewhere")).unwrap();
        std::fs::write(root.path().join("models/file"), b"x").unwrap();
        let models = root.path().join("models");
        let ok = resolve_checkpoint("step-1", &models).unwrap();
        assert_eq!(ok, models.join("step-1").canonicalize().unwrap());
        assert_eq!(resolve_checkpoint(models.join("step-1").to_str().unwrap(), &models).unwrap(), ok, "absolute inside is fine");
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.path().join("elsewhere"), models.join("link")).unwrap();
        for bad in ["", "../elsewhere", "step-1/../../elsewhere", "missing", "file", "link", "."] {
            assert!(matches!(resolve_checkpoint(bad, &models), Err(Error::InvalidArgument { .. })), "{bad:?} accepted");
        }
        let outside = root.path().join("elsewhere");
        assert!(resolve_checkpoint(outside.to_str().unwrap(), &models).is_err());
    }
}
