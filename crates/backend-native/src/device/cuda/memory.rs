//! Device memory pool, pinned host staging buffers, and copies on their own streams.
//!
//! The pool is CUDA's stream-ordered allocator (cuMemAllocAsync, which cudarc uses when the
//! device supports it) with its release threshold raised to "never": freed blocks stay reserved
//! and are handed out again without a driver round trip or a device-wide synchronisation, which
//! is what a hand-written size-class pool would give us, and the driver tracks its high-water mark
//! for the peak-memory report.

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice,
};

/// Keeps freed device memory in the default pool instead of returning it to the driver.
pub fn configure_pool(ctx: &Arc<CudaContext>) -> Result<()> {
    if !ctx.has_async_alloc() {
        return Ok(()); // cudarc falls back to cuMemAlloc; nothing to configure
    }
    // SAFETY: the device handle is valid; the attribute takes a u64 (cuuint64_t).
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(|e| anyhow!("cuDeviceGetDefaultMemPool: {e:?}"))?;
        let mut threshold: u64 = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(|e| anyhow!("setting the memory pool's release threshold: {e:?}"))?;
    }
    Ok(())
}

/// Bytes the pool has handed out at most (high-water mark), or None without async allocation.
pub fn pool_peak_bytes(ctx: &Arc<CudaContext>) -> Option<u64> {
    if !ctx.has_async_alloc() {
        return None;
    }
    // SAFETY: as in configure_pool.
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .ok()?;
        let mut v: u64 = 0;
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut v as *mut u64).cast(),
        )
        .result()
        .ok()?;
        Some(v)
    }
}

/// What the CPU will do with a pinned buffer, which decides its allocation flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinnedUse {
    /// The CPU only writes it and the GPU reads it (weights going up): write-combined memory,
    /// fastest over PCIe, but uncached for CPU reads.
    Upload,
    /// The CPU reads it (KV-cache write-back, CPU attention, results): ordinary cached pinned
    /// memory. cudarc's plain `alloc_pinned` is write-combined, which makes CPU reads from it
    /// many times slower, hence the explicit flags.
    ReadBack,
}

/// A page-locked host buffer of bytes.
pub struct PinnedBuffer {
    pub buf: PinnedHostSlice<u8>,
    pub usage: PinnedUse,
}

impl PinnedBuffer {
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize, usage: PinnedUse) -> Result<PinnedBuffer> {
        let flags = match usage {
            PinnedUse::Upload => sys::CU_MEMHOSTALLOC_WRITECOMBINED,
            PinnedUse::ReadBack => 0,
        };
        // SAFETY: the contents are uninitialised bytes; u8 has no invalid bit patterns and the
        // callers write before they read.
        let buf = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, flags) }
            .map_err(|e| anyhow!("allocating {bytes} bytes of pinned host memory: {e:?}"))?;
        Ok(PinnedBuffer { buf, usage })
    }
}

/// Copies on dedicated streams, so that transfers overlap with kernels on the compute stream.
/// Each copy records an event; the compute stream must wait on it (`stream.wait(&event)`) before
/// it uses the data or drops the buffer (device buffers are freed in the compute stream's order),
/// so the ordering is explicit and nothing synchronises the host.
pub struct CopyStreams {
    pub h2d: Arc<CudaStream>,
    pub d2h: Arc<CudaStream>,
}

impl CopyStreams {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<CopyStreams> {
        Ok(CopyStreams {
            h2d: ctx
                .new_stream()
                .context("creating the host-to-device copy stream")?,
            d2h: ctx
                .new_stream()
                .context("creating the device-to-host copy stream")?,
        })
    }

    /// Starts copying `src[..len]` (pinned) into `dst` on the upload stream, after `after` (the
    /// compute stream's last use of `dst`) if given. Returns the event that marks completion.
    pub fn upload(
        &self,
        src: &PinnedBuffer,
        dst: &mut CudaSlice<u8>,
        after: Option<&CudaEvent>,
    ) -> Result<CudaEvent> {
        if let Some(e) = after {
            self.h2d
                .wait(e)
                .map_err(|e| anyhow!("h2d stream wait: {e:?}"))?;
        }
        anyhow::ensure!(
            src.buf.len() >= dst.len(),
            "pinned source of {} bytes for a {}-byte upload",
            src.buf.len(),
            dst.len()
        );
        let n = dst.len();
        let host = src
            .buf
            .as_slice()
            .map_err(|e| anyhow!("pinned buffer: {e:?}"))?;
        self.h2d
            .memcpy_htod(&host[..n], dst)
            .map_err(|e| anyhow!("host-to-device copy of {n} bytes: {e:?}"))?;
        self.h2d
            .record_event(None)
            .map_err(|e| anyhow!("recording the upload event: {e:?}"))
    }

    /// Starts copying `src` into `dst` (pinned) on the download stream after `after` (the
    /// compute stream's event for the data). The host may read `dst` once the returned event
    /// has completed.
    pub fn download(
        &self,
        src: &CudaSlice<u8>,
        dst: &mut PinnedBuffer,
        after: Option<&CudaEvent>,
    ) -> Result<CudaEvent> {
        if let Some(e) = after {
            self.d2h
                .wait(e)
                .map_err(|e| anyhow!("d2h stream wait: {e:?}"))?;
        }
        let n = src.len();
        anyhow::ensure!(
            dst.buf.len() >= n,
            "pinned destination of {} bytes for a {n}-byte download",
            dst.buf.len()
        );
        let host = dst
            .buf
            .as_mut_slice()
            .map_err(|e| anyhow!("pinned buffer: {e:?}"))?;
        self.d2h
            .memcpy_dtoh(src, &mut host[..n])
            .map_err(|e| anyhow!("device-to-host copy of {n} bytes: {e:?}"))?;
        self.d2h
            .record_event(None)
            .map_err(|e| anyhow!("recording the download event: {e:?}"))
    }
}

/// Raw device address of a buffer, for kernel arguments. Streams are ordered explicitly with
/// events (cudarc's per-slice event tracking is switched off), so no guard is kept.
pub fn dptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _guard) = s.device_ptr(stream);
    p
}

/// As [`dptr`], for a buffer the kernel writes.
pub fn dptr_mut<T>(s: &mut CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _guard) = s.device_ptr_mut(stream);
    p
}

/// A copy queued on a copy stream, as a [`crate::device::Fence`]: the event recorded after it.
pub struct CudaFence(pub CudaEvent);

impl crate::device::FenceImpl for CudaFence {
    fn wait_host(&self) -> Result<()> {
        self.0
            .synchronize()
            .map_err(|e| anyhow!("waiting for a copy event: {e:?}"))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Pinned host memory as the offloader's [`crate::device::AlignedBuf`] (page-aligned, which
/// O_DIRECT reads need too). Write-combined: the CPU only fills these buffers (weights, disk
/// reads) and the GPU reads them.
pub fn pinned_aligned(ctx: &Arc<CudaContext>, bytes: usize) -> Result<crate::device::AlignedBuf> {
    let len = crate::device::alloc::align_up(bytes.max(1));
    let mut pinned = PinnedBuffer::new(ctx, len, PinnedUse::Upload)?;
    let ptr = pinned
        .buf
        .as_mut_ptr()
        .map_err(|e| anyhow!("pinned buffer: {e:?}"))?;
    // SAFETY: the pinned allocation is len bytes, lives as long as the owner box, and only the
    // AlignedBuf (its sole user) touches it.
    unsafe { crate::device::AlignedBuf::from_owner(ptr, len, Box::new(pinned)) }
}
