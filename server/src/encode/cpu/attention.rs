//! Bidirectional multi-head attention over packed sequences (their tokens back to back, no
//! padding), fused per (sequence, head) straight from the fused query/key/value projection:
//! scores = q·kᵀ·scale, softmax, then · v written into the context at the head's columns. No
//! copies to a head-major layout and back, no (batch, heads, len, len) tensor, and no work
//! on padding at all.
use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{selected, simd};

/// Context (tokens, heads·head_dim) from `qkv` (tokens, 3·heads·head_dim), laid out as the
/// projection gives it (queries, then keys, then values, each head-major within), for
/// sequences of `lens` tokens stored one after the other.
pub fn attention(qkv: &Tensor, lens: &[usize], heads: usize, head_dim: usize) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1_no_bwd(&Attention { lens: lens.to_vec(), heads, head_dim })
}

struct Attention {
    lens: Vec<usize>,
    heads: usize,
    head_dim: usize,
}

/// The context buffer, written by many threads at once, each at its own (rows, head columns).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every unit of work writes a disjoint set of elements (its sequence's rows, its
// head's columns); nothing reads the buffer until all units are done.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `offset` must lie inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = super::contiguous_f32(storage, layout, "fused attention", "the input")?;
        let Attention { lens, heads, head_dim } = self;
        let (heads, head_dim) = (*heads, *head_dim);
        let hidden = heads * head_dim;
        let stride = 3 * hidden;
        let tokens: usize = lens.iter().sum();
        if qkv.len() != tokens * stride {
            candle_core::bail!("fused attention: qkv of {} values for {tokens} tokens x {heads} heads of {head_dim}", qkv.len());
        }
        let offsets: Vec<usize> = lens.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
        let scale = 1.0 / (head_dim as f32).sqrt();
        // Filled below, every element by exactly one unit (its rows, its head's columns).
        let mut out: Vec<f32> = Vec::with_capacity(tokens * hidden);
        let shared = SharedOut(out.as_mut_ptr());
        let kernels = selected();
        (0..lens.len() * heads).into_par_iter().for_each(|unit| {
            let (seq, head) = (unit / heads, unit % heads);
            let (first, n) = (offsets[seq], lens[seq]);
            if n == 0 {
                return;
            }
            let rows = &qkv[first * stride..(first + n) * stride];
            let q = &rows[head * head_dim..];
            let k = &rows[hidden + head * head_dim..];
            let v = &rows[2 * hidden + head * head_dim..];
            SCORES.with_borrow_mut(|scores| {
                // Every value is written by the product before it is read: grow, never clear.
                if scores.len() < n * n {
                    scores.resize(n * n, 0.0);
                }
                let scores = &mut scores[..n * n];
                super::gemm_nt_single(kernels, n, n, head_dim, scale, q, stride, k, stride, scores, n);
                simd::softmax_rows(scores, n);
                // SAFETY: the (n, head_dim) block at this sequence's rows and this head's
                // columns lies inside the context buffer, and this unit alone writes it.
                unsafe {
                    let out = shared.at(first * hidden + head * head_dim);
                    super::gemm_nn_single(kernels, n, head_dim, n, scores, n, v, stride, out, hidden);
                }
            });
        });
        // SAFETY: the units above wrote every element: each sequence's rows at every head.
        unsafe { out.set_len(tokens * hidden) };
        Ok((CpuStorage::F32(out), Shape::from((tokens, hidden))))
    }
}
