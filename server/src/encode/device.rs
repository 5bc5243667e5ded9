//! From a [`Placement`] (config's `device` and `dtype`) to a candle device and dtype, with
//! every reason it cannot be had said at start-up: no CUDA in this build, no driver or CUDA
//! library on this machine, no such device, a GPU the kernels were not built for.
use candle_core::{DType, Device};

use super::{EncodeError, Placement};
use crate::config::{DTypeSpec, DeviceSpec};

/// Compute capability the CUDA kernels were compiled for, when the build said
/// (scripts/build-cuda does). The kernels are PTX, JIT-compiled by the driver: for 9.0 and up
/// candle's build targets the arch-specific variant (sm_90a), which runs on that exact
/// capability only; below it, on that capability and newer.
pub const CUDA_COMPUTE_CAP: Option<&str> = option_env!("CUDA_COMPUTE_CAP");

pub fn dtype(spec: DTypeSpec) -> DType {
    match spec {
        DTypeSpec::F32 => DType::F32,
        DTypeSpec::F16 => DType::F16,
        DTypeSpec::Bf16 => DType::BF16,
    }
}

/// A short name for logs and reports: `cpu/f32`, `cuda:0/bf16`.
pub fn describe(placement: Placement) -> String {
    let device = match placement.device {
        DeviceSpec::Cpu => "cpu".to_string(),
        DeviceSpec::Cuda(n) => format!("cuda:{n}"),
    };
    let dtype = match placement.dtype {
        DTypeSpec::F32 => "f32",
        DTypeSpec::F16 => "f16",
        DTypeSpec::Bf16 => "bf16",
    };
    format!("{device}/{dtype}")
}

/// Opens the device a placement names. A CUDA device is checked end to end (driver and
/// libraries present, ordinal in range, compute capability, one kernel run) so a device that
/// cannot work fails here, at start-up, rather than on the first request.
pub fn open(spec: DeviceSpec) -> Result<Device, EncodeError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => open_cuda(ordinal),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device, EncodeError> {
    Err(EncodeError::Unsupported(format!(
        "\"cuda:{ordinal}\" asked for, but this server was built without CUDA support: use \"cpu\", \
         or run a server built with the `cuda` feature (scripts/build-cuda)"
    )))
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device, EncodeError> {
    use candle_core::cuda::cudarc;

    let unusable = |reason: String| EncodeError::Unsupported(format!("\"cuda:{ordinal}\" cannot be used: {reason}"));
    // cudarc opens these on first use and panics when one is missing: look first, and name it.
    // (cuRAND is only loaded to draw random numbers, which inference never does.)
    // SAFETY: each call only dlopens the library (and drops the handle), running its
    // initializers as any load would.
    let libraries: [(&str, bool); 3] = unsafe {
        [
            ("libcuda (the NVIDIA driver)", cudarc::driver::sys::is_culib_present()),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
            ("libcublasLt", cudarc::cublaslt::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = libraries.iter().filter(|(_, present)| !present).map(|(name, _)| *name).collect();
    if !missing.is_empty() {
        return Err(unusable(format!(
            "{} not found; this binary opens the CUDA libraries at run time (CUDA {} or a \
             compatible release): install the NVIDIA driver and CUDA libraries, or put their \
             directories on LD_LIBRARY_PATH",
            missing.join(", "),
            cuda_release(),
        )));
    }
    let count = std::panic::catch_unwind(cudarc::driver::CudaContext::device_count)
        .map_err(|_| unusable("the CUDA driver could not be initialized".into()))?
        .map_err(|e| unusable(format!("the CUDA driver could not be initialized: {e}")))?;
    if ordinal >= count.max(0) as usize {
        return Err(unusable(format!("the driver sees {count} CUDA device(s)")));
    }
    let device = std::panic::catch_unwind(|| Device::new_cuda(ordinal))
        .map_err(|_| unusable("creating the device panicked".into()))?
        .map_err(|e| unusable(e.to_string()))?;
    if let (Device::Cuda(cuda), Some(built)) = (&device, CUDA_COMPUTE_CAP) {
        let (major, minor) =
            cuda.cuda_stream().context().compute_capability().map_err(|e| unusable(e.to_string()))?;
        let have = (major * 10 + minor) as u32;
        let built: u32 = built.trim_end_matches(|c: char| c.is_ascii_alphabetic()).parse().unwrap_or(0);
        let runs = if built >= 90 { have == built } else { have >= built };
        if !runs {
            return Err(unusable(format!(
                "compute capability {major}.{minor}, but the kernels were built for {}.{}{} \
                 (rebuild with CUDA_COMPUTE_CAP={have} scripts/build-cuda)",
                built / 10,
                built % 10,
                if built >= 90 { " only" } else { " and newer" },
            )));
        }
    }
    // One kernel and one cuBLAS call: the driver JIT-compiles the PTX here, so a driver too
    // old for it fails now.
    let probe = || -> candle_core::Result<f32> {
        let a = candle_core::Tensor::ones((8, 8), DType::F32, &device)?;
        let sum = a.matmul(&a)?.sum_all()?.to_scalar::<f32>()?;
        device.synchronize()?;
        Ok(sum)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(probe)) {
        Ok(Ok(sum)) if sum == 512.0 => Ok(device),
        Ok(Ok(sum)) => Err(unusable(format!("a test matmul gave {sum}, expected 512"))),
        Ok(Err(e)) => Err(unusable(format!(
            "running a kernel failed ({e}); the kernels are PTX from CUDA {}, which needs a driver \
             that supports that release",
            cuda_release()
        ))),
        Err(_) => Err(unusable("running a kernel panicked".into())),
    }
}

#[cfg(feature = "cuda")]
fn cuda_release() -> String {
    // CUDARC_CUDA_VERSION is 13000 for 13.0 (set by scripts/build-cuda).
    match option_env!("CUDARC_CUDA_VERSION") {
        Some(v) if v.len() == 5 => format!("{}.{}", &v[..2], &v[3..4]),
        _ => "12 or 13".to_string(),
    }
}

/// The device (opened and checked, see [`open`]) and dtype of a placement.
pub fn resolve(placement: Placement) -> Result<(Device, DType), EncodeError> {
    let device = open(placement.device)?;
    Ok((device, dtype(placement.dtype)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_opens_and_names_itself() {
        assert!(open(DeviceSpec::Cpu).unwrap().is_cpu());
        assert_eq!(describe(Placement { device: DeviceSpec::Cuda(1), dtype: DTypeSpec::Bf16 }), "cuda:1/bf16");
        assert_eq!(dtype(DTypeSpec::F16), DType::F16);
    }

    /// Without the feature, a CUDA device is refused with what to do about it; with it, on a
    /// machine without a usable GPU (as every test machine), it is refused with the reason.
    #[test]
    fn cuda_refusal_says_why() {
        let err = match open(DeviceSpec::Cuda(0)) {
            Err(e) => e,
            Ok(_) if cfg!(feature = "cuda") => return, // a machine with a GPU
            Ok(_) => panic!("a CPU build opened a CUDA device"),
        };
        let msg = err.to_string();
        assert!(msg.contains("cuda:0"), "{msg}");
        if cfg!(feature = "cuda") {
            assert!(msg.contains("cannot be used"), "{msg}");
        } else {
            assert!(msg.contains("built without CUDA support") && msg.contains("scripts/build-cuda"), "{msg}");
        }
        assert_eq!(err.config_field("encoder"), "encoder.device / encoder.dtype");
    }
}
