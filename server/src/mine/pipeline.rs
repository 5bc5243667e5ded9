//! The search/rerank loop of a batch: search every query that still needs it, filter, score
//! survivors with the cross-encoder (wider when too few pass), and search deeper for the
//! queries left short, until every answer is final; then sample. The index and documents are
//! reached through [`Corpus`] and the cross-encoder through [`Scorer`], so tests drive this
//! very loop with a deterministic index and scorer.
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Candidate, DepthPlan, DropCounts, MineParams, QueryContext, RerankFilters, RerankState, Selection, Survivor, TextHashes};
use crate::error::Result;
use crate::index::{Hit, Metric};

/// The generation a batch is mined from: its index and its documents.
pub trait Corpus: Sync {
    /// Vectors in the index.
    fn indexed(&self) -> usize;
    /// For each (query vector, count), the `count` nearest documents, best first.
    fn search(&self, requests: Vec<(Vec<f32>, usize)>) -> impl Future<Output = Result<Vec<Vec<Hit>>>> + Send;
    /// The indexed vectors of `keys`; keys without one are left out.
    fn vectors(&self, keys: Vec<u64>) -> impl Future<Output = Result<HashMap<u64, Vec<f32>>>> + Send;
    /// Each hit's document text hashes, None where the document is gone (read at one instant).
    fn hashes(&self, hits: &[Vec<Hit>]) -> Vec<Vec<Option<TextHashes>>>;
    /// The texts (title + text) of the documents of `keys` still stored.
    fn texts(&self, keys: Vec<u64>) -> impl Future<Output = Result<HashMap<u64, String>>> + Send;
}

/// The cross-encoder: each (query, document) pair's probability of relevance, in order.
pub trait Scorer: Sync {
    fn score(&self, pairs: Vec<(String, String)>) -> impl Future<Output = Result<Vec<f32>>> + Send;
}

/// The batch as the loop sees it, per query in request order.
pub struct Queries<'a> {
    pub vectors: &'a [Vec<f32>],
    pub contexts: &'a [QueryContext],
    /// Each query's positive vectors, for the positive-neighbourhood filter.
    pub positives: &'a [Vec<Vec<f32>>],
    /// Each query's text: the cross-encoder scores (query text, document) pairs.
    pub texts: &'a [String],
}

/// Where the loop left each query, and the time it spent per stage.
pub struct Mined {
    pub plans: Vec<DepthPlan>,
    selections: Vec<Option<Selection>>,
    /// Per query when the batch reranks, else empty.
    pub states: Vec<RerankState>,
    /// (query, positive text) pairs still to be scored: the first rerank round scores them.
    positive_pairs: Vec<(usize, String)>,
    pub search_seconds: f64,
    pub filter_seconds: f64,
    pub rerank_seconds: f64,
}

/// Runs the loop. `rerank` is the cross-encoder and the batch's options for it, when the batch
/// reranks; `positive_pairs` are the positives' texts it scores for the relative margin.
pub async fn run<C: Corpus, S: Scorer>(
    corpus: &C,
    rerank: Option<(&S, &RerankFilters)>,
    queries: &Queries<'_>,
    params: &MineParams,
    max_depth: usize,
    positive_pairs: Vec<(usize, String)>,
) -> Result<Mined> {
    let mut m = Mined::start(queries.contexts, params, rerank.map(|(_, f)| f), positive_pairs);
    let mut pending: Vec<usize> = (0..m.plans.len()).collect();
    while !pending.is_empty() {
        let indexed = corpus.indexed().max(1);
        let returned = m.search_round(corpus, queries, params, &pending, indexed).await?;
        if let Some((scorer, f)) = rerank {
            m.rerank_round(corpus, scorer, queries, f, params, &pending).await?;
        }
        pending = m.deepen(&pending, &returned, indexed, params, rerank.map(|(_, f)| f), max_depth);
    }
    Ok(m)
}

impl Mined {
    fn start(contexts: &[QueryContext], params: &MineParams, rerank: Option<&RerankFilters>, positive_pairs: Vec<(usize, String)>) -> Self {
        let plans: Vec<DepthPlan> = contexts
            .iter()
            .map(|c| DepthPlan::initial(params.range_max, c.positive_keys.len() + c.batch_keys.len().min(256)))
            .collect();
        Self {
            selections: vec![None; plans.len()],
            states: rerank.map(|f| contexts.iter().map(|_| RerankState::new(f)).collect()).unwrap_or_default(),
            plans,
            positive_pairs,
            search_seconds: 0.0,
            filter_seconds: 0.0,
            rerank_seconds: 0.0,
        }
    }

    /// Query `i`'s selection from its latest search.
    pub fn selection(&self, i: usize) -> &Selection {
        self.selections[i].as_ref().expect("every query is searched at least once")
    }

    /// Searches the `pending` queries at their planned depths and filters the hits; returns
    /// how many hits each search returned.
    async fn search_round<C: Corpus>(&mut self, corpus: &C, q: &Queries<'_>, params: &MineParams, pending: &[usize], indexed: usize) -> Result<Vec<usize>> {
        let t_search = Instant::now();
        let requests: Vec<(Vec<f32>, usize)> =
            pending.iter().map(|&i| (q.vectors[i].clone(), self.plans[i].search_depth.min(indexed))).collect();
        let results = corpus.search(requests).await?;
        let hit_vectors = if params.filters.max_positive_similarity.is_some() {
            let keys: HashSet<u64> = pending
                .iter()
                .zip(&results)
                .filter(|(i, _)| !q.positives[**i].is_empty())
                .flat_map(|(_, hits)| hits.iter().map(|h| h.key))
                .collect();
            corpus.vectors(keys.into_iter().collect()).await?
        } else {
            HashMap::new()
        };
        self.search_seconds += t_search.elapsed().as_secs_f64();
        let t_filter = Instant::now();
        let hashes = corpus.hashes(&results);
        let mut returned = Vec::with_capacity(pending.len());
        for ((&i, hits), hashes) in pending.iter().zip(results).zip(hashes) {
            returned.push(hits.len());
            let cands: Vec<Candidate> = hits
                .into_iter()
                .zip(hashes)
                .filter_map(|(h, hashes)| {
                    let positive_similarity = hit_vectors
                        .get(&h.key)
                        .and_then(|v| q.positives[i].iter().map(|p| Metric::Cosine.score(v, p)).reduce(f32::max));
                    Some(Candidate { key: h.key, score: h.score, hashes: hashes?, positive_similarity })
                })
                .collect();
            self.selections[i] = Some(super::select(&cands, &q.contexts[i], &params.filters, self.plans[i].window_end));
        }
        self.filter_seconds += t_filter.elapsed().as_secs_f64();
        Ok(returned)
    }

    /// Scores the survivors of the `pending` queries within their budgets, widening a budget
    /// while the thresholds leave too few and unscored survivors remain.
    async fn rerank_round<C: Corpus, S: Scorer>(
        &mut self,
        corpus: &C,
        scorer: &S,
        q: &Queries<'_>,
        f: &RerankFilters,
        params: &MineParams,
        pending: &[usize],
    ) -> Result<()> {
        let t = Instant::now();
        let mut to_score = pending.to_vec();
        while !to_score.is_empty() {
            let mut wanted: Vec<(usize, u64)> = Vec::new();
            for &i in &to_score {
                wanted.extend(self.states[i].unscored(self.selection(i)).into_iter().map(|k| (i, k)));
            }
            let keys: Vec<u64> = wanted.iter().map(|&(_, k)| k).collect();
            let docs = if keys.is_empty() { HashMap::new() } else { corpus.texts(keys).await? };
            // A document deleted since the search cannot be scored: it is not returned.
            wanted.retain(|(_, k)| docs.contains_key(k));
            let mut pairs: Vec<(String, String)> =
                self.positive_pairs.iter().map(|(i, text)| (q.texts[*i].clone(), text.clone())).collect();
            pairs.extend(wanted.iter().map(|(i, k)| (q.texts[*i].clone(), docs[k].clone())));
            let scores = scorer.score(pairs).await?;
            let (pos_scores, cand_scores) = scores.split_at(self.positive_pairs.len());
            for (&(i, _), &p) in self.positive_pairs.iter().zip(pos_scores) {
                let state = &mut self.states[i];
                state.positive_ce = Some(state.positive_ce.map_or(p, |q| q.min(p)));
            }
            self.positive_pairs.clear();
            for (&(i, key), &ce) in wanted.iter().zip(cand_scores) {
                self.states[i].scores.insert(key, ce);
            }
            to_score = self.widen(&to_score, f, params);
        }
        self.rerank_seconds += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// The queries whose budget widened: the filter left too few of them.
    fn widen(&mut self, scored: &[usize], f: &RerankFilters, params: &MineParams) -> Vec<usize> {
        let mut widened = Vec::new();
        for &i in scored {
            let sel = self.selections[i].as_ref().expect("selected this round");
            let state = &mut self.states[i];
            let passed = state.apply(sel, f).survivors.len();
            // A survivor that vanished before scoring must not loop forever.
            let before = state.budget;
            if params.adaptive_depth && state.widen(sel, passed, params.num_negatives, f) && state.budget > before {
                widened.push(i);
            }
        }
        widened
    }

    /// Plans the next search of each `pending` query; returns those that need one.
    fn deepen(
        &mut self,
        pending: &[usize],
        returned: &[usize],
        indexed: usize,
        params: &MineParams,
        rerank: Option<&RerankFilters>,
        max_depth: usize,
    ) -> Vec<usize> {
        let mut next_pending = Vec::new();
        for (&i, &returned) in pending.iter().zip(returned) {
            let sel = self.selection(i);
            let have = match rerank {
                // Nothing more may be scored: a deeper search cannot help.
                Some(f) if self.states[i].scores.len() >= f.max_scored => usize::MAX,
                Some(f) => self.states[i].apply(sel, f).survivors.len(),
                None => sel.survivors.len(),
            };
            if let Some(next) = self.plans[i].next(sel, have, returned, indexed, params.num_negatives, params.adaptive_depth, max_depth) {
                self.plans[i] = next;
                next_pending.push(i);
            }
        }
        next_pending
    }

    /// Each query's sampled negatives and what its filters dropped; query `i` samples from a
    /// generator seeded with `seed` and `i`, around its positive's score (`contexts[i]`) when
    /// the sampling asks for it.
    pub fn sample(&self, params: &MineParams, rerank: Option<&RerankFilters>, contexts: &[QueryContext], seed: u64) -> Vec<(Vec<Survivor>, DropCounts)> {
        (0..self.plans.len())
            .map(|i| {
                let sel = self.selection(i);
                let mut counts = sel.dropped;
                let reranked;
                let survivors = match rerank {
                    Some(f) => {
                        reranked = self.states[i].apply(sel, f);
                        counts.ce_score = reranked.dropped_score;
                        counts.ce_margin = reranked.dropped_margin;
                        &reranked.survivors
                    }
                    None => &sel.survivors,
                };
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let positive_score = contexts.get(i).and_then(|c| c.positive_score);
                (super::sample(survivors, params.num_negatives, params.sampling, positive_score, &mut rng), counts)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::mine::tests::filters;
    use crate::mine::{Filters, Sampling, select, text_hash};

    /// A deterministic index: document i scores 1 - i/100 for every query, text "doc i".
    struct Docs {
        scores: Vec<f32>,
        searches: AtomicUsize,
    }

    fn docs(n: usize) -> Docs {
        Docs { scores: (0..n).map(|i| 1.0 - i as f32 / 100.0).collect(), searches: AtomicUsize::new(0) }
    }

    impl Corpus for Docs {
        fn indexed(&self) -> usize {
            self.scores.len()
        }
        async fn search(&self, requests: Vec<(Vec<f32>, usize)>) -> Result<Vec<Vec<Hit>>> {
            self.searches.fetch_add(1, Ordering::Relaxed);
            Ok(requests
                .iter()
                .map(|(_, count)| self.scores.iter().take(*count).enumerate().map(|(k, &score)| Hit { key: k as u64, score }).collect())
                .collect())
        }
        async fn vectors(&self, _keys: Vec<u64>) -> Result<HashMap<u64, Vec<f32>>> {
            Ok(HashMap::new())
        }
        fn hashes(&self, hits: &[Vec<Hit>]) -> Vec<Vec<Option<TextHashes>>> {
            hits.iter().map(|hs| hs.iter().map(|h| Some([text_hash(&format!("doc {}", h.key)); 2])).collect()).collect()
        }
        async fn texts(&self, keys: Vec<u64>) -> Result<HashMap<u64, String>> {
            Ok(keys.into_iter().map(|k| (k, format!("doc {k}"))).collect())
        }
    }

    /// A deterministic cross-encoder: the document "doc k" scores ce(k).
    struct Ce;

    fn ce(k: u64) -> f32 {
        [0.9, 0.2, 0.05, 0.6, 0.3, 0.01, 0.8, 0.4, 0.15, 0.5][k as usize % 10]
    }

    impl Scorer for Ce {
        async fn score(&self, pairs: Vec<(String, String)>) -> Result<Vec<f32>> {
            Ok(pairs.iter().map(|(_, d)| ce(d.trim_start_matches("doc ").parse().unwrap())).collect())
        }
    }


    fn params(range_max: usize, num_negatives: usize, adaptive_depth: bool, filters: Filters, rerank: Option<RerankFilters>) -> MineParams {
        MineParams { num_negatives, range_max, filters, sampling: Sampling::Top, seed: Some(0), adaptive_depth, return_text: false, rerank }
    }

    /// One query through the real loop.
    fn mine_one(corpus: &Docs, ctx: QueryContext, p: &MineParams, max_depth: usize, positive_pairs: Vec<(usize, String)>) -> Mined {
        let contexts = [ctx];
        let q = Queries { vectors: &[vec![1.0]], contexts: &contexts, positives: &[Vec::new()], texts: &["query".to_string()] };
        let rerank = p.rerank.as_ref().map(|f| (&Ce, f));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(run(corpus, rerank, &q, p, max_depth, positive_pairs)).unwrap()
    }

    fn keys(survivors: &[Survivor]) -> Vec<u64> {
        survivors.iter().map(|s| s.key).collect()
    }

    #[test]
    fn adaptive_depth_searches_deeper_until_enough_or_capped() {
        let c = docs(100);
        let ctx = QueryContext { positive_score: Some(1.0), ..Default::default() };
        let f = Filters { absolute_margin: Some(0.245), ..filters() }; // keys >= 25 survive
        let run = |adaptive: bool, max_depth: usize| {
            let m = mine_one(&c, ctx.clone(), &params(10, 5, adaptive, f.clone(), None), max_depth, Vec::new());
            (m.selection(0).clone(), m.plans[0])
        };
        let (sel, plan) = run(true, 1000);
        assert_eq!(plan.window_end, 40, "10 -> 20 -> 40");
        assert_eq!(keys(&sel.survivors)[..5], [25, 26, 27, 28, 29]);
        let (sel, plan) = run(false, 1000);
        assert!(sel.survivors.is_empty());
        assert_eq!(plan.window_end, 10);
        let (sel, plan) = run(true, 20);
        assert!(sel.survivors.is_empty(), "capped at max_depth");
        assert_eq!(plan.window_end, 20);
    }

    fn rerank_filters(candidates: usize) -> RerankFilters {
        RerankFilters { candidates, max_scored: 100, max_score: None, relative_margin: None }
    }

    #[test]
    fn rerank_scores_the_best_ranked_survivors_and_orders_by_the_cross_encoder() {
        let c = docs(10);
        let f = rerank_filters(5);
        let cands: Vec<Candidate> = (0..10u64)
            .map(|i| Candidate { key: i, score: 1.0 - i as f32 / 100.0, hashes: [text_hash(&format!("doc {i}")); 2], positive_similarity: None })
            .collect();
        let sel = select(&cands, &QueryContext::default(), &filters(), 10);
        assert_eq!(RerankState::new(&f).unscored(&sel), vec![0, 1, 2, 3, 4], "the first rerank_candidates survivors");
        let m = mine_one(&c, QueryContext::default(), &params(10, 3, true, filters(), Some(f.clone())), 1000, Vec::new());
        let state = &m.states[0];
        assert_eq!(m.selection(0), &sel);
        let r = state.apply(&sel, &f);
        assert_eq!(state.scores.len(), 5, "enough passed: nothing deeper scored");
        assert_eq!(r.survivors.iter().map(|s| s.key).collect::<Vec<_>>(), vec![0, 3, 4, 1, 2]);
        assert_eq!(r.survivors[1].ce, Some(0.6));
        assert_eq!(r.survivors[1].score, 0.97, "the bi-encoder score is kept");
        assert_eq!(r.survivors[1].rank, 3);
    }

    #[test]
    fn rerank_thresholds_alone_and_combined() {
        let c = docs(10);
        // The positive's cross-encoder score comes from scoring its text: "doc 9" scores 0.5,
        // "doc 3" 0.6.
        let run = |max_score, relative_margin, positive: Option<&str>| {
            let f = RerankFilters { candidates: 10, max_scored: 100, max_score, relative_margin };
            let pairs = positive.map(|t| vec![(0, t.to_string())]).unwrap_or_default();
            let m = mine_one(&c, QueryContext::default(), &params(10, 1, true, filters(), Some(f.clone())), 1000, pairs);
            let r = m.states[0].apply(m.selection(0), &f);
            let mut kept: Vec<u64> = r.survivors.iter().map(|s| s.key).collect();
            kept.sort_unstable();
            (kept, r.dropped_score, r.dropped_margin)
        };
        // RocketQA-style absolute threshold: drop ce >= 0.5.
        assert_eq!(run(Some(0.5), None, None), (vec![1, 2, 4, 5, 7, 8], 4, 0));
        // Relative to the positive's 0.5: drop ce >= 0.5 * (1 - 0.2) = 0.4.
        assert_eq!(run(None, Some(0.2), Some("doc 9")), (vec![1, 2, 4, 5, 8], 0, 5));
        // Without a positive score the margin does nothing.
        assert_eq!(run(None, Some(0.2), None).0.len(), 10);
        // Both: the absolute threshold is counted first.
        assert_eq!(run(Some(0.7), Some(0.5), Some("doc 3")), (vec![1, 2, 5, 8], 2, 4));
    }

    #[test]
    fn rerank_scores_deeper_then_searches_deeper_when_the_filter_leaves_too_few() {
        // 40 candidates; the cross-encoder passes only keys with ce < 0.1 (k % 10 in {2, 5}).
        let c = docs(40);
        let f = RerankFilters { candidates: 4, max_scored: 100, max_score: Some(0.1), relative_margin: None };
        let m = mine_one(&c, QueryContext::default(), &params(10, 5, true, filters(), Some(f.clone())), 1000, Vec::new());
        let (sel, plan, state) = (m.selection(0), m.plans[0], &m.states[0]);
        let r = state.apply(sel, &f);
        assert_eq!(r.survivors.iter().map(|s| s.key).collect::<Vec<_>>(), vec![2, 12, 22, 5, 15], "hardest (highest probability) first, rank order on ties");
        assert_eq!(plan.window_end, 40, "10 -> 20 -> 40");
        assert!(c.searches.load(Ordering::Relaxed) >= 3);
        assert_eq!(state.scores.len(), sel.survivors.len().min(state.budget));
        assert_eq!(r.dropped_score as usize + r.survivors.len(), state.scores.len());
        // Never more than max_scored pairs per query.
        let capped = RerankFilters { max_scored: 6, ..f.clone() };
        let m = mine_one(&docs(40), QueryContext::default(), &params(40, 5, true, filters(), Some(capped.clone())), 1000, Vec::new());
        let r = m.states[0].apply(m.selection(0), &capped);
        assert_eq!(m.states[0].scores.len(), 6);
        assert_eq!(r.survivors.iter().map(|s| s.key).collect::<Vec<_>>(), vec![2, 5]);
    }

    #[test]
    fn deeper_search_when_exclusions_eat_the_slack() {
        let c = docs(100);
        // The first 30 documents repeat a positive's text: excluded, and not foreseen by the
        // first search's slack.
        let ctx = QueryContext { positive_hashes: (0..30).map(|i| text_hash(&format!("doc {i}"))).collect(), ..Default::default() };
        let m = mine_one(&c, ctx, &params(5, 5, false, filters(), None), 1000, Vec::new()); // asks for 13 hits first
        assert_eq!(keys(&m.selection(0).survivors), vec![30, 31, 32, 33, 34]);
        assert_eq!(m.plans[0].window_end, 5);
        assert!(c.searches.load(Ordering::Relaxed) >= 3);
    }

    #[test]
    fn sampling_is_seeded_per_query_and_counts_the_cross_encoder_drops() {
        let c = docs(10);
        let f = RerankFilters { candidates: 10, max_scored: 100, max_score: Some(0.5), relative_margin: None };
        let mut p = params(10, 2, true, filters(), Some(f.clone()));
        p.sampling = Sampling::Uniform;
        let m = mine_one(&c, QueryContext::default(), &p, 1000, Vec::new());
        let a = m.sample(&p, Some(&f), &[], 7);
        assert_eq!(a, m.sample(&p, Some(&f), &[], 7), "same seed, same negatives");
        let (picked, dropped) = &a[0];
        assert_eq!(picked.len(), 2);
        assert_eq!(dropped.ce_score, 4);
        assert!(picked.iter().all(|s| s.ce.is_some_and(|ce| ce < 0.5)));
    }
}
