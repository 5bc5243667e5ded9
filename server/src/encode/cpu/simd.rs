//! Element-wise loops of the forward pass (softmax, GELU), written as plain branch-free f32
//! code that the compiler vectorizes, and compiled three times: for AVX-512, for AVX2 with FMA,
//! and for the baseline x86-64 the binary targets. The widest the processor has is taken at
//! run time, once.
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    Avx512,
    Avx2,
    Baseline,
}

pub fn width() -> Width {
    static WIDTH: OnceLock<Width> = OnceLock::new();
    *WIDTH.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Width::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Width::Avx2;
            }
        }
        Width::Baseline
    })
}

/// Compiles `$body` (a closure-free block over its arguments) once per [`Width`] and calls
/// the variant the processor runs.
macro_rules! dispatch {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { generic($($arg),*) }
                match width() {
                    // SAFETY: the processor has the features each variant is compiled for.
                    Width::Avx512 => return unsafe { avx512($($arg),*) },
                    Width::Avx2 => return unsafe { avx2($($arg),*) },
                    Width::Baseline => {}
                }
            }
            generic($($arg),*)
        }
    };
}

/// e^x for f32 (Cephes' expf: range reduction by powers of two and a degree-6 polynomial),
/// relative error below 2e-7 on [-87, 88]; below that it gives ~1e-38 rather than 0, which
/// no softmax sum notices.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5 * 2^23 trick: no libm call, so loops vectorize.
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from its bits: n + 127 is a whole number in [40, 255], the low mantissa bits of
    // 2^23 + (n + 127); a float-to-int cast would not vectorize (Rust's casts saturate).
    let biased = ((n + 127.0) + 8_388_608.0).to_bits() & 0xff;
    y * f32::from_bits(biased << 23)
}

/// erf for f32 as a rational polynomial on [-4, 4] (outside it erf is +-1 in f32): no
/// branches or libm calls (plain multiply-adds: `mul_add` would call libm's fmaf without the
/// fma target feature), so loops over it vectorize. Max error below 1e-6 (tested).
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600_1e-3;
    p = p * x2 + -1.609_603_3e-2;
    let p = p * x;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329_3e-3;
    q = q * x2 + -1.426_474e-2;
    p / q
}

const LANES: usize = 16;

dispatch!(softmax_rows(data: &mut [f32], width: usize) {
    for row in data.chunks_exact_mut(width) {
        // Maximum and sum over 16 lanes, then across them: the compiler keeps the lanes in
        // vector registers (a single running value would serialize every step).
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(chunk) {
                *l = l.max(v);
            }
        }
        let mut max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for &v in chunks.remainder() {
            max = max.max(v);
        }
        let mut sums = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (s, v) in sums.iter_mut().zip(chunk.iter_mut()) {
                *v = exp_f32(*v - max);
                *s += *v;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_f32(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
});

dispatch!(gelu_erf(input: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(input) {
        *o = 0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    }
});

dispatch!(geglu_rows(input: &[f32], out: &mut [f32], width: usize) {
    // Each input row is the activation's input then its gate, `width` each.
    for (src, dst) in input.chunks_exact(2 * width).zip(out.chunks_exact_mut(width)) {
        let (x, gate) = src.split_at(width);
        for ((o, &x), &g) in dst.iter_mut().zip(x).zip(gate) {
            *o = 0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)) * g;
        }
    }
});

dispatch!(geglu_tanh_rows(input: &[f32], out: &mut [f32], width: usize) {
    // As `geglu_rows`, with GELU's tanh approximation: 0.5·x·(1 + tanh(u)) = x·sigmoid(2u),
    // u = sqrt(2/π)·(x + 0.044715·x³), written with `exp_f32` so the loop vectorizes.
    const TWO_SQRT_2_OVER_PI: f32 = 1.595_769_2;
    for (src, dst) in input.chunks_exact(2 * width).zip(out.chunks_exact_mut(width)) {
        let (x, gate) = src.split_at(width);
        for ((o, &x), &g) in dst.iter_mut().zip(x).zip(gate) {
            let two_u = TWO_SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
            *o = x / (1.0 + exp_f32(-two_u)) * g;
        }
    }
});

dispatch!(swiglu_rows(input: &[f32], out: &mut [f32], width: usize) {
    // Each input row is the gate then the up projection, `width` each.
    for (src, dst) in input.chunks_exact(2 * width).zip(out.chunks_exact_mut(width)) {
        let (gate, up) = src.split_at(width);
        for ((o, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + exp_f32(-g)) * u;
        }
    }
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_erf_matches_libm() {
        let mut worst = 0f32;
        for i in -60_000..=60_000 {
            let x = i as f32 / 10_000.0;
            let err = (erf_f32(x) - (x as f64).erf_approx_ref() as f32).abs();
            worst = worst.max(err);
        }
        assert!(worst < 1e-6, "max |erf error| {worst}");
    }

    trait ErfRef {
        fn erf_approx_ref(self) -> f64;
    }
    impl ErfRef for f64 {
        /// erf in f64 by its Taylor series (|x| <= 3) or continued fraction: a reference
        /// independent of the f32 approximation.
        fn erf_approx_ref(self) -> f64 {
            let x = self;
            if x.abs() <= 3.0 {
                let mut sum = 0.0;
                let mut term = x;
                let mut n = 0.0;
                while term.abs() > 1e-17 || n < 5.0 {
                    sum += term / (2.0 * n + 1.0);
                    n += 1.0;
                    term *= -x * x / n;
                }
                sum * 2.0 / std::f64::consts::PI.sqrt()
            } else {
                // erfc continued fraction (Lentz), accurate for |x| > 3.
                let ax = x.abs();
                let mut f = 0.0;
                for k in (1..60).rev() {
                    f = (k as f64 / 2.0) / (ax + f);
                }
                let erfc = (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * (ax + f));
                (1.0 - erfc).copysign(x)
            }
        }
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 / 10_000.0;
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2e-7, "max relative exp error {worst}");
        assert!(exp_f32(-1e9) < 1e-37 && exp_f32(-1e9) >= 0.0);
    }

    #[test]
    fn gelu_tanh_gate_matches_the_tanh_formula() {
        let width = 7;
        let input: Vec<f32> = (0..2 * width * 3000).map(|i| ((i * 7919 % 20011) as f32 - 10005.0) / 1000.0).collect();
        let mut out = vec![0f32; width * 3000];
        geglu_tanh_rows(&input, &mut out, width);
        let mut worst = 0f64;
        for (src, got) in input.chunks_exact(2 * width).zip(out.chunks_exact(width)) {
            for i in 0..width {
                let (x, g) = (src[i] as f64, src[width + i] as f64);
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                let want = 0.5 * x * (1.0 + u.tanh()) * g;
                worst = worst.max((got[i] as f64 - want).abs() / want.abs().max(1.0));
            }
        }
        assert!(worst < 1e-6, "max |gelu tanh gate error| {worst}");
    }

    #[test]
    fn softmax_matches_the_plain_formula() {
        for width in [1usize, 7, 16, 33, 200] {
            let rows = 3;
            let mut data: Vec<f32> = (0..rows * width).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            data[width - 1] = -1e9; // a masked key
            let want: Vec<f64> = data
                .chunks(width)
                .flat_map(|row| {
                    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                    row.iter().map(move |&v| (v as f64 - max).exp() / sum).collect::<Vec<_>>()
                })
                .collect();
            softmax_rows(&mut data, width);
            for (got, want) in data.iter().zip(&want) {
                assert!((*got as f64 - want).abs() < 1e-6, "width {width}: {got} vs {want}");
            }
        }
    }
}
