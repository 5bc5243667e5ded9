//! A dense layer (`x · Wᵀ + b`, optionally `+ residual`) that runs on the selected CPU
//! kernels: bias and residual are written into the output first and the product added onto
//! them (no passes of their own), and the product comes from the BLAS library or the gemm
//! crate. Elsewhere (a GPU, f16/bf16, the `candle` kernels) it is candle's `Linear`.
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::Linear;

use super::{Kernels, selected};

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    super::contiguous_f32(storage, layout, "dense layer", what)
}

pub struct Dense {
    weight: Tensor,
    /// The bias as plain values, for the CPU kernels (f32 weights on the CPU only).
    bias_values: Option<Vec<f32>>,
    linear: Linear,
}

impl Dense {
    /// `weight` is (out, in), as checkpoints store it.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let on_cpu_f32 = weight.device().is_cpu() && weight.dtype() == DType::F32;
        let bias_values = match &bias {
            Some(b) if on_cpu_f32 => Some(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            _ => None,
        };
        Ok(Dense { linear: Linear::new(weight.clone(), bias.clone()), weight, bias_values })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_inner(x, None)
    }

    /// `x · Wᵀ + b + residual`, the residual shaped as the output.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.forward_inner(x, Some(residual))
    }

    fn forward_inner(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let kernels = selected();
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32;
        if !cpu_f32 || matches!(kernels, Kernels::Candle) || (self.linear.bias().is_some() && self.bias_values.is_none()) {
            let out = self.linear.forward(x)?;
            return match residual {
                Some(r) => out + r,
                None => Ok(out),
            };
        }
        let dims = x.dims().to_vec();
        let Some((&k, rows)) = dims.split_last() else {
            candle_core::bail!("dense layer: a scalar input");
        };
        let m: usize = rows.iter().product();
        let n = self.weight.dim(0)?;
        let x2 = x.contiguous()?.reshape((m, k))?;
        let op = DenseOp { bias: self.bias_values.as_deref(), kernels };
        let out = match residual {
            Some(r) => x2.apply_op3_no_bwd(&self.weight, &r.contiguous()?.reshape((m, n))?, &op)?,
            None => x2.apply_op2_no_bwd(&self.weight, &op)?,
        };
        let mut out_dims = rows.to_vec();
        out_dims.push(n);
        out.reshape(out_dims)
    }
}

struct DenseOp<'a> {
    bias: Option<&'a [f32]>,
    /// Those the layer chose under: one selection per forward call.
    kernels: Kernels,
}

impl DenseOp<'_> {
    fn run(&self, x: (&CpuStorage, &Layout), w: (&CpuStorage, &Layout), residual: Option<(&CpuStorage, &Layout)>) -> Result<(CpuStorage, Shape)> {
        let (m, k) = x.1.shape().dims2()?;
        let (n, wk) = w.1.shape().dims2()?;
        if wk != k {
            candle_core::bail!("dense layer: input width {k}, weight width {wk}");
        }
        let x = contiguous(x.0, x.1, "the input")?;
        let w = contiguous(w.0, w.1, "the weight")?;
        if let Some(bias) = self.bias
            && bias.len() != n
        {
            candle_core::bail!("dense layer: bias of {} for {n} outputs", bias.len());
        }
        let residual = residual.map(|(s, l)| contiguous(s, l, "the residual")).transpose()?;
        if let Some(r) = residual
            && r.len() != m * n
        {
            candle_core::bail!("dense layer: residual of {} values for ({m}, {n}) outputs", r.len());
        }
        // What the product is added to, written in one pass across the threads.
        let mut out = super::par_rows(m, n, |first, dst| match (self.bias, residual) {
            (Some(b), Some(r)) => dst.chunks_exact_mut(n).zip(r[first * n..].chunks_exact(n)).for_each(|(o, r)| o.iter_mut().zip(r.iter().zip(b)).for_each(|(o, (r, b))| *o = r + b)),
            (None, Some(r)) => dst.copy_from_slice(&r[first * n..][..dst.len()]),
            (Some(b), None) => dst.chunks_exact_mut(n).for_each(|o| o.copy_from_slice(b)),
            (None, None) => {}
        });
        let accumulate = self.bias.is_some() || residual.is_some();
        super::gemm_nt_rows(self.kernels, m, n, k, x, w, &mut out, accumulate);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

impl CustomOp2 for DenseOp<'_> {
    fn name(&self) -> &'static str {
        "dense"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for DenseOp<'_> {
    fn name(&self) -> &'static str {
        "dense"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }
}
