//! The cross-encoder stage of one query: which survivors to score (best bi-encoder rank
//! first, within a budget that widens when too few pass), and the thresholds (absolute, and
//! relative to the positive's cross-encoder score) applied to the scores.
use std::collections::HashMap;

use super::{Selection, Survivor};

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
