//! Moving data between the host and the CUDA device: uploads and writes on the compute stream,
//! asynchronous uploads out of pinned memory on the upload stream with the [`Fence`] that orders
//! compute behind them, zeroed tensors, and synchronous downloads.

use anyhow::{ensure, Context, Result};
use half::f16;

use super::device::{drv, CudaDevice};
use super::launch::launch;
use super::memory;
use super::tensor::CudaTensor;
use crate::device::{AlignedBuf, DType, DeviceTensor, Fence, HostSlice};

/// The bytes of host data, for the driver's byte copies.
fn host_bytes<'a>(data: &HostSlice<'a>) -> &'a [u8] {
    // SAFETY: f16, f32 and u32 are plain data without padding; the byte view covers exactly
    // the slice.
    unsafe {
        match data {
            HostSlice::F16(s) => {
                std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(*s))
            }
            HostSlice::F32(s) => {
                std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(*s))
            }
            HostSlice::U32(s) => {
                std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(*s))
            }
            HostSlice::Bytes(s) => s,
        }
    }
}

impl CudaDevice {
    /// Copies `bytes` bytes of `t` to the host into `out` (of any plain element type) and waits.
    fn dtoh_bytes(&self, t: &CudaTensor, offset_bytes: usize, out: &mut [u8]) -> Result<()> {
        let src = t.buf.slice(offset_bytes..offset_bytes + out.len());
        self.stream
            .memcpy_dtoh(&src, out)
            .map_err(|e| drv(e, "device-to-host copy"))?;
        self.stream
            .synchronize()
            .map_err(|e| drv(e, "synchronising after a download"))
    }
}

pub(super) fn upload(dev: &CudaDevice, data: HostSlice<'_>, shape: &[usize]) -> Result<CudaTensor> {
    let n: usize = shape.iter().product();
    ensure!(
        n == data.len(),
        "upload: shape {shape:?} holds {n} values, got {}",
        data.len()
    );
    let dtype = data
        .dtype()
        .context("upload: compressed bytes go through upload_compressed")?;
    let mut t = dev.alloc(dtype, shape)?;
    let bytes = host_bytes(&data);
    if !bytes.is_empty() {
        let mut dst = t.buf.slice_mut(0..bytes.len());
        dev.stream
            .memcpy_htod(bytes, &mut dst)
            .map_err(|e| drv(e, "host-to-device copy"))?;
    }
    Ok(t)
}

pub(super) fn upload_compressed(
    dev: &CudaDevice,
    bytes: &[u8],
    shape: &[usize],
    group_dim: usize,
) -> Result<CudaTensor> {
    let dtype = DType::Q4 { group_dim };
    ensure!(
        bytes.len() == dtype.bytes(shape),
        "upload_compressed: a tensor of shape {shape:?} grouped along dimension {group_dim} takes {} bytes, got {}",
        dtype.bytes(shape),
        bytes.len()
    );
    let mut t = dev.alloc(dtype, shape)?;
    let mut dst = t.buf.slice_mut(0..bytes.len());
    dev.stream
        .memcpy_htod(bytes, &mut dst)
        .map_err(|e| drv(e, "host-to-device copy"))?;
    Ok(t)
}

pub(super) fn write(
    dev: &CudaDevice,
    dst: &mut CudaTensor,
    offset: usize,
    data: HostSlice<'_>,
) -> Result<()> {
    ensure!(
        data.fits(dst.dtype),
        "write: {:?} data into a {:?} tensor",
        data.dtype(),
        dst.dtype
    );
    ensure!(
        offset + data.len() <= dst.units(),
        "write: elements {offset}..{} out of a tensor of {}",
        offset + data.len(),
        dst.units()
    );
    let bytes = host_bytes(&data);
    let off = offset * dst.dtype.size();
    let mut view = dst.buf.slice_mut(off..off + bytes.len());
    dev.stream
        .memcpy_htod(bytes, &mut view)
        .map_err(|e| drv(e, "host-to-device copy"))
}

pub(super) fn alloc_host(dev: &CudaDevice, bytes: usize) -> Result<AlignedBuf> {
    memory::pinned_aligned(&dev.ctx, bytes)
}

/// From pinned memory: on the upload stream, after the compute queued so far (the previous
/// user of a pooled `dst`), with an event for the compute stream to wait on. From other
/// memory: [`write`] on the compute stream (ordered, nothing to wait for).
pub(super) fn upload_async(
    dev: &CudaDevice,
    dst: &mut CudaTensor,
    offset: usize,
    src: &AlignedBuf,
    src_offset: usize,
    n: usize,
) -> Result<Option<Fence>> {
    let size = dst.dtype.size();
    let bytes = n * size;
    ensure!(
        offset + n <= dst.units() && src_offset + bytes <= src.len(),
        "upload_async: {n} values at {offset} of {} from byte {src_offset} of {}",
        dst.units(),
        src.len()
    );
    if src.owner::<memory::PinnedBuffer>().is_none() {
        let data = crate::device::host_slice(src, dst.dtype, src_offset, n)?;
        write(dev, dst, offset, data)?;
        return Ok(None);
    }
    let h2d = &dev.copies.h2d;
    let free = dev
        .stream
        .record_event(None)
        .map_err(|e| drv(e, "recording the compute stream's event"))?;
    h2d.wait(&free).map_err(|e| drv(e, "upload stream wait"))?;
    let host = &src.bytes()[src_offset..src_offset + bytes];
    let mut view = dst.buf.slice_mut(offset * size..offset * size + bytes);
    // a &[u8] over pinned memory: cudarc adds no synchronisation for plain slices, and the
    // driver sees a page-locked address, so the copy is a true asynchronous DMA
    h2d.memcpy_htod(host, &mut view)
        .map_err(|e| drv(e, "host-to-device copy on the upload stream"))?;
    let done = h2d
        .record_event(None)
        .map_err(|e| drv(e, "recording the upload event"))?;
    Ok(Some(Fence::new(memory::CudaFence(done))))
}

pub(super) fn wait_fence(dev: &CudaDevice, fence: &Fence) -> Result<()> {
    match fence.downcast::<memory::CudaFence>() {
        Some(f) => dev
            .stream
            .wait(&f.0)
            .map_err(|e| drv(e, "compute stream wait on an upload")),
        None => fence.wait_host(),
    }
}

pub(super) fn zeros(dev: &CudaDevice, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
    let mut t = dev.alloc(dtype, shape)?;
    dev.stream
        .memset_zeros(&mut t.buf)
        .map_err(|e| drv(e, "memset"))?;
    Ok(t)
}

pub(super) fn download_f32(dev: &CudaDevice, t: &CudaTensor) -> Result<Vec<f32>> {
    let n = t.numel();
    match t.dtype {
        DType::F32 => {
            let mut v = vec![0f32; n];
            // SAFETY: f32 has no invalid bit patterns; the byte view covers v exactly.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), n * 4) };
            dev.dtoh_bytes(t, 0, bytes)?;
            Ok(v)
        }
        DType::F16 => {
            // Converted on the device (the same rounding-free widening as on the host).
            let mut wide = dev.alloc(DType::F32, &t.shape)?;
            let (o, i, nn) = (dev.ptr_mut(&mut wide), dev.ptr(t), n as i64);
            // SAFETY: wide holds n floats, t n halves.
            unsafe { launch!(dev, "f16_to_f32", dev.grid_stride(n), &o, &i, &nn) }?;
            download_f32(dev, &wide)
        }
        DType::U32 => Ok(download_u32(dev, t)?
            .into_iter()
            .map(|x| x as f32)
            .collect()),
        DType::Q4 { group_dim } => {
            // decoded on the host by the CPU's decoder: downloads are for tests and checks
            let mut bytes = vec![0u8; t.size_bytes()];
            dev.dtoh_bytes(t, 0, &mut bytes)?;
            let l = crate::compress::Q4Layout::new(&t.shape, group_dim);
            Ok(crate::compress::decompress(&bytes, l))
        }
    }
}

pub(super) fn download_u32(dev: &CudaDevice, t: &CudaTensor) -> Result<Vec<u32>> {
    ensure!(
        t.dtype == DType::U32,
        "download_u32 of a {:?} tensor",
        t.dtype
    );
    let n = t.numel();
    let mut v = vec![0u32; n];
    // SAFETY: u32 has no invalid bit patterns.
    let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), n * 4) };
    dev.dtoh_bytes(t, 0, bytes)?;
    Ok(v)
}

pub(super) fn download_f16(
    dev: &CudaDevice,
    t: &CudaTensor,
    offset: usize,
    out: &mut [f16],
) -> Result<()> {
    ensure!(
        t.dtype == DType::F16,
        "download_f16 of a {:?} tensor",
        t.dtype
    );
    ensure!(
        offset + out.len() <= t.numel(),
        "download_f16: {}..{} of {}",
        offset,
        offset + out.len(),
        t.numel()
    );
    // SAFETY: f16 has no invalid bit patterns.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), out.len() * 2) };
    dev.dtoh_bytes(t, offset * 2, bytes)
}

pub(super) fn synchronize(dev: &CudaDevice) -> Result<()> {
    dev.ctx
        .synchronize()
        .map_err(|e| drv(e, "synchronising the GPU"))
}
