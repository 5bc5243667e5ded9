//! How deep one query searches: the rank window, and how many hits to ask the index for.
use super::Selection;

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
