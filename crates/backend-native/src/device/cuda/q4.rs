//! The CUDA device's 4-bit compressed tensors (kernels/compress.cu, kernels/attention_q4.cu):
//! products with compressed weights, gathers from compressed tables, the compressed KV cache's
//! append and attention, and sparse attention over any cache.
//!
//! - Few rows (decode, up to [`MATVEC_MAX_ROWS`]): the fused decode + matrix-vector kernel reads
//!   the packed bytes once, 4 rows of x per launch, columns split so that every SM has blocks;
//!   more rows decode the weight into an fp16 workspace (one tensor, freed after its product, as
//!   FlexLLMGen decompresses into a workspace) for cuBLAS.
//! - Decode attention reads the compressed rows in place, the step's own key and value from the
//!   projection outputs; prefill over a compressed cache decodes it into an fp16 copy first.

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

use super::attention::{check_attn_shape, decode_splits, pairs_cfg};
use super::device::CudaDevice;
use super::launch::{launch, rows_cfg};
use super::tensor::{check_2d, CudaTensor};
use crate::compress::{Q4Layout, GROUP};
use crate::device::{Activation, AttnShape, DType, DeviceTensor};

/// Rows of x up to which the fused kernel runs (two launches of 4); more take cuBLAS on a
/// decoded copy.
pub const MATVEC_MAX_ROWS: usize = 8;
/// Rows of x per launch of the fused kernel (MV_MAX_N in kernels/compress.cu).
const MATVEC_ROWS_PER_LAUNCH: usize = 4;
/// Columns per lane step of the fused kernel times its 32 lanes: chunks are multiples of it.
const MATVEC_COLUMN_STEP: usize = 128;
/// Keys the sparse kernel holds in shared memory (AQ_MAX_LEN).
const SPARSE_MAX_LEN: usize = 2048;

fn ptr_or_null(dev: &CudaDevice, t: Option<&CudaTensor>) -> u64 {
    t.map_or(0, |t| dev.ptr(t))
}

/// `y = act(x W^T + b)` with `w` a compressed `[m, k]` weight.
pub(super) fn linear(
    dev: &CudaDevice,
    x: &CudaTensor,
    w: &CudaTensor,
    bias: Option<&CudaTensor>,
    act: Activation,
) -> Result<CudaTensor> {
    let (n, k) = check_2d(x, "linear input")?;
    let (m, k2) = check_2d(w, "linear weight")?;
    ensure!(k == k2, "linear: input width {k} but weight {m}x{k2}");
    ensure!(
        w.dtype == (DType::Q4 { group_dim: 0 }),
        "linear: a compressed weight must be grouped along dimension 0, got {:?}",
        w.dtype
    );
    if let Some(b) = bias {
        ensure!(
            b.numel() == m && b.dtype == DType::F16,
            "linear: bias of shape {:?} for {m} outputs",
            b.shape
        );
    }
    if n > MATVEC_MAX_ROWS || !k.is_multiple_of(4) {
        let wf = unpack(dev, w)?;
        let mut y = dev.alloc(DType::F16, &[n, m])?;
        dev.gemm_bias_act(x, &wf, bias, act, &mut y, true)?;
        return Ok(y);
    }
    let mut y = dev.alloc(DType::F16, &[n, m])?;
    let groups = m.div_ceil(GROUP);
    // enough column chunks for two blocks per SM
    let want = (2 * dev.sm_count).div_ceil(groups).max(1);
    let kchunk = k.div_ceil(want).next_multiple_of(MATVEC_COLUMN_STEP);
    let chunks = k.div_ceil(kchunk);
    let mut part = dev.alloc(DType::F32, &[chunks * MATVEC_ROWS_PER_LAUNCH * m])?;
    let (wp, bp) = (dev.ptr(w), ptr_or_null(dev, bias));
    let (pp, xp, yp) = (dev.ptr_mut(&mut part), dev.ptr(x), dev.ptr_mut(&mut y));
    let (ki, mi, kc, ci) = (k as i32, m as i32, kchunk as i32, chunks as i32);
    let relu = (act == Activation::Relu) as i32;
    for i0 in (0..n).step_by(MATVEC_ROWS_PER_LAUNCH) {
        let nn = MATVEC_ROWS_PER_LAUNCH.min(n - i0) as i32;
        let (xi, yi) = (xp + (i0 * k * 2) as u64, yp + (i0 * m * 2) as u64);
        let cfg = LaunchConfig {
            grid_dim: (groups as u32, chunks as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: part holds chunks x 4 x m floats, x rows i0.. of k halves, w the compressed
        // [m, k] bytes; k % 4 == 0 and kchunk % 128 == 0 as the kernel requires.
        unsafe { launch!(dev, "q4_matvec_f16", cfg, &pp, &xi, &wp, &nn, &ki, &mi, &kc) }?;
        let total = nn as usize * m;
        // SAFETY: y rows i0 .. i0 + nn of m halves; part as written above; bias m halves or null.
        unsafe {
            launch!(
                dev,
                "q4_matvec_reduce_f16",
                dev.grid_stride(total),
                &yi,
                &pp,
                &bp,
                &nn,
                &mi,
                &ci,
                &relu
            )
        }?;
    }
    Ok(y)
}

/// A compressed tensor decoded into fp16, in its logical shape.
pub(super) fn unpack(dev: &CudaDevice, t: &CudaTensor) -> Result<CudaTensor> {
    let DType::Q4 { group_dim } = t.dtype else {
        anyhow::bail!("unpack of a {:?} tensor", t.dtype)
    };
    let l = Q4Layout::new(&t.shape, group_dim);
    let mut out = dev.alloc(DType::F16, &t.shape)?;
    let (op, ip) = (dev.ptr_mut(&mut out), dev.ptr(t));
    let (outer, len, inner) = (l.outer as i64, l.len as i32, l.inner as i64);
    // SAFETY: out holds outer x len x inner halves, t the layout's bytes.
    unsafe {
        launch!(
            dev,
            "q4_unpack_f16",
            dev.grid_stride(t.numel()),
            &op,
            &ip,
            &outer,
            &len,
            &inner
        )
    }?;
    Ok(out)
}

/// Rows of a compressed table: gathered (`add` = false) or added to `x`.
pub(super) fn gather(
    dev: &CudaDevice,
    x: &mut CudaTensor,
    table: &CudaTensor,
    ids: &CudaTensor,
    add: bool,
) -> Result<()> {
    let (rows, width) = check_2d(table, "a compressed table")?;
    ensure!(
        table.dtype == (DType::Q4 { group_dim: 0 }),
        "a compressed table must be grouped along its rows, got {:?}",
        table.dtype
    );
    let n = ids.numel();
    let (o, t, i) = (dev.ptr_mut(x), dev.ptr(table), dev.ptr(ids));
    let (nn, w, r) = (n as i32, width as i32, rows as i32);
    // SAFETY: x is [n, width] halves, the table its [rows, width] compressed bytes, ids n u32.
    unsafe {
        if add {
            launch!(
                dev,
                "add_gathered_rows_q4",
                rows_cfg(n, 256),
                &o,
                &t,
                &i,
                &nn,
                &w,
                &r
            )
        } else {
            launch!(
                dev,
                "gather_rows_q4",
                rows_cfg(n, 256),
                &o,
                &t,
                &i,
                &nn,
                &w,
                &r
            )
        }
    }
}

/// Appends a step's keys or values (fp16 `[batch * new_len, hidden]`) to a compressed cache.
pub(super) fn append(
    dev: &CudaDevice,
    cache: &mut CudaTensor,
    src: &CudaTensor,
    s: AttnShape,
    max_len: usize,
) -> Result<()> {
    let groups = s.head_dim.div_ceil(GROUP);
    let threads = s.batch * s.new_len * s.heads * groups;
    let (cp, sp) = (dev.ptr_mut(cache), dev.ptr(src));
    let (b, nl, h, hd, past, ml) = (
        s.batch as i32,
        s.new_len as i32,
        s.heads as i32,
        s.head_dim as i32,
        s.past_len as i32,
        max_len as i32,
    );
    // SAFETY: the cache is [batch, heads, max_len] rows of the compressed head_dim, src the
    // [batch * new_len, heads * head_dim] halves; shapes checked by the caller.
    unsafe {
        launch!(
            dev,
            "kv_append_q4",
            dev.grid_stride(threads),
            &cp,
            &sp,
            &b,
            &nl,
            &h,
            &hd,
            &past,
            &ml
        )
    }
}

/// Attention over compressed caches (`fresh`: this step's fp16 keys and values, or none).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    dev: &CudaDevice,
    q: &CudaTensor,
    fresh: Option<(&CudaTensor, &CudaTensor)>,
    kc: &CudaTensor,
    vc: &CudaTensor,
    mask: &CudaTensor,
    s: AttnShape,
    out: &mut CudaTensor,
) -> Result<()> {
    let max_len = kc.shape[2];
    if s.new_len > 1 {
        // prefill: an fp16 copy of the cache, this step's rows exact in it, and the fp16 kernel
        let (mut kf, mut vf) = (unpack(dev, kc)?, unpack(dev, vc)?);
        if let Some((k, v)) = fresh {
            super::attention::append_kv(dev, &mut kf, &mut vf, k, v, s)?;
        }
        return dev.attention_prefill(q, &kf, &vf, mask, s, out);
    }
    let rb = Q4Layout::new(&[1, s.head_dim], 1).bytes() as i64;
    let (qp, kp, vp, mp) = (dev.ptr(q), dev.ptr(kc), dev.ptr(vc), dev.ptr(mask));
    let (kn, vn) = (
        ptr_or_null(dev, fresh.map(|f| f.0)),
        ptr_or_null(dev, fresh.map(|f| f.1)),
    );
    let total = s.total_len();
    let (q_stride, new_stride, out_stride) =
        (s.hidden() as i64, s.hidden() as i64, s.hidden() as i64);
    let (cs_h, cs_b) = (max_len as i64, (s.heads * max_len) as i64);
    let mask_stride = total as i64;
    let (heads, hd, len) = (s.heads as i32, s.head_dim as i32, total as i32);
    let scale = s.scale();
    let op = dev.ptr_mut(out);
    if s.sparsity() < 1.0 {
        ensure!(
            total <= SPARSE_MAX_LEN,
            "sparse attention over {total} keys: at most {SPARSE_MAX_LEN}"
        );
        let sp = s.sparsity();
        let cfg = pairs_cfg(&s, 1);
        // SAFETY: the argument list matches attention_decode_sparse_q4's signature; shapes
        // checked by the caller.
        return unsafe {
            launch!(
                dev,
                "attention_decode_sparse_q4",
                cfg,
                &op,
                &qp,
                &q_stride,
                &kp,
                &vp,
                &cs_b,
                &cs_h,
                &rb,
                &kn,
                &vn,
                &new_stride,
                &mp,
                &mask_stride,
                &hd,
                &len,
                &out_stride,
                &scale,
                &sp
            )
        };
    }
    let (splits, chunk) = decode_splits(dev, s);
    let (mut part_o, mut part_ml) = dev.decode_parts(s, splits)?;
    let po = part_o.as_mut().map_or(0, |t| dev.ptr_mut(t));
    let pml = part_ml.as_mut().map_or(0, |t| dev.ptr_mut(t));
    let chunk_i = chunk as i32;
    let cfg = pairs_cfg(&s, splits);
    // SAFETY: the argument list matches attention_decode_q4's signature; shapes checked by the
    // caller; chunk <= the kernel's 1024 keys.
    unsafe {
        launch!(
            dev,
            "attention_decode_q4",
            cfg,
            &op,
            &po,
            &pml,
            &qp,
            &q_stride,
            &kp,
            &vp,
            &cs_b,
            &cs_h,
            &rb,
            &kn,
            &vn,
            &new_stride,
            &mp,
            &mask_stride,
            &heads,
            &hd,
            &len,
            &chunk_i,
            &out_stride,
            &scale
        )
    }?;
    if splits > 1 {
        dev.attention_decode_reduce(s, splits, op, po, pml)?;
    }
    Ok(())
}

/// Sparse decode attention over fp16 caches.
pub(super) fn sparse_f16(
    dev: &CudaDevice,
    q: &CudaTensor,
    kc: &CudaTensor,
    vc: &CudaTensor,
    mask: &CudaTensor,
    s: AttnShape,
    out: &mut CudaTensor,
) -> Result<()> {
    check_attn_shape(&s)?;
    let total = s.total_len();
    ensure!(
        total <= SPARSE_MAX_LEN,
        "sparse attention over {total} keys: at most {SPARSE_MAX_LEN}"
    );
    let max_len = kc.shape[2];
    let (op, qp, kp, vp, mp) = (
        dev.ptr_mut(out),
        dev.ptr(q),
        dev.ptr(kc),
        dev.ptr(vc),
        dev.ptr(mask),
    );
    let q_stride = s.hidden() as i64;
    let cs_s = s.head_dim as i64;
    let cs_h = (max_len * s.head_dim) as i64;
    let cs_b = (s.heads * max_len * s.head_dim) as i64;
    let mask_stride = total as i64;
    let (hd, len) = (s.head_dim as i32, total as i32);
    let (scale, sp) = (s.scale(), s.sparsity());
    let cfg = pairs_cfg(&s, 1);
    // SAFETY: the argument list matches attention_decode_sparse_f16's signature; shapes checked
    // by the caller.
    unsafe {
        launch!(
            dev,
            "attention_decode_sparse_f16",
            cfg,
            &op,
            &qp,
            &q_stride,
            &kp,
            &vp,
            &cs_b,
            &cs_h,
            &cs_s,
            &mp,
            &mask_stride,
            &hd,
            &len,
            &q_stride,
            &scale,
            &sp
        )
    }
}
