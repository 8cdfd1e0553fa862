//! Matrix products of the CPU device: `out = x W^T + b` with `x` f32 `[n, k]`, `W` fp16
//! `[m, k]` (HuggingFace's `[out, in]`).
//!
//! Two fast paths, picked by the number of rows:
//! - many rows (prefill): `W` converted to f32 once, then the `gemm` crate (packed, blocked,
//!   AVX-512 microkernels, rayon);
//! - few rows (decode): a matrix-vector kernel that streams `W` once in fp16, converts 16 values
//!   per instruction and multiplies them into every row of `x` (bandwidth-bound: fp16 halves the
//!   bytes of an f32 weight).
//!
//! [`linear_reference`] is the slow, obviously-correct version both are tested against.

use std::sync::OnceLock;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::shared_out::SharedOut;

/// Precision of the CPU device's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulMode {
    /// f32 math on fp16-stored weights: the default and the reference for correctness.
    #[default]
    F32,
    /// Inputs rounded to bf16, products accumulated in f32 by AVX-512 BF16 dot products, for
    /// products of many rows (prefill); few-row products stay on the f32 matrix-vector path.
    /// Needs a CPU with avx512_bf16. Not bit-comparable with the f32 reference.
    Bf16,
}

/// Rows up to which the matrix-vector path beats the GEMM even on a kept f32 copy of `W`: the
/// GEMM's packing does not pay for itself on thin products. Measured with `--example ops` (f32
/// copies kept): 32 x 768 x 3072 0.55 against 0.93 ms, 64 x 2048 x 8192 7.1 against 10.9 ms;
/// from 96 rows on the two were within noise of each other, and at 128 x 768 the GEMM won.
pub const MATVEC_MAX_ROWS: usize = 64;
/// Rows from which the bf16 mode uses AMX (where available) instead of the matrix-vector path.
pub const AMX_MIN_ROWS: usize = 4;

/// The SIMD level the kernels dispatch to, for the device name.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return "avx2";
        }
    }
    "portable"
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// `out[n, m] = x[n, k] · w[m, k]^T + bias`.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    mode: MatmulMode,
    x: &[f32],
    w: &[f16],
    bias: Option<&[f16]>,
    n: usize,
    k: usize,
    m: usize,
    out: &mut [f32],
) {
    linear_cached(mode, x, w, None, None, bias, false, n, k, m, out)
}

/// [`linear`] with places to keep `w` packed for AMX (bf16 mode) or converted to f32 (f32
/// mode's GEMMs, [`super::wide`]), so that happens once, and an optional ReLU fused into the
/// output pass.
#[allow(clippy::too_many_arguments)]
pub fn linear_cached(
    mode: MatmulMode,
    x: &[f32],
    w: &[f16],
    packed: Option<&OnceLock<Vec<u16>>>,
    wide: Option<&super::wide::WideCell>,
    bias: Option<&[f16]>,
    relu: bool,
    n: usize,
    k: usize,
    m: usize,
    out: &mut [f32],
) {
    let mut part = Part {
        w,
        m,
        bias,
        relu,
        packed,
        wide,
        out,
    };
    linear_group(mode, x, n, k, std::slice::from_mut(&mut part));
}

/// One product of a [`linear_group`]: `out[n, m] = act(x W^T + bias)`, with the places where
/// `w` is kept packed or converted (see [`linear_cached`]).
pub struct Part<'a> {
    pub w: &'a [f16],
    pub m: usize,
    pub bias: Option<&'a [f16]>,
    pub relu: bool,
    pub packed: Option<&'a OnceLock<Vec<u16>>>,
    pub wide: Option<&'a super::wide::WideCell>,
    pub out: &'a mut [f32],
}

/// Several products of the same `x` (`[n, k]`), such as attention's q, k and v. With few rows
/// they run as one matrix-vector pass over all the weights: one parallel loop instead of three,
/// and each core reads one longer stream (a decode step's 768-wide products ran at 10 GB/s
/// one by one and 15 GB/s fused, at OPT-125m shapes on 2 cores).
pub fn linear_group(mode: MatmulMode, x: &[f32], n: usize, k: usize, parts: &mut [Part<'_>]) {
    assert_eq!(x.len(), n * k);
    for p in parts.iter() {
        assert_eq!(p.w.len(), p.m * k);
        assert_eq!(p.out.len(), n * p.m);
        if let Some(b) = p.bias {
            assert_eq!(b.len(), p.m);
        }
    }
    if n == 0 {
        return;
    }
    // AMX tiles use each weight 16 times per instruction: from a handful of rows on, they
    // beat the fp16 matrix-vector kernel, whose FMAs limit it at 8-16 rows
    let amx = mode == MatmulMode::Bf16 && n > AMX_MIN_ROWS && super::amx::available();
    if !amx && n <= MATVEC_MAX_ROWS {
        return matvec(x, n, k, parts);
    }
    for p in parts.iter_mut() {
        if !amx && mode == MatmulMode::F32 && n <= FRESH_MATVEC_MAX_ROWS && !keeps_f32(p) {
            matvec(x, n, k, std::slice::from_mut(p));
        } else {
            many_rows(mode, amx, x, n, k, p);
        }
    }
}

/// Rows up to which the matrix-vector path beats the f32 GEMM when the weight has no f32 copy
/// (a weight fetched from an offload tier, or past the copies' budget): the GEMM then converts
/// the whole weight for one product. Measured with `--example thin_products` (fresh weights),
/// matrix-vector against GEMM: 4096 x 16384 at 64 rows 43 against 64-67 ms, at 96 rows 63
/// against 73-77 ms, at 128 rows 90 against 84-90 ms; 768 x 3072 at 96 rows 1.9 ms both ways.
const FRESH_MATVEC_MAX_ROWS: usize = 96;

/// Whether the f32 GEMM would find (or make and keep) an f32 copy of the weight.
fn keeps_f32(p: &Part<'_>) -> bool {
    p.wide.is_some_and(|c| !matches!(c.get(), Some(None)))
}

/// One product on the paths for many rows: AMX, bf16 dot products, or the f32 GEMM.
fn many_rows(mode: MatmulMode, amx: bool, x: &[f32], n: usize, k: usize, p: &mut Part<'_>) {
    let (w, m) = (p.w, p.m);
    if m == 0 {
        return;
    }
    let bias: Option<Vec<f32>> = p.bias.map(|b| b.iter().map(|v| v.to_f32()).collect());
    let out = &mut *p.out;
    if amx {
        let b = bias.as_deref();
        match p.packed {
            Some(cell) => {
                let wp = cell.get_or_init(|| super::amx::pack_w(w, m, k));
                super::amx::linear(x, wp, b, p.relu, n, k, m, out)
            }
            None => super::amx::linear(x, &super::amx::pack_w(w, m, k), b, p.relu, n, k, m, out),
        }
        return;
    }
    if mode == MatmulMode::Bf16 && super::bf16::available() {
        super::bf16::linear(x, w, n, k, m, out);
    } else {
        let wf = p.wide.and_then(|c| super::wide::get(c, w));
        gemm_f32(x, w, wf, n, k, m, out);
    }
    add_bias_act(out, m, p.bias, p.relu);
}

/// Bias and ReLU in one pass over a product's `[n, m]` output (the paths that do not fuse them).
pub(super) fn add_bias_act(out: &mut [f32], m: usize, bias: Option<&[f16]>, relu: bool) {
    if bias.is_none() && !relu {
        return;
    }
    let b: Vec<f32> = bias.map_or(Vec::new(), |b| b.iter().map(|v| v.to_f32()).collect());
    out.par_chunks_mut(m)
        .for_each(|row| super::simd::bias_act(row, &b, relu));
}

/// The definition, one f32 (f64-free, sequential) dot product per output.
pub fn linear_reference(
    x: &[f32],
    w: &[f16],
    bias: Option<&[f16]>,
    n: usize,
    k: usize,
    m: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for i in 0..n {
        for j in 0..m {
            let mut acc = 0f64;
            for p in 0..k {
                acc += x[i * k + p] as f64 * w[j * k + p].to_f64();
            }
            out[i * m + j] = acc as f32 + bias.map_or(0.0, |b| b[j].to_f32());
        }
    }
    out
}

/// Output columns per GEMM task at least: below this a task's product is too thin to run well.
const GEMM_MIN_COLS: usize = 64;

/// `wf`: `w` already in f32, when kept; else each task converts its block.
fn gemm_f32(
    x: &[f32],
    w: &[f16],
    wf: Option<&[f32]>,
    n: usize,
    k: usize,
    m: usize,
    out: &mut [f32],
) {
    // One task per thread, each owning a contiguous block of W's rows (output columns): it
    // converts its block to f32 and runs a single-threaded GEMM on it. Measured at OPT-125m
    // prefill shapes (512 rows), this beats one GEMM split by the crate's own parallelism by
    // 25-35% on the 768-wide products: each thread packs only its half of W, and converts it
    // while it is still in cache.
    let parts = rayon::current_num_threads().min(m / GEMM_MIN_COLS).max(1);
    let cols = m.div_ceil(parts);
    let ptr = SharedOut(out.as_mut_ptr());
    (0..m.div_ceil(cols)).into_par_iter().for_each(|c| {
        let j0 = c * cols;
        let mc = cols.min(m - j0);
        let block = j0 * k..(j0 + mc) * k;
        let mut converted = Vec::new();
        let wf: &[f32] = match wf {
            Some(all) => &all[block],
            None => {
                let wb = &w[block];
                // a recycled buffer: a fresh one would be page faults and zeroing every time
                converted =
                    super::pool::take_f32(wb.len()).unwrap_or_else(|_| vec![0f32; wb.len()]);
                super::convert::f16_to_f32(wb, &mut converted);
                &converted
            }
        };
        // SAFETY: x covers n*k values, wf mc*k, and the output n*m (asserted in
        // `linear_cached`); this task writes only columns j0..j0+mc, disjoint from the others'.
        unsafe { gemm_wt(x, wf, n, k, mc, ptr, m, j0) };
        super::pool::give_f32(converted);
    });
}

/// `out[:, j0 .. j0 + mc] = x w^T` on one thread: `x` `[n, k]`, `w` `mc` rows of `k` f32 values
/// (a block of a weight), `out` `n` rows of `m` values; `w^T` is read through strides (element
/// (p, j) is `w[j * k + p]`), so the block is never transposed.
///
/// # Safety
/// `out` points to `n * m` values, `j0 + mc <= m`, `x` holds `n * k` and `w` `mc * k` values,
/// and no other thread writes columns `j0 .. j0 + mc` meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_wt(
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    mc: usize,
    out: SharedOut,
    m: usize,
    j0: usize,
) {
    // SAFETY: the caller's contract bounds every element the strides reach.
    unsafe {
        gemm::gemm(
            n,
            mc,
            k,
            out.ptr().add(j0),
            1,
            m as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Rows of `W` per rayon task of the matrix-vector path: large contiguous blocks keep each
/// core's weight reads one sequential stream (what the hardware prefetchers follow best), while
/// a few tasks per thread still balance the load when a core is busy elsewhere.
const MATVEC_TASKS_PER_THREAD: usize = 2;

/// The matrix-vector path of [`linear_group`]: the weights of all parts, one after another,
/// split into contiguous blocks of rows, one per task; each task adds the bias and ReLU to the
/// columns it wrote while they are in cache.
fn matvec(x: &[f32], n: usize, k: usize, parts: &mut [Part<'_>]) {
    let total: usize = parts.iter().map(|p| p.m).sum();
    let tasks = (rayon::current_num_threads() * MATVEC_TASKS_PER_THREAD).max(1);
    // even row counts keep the kernel's two-row pairs whole; at least 16 rows per task
    let rows = total.div_ceil(tasks).next_multiple_of(2).max(16);
    let views: Vec<_> = parts
        .iter_mut()
        .map(|p| {
            let bias: Option<Vec<f32>> = p.bias.map(|b| b.iter().map(|v| v.to_f32()).collect());
            (p.w, p.m, bias, p.relu, SharedOut(p.out.as_mut_ptr()))
        })
        .collect();
    (0..total.div_ceil(rows)).into_par_iter().for_each(|c| {
        let (g0, g1) = (c * rows, ((c + 1) * rows).min(total));
        let mut first = 0;
        for (w, m, bias, relu, out) in &views {
            let (w, m, out) = (*w, *m, *out);
            let (j0, j1) = (g0.max(first), g1.min(first + m));
            first += m;
            if j0 >= j1 {
                continue;
            }
            let (j0, j1) = (j0 - (first - m), j1 - (first - m));
            // SAFETY: task c writes only columns j0..j1 of this part's n x m output, disjoint
            // from other tasks'; the pointer covers n*m values (asserted in `linear_group`),
            // and the output is borrowed mutably for the whole parallel loop.
            unsafe { matvec_block(w, x, n, k, m, j0, j1, out) };
            if bias.is_some() || *relu {
                let b = bias.as_deref().map_or(&[][..], |b| &b[j0..j1]);
                for i in 0..n {
                    // SAFETY: as above: row i's columns j0..j1 are this task's alone
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(out.ptr().add(i * m + j0), j1 - j0)
                    };
                    super::simd::bias_act(row, b, *relu);
                }
            }
        }
    });
}

/// `dst[i] = dot(w_row, x[i])` for the n rows of x.
#[inline]
fn matvec_row(row: &[f16], x: &[f32], k: usize, dst: &mut [f32]) {
    let mut buf = [0f32; 256];
    dst.iter_mut().for_each(|d| *d = 0.0);
    for p0 in (0..k).step_by(256) {
        let len = (k - p0).min(256);
        row[p0..p0 + len].convert_to_f32_slice(&mut buf[..len]);
        for (i, d) in dst.iter_mut().enumerate() {
            *d += super::simd::dot(&buf[..len], &x[i * k + p0..i * k + p0 + len]);
        }
    }
}

/// `out[i * m + j] = dot(w[j], x[i])` for outputs `j0..j1` and all n rows of x.
///
/// # Safety
/// `out` must point to `n * m` values, and no other thread may touch columns `j0..j1` of them.
#[allow(clippy::too_many_arguments)]
unsafe fn matvec_block(
    w: &[f16],
    x: &[f32],
    n: usize,
    k: usize,
    m: usize,
    j0: usize,
    j1: usize,
    out: SharedOut,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: avx512f is present (checked at run time); w holds m*k values and x n*k
            // (asserted in `linear_cached`); the output contract is the caller's.
            unsafe { avx512::matvec_block(w, x, n, k, m, j0, j1, out.ptr()) };
            return;
        }
    }
    let mut dst = vec![0f32; n];
    for j in j0..j1 {
        matvec_row(&w[j * k..(j + 1) * k], x, k, &mut dst);
        for (i, v) in dst.iter().enumerate() {
            // SAFETY: (i, j) is inside the n x m output and in this task's columns
            unsafe { *out.ptr().add(i * m + j) = *v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {

    use half::f16;
    use std::arch::x86_64::*;

    /// Two weight rows x `R` rows of x per pass: each converted 16-value slice of a weight row
    /// is used `R` times and each loaded slice of x twice, with all 2R accumulators in
    /// registers (R is a constant).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const R: usize>(
        w: &[f16],
        x: &[f32],
        k: usize,
        i0: usize,
        j: usize,
        two: bool,
        prefetch: bool,
        out: &mut [[f32; 2]; 8],
    ) {
        let full = k / 16;
        let mut a0 = [_mm512_setzero_ps(); R];
        let mut a1 = [_mm512_setzero_ps(); R];
        let w0 = w.as_ptr().add(j * k) as *const u8;
        let w1 = if two {
            w.as_ptr().add((j + 1) * k) as *const u8
        } else {
            w0
        };
        let xp = x.as_ptr().add(i0 * k);
        // prefetch two pairs of rows ahead (a pair is 4k bytes) into L2: far enough to cover
        // memory latency at a core's share of the bandwidth, and L2 requests do not take the
        // fill buffers the loads need (measured: T1 at two pairs beat T0 and other distances)
        let ahead = 8 * k;
        for c in 0..full {
            if prefetch && c % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T1>(w0.add(c * 32 + ahead) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(w1.add(c * 32 + ahead) as *const i8);
            }
            let v0 = _mm512_cvtph_ps(_mm256_loadu_si256(w0.add(c * 32) as *const __m256i));
            let v1 = _mm512_cvtph_ps(_mm256_loadu_si256(w1.add(c * 32) as *const __m256i));
            for r in 0..R {
                let xv = _mm512_loadu_ps(xp.add(r * k + c * 16));
                a0[r] = _mm512_fmadd_ps(v0, xv, a0[r]);
                a1[r] = _mm512_fmadd_ps(v1, xv, a1[r]);
            }
        }
        for r in 0..R {
            let (mut s0, mut s1) = (_mm512_reduce_add_ps(a0[r]), _mm512_reduce_add_ps(a1[r]));
            for p in full * 16..k {
                let xv = *x.get_unchecked((i0 + r) * k + p);
                s0 += w.get_unchecked(j * k + p).to_f32() * xv;
                if two {
                    s1 += w.get_unchecked((j + 1) * k + p).to_f32() * xv;
                }
            }
            out[r] = [s0, s1];
        }
    }

    /// Four weight rows x `R` rows of x per pass (R <= 6, 4R accumulators): for more than 8
    /// rows of x, each loaded slice of x feeds four FMAs instead of two, which halves the
    /// traffic from L2 once the rows of x no longer fit L1.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel4<const R: usize>(
        w: &[f16],
        x: &[f32],
        k: usize,
        i0: usize,
        j: usize,
        prefetch: bool,
        out: &mut [[f32; 4]; 6],
    ) {
        let full = k / 16;
        let mut a = [[_mm512_setzero_ps(); 4]; R];
        let wp: [*const u8; 4] = std::array::from_fn(|q| w.as_ptr().add((j + q) * k) as *const u8);
        let xp = x.as_ptr().add(i0 * k);
        // the next four rows (8k bytes on), as the pair kernel's two pairs ahead
        let ahead = 8 * k;
        for c in 0..full {
            if prefetch && c % 2 == 0 {
                for p in wp {
                    _mm_prefetch::<_MM_HINT_T1>(p.add(c * 32 + ahead) as *const i8);
                }
            }
            let v: [__m512; 4] = std::array::from_fn(|q| {
                _mm512_cvtph_ps(_mm256_loadu_si256(wp[q].add(c * 32) as *const __m256i))
            });
            for (r, ar) in a.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(xp.add(r * k + c * 16));
                for (acc, vq) in ar.iter_mut().zip(&v) {
                    *acc = _mm512_fmadd_ps(*vq, xv, *acc);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (q, acc) in ar.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(*acc);
                for p in full * 16..k {
                    s += w.get_unchecked((j + q) * k + p).to_f32()
                        * *x.get_unchecked((i0 + r) * k + p);
                }
                out[r][q] = s;
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matvec_block(
        w: &[f16],
        x: &[f32],
        n: usize,
        k: usize,
        m: usize,
        j0: usize,
        j1: usize,
        dst: *mut f32,
    ) {
        let mut j = j0;
        let mut out = [[0f32; 2]; 8];
        let mut out4 = [[0f32; 4]; 6];
        while j < j1 {
            if n > 8 && j + 4 <= j1 {
                let mut i0 = 0;
                while i0 < n {
                    let rows = (n - i0).min(6);
                    let pf = i0 == 0 && j + 8 <= j1;
                    match rows {
                        1 => kernel4::<1>(w, x, k, i0, j, pf, &mut out4),
                        2 => kernel4::<2>(w, x, k, i0, j, pf, &mut out4),
                        3 => kernel4::<3>(w, x, k, i0, j, pf, &mut out4),
                        4 => kernel4::<4>(w, x, k, i0, j, pf, &mut out4),
                        5 => kernel4::<5>(w, x, k, i0, j, pf, &mut out4),
                        _ => kernel4::<6>(w, x, k, i0, j, pf, &mut out4),
                    }
                    for (r, o) in out4.iter().enumerate().take(rows) {
                        for (q, v) in o.iter().enumerate() {
                            *dst.add((i0 + r) * m + j + q) = *v;
                        }
                    }
                    i0 += rows;
                }
                j += 4;
                continue;
            }
            let two = j + 1 < j1;
            let mut i0 = 0;
            while i0 < n {
                let rows = (n - i0).min(8);
                // the first pass over a pair of rows reads them from memory: it prefetches the
                // next pair; later passes (more than 8 rows of x) find them in L1
                let pf = i0 == 0 && j + 3 < j1;
                match rows {
                    1 => kernel::<1>(w, x, k, i0, j, two, pf, &mut out),
                    2 => kernel::<2>(w, x, k, i0, j, two, pf, &mut out),
                    3 => kernel::<3>(w, x, k, i0, j, two, pf, &mut out),
                    4 => kernel::<4>(w, x, k, i0, j, two, pf, &mut out),
                    5 => kernel::<5>(w, x, k, i0, j, two, pf, &mut out),
                    6 => kernel::<6>(w, x, k, i0, j, two, pf, &mut out),
                    7 => kernel::<7>(w, x, k, i0, j, two, pf, &mut out),
                    _ => kernel::<8>(w, x, k, i0, j, two, pf, &mut out),
                }
                for (r, o) in out.iter().enumerate().take(rows) {
                    *dst.add((i0 + r) * m + j) = o[0];
                    if two {
                        *dst.add((i0 + r) * m + j + 1) = o[1];
                    }
                }
                i0 += rows;
            }
            j += if two { 2 } else { 1 };
        }
    }
}
