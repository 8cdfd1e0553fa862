//! Attention on the CPU: KV-cache append and masked multi-head attention over the cache.
//!
//! One implementation serves prefill (`past_len = 0`) and decode (`new_len = 1`): work is split
//! over (sequence, head) pairs; each pair converts its K and V slab to f32 once and runs
//! vectorizable dot products over contiguous rows. A 4-bit compressed cache runs through
//! [`super::q4_attention`], and a decode query under sparse attention keeps only its largest
//! weights ([`super::sparse`]).

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::q4::Simd;
use super::q4_attention::{self, Fresh};
use super::tensor::{CpuTensor, Storage};
use crate::compress::Q4Layout;
use crate::device::{AttnShape, DeviceTensor};

fn check_cache(cache: &CpuTensor, s: AttnShape, what: &str) -> Result<usize> {
    match cache.shape() {
        [b, h, l, d] if *b == s.batch && *h == s.heads && *d == s.head_dim => {
            ensure!(
                s.total_len() <= *l,
                "{what}: {} positions do not fit a cache of {l}",
                s.total_len()
            );
            Ok(*l)
        }
        shape => bail!(
            "{what}: cache of shape {shape:?} does not match batch {} heads {} head_dim {}",
            s.batch,
            s.heads,
            s.head_dim
        ),
    }
}

fn check_rows(t: &CpuTensor, s: AttnShape, what: &str) -> Result<()> {
    ensure!(
        t.shape() == [s.batch * s.new_len, s.hidden()],
        "{what}: shape {:?}, expected [{}, {}]",
        t.shape(),
        s.batch * s.new_len,
        s.hidden()
    );
    Ok(())
}

pub fn append_kv(
    k_cache: &mut CpuTensor,
    v_cache: &mut CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    s: AttnShape,
) -> Result<()> {
    let max_len = check_cache(k_cache, s, "append_kv k cache")?;
    check_cache(v_cache, s, "append_kv v cache")?;
    check_rows(k, s, "append_kv k")?;
    check_rows(v, s, "append_kv v")?;
    for (cache, new) in [(k_cache, k.f32()?), (v_cache, v.f32()?)] {
        let (d, h) = (s.head_dim, s.heads);
        // dst(cache row, values): row = (sequence * heads + head) * max_len + position
        let put = |dst: &mut dyn FnMut(usize, &[f32])| {
            for b in 0..s.batch {
                for i in 0..s.new_len {
                    let row = &new[(b * s.new_len + i) * s.hidden()..][..s.hidden()];
                    for head in 0..h {
                        let at = (b * h + head) * max_len + s.past_len + i;
                        dst(at, &row[head * d..(head + 1) * d]);
                    }
                }
            }
        };
        match &mut cache.data {
            Storage::F16(c) => put(&mut |at, src| {
                super::convert::f32_to_f16(src, &mut c[at * d..at * d + src.len()])
            }),
            Storage::F32(c) => {
                put(&mut |at, src| c[at * d..at * d + src.len()].copy_from_slice(src))
            }
            Storage::Q4 { bytes, .. } => {
                let rb = Q4Layout::new(&[1, d], 1).bytes();
                put(&mut |at, src| {
                    crate::compress::compress_row(src, &mut bytes[at * rb..(at + 1) * rb])
                })
            }
            Storage::U32(_) => bail!("append_kv: a u32 cache"),
        }
    }
    Ok(())
}

use super::simd::{axpy, dot};

fn slab_f32(cache: &CpuTensor, start: usize, len: usize, buf: &mut Vec<f32>) -> Result<()> {
    buf.clear();
    match &cache.data {
        Storage::F16(c) => {
            buf.resize(len, 0.0);
            super::convert::f16_to_f32(&c[start..start + len], buf);
        }
        Storage::F32(c) => buf.extend_from_slice(&c[start..start + len]),
        Storage::U32(_) => bail!("attention: a u32 cache"),
        Storage::Q4 { .. } => bail!("attention: a compressed cache read as fp16 rows"),
    }
    Ok(())
}

/// One (sequence, head) pair's cache rows, read in place (decode reads the whole cache once per
/// step: converting it to an f32 copy first would double the traffic).
#[derive(Clone, Copy)]
enum Rows<'a> {
    F16(&'a [half::f16]),
    F32(&'a [f32]),
}

impl Rows<'_> {
    fn of(cache: &CpuTensor, start: usize, len: usize) -> Result<Rows<'_>> {
        Ok(match &cache.data {
            Storage::F16(c) => Rows::F16(&c[start..start + len]),
            Storage::F32(c) => Rows::F32(&c[start..start + len]),
            Storage::U32(_) => bail!("attention: a u32 cache"),
            Storage::Q4 { .. } => bail!("attention: a compressed cache read as fp16 rows"),
        })
    }

    /// row j as f32 into `out` (`out.len()` values)
    fn row_f32(&self, j: usize, out: &mut [f32]) {
        let d = out.len();
        match self {
            Rows::F32(r) => out.copy_from_slice(&r[j * d..(j + 1) * d]),
            Rows::F16(r) => super::convert::f16_to_f32(&r[j * d..(j + 1) * d], out),
        }
    }

    /// q · row j
    #[inline]
    fn dot(&self, j: usize, q: &[f32], tmp: &mut [f32]) -> f32 {
        let d = q.len();
        match self {
            Rows::F32(r) => dot(q, &r[j * d..(j + 1) * d]),
            Rows::F16(r) => {
                #[cfg(target_arch = "x86_64")]
                {
                    if d.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: avx512f present; row j has d values, d a multiple of 16.
                        return unsafe { f16_simd::dot(&r[j * d..(j + 1) * d], q) };
                    }
                }
                super::convert::f16_to_f32(&r[j * d..(j + 1) * d], tmp);
                dot(q, tmp)
            }
        }
    }

    /// out += w * row j
    #[inline]
    fn axpy(&self, j: usize, w: f32, out: &mut [f32], tmp: &mut [f32]) {
        let d = out.len();
        match self {
            Rows::F32(r) => axpy(out, w, &r[j * d..(j + 1) * d]),
            Rows::F16(r) => {
                #[cfg(target_arch = "x86_64")]
                {
                    if d.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: as in `dot`.
                        unsafe { f16_simd::axpy(out, w, &r[j * d..(j + 1) * d]) };
                        return;
                    }
                }
                super::convert::f16_to_f32(&r[j * d..(j + 1) * d], tmp);
                axpy(out, w, tmp)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod f16_simd {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot(row: &[f16], q: &[f32]) -> f32 {
        let mut acc = _mm512_setzero_ps();
        for c in 0..q.len() / 16 {
            let k = _mm512_cvtph_ps(_mm256_loadu_si256(
                row.as_ptr().add(c * 16) as *const __m256i
            ));
            acc = _mm512_fmadd_ps(k, _mm512_loadu_ps(q.as_ptr().add(c * 16)), acc);
        }
        _mm512_reduce_add_ps(acc)
    }

    /// A whole decode pair for head_dim = 16 * C, the query and the output in registers:
    /// scores over every cache row, masked softmax (sparse: the `keep` largest weights), then
    /// the weighted sum of value rows.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pair<const C: usize>(
        q: &[f32],
        k: &[f16],
        v: &[f16],
        m: &[u32],
        scale: f32,
        keep: usize,
        p: &mut [f32],
        out: &mut [f32],
    ) -> bool {
        let (t, d) = (p.len(), 16 * C);
        if q.len() < d || out.len() < d || k.len() < t * d || v.len() < t * d || m.len() < t {
            return false;
        }
        let mut qv = [_mm512_setzero_ps(); C];
        for (c, r) in qv.iter_mut().enumerate() {
            *r = _mm512_loadu_ps(q.as_ptr().add(c * 16));
        }
        let row = |base: *const f16, j: usize, c: usize| {
            _mm512_cvtph_ps(_mm256_loadu_si256(
                base.add(j * d + c * 16) as *const __m256i
            ))
        };
        // the pair's K and V are short streams (a few KiB) that the hardware prefetchers barely
        // pick up before they end: fetch K a few rows ahead, and V while the scores run
        let line = |base: *const f16, j: usize, c: usize| base.add(j * d + c * 32) as *const i8;
        for j in 0..t {
            for c in 0..d.div_ceil(32) {
                _mm_prefetch::<_MM_HINT_T0>(line(k.as_ptr(), j + 8, c));
                _mm_prefetch::<_MM_HINT_T0>(line(v.as_ptr(), j, c));
            }
            if *m.get_unchecked(j) == 0 {
                continue;
            }
            let mut acc = _mm512_mul_ps(row(k.as_ptr(), j, 0), qv[0]);
            for (c, qc) in qv.iter().enumerate().skip(1) {
                acc = _mm512_fmadd_ps(row(k.as_ptr(), j, c), *qc, acc);
            }
            *p.get_unchecked_mut(j) = _mm512_reduce_add_ps(acc);
        }
        super::super::simd::softmax_row(p, m, t, scale);
        super::sparsify(p, m, keep);
        let mut o = [_mm512_setzero_ps(); C];
        for (j, &w) in p.iter().enumerate() {
            if w != 0.0 {
                let wv = _mm512_set1_ps(w);
                for (c, oc) in o.iter_mut().enumerate() {
                    *oc = _mm512_fmadd_ps(wv, row(v.as_ptr(), j, c), *oc);
                }
            }
        }
        for (c, oc) in o.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(c * 16), *oc);
        }
        true
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy(out: &mut [f32], w: f32, row: &[f16]) {
        let wv = _mm512_set1_ps(w);
        for c in 0..out.len() / 16 {
            let v = _mm512_cvtph_ps(_mm256_loadu_si256(
                row.as_ptr().add(c * 16) as *const __m256i
            ));
            let o = out.as_mut_ptr().add(c * 16);
            _mm512_storeu_ps(o, _mm512_fmadd_ps(wv, v, _mm512_loadu_ps(o)));
        }
    }
}

/// Sparse attention's selection after a decode query's softmax, when it keeps fewer keys than
/// it sees.
fn sparsify(p: &mut [f32], m: &[u32], keep: usize) {
    let visible = m.iter().take(p.len()).filter(|&&x| x != 0).count();
    if keep < visible {
        super::sparse::keep_largest(p, m, keep);
    }
}

/// Keys a decode query with mask row `m` keeps under the shape's sparsity.
fn kept(m: &[u32], s: AttnShape) -> usize {
    s.kept_keys(m.iter().take(s.total_len()).filter(|&&x| x != 0).count())
}

/// One (sequence, head) pair with a single query (decode): dot products over the cache.
fn pair_loop(q: &[f32], k: Rows<'_>, v: Rows<'_>, m: &[u32], s: AttnShape) -> Vec<f32> {
    let (d, t) = (s.head_dim, s.total_len());
    let scale = s.scale();
    let keep = kept(m, s);
    let mut out = vec![0f32; d];
    #[cfg(target_arch = "x86_64")]
    if let (Rows::F16(kr), Rows::F16(vr)) = (k, v) {
        if super::simd::has_avx512() {
            let mut p = vec![0f32; t];
            // SAFETY: avx512f is present; the slices hold t rows of d values (Rows::of).
            let done = unsafe {
                match d {
                    64 => f16_simd::pair::<4>(q, kr, vr, m, scale, keep, &mut p, &mut out),
                    128 => f16_simd::pair::<8>(q, kr, vr, m, scale, keep, &mut p, &mut out),
                    _ => false,
                }
            };
            if done {
                return out;
            }
        }
    }
    let mut tmp = vec![0f32; d];
    let mut p = vec![0f32; t];
    for j in 0..t {
        if m[j] != 0 {
            p[j] = k.dot(j, q, &mut tmp);
        }
    }
    super::simd::softmax_row(&mut p, m, t, scale);
    sparsify(&mut p, m, keep);
    for (j, &w) in p.iter().enumerate() {
        if w != 0.0 {
            v.axpy(j, w, &mut out, &mut tmp);
        }
    }
    out
}

/// `dst[r, c] = sum_p a[r * a_rs + p] * b[p * b_rs + c * b_cs]` (single-threaded: callers
/// parallelize over pairs).
#[allow(clippy::too_many_arguments)]
fn small_gemm(
    rows: usize,
    cols: usize,
    inner: usize,
    dst: &mut [f32],
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
) {
    assert!(dst.len() >= rows * cols);
    assert!(rows == 0 || a.len() >= (rows - 1) * a_rs + inner);
    assert!(inner == 0 || cols == 0 || b.len() > (inner - 1) * b_rs + (cols - 1) * b_cs);
    // SAFETY: the asserts above bound every element the strides reach.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            inner,
            dst.as_mut_ptr(),
            1,
            cols as isize,
            false,
            a.as_ptr(),
            1,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// One (sequence, head) pair with several queries (prefill): scores = Q K^T and out = P V as
/// matrix products, masked softmax in between. `q` starts at the pair's first query; its rows
/// are `q_rs` apart. Blocks of queries see only the keys up to their last query's position
/// (causal): prefill does about half the work of full products.
fn pair_gemm(q: &[f32], q_rs: usize, kb: &[f32], vb: &[f32], m: &[u32], s: AttnShape) -> Vec<f32> {
    const QB: usize = 64;
    let (d, t, n) = (s.head_dim, s.total_len(), s.new_len);
    let scale = s.scale();
    let mut scores = vec![0f32; QB.min(n) * t];
    let mut out = vec![0f32; n * d];
    for i0 in (0..n).step_by(QB) {
        let rows = QB.min(n - i0);
        // keys visible to the block's last query
        let kl = (s.past_len + i0 + rows).min(t);
        let sc = &mut scores[..rows * kl];
        // K^T: element (c, j) is kb[j * d + c]
        small_gemm(rows, kl, d, sc, &q[i0 * q_rs..], q_rs, kb, 1, d);
        for (i, row) in sc.chunks_mut(kl).enumerate() {
            super::simd::softmax_row(row, m, s.past_len + i0 + i + 1, scale);
        }
        small_gemm(rows, d, kl, &mut out[i0 * d..], sc, kl, vb, d, 1);
    }
    out
}

/// [`pair_gemm`] on AMX tiles for the bf16 mode: Q, K, P and V rounded to bf16, products
/// accumulated in f32, softmax in f32. Blocks of 32 queries see only the keys up to their last
/// query's position (causal), so prefill does about half the work of full products.
fn pair_amx(q: &[f32], q_rs: usize, k: Rows<'_>, v: Rows<'_>, m: &[u32], s: AttnShape) -> Vec<f32> {
    use super::amx::{round32, Tiles};
    use super::bf16::to_bf16_bits;
    use super::simd::round_bf16;
    const B: usize = 32;
    let (d, t, n) = (s.head_dim, s.total_len(), s.new_len);
    let (dpad, tpad, npad) = (round32(d), round32(t), round32(n));
    let scale = s.scale();
    // Q rows [npad][dpad]; K as a weight [t, d] and V^T as a weight [d, t], packed in panels
    // of 32 output columns `[k/2][32][2]` (amx::pack_w's layout)
    let mut qa = vec![0u16; npad * dpad];
    for i in 0..n {
        round_bf16(&q[i * q_rs..i * q_rs + d], &mut qa[i * dpad..i * dpad + d]);
    }
    let (kpanel, vpanel) = (dpad * B, tpad * B);
    let mut kp = vec![0u16; tpad / B * kpanel];
    let mut vp = vec![0u16; dpad / B * vpanel];
    let mut row = vec![0f32; d];
    for j in 0..t {
        k.row_f32(j, &mut row);
        let panel = &mut kp[j / B * kpanel..];
        for (c, x) in row.iter().enumerate() {
            panel[(c / 2) * 2 * B + (j % B) * 2 + c % 2] = to_bf16_bits(*x);
        }
        v.row_f32(j, &mut row);
        for (c, x) in row.iter().enumerate() {
            vp[c / B * vpanel + (j / 2) * 2 * B + (c % B) * 2 + j % 2] = to_bf16_bits(*x);
        }
    }
    let tiles = Tiles::configure();
    let mut c = [0f32; B * B];
    let mut scores = vec![0f32; B * tpad];
    let mut pa = vec![0u16; B * tpad];
    let mut out = vec![0f32; n * d];
    for rb in 0..npad / B {
        let rows = B.min(n - rb * B);
        // keys visible to the block's last query, in whole panels
        let klen = round32((s.past_len + rb * B + B).min(t));
        for pi in 0..klen / B {
            tiles.block(&qa[rb * B * dpad..], dpad, &kp[pi * kpanel..], dpad, &mut c);
            for i in 0..rows {
                scores[i * tpad + pi * B..][..B].copy_from_slice(&c[i * B..(i + 1) * B]);
            }
        }
        for i in 0..rows {
            let vis = s.past_len + rb * B + i + 1;
            let r = &mut scores[i * tpad..i * tpad + vis];
            super::simd::softmax_row(r, &m[..vis], vis, scale);
            let p = &mut pa[i * tpad..i * tpad + klen];
            round_bf16(r, &mut p[..vis]);
            p[vis..].iter_mut().for_each(|a| *a = 0);
        }
        // rows past n of the last block hold zeros or stale values: their outputs are dropped
        for ci in 0..dpad / B {
            tiles.block(&pa, tpad, &vp[ci * vpanel..], klen, &mut c);
            let cols = B.min(d - ci * B);
            for i in 0..rows {
                out[(rb * B + i) * d + ci * B..][..cols].copy_from_slice(&c[i * B..i * B + cols]);
            }
        }
    }
    out
}

/// Masked multi-head attention of `q` over the cache; `amx` picks the bf16 AMX path for
/// several queries (the bf16 mode), else f32. `fresh`: this step's keys and values
/// (`[batch * new_len, hidden]`), which a compressed cache attends to exact
/// ([`q4_attention`]); other caches hold them already.
pub fn attention(
    q: &CpuTensor,
    k_cache: &CpuTensor,
    v_cache: &CpuTensor,
    mask: &CpuTensor,
    s: AttnShape,
    amx: bool,
    fresh: Option<(&CpuTensor, &CpuTensor)>,
) -> Result<CpuTensor> {
    let max_len = check_cache(k_cache, s, "attention k cache")?;
    check_cache(v_cache, s, "attention v cache")?;
    check_rows(q, s, "attention q")?;
    let t = s.total_len();
    ensure!(
        mask.shape() == [s.batch, t],
        "attention mask: shape {:?}, expected [{}, {t}]",
        mask.shape(),
        s.batch
    );
    let (q, mask) = (q.f32()?, mask.u32()?);
    let (d, h, hid) = (s.head_dim, s.heads, s.hidden());
    let compressed = match (k_cache.storage(), v_cache.storage()) {
        (Storage::Q4 { bytes: kb, .. }, Storage::Q4 { bytes: vb, .. }) => Some((kb, vb)),
        (Storage::Q4 { .. }, _) | (_, Storage::Q4 { .. }) => {
            bail!("attention: a compressed K cache with an uncompressed V cache, or the reverse")
        }
        _ => None,
    };
    let fresh = match fresh {
        Some((k, v)) if compressed.is_some() => {
            check_rows(k, s, "attention new keys")?;
            check_rows(v, s, "attention new values")?;
            Some((k.f32()?, v.f32()?))
        }
        _ => None,
    };
    let simd = Simd::detect();
    // each (sequence, head) pair writes head_dim columns of new_len rows: collect per pair, then scatter
    let per_pair: Vec<Result<Vec<f32>>> = (0..s.batch * h)
        .into_par_iter()
        .map(|bh| {
            let (b, head) = (bh / h, bh % h);
            let start = bh * max_len * d;
            let m = &mask[b * t..(b + 1) * t];
            let q0 = b * s.new_len * hid + head * d;
            if let Some((kb, vb)) = compressed {
                let rb = Q4Layout::new(&[1, d], 1).bytes();
                let (k, v) = (&kb[bh * max_len * rb..], &vb[bh * max_len * rb..]);
                let fr = fresh.map(|(fk, fv)| Fresh {
                    k: fk,
                    v: fv,
                    at: b * s.new_len * hid + head * d,
                    stride: hid,
                    past: s.past_len,
                });
                if s.new_len == 1 {
                    let keep = kept(m, s);
                    let q = &q[q0..q0 + d];
                    return Ok(q4_attention::decode_pair(
                        simd,
                        q,
                        k,
                        v,
                        rb,
                        fr,
                        m,
                        t,
                        s.scale(),
                        keep,
                    ));
                }
                let (mut kf, mut vf) = (Vec::new(), Vec::new());
                q4_attention::slab(k, rb, d, t, fr.map(|f| (f, true)), &mut kf);
                q4_attention::slab(v, rb, d, t, fr.map(|f| (f, false)), &mut vf);
                return Ok(pair_gemm(&q[q0..], hid, &kf, &vf, m, s));
            }
            let out = if s.new_len > 1 && amx {
                let k = Rows::of(k_cache, start, t * d)?;
                let v = Rows::of(v_cache, start, t * d)?;
                pair_amx(&q[q0..], hid, k, v, m, s)
            } else if s.new_len > 1 {
                let (mut kb, mut vb) = (Vec::new(), Vec::new());
                slab_f32(k_cache, start, t * d, &mut kb)?;
                slab_f32(v_cache, start, t * d, &mut vb)?;
                pair_gemm(&q[q0..], hid, &kb, &vb, m, s)
            } else {
                let k = Rows::of(k_cache, start, t * d)?;
                let v = Rows::of(v_cache, start, t * d)?;
                pair_loop(&q[q0..q0 + d], k, v, m, s)
            };
            Ok(out)
        })
        .collect();
    // every (sequence, head) pair's rows are written below
    let mut out = super::pool::take_f32(s.batch * s.new_len * hid)?;
    for (bh, r) in per_pair.into_iter().enumerate() {
        let r = r?;
        let (b, head) = (bh / h, bh % h);
        for i in 0..s.new_len {
            out[(b * s.new_len + i) * hid + head * d..][..d]
                .copy_from_slice(&r[i * d..(i + 1) * d]);
        }
    }
    CpuTensor::from_f32(&[s.batch * s.new_len, hid], out)
}

/// Slow, obviously-correct attention straight from the definition (masked scores, full softmax
/// in f64, sparse attention's selection by a full sort), for tests of the one above.
pub fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[u32],
    s: AttnShape,
) -> Vec<f32> {
    // k, v: [batch, heads, total_len, head_dim] in f32 (already the cache's rounded values)
    let (d, h, t) = (s.head_dim, s.heads, s.total_len());
    let mut out = vec![0f32; s.batch * s.new_len * h * d];
    for b in 0..s.batch {
        for head in 0..h {
            for i in 0..s.new_len {
                let qi = &q[(b * s.new_len + i) * h * d + head * d..][..d];
                let mut scores = vec![None; t];
                for (j, sc) in scores.iter_mut().enumerate() {
                    if j <= s.past_len + i && mask[b * t + j] == 1 {
                        let kj = &k[((b * h + head) * t + j) * d..][..d];
                        let dot: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        *sc = Some(dot * s.scale() as f64);
                    }
                }
                let max = scores
                    .iter()
                    .flatten()
                    .fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let total: f64 = scores.iter().flatten().map(|x| (x - max).exp()).sum();
                // sparse attention: the newest key and the largest of the others, by a full sort
                let visible: Vec<usize> = (0..t).filter(|&j| scores[j].is_some()).collect();
                let keep = s.kept_keys(visible.len());
                let newest = s.past_len + i;
                let mut others: Vec<usize> = visible.into_iter().filter(|&j| j != newest).collect();
                others.sort_by(|&a, &b| {
                    scores[b]
                        .unwrap()
                        .total_cmp(&scores[a].unwrap())
                        .then(a.cmp(&b))
                });
                for &j in others.iter().skip(keep.saturating_sub(1)) {
                    scores[j] = None;
                }
                for (j, sc) in scores.iter().enumerate() {
                    if let Some(x) = sc {
                        let p = (x - max).exp() / total;
                        for c in 0..d {
                            out[(b * s.new_len + i) * h * d + head * d + c] +=
                                (p * v[((b * h + head) * t + j) * d + c] as f64) as f32;
                        }
                    }
                }
            }
        }
    }
    out
}
