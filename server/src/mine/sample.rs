//! Choosing num_negatives among the survivors: the top ones, uniformly, or by softmax over
//! scores (the cross-encoder's when reranked, else the bi-encoder's) with a temperature
//! (Gumbel top-k, i.e. sampling without replacement). Results keep the survivors' order;
//! the caller seeds the generator for reproducible answers.
use rand::Rng;
use rand::seq::index;

use super::Survivor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Top,
    Uniform,
    Softmax { temperature: f32 },
}

pub fn sample<R: Rng>(survivors: &[Survivor], n: usize, sampling: Sampling, rng: &mut R) -> Vec<Survivor> {
    if survivors.len() <= n {
        return survivors.to_vec();
    }
    let mut picked: Vec<usize> = match sampling {
        Sampling::Top => (0..n).collect(),
        Sampling::Uniform => index::sample(rng, survivors.len(), n).into_vec(),
        Sampling::Softmax { temperature } => {
            let mut keyed: Vec<(f64, usize)> = survivors
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                    let gumbel = -(-u.ln()).ln();
                    (s.order_score() as f64 / temperature as f64 + gumbel, i)
                })
                .collect();
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            keyed.into_iter().take(n).map(|(_, i)| i).collect()
        }
    };
    picked.sort_unstable();
    picked.into_iter().map(|i| survivors[i]).collect()
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
        assert_eq!(keys(&sample(&survivors(10), 3, Sampling::Top, &mut rng)), vec![0, 1, 2]);
        assert_eq!(keys(&sample(&survivors(2), 3, Sampling::Uniform, &mut rng)), vec![0, 1]);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_in_rank_order() {
        for mode in [Sampling::Uniform, Sampling::Softmax { temperature: 0.5 }] {
            let a = sample(&survivors(10), 4, mode, &mut ChaCha8Rng::seed_from_u64(7));
            let b = sample(&survivors(10), 4, mode, &mut ChaCha8Rng::seed_from_u64(7));
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
            for x in sample(&s, 2, Sampling::Uniform, &mut ChaCha8Rng::seed_from_u64(seed)) {
                hits[x.key as usize] += 1;
            }
        }
        // Each key is expected 400 times; allow generous sampling noise.
        assert!(hits.iter().all(|&h| (300..500).contains(&h)), "{hits:?}");

        // A tiny temperature makes softmax the top-k; a huge one makes it near uniform.
        for seed in 0..50 {
            let cold = sample(&s, 3, Sampling::Softmax { temperature: 1e-4 }, &mut ChaCha8Rng::seed_from_u64(seed));
            assert_eq!(keys(&cold), vec![0, 1, 2]);
        }
        let mut last = 0;
        for seed in 0..2000 {
            let hot = sample(&s, 1, Sampling::Softmax { temperature: 100.0 }, &mut ChaCha8Rng::seed_from_u64(seed));
            if hot[0].key == 9 {
                last += 1;
            }
        }
        assert!(last > 120, "hot softmax still reaches the last candidate: {last}");
        let mut first_warm = 0;
        for seed in 0..2000 {
            let warm = sample(&s, 1, Sampling::Softmax { temperature: 0.1 }, &mut ChaCha8Rng::seed_from_u64(seed));
            if warm[0].key == 0 {
                first_warm += 1;
            }
        }
        // p(first) = 1 / sum_i e^{-i} ~ 0.632
        assert!((1150..1380).contains(&first_warm), "{first_warm}");
    }
}
