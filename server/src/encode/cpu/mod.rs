//! CPU kernels for the f32 transformer bodies, chosen once per process (`encoder.cpu_kernels`):
//!
//! - `blas`: dense layers through a BLAS library opened at run time (OpenBLAS or MKL: kernels
//!   tuned per processor), each call single-threaded on its share of the rows; attention fused
//!   per (sequence, head) ([`attention`]); softmax and GELU vectorized for the processor's
//!   widest instructions ([`simd`]).
//! - `fused`: the same, with the gemm crate (candle's own matrix kernels) for the products:
//!   what runs where no BLAS library is installed.
//! - `candle`: candle's operations as they are, for comparison.
//!
//! `auto` takes `blas` when a library opens, passes its check and beats the gemm crate on a
//! dense layer's product at start (an old library may not know a newer processor), else
//! `fused`. Every choice computes in f32: results differ from candle's by rounding only
//! (tested within 1e-4).
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Shape, Tensor};
use parking_lot::RwLock;
use rayon::prelude::*;

pub mod attention;
mod blas;
pub mod dense;
pub mod packed;
pub mod simd;

pub use blas::{Blas, SEARCHED};
pub use crate::config::KernelsSpec;

/// What runs.
#[derive(Clone, Copy)]
pub enum Kernels {
    Candle,
    Fused,
    Blas(&'static Blas),
}

impl Kernels {
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Candle => "candle",
            Kernels::Fused => "fused",
            Kernels::Blas(_) => "blas",
        }
    }
}

static SELECTED: RwLock<Option<Kernels>> = RwLock::new(None);

/// The kernels in use: those of the last [`select`], else `auto` with the default library
/// search (chosen on first use).
pub fn selected() -> Kernels {
    if let Some(kernels) = *SELECTED.read() {
        return kernels;
    }
    let mut slot = SELECTED.write();
    *slot.get_or_insert_with(|| resolve(KernelsSpec::Auto, "").map(|(k, _)| k).unwrap_or(Kernels::Fused))
}

/// Selects the kernels for the whole process and says what was chosen and why, for the log.
/// `library` names the BLAS library to open (a file name the dynamic loader finds, or a
/// path); empty looks for each family of [`SEARCHED`] and races those found. `blas` fails
/// when no library can be used; `auto` falls back to `fused`.
pub fn select(spec: KernelsSpec, library: &str) -> Result<String, String> {
    let (kernels, why) = resolve(spec, library)?;
    *SELECTED.write() = Some(kernels);
    let detail = match kernels {
        Kernels::Blas(blas) => format!("blas through {}", blas.description),
        other => other.name().to_string(),
    };
    Ok(format!(
        "CPU kernels: {detail}{why}; processor: {}; element-wise loops for {:?}",
        processor(),
        simd::width()
    ))
}

fn resolve(spec: KernelsSpec, library: &str) -> Result<(Kernels, String), String> {
    let (libraries, auto) = match spec {
        KernelsSpec::Candle => return Ok((Kernels::Candle, String::new())),
        KernelsSpec::Fused => return Ok((Kernels::Fused, String::new())),
        KernelsSpec::Blas => (open_libraries(library).map_err(|e| format!("no BLAS library could be used: {e}"))?, false),
        KernelsSpec::Auto => match open_libraries(library) {
            Ok(libraries) => (libraries, true),
            Err(e) => return Ok((Kernels::Fused, format!(" (auto: no BLAS library could be used: {e})"))),
        },
    };
    // Every library found, and under `auto` the gemm crate, raced on the products a forward
    // pass makes: a library that does not know the processor (an old OpenBLAS on a newer
    // core) falls back to slower kernels than the gemm crate's, and which library is fastest
    // depends on the processor (MKL, by 25-50%, on the Intel Xeon measured).
    let mut entrants: Vec<Kernels> = libraries.into_iter().map(Kernels::Blas).collect();
    if auto {
        entrants.push(Kernels::Fused);
    }
    if entrants.len() == 1 {
        return Ok((entrants[0], String::new()));
    }
    let rates = race(&entrants);
    let best = (0..entrants.len()).max_by(|&a, &b| rates[a].total_cmp(&rates[b])).expect("at least two entrants");
    let others: Vec<String> = (0..entrants.len())
        .filter(|&i| i != best)
        .map(|i| {
            let who = match entrants[i] {
                Kernels::Blas(blas) => blas.name.clone(),
                _ => "the built-in kernels".to_string(),
            };
            format!("{:.0} for {who}", rates[i])
        })
        .collect();
    let verdict = match (auto, entrants[best]) {
        (true, Kernels::Fused) => "auto, BLAS slower here",
        (true, _) => "auto",
        (false, _) => "fastest library",
    };
    Ok((entrants[best], format!(" ({verdict}: {:.0} GFLOP/s against {})", rates[best], others.join(", "))))
}

/// GFLOP/s of each entrant on the products of a MiniLM-sized layer: its four dense layers
/// (384 -> 1152, 384 -> 384, 384 -> 1536, 1536 -> 384) on 256 tokens, rows split across the
/// threads as a forward pass splits them, and attention's (scores and weighted values) for 32
/// (sequence, head) units of 64 tokens and 32-wide heads, one thread each. One round to warm
/// up (first-call set-up, the library's buffers), then the best of five, interleaved.
fn race(entrants: &[Kernels]) -> Vec<f64> {
    let m = 256;
    let shapes = [(1152, 384), (384, 384), (1536, 384), (384, 1536)];
    let values = |len: usize, modulus: usize| -> Vec<f32> { (0..len).map(|i| (i % modulus) as f32 / modulus as f32 - 0.5).collect() };
    let x = values(m * 1536, 17);
    let weights: Vec<Vec<f32>> = shapes.iter().map(|&(n, k)| values(n * k, 13)).collect();
    let mut out = vec![0f32; m * 1536];
    let (len, d, units) = (64, 32, 32);
    let q = values(len * d, 11);
    let mut scores = vec![vec![0f32; len * len]; units];
    let mut context = vec![vec![0f32; len * d]; units];
    let flops = shapes.iter().map(|&(n, k)| 2.0 * (m * n * k) as f64).sum::<f64>() + units as f64 * 2.0 * 2.0 * (len * len * d) as f64;
    let mut best = vec![f64::MAX; entrants.len()];
    for round in 0..6 {
        for (kernels, best) in entrants.iter().zip(best.iter_mut()) {
            let started = std::time::Instant::now();
            for (&(n, k), w) in shapes.iter().zip(&weights) {
                gemm_nt_rows(*kernels, m, n, k, &x[..m * k], w, &mut out[..m * n], false);
            }
            scores.par_iter_mut().zip(context.par_iter_mut()).for_each(|(s, c)| {
                gemm_nt_single(*kernels, len, len, d, 0.125, &q, d, &q, d, s, len);
                // SAFETY: `c` holds the whole (len, d) output and belongs to this unit alone.
                unsafe { gemm_nn_single(*kernels, len, d, len, s, len, &q, d, c.as_mut_ptr(), d) };
            });
            if round > 0 {
                *best = best.min(started.elapsed().as_secs_f64());
            }
        }
    }
    best.iter().map(|t| flops / t / 1e9).collect()
}

/// The libraries to race: the one named, else the first of each family of [`SEARCHED`] that
/// opens; the reasons none could be used, otherwise.
fn open_libraries(name: &str) -> Result<Vec<&'static Blas>, String> {
    if !name.is_empty() {
        return open_library(name).map(|blas| vec![blas]);
    }
    let (mut found, mut reasons) = (Vec::new(), Vec::new());
    for family in SEARCHED {
        for name in *family {
            match open_library(name) {
                Ok(blas) => {
                    found.push(blas);
                    break;
                }
                Err(reason) => reasons.push(reason),
            }
        }
    }
    if found.is_empty() { Err(reasons.join("; ")) } else { Ok(found) }
}

/// Libraries stay loaded for the life of the process: each is opened once.
fn open_library(name: &str) -> Result<&'static Blas, String> {
    static OPENED: Mutex<Vec<(String, &'static Blas)>> = Mutex::new(Vec::new());
    let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, blas)) = opened.iter().find(|(n, _)| n == name) {
        return Ok(blas);
    }
    let blas: &'static Blas = Box::leak(Box::new(Blas::open(name)?));
    opened.push((name.to_string(), blas));
    Ok(blas)
}

/// The libraries of [`SEARCHED`] that this machine can use, one per family, by name.
pub fn libraries_found() -> Vec<String> {
    open_libraries("").map(|found| found.into_iter().map(|blas| blas.name.clone()).collect()).unwrap_or_default()
}

/// The processor's model name and the vector features that matter here.
pub fn processor() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| info.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()))
        .unwrap_or_else(|| "unknown model".to_string());
    #[allow(unused_mut)]
    let mut features: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    features.push($f);
                }
            )*};
        }
        probe!("avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avx512bf16");
    }
    format!("{model} ({}), {} threads", if features.is_empty() { "no vector extensions probed".into() } else { features.join(" ") }, rayon::current_num_threads())
}

/// The contiguous f32 values of a custom op's input; `op` and `what` name them in the error.
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: {what} is not f32");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: {what} is not contiguous"),
    }
}

/// The activation of a gated MLP's gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// GELU, the erf form (ModernBERT's GeGLU).
    Gelu,
    /// GELU, the tanh approximation (`gelu_pytorch_tanh`: Gemma 3's GeGLU).
    GeluTanh,
    /// SiLU (Qwen3's SwiGLU).
    Silu,
}

/// A gated MLP's middle: each row of `x` holds 2·`width` values, the gate then the values it
/// scales; out comes activation(gate) · values, `width` per row. On the CPU in f32 one pass,
/// split across threads; elsewhere candle's operations.
pub fn gated(x: &Tensor, width: usize, gate: Gate) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1_no_bwd(&Gated { width, gate });
    }
    let (g, v) = (x.narrow(D::Minus1, 0, width)?, x.narrow(D::Minus1, width, width)?);
    let g = match gate {
        Gate::Gelu => g.gelu_erf()?,
        // candle's `gelu` is the tanh approximation.
        Gate::GeluTanh => g.gelu()?,
        Gate::Silu => candle_nn::ops::silu(&g)?,
    };
    g * v
}

struct Gated {
    width: usize,
    gate: Gate,
}

impl CustomOp1 for Gated {
    fn name(&self) -> &'static str {
        "gated-activation"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(storage, layout, "gated activation", "the input")?;
        let (width, dims) = (self.width, layout.shape().dims());
        if width == 0 || dims.last() != Some(&(2 * width)) {
            candle_core::bail!("gated activation: rows of {:?} values, expected {}", dims.last(), 2 * width);
        }
        let kernel = match self.gate {
            Gate::Gelu => simd::geglu_rows,
            Gate::GeluTanh => simd::geglu_tanh_rows,
            Gate::Silu => simd::swiglu_rows,
        };
        let rows = input.len() / (2 * width);
        let out = par_rows(rows, width, |first, dst| kernel(&input[first * 2 * width..][..2 * dst.len()], dst, width));
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = width;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

/// A (rows, width) matrix that `fill(first_row, chunk)` writes, chunk by chunk of whole rows,
/// across the thread pool. Each chunk (about 64 KB) is zeroed just before it is filled, while
/// it is in cache, so the vector never holds uninitialized floats, yet the calling thread
/// makes no serial pass over the whole output first (as `vec![0.0; len]` does, on one core
/// while the other waits).
pub(crate) fn par_rows(rows: usize, width: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let len = rows * width;
    if len == 0 {
        return Vec::new();
    }
    let per_chunk = (16384 / width).max(1);
    let mut out: Vec<f32> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(per_chunk * width).enumerate().for_each(|(i, chunk)| {
        chunk.fill(std::mem::MaybeUninit::new(0.0));
        // SAFETY: every element of the chunk was initialized on the line above.
        let chunk = unsafe { &mut *(chunk as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
        fill(i * per_chunk, chunk);
    });
    // SAFETY: the chunks cover all `len` elements, each initialized above.
    unsafe { out.set_len(len) };
    out
}

/// Products this small run on one thread: splitting costs more than it saves.
const SPLIT_FLOPS: usize = 1 << 21;

/// `out (m, n) = x (m, k) · wᵀ (+ out when `accumulate`)`, `w` stored as (n, k) rows, the
/// rows split across the thread pool.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_nt_rows(kernels: Kernels, m: usize, n: usize, k: usize, x: &[f32], w: &[f32], out: &mut [f32], accumulate: bool) {
    assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n, "dense product: sizes do not match ({m}, {n}, {k})");
    if m == 0 || n == 0 {
        return;
    }
    let threads = if m * n * k >= SPLIT_FLOPS { rayon::current_num_threads() } else { 1 };
    match kernels {
        Kernels::Blas(blas) => {
            // Two shares per thread, so a thread held up elsewhere costs half a share.
            let rows = if threads > 1 { m.div_ceil(2 * threads).max(32) } else { m };
            out.par_chunks_mut(rows * n).zip(x.par_chunks(rows * k)).for_each(|(out, x)| {
                // SAFETY: the chunks hold whole rows of the (rows, n) and (rows, k) matrices,
                // `w` the whole (n, k) one; each chunk of `out` belongs to this call alone.
                unsafe { blas.sgemm(out.len() / n, n, k, 1.0, x.as_ptr(), k, w.as_ptr(), k, true, if accumulate { 1.0 } else { 0.0 }, out.as_mut_ptr(), n) }
            });
        }
        Kernels::Fused | Kernels::Candle => {
            let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
            // SAFETY: the sizes were checked above; rhs (k, n) reads `w` transposed.
            unsafe {
                gemm::gemm(m, n, k, out.as_mut_ptr(), 1, n as isize, accumulate, x.as_ptr(), 1, k as isize, w.as_ptr(), k as isize, 1, 1.0, 1.0, false, false, false, parallelism)
            }
        }
    }
}

/// `c (m, n) = alpha · a (m, k) · bᵀ` on this thread, `b` stored as (n, k) rows; row strides
/// `lda`, `ldb`, `ldc`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_nt_single(kernels: Kernels, m: usize, n: usize, k: usize, alpha: f32, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &mut [f32], ldc: usize) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(reach(m, k, lda) <= a.len() && reach(n, k, ldb) <= b.len() && reach(m, n, ldc) <= c.len(), "product: matrices out of their slices");
    match kernels {
        // SAFETY: the bounds were checked above.
        Kernels::Blas(blas) => unsafe { blas.sgemm(m, n, k, alpha, a.as_ptr(), lda, b.as_ptr(), ldb, true, 0.0, c.as_mut_ptr(), ldc) },
        Kernels::Fused | Kernels::Candle => unsafe {
            gemm::gemm(m, n, k, c.as_mut_ptr(), 1, ldc as isize, false, a.as_ptr(), 1, lda as isize, b.as_ptr(), ldb as isize, 1, 0.0, alpha, false, false, false, gemm::Parallelism::None)
        },
    }
}

/// `c (m, n) = a (m, k) · b (k, n)` on this thread, row strides `lda`, `ldb`, `ldc`.
///
/// # Safety
/// `c` must be valid for writes at every (i, j) with i < m, j < n, at `c + i·ldc + j`, and no
/// other thread may touch those elements during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_nn_single(kernels: Kernels, m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: *mut f32, ldc: usize) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(reach(m, k, lda) <= a.len() && reach(k, n, ldb) <= b.len(), "product: matrices out of their slices");
    match kernels {
        // SAFETY: `a` and `b` checked above, `c` by the caller's contract.
        Kernels::Blas(blas) => unsafe { blas.sgemm(m, n, k, 1.0, a.as_ptr(), lda, b.as_ptr(), ldb, false, 0.0, c, ldc) },
        Kernels::Fused | Kernels::Candle => unsafe {
            gemm::gemm(m, n, k, c, 1, ldc as isize, false, a.as_ptr(), 1, lda as isize, b.as_ptr(), 1, ldb as isize, 0.0, 1.0, false, false, false, gemm::Parallelism::None)
        },
    }
}

/// Elements a (rows, cols) matrix with row stride `ld` spans.
fn reach(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 { 0 } else { (rows - 1) * ld + cols }
}

#[cfg(test)]
mod tests;
