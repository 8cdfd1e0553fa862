//! Matrix products on the CUDA device: [`crate::device::Device::linear`] through cuBLASLt with
//! bias and ReLU fused into its epilogue, falling back to cuBLAS and the bias kernel where
//! cuBLASLt has no algorithm for a shape.

use anyhow::{anyhow, ensure, Result};
use cudarc::cublas::{sys as cublas_sys, Gemm, GemmConfig};
use half::f16;

use super::device::CudaDevice;
use super::launch::launch;
use super::tensor::{check_2d, CudaTensor};
use crate::device::{Activation, DType, DeviceTensor};

impl CudaDevice {
    /// `y[n, out] = x[n, in] W[out, in]^T` with cuBLAS (f16 in/out, f32 accumulation, tensor
    /// cores), then bias and activation: fused in cuBLASLt's epilogue (cached plan per shape),
    /// or, where cuBLASLt has no algorithm or `allow_lt` is false, cublasGemmEx and the bias
    /// kernel.
    pub(super) fn gemm_bias_act(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        act: Activation,
        y: &mut CudaTensor,
        allow_lt: bool,
    ) -> Result<()> {
        let (n, k) = check_2d(x, "linear input")?;
        let (m, k2) = check_2d(w, "linear weight")?;
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
            // SAFETY: y is [n, m] F16, bias [m] F16.
            unsafe {
                launch!(
                    self,
                    "bias_act_f16",
                    self.grid_stride(n * m),
                    &yp,
                    &bp,
                    &rows,
                    &cols,
                    &relu
                )
            }?;
        }
        Ok(())
    }

    /// `y[n, m] = x[n, k] w[m, k]^T (+ bias, act)` into an existing tensor, through the same path
    /// as [`crate::device::Device::linear`] (`lt = true`) or through plain cuBLAS `cublasGemmEx` only
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
        let (n, m) = check_2d(y, "gemm_into output")?;
        ensure!(
            x.shape[0] == n && w.shape[0] == m,
            "gemm_into: output {:?} for x {:?} and w {:?}",
            y.shape,
            x.shape,
            w.shape
        );
        self.gemm_bias_act(x, w, bias, act, y, lt)
    }
}

pub(super) fn linear(
    dev: &CudaDevice,
    x: &CudaTensor,
    w: &CudaTensor,
    bias: Option<&CudaTensor>,
    act: Activation,
) -> Result<CudaTensor> {
    let mut tmp = None;
    let x = dev.as_f16(x, &mut tmp)?;
    if w.dtype.is_compressed() {
        return super::q4::linear(dev, x, w, bias, act);
    }
    ensure!(
        w.dtype == DType::F16,
        "linear: weights must be F16 or compressed, got {:?}",
        w.dtype
    );
    let (n, _) = check_2d(x, "linear input")?;
    let (m, _) = check_2d(w, "linear weight")?;
    let mut y = dev.alloc(DType::F16, &[n, m])?;
    dev.gemm_bias_act(x, w, bias, act, &mut y, true)?;
    Ok(y)
}
