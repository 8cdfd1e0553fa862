//! The KV cache and attention on the CUDA device: cache allocation and append, and attention by
//! the decode kernels (one query per sequence, keys split across blocks and merged) or the
//! prefill kernel (blocks of queries).

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

use super::device::CudaDevice;
use super::launch::{launch, rows_cfg};
use super::q4;
use super::tensor::CudaTensor;
use super::transfer::zeros;
use crate::device::{AttnShape, DType, DeviceTensor};

/// Rows of 128 threads for the attention kernels: must match PF_WARPS * 32, DEC_THREADS and
/// AQ_THREADS.
pub(super) const ATTN_THREADS: u32 = 128;
/// Must match DEC_MAX_CHUNK in kernels/attention_decode.cu.
const DECODE_MAX_CHUNK: usize = 1024;
/// Must match PF_BQ in kernels/attention_prefill.cu.
const PREFILL_BQ: usize = 16;

/// The head sizes the attention kernels are written for.
pub(super) fn check_attn_shape(s: &AttnShape) -> Result<()> {
    ensure!(
        s.head_dim.is_multiple_of(8) && s.head_dim <= 128 && s.head_dim > 0,
        "the CUDA attention kernels need head_dim a multiple of 8 and at most 128, got {}",
        s.head_dim
    );
    Ok(())
}

impl CudaDevice {
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
        let (splits, chunk) = decode_splits(self, s);
        let (mut part_o, mut part_ml) = self.decode_parts(s, splits)?;
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
        let cfg = pairs_cfg(&s, splits);
        // SAFETY: the argument list matches attention_decode_f16's signature; shapes were checked.
        unsafe {
            launch!(
                self,
                "attention_decode_f16",
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
                &cs_s,
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
            self.attention_decode_reduce(s, splits, op, po, pml)?;
        }
        // part_o / part_ml are freed stream-ordered after the kernels that use them.
        Ok(())
    }

    /// The per-split partial outputs and (max, sum) pairs of a split decode attention; none for
    /// one split.
    pub(super) fn decode_parts(
        &self,
        s: AttnShape,
        splits: usize,
    ) -> Result<(Option<CudaTensor>, Option<CudaTensor>)> {
        if splits <= 1 {
            return Ok((None, None));
        }
        let bh = s.batch * s.heads;
        Ok((
            Some(self.alloc(DType::F32, &[bh * splits * s.head_dim])?),
            Some(self.alloc(DType::F32, &[bh * splits * 2])?),
        ))
    }

    /// Merges the splits of a decode attention (attention_decode_reduce_f16) into `op`.
    pub(super) fn attention_decode_reduce(
        &self,
        s: AttnShape,
        splits: usize,
        op: u64,
        po: u64,
        pml: u64,
    ) -> Result<()> {
        let (heads, hd, splits_i) = (s.heads as i32, s.head_dim as i32, splits as i32);
        let out_stride = s.hidden() as i64;
        let cfg = pairs_cfg(&s, 1);
        // SAFETY: part_o holds batch x heads x splits x head_dim floats and part_ml two per
        // split, as the decode kernels wrote them; out is [batch, hidden] halves.
        unsafe {
            launch!(
                self,
                "attention_decode_reduce_f16",
                cfg,
                &op,
                &po,
                &pml,
                &heads,
                &hd,
                &splits_i,
                &out_stride
            )
        }
    }

    /// Launches the prefill attention kernel (blocks of queries).
    pub(super) fn attention_prefill(
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
        // SAFETY: the argument list matches attention_prefill_f16's signature.
        unsafe {
            launch!(
                self,
                "attention_prefill_f16",
                cfg,
                &op,
                &qp,
                &kp,
                &vp,
                &cs_b,
                &cs_h,
                &cs_s,
                &mp,
                &mask_stride,
                &past,
                &new,
                &heads,
                &hd,
                &q_stride,
                &out_stride,
                &scale
            )
        }?;
        Ok(())
    }
}

/// One block of [`ATTN_THREADS`] per (head, sequence) and `z` per pair: the decode kernels'
/// grid.
pub(super) fn pairs_cfg(s: &AttnShape, z: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.heads as u32, s.batch as u32, z as u32),
        block_dim: (ATTN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The decode kernels' split of the keys: enough splits to give every SM two blocks, but no
/// chunk shorter than 64 keys (the merge would then cost more than it spreads) and none longer
/// than the kernels' buffer. Returns (splits, keys per split).
pub(super) fn decode_splits(dev: &CudaDevice, s: AttnShape) -> (usize, usize) {
    let total = s.total_len();
    let bh = s.batch * s.heads;
    let min_splits = total.div_ceil(DECODE_MAX_CHUNK);
    let want = (2 * dev.sm_count)
        .div_ceil(bh)
        .min(total.div_ceil(64))
        .max(1);
    let splits = want.max(min_splits);
    let chunk = total.div_ceil(splits);
    (total.div_ceil(chunk), chunk)
}

pub(super) fn alloc_kv(
    dev: &CudaDevice,
    batch: usize,
    heads: usize,
    max_len: usize,
    head_dim: usize,
) -> Result<CudaTensor> {
    zeros(dev, DType::F16, &[batch, heads, max_len, head_dim])
}

pub(super) fn append_kv(
    dev: &CudaDevice,
    k_cache: &mut CudaTensor,
    v_cache: &mut CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    s: AttnShape,
) -> Result<()> {
    let expect = [s.batch, s.heads];
    let dtype = k_cache.dtype;
    for (c, name) in [(&*k_cache, "k_cache"), (&*v_cache, "v_cache")] {
        ensure!(
            c.shape.len() == 4
                && c.shape[..2] == expect
                && c.shape[3] == s.head_dim
                && c.dtype == dtype
                && cache_dtype_ok(dtype),
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
    let k = dev.as_f16(k, &mut tk)?;
    let v = dev.as_f16(v, &mut tv)?;
    for t in [k, v] {
        ensure!(
            t.shape == [s.batch * s.new_len, s.hidden()],
            "append_kv: new keys/values of shape {:?}",
            t.shape
        );
    }
    if dtype.is_compressed() {
        q4::append(dev, k_cache, k, s, max_len)?;
        return q4::append(dev, v_cache, v, s, max_len);
    }
    let (b, nl, h, hd, past, ml) = (
        s.batch as i32,
        s.new_len as i32,
        s.heads as i32,
        s.head_dim as i32,
        s.past_len as i32,
        max_len as i32,
    );
    for (cache, src) in [(k_cache, k), (v_cache, v)] {
        let (cp, sp) = (dev.ptr_mut(cache), dev.ptr(src));
        // SAFETY: shapes checked above.
        unsafe {
            launch!(
                dev,
                "kv_append_f16",
                rows_cfg(s.batch * s.new_len, 256),
                &cp,
                &sp,
                &b,
                &nl,
                &h,
                &hd,
                &past,
                &ml
            )
        }?;
    }
    Ok(())
}

/// The caches the kernels read: fp16, or compressed along head_dim.
fn cache_dtype_ok(d: DType) -> bool {
    d == DType::F16 || d == (DType::Q4 { group_dim: 3 })
}

pub(super) fn attention(
    dev: &CudaDevice,
    q: &CudaTensor,
    k_cache: &CudaTensor,
    v_cache: &CudaTensor,
    mask: &CudaTensor,
    s: AttnShape,
) -> Result<CudaTensor> {
    attend(dev, q, None, k_cache, v_cache, mask, s)
}

/// [`attention`] given this step's keys and values, which a compressed cache attends to exact.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_with_new(
    dev: &CudaDevice,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    k_cache: &CudaTensor,
    v_cache: &CudaTensor,
    mask: &CudaTensor,
    s: AttnShape,
) -> Result<CudaTensor> {
    attend(dev, q, Some((k, v)), k_cache, v_cache, mask, s)
}

fn attend(
    dev: &CudaDevice,
    q: &CudaTensor,
    fresh: Option<(&CudaTensor, &CudaTensor)>,
    k_cache: &CudaTensor,
    v_cache: &CudaTensor,
    mask: &CudaTensor,
    s: AttnShape,
) -> Result<CudaTensor> {
    check_attn_shape(&s)?;
    let mut tq = None;
    let q = dev.as_f16(q, &mut tq)?;
    ensure!(
        q.shape == [s.batch * s.new_len, s.hidden()],
        "attention: q of shape {:?} for {s:?}",
        q.shape
    );
    let dtype = k_cache.dtype;
    for c in [k_cache, v_cache] {
        ensure!(
            c.shape.len() == 4
                && c.shape[0] == s.batch
                && c.shape[1] == s.heads
                && c.shape[3] == s.head_dim
                && c.shape[2] >= s.total_len()
                && c.dtype == dtype
                && cache_dtype_ok(dtype),
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
    let mut out = dev.alloc(DType::F16, &[s.batch * s.new_len, s.hidden()])?;
    if dtype.is_compressed() {
        let (mut tk, mut tv) = (None, None);
        let fresh = match fresh {
            Some((k, v)) => {
                let (k, v) = (dev.as_f16(k, &mut tk)?, dev.as_f16(v, &mut tv)?);
                for t in [k, v] {
                    ensure!(
                        t.shape == [s.batch * s.new_len, s.hidden()],
                        "attention: new keys/values of shape {:?}",
                        t.shape
                    );
                }
                Some((k, v))
            }
            None => None,
        };
        q4::attention(dev, q, fresh, k_cache, v_cache, mask, s, &mut out)?;
    } else if s.new_len == 1 && s.sparsity() < 1.0 {
        q4::sparse_f16(dev, q, k_cache, v_cache, mask, s, &mut out)?;
    } else if s.new_len == 1 {
        dev.attention_decode(q, k_cache, v_cache, mask, s, &mut out)?;
    } else {
        dev.attention_prefill(q, k_cache, v_cache, mask, s, &mut out)?;
    }
    Ok(out)
}
