//! [`CudaDevice`]: the engine's [`Device`] trait on an NVIDIA GPU.
//!
//! Activations and the KV cache are fp16 on the device; every kernel accumulates in f32 (see
//! `kernels/`). All compute goes to one stream in issue order, so ops need no synchronisation
//! between them; transfers that should overlap with compute use [`CopyStreams`] and events.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::cublas::{sys as cublas_sys, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    sys, CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DriverError, LaunchConfig,
    PushKernelArg,
};
use half::f16;

use super::lt::LtGemm;
use super::memory::{self, dptr, dptr_mut, CopyStreams};
use super::module::{default_cache_root, KernelSet};
use super::presence;
use crate::device::{
    Activation, AlignedBuf, AttnShape, DType, Device, DeviceTensor, Fence, HostSlice, OutOfMemory,
    Sampling,
};

/// A tensor in device memory: raw bytes plus its shape and element type.
pub struct CudaTensor {
    buf: CudaSlice<u8>,
    shape: Vec<usize>,
    dtype: DType,
}

impl DeviceTensor for CudaTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

impl CudaTensor {
    /// The underlying device buffer (at least `size_bytes()` long), e.g. for [`CopyStreams`].
    pub fn buffer(&self) -> &CudaSlice<u8> {
        &self.buf
    }
    pub fn buffer_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.buf
    }
    fn f16_view(&self) -> CudaView<'_, f16> {
        // SAFETY: the buffer holds numel() f16 values (checked by callers through the dtype) and
        // device allocations are 256-byte aligned.
        unsafe { self.buf.transmute::<f16>(self.numel()) }
            .expect("an F16 tensor's buffer holds numel halves")
    }
    fn f16_view_mut(&mut self) -> CudaViewMut<'_, f16> {
        let n = self.numel();
        // SAFETY: as in f16_view.
        unsafe { self.buf.transmute_mut::<f16>(n) }
            .expect("an F16 tensor's buffer holds numel halves")
    }
}

/// Rows of 128 threads for the attention kernels: must match PF_WARPS * 32 and DEC_THREADS.
const ATTN_THREADS: u32 = 128;
/// Must match DEC_MAX_CHUNK in kernels/attention_decode.cu.
const DECODE_MAX_CHUNK: usize = 1024;
/// Must match PF_BQ in kernels/attention_prefill.cu.
const PREFILL_BQ: usize = 16;

/// The CUDA device.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Upload / download streams for transfers that overlap with compute.
    pub copies: CopyStreams,
    blas: CudaBlas,
    /// cuBLASLt with cached plans (bias/ReLU fused); None where it cannot be created.
    lt: Option<LtGemm>,
    kernels: KernelSet,
    label: String,
    sm_count: usize,
}

fn drv(e: DriverError, what: &str) -> anyhow::Error {
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
            .unwrap_or_else(default_cache_root);
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
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
        let bytes = shape.iter().product::<usize>() * dtype.size();
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

    fn ptr(&self, t: &CudaTensor) -> u64 {
        dptr(&t.buf, &self.stream)
    }
    fn ptr_mut(&self, t: &mut CudaTensor) -> u64 {
        dptr_mut(&mut t.buf, &self.stream)
    }

    /// Blocks for a grid-stride elementwise kernel over n elements: enough to fill the GPU.
    fn grid_stride(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, self.sm_count * 8);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `t` as F16: itself, or an F16 copy made by the conversion kernel (callers may hand over
    /// F32 tensors they uploaded themselves).
    fn as_f16<'a>(
        &self,
        t: &'a CudaTensor,
        tmp: &'a mut Option<CudaTensor>,
    ) -> Result<&'a CudaTensor> {
        match t.dtype {
            DType::F16 => Ok(t),
            DType::F32 => {
                let mut out = self.alloc(DType::F16, &t.shape)?;
                let n = t.numel() as i64;
                let (o, i) = (self.ptr_mut(&mut out), self.ptr(t));
                let f = self.kernels.get("f32_to_f16")?;
                // SAFETY: out holds n halves, t holds n floats.
                unsafe {
                    self.stream
                        .launch_builder(f)
                        .arg(&o)
                        .arg(&i)
                        .arg(&n)
                        .launch(self.grid_stride(n as usize))
                }
                .map_err(|e| drv(e, "f32_to_f16"))?;
                Ok(tmp.insert(out))
            }
            DType::U32 => bail!(
                "expected a floating-point tensor, got U32 of shape {:?}",
                t.shape
            ),
        }
    }

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
            }
        }
    }

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

    fn check_2d(t: &CudaTensor, what: &str) -> Result<(usize, usize)> {
        match t.shape.as_slice() {
            [r, c] => Ok((*r, *c)),
            s => bail!("{what}: expected a 2-d tensor, got shape {s:?}"),
        }
    }

    fn check_attn_shape(s: &AttnShape) -> Result<()> {
        ensure!(
            s.head_dim.is_multiple_of(8) && s.head_dim <= 128 && s.head_dim > 0,
            "the CUDA attention kernels need head_dim a multiple of 8 and at most 128, got {}",
            s.head_dim
        );
        Ok(())
    }

    /// `y[n, out] = x[n, in] W[out, in]^T` with cuBLAS (f16 in/out, f32 accumulation, tensor
    /// cores), then bias and activation: fused in cuBLASLt's epilogue (cached plan per shape),
    /// or, where cuBLASLt has no algorithm or `allow_lt` is false, cublasGemmEx and the bias
    /// kernel.
    fn gemm_bias_act(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        act: Activation,
        y: &mut CudaTensor,
        allow_lt: bool,
    ) -> Result<()> {
        let (n, k) = Self::check_2d(x, "linear input")?;
        let (m, k2) = Self::check_2d(w, "linear weight")?;
        ensure!(k == k2, "linear: input width {k} but weight {m}x{k2}");
        if let Some(b) = bias {
            ensure!(
                b.numel() == m && b.dtype == DType::F16,
                "linear: bias of shape {:?} for {m} outputs",
                b.shape
            );
        }
        // OPT applies ReLU only after fc1's bias; the unfused path's kernel does bias + act.
        ensure!(
            bias.is_some() || act == Activation::None,
            "linear: ReLU without a bias is not supported"
        );
        if allow_lt {
            if let Some(lt) = &self.lt {
                // SAFETY: shapes and dtypes were checked above; the buffers outlive the launch
                // (they are freed in stream order).
                let done = unsafe {
                    lt.gemm(
                        &x.buf,
                        &w.buf,
                        bias.map(|b| &b.buf),
                        &mut y.buf,
                        n,
                        k,
                        m,
                        act == Activation::Relu,
                    )
                }?;
                if done {
                    return Ok(());
                }
                // No cuBLASLt algorithm for this shape: cuBLAS + the bias kernel below.
            }
        }
        let cfg = GemmConfig {
            transa: cublas_sys::cublasOperation_t::CUBLAS_OP_T,
            transb: cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            m: m as i32,
            n: n as i32,
            k: k as i32,
            alpha: f16::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: f16::ZERO,
            ldc: m as i32,
        };
        {
            let (wv, xv) = (w.f16_view(), x.f16_view());
            let mut yv = y.f16_view_mut();
            // SAFETY: as above.
            unsafe { self.blas.gemm(cfg, &wv, &xv, &mut yv) }
                .map_err(|e| anyhow!("cuBLAS GEMM {n}x{k} * {k}x{m}: {e:?}"))?;
        }
        if let Some(b) = bias {
            let (yp, bp) = (self.ptr_mut(y), self.ptr(b));
            let rows = n as i64;
            let cols = m as i32;
            let relu = (act == Activation::Relu) as i32;
            let f = self.kernels.get("bias_act_f16")?;
            // SAFETY: y is [n, m] F16, bias [m] F16.
            unsafe {
                self.stream
                    .launch_builder(f)
                    .arg(&yp)
                    .arg(&bp)
                    .arg(&rows)
                    .arg(&cols)
                    .arg(&relu)
                    .launch(self.grid_stride(n * m))
            }
            .map_err(|e| drv(e, "bias_act_f16"))?;
        }
        Ok(())
    }

    /// `y[n, m] = x[n, k] w[m, k]^T (+ bias, act)` into an existing tensor, through the same path
    /// as [`Device::linear`] (`lt = true`) or through plain cuBLAS `cublasGemmEx` only
    /// (`lt = false`). For benchmarks: gpu-check compares the engine's GEMMs with the best rate
    /// cuBLAS reaches on large square products.
    pub fn gemm_into(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        act: Activation,
        y: &mut CudaTensor,
        lt: bool,
    ) -> Result<()> {
        ensure!(
            x.dtype == DType::F16 && w.dtype == DType::F16 && y.dtype == DType::F16,
            "gemm_into: F16 tensors expected"
        );
        let (n, m) = Self::check_2d(y, "gemm_into output")?;
        ensure!(
            x.shape[0] == n && w.shape[0] == m,
            "gemm_into: output {:?} for x {:?} and w {:?}",
            y.shape,
            x.shape,
            w.shape
        );
        self.gemm_bias_act(x, w, bias, act, y, lt)
    }

    /// Allocates an uninitialised tensor (benchmarks fill it themselves).
    pub fn empty(&self, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
        self.alloc(dtype, shape)
    }

    /// Launches the decode attention kernels (one query per sequence).
    fn attention_decode(
        &self,
        q: &CudaTensor,
        kc: &CudaTensor,
        vc: &CudaTensor,
        mask: &CudaTensor,
        s: AttnShape,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let total = s.total_len();
        let max_len = kc.shape[2];
        let bh = s.batch * s.heads;
        // Enough splits to give every SM two blocks, but no chunk shorter than 64 keys (the
        // merge would then cost more than it spreads) and none longer than the kernel's buffer.
        let min_splits = total.div_ceil(DECODE_MAX_CHUNK);
        let want = (2 * self.sm_count)
            .div_ceil(bh)
            .min(total.div_ceil(64))
            .max(1);
        let splits = want.max(min_splits);
        let chunk = total.div_ceil(splits);
        let splits = total.div_ceil(chunk);
        let (mut part_o, mut part_ml) = if splits > 1 {
            (
                Some(self.alloc(DType::F32, &[bh * splits * s.head_dim])?),
                Some(self.alloc(DType::F32, &[bh * splits * 2])?),
            )
        } else {
            (None, None)
        };
        let op = self.ptr_mut(out);
        let po = part_o.as_mut().map(|t| self.ptr_mut(t)).unwrap_or(0);
        let pml = part_ml.as_mut().map(|t| self.ptr_mut(t)).unwrap_or(0);
        let (qp, kp, vp, mp) = (self.ptr(q), self.ptr(kc), self.ptr(vc), self.ptr(mask));
        let q_stride = s.hidden() as i64;
        let cs_s = s.head_dim as i64;
        let cs_h = (max_len * s.head_dim) as i64;
        let cs_b = (s.heads * max_len * s.head_dim) as i64;
        let mask_stride = total as i64;
        let (heads, hd, len, chunk_i) = (
            s.heads as i32,
            s.head_dim as i32,
            total as i32,
            chunk as i32,
        );
        let out_stride = s.hidden() as i64;
        let scale = s.scale();
        let cfg = LaunchConfig {
            grid_dim: (s.heads as u32, s.batch as u32, splits as u32),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = self.kernels.get("attention_decode_f16")?;
        // SAFETY: the argument list matches attention_decode_f16's signature; shapes were checked.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&op)
                .arg(&po)
                .arg(&pml)
                .arg(&qp)
                .arg(&q_stride)
                .arg(&kp)
                .arg(&vp)
                .arg(&cs_b)
                .arg(&cs_h)
                .arg(&cs_s)
                .arg(&mp)
                .arg(&mask_stride)
                .arg(&heads)
                .arg(&hd)
                .arg(&len)
                .arg(&chunk_i)
                .arg(&out_stride)
                .arg(&scale)
                .launch(cfg)
        }
        .map_err(|e| drv(e, "attention_decode_f16"))?;
        if splits > 1 {
            let splits_i = splits as i32;
            let f = self.kernels.get("attention_decode_reduce_f16")?;
            let cfg = LaunchConfig {
                grid_dim: (s.heads as u32, s.batch as u32, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above.
            unsafe {
                self.stream
                    .launch_builder(f)
                    .arg(&op)
                    .arg(&po)
                    .arg(&pml)
                    .arg(&heads)
                    .arg(&hd)
                    .arg(&splits_i)
                    .arg(&out_stride)
                    .launch(cfg)
            }
            .map_err(|e| drv(e, "attention_decode_reduce_f16"))?;
        }
        // part_o / part_ml are freed stream-ordered after the kernels that use them.
        Ok(())
    }

    fn attention_prefill(
        &self,
        q: &CudaTensor,
        kc: &CudaTensor,
        vc: &CudaTensor,
        mask: &CudaTensor,
        s: AttnShape,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let max_len = kc.shape[2];
        let op = self.ptr_mut(out);
        let (qp, kp, vp, mp) = (self.ptr(q), self.ptr(kc), self.ptr(vc), self.ptr(mask));
        let cs_s = s.head_dim as i64;
        let cs_h = (max_len * s.head_dim) as i64;
        let cs_b = (s.heads * max_len * s.head_dim) as i64;
        let mask_stride = s.total_len() as i64;
        let (past, new, heads, hd) = (
            s.past_len as i32,
            s.new_len as i32,
            s.heads as i32,
            s.head_dim as i32,
        );
        let q_stride = s.hidden() as i64;
        let out_stride = s.hidden() as i64;
        let scale = s.scale();
        let cfg = LaunchConfig {
            grid_dim: (
                s.new_len.div_ceil(PREFILL_BQ) as u32,
                s.heads as u32,
                s.batch as u32,
            ),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = self.kernels.get("attention_prefill_f16")?;
        // SAFETY: the argument list matches attention_prefill_f16's signature.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&op)
                .arg(&qp)
                .arg(&kp)
                .arg(&vp)
                .arg(&cs_b)
                .arg(&cs_h)
                .arg(&cs_s)
                .arg(&mp)
                .arg(&mask_stride)
                .arg(&past)
                .arg(&new)
                .arg(&heads)
                .arg(&hd)
                .arg(&q_stride)
                .arg(&out_stride)
                .arg(&scale)
                .launch(cfg)
        }
        .map_err(|e| drv(e, "attention_prefill_f16"))?;
        Ok(())
    }

    /// Row softmax of `logits / temperature` into f32 probabilities (for tests and for callers
    /// that want the distribution itself).
    pub fn softmax(&self, logits: &CudaTensor, temperature: f32) -> Result<CudaTensor> {
        let mut tmp = None;
        let x = self.as_f16(logits, &mut tmp)?;
        let (rows, cols) = Self::check_2d(x, "softmax")?;
        let mut out = self.alloc(DType::F32, &[rows, cols])?;
        let (op, xp) = (self.ptr_mut(&mut out), self.ptr(x));
        let (r, c) = (rows as i32, cols as i32);
        let f = self.kernels.get("softmax_f16_f32")?;
        // SAFETY: out is [rows, cols] f32, x [rows, cols] f16.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&op)
                .arg(&xp)
                .arg(&r)
                .arg(&c)
                .arg(&temperature)
                .launch(Self::rows_cfg(rows, 1024))
        }
        .map_err(|e| drv(e, "softmax_f16_f32"))?;
        Ok(out)
    }
}

impl Device for CudaDevice {
    type Tensor = CudaTensor;

    fn name(&self) -> String {
        self.label.clone()
    }
    fn act_dtype(&self) -> DType {
        DType::F16
    }
    fn kv_dtype(&self) -> DType {
        DType::F16
    }

    fn upload(&self, data: HostSlice<'_>, shape: &[usize]) -> Result<CudaTensor> {
        let n: usize = shape.iter().product();
        ensure!(
            n == data.len(),
            "upload: shape {shape:?} holds {n} values, got {}",
            data.len()
        );
        let mut t = self.alloc(data.dtype(), shape)?;
        let bytes = Self::host_bytes(&data);
        if !bytes.is_empty() {
            let mut dst = t.buf.slice_mut(0..bytes.len());
            self.stream
                .memcpy_htod(bytes, &mut dst)
                .map_err(|e| drv(e, "host-to-device copy"))?;
        }
        Ok(t)
    }

    fn write(&self, dst: &mut CudaTensor, offset: usize, data: HostSlice<'_>) -> Result<()> {
        ensure!(
            data.dtype() == dst.dtype,
            "write: {:?} data into a {:?} tensor",
            data.dtype(),
            dst.dtype
        );
        ensure!(
            offset + data.len() <= dst.numel(),
            "write: elements {offset}..{} out of a tensor of {}",
            offset + data.len(),
            dst.numel()
        );
        let bytes = Self::host_bytes(&data);
        let off = offset * dst.dtype.size();
        let mut view = dst.buf.slice_mut(off..off + bytes.len());
        self.stream
            .memcpy_htod(bytes, &mut view)
            .map_err(|e| drv(e, "host-to-device copy"))
    }

    fn alloc_host(&self, bytes: usize) -> Result<AlignedBuf> {
        memory::pinned_aligned(&self.ctx, bytes)
    }

    /// From pinned memory: on the upload stream, after the compute queued so far (the previous
    /// user of a pooled `dst`), with an event for the compute stream to wait on. From other
    /// memory: [`Device::write`] on the compute stream (ordered, nothing to wait for).
    fn upload_async(
        &self,
        dst: &mut CudaTensor,
        offset: usize,
        src: &AlignedBuf,
        src_offset: usize,
        n: usize,
    ) -> Result<Option<Fence>> {
        let size = dst.dtype.size();
        let bytes = n * size;
        ensure!(
            offset + n <= dst.numel() && src_offset + bytes <= src.len(),
            "upload_async: {n} values at {offset} of {} from byte {src_offset} of {}",
            dst.numel(),
            src.len()
        );
        if src.owner::<memory::PinnedBuffer>().is_none() {
            let data = match dst.dtype {
                DType::F16 => HostSlice::F16(src.f16s(src_offset, n)),
                DType::F32 => HostSlice::F32(src.f32s(src_offset, n)),
                DType::U32 => bail!("upload_async of a U32 tensor"),
            };
            self.write(dst, offset, data)?;
            return Ok(None);
        }
        let h2d = &self.copies.h2d;
        let free = self
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

    fn async_uploads(&self) -> bool {
        true
    }

    fn wait_fence(&self, fence: &Fence) -> Result<()> {
        match fence.downcast::<memory::CudaFence>() {
            Some(f) => self
                .stream
                .wait(&f.0)
                .map_err(|e| drv(e, "compute stream wait on an upload")),
            None => fence.wait_host(),
        }
    }

    fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
        let mut t = self.alloc(dtype, shape)?;
        self.stream
            .memset_zeros(&mut t.buf)
            .map_err(|e| drv(e, "memset"))?;
        Ok(t)
    }

    fn download_f32(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let n = t.numel();
        match t.dtype {
            DType::F32 => {
                let mut v = vec![0f32; n];
                // SAFETY: f32 has no invalid bit patterns; the byte view covers v exactly.
                let bytes =
                    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), n * 4) };
                self.dtoh_bytes(t, 0, bytes)?;
                Ok(v)
            }
            DType::F16 => {
                // Converted on the device (the same rounding-free widening as on the host).
                let mut wide = self.alloc(DType::F32, &t.shape)?;
                let (o, i, nn) = (self.ptr_mut(&mut wide), self.ptr(t), n as i64);
                let f = self.kernels.get("f16_to_f32")?;
                // SAFETY: wide holds n floats, t n halves.
                unsafe {
                    self.stream
                        .launch_builder(f)
                        .arg(&o)
                        .arg(&i)
                        .arg(&nn)
                        .launch(self.grid_stride(n))
                }
                .map_err(|e| drv(e, "f16_to_f32"))?;
                self.download_f32(&wide)
            }
            DType::U32 => Ok(self
                .download_u32(t)?
                .into_iter()
                .map(|x| x as f32)
                .collect()),
        }
    }

    fn download_u32(&self, t: &CudaTensor) -> Result<Vec<u32>> {
        ensure!(
            t.dtype == DType::U32,
            "download_u32 of a {:?} tensor",
            t.dtype
        );
        let n = t.numel();
        let mut v = vec![0u32; n];
        // SAFETY: u32 has no invalid bit patterns.
        let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), n * 4) };
        self.dtoh_bytes(t, 0, bytes)?;
        Ok(v)
    }

    fn download_f16(&self, t: &CudaTensor, offset: usize, out: &mut [f16]) -> Result<()> {
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
        self.dtoh_bytes(t, offset * 2, bytes)
    }

    fn synchronize(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(|e| drv(e, "synchronising the GPU"))
    }

    fn gather_rows(&self, table: &CudaTensor, ids: &CudaTensor) -> Result<CudaTensor> {
        let (rows, width) = Self::check_2d(table, "gather_rows table")?;
        ensure!(
            table.dtype == DType::F16 && ids.dtype == DType::U32,
            "gather_rows: F16 table and U32 ids expected"
        );
        let n = ids.numel();
        let mut out = self.alloc(DType::F16, &[n, width])?;
        let (o, t, i) = (self.ptr_mut(&mut out), self.ptr(table), self.ptr(ids));
        let (nn, w, r) = (n as i32, width as i32, rows as i32);
        let f = self.kernels.get("gather_rows_f16")?;
        // SAFETY: out is [n, width], table [rows, width], ids [n].
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&o)
                .arg(&t)
                .arg(&i)
                .arg(&nn)
                .arg(&w)
                .arg(&r)
                .launch(Self::rows_cfg(n, 256))
        }
        .map_err(|e| drv(e, "gather_rows_f16"))?;
        Ok(out)
    }

    fn add_gathered_rows(
        &self,
        x: &mut CudaTensor,
        table: &CudaTensor,
        ids: &CudaTensor,
    ) -> Result<()> {
        let (rows, width) = Self::check_2d(table, "add_gathered_rows table")?;
        let (n, xw) = Self::check_2d(x, "add_gathered_rows x")?;
        ensure!(
            xw == width && ids.numel() == n,
            "add_gathered_rows: x {:?}, table {:?}, {} ids",
            x.shape,
            table.shape,
            ids.numel()
        );
        ensure!(
            x.dtype == DType::F16 && ids.dtype == DType::U32,
            "add_gathered_rows: F16 x and U32 ids expected"
        );
        let (o, t, i) = (self.ptr_mut(x), self.ptr(table), self.ptr(ids));
        let (nn, w, r) = (n as i32, width as i32, rows as i32);
        let f = self.kernels.get("add_gathered_rows_f16")?;
        // SAFETY: as in gather_rows.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&o)
                .arg(&t)
                .arg(&i)
                .arg(&nn)
                .arg(&w)
                .arg(&r)
                .launch(Self::rows_cfg(n, 256))
        }
        .map_err(|e| drv(e, "add_gathered_rows_f16"))?;
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        let mut tmp = None;
        let x = self.as_f16(x, &mut tmp)?;
        let (rows, cols) = Self::check_2d(x, "layer_norm")?;
        ensure!(
            weight.numel() == cols && bias.numel() == cols,
            "layer_norm: weight/bias of {} / {} for width {cols}",
            weight.numel(),
            bias.numel()
        );
        let mut out = self.alloc(DType::F16, &[rows, cols])?;
        let (o, xp, wp, bp) = (
            self.ptr_mut(&mut out),
            self.ptr(x),
            self.ptr(weight),
            self.ptr(bias),
        );
        let (r, c) = (rows as i32, cols as i32);
        let threads = if cols >= 8192 {
            1024
        } else if cols >= 2048 {
            512
        } else {
            256
        };
        let f = self.kernels.get("layernorm_f16")?;
        // SAFETY: out and x are [rows, cols]; weight and bias [cols].
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&o)
                .arg(&xp)
                .arg(&wp)
                .arg(&bp)
                .arg(&r)
                .arg(&c)
                .arg(&eps)
                .launch(Self::rows_cfg(rows, threads))
        }
        .map_err(|e| drv(e, "layernorm_f16"))?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        act: Activation,
    ) -> Result<CudaTensor> {
        let mut tmp = None;
        let x = self.as_f16(x, &mut tmp)?;
        ensure!(
            w.dtype == DType::F16,
            "linear: weights must be F16, got {:?}",
            w.dtype
        );
        let (n, _) = Self::check_2d(x, "linear input")?;
        let (m, _) = Self::check_2d(w, "linear weight")?;
        let mut y = self.alloc(DType::F16, &[n, m])?;
        self.gemm_bias_act(x, w, bias, act, &mut y, true)?;
        Ok(y)
    }

    fn add_inplace(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        ensure!(
            x.shape == y.shape,
            "add_inplace: shapes {:?} and {:?}",
            x.shape,
            y.shape
        );
        ensure!(
            x.dtype == DType::F16,
            "add_inplace: x must be F16, got {:?}",
            x.dtype
        );
        let mut tmp = None;
        let y = self.as_f16(y, &mut tmp)?;
        let n = x.numel() as i64;
        let (o, yp) = (self.ptr_mut(x), self.ptr(y));
        let f = self.kernels.get("residual_add_f16")?;
        // SAFETY: out aliases x (the kernel reads each element before writing it); y has n halves.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&o)
                .arg(&o)
                .arg(&yp)
                .arg(&n)
                .launch(self.grid_stride(n as usize))
        }
        .map_err(|e| drv(e, "residual_add_f16"))?;
        Ok(())
    }

    fn alloc_kv(
        &self,
        batch: usize,
        heads: usize,
        max_len: usize,
        head_dim: usize,
    ) -> Result<CudaTensor> {
        self.zeros(DType::F16, &[batch, heads, max_len, head_dim])
    }

    fn append_kv(
        &self,
        k_cache: &mut CudaTensor,
        v_cache: &mut CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        s: AttnShape,
    ) -> Result<()> {
        let expect = [s.batch, s.heads];
        for (c, name) in [(&*k_cache, "k_cache"), (&*v_cache, "v_cache")] {
            ensure!(
                c.shape.len() == 4
                    && c.shape[..2] == expect
                    && c.shape[3] == s.head_dim
                    && c.dtype == DType::F16,
                "append_kv: {name} of shape {:?} ({:?}) for batch {}, heads {}, head_dim {}",
                c.shape,
                c.dtype,
                s.batch,
                s.heads,
                s.head_dim
            );
        }
        let max_len = k_cache.shape[2];
        ensure!(
            s.total_len() <= max_len,
            "append_kv: {} positions exceed the cache's {max_len}",
            s.total_len()
        );
        let (mut tk, mut tv) = (None, None);
        let k = self.as_f16(k, &mut tk)?;
        let v = self.as_f16(v, &mut tv)?;
        for t in [k, v] {
            ensure!(
                t.shape == [s.batch * s.new_len, s.hidden()],
                "append_kv: new keys/values of shape {:?}",
                t.shape
            );
        }
        let f = self.kernels.get("kv_append_f16")?;
        let (b, nl, h, hd, past, ml) = (
            s.batch as i32,
            s.new_len as i32,
            s.heads as i32,
            s.head_dim as i32,
            s.past_len as i32,
            max_len as i32,
        );
        for (cache, src) in [(k_cache, k), (v_cache, v)] {
            let (cp, sp) = (self.ptr_mut(cache), self.ptr(src));
            // SAFETY: shapes checked above.
            unsafe {
                self.stream
                    .launch_builder(f)
                    .arg(&cp)
                    .arg(&sp)
                    .arg(&b)
                    .arg(&nl)
                    .arg(&h)
                    .arg(&hd)
                    .arg(&past)
                    .arg(&ml)
                    .launch(Self::rows_cfg(s.batch * s.new_len, 256))
            }
            .map_err(|e| drv(e, "kv_append_f16"))?;
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k_cache: &CudaTensor,
        v_cache: &CudaTensor,
        mask: &CudaTensor,
        s: AttnShape,
    ) -> Result<CudaTensor> {
        Self::check_attn_shape(&s)?;
        let mut tq = None;
        let q = self.as_f16(q, &mut tq)?;
        ensure!(
            q.shape == [s.batch * s.new_len, s.hidden()],
            "attention: q of shape {:?} for {s:?}",
            q.shape
        );
        for c in [k_cache, v_cache] {
            ensure!(
                c.shape.len() == 4
                    && c.shape[0] == s.batch
                    && c.shape[1] == s.heads
                    && c.shape[3] == s.head_dim
                    && c.shape[2] >= s.total_len()
                    && c.dtype == DType::F16,
                "attention: cache of shape {:?} ({:?}) for {s:?}",
                c.shape,
                c.dtype
            );
        }
        ensure!(
            mask.dtype == DType::U32 && mask.numel() == s.batch * s.total_len(),
            "attention: mask must be U32 [batch, total_len] = [{}, {}], got {:?} {:?}",
            s.batch,
            s.total_len(),
            mask.dtype,
            mask.shape
        );
        let mut out = self.alloc(DType::F16, &[s.batch * s.new_len, s.hidden()])?;
        if s.new_len == 1 {
            self.attention_decode(q, k_cache, v_cache, mask, s, &mut out)?;
        } else {
            self.attention_prefill(q, k_cache, v_cache, mask, s, &mut out)?;
        }
        Ok(out)
    }

    fn last_rows(&self, x: &CudaTensor, batch: usize, seq: usize) -> Result<CudaTensor> {
        let mut tmp = None;
        let x = self.as_f16(x, &mut tmp)?;
        let (rows, width) = Self::check_2d(x, "last_rows")?;
        ensure!(
            rows == batch * seq && seq > 0,
            "last_rows: {rows} rows for batch {batch} x seq {seq}"
        );
        let mut out = self.alloc(DType::F16, &[batch, width])?;
        let (o, xp) = (self.ptr_mut(&mut out), self.ptr(x));
        let (b, sq, w) = (batch as i32, seq as i32, width as i32);
        let f = self.kernels.get("last_rows_f16")?;
        // SAFETY: out is [batch, width], x [batch * seq, width].
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&o)
                .arg(&xp)
                .arg(&b)
                .arg(&sq)
                .arg(&w)
                .launch(Self::rows_cfg(batch, 256))
        }
        .map_err(|e| drv(e, "last_rows_f16"))?;
        Ok(out)
    }

    fn sample(&self, logits: &CudaTensor, how: &Sampling<'_>) -> Result<Vec<u32>> {
        let mut tmp = None;
        let x = self.as_f16(logits, &mut tmp)?;
        let (rows, cols) = Self::check_2d(x, "sample")?;
        let mut ids = self.alloc(DType::U32, &[rows])?;
        let (ip, xp) = (self.ptr_mut(&mut ids), self.ptr(x));
        let (r, c) = (rows as i32, cols as i32);
        match how {
            Sampling::Greedy => {
                let f = self.kernels.get("argmax_f16")?;
                // SAFETY: ids holds rows u32, x is [rows, cols].
                unsafe {
                    self.stream
                        .launch_builder(f)
                        .arg(&ip)
                        .arg(&xp)
                        .arg(&r)
                        .arg(&c)
                        .launch(Self::rows_cfg(rows, 1024))
                }
                .map_err(|e| drv(e, "argmax_f16"))?;
            }
            Sampling::Temperature {
                temperature,
                uniforms,
            } => {
                ensure!(
                    uniforms.len() == rows,
                    "sample: {} uniforms for {rows} rows",
                    uniforms.len()
                );
                ensure!(
                    *temperature > 0.0 && temperature.is_finite(),
                    "sample: temperature must be > 0, got {temperature}"
                );
                let u = self.upload(HostSlice::F32(uniforms), &[rows])?;
                let up = self.ptr(&u);
                let f = self.kernels.get("sample_temperature_f16")?;
                // SAFETY: as above; u holds rows floats.
                unsafe {
                    self.stream
                        .launch_builder(f)
                        .arg(&ip)
                        .arg(&xp)
                        .arg(&up)
                        .arg(&r)
                        .arg(&c)
                        .arg(temperature)
                        .launch(Self::rows_cfg(rows, 1024))
                }
                .map_err(|e| drv(e, "sample_temperature_f16"))?;
            }
        }
        self.download_u32(&ids)
    }
}
