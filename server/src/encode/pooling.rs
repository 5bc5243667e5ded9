//! Pooling token states into one vector per text, as sentence-transformers' `Pooling` module
//! does for right-padded batches: each mode's vector, concatenated in the order configured.
//! With `include_prompt: false` a row's first `prompt_len` tokens are left out (the mask is
//! zeroed there), exactly as the library does.
use candle_core::{D, DType, Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Cls,
    Max,
    Mean,
    MeanSqrtLen,
    WeightedMean,
    LastToken,
}

impl PoolMode {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "cls" => PoolMode::Cls,
            "max" => PoolMode::Max,
            "mean" => PoolMode::Mean,
            "mean_sqrt_len_tokens" => PoolMode::MeanSqrtLen,
            "weightedmean" => PoolMode::WeightedMean,
            "lasttoken" => PoolMode::LastToken,
            _ => return None,
        })
    }
}

/// The pooling a model's config asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolingSpec {
    pub modes: Vec<PoolMode>,
    /// False: prompt tokens are left out of the pooled vector.
    pub include_prompt: bool,
}

impl PoolingSpec {
    /// Pools `hidden` (n, len, h) in f32 under `mask` (n, len) of 1s and 0s, right-padded.
    /// `prompt_lens[i]` leading tokens of row i are masked out unless the prompt is included.
    pub fn pool(&self, hidden: &Tensor, mask: &[Vec<f32>], prompt_lens: &[usize]) -> Result<Tensor> {
        let (n, len, _) = hidden.dims3()?;
        let device = hidden.device();
        let mut pooling_mask = mask.to_vec();
        if !self.include_prompt {
            for (row, &p) in pooling_mask.iter_mut().zip(prompt_lens) {
                row.iter_mut().take(p).for_each(|m| *m = 0.0);
            }
        }
        let flat: Vec<f32> = pooling_mask.iter().flatten().copied().collect();
        let maskf = Tensor::from_vec(flat, (n, len, 1), device)?;
        let hidden = hidden.to_dtype(DType::F32)?;
        let mut parts = Vec::with_capacity(self.modes.len());
        for mode in &self.modes {
            let v = match mode {
                PoolMode::Cls | PoolMode::LastToken => {
                    // The first (cls) or last (lasttoken) position the pooling mask keeps;
                    // position 0 (cls) or the last position (lasttoken) when it keeps none.
                    let idx: Vec<usize> = pooling_mask
                        .iter()
                        .map(|row| {
                            if *mode == PoolMode::Cls {
                                row.iter().position(|&m| m > 0.0).unwrap_or(0)
                            } else {
                                row.iter().rposition(|&m| m > 0.0).unwrap_or(len - 1)
                            }
                        })
                        .collect();
                    let rows: Vec<Tensor> =
                        idx.iter().enumerate().map(|(i, &j)| hidden.get(i)?.get(j)).collect::<Result<_>>()?;
                    let picked = Tensor::stack(&rows, 0)?;
                    if *mode == PoolMode::LastToken {
                        // The library multiplies by the mask: a row with no kept token is zeros.
                        let keep: Vec<f32> = pooling_mask.iter().zip(&idx).map(|(row, &j)| row[j]).collect();
                        picked.broadcast_mul(&Tensor::from_vec(keep, (n, 1), device)?)?
                    } else {
                        picked
                    }
                }
                PoolMode::Max => {
                    let penalty = ((maskf.ones_like()? - &maskf)? * -1e30)?;
                    hidden.broadcast_mul(&maskf)?.broadcast_add(&penalty)?.max(1)?
                }
                PoolMode::Mean | PoolMode::MeanSqrtLen => {
                    let summed = hidden.broadcast_mul(&maskf)?.sum(1)?;
                    let counts = maskf.sum(1)?.clamp(1e-9, f32::MAX)?; // (n, 1)
                    let divisor = if *mode == PoolMode::Mean { counts } else { counts.sqrt()? };
                    summed.broadcast_div(&divisor)?
                }
                PoolMode::WeightedMean => {
                    // Position weights 1..len (right padding: no shift), masked.
                    let weights = Tensor::arange(1f32, len as f32 + 1.0, device)?.reshape((1, len, 1))?;
                    let w = maskf.broadcast_mul(&weights)?;
                    let summed = hidden.broadcast_mul(&w)?.sum(1)?;
                    summed.broadcast_div(&w.sum(1)?.clamp(1e-9, f32::MAX)?)?
                }
            };
            parts.push(v);
        }
        Tensor::cat(&parts, D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn hidden() -> Tensor {
        // Two rows of 4 tokens, 2 dims: token t of row r is (r*10 + t, -(t as f32)).
        let data: Vec<f32> = (0..2).flat_map(|r| (0..4).flat_map(move |t| [(r * 10 + t) as f32, -(t as f32)])).collect();
        Tensor::from_vec(data, (2, 4, 2), &Device::Cpu).unwrap()
    }

    fn pool(modes: &[PoolMode], include_prompt: bool, prompt: usize) -> Vec<Vec<f32>> {
        let spec = PoolingSpec { modes: modes.to_vec(), include_prompt };
        let mask = vec![vec![1.0, 1.0, 1.0, 0.0], vec![1.0, 1.0, 1.0, 1.0]];
        spec.pool(&hidden(), &mask, &[prompt, prompt]).unwrap().to_vec2().unwrap()
    }

    #[test]
    fn each_mode_follows_the_library_math() {
        assert_eq!(pool(&[PoolMode::Cls], true, 0), vec![vec![0.0, 0.0], vec![10.0, 0.0]]);
        assert_eq!(pool(&[PoolMode::LastToken], true, 0), vec![vec![2.0, -2.0], vec![13.0, -3.0]]);
        assert_eq!(pool(&[PoolMode::Max], true, 0), vec![vec![2.0, 0.0], vec![13.0, 0.0]]);
        assert_eq!(pool(&[PoolMode::Mean], true, 0), vec![vec![1.0, -1.0], vec![11.5, -1.5]]);
        let sqrt = pool(&[PoolMode::MeanSqrtLen], true, 0);
        assert!((sqrt[0][0] - 3.0 / 3f32.sqrt()).abs() < 1e-6);
        // Weights 1, 2, 3 over tokens 0, 1, 2: (0*1 + 1*2 + 2*3) / 6.
        let w = pool(&[PoolMode::WeightedMean], true, 0);
        assert!((w[0][0] - 8.0 / 6.0).abs() < 1e-6, "{w:?}");
        let both = pool(&[PoolMode::Cls, PoolMode::Mean], true, 0);
        assert_eq!(both[0], vec![0.0, 0.0, 1.0, -1.0], "modes concatenate in order");
    }

    #[test]
    fn excluded_prompt_tokens_leave_the_pool() {
        assert_eq!(pool(&[PoolMode::Mean], false, 2), vec![vec![2.0, -2.0], vec![12.5, -2.5]]);
        assert_eq!(pool(&[PoolMode::Cls], false, 1), vec![vec![1.0, -1.0], vec![11.0, -1.0]]);
        assert_eq!(pool(&[PoolMode::Mean], true, 2), pool(&[PoolMode::Mean], true, 0), "included prompts are pooled");
        // A prompt covering every token of row 0: mean is zeros, lasttoken is zeros.
        assert_eq!(pool(&[PoolMode::Mean], false, 3)[0], vec![0.0, 0.0]);
        assert_eq!(pool(&[PoolMode::LastToken], false, 3)[0], vec![0.0, 0.0]);
    }
}
