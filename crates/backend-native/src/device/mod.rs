//! The compute device: one trait, implemented by the CPU device ([`cpu`]) and the CUDA device.
//!
//! The trait works on device-resident tensors ([`Device::Tensor`]): weights are uploaded once
//! (or per layer by the offloader), activations and the KV cache never leave the device between
//! ops, and the only host round trip of a generation step is the sampled token ids
//! ([`Device::sample`]). The granularity is what an OPT layer needs and what a CUDA
//! implementation maps onto one kernel or one cuBLAS call each: gather rows, layer norm, linear
//! (+bias, +ReLU), residual add, KV-cache append, attention (causal + key padding, prefill and
//! decode in one entry point), take the last positions, sample.
//!
//! Conventions every implementation follows:
//! - Weights are stored in fp16 ([`DType::F16`]) or, with the policy's compress_weight, in
//!   FlexLLMGen's 4-bit form ([`DType::Q4`], grouped along dimension 0), which the ops that read
//!   them decode on the fly; every reduction accumulates in f32.
//! - Activations have the device's own dtype ([`Device::act_dtype`]): f32 on the CPU, typically
//!   f16 on CUDA. Callers never assume it; they download with [`Device::download_f32`].
//! - Matrices are row-major. A linear weight has shape `[out, in]` (HuggingFace's layout) and
//!   computes `y = x W^T + b`.
//! - Tensors of tokens are flattened to rows: `[batch * seq, width]`, row `b * seq + s`.
//! - The KV cache of one layer is two tensors of shape `[batch, heads, max_len, head_dim]` in
//!   [`Device::kv_dtype`] (or [`DType::Q4`] grouped along head_dim, made by [`Device::zeros`],
//!   with the policy's compress_cache); sequences are outermost so the offloader can split a cache by whole
//!   sequences and move one sequence's slab with a single copy.
//! - Ops may run asynchronously (CUDA streams); `download_*` and `sample` synchronize with the
//!   work that produced their input. [`Device::synchronize`] waits for everything (for timing).
//! - Errors, never panics, for shape mismatches and allocation failures; an allocation failure
//!   carries [`OutOfMemory`] in its error chain so the runner can exit with the OOM code.
//!
//! Changes to this trait are additive only, with default implementations where the CPU device
//! needs nothing new (the host-memory transfer methods: [`Device::alloc_host`],
//! [`Device::upload_async`], [`Device::async_uploads`], [`Device::wait_fence`]; and for
//! compression [`Device::upload_compressed`] and [`Device::attention_with_new`]).

pub mod alloc;
pub mod cpu;
pub mod cuda;

use std::fmt;

use anyhow::Result;
use half::f16;

pub use self::alloc::{is_out_of_memory, AlignedBuf, OutOfMemory};

/// Element type of a device tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    F32,
    U32,
    /// FlexLLMGen's 4-bit group-wise compressed form of fp16 values ([`crate::compress`]),
    /// grouped along `group_dim`. The tensor's shape is the logical one; its storage is the
    /// [`crate::compress::Q4Layout`]'s bytes, and offsets into it (writes, uploads) count bytes.
    Q4 {
        group_dim: usize,
    },
}

impl DType {
    /// Bytes per addressable unit: the element, or for [`DType::Q4`] the byte of its stored
    /// form.
    pub fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            DType::F32 | DType::U32 => 4,
            DType::Q4 { .. } => 1,
        }
    }
    /// Bytes a tensor of `shape` takes in this dtype.
    pub fn bytes(self, shape: &[usize]) -> usize {
        match self {
            DType::Q4 { group_dim } => crate::compress::Q4Layout::new(shape, group_dim).bytes(),
            d => shape.iter().product::<usize>() * d.size(),
        }
    }
    pub fn is_compressed(self) -> bool {
        matches!(self, DType::Q4 { .. })
    }
}

/// Host data handed to [`Device::upload`] / [`Device::write`].
#[derive(Debug, Clone, Copy)]
pub enum HostSlice<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
    U32(&'a [u32]),
    /// Stored bytes of a compressed tensor ([`DType::Q4`]).
    Bytes(&'a [u8]),
}

impl HostSlice<'_> {
    /// Units: values, or bytes of [`HostSlice::Bytes`].
    pub fn len(&self) -> usize {
        match self {
            HostSlice::F16(s) => s.len(),
            HostSlice::F32(s) => s.len(),
            HostSlice::U32(s) => s.len(),
            HostSlice::Bytes(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The dtype of a plain tensor made from this data; `None` for compressed bytes, whose dtype
    /// the data cannot tell ([`Device::upload_compressed`]).
    pub fn dtype(&self) -> Option<DType> {
        match self {
            HostSlice::F16(_) => Some(DType::F16),
            HostSlice::F32(_) => Some(DType::F32),
            HostSlice::U32(_) => Some(DType::U32),
            HostSlice::Bytes(_) => None,
        }
    }
    /// Whether this data can fill a tensor of `dtype`.
    pub fn fits(&self, dtype: DType) -> bool {
        match self {
            HostSlice::Bytes(_) => dtype.is_compressed(),
            d => d.dtype() == Some(dtype),
        }
    }
}

/// `n` units of `dtype` stored at byte `offset` of `buf`, as host data.
pub fn host_slice(
    buf: &AlignedBuf,
    dtype: DType,
    offset: usize,
    n: usize,
) -> Result<HostSlice<'_>> {
    let bytes = buf
        .bytes()
        .get(offset..offset + n * dtype.size())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{n} units of {dtype:?} at byte {offset} overflow a buffer of {}",
                buf.len()
            )
        })?;
    typed_slice(dtype, bytes)
}

/// Bytes holding values of `dtype` (aligned for it), as host data.
pub fn typed_slice(dtype: DType, bytes: &[u8]) -> Result<HostSlice<'_>> {
    let size = dtype.size();
    anyhow::ensure!(
        (bytes.as_ptr() as usize).is_multiple_of(size) && bytes.len().is_multiple_of(size),
        "{} bytes at {:p} do not hold whole aligned {dtype:?} values",
        bytes.len(),
        bytes.as_ptr()
    );
    let n = bytes.len() / size;
    // SAFETY: aligned and sized for the type (checked above); f16, f32 and u32 accept every bit
    // pattern, and the view borrows `bytes`.
    Ok(unsafe {
        match dtype {
            DType::F16 => HostSlice::F16(std::slice::from_raw_parts(bytes.as_ptr().cast(), n)),
            DType::F32 => HostSlice::F32(std::slice::from_raw_parts(bytes.as_ptr().cast(), n)),
            DType::U32 => HostSlice::U32(std::slice::from_raw_parts(bytes.as_ptr().cast(), n)),
            DType::Q4 { .. } => HostSlice::Bytes(bytes),
        }
    })
}

/// What a device tensor tells about itself.
pub trait DeviceTensor: Send + Sync {
    fn shape(&self) -> &[usize];
    fn dtype(&self) -> DType;
    fn numel(&self) -> usize {
        self.shape().iter().product()
    }
    fn size_bytes(&self) -> usize {
        self.dtype().bytes(self.shape())
    }
}

/// Activation applied after a linear's bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
}

/// Shape of one attention call.
///
/// Queries are the `new_len` newest positions of each sequence, at absolute positions
/// `past_len .. past_len + new_len` of the cache; their keys and values have already been
/// appended ([`Device::append_kv`]). Query `i` of sequence `b` attends to cache positions
/// `j <= past_len + i` whose `mask[b, j]` is 1 (causal + key padding). A query with no visible
/// key (a left-pad position during prefill) yields zeros: its output never reaches a real token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub past_len: usize,
    pub new_len: usize,
    /// Scale applied to q·k (OPT: head_dim^-0.5).
    pub scale_bits: u32,
    /// The policy's attn_sparsity `s` (f64 bits): below 1, a decode query keeps only its
    /// `ceil(s * n)` largest attention weights of its `n` visible keys, its own key always
    /// among them, unnormalised (FlexLLMGen's sparse attention; prefill stays dense, as there).
    pub sparsity_bits: u64,
}

impl AttnShape {
    pub fn new(
        batch: usize,
        heads: usize,
        head_dim: usize,
        past_len: usize,
        new_len: usize,
    ) -> AttnShape {
        AttnShape {
            batch,
            heads,
            head_dim,
            past_len,
            new_len,
            scale_bits: (head_dim as f32).powf(-0.5).to_bits(),
            sparsity_bits: 1f64.to_bits(),
        }
    }
    /// This shape with the policy's attention sparsity.
    pub fn with_sparsity(self, s: f64) -> AttnShape {
        AttnShape {
            sparsity_bits: s.to_bits(),
            ..self
        }
    }
    pub fn sparsity(&self) -> f64 {
        f64::from_bits(self.sparsity_bits)
    }
    /// Keys a decode query keeps of its `visible` ones: all of them without sparsity (and in
    /// prefill), else `ceil(s * visible)`, at least one (its own). The product is rounded to
    /// 1e-9 first, so that 0.3 x 10 keeps 3 keys and not the 4 of its floating-point ceiling
    /// (the CUDA kernels compute the same in double).
    pub fn kept_keys(&self, visible: usize) -> usize {
        let s = self.sparsity();
        if s >= 1.0 || self.new_len != 1 || visible == 0 {
            return visible;
        }
        ((s * visible as f64 - 1e-9).ceil() as usize).clamp(1, visible)
    }
    pub fn scale(&self) -> f32 {
        f32::from_bits(self.scale_bits)
    }
    pub fn total_len(&self) -> usize {
        self.past_len + self.new_len
    }
    pub fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// How [`Device::sample`] picks the next token of each sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling<'a> {
    /// The arg max; ties go to the lowest index (as `torch.argmax`).
    Greedy,
    /// Softmax of `logits / temperature`, sampled by inverse CDF with one host-drawn uniform
    /// in [0, 1) per sequence, so every device draws the same token from the same logits.
    Temperature {
        temperature: f32,
        uniforms: &'a [f32],
    },
}

/// Copy work a device queued to overlap with compute (a host-to-device copy on a CUDA copy
/// stream): compute waits for it through [`Device::wait_fence`] before using the data, and the
/// host through [`Fence::wait_host`] before it overwrites the copy's source.
#[derive(Clone)]
pub struct Fence(std::sync::Arc<dyn FenceImpl>);

/// A device's fence.
pub trait FenceImpl: Send + Sync + 'static {
    /// Blocks the calling thread until the copy is done.
    fn wait_host(&self) -> Result<()>;
    fn as_any(&self) -> &dyn std::any::Any;
}

impl Fence {
    pub fn new(f: impl FenceImpl) -> Fence {
        Fence(std::sync::Arc::new(f))
    }
    pub fn wait_host(&self) -> Result<()> {
        self.0.wait_host()
    }
    /// The device's own fence type, for its [`Device::wait_fence`].
    pub fn downcast<T: 'static>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref::<T>()
    }
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fence")
    }
}

/// A compute device. See the module docs for the conventions.
pub trait Device: Send + Sync {
    type Tensor: DeviceTensor;

    /// Human-readable name, e.g. `cpu (2 threads, avx512f)`.
    fn name(&self) -> String;
    /// Dtype of activations (hidden states, q/k/v, logits) on this device.
    fn act_dtype(&self) -> DType;
    /// Dtype of the KV cache on this device.
    fn kv_dtype(&self) -> DType;

    // ---- memory ----
    /// Copies host data to a new device tensor of `shape` in the data's dtype.
    fn upload(&self, data: HostSlice<'_>, shape: &[usize]) -> Result<Self::Tensor>;
    /// A compressed tensor ([`DType::Q4`] grouped along `group_dim`) of logical `shape` from its
    /// stored bytes ([`crate::compress::Q4Layout`]). Default: refused, for a device without
    /// compressed tensors.
    fn upload_compressed(
        &self,
        bytes: &[u8],
        shape: &[usize],
        group_dim: usize,
    ) -> Result<Self::Tensor> {
        let _ = (bytes, shape, group_dim);
        anyhow::bail!("{} has no compressed tensors", self.name())
    }
    /// Overwrites `dst[offset .. offset + data.len()]` (elements, row-major) with host data of
    /// `dst`'s dtype. The offloader uses it to refill preallocated weight and cache buffers.
    fn write(&self, dst: &mut Self::Tensor, offset: usize, data: HostSlice<'_>) -> Result<()>;
    /// A zero-filled tensor.
    fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<Self::Tensor>;
    /// All elements converted to f32 (synchronizes).
    fn download_f32(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// All elements of a U32 tensor (synchronizes).
    fn download_u32(&self, t: &Self::Tensor) -> Result<Vec<u32>>;
    /// Elements `offset .. offset + out.len()` of an F16 tensor, copied raw (synchronizes); the
    /// offloader uses it to move KV-cache slabs down a tier.
    fn download_f16(&self, t: &Self::Tensor, offset: usize, out: &mut [f16]) -> Result<()>;
    /// Waits until all queued work is done.
    fn synchronize(&self) -> Result<()>;

    // ---- host memory for transfers (additive; the defaults suit a device whose compute memory
    // is host RAM) ----
    /// Page-aligned, zeroed host memory of at least `bytes` for data this device will copy in:
    /// the offloader's host tier and its disk staging buffers. CUDA gives pinned memory, from
    /// which [`Device::upload_async`] copies at the link's full rate without blocking anyone.
    /// Default: ordinary aligned heap memory.
    fn alloc_host(&self, bytes: usize) -> Result<AlignedBuf> {
        AlignedBuf::new(bytes)
    }
    /// Starts copying `n` values of `dst`'s dtype, stored at byte `src_offset` of `src`, into
    /// `dst[offset ..]`, overlapped with compute where the device can (CUDA: from pinned memory,
    /// on its upload stream, after the compute already queued). Returns the fence that compute
    /// must pass through ([`Device::wait_fence`]) before it reads `dst`, and the host before it
    /// overwrites `src`; `None` when the copy is already complete.
    /// Default: a plain [`Device::write`].
    fn upload_async(
        &self,
        dst: &mut Self::Tensor,
        offset: usize,
        src: &AlignedBuf,
        src_offset: usize,
        n: usize,
    ) -> Result<Option<Fence>> {
        let data = host_slice(src, dst.dtype(), src_offset, n)?;
        self.write(dst, offset, data)?;
        Ok(None)
    }
    /// Whether [`Device::upload_async`] out of [`Device::alloc_host`] memory overlaps compute
    /// (CUDA: pinned memory, copy stream), so staging host data through such memory pays off.
    /// Default: false (a staging copy would only be one more memory copy).
    fn async_uploads(&self) -> bool {
        false
    }
    /// Orders the compute queued after this call behind `fence`'s copy (on CUDA: the compute
    /// stream waits for the copy's event; the host does not block). Default: the host waits.
    fn wait_fence(&self, fence: &Fence) -> Result<()> {
        fence.wait_host()
    }

    // ---- ops ----
    /// Rows of `table` (`[rows, width]`, F16) picked by `ids` (U32, any shape with n elements):
    /// `[n, width]` in the activation dtype. Token embeddings.
    fn gather_rows(&self, table: &Self::Tensor, ids: &Self::Tensor) -> Result<Self::Tensor>;
    /// `x[i] += table[ids[i]]` for every row i of `x` (`[n, width]`). Learned positions.
    fn add_gathered_rows(
        &self,
        x: &mut Self::Tensor,
        table: &Self::Tensor,
        ids: &Self::Tensor,
    ) -> Result<()>;
    /// Layer norm over the last dimension with f16 `weight` and `bias` of that width.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// `act(x W^T + b)`: `x` is `[n, in]`, `w` is `[out, in]` F16, `bias` `[out]` F16.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor>;
    /// [`Device::linear`] of one `x` by several weights without activation (attention's q, k
    /// and v): one call, so that a device may run the products as one pass.
    fn linear_shared_input(
        &self,
        x: &Self::Tensor,
        weights: &[(&Self::Tensor, Option<&Self::Tensor>)],
    ) -> Result<Vec<Self::Tensor>> {
        weights
            .iter()
            .map(|&(w, b)| self.linear(x, w, b, Activation::None))
            .collect()
    }
    /// `x += y` (same shape). Residual connections.
    fn add_inplace(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// Allocates one layer's K or V cache: zeros of `[batch, heads, max_len, head_dim]`.
    fn alloc_kv(
        &self,
        batch: usize,
        heads: usize,
        max_len: usize,
        head_dim: usize,
    ) -> Result<Self::Tensor>;
    /// Writes the new keys and values (`k`, `v`: `[batch * new_len, heads * head_dim]`) into the
    /// caches at positions `past_len .. past_len + new_len`.
    fn append_kv(
        &self,
        k_cache: &mut Self::Tensor,
        v_cache: &mut Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        shape: AttnShape,
    ) -> Result<()>;
    /// Multi-head attention of `q` (`[batch * new_len, heads * head_dim]`) over the caches, with
    /// `mask` (U32 `[batch, total_len]`, 1 = real token, 0 = pad) as described at [`AttnShape`].
    /// Returns `[batch * new_len, heads * head_dim]`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k_cache: &Self::Tensor,
        v_cache: &Self::Tensor,
        mask: &Self::Tensor,
        shape: AttnShape,
    ) -> Result<Self::Tensor>;
    /// [`Device::attention`] given also this step's keys and values (`k`, `v`, the rows just
    /// appended, `[batch * new_len, heads * head_dim]`). A cache that stores them lossily (4-bit
    /// [`DType::Q4`]) attends to these new positions exact and to the older ones as stored, as
    /// FlexLLMGen does (it compresses a step's keys and values after its attention). Default:
    /// attention over the cache alone, which holds them as exactly as the cache's dtype can.
    #[allow(clippy::too_many_arguments)]
    fn attention_with_new(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        k_cache: &Self::Tensor,
        v_cache: &Self::Tensor,
        mask: &Self::Tensor,
        shape: AttnShape,
    ) -> Result<Self::Tensor> {
        let _ = (k, v);
        self.attention(q, k_cache, v_cache, mask, shape)
    }
    /// Row `s - 1` of each of the `batch` groups of `seq` rows of `x` (`[batch * seq, w]`):
    /// `[batch, w]`. Left padding puts every sequence's last token there.
    fn last_rows(&self, x: &Self::Tensor, batch: usize, seq: usize) -> Result<Self::Tensor>;
    /// The next token of each row of `logits` (`[batch, vocab]`), on the host.
    fn sample(&self, logits: &Self::Tensor, how: &Sampling<'_>) -> Result<Vec<u32>>;
}
