//! The mining logic, free of the wire and of any storage so it can be tested with a
//! deterministic index and scorer: exclude (positives, duplicate texts, batch positives) and
//! filter (rank window, score bounds, positive-aware margins, similarity to the positives)
//! here; the cross-encoder thresholds in [`rerank`]; how deep to search in [`depth`]; the
//! search/rerank loop that drives them in [`pipeline`]; choosing the negatives in [`sample`];
//! a batch's options and outcome in [`request`].
pub mod depth;
pub mod pipeline;
pub mod request;
pub mod rerank;
pub mod sample;

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

pub use depth::DepthPlan;
pub use request::{MineBatch, MineOutcome, MineParams, MineQuery, MinedNegative, QueryOutcome, StageTimings};
pub use rerank::{RerankFilters, RerankState, Reranked};
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


#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic scorer: candidate i scores 1 - i/100, text "doc i".
    fn cands(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate { key: i as u64, score: 1.0 - i as f32 / 100.0, hashes: [text_hash(&format!("doc {i}")); 2], positive_similarity: None })
            .collect()
    }

    /// No filter but the batch's positives; the pipeline's tests share it.
    pub(super) fn filters() -> Filters {
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
}
