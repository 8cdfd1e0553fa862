//! cuBLASLt GEMMs with bias (+ ReLU) fused into the epilogue, with one cached plan per shape.
//!
//! cudarc's safe `Matmul` builds descriptors and asks cuBLASLt's heuristic for an algorithm on
//! every call, which costs tens of microseconds of host time: more than a whole decode-step GEMM
//! of a small model. A model calls the same few shapes over and over, so the descriptors, layouts
//! and chosen algorithm are made once per (m, n, k, epilogue) and reused; only the bias pointer
//! is set per call.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream};

use super::memory::{dptr, dptr_mut};

/// What follows the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epilogue {
    None,
    Bias,
    BiasRelu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: u64,
    n: u64,
    k: u64,
    epi: Epilogue,
}

/// Descriptors and algorithm for one shape; destroyed with it.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created once by Plan::new and is destroyed once here.
        unsafe {
            let _ = result::destroy_matrix_layout(self.a);
            let _ = result::destroy_matrix_layout(self.b);
            let _ = result::destroy_matrix_layout(self.c);
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt handle bound to one stream, its workspace, and the plan cache.
pub struct LtGemm {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    /// None: cuBLASLt has no algorithm for this shape (the caller falls back to cuBLAS).
    plans: Mutex<HashMap<Key, Option<Plan>>>,
}

// SAFETY: the handle and plans are only used under the `plans` mutex or read-only, and cuBLASLt
// handles may be used from any thread.
unsafe impl Send for LtGemm {}
unsafe impl Sync for LtGemm {}

/// NVIDIA's recommendation: 32 MiB of workspace on Hopper, 4 MiB before.
fn workspace_bytes(cc_major: i32) -> usize {
    if cc_major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

fn lt_err(what: &str) -> impl Fn(result::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what}: {e:?}")
}

impl LtGemm {
    pub fn new(stream: Arc<CudaStream>, cc_major: i32) -> Result<LtGemm> {
        let handle = result::create_handle().map_err(lt_err("handle"))?;
        // SAFETY: uninitialised scratch memory for cuBLASLt.
        let workspace = unsafe { stream.alloc::<u8>(workspace_bytes(cc_major)) }
            .map_err(|e| anyhow!("allocating the cuBLASLt workspace: {e:?}"))?;
        Ok(LtGemm {
            handle,
            stream,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    fn plan(&self, key: Key) -> Result<Option<Plan>> {
        use sys::cublasLtMatmulDescAttributes_t as D;
        let f16 = sys::cudaDataType_t::CUDA_R_16F;
        // Row-major y[n, m] = x[n, k] W[m, k]^T is column-major y^T[m, n] = W[k, m]^T x^T[k, n]:
        // A = W (k x m, transposed), B = x (k x n), C = y (m x n); the bias runs along m.
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(lt_err("matmul descriptor"))?;
        let a = result::create_matrix_layout(f16, key.k, key.m, key.k as i64)
            .map_err(lt_err("layout"))?;
        let b = result::create_matrix_layout(f16, key.k, key.n, key.k as i64)
            .map_err(lt_err("layout"))?;
        let c = result::create_matrix_layout(f16, key.m, key.n, key.m as i64)
            .map_err(lt_err("layout"))?;
        let mut plan = Plan {
            desc,
            a,
            b,
            c,
            algo: unsafe { std::mem::zeroed() },
        };
        let trans: i32 = 1;
        let epi = match key.epi {
            Epilogue::None => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::BiasRelu => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
        };
        // SAFETY: the attribute buffers have the types cuBLASLt documents for them.
        unsafe {
            result::set_matmul_desc_attribute(
                desc,
                D::CUBLASLT_MATMUL_DESC_TRANSA,
                (&trans as *const i32).cast(),
                4,
            )
            .map_err(lt_err("transa"))?;
            result::set_matmul_desc_attribute(
                desc,
                D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                (&epi as *const sys::cublasLtEpilogue_t).cast(),
                std::mem::size_of_val(&epi),
            )
            .map_err(lt_err("epilogue"))?;
            if key.epi != Epilogue::None {
                // The heuristic needs a bias pointer of the right alignment; the real one is set
                // per call. The workspace start is 256-byte aligned like any bias tensor.
                let p: u64 = dptr(&self.workspace, &self.stream);
                result::set_matmul_desc_attribute(
                    desc,
                    D::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&p as *const u64).cast(),
                    8,
                )
                .map_err(lt_err("bias pointer"))?;
            }
            let pref = result::create_matmul_pref().map_err(lt_err("preference"))?;
            let ws = self.workspace.len();
            let r = result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws as *const usize).cast(),
                std::mem::size_of::<usize>(),
            )
            .and_then(|_| result::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref));
            let _ = result::destroy_matmul_pref(pref);
            match r {
                Ok(h) => plan.algo = h.algo,
                // No algorithm for this shape (alignment, odd sizes): a normal outcome.
                Err(_) => return Ok(None),
            }
        }
        Ok(Some(plan))
    }

    /// `y[n, m] = act(x[n, k] w[m, k]^T + bias)` on the handle's stream. Returns false when
    /// cuBLASLt has no algorithm for the shape (nothing was launched).
    ///
    /// # Safety
    /// The buffers must hold the stated shapes in f16 (bias: m values) and stay alive until the
    /// stream has run the product.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        &self,
        x: &CudaSlice<u8>,
        w: &CudaSlice<u8>,
        bias: Option<&CudaSlice<u8>>,
        y: &mut CudaSlice<u8>,
        n: usize,
        k: usize,
        m: usize,
        relu: bool,
    ) -> Result<bool> {
        let epi = match (bias.is_some(), relu) {
            (false, false) => Epilogue::None,
            (true, false) => Epilogue::Bias,
            (true, true) => Epilogue::BiasRelu,
            (false, true) => return Ok(false),
        };
        let key = Key {
            m: m as u64,
            n: n as u64,
            k: k as u64,
            epi,
        };
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| anyhow!("cuBLASLt plan cache poisoned"))?;
        if let std::collections::hash_map::Entry::Vacant(e) = plans.entry(key) {
            e.insert(self.plan(key)?);
        }
        let Some(plan) = plans.get(&key).and_then(|p| p.as_ref()) else {
            return Ok(false);
        };
        if let Some(b) = bias {
            let p: u64 = dptr(b, &self.stream);
            result::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&p as *const u64).cast(),
                8,
            )
            .map_err(lt_err("bias pointer"))?;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (xp, wp) = (dptr(x, &self.stream), dptr(w, &self.stream));
        let yp = dptr_mut(y, &self.stream);
        let ws = dptr(&self.workspace, &self.stream);
        result::matmul(
            self.handle,
            plan.desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            wp as *const c_void,
            plan.a,
            xp as *const c_void,
            plan.b,
            yp as *const c_void,
            plan.c,
            yp as *mut c_void,
            plan.c,
            &plan.algo,
            ws as *mut c_void,
            self.workspace.len(),
            self.stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(lt_err(&format!("matmul {n}x{k} * {k}x{m}")))?;
        Ok(true)
    }
}

impl Drop for LtGemm {
    fn drop(&mut self) {
        if let Ok(mut p) = self.plans.lock() {
            p.clear();
        }
        // SAFETY: created in new, destroyed once.
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}
