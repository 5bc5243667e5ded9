//! Choosing num_negatives among the survivors: the top ones, uniformly, by softmax over
//! scores (the cross-encoder's when reranked, else the bi-encoder's) with a temperature, or
//! around the positive's score (SimANS: weight exp(-a (score - positive - b)^2) over
//! bi-encoder scores). The weighted modes draw without replacement (Gumbel top-k). Results
//! keep the survivors' order; the caller seeds the generator for reproducible answers.
use rand::Rng;
use rand::seq::index;

use super::Survivor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Top,
    Uniform,
    Softmax { temperature: f32 },
    /// SimANS: log-weight -a (score - positive_score - b)^2.
    Ambiguous { a: f32, b: f32 },
}

/// `n` of `survivors` by `sampling`. `positive_score` is the query's positive's bi-encoder
/// score (the ambiguous mode centres on it; without one, on the best survivor's score).
pub fn sample<R: Rng>(survivors: &[Survivor], n: usize, sampling: Sampling, positive_score: Option<f32>, rng: &mut R) -> Vec<Survivor> {
    if survivors.len() <= n {
        return survivors.to_vec();
    }
    let mut picked: Vec<usize> = match sampling {
        Sampling::Top => (0..n).collect(),
        Sampling::Uniform => index::sample(rng, survivors.len(), n).into_vec(),
        Sampling::Softmax { temperature } => {
            gumbel_top(survivors.iter().map(|s| s.order_score() as f64 / temperature as f64), n, rng)
        }
        Sampling::Ambiguous { a, b } => {
            let best = survivors.iter().map(|s| s.score).fold(f32::NEG_INFINITY, f32::max);
            let centre = (positive_score.unwrap_or(best) + b) as f64;
            gumbel_top(survivors.iter().map(|s| -(a as f64) * (s.score as f64 - centre).powi(2)), n, rng)
        }
    };
    picked.sort_unstable();
    picked.into_iter().map(|i| survivors[i]).collect()
}

/// The indexes of `n` draws without replacement with probabilities proportional to
/// exp(log_weight): the top `n` of log_weight + Gumbel noise.
fn gumbel_top<R: Rng>(log_weights: impl Iterator<Item = f64>, n: usize, rng: &mut R) -> Vec<usize> {
    let mut keyed: Vec<(f64, usize)> = log_weights
        .enumerate()
        .map(|(i, w)| {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            (w - (-u.ln()).ln(), i)
        })
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    keyed.into_iter().take(n).map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn survivors(n: usize) -> Vec<Survivor> {
        (0..n).map(|i| Survivor { key: i as u64, score: 1.0 - i as f32 / 10.0, rank: i as u32, ce: None }).collect()
    }

    fn keys(v: &[Survivor]) -> Vec<u64> {
        v.iter().map(|s| s.key).collect()
    }

    #[test]
    fn top_takes_the_best_and_short_lists_pass_through() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(keys(&sample(&survivors(10), 3, Sampling::Top, None, &mut rng)), vec![0, 1, 2]);
        assert_eq!(keys(&sample(&survivors(2), 3, Sampling::Uniform, None, &mut rng)), vec![0, 1]);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_in_rank_order() {
        for mode in [Sampling::Uniform, Sampling::Softmax { temperature: 0.5 }, Sampling::Ambiguous { a: 10.0, b: 0.0 }] {
            let a = sample(&survivors(10), 4, mode, Some(0.9), &mut ChaCha8Rng::seed_from_u64(7));
            let b = sample(&survivors(10), 4, mode, Some(0.9), &mut ChaCha8Rng::seed_from_u64(7));
            assert_eq!(a, b);
            assert_eq!(a.len(), 4);
            assert!(a.windows(2).all(|w| w[0].rank < w[1].rank));
            let distinct: std::collections::HashSet<u64> = a.iter().map(|s| s.key).collect();
            assert_eq!(distinct.len(), 4, "without replacement");
        }
    }

    #[test]
    fn uniform_covers_the_window_and_softmax_follows_the_temperature() {
        let s = survivors(10);
        let mut hits = [0u32; 10];
        for seed in 0..2000 {
            for x in sample(&s, 2, Sampling::Uniform, None, &mut ChaCha8Rng::seed_from_u64(seed)) {
                hits[x.key as usize] += 1;
            }
        }
        // Each key is expected 400 times; allow generous sampling noise.
        assert!(hits.iter().all(|&h| (300..500).contains(&h)), "{hits:?}");

        // A tiny temperature makes softmax the top-k; a huge one makes it near uniform.
        for seed in 0..50 {
            let cold = sample(&s, 3, Sampling::Softmax { temperature: 1e-4 }, None, &mut ChaCha8Rng::seed_from_u64(seed));
            assert_eq!(keys(&cold), vec![0, 1, 2]);
        }
        let mut last = 0;
        for seed in 0..2000 {
            let hot = sample(&s, 1, Sampling::Softmax { temperature: 100.0 }, None, &mut ChaCha8Rng::seed_from_u64(seed));
            if hot[0].key == 9 {
                last += 1;
            }
        }
        assert!(last > 120, "hot softmax still reaches the last candidate: {last}");
        let mut first_warm = 0;
        for seed in 0..2000 {
            let warm = sample(&s, 1, Sampling::Softmax { temperature: 0.1 }, None, &mut ChaCha8Rng::seed_from_u64(seed));
            if warm[0].key == 0 {
                first_warm += 1;
            }
        }
        // p(first) = 1 / sum_i e^{-i} ~ 0.632
        assert!((1150..1380).contains(&first_warm), "{first_warm}");
    }

    /// SimANS on a deterministic scorer: survivor i scores 1 - i/10. With the positive at 0.8
    /// and b = -0.15 the weights peak at 0.65 (between survivors 3 and 4); one draw's
    /// frequencies follow exp(-a (s - 0.65)^2) normalized, within sampling noise.
    #[test]
    fn ambiguous_sampling_follows_its_distribution_around_the_positive() {
        let s = survivors(10);
        let (a, b) = (50.0f32, -0.15f32);
        let weights: Vec<f64> = s.iter().map(|x| (-(a as f64) * (x.score as f64 - 0.65).powi(2)).exp()).collect();
        let total: f64 = weights.iter().sum();
        let draws = 20_000u64;
        let mut hits = [0u64; 10];
        for seed in 0..draws {
            let got = sample(&s, 1, Sampling::Ambiguous { a, b }, Some(0.8), &mut ChaCha8Rng::seed_from_u64(seed));
            hits[got[0].key as usize] += 1;
        }
        for (i, &h) in hits.iter().enumerate() {
            let p = weights[i] / total;
            let expected = p * draws as f64;
            // Four standard deviations of a binomial count, plus a little for tiny p.
            let slack = 4.0 * (draws as f64 * p * (1.0 - p)).sqrt() + 3.0;
            assert!((h as f64 - expected).abs() <= slack, "survivor {i}: {h} draws, expected {expected:.0} +- {slack:.0}: {hits:?}");
        }
        assert!(hits[3] + hits[4] > hits[0] + hits[9] + hits[8], "the ambiguous zone dominates: {hits:?}");
        // Without a positive the best survivor's score is the centre: b = 0 makes it the mode.
        let mut first = 0;
        for seed in 0..2000 {
            if sample(&s, 1, Sampling::Ambiguous { a: 50.0, b: 0.0 }, None, &mut ChaCha8Rng::seed_from_u64(seed))[0].key == 0 {
                first += 1;
            }
        }
        assert!(first > 700, "{first}");
    }
}
