//! [`CudaDevice`]: one GPU opened for the engine (its context, the compute stream, the copy
//! streams, the BLAS handles and the loaded kernels) and its tensor allocation.
//!
//! Activations and the KV cache are fp16 on the device; every kernel accumulates in f32 (see
//! `kernels/`). All compute goes to one stream in issue order, so ops need no synchronisation
//! between them; transfers that should overlap with compute use [`CopyStreams`] and events.
//! The ops themselves live in the modules of their concern, and [`super::device_impl`] joins them
//! into the [`crate::device::Device`] trait.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, ensure, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{sys, CudaContext, CudaStream, DriverError};

use super::lt::LtGemm;
use super::memory::{self, dptr, dptr_mut, CopyStreams};
use super::module::KernelSet;
use super::presence;
// re-exported where it was before the split, `device::cuda::device::CudaTensor`
pub use super::tensor::CudaTensor;
use crate::device::{DType, OutOfMemory};

/// The CUDA device.
pub struct CudaDevice {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    /// Upload / download streams for transfers that overlap with compute.
    pub copies: CopyStreams,
    pub(super) blas: CudaBlas,
    /// cuBLASLt with cached plans (bias/ReLU fused); None where it cannot be created.
    pub(super) lt: Option<LtGemm>,
    pub(super) kernels: KernelSet,
    pub(super) label: String,
    pub(super) sm_count: usize,
}

/// A driver error as an error saying what was being done.
pub(super) fn drv(e: DriverError, what: &str) -> anyhow::Error {
    anyhow!("{what}: {e:?}")
}

impl CudaDevice {
    /// Opens GPU `ordinal`: checks the driver and cuBLAS first (no panic on a GPU-less machine),
    /// then creates the context, streams, BLAS handles, and loads the kernels (compiling them
    /// with NVRTC unless cached under `cache_root`, default `~/.cache/flexbench`).
    pub fn new(ordinal: usize, cache_root: Option<&Path>) -> Result<CudaDevice> {
        let found = presence::probe().map_err(|e| anyhow!(e))?;
        ensure!(
            ordinal < found.device_count,
            "GPU {ordinal} requested but the driver reports {} device(s)",
            found.device_count
        );
        presence::probe_cublas().map_err(|e| anyhow!(e))?;
        let ctx = CudaContext::new(ordinal).map_err(|e| drv(e, "creating the CUDA context"))?;
        // Streams are ordered with explicit events; cudarc's per-buffer event tracking would add
        // an event record per kernel argument.
        // SAFETY: no buffer or stream exists yet.
        unsafe { ctx.disable_event_tracking() };
        memory::configure_pool(&ctx)?;
        let stream = ctx
            .new_stream()
            .map_err(|e| drv(e, "creating the compute stream"))?;
        let copies = CopyStreams::new(&ctx)?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| anyhow!("creating the cuBLAS handle: {e:?}"))?;
        let root = cache_root
            .map(Path::to_path_buf)
            .unwrap_or_else(bench_core::dirs::cache_dir);
        let kernels = KernelSet::load(&ctx, &root)?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| drv(e, "reading the SM count"))? as usize;
        let gpu = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let (cc_major, _) = ctx
            .compute_capability()
            .map_err(|e| drv(e, "reading the compute capability"))?;
        let lt = LtGemm::new(stream.clone(), cc_major).ok();
        let label = format!(
            "cuda:{ordinal} ({gpu}, {}, {} SMs, driver CUDA {}.{})",
            kernels.arch, sm_count, found.driver_version.0, found.driver_version.1
        );
        Ok(CudaDevice {
            ctx,
            stream,
            copies,
            blas,
            lt,
            kernels,
            label,
            sm_count,
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn kernels(&self) -> &KernelSet {
        &self.kernels
    }
    /// Peak bytes handed out by the device memory pool.
    pub fn peak_memory_bytes(&self) -> Option<u64> {
        memory::pool_peak_bytes(&self.ctx)
    }

    /// An uninitialised tensor. Allocation failure carries [`OutOfMemory`].
    pub(super) fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
        let bytes = dtype.bytes(shape);
        // SAFETY: uninitialised device bytes; every op writes its output before it is read.
        let buf = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| {
            if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                anyhow::Error::new(OutOfMemory {
                    device: self.label.clone(),
                    bytes: bytes as u64,
                })
            } else {
                drv(e, &format!("allocating {bytes} bytes on the GPU"))
            }
        })?;
        Ok(CudaTensor {
            buf,
            shape: shape.to_vec(),
            dtype,
        })
    }

    pub(super) fn ptr(&self, t: &CudaTensor) -> u64 {
        dptr(&t.buf, &self.stream)
    }
    pub(super) fn ptr_mut(&self, t: &mut CudaTensor) -> u64 {
        dptr_mut(&mut t.buf, &self.stream)
    }

    /// Allocates an uninitialised tensor (benchmarks fill it themselves).
    pub fn empty(&self, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
        self.alloc(dtype, shape)
    }
}
