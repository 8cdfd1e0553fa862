//! The [`Device`] trait on [`CudaDevice`]: each method hands over to the module of its concern
//! ([`super::transfer`], [`super::ops`], [`super::gemm`], [`super::attention`],
//! [`super::sampling`]), so that this impl is the one place that sees them all.

use anyhow::Result;
use half::f16;

use super::device::CudaDevice;
use super::tensor::CudaTensor;
use super::{attention, gemm, ops, sampling, transfer};
use crate::device::{Activation, AlignedBuf, AttnShape, DType, Device, Fence, HostSlice, Sampling};

/// Trait methods that call the function of the same name in `$module` with the device first and
/// the method's arguments after it. A table rather than a forwarding body per method: the
/// modules' functions already spell out each signature in full.
macro_rules! hand_over {
    ($($module:ident::$name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)+) => {
        $(
            fn $name(&self, $($arg: $ty),*) -> $ret {
                $module::$name(self, $($arg),*)
            }
        )+
    };
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
    fn async_uploads(&self) -> bool {
        true
    }

    hand_over! {
        transfer::upload(data: HostSlice<'_>, shape: &[usize]) -> Result<CudaTensor>;
        transfer::upload_compressed(bytes: &[u8], shape: &[usize], group_dim: usize)
            -> Result<CudaTensor>;
        transfer::write(dst: &mut CudaTensor, offset: usize, data: HostSlice<'_>) -> Result<()>;
        transfer::alloc_host(bytes: usize) -> Result<AlignedBuf>;
        transfer::upload_async(
            dst: &mut CudaTensor, offset: usize, src: &AlignedBuf, src_offset: usize, n: usize
        ) -> Result<Option<Fence>>;
        transfer::wait_fence(fence: &Fence) -> Result<()>;
        transfer::zeros(dtype: DType, shape: &[usize]) -> Result<CudaTensor>;
        transfer::download_f32(t: &CudaTensor) -> Result<Vec<f32>>;
        transfer::download_u32(t: &CudaTensor) -> Result<Vec<u32>>;
        transfer::download_f16(t: &CudaTensor, offset: usize, out: &mut [f16]) -> Result<()>;
        transfer::synchronize() -> Result<()>;

        ops::gather_rows(table: &CudaTensor, ids: &CudaTensor) -> Result<CudaTensor>;
        ops::add_gathered_rows(x: &mut CudaTensor, table: &CudaTensor, ids: &CudaTensor)
            -> Result<()>;
        ops::layer_norm(x: &CudaTensor, weight: &CudaTensor, bias: &CudaTensor, eps: f32)
            -> Result<CudaTensor>;
        ops::add_inplace(x: &mut CudaTensor, y: &CudaTensor) -> Result<()>;
        ops::last_rows(x: &CudaTensor, batch: usize, seq: usize) -> Result<CudaTensor>;

        gemm::linear(x: &CudaTensor, w: &CudaTensor, bias: Option<&CudaTensor>, act: Activation)
            -> Result<CudaTensor>;

        attention::alloc_kv(batch: usize, heads: usize, max_len: usize, head_dim: usize)
            -> Result<CudaTensor>;
        attention::append_kv(
            k_cache: &mut CudaTensor, v_cache: &mut CudaTensor, k: &CudaTensor, v: &CudaTensor,
            s: AttnShape
        ) -> Result<()>;
        attention::attention(
            q: &CudaTensor, k_cache: &CudaTensor, v_cache: &CudaTensor, mask: &CudaTensor,
            s: AttnShape
        ) -> Result<CudaTensor>;
        attention::attention_with_new(
            q: &CudaTensor, k: &CudaTensor, v: &CudaTensor, k_cache: &CudaTensor,
            v_cache: &CudaTensor, mask: &CudaTensor, s: AttnShape
        ) -> Result<CudaTensor>;

        sampling::sample(logits: &CudaTensor, how: &Sampling<'_>) -> Result<Vec<u32>>;
    }
}
