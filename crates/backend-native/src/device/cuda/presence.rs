//! Is there a usable CUDA device here? Answered without letting cudarc panic.
//!
//! cudarc (dynamic loading) panics on the first call into a CUDA library it cannot dlopen, so
//! every library is probed here first with a plain dlopen, and the driver is initialised through
//! calls that return errors. Callers turn an `Err` into "pick the CPU device" or, for a case that
//! asked for CUDA, an `unavailable` outcome with this message as the reason.

use libloading::Library;

/// What the probe found.
#[derive(Debug, Clone)]
pub struct CudaPresence {
    pub device_count: usize,
    /// CUDA version the driver supports, e.g. (13, 0).
    pub driver_version: (i32, i32),
}

/// Shared libraries the CUDA device needs, by the names cudarc (pinned to CUDA 13) looks for.
const DRIVER_LIB: &str = "libcuda.so.1";

fn dlopen_ok(name: &str) -> Result<(), String> {
    // SAFETY: loading a CUDA library runs only its own initialisers; the handle is dropped
    // (dlclose) right away, and the library stays mapped for cudarc if it was opened before.
    unsafe { Library::new(name) }
        .map(drop)
        .map_err(|e| match std::error::Error::source(&e) {
            Some(why) => format!("{e}: {why}"),
            None => e.to_string(),
        })
}

/// Checks the driver library, initialises the driver and counts devices.
pub fn probe() -> Result<CudaPresence, String> {
    dlopen_ok(DRIVER_LIB).map_err(|e| {
        format!("no NVIDIA driver: {DRIVER_LIB} could not be loaded ({e}); the cuda device needs an NVIDIA GPU with its driver")
    })?;
    // The library is loadable, so cudarc's lookup (which tries libcuda.so.1 among its names)
    // succeeds and these calls return errors instead of panicking.
    use cudarc::driver::result;
    result::init().map_err(|e| {
        format!("the NVIDIA driver failed to initialise: {e:?} (no usable GPU here?)")
    })?;
    let count =
        result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
    if count <= 0 {
        return Err("the NVIDIA driver reports no CUDA device".into());
    }
    let mut v = 0;
    // SAFETY: v is valid for writes.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| format!("cuDriverGetVersion failed: {e:?}"))?;
    Ok(CudaPresence {
        device_count: count as usize,
        driver_version: (v / 1000, (v % 1000) / 10),
    })
}

/// Checks that cuBLAS and cuBLASLt (CUDA 13) can be loaded, so creating their handles cannot
/// panic. The message says what to put on the library path.
pub fn probe_cublas() -> Result<(), String> {
    // SAFETY: is_culib_present only tries dlopen on cudarc's candidate names.
    let blas = unsafe { cudarc::cublas::sys::is_culib_present() };
    let lt = unsafe { cudarc::cublaslt::sys::is_culib_present() };
    if blas && lt {
        Ok(())
    } else {
        Err(format!(
            "cuBLAS for CUDA 13 not found (libcublas.so.13 {}, libcublasLt.so.13 {}); add the CUDA \
             toolkit's lib64 directory (e.g. /usr/local/cuda/lib64) to LD_LIBRARY_PATH",
            if blas { "found" } else { "missing" },
            if lt { "found" } else { "missing" }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs everywhere: without a driver the probe must say so in words (not panic); with one
    /// it must find at least one device.
    #[test]
    fn probe_reports_driver_absence_or_a_device() {
        match probe() {
            Ok(p) => assert!(p.device_count >= 1),
            Err(msg) => {
                let driver_missing = dlopen_ok(DRIVER_LIB).is_err();
                if driver_missing {
                    assert!(
                        msg.contains("no NVIDIA driver"),
                        "unexpected message: {msg}"
                    );
                    assert!(
                        msg.contains(DRIVER_LIB),
                        "message should name the library: {msg}"
                    );
                } else {
                    assert!(!msg.is_empty());
                }
            }
        }
    }
}
