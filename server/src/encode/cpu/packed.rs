//! A right-padded batch's real tokens packed back to back, for the bodies' CPU-kernel paths:
//! every dense layer, norm and activation works per token, so only attention needs to know
//! where one sequence ends and the next begins.
use candle_core::{DType, Result, Tensor};

use super::{Kernels, selected};

pub struct Packed {
    /// Each real token's row among the batch's (batch · len) rows, in order.
    rows: Tensor,
    /// Tokens per sequence.
    pub lens: Vec<usize>,
    batch: usize,
    len: usize,
}

impl Packed {
    /// For activations `x` (batch · len, hidden) under `mask` (batch, len; 1 for tokens):
    /// `Some` when the CPU kernels run them (CPU, f32, kernels other than `candle`) and every
    /// row of the mask is ones then zeros (right padding, as the batcher pads); `None` sends
    /// the batch down the padded path.
    pub fn new(x: &Tensor, mask: &Tensor) -> Result<Option<Self>> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 || matches!(selected(), Kernels::Candle) {
            return Ok(None);
        }
        let (batch, len) = mask.dims2()?;
        let values = mask.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
        let lens: Option<Vec<usize>> = values
            .chunks(len.max(1))
            .map(|row| {
                let n = row.iter().take_while(|&&m| m != 0).count();
                row[n..].iter().all(|&m| m == 0).then_some(n)
            })
            .collect();
        let Some(lens) = lens else { return Ok(None) };
        let rows: Vec<u32> = lens.iter().enumerate().flat_map(|(i, &n)| (0..n).map(move |t| (i * len + t) as u32)).collect();
        let rows = Tensor::from_vec(rows, lens.iter().sum::<usize>(), x.device())?;
        Ok(Some(Packed { rows, lens, batch, len }))
    }

    /// The real tokens' rows of `x` (batch · len, hidden), back to back.
    pub fn gather(&self, x: &Tensor) -> Result<Tensor> {
        x.index_select(&self.rows, 0)
    }

    /// Packed rows back to (batch, len, hidden), zeros at the padding (which no pooling reads).
    pub fn scatter(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = x.dim(1)?;
        Tensor::zeros((self.batch * self.len, hidden), x.dtype(), x.device())?.index_add(&self.rows, x, 0)?.reshape((self.batch, self.len, hidden))
    }
}
