//! A Mine batch, stage by stage: pick the generation that answers, encode the inputs, resolve
//! the positives, run the search/rerank loop ([`crate::mine::pipeline`]) over this generation's
//! index and documents, then sample and collect. One generation answers the whole batch, even
//! if a refresh swaps meanwhile.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use super::collection::{Collection, Generation};
use super::{Engine, blocking};
use crate::encode::{Reranker, TextKind};
use crate::error::{Error, Result};
use crate::index::{Hit, Metric};
use crate::mine::pipeline::{self, Corpus, Mined, Queries, Scorer};
use crate::mine::{self, MineBatch, MineOutcome, MineQuery, MinedNegative, QueryContext, QueryOutcome, RerankFilters, StageTimings, TextHashes};
use crate::store::Store;

/// The batch's query vectors and positive vectors, once encoded.
struct Encoded {
    queries: Vec<Vec<f32>>,
    /// Per query, its positive texts' vectors.
    positive_texts: Vec<Vec<Vec<f32>>>,
    seconds: f64,
}

/// The batch's positives resolved against the collection.
struct Resolved {
    contexts: Vec<QueryContext>,
    /// Per query, its positive vectors (stored ones, then encoded positive texts).
    positives: Vec<Vec<Vec<f32>>>,
    /// Every positive document of the batch, in query order.
    keys: Vec<u64>,
}

impl Engine {
    /// Mines one validated batch.
    pub async fn mine(&self, batch: &MineBatch) -> Result<MineOutcome> {
        let started = Instant::now();
        let (coll, current) = self.answering(batch).await?;
        let rerank = self.cross_encoder(batch.params.rerank.as_ref()).map(|(r, f)| (CrossEncoder(r), f));
        let encoded = encode_inputs(&current, &batch.queries).await?;
        let resolved = resolve_positives(&coll, &current, batch, encoded.queries.as_slice(), encoded.positive_texts).await?;
        let corpus = GenerationCorpus { store: &self.store, name: &batch.collection, coll: &coll, generation: &current };
        let filters = rerank.as_ref().map(|(_, f)| *f);
        let (pairs, pair_seconds) = positive_pairs(&corpus, filters, &batch.queries, &resolved).await?;
        let texts: Vec<String> = batch.queries.iter().map(|q| q.text.clone()).collect();
        let queries =
            Queries { vectors: &encoded.queries, contexts: &resolved.contexts, positives: &resolved.positives, texts: &texts };
        let max_depth = self.cfg.mining.max_depth as usize;
        let scorer = rerank.as_ref().map(|(s, f)| (s, *f));
        let mut mined = pipeline::run(&corpus, scorer, &queries, &batch.params, max_depth, pairs).await?;
        mined.rerank_seconds += pair_seconds;
        let (results, collect_seconds) = sample_and_collect(&corpus, batch, &mined, &resolved.contexts, filters).await?;
        let timings = StageTimings {
            encode_seconds: encoded.seconds,
            search_seconds: mined.search_seconds,
            filter_seconds: mined.filter_seconds + collect_seconds,
            rerank_seconds: mined.rerank_seconds,
            total_seconds: started.elapsed().as_secs_f64(),
        };
        record_mine(&results, &timings);
        Ok(MineOutcome { batch_id: batch.batch_id, generation: current.meta.number, results, timings })
    }

    /// The collection and the generation that answers the batch (once `min_generation` is
    /// current); query vectors must have its dims.
    async fn answering(&self, batch: &MineBatch) -> Result<(Arc<Collection>, Arc<Generation>)> {
        let coll = self.get(&batch.collection)?;
        if batch.params.rerank.is_some() && self.reranker.is_none() {
            return Err(Error::FailedPrecondition(
                "options.rerank: no cross-encoder is loaded; set reranker.model_dir (or --reranker-dir) on the server".into(),
            ));
        }
        if let Some(min) = batch.min_generation {
            let wait = std::time::Duration::from_secs_f64(self.cfg.mining.min_generation_wait_seconds);
            coll.wait_for_generation(min, wait).await?;
        }
        let current = coll.current();
        let dims = current.dims();
        if current.encoder.is_none() {
            if let Some(i) = batch.queries.iter().position(|q| q.vector.is_empty()) {
                return Err(Error::FailedPrecondition(format!("queries[{i}].vector is empty and {}", current.no_text)));
            }
            if let Some(i) = batch.queries.iter().position(|q| !q.positive_texts.is_empty()) {
                return Err(Error::FailedPrecondition(format!(
                    "queries[{i}].positive_texts: {}; name positives by positive_ids instead",
                    current.no_text
                )));
            }
        }
        for (i, q) in batch.queries.iter().enumerate() {
            if !q.vector.is_empty() && q.vector.len() != dims {
                return Err(Error::invalid(
                    format!("queries[{i}].vector"),
                    format!("has {} dims, collection {:?} (generation {}) has {dims}", q.vector.len(), batch.collection, current.meta.number),
                ));
            }
            if !q.vector.is_empty() && coll.metric == Metric::Cosine && q.vector.iter().all(|x| *x == 0.0) {
                return Err(Error::invalid(
                    format!("queries[{i}].vector"),
                    format!("is all zeros: collection {:?} is cosine, which no zero vector can be compared by", batch.collection),
                ));
            }
        }
        Ok((coll, current))
    }

    /// The cross-encoder with the batch's options for it, when the batch reranks.
    fn cross_encoder<'a>(&'a self, filters: Option<&'a RerankFilters>) -> Option<(&'a Reranker, &'a RerankFilters)> {
        Some((self.reranker.as_ref()?, filters?))
    }
}

/// Encodes query texts (of queries without a vector) as `encode_query` does and positive
/// texts as `encode_document` does, in one job.
async fn encode_inputs(current: &Generation, queries: &[MineQuery]) -> Result<Encoded> {
    let mut texts = Vec::new();
    for q in queries {
        if q.vector.is_empty() {
            texts.push((TextKind::Query, q.text.clone()));
        }
        texts.extend(q.positive_texts.iter().map(|t| (TextKind::Document, t.clone())));
    }
    let started = Instant::now();
    let mut encoded = if texts.is_empty() {
        Vec::new().into_iter()
    } else {
        current.text_encoder()?.encode_as(texts, &current.prompts).await?.into_iter()
    };
    let seconds = started.elapsed().as_secs_f64();
    let dims = current.dims();
    let mut query_vecs = Vec::with_capacity(queries.len());
    let mut positive_texts = Vec::with_capacity(queries.len());
    for q in queries {
        let v = if q.vector.is_empty() { encoded.next().expect("one encoded vector per query text") } else { q.vector.clone() };
        if v.len() != dims {
            return Err(Error::Internal(format!("query vector has {} dims, collection {}", v.len(), dims)));
        }
        query_vecs.push(v);
        positive_texts.push(q.positive_texts.iter().map(|_| encoded.next().expect("one vector per positive text")).collect());
    }
    Ok(Encoded { queries: query_vecs, positive_texts, seconds })
}

/// Each query's positives (ids and text hashes) and the batch's, gathered in one pass under
/// one read of the table so they agree; the query's own text counts as a positive text.
fn positive_contexts(coll: &Collection, queries: &[MineQuery], exclude_batch: bool) -> (Vec<QueryContext>, Vec<u64>) {
    let mut contexts = Vec::with_capacity(queries.len());
    let mut all_keys = Vec::new();
    let mut batch_keys = HashSet::new();
    let mut batch_hashes = HashSet::new();
    let table = coll.docs.read();
    for q in queries {
        let mut ctx = QueryContext::default();
        for id in &q.positive_ids {
            if let Some(&key) = table.by_id.get(id.as_str()) {
                let hashes = table.by_key[&key].hashes;
                ctx.positive_keys.insert(key);
                ctx.positive_hashes.extend(hashes);
                all_keys.push(key);
                if exclude_batch {
                    batch_keys.insert(key);
                    batch_hashes.extend(hashes);
                }
            }
        }
        for t in &q.positive_texts {
            let hash = mine::text_hash(t);
            ctx.positive_hashes.insert(hash);
            if exclude_batch {
                batch_hashes.insert(hash);
            }
        }
        if q.vector.is_empty() || !q.text.trim().is_empty() {
            ctx.positive_hashes.insert(mine::text_hash(&q.text));
        }
        contexts.push(ctx);
    }
    // Own positives are dropped as positives before the batch check, so the batch sets may
    // hold the whole batch.
    let (batch_keys, batch_hashes) = (Arc::new(batch_keys), Arc::new(batch_hashes));
    for ctx in &mut contexts {
        ctx.batch_keys = batch_keys.clone();
        ctx.batch_hashes = batch_hashes.clone();
    }
    (contexts, all_keys)
}

/// Resolves the positives and scores each query against its lowest-scoring positive.
async fn resolve_positives(
    coll: &Collection,
    current: &Generation,
    batch: &MineBatch,
    query_vecs: &[Vec<f32>],
    mut positive_text_vecs: Vec<Vec<Vec<f32>>>,
) -> Result<Resolved> {
    let (mut contexts, keys) = positive_contexts(coll, &batch.queries, batch.params.filters.exclude_batch_positives);
    // The positives' vectors as this generation holds them (documents pending a vector have
    // none, and then no score).
    let stored = if keys.is_empty() { HashMap::new() } else { current.index.vectors(keys.clone()).await? };
    let mut positives = Vec::with_capacity(contexts.len());
    for (i, ctx) in contexts.iter_mut().enumerate() {
        let vecs: Vec<Vec<f32>> = sorted(&ctx.positive_keys)
            .iter()
            .filter_map(|k| stored.get(k).cloned())
            .chain(positive_text_vecs[i].drain(..))
            .collect();
        ctx.positive_score = vecs.iter().map(|p| coll.metric.score(&query_vecs[i], p)).reduce(f32::min);
        positives.push(vecs);
    }
    Ok(Resolved { contexts, positives, keys })
}

fn sorted(keys: &HashSet<u64>) -> Vec<u64> {
    let mut keys: Vec<u64> = keys.iter().copied().collect();
    keys.sort_unstable();
    keys
}

/// The (query, positive text) pairs the cross-encoder scores first; only the relative margin
/// needs the positives' cross-encoder scores.
async fn positive_pairs(
    corpus: &GenerationCorpus<'_>,
    rerank: Option<&RerankFilters>,
    queries: &[MineQuery],
    resolved: &Resolved,
) -> Result<(Vec<(usize, String)>, f64)> {
    if !rerank.is_some_and(|f| f.relative_margin.is_some()) {
        return Ok((Vec::new(), 0.0));
    }
    let started = Instant::now();
    let stored = if resolved.keys.is_empty() { HashMap::new() } else { corpus.texts(resolved.keys.clone()).await? };
    let mut pairs = Vec::new();
    for (i, (q, ctx)) in queries.iter().zip(&resolved.contexts).enumerate() {
        pairs.extend(sorted(&ctx.positive_keys).iter().filter_map(|k| stored.get(k)).map(|text| (i, text.clone())));
        pairs.extend(q.positive_texts.iter().map(|t| (i, t.clone())));
    }
    Ok((pairs, started.elapsed().as_secs_f64()))
}

/// Samples each query's negatives, then looks up their ids (and texts when asked); returns
/// the answers and the seconds spent.
async fn sample_and_collect(
    corpus: &GenerationCorpus<'_>,
    batch: &MineBatch,
    mined: &Mined,
    contexts: &[QueryContext],
    rerank: Option<&RerankFilters>,
) -> Result<(Vec<QueryOutcome>, f64)> {
    let started = Instant::now();
    let params = &batch.params;
    let seed = params.seed.unwrap_or_else(rand::random);
    let sampled = mined.sample(params, rerank, contexts, seed);
    let texts: HashMap<u64, String> = if params.return_text {
        corpus.texts(sampled.iter().flat_map(|(picked, _)| picked.iter().map(|s| s.key)).collect()).await?
    } else {
        HashMap::new()
    };
    let table = corpus.coll.docs.read();
    let results = batch
        .queries
        .iter()
        .zip(sampled)
        .zip(contexts)
        .enumerate()
        .map(|(i, ((q, (picked, dropped)), ctx))| QueryOutcome {
            query_id: q.id.clone(),
            negatives: picked
                .into_iter()
                .filter_map(|s| {
                    let entry = table.by_key.get(&s.key)?;
                    let text = texts.get(&s.key).cloned().unwrap_or_default();
                    Some(MinedNegative { id: entry.id.to_string(), text, score: s.score, rank: s.rank, ce_score: s.ce })
                })
                .collect(),
            dropped,
            depth: mined.plans[i].window_end as u32,
            positive_score: ctx.positive_score,
            positive_ce_score: mined.states.get(i).and_then(|s| s.positive_ce),
        })
        .collect();
    Ok((results, started.elapsed().as_secs_f64()))
}

/// Stage durations, queries and negatives served, and candidates dropped by reason.
fn record_mine(results: &[QueryOutcome], t: &StageTimings) {
    use crate::metrics::{DROPPED, NEGATIVES, QUERIES, stage};
    stage("encode", t.encode_seconds);
    stage("search", t.search_seconds);
    stage("filter", t.filter_seconds);
    if t.rerank_seconds > 0.0 {
        stage("rerank", t.rerank_seconds);
    }
    metrics::counter!(QUERIES).increment(results.len() as u64);
    metrics::counter!(NEGATIVES).increment(results.iter().map(|r| r.negatives.len() as u64).sum());
    let mut totals = [0u64; 9];
    for d in results.iter().map(|r| &r.dropped) {
        let counts = [d.positive, d.duplicate_text, d.batch_positive, d.window, d.score_bound, d.margin, d.positive_similarity, d.ce_score, d.ce_margin];
        for (t, c) in totals.iter_mut().zip(counts) {
            *t += c as u64;
        }
    }
    let reasons = ["positive", "duplicate_text", "batch_positive", "window", "score_bound", "margin", "positive_similarity", "ce_score", "ce_margin"];
    for (reason, n) in reasons.into_iter().zip(totals) {
        metrics::counter!(DROPPED, "reason" => reason).increment(n);
    }
}

/// One generation of a collection, as the mining loop reads it.
struct GenerationCorpus<'a> {
    store: &'a Arc<Store>,
    name: &'a str,
    coll: &'a Collection,
    generation: &'a Generation,
}

impl Corpus for GenerationCorpus<'_> {
    fn indexed(&self) -> usize {
        self.generation.index.len()
    }

    async fn search(&self, requests: Vec<(Vec<f32>, usize)>) -> Result<Vec<Vec<Hit>>> {
        Ok(self.generation.index.search(requests).await?)
    }

    async fn vectors(&self, keys: Vec<u64>) -> Result<HashMap<u64, Vec<f32>>> {
        Ok(self.generation.index.vectors(keys).await?)
    }

    fn hashes(&self, hits: &[Vec<Hit>]) -> Vec<Vec<Option<TextHashes>>> {
        let table = self.coll.docs.read();
        hits.iter().map(|hits| hits.iter().map(|h| table.by_key.get(&h.key).map(|d| d.hashes)).collect()).collect()
    }

    async fn texts(&self, keys: Vec<u64>) -> Result<HashMap<u64, String>> {
        let store = self.store.clone();
        let name = self.name.to_string();
        let docs = blocking(move || Ok(store.docs(&name, &keys)?)).await?;
        Ok(docs.into_iter().map(|(k, d)| (k, d.encoded_text())).collect())
    }
}

/// The loaded cross-encoder as the mining loop's scorer.
struct CrossEncoder<'a>(&'a Reranker);

impl Scorer for CrossEncoder<'_> {
    async fn score(&self, pairs: Vec<(String, String)>) -> Result<Vec<f32>> {
        Ok(self.0.score(pairs).await?)
    }
}
