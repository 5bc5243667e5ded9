//! A CBLAS library opened at run time (OpenBLAS as Debian and most distributions ship it, or
//! MKL's runtime library as its PyPI wheel ships it): its single-precision matrix product,
//! made single-threaded, so that the caller splits the rows across its own threads and no
//! second thread pool competes with candle's.
use std::ffi::{CStr, c_char, c_int};

use libloading::Library;

/// The libraries looked for when the configuration names none, by family: OpenBLAS (its
/// processor-dispatching build picks kernels for the machine it runs on) and MKL's runtime
/// library (the `mkl` wheel's `.so.3`, older ones' `.so.2`). The first name of a family that
/// opens stands for it; every family found is raced at start.
pub const SEARCHED: &[&[&str]] = &[&["libopenblas.so.0", "libopenblas.so"], &["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"]];

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

pub struct Blas {
    /// Keeps the library mapped for as long as `sgemm` may be called.
    _library: Library,
    sgemm: Sgemm,
    /// The name or path it was opened by.
    pub name: String,
    /// What was opened, and what it says of itself where it can (OpenBLAS's build config).
    pub description: String,
}

impl Blas {
    pub fn open(name: &str) -> Result<Blas, String> {
        // SAFETY: opening a shared library runs its initializers; a BLAS library's only set up
        // its own state.
        let library = unsafe { Library::new(name) }.map_err(|e| format!("{name}: {e}"))?;
        // SAFETY: the symbol has the CBLAS signature in every CBLAS library.
        let sgemm: Sgemm = *unsafe { library.get::<Sgemm>(b"cblas_sgemm\0") }.map_err(|_| format!("{name}: no cblas_sgemm in it"))?;
        let mut description = name.to_string();
        // One thread per call: the library's own threads would spin between calls and take
        // the cores from the other operations of the forward pass.
        // SAFETY: these are the libraries' documented entry points, with their C signatures.
        unsafe {
            if let Ok(set) = library.get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0") {
                set(1);
            }
            if let Ok(config) = library.get::<unsafe extern "C" fn() -> *const c_char>(b"openblas_get_config\0") {
                let text = config();
                if !text.is_null() {
                    let text = CStr::from_ptr(text).to_string_lossy();
                    description = format!("{name} ({text}");
                    if let Ok(core) = library.get::<unsafe extern "C" fn() -> *const c_char>(b"openblas_get_corename\0") {
                        let core = core();
                        if !core.is_null() {
                            description.push_str(&format!(", kernels for {}", CStr::from_ptr(core).to_string_lossy()));
                        }
                    }
                    description.push(')');
                }
            }
            // MKL: the sequential layer needs no OpenMP runtime beside it.
            if let Ok(layer) = library.get::<unsafe extern "C" fn(c_int) -> c_int>(b"MKL_Set_Threading_Layer\0") {
                layer(1);
            }
            if let Ok(set) = library.get::<unsafe extern "C" fn(c_int)>(b"MKL_Set_Num_Threads\0") {
                set(1);
            }
        }
        let blas = Blas { _library: library, sgemm, name: name.to_string(), description };
        blas.check().map_err(|e| format!("{name}: {e}"))?;
        Ok(blas)
    }

    /// `c (m, n) = alpha * a (m, k) · op(b) + beta * c`, row-major with row strides `lda`,
    /// `ldb`, `ldc`; op(b) is `b`, a (k, n) matrix, or with `b_trans` the transpose of `b`
    /// stored as (n, k) rows (a dense layer's weight).
    ///
    /// # Safety
    /// `a`, `b` and `c` must be valid for every element their shapes and strides reach (reads
    /// for `a` and `b`, reads and writes for `c`), and no other thread may touch those
    /// elements of `c` during the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sgemm(&self, m: usize, n: usize, k: usize, alpha: f32, a: *const f32, lda: usize, b: *const f32, ldb: usize, b_trans: bool, beta: f32, c: *mut f32, ldc: usize) {
        if m == 0 || n == 0 {
            return;
        }
        let int = |v: usize| c_int::try_from(v).expect("matrix dimension fits in a C int");
        // SAFETY: the caller's contract; the library is single-threaded (set at open) and
        // keeps no pointer after returning.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                NO_TRANS,
                if b_trans { TRANS } else { NO_TRANS },
                int(m),
                int(n),
                int(k),
                alpha,
                a,
                int(lda),
                b,
                int(ldb),
                beta,
                c,
                int(ldc),
            )
        }
    }

    /// A product against the plain triple loop: a library that gets it wrong (a broken build,
    /// a kernel the processor lacks) is refused at open rather than trusted.
    fn check(&self) -> Result<(), String> {
        let (m, n, k) = (37, 29, 41);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
        let b: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
        let mut c = vec![1.0f32; m * n];
        // SAFETY: the vectors hold exactly the (m, k), (n, k) and (m, n) matrices.
        unsafe { self.sgemm(m, n, k, 1.0, a.as_ptr(), k, b.as_ptr(), k, true, 1.0, c.as_mut_ptr(), n) };
        for i in 0..m {
            for j in 0..n {
                let want = 1.0 + (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum::<f32>();
                if (c[i * n + j] - want).abs() > 1e-3 {
                    return Err(format!("a test product gave {} at ({i}, {j}), expected {want}", c[i * n + j]));
                }
            }
        }
        Ok(())
    }
}
