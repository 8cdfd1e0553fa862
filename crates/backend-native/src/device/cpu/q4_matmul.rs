//! Matrix products with 4-bit compressed weights: `out = x W^T + b` with `x` f32 `[n, k]` and
//! `W` `[m, k]` in [`crate::compress`]'s form, grouped along the output dimension (each group:
//! 64 output rows, one `(scale, min)` per input column). No f32 or fp16 copy of a whole weight
//! is ever made.
//!
//! - Few rows (decode): one pass over the packed bytes. For group `g`, with `xs = x * (1 / scale)`
//!   per column and `beta = x · min`, every output row is `sum_c q[j, c] xs[c] + beta`: the
//!   codes meet `x` directly (16 per instruction on AVX-512, each byte feeding the two rows it
//!   holds), so a decode step reads 0.56 bytes per weight instead of fp16's 2.
//! - Many rows (prefill): each group of 64 rows is decoded into an f32 panel that stays in the
//!   core's cache and multiplied there by the GEMM crate (f32 mode), or larger panels into fp16
//!   for the bf16 mode's AMX or AVX-512 BF16 products.
//!
//! [`linear_reference`] is the slow version both are tested against.

use half::f16;
use rayon::prelude::*;

use super::matmul::MatmulMode;
use super::q4::{group_factors, Simd};
use super::shared_out::SharedOut;
use crate::compress::{Q4Layout, GROUP, GROUP_BYTES};

/// Rows of `x` up to which the one-pass kernel runs; more take the panels. The kernel reads each
/// group's codes once per 8 rows of `x` (from cache after the first), the panels decode every
/// weight once and pay the GEMM crate's packing: measured with `--example q4_products` at
/// 2048 x 8192, 64 rows took 9 against 20 ms, 128 rows 46 against 25.
pub const MATVEC_MAX_ROWS: usize = 96;

/// One product of a [`linear_group`]: `out[n, m] = act(x W^T + bias)` with `w` the stored bytes
/// of a compressed `[m, k]` weight.
pub struct Q4Part<'a> {
    pub w: &'a [u8],
    pub m: usize,
    pub bias: Option<&'a [f16]>,
    pub relu: bool,
    pub out: &'a mut [f32],
}

/// Several products of the same `x` (`[n, k]`), as [`super::matmul::linear_group`] for fp16
/// weights.
pub fn linear_group(
    mode: MatmulMode,
    simd: Simd,
    x: &[f32],
    n: usize,
    k: usize,
    parts: &mut [Q4Part<'_>],
) {
    assert_eq!(x.len(), n * k);
    for p in parts.iter() {
        assert_eq!(p.w.len(), Q4Layout::new(&[p.m, k], 0).bytes());
        assert_eq!(p.out.len(), n * p.m);
        assert!(p.bias.is_none_or(|b| b.len() == p.m));
    }
    if n == 0 || k == 0 {
        return;
    }
    if n <= MATVEC_MAX_ROWS {
        return matvec(simd, x, n, k, parts);
    }
    for p in parts.iter_mut() {
        if mode == MatmulMode::Bf16 && (super::amx::available() || super::bf16::available()) {
            panels_bf16(simd, x, n, k, p);
        } else {
            panels_f32(simd, x, n, k, p);
        }
        super::matmul::add_bias_act(p.out, p.m, p.bias, p.relu);
    }
}

/// The definition: the weight decoded by the element-by-element reference, then one f64 dot
/// product per output.
pub fn linear_reference(
    x: &[f32],
    w: &[u8],
    bias: Option<&[f16]>,
    n: usize,
    k: usize,
    m: usize,
) -> Vec<f32> {
    let wf = crate::compress::reference::decompress(w, &[m, k], 0);
    let mut out = vec![0f32; n * m];
    for i in 0..n {
        for j in 0..m {
            let acc: f64 = (0..k)
                .map(|c| x[i * k + c] as f64 * wf[j * k + c] as f64)
                .sum();
            out[i * m + j] = acc as f32 + bias.map_or(0.0, |b| b[j].to_f32());
        }
    }
    out
}

/// Per-task scratch of the one-pass kernel: `x` scaled by a group's `1 / scale`, and the
/// group's factors.
struct Scratch {
    xs: Vec<f32>,
    inv: Vec<f32>,
    min: Vec<f32>,
    beta: Vec<f32>,
}

/// The one-pass path: the groups of all parts one after another, split into contiguous runs,
/// one per task; each task adds the bias and ReLU to the columns it wrote.
fn matvec(simd: Simd, x: &[f32], n: usize, k: usize, parts: &mut [Q4Part<'_>]) {
    let views: Vec<_> = parts
        .iter_mut()
        .map(|p| {
            let bias: Option<Vec<f32>> = p.bias.map(|b| b.iter().map(|v| v.to_f32()).collect());
            (p.w, p.m, bias, p.relu, SharedOut(p.out.as_mut_ptr()))
        })
        .collect();
    let groups: Vec<usize> = views.iter().map(|v| v.1.div_ceil(GROUP)).collect();
    let total: usize = groups.iter().sum();
    let tasks = (rayon::current_num_threads() * 2).max(1);
    let per = total.div_ceil(tasks).max(1);
    (0..total.div_ceil(per)).into_par_iter().for_each(|t| {
        let mut s = Scratch {
            xs: vec![0f32; n * k],
            inv: vec![0f32; k],
            min: vec![0f32; k],
            beta: vec![0f32; n],
        };
        for gg in t * per..((t + 1) * per).min(total) {
            // the part and its own group
            let (mut pi, mut g) = (0, gg);
            while g >= groups[pi] {
                g -= groups[pi];
                pi += 1;
            }
            let (w, m, bias, relu, out) = &views[pi];
            let l = Q4Layout::new(&[*m, k], 0);
            group_factors(w, l, g, &mut s.inv, &mut s.min);
            for i in 0..n {
                let xi = &x[i * k..(i + 1) * k];
                super::simd::mul(&mut s.xs[i * k..(i + 1) * k], xi, &s.inv);
                s.beta[i] = super::simd::dot(xi, &s.min);
            }
            let rows = GROUP.min(m - g * GROUP);
            let data = &w[g * GROUP_BYTES * k..(g + 1) * GROUP_BYTES * k];
            // SAFETY: this task alone writes rows g*64 .. g*64+rows of every row of x in this
            // part's output (n x m values, asserted in `linear_group`).
            unsafe { group_product(simd, data, k, &s, n, rows, *out, *m, g * GROUP) };
            if bias.is_some() || *relu {
                let j0 = g * GROUP;
                let b = bias.as_deref().map_or(&[][..], |b| &b[j0..j0 + rows]);
                for i in 0..n {
                    // SAFETY: as above: row i's columns j0..j0+rows are this task's alone
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(out.ptr().add(i * m + j0), rows) };
                    super::simd::bias_act(row, b, *relu);
                }
            }
        }
    });
}

/// `out[i, j0 + r] = sum_c q[r, c] xs[i, c] + beta[i]` for the group's `rows` valid rows.
///
/// # Safety
/// `out` points to `n * m` values and no other thread writes rows `j0 .. j0 + rows` of them.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn group_product(
    simd: Simd,
    data: &[u8],
    k: usize,
    s: &Scratch,
    n: usize,
    rows: usize,
    out: SharedOut,
    m: usize,
    j0: usize,
) {
    let put = |i: usize, r: usize, v: f32| {
        if r < rows {
            // SAFETY: (i, j0 + r) is inside the output and in this task's rows (the caller's
            // contract)
            unsafe { *out.ptr().add(i * m + j0 + r) = v + s.beta[i] };
        }
    };
    let pairs = rows.div_ceil(2);
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 {
        // rows of x in chunks of at most 8, packed rows 4, 2 or 1 at a time: at most 16
        // accumulators
        let mut i0 = 0;
        while i0 < n {
            let nn = (n - i0).min(8);
            let mut r = 0;
            while r < pairs {
                let take = match nn {
                    1 | 2 => 4,
                    3 | 4 => 2,
                    _ => 1,
                }
                .min(pairs - r);
                let mut acc = [[0f32; 8]; 8];
                // SAFETY: avx512f is present (Simd::Avx512 comes from detection); the kernel
                // reads packed rows r .. r + take (k bytes each) of `data` and nn rows of k
                // values of xs from i0.
                unsafe {
                    avx512::dispatch(data, k, &s.xs[i0 * k..], nn, r, take, &mut acc);
                }
                for p in 0..take {
                    for i in 0..nn {
                        put(i0 + i, 2 * (r + p), acc[2 * p][i]);
                        put(i0 + i, 2 * (r + p) + 1, acc[2 * p + 1][i]);
                    }
                }
                r += take;
            }
            i0 += nn;
        }
        return;
    }
    for r in 0..pairs {
        let row = &data[r * k..(r + 1) * k];
        for i in 0..n {
            let (hi, lo) = super::simd::nibble_dots(row, &s.xs[i * k..(i + 1) * k]);
            put(i, 2 * r, hi);
            put(i, 2 * r + 1, lo);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Bytes ahead of the current column that the kernel prefetches in each packed row.
    const PREFETCH: usize = 512;

    /// `acc[2p][i]`, `acc[2p + 1][i]`: packed row `r + p`'s high and low codes dotted with row
    /// `i` of `xs`, for `P` packed rows and `N` rows of `xs`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn kernel<const N: usize, const P: usize>(
        data: &[u8],
        k: usize,
        xs: &[f32],
        r: usize,
        acc: &mut [[f32; 8]; 8],
    ) {
        let full = k / 16;
        let mut a = [[[_mm512_setzero_ps(); N]; 2]; P];
        let codes = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let d = data.as_ptr().add(r * k);
        let x = xs.as_ptr();
        for c in 0..full {
            // each packed row is a stream of its own, k bytes apart: the hardware prefetchers
            // follow one stream well and several interleaved ones badly, so fetch each a few
            // lines ahead
            if c % 4 == 0 {
                for p in 0..P {
                    _mm_prefetch::<_MM_HINT_T0>(d.add(p * k + c * 16 + PREFETCH) as *const i8);
                }
            }
            // per byte b = 16 hi + lo: the whole byte (one conversion) and the low nibble (one
            // table lookup, which reads only an index's low 4 bits), and the high nibble's sum
            // recovered at the end as (sum b - sum lo) / 16: one instruction per 16 bytes fewer
            // than converting both nibbles, with the same rounding error relative to sum hi
            let mut whole = [_mm512_setzero_ps(); P];
            let mut lo = [_mm512_setzero_ps(); P];
            for p in 0..P {
                let v =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(d.add(p * k + c * 16) as *const __m128i));
                whole[p] = _mm512_cvtepi32_ps(v);
                lo[p] = _mm512_permutexvar_ps(v, codes);
            }
            for i in 0..N {
                let xv = _mm512_loadu_ps(x.add(i * k + c * 16));
                for p in 0..P {
                    a[p][0][i] = _mm512_fmadd_ps(whole[p], xv, a[p][0][i]);
                    a[p][1][i] = _mm512_fmadd_ps(lo[p], xv, a[p][1][i]);
                }
            }
        }
        for p in 0..P {
            for i in 0..N {
                let (sb, mut sl) = (
                    _mm512_reduce_add_ps(a[p][0][i]),
                    _mm512_reduce_add_ps(a[p][1][i]),
                );
                let mut sh = (sb - sl) * (1.0 / 16.0);
                for c in full * 16..k {
                    let b = *data.get_unchecked((r + p) * k + c);
                    let xv = *xs.get_unchecked(i * k + c);
                    sh += (b >> 4) as f32 * xv;
                    sl += (b & 0xF) as f32 * xv;
                }
                acc[2 * p][i] = sh;
                acc[2 * p + 1][i] = sl;
            }
        }
    }

    /// [`kernel`] for `n` (1..=8) rows of `xs` and `p` (1, 2 or 4) packed rows.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dispatch(
        data: &[u8],
        k: usize,
        xs: &[f32],
        n: usize,
        r: usize,
        p: usize,
        acc: &mut [[f32; 8]; 8],
    ) {
        macro_rules! by_n {
            ($p:literal) => {
                match n {
                    1 => kernel::<1, $p>(data, k, xs, r, acc),
                    2 => kernel::<2, $p>(data, k, xs, r, acc),
                    3 => kernel::<3, $p>(data, k, xs, r, acc),
                    4 => kernel::<4, $p>(data, k, xs, r, acc),
                    5 => kernel::<5, $p>(data, k, xs, r, acc),
                    6 => kernel::<6, $p>(data, k, xs, r, acc),
                    7 => kernel::<7, $p>(data, k, xs, r, acc),
                    _ => kernel::<8, $p>(data, k, xs, r, acc),
                }
            };
        }
        match p {
            4 => by_n!(4),
            2 => by_n!(2),
            _ => by_n!(1),
        }
    }

    /// Rows `2r`, `2r + 1` of a group decoded into f32: `q * inv + min` per column.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn decode_pair(
        row: &[u8],
        inv: &[f32],
        min: &[f32],
        even: &mut [f32],
        odd: &mut [f32],
    ) {
        let k = row.len();
        let low = _mm512_set1_epi32(0xF);
        for c in 0..k / 16 {
            let v =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(row.as_ptr().add(c * 16) as *const __m128i));
            let s = _mm512_loadu_ps(inv.as_ptr().add(c * 16));
            let m = _mm512_loadu_ps(min.as_ptr().add(c * 16));
            let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v));
            let lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
            _mm512_storeu_ps(even.as_mut_ptr().add(c * 16), _mm512_fmadd_ps(hi, s, m));
            _mm512_storeu_ps(odd.as_mut_ptr().add(c * 16), _mm512_fmadd_ps(lo, s, m));
        }
        for c in k / 16 * 16..k {
            even[c] = (row[c] >> 4) as f32 * inv[c] + min[c];
            odd[c] = (row[c] & 0xF) as f32 * inv[c] + min[c];
        }
    }
}

/// Group `g`'s valid rows of a compressed `[m, k]` weight decoded into `panel` (`rows x k`).
fn decode_group(simd: Simd, w: &[u8], l: Q4Layout, g: usize, s: &mut Scratch, panel: &mut [f32]) {
    let k = l.inner;
    let rows = GROUP.min(l.len - g * GROUP);
    group_factors(w, l, g, &mut s.inv, &mut s.min);
    let data = &w[g * GROUP_BYTES * k..(g + 1) * GROUP_BYTES * k];
    for r in 0..rows.div_ceil(2) {
        let row = &data[r * k..(r + 1) * k];
        let (even, rest) = panel[2 * r * k..].split_at_mut(k);
        // a partial group's last pair may have no odd row: decode it into scratch
        let odd: &mut [f32] = if 2 * r + 1 < rows {
            &mut rest[..k]
        } else {
            &mut s.xs[..k]
        };
        #[cfg(target_arch = "x86_64")]
        if simd == Simd::Avx512 {
            // SAFETY: avx512f is present; all slices hold k values.
            unsafe { avx512::decode_pair(row, &s.inv, &s.min, even, odd) };
            continue;
        }
        super::simd::decode_nibbles(row, &s.inv, &s.min, even, odd);
    }
}

/// Bytes of f32 a panel of the f32 mode holds at most: whole groups, enough of them that the
/// GEMM crate's per-call cost (packing buffers, fresh pages) is spread over many columns, few
/// enough to stay in the caches (64 rows x k=2048 per call ran at a fifth of the fp16 GEMM's
/// rate, 512 rows at about its rate).
const F32_PANEL_BYTES: usize = 4 << 20;

/// The f32 mode's many-row product: each task owns a run of groups and decodes a panel of them
/// at a time into f32 (in its core's caches), which the GEMM crate multiplies `x` by straight
/// into the output's columns.
fn panels_f32(simd: Simd, x: &[f32], n: usize, k: usize, p: &mut Q4Part<'_>) {
    let (w, m) = (p.w, p.m);
    let l = Q4Layout::new(&[m, k], 0);
    let groups = l.groups();
    let per_panel = (F32_PANEL_BYTES / (4 * GROUP * k)).clamp(1, 8);
    let tasks = rayon::current_num_threads().max(1);
    let per = groups.div_ceil(tasks).max(1);
    let dst = SharedOut(p.out.as_mut_ptr());
    (0..groups.div_ceil(per)).into_par_iter().for_each(|t| {
        let mut s = Scratch {
            xs: vec![0f32; k],
            inv: vec![0f32; k],
            min: vec![0f32; k],
            beta: Vec::new(),
        };
        let (g_end, mut g0) = (((t + 1) * per).min(groups), t * per);
        let mut panel = vec![0f32; per_panel.min(g_end - g0) * GROUP * k];
        while g0 < g_end {
            let g1 = (g0 + per_panel).min(g_end);
            let (r0, r1) = (g0 * GROUP, (g1 * GROUP).min(m));
            for g in g0..g1 {
                let at = (g - g0) * GROUP * k;
                decode_group(simd, w, l, g, &mut s, &mut panel[at..]);
            }
            // SAFETY: x holds n*k values, the panel (r1-r0)*k, the output n*m (asserted in
            // `linear_group`); this task writes only columns r0..r1.
            unsafe { super::matmul::gemm_wt(x, &panel, n, k, r1 - r0, dst, m, r0) };
            g0 = g1;
        }
    });
}

/// Bytes of fp16 a bf16-mode panel holds at most: large enough that rounding `x` to bf16 again
/// for every panel costs little against the product, small enough to stay in the L2 caches.
const BF16_PANEL_BYTES: usize = 4 << 20;

/// The bf16 mode's many-row product: panels of whole groups decoded into fp16 and multiplied by
/// the AMX or AVX-512 BF16 kernels (which parallelize over the panel themselves).
fn panels_bf16(simd: Simd, x: &[f32], n: usize, k: usize, p: &mut Q4Part<'_>) {
    let (w, m) = (p.w, p.m);
    let l = Q4Layout::new(&[m, k], 0);
    let per_panel = (BF16_PANEL_BYTES / (2 * GROUP * k)).max(1);
    let mut tmp = Vec::new();
    for g0 in (0..l.groups()).step_by(per_panel) {
        let g1 = (g0 + per_panel).min(l.groups());
        let (r0, r1) = (g0 * GROUP, (g1 * GROUP).min(m));
        let rows = r1 - r0;
        let mut wf = vec![0f32; rows * k];
        wf.par_chunks_mut(GROUP * k)
            .enumerate()
            .for_each(|(i, panel)| {
                let mut s = Scratch {
                    xs: vec![0f32; k],
                    inv: vec![0f32; k],
                    min: vec![0f32; k],
                    beta: Vec::new(),
                };
                decode_group(simd, w, l, g0 + i, &mut s, panel);
            });
        let mut wh = vec![f16::ZERO; rows * k];
        super::convert::f32_to_f16(&wf, &mut wh);
        drop(wf);
        tmp.clear();
        tmp.resize(n * rows, 0f32);
        if super::amx::available() {
            let packed = super::amx::pack_w(&wh, rows, k);
            super::amx::linear(x, &packed, None, false, n, k, rows, &mut tmp);
        } else {
            super::bf16::linear(x, &wh, n, k, rows, &mut tmp);
        }
        for i in 0..n {
            p.out[i * m + r0..i * m + r1].copy_from_slice(&tmp[i * rows..(i + 1) * rows]);
        }
    }
}
