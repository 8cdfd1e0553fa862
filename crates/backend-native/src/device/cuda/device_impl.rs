//! The [`Device`] trait on [`CudaDevice`]: each method hands over to the module of its concern
//! ([`super::transfer`], [`super::ops`], [`super::gemm`], [`super::attention`],
//! [`super::sampling`]), so that this impl is the one place that sees them all.

use anyhow::Result;
use half::f16;

use super::device::CudaDevice;
use super::tensor::CudaTensor;
use super::{attention, gemm, ops, sampling, transfer};
use crate::device::{Activation, AlignedBuf, AttnShape, DType, Device, Fence, HostSlice, Sampling};

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
        transfer::upload(self, data, shape)
    }
    fn write(&self, dst: &mut CudaTensor, offset: usize, data: HostSlice<'_>) -> Result<()> {
        transfer::write(self, dst, offset, data)
    }
    fn alloc_host(&self, bytes: usize) -> Result<AlignedBuf> {
        transfer::alloc_host(self, bytes)
    }
    fn upload_async(
        &self,
        dst: &mut CudaTensor,
        offset: usize,
        src: &AlignedBuf,
        src_offset: usize,
        n: usize,
    ) -> Result<Option<Fence>> {
        transfer::upload_async(self, dst, offset, src, src_offset, n)
    }
    fn async_uploads(&self) -> bool {
        true
    }
    fn wait_fence(&self, fence: &Fence) -> Result<()> {
        transfer::wait_fence(self, fence)
    }
    fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<CudaTensor> {
        transfer::zeros(self, dtype, shape)
    }
    fn download_f32(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        transfer::download_f32(self, t)
    }
    fn download_u32(&self, t: &CudaTensor) -> Result<Vec<u32>> {
        transfer::download_u32(self, t)
    }
    fn download_f16(&self, t: &CudaTensor, offset: usize, out: &mut [f16]) -> Result<()> {
        transfer::download_f16(self, t, offset, out)
    }
    fn synchronize(&self) -> Result<()> {
        transfer::synchronize(self)
    }

    fn gather_rows(&self, table: &CudaTensor, ids: &CudaTensor) -> Result<CudaTensor> {
        ops::gather_rows(self, table, ids)
    }
    fn add_gathered_rows(
        &self,
        x: &mut CudaTensor,
        table: &CudaTensor,
        ids: &CudaTensor,
    ) -> Result<()> {
        ops::add_gathered_rows(self, x, table, ids)
    }
    fn layer_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        ops::layer_norm(self, x, weight, bias, eps)
    }
    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        act: Activation,
    ) -> Result<CudaTensor> {
        gemm::linear(self, x, w, bias, act)
    }
    fn add_inplace(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        ops::add_inplace(self, x, y)
    }
    fn alloc_kv(
        &self,
        batch: usize,
        heads: usize,
        max_len: usize,
        head_dim: usize,
    ) -> Result<CudaTensor> {
        attention::alloc_kv(self, batch, heads, max_len, head_dim)
    }
    fn append_kv(
        &self,
        k_cache: &mut CudaTensor,
        v_cache: &mut CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        s: AttnShape,
    ) -> Result<()> {
        attention::append_kv(self, k_cache, v_cache, k, v, s)
    }
    fn attention(
        &self,
        q: &CudaTensor,
        k_cache: &CudaTensor,
        v_cache: &CudaTensor,
        mask: &CudaTensor,
        s: AttnShape,
    ) -> Result<CudaTensor> {
        attention::attention(self, q, k_cache, v_cache, mask, s)
    }
    fn last_rows(&self, x: &CudaTensor, batch: usize, seq: usize) -> Result<CudaTensor> {
        ops::last_rows(self, x, batch, seq)
    }
    fn sample(&self, logits: &CudaTensor, how: &Sampling<'_>) -> Result<Vec<u32>> {
        sampling::sample(self, logits, how)
    }
}
