//! Attention over a 4-bit compressed KV cache (grouped along head_dim): every position's row is
//! its packed codes then its (scale, min) pairs ([`crate::compress::layout`]).
//!
//! Decode reads the codes in place, never a decoded copy: with `q` split into its even and odd
//! elements (the high and low nibbles of a byte), a key's score is
//! `sum_g (dot_g(codes, q) / scale_g + min_g * sum_g(q))`, and the weighted sum of values
//! accumulates `p / scale` times the codes plus `p * min` per group. The positions appended this
//! step (`fresh`, the exact f32 keys and values) are read from those rows instead of the cache,
//! as FlexLLMGen attends to a step's own keys before compressing them.
//!
//! Prefill decodes one (sequence, head) slab at a time into f32 and runs the dense path.

use super::q4::{decode_row, row_factors, Simd};
use crate::compress::{GROUP, GROUP_BYTES};

/// A (sequence, head) pair's new positions in the exact rows they were appended from: row `i`
/// (position `past + i`) at `k[at + i * stride ..][..d]`.
#[derive(Clone, Copy)]
pub struct Fresh<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub at: usize,
    pub stride: usize,
    pub past: usize,
}

impl Fresh<'_> {
    fn k_row(&self, j: usize, d: usize) -> &[f32] {
        &self.k[self.at + (j - self.past) * self.stride..][..d]
    }
    fn v_row(&self, j: usize, d: usize) -> &[f32] {
        &self.v[self.at + (j - self.past) * self.stride..][..d]
    }
}

/// Positions `0 .. t` of a pair's K or V as f32 (`t x d`): compressed rows decoded, fresh ones
/// copied.
pub fn slab(
    rows: &[u8],
    rb: usize,
    d: usize,
    t: usize,
    fresh: Option<(Fresh<'_>, bool)>,
    out: &mut Vec<f32>,
) {
    out.clear();
    out.resize(t * d, 0.0);
    for (j, o) in out.chunks_mut(d).enumerate() {
        match fresh {
            Some((f, is_k)) if j >= f.past => {
                o.copy_from_slice(if is_k { f.k_row(j, d) } else { f.v_row(j, d) })
            }
            _ => decode_row(&rows[j * rb..(j + 1) * rb], d, o),
        }
    }
}

/// `q` split by nibble: per group, the even elements, the odd ones (zero past `d`), and the
/// group's sum.
struct SplitQuery {
    even: Vec<f32>,
    odd: Vec<f32>,
    sums: Vec<f32>,
}

impl SplitQuery {
    fn new(q: &[f32], d: usize) -> SplitQuery {
        let groups = d.div_ceil(GROUP);
        let (mut even, mut odd) = (
            vec![0f32; groups * GROUP_BYTES],
            vec![0f32; groups * GROUP_BYTES],
        );
        let mut sums = vec![0f32; groups];
        for (i, &x) in q.iter().enumerate().take(d) {
            let (g, k) = (i / GROUP, (i % GROUP) / 2);
            if i % 2 == 0 {
                even[g * GROUP_BYTES + k] = x;
            } else {
                odd[g * GROUP_BYTES + k] = x;
            }
            sums[g] += x;
        }
        SplitQuery { even, odd, sums }
    }
}

/// One (sequence, head) pair with a single query (decode) over `t` positions: rows of the
/// compressed `k` and `v` slabs (`rb` bytes each) for positions before `fresh.past`, the fresh
/// rows after. `keep`: keys kept by sparse attention (`t`'s visible count = dense).
#[allow(clippy::too_many_arguments)]
pub fn decode_pair(
    simd: Simd,
    q: &[f32],
    k: &[u8],
    v: &[u8],
    rb: usize,
    fresh: Option<Fresh<'_>>,
    m: &[u32],
    t: usize,
    scale: f32,
    keep: usize,
) -> Vec<f32> {
    let d = q.len();
    let groups = d.div_ceil(GROUP);
    let sq = SplitQuery::new(q, d);
    let compressed = |j: usize| fresh.is_none_or(|f| j < f.past);
    let mut p = vec![0f32; t];
    for j in 0..t {
        if m[j] == 0 {
            continue;
        }
        p[j] = if compressed(j) {
            let row = &k[j * rb..(j + 1) * rb];
            score(simd, row, &sq, groups)
        } else {
            let f = fresh.expect("fresh rows past `past`");
            super::simd::dot(q, f.k_row(j, d))
        };
    }
    super::simd::softmax_row(&mut p, m, t, scale);
    let visible = m[..t].iter().filter(|&&x| x != 0).count();
    if keep < visible {
        super::sparse::keep_largest(&mut p, &m[..t], keep);
    }
    let mut even = vec![0f32; groups * GROUP_BYTES];
    let mut odd = vec![0f32; groups * GROUP_BYTES];
    let mut consts = vec![0f32; groups];
    let mut out = vec![0f32; d];
    for (j, &w) in p.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        if compressed(j) {
            let row = &v[j * rb..(j + 1) * rb];
            accumulate(simd, row, w, groups, &mut even, &mut odd, &mut consts);
        } else {
            let f = fresh.expect("fresh rows past `past`");
            super::simd::axpy(&mut out, w, f.v_row(j, d));
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        let (g, kk) = (i / GROUP, (i % GROUP) / 2);
        let codes = if i % 2 == 0 { &even } else { &odd };
        *o += codes[g * GROUP_BYTES + kk] + consts[g];
    }
    out
}

/// q · (a compressed key row).
#[inline]
fn score(simd: Simd, row: &[u8], q: &SplitQuery, groups: usize) -> f32 {
    let mut s = 0f32;
    for g in 0..groups {
        let codes = &row[g * GROUP_BYTES..(g + 1) * GROUP_BYTES];
        let (e, o) = (
            &q.even[g * GROUP_BYTES..(g + 1) * GROUP_BYTES],
            &q.odd[g * GROUP_BYTES..(g + 1) * GROUP_BYTES],
        );
        let dot = match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Simd::Avx512 comes from run-time detection; all slices hold 32 values.
            Simd::Avx512 => unsafe { avx512::group_dot(codes, e, o) },
            _ => {
                let (hi, _) = super::simd::nibble_dots(codes, e);
                let (_, lo) = super::simd::nibble_dots(codes, o);
                hi + lo
            }
        };
        let (inv, mn) = row_factors(row, groups, g);
        s += dot * inv + mn * q.sums[g];
    }
    s
}

/// The codes of a compressed value row times `w / scale` into `even` / `odd`, and `w * min` into
/// the group's constant.
#[inline]
fn accumulate(
    simd: Simd,
    row: &[u8],
    w: f32,
    groups: usize,
    even: &mut [f32],
    odd: &mut [f32],
    consts: &mut [f32],
) {
    for g in 0..groups {
        let (inv, mn) = row_factors(row, groups, g);
        let codes = &row[g * GROUP_BYTES..(g + 1) * GROUP_BYTES];
        let r = g * GROUP_BYTES..(g + 1) * GROUP_BYTES;
        let (e, o) = (&mut even[r.clone()], &mut odd[r]);
        match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `score`.
            Simd::Avx512 => unsafe { avx512::group_axpy(codes, w * inv, e, o) },
            _ => {
                let wi = w * inv;
                for (k, &b) in codes.iter().enumerate() {
                    e[k] += wi * (b >> 4) as f32;
                    o[k] += wi * (b & 0xF) as f32;
                }
            }
        }
        consts[g] += w * mn;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The 32 code bytes of a group as four vectors: high nibbles of bytes 0-15 and 16-31, low
    /// nibbles of the same.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn nibbles(codes: &[u8]) -> [__m512; 4] {
        let low = _mm512_set1_epi32(0xF);
        let a = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr() as *const __m128i));
        let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(16) as *const __m128i));
        [
            _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(a)),
            _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(b)),
            _mm512_cvtepi32_ps(_mm512_and_si512(a, low)),
            _mm512_cvtepi32_ps(_mm512_and_si512(b, low)),
        ]
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn group_dot(codes: &[u8], even: &[f32], odd: &[f32]) -> f32 {
        let [h0, h1, l0, l1] = nibbles(codes);
        let mut acc = _mm512_mul_ps(h0, _mm512_loadu_ps(even.as_ptr()));
        acc = _mm512_fmadd_ps(h1, _mm512_loadu_ps(even.as_ptr().add(16)), acc);
        acc = _mm512_fmadd_ps(l0, _mm512_loadu_ps(odd.as_ptr()), acc);
        acc = _mm512_fmadd_ps(l1, _mm512_loadu_ps(odd.as_ptr().add(16)), acc);
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn group_axpy(codes: &[u8], w: f32, even: &mut [f32], odd: &mut [f32]) {
        let [h0, h1, l0, l1] = nibbles(codes);
        let wv = _mm512_set1_ps(w);
        let (e, o) = (even.as_mut_ptr(), odd.as_mut_ptr());
        _mm512_storeu_ps(e, _mm512_fmadd_ps(wv, h0, _mm512_loadu_ps(e)));
        _mm512_storeu_ps(
            e.add(16),
            _mm512_fmadd_ps(wv, h1, _mm512_loadu_ps(e.add(16))),
        );
        _mm512_storeu_ps(o, _mm512_fmadd_ps(wv, l0, _mm512_loadu_ps(o)));
        _mm512_storeu_ps(
            o.add(16),
            _mm512_fmadd_ps(wv, l1, _mm512_loadu_ps(o.add(16))),
        );
    }
}
