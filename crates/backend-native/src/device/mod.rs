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
//! - Weights are stored in fp16 ([`DType::F16`]); every reduction accumulates in f32.
//! - Activations have the device's own dtype ([`Device::act_dtype`]): f32 on the CPU, typically
//!   f16 on CUDA. Callers never assume it; they download with [`Device::download_f32`].
//! - Matrices are row-major. A linear weight has shape `[out, in]` (HuggingFace's layout) and
//!   computes `y = x W^T + b`.
//! - Tensors of tokens are flattened to rows: `[batch * seq, width]`, row `b * seq + s`.
//! - The KV cache of one layer is two tensors of shape `[batch, heads, max_len, head_dim]` in
//!   [`Device::kv_dtype`]; sequences are outermost so the offloader can split a cache by whole
//!   sequences and move one sequence's slab with a single copy.
//! - Ops may run asynchronously (CUDA streams); `download_*` and `sample` synchronize with the
//!   work that produced their input. [`Device::synchronize`] waits for everything (for timing).
//! - Errors, never panics, for shape mismatches and allocation failures; an allocation failure
//!   carries [`OutOfMemory`] in its error chain so the runner can exit with the OOM code.
//!
//! Changes to this trait are additive only, with default implementations where the CPU device
//! needs nothing new (the host-memory transfer methods: [`Device::alloc_host`],
//! [`Device::upload_async`], [`Device::async_uploads`], [`Device::wait_fence`]).

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
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            DType::F32 | DType::U32 => 4,
        }
    }
}

/// Host data handed to [`Device::upload`] / [`Device::write`].
#[derive(Debug, Clone, Copy)]
pub enum HostSlice<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
    U32(&'a [u32]),
}

impl HostSlice<'_> {
    pub fn len(&self) -> usize {
        match self {
            HostSlice::F16(s) => s.len(),
            HostSlice::F32(s) => s.len(),
            HostSlice::U32(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            HostSlice::F16(_) => DType::F16,
            HostSlice::F32(_) => DType::F32,
            HostSlice::U32(_) => DType::U32,
        }
    }
}

/// What a device tensor tells about itself.
pub trait DeviceTensor: Send + Sync {
    fn shape(&self) -> &[usize];
    fn dtype(&self) -> DType;
    fn numel(&self) -> usize {
        self.shape().iter().product()
    }
    fn size_bytes(&self) -> usize {
        self.numel() * self.dtype().size()
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
        }
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
        let data = match dst.dtype() {
            DType::F16 => HostSlice::F16(src.f16s(src_offset, n)),
            DType::F32 => HostSlice::F32(src.f32s(src_offset, n)),
            DType::U32 => anyhow::bail!("upload_async of a U32 tensor"),
        };
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
    /// Row `s - 1` of each of the `batch` groups of `seq` rows of `x` (`[batch * seq, w]`):
    /// `[batch, w]`. Left padding puts every sequence's last token there.
    fn last_rows(&self, x: &Self::Tensor, batch: usize, seq: usize) -> Result<Self::Tensor>;
    /// The next token of each row of `logits` (`[batch, vocab]`), on the host.
    fn sample(&self, logits: &Self::Tensor, how: &Sampling<'_>) -> Result<Vec<u32>>;
}
