//! The mining logic of one query, free of I/O so it can be tested with a deterministic scorer:
//! exclude (positives, duplicate texts, batch positives), filter (rank window, score bounds,
//! positive-aware margins, similarity to the positives), rerank (cross-encoder thresholds),
//! decide whether to score or search deeper, and sample.
pub mod sample;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

pub use sample::{Sampling, sample};

/// Lowercased, whitespace-collapsed text: what "the same text" means for exclusion.
pub fn normalize_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

/// Stable-within-a-process hash of the normalized text.
pub fn text_hash(text: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    normalize_text(text).hash(&mut h);
    h.finish()
}

/// The text hashes of a document: its text, and title + text when it has a title.
pub type TextHashes = [u64; 2];

/// A search hit with what the filters need to know about the document.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub key: u64,
    pub score: f32,
    pub hashes: TextHashes,
    /// Highest cosine similarity of the document to one of the query's positives, when the
    /// positive-neighbourhood filter is on and the query has positive vectors.
    pub positive_similarity: Option<f32>,
}

/// Everything known about one query's positives and its batch.
#[derive(Debug, Clone, Default)]
pub struct QueryContext {
    pub positive_keys: HashSet<u64>,
    /// Hashes of positive texts (given, and of positive documents) and of the query text.
    pub positive_hashes: HashSet<u64>,
    /// Other queries' positives in the same batch (shared by every query of the batch).
    pub batch_keys: Arc<HashSet<u64>>,
    pub batch_hashes: Arc<HashSet<u64>>,
    /// Score of the lowest-scoring positive, when one could be scored.
    pub positive_score: Option<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Filters {
    pub range_min: usize,
    pub min_score: Option<f32>,
    pub max_score: Option<f32>,
    pub absolute_margin: Option<f32>,
    pub relative_margin: Option<f32>,
    /// Drop a candidate more similar than this to one of the positives.
    pub max_positive_similarity: Option<f32>,
    pub exclude_batch_positives: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub positive: u32,
    pub duplicate_text: u32,
    pub batch_positive: u32,
    pub window: u32,
    pub score_bound: u32,
    pub margin: u32,
    pub positive_similarity: u32,
    pub ce_score: u32,
    pub ce_margin: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Survivor {
    pub key: u64,
    /// Bi-encoder score.
    pub score: f32,
    /// 0-based rank among non-excluded candidates.
    pub rank: u32,
    /// Cross-encoder probability, when reranked.
    pub ce: Option<f32>,
}

impl Survivor {
    /// The score survivors are ordered and sampled by: the cross-encoder's when reranked.
    pub fn order_score(&self) -> f32 {
        self.ce.unwrap_or(self.score)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    pub survivors: Vec<Survivor>,
    pub dropped: DropCounts,
    /// Non-excluded candidates ranked (at most the window's end).
    pub ranked: usize,
}

impl Filters {
    /// The score at or above which a candidate is too close to the positive, if any margin applies.
    pub fn margin_threshold(&self, positive_score: Option<f32>) -> Option<f32> {
        let pos = positive_score?;
        let abs = self.absolute_margin.map(|m| pos - m);
        let rel = self.relative_margin.map(|m| pos * (1.0 - m));
        match (abs, rel) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        }
    }
}

/// Walks candidates best first, dropping and counting, until `window_end` non-excluded
/// candidates have been ranked or the candidates run out.
pub fn select(cands: &[Candidate], ctx: &QueryContext, f: &Filters, window_end: usize) -> Selection {
    let mut sel = Selection::default();
    let threshold = f.margin_threshold(ctx.positive_score);
    let mut seen: HashSet<u64> = HashSet::new();
    for c in cands {
        if sel.ranked >= window_end {
            break;
        }
        if ctx.positive_keys.contains(&c.key) {
            sel.dropped.positive += 1;
            continue;
        }
        if c.hashes.iter().any(|h| ctx.positive_hashes.contains(h) || seen.contains(h)) {
            sel.dropped.duplicate_text += 1;
            continue;
        }
        if f.exclude_batch_positives
            && (ctx.batch_keys.contains(&c.key) || c.hashes.iter().any(|h| ctx.batch_hashes.contains(h)))
        {
            sel.dropped.batch_positive += 1;
            continue;
        }
        seen.extend(c.hashes);
        let rank = sel.ranked;
        sel.ranked += 1;
        if rank < f.range_min {
            sel.dropped.window += 1;
            continue;
        }
        if f.min_score.is_some_and(|m| c.score < m) || f.max_score.is_some_and(|m| c.score > m) {
            sel.dropped.score_bound += 1;
            continue;
        }
        if threshold.is_some_and(|t| c.score >= t) {
            sel.dropped.margin += 1;
            continue;
        }
        if let (Some(limit), Some(sim)) = (f.max_positive_similarity, c.positive_similarity) {
            if sim > limit {
                sel.dropped.positive_similarity += 1;
                continue;
            }
        }
        sel.survivors.push(Survivor { key: c.key, score: c.score, rank: rank as u32, ce: None });
    }
    sel
}

/// Cross-encoder options of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct RerankFilters {
    /// Survivors scored per round, best bi-encoder rank first.
    pub candidates: usize,
    /// Survivors scored per query over all rounds at most.
    pub max_scored: usize,
    pub max_score: Option<f32>,
    pub relative_margin: Option<f32>,
}

/// One query's reranking so far: the cross-encoder scores already computed (kept across
/// deeper searches, so no pair is scored twice) and how many survivors may be scored now.
#[derive(Debug, Clone, Default)]
pub struct RerankState {
    pub scores: HashMap<u64, f32>,
    pub budget: usize,
    /// The lowest cross-encoder probability of the query's positives, when known.
    pub positive_ce: Option<f32>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reranked {
    /// Scored survivors that passed, best cross-encoder probability first.
    pub survivors: Vec<Survivor>,
    pub dropped_score: u32,
    pub dropped_margin: u32,
}

impl RerankState {
    pub fn new(f: &RerankFilters) -> Self {
        Self { scores: HashMap::new(), budget: f.candidates.min(f.max_scored), positive_ce: None }
    }

    /// Survivors within the budget that still need a cross-encoder score.
    pub fn unscored(&self, sel: &Selection) -> Vec<u64> {
        sel.survivors.iter().take(self.budget).map(|s| s.key).filter(|k| !self.scores.contains_key(k)).collect()
    }

    /// Applies the cross-encoder thresholds to the scored survivors within the budget.
    pub fn apply(&self, sel: &Selection, f: &RerankFilters) -> Reranked {
        let margin = match (self.positive_ce, f.relative_margin) {
            (Some(p), Some(m)) => Some(p * (1.0 - m)),
            _ => None,
        };
        let mut out = Reranked::default();
        for s in sel.survivors.iter().take(self.budget) {
            let Some(&ce) = self.scores.get(&s.key) else { continue };
            if f.max_score.is_some_and(|m| ce >= m) {
                out.dropped_score += 1;
            } else if margin.is_some_and(|t| ce >= t) {
                out.dropped_margin += 1;
            } else {
                out.survivors.push(Survivor { ce: Some(ce), ..*s });
            }
        }
        out.survivors.sort_by(|a, b| b.order_score().total_cmp(&a.order_score()).then(a.rank.cmp(&b.rank)));
        out
    }

    /// Widens the budget when too few passed and unscored survivors remain; false when the
    /// only way to find more is a deeper search (or there is none).
    pub fn widen(&mut self, sel: &Selection, passed: usize, wanted: usize, f: &RerankFilters) -> bool {
        if passed >= wanted || sel.survivors.len() <= self.budget || self.scores.len() >= f.max_scored {
            return false;
        }
        let room = f.max_scored - self.scores.len();
        self.budget += f.candidates.max(wanted - passed).min(room).max(1);
        true
    }
}

/// How deep to look: rank window end, and how many hits to ask the index for (the window
/// plus room for excluded candidates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthPlan {
    pub window_end: usize,
    pub search_depth: usize,
}

impl DepthPlan {
    pub fn initial(range_max: usize, exclusions: usize) -> Self {
        Self { window_end: range_max, search_depth: range_max + exclusions + 8 }
    }

    /// The next search after `sel` came from a search that returned `returned` hits out of
    /// `indexed` documents and left `have` usable negatives (survivors, or survivors that
    /// passed the cross-encoder); `None` when the answer is final.
    #[allow(clippy::too_many_arguments)]
    pub fn next(
        self,
        sel: &Selection,
        have: usize,
        returned: usize,
        indexed: usize,
        wanted: usize,
        adaptive: bool,
        max_depth: usize,
    ) -> Option<Self> {
        let more_in_index = returned >= self.search_depth && self.search_depth < indexed;
        // Exclusions ate the slack: same window, more hits, within a bound so a batch full of
        // duplicates cannot pull the whole index into every query.
        let depth_cap = max_depth.saturating_mul(4).max(self.window_end * 2);
        if sel.ranked < self.window_end && more_in_index && self.search_depth < depth_cap {
            return Some(Self { window_end: self.window_end, search_depth: (self.search_depth * 2).min(indexed).min(depth_cap) });
        }
        let window_full = sel.ranked >= self.window_end;
        if have < wanted && adaptive && window_full && self.window_end < max_depth {
            let window_end = (self.window_end * 2).min(max_depth);
            let slack = self.search_depth.saturating_sub(self.window_end);
            return Some(Self { window_end, search_depth: window_end + slack });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic scorer: candidate i scores 1 - i/100, text "doc i".
    fn cands(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate { key: i as u64, score: 1.0 - i as f32 / 100.0, hashes: [text_hash(&format!("doc {i}")); 2], positive_similarity: None })
            .collect()
    }

    fn filters() -> Filters {
        Filters {
            range_min: 0,
            min_score: None,
            max_score: None,
            absolute_margin: None,
            relative_margin: None,
            max_positive_similarity: None,
            exclude_batch_positives: true,
        }
    }

    fn keys(sel: &Selection) -> Vec<u64> {
        sel.survivors.iter().map(|s| s.key).collect()
    }

    #[test]
    fn normalization_ignores_case_and_spacing() {
        assert_eq!(normalize_text("  The  Wing\tFLOW \n"), "the wing flow");
        assert_eq!(text_hash("A b"), text_hash("a   B"));
        assert_ne!(text_hash("a b"), text_hash("ab"));
    }

    #[test]
    fn positives_duplicates_and_batch_positives_are_excluded_and_do_not_take_ranks() {
        let mut c = cands(10);
        c[4].hashes = c[3].hashes; // doc 4 has doc 3's text
        let ctx = QueryContext {
            positive_keys: HashSet::from([0]),
            positive_hashes: HashSet::from([text_hash("DOC 2")]),
            batch_keys: Arc::new(HashSet::from([5])),
            batch_hashes: Arc::new(HashSet::from([text_hash("doc 6")])),
            positive_score: None,
        };
        let sel = select(&c, &ctx, &filters(), 4);
        assert_eq!(keys(&sel), vec![1, 3, 7, 8]);
        assert_eq!(sel.survivors.iter().map(|s| s.rank).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(
            sel.dropped,
            DropCounts { positive: 1, duplicate_text: 2, batch_positive: 2, ..Default::default() }
        );
        let sel = select(&c, &ctx, &Filters { exclude_batch_positives: false, ..filters() }, 4);
        assert_eq!(keys(&sel), vec![1, 3, 5, 6], "batch positives allowed when the option is off");
    }

    #[test]
    fn window_and_score_bounds() {
        let c = cands(20);
        let f = Filters { range_min: 2, min_score: Some(0.9), max_score: Some(0.965), ..filters() };
        let sel = select(&c, &QueryContext::default(), &f, 15);
        // ranks 0,1 window; scores 0.98 (rank 2) and 0.97 (rank 3) above max; 0.96..=0.90 kept.
        assert_eq!(keys(&sel), vec![4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(sel.dropped.window, 2);
        assert_eq!(sel.dropped.score_bound, 2 + 4, "0.98, 0.97 above; 0.89..0.86 below");
        assert_eq!(sel.ranked, 15);
    }

    #[test]
    fn margins_compare_against_the_positive() {
        let c = cands(30);
        let ctx = QueryContext { positive_score: Some(0.9), ..Default::default() };
        // absolute: drop >= 0.9 - 0.05 = 0.85 -> keys 0..=15 dropped
        let sel = select(&c, &ctx, &Filters { absolute_margin: Some(0.05), ..filters() }, 30);
        assert_eq!(sel.survivors[0].key, 16);
        assert_eq!(sel.dropped.margin, 16);
        // relative: drop >= 0.9 * 0.95 = 0.855 -> keys 0..=14
        let sel = select(&c, &ctx, &Filters { relative_margin: Some(0.05), ..filters() }, 30);
        assert_eq!(sel.survivors[0].key, 15);
        // both: the stricter (lower) threshold wins: min(0.855, 0.9 - 0.205) = 0.695
        let f = Filters { relative_margin: Some(0.05), absolute_margin: Some(0.205), ..filters() };
        let sel = select(&cands(40), &ctx, &f, 40);
        assert_eq!(sel.survivors[0].key, 31);
        // without a positive score, margins do nothing
        let sel = select(&c, &QueryContext::default(), &Filters { absolute_margin: Some(0.05), ..filters() }, 30);
        assert_eq!(sel.dropped.margin, 0);
    }

    #[test]
    fn adaptive_depth_searches_deeper_until_enough_or_capped() {
        let c = cands(100);
        let ctx = QueryContext { positive_score: Some(1.0), ..Default::default() };
        let f = Filters { absolute_margin: Some(0.245), ..filters() }; // keys >= 25 survive
        let run = |adaptive: bool, max_depth: usize| {
            let mut plan = DepthPlan::initial(10, 0);
            loop {
                let hits = &c[..plan.search_depth.min(c.len())];
                let sel = select(hits, &ctx, &f, plan.window_end);
                match plan.next(&sel, sel.survivors.len(), hits.len(), c.len(), 5, adaptive, max_depth) {
                    Some(next) => plan = next,
                    None => return (sel, plan),
                }
            }
        };
        let (sel, plan) = run(true, 1000);
        assert_eq!(plan.window_end, 40, "10 -> 20 -> 40");
        assert_eq!(keys(&sel)[..5], [25, 26, 27, 28, 29]);
        let (sel, plan) = run(false, 1000);
        assert!(sel.survivors.is_empty());
        assert_eq!(plan.window_end, 10);
        let (sel, plan) = run(true, 20);
        assert!(sel.survivors.is_empty(), "capped at max_depth");
        assert_eq!(plan.window_end, 20);
    }

    #[test]
    fn positive_neighbourhood_drops_candidates_close_to_a_positive() {
        let mut c = cands(10);
        // Similarity to the nearest positive: key i -> 0.95 - i/10.
        for (i, cand) in c.iter_mut().enumerate() {
            cand.positive_similarity = Some(0.95 - i as f32 / 10.0);
        }
        c[9].positive_similarity = None; // no vector: never dropped by this filter
        let f = Filters { max_positive_similarity: Some(0.6), ..filters() };
        let sel = select(&c, &QueryContext::default(), &f, 10);
        // 0.95, 0.85, 0.75, 0.65 are above 0.6; 0.55 and below stay.
        assert_eq!(keys(&sel), vec![4, 5, 6, 7, 8, 9]);
        assert_eq!(sel.dropped.positive_similarity, 4);
        assert_eq!(sel.survivors[0].rank, 4, "dropped candidates keep their ranks");
        // Combined with a margin: the margin is counted first.
        let ctx = QueryContext { positive_score: Some(1.0), ..Default::default() };
        let f = Filters { absolute_margin: Some(0.015), ..f };
        let sel = select(&c, &ctx, &f, 10);
        assert_eq!(sel.dropped.margin, 2, "scores 1.00 and 0.99");
        assert_eq!(sel.dropped.positive_similarity, 2);
        assert_eq!(keys(&sel), vec![4, 5, 6, 7, 8, 9]);
        assert!(select(&c, &QueryContext::default(), &filters(), 10).dropped.positive_similarity == 0, "off by default");
    }

    /// A deterministic cross-encoder: key k scores ce(k).
    fn ce(k: u64) -> f32 {
        [0.9, 0.2, 0.05, 0.6, 0.3, 0.01, 0.8, 0.4, 0.15, 0.5][k as usize % 10]
    }

    fn rerank_filters(candidates: usize) -> RerankFilters {
        RerankFilters { candidates, max_scored: 100, max_score: None, relative_margin: None }
    }

    /// Scores what the state asks for, as the engine does, until nothing is left to score.
    fn score_all(state: &mut RerankState, sel: &Selection, f: &RerankFilters, wanted: usize) -> Reranked {
        loop {
            for k in state.unscored(sel) {
                state.scores.insert(k, ce(k));
            }
            let passed = state.apply(sel, f).survivors.len();
            if !state.widen(sel, passed, wanted, f) {
                return state.apply(sel, f);
            }
        }
    }

    #[test]
    fn rerank_scores_the_best_ranked_survivors_and_orders_by_the_cross_encoder() {
        let sel = select(&cands(10), &QueryContext::default(), &filters(), 10);
        let f = rerank_filters(5);
        let mut state = RerankState::new(&f);
        assert_eq!(state.unscored(&sel), vec![0, 1, 2, 3, 4], "the first rerank_candidates survivors");
        let r = score_all(&mut state, &sel, &f, 3);
        assert_eq!(state.scores.len(), 5, "enough passed: nothing deeper scored");
        assert_eq!(r.survivors.iter().map(|s| s.key).collect::<Vec<_>>(), vec![0, 3, 4, 1, 2]);
        assert_eq!(r.survivors[1].ce, Some(0.6));
        assert_eq!(r.survivors[1].score, 0.97, "the bi-encoder score is kept");
        assert_eq!(r.survivors[1].rank, 3);
    }

    #[test]
    fn rerank_thresholds_alone_and_combined() {
        let sel = select(&cands(10), &QueryContext::default(), &filters(), 10);
        let run = |max_score, relative_margin, positive_ce| {
            let f = RerankFilters { candidates: 10, max_scored: 100, max_score, relative_margin };
            let mut state = RerankState::new(&f);
            state.positive_ce = positive_ce;
            let r = score_all(&mut state, &sel, &f, 1);
            let mut kept: Vec<u64> = r.survivors.iter().map(|s| s.key).collect();
            kept.sort_unstable();
            (kept, r.dropped_score, r.dropped_margin)
        };
        // RocketQA-style absolute threshold: drop ce >= 0.5.
        assert_eq!(run(Some(0.5), None, None), (vec![1, 2, 4, 5, 7, 8], 4, 0));
        // Relative to the positive's 0.5: drop ce >= 0.5 * (1 - 0.2) = 0.4.
        assert_eq!(run(None, Some(0.2), Some(0.5)), (vec![1, 2, 4, 5, 8], 0, 5));
        // Without a positive score the margin does nothing.
        assert_eq!(run(None, Some(0.2), None).0.len(), 10);
        // Both: the absolute threshold is counted first.
        assert_eq!(run(Some(0.7), Some(0.5), Some(0.6)), (vec![1, 2, 5, 8], 2, 4));
    }

    #[test]
    fn rerank_scores_deeper_then_searches_deeper_when_the_filter_leaves_too_few() {
        // 40 candidates; the cross-encoder passes only keys with ce < 0.1 (k % 10 in {2, 5}).
        let c = cands(40);
        let f = RerankFilters { candidates: 4, max_scored: 100, max_score: Some(0.1), relative_margin: None };
        let mut plan = DepthPlan::initial(10, 0);
        let mut state = RerankState::new(&f);
        let mut searches = 0;
        let (sel, r) = loop {
            searches += 1;
            let hits = &c[..plan.search_depth.min(c.len())];
            let sel = select(hits, &QueryContext::default(), &filters(), plan.window_end);
            let r = score_all(&mut state, &sel, &f, 5);
            match plan.next(&sel, r.survivors.len(), hits.len(), c.len(), 5, true, 1000) {
                Some(next) => plan = next,
                None => break (sel, r),
            }
        };
        assert_eq!(r.survivors.iter().map(|s| s.key).collect::<Vec<_>>(), vec![2, 12, 22, 5, 15], "hardest (highest probability) first, rank order on ties");
        assert_eq!(plan.window_end, 40, "10 -> 20 -> 40");
        assert!(searches >= 3);
        assert_eq!(state.scores.len(), sel.survivors.len().min(state.budget));
        assert_eq!(r.dropped_score as usize + r.survivors.len(), state.scores.len());
        // Never more than max_scored pairs per query.
        let capped = RerankFilters { max_scored: 6, ..f.clone() };
        let mut state = RerankState::new(&capped);
        let sel = select(&c, &QueryContext::default(), &filters(), 40);
        let r = score_all(&mut state, &sel, &capped, 5);
        assert_eq!(state.scores.len(), 6);
        assert_eq!(r.survivors.iter().map(|s| s.key).collect::<Vec<_>>(), vec![2, 5]);
    }

    #[test]
    fn deeper_search_when_exclusions_eat_the_slack() {
        let c = cands(100);
        let ctx = QueryContext { positive_keys: (0..30).collect(), ..Default::default() };
        let mut plan = DepthPlan::initial(5, 0); // asks for 13 hits: all positives
        let mut rounds = 0;
        let sel = loop {
            rounds += 1;
            let hits = &c[..plan.search_depth.min(c.len())];
            let sel = select(hits, &ctx, &filters(), plan.window_end);
            match plan.next(&sel, sel.survivors.len(), hits.len(), c.len(), 5, false, 1000) {
                Some(next) => plan = next,
                None => break sel,
            }
        };
        assert_eq!(keys(&sel), vec![30, 31, 32, 33, 34]);
        assert_eq!(plan.window_end, 5);
        assert!(rounds >= 3);
    }
}
