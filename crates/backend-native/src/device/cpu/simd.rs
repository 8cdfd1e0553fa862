//! Element-wise loops compiled twice: for AVX-512 (picked at run time) and for the baseline
//! target. The crate is built for generic x86_64 (the binaries travel to other machines), where
//! the compiler may only vectorize with 128-bit SSE; [`multiversion!`] gives these loops the
//! 512-bit registers where the CPU has them without `-C target-cpu`.

/// Defines `pub fn $name` that runs an AVX-512 build of `$body` when the CPU has it, else the
/// baseline build. Helpers called from the body should be `#[inline(always)]` to be inlined into
/// (and vectorized with) the AVX-512 build.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($a:ident : $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn fast($($a: $t),*) $(-> $r)? $body
                if $crate::device::cpu::simd::has_avx512() {
                    // SAFETY: the features `fast` was compiled for are present (checked above).
                    return unsafe { fast($($a),*) };
                }
            }
            #[allow(dead_code)]
            fn portable($($a: $t),*) $(-> $r)? $body
            portable($($a),*)
        }
    };
}

/// Whether the CPU has the AVX-512 subsets the fast builds use.
#[inline]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// e^x for x <= 0 (softmax arguments), branch-free so it vectorizes: x = n ln2 + r with
/// |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (relative error below 2e-7), 2^n through
/// the exponent bits. Arguments below -87 give 0; -inf gives 0.
///
/// n is read from the bits of the rounding sum rather than by an `as i32` cast: Rust's
/// saturating float-to-int cast kept the loop from vectorizing, and prefill softmax took half
/// the time of prefill attention.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to an integer
    let xc = x.max(-87.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // t's low mantissa bits hold n (two's complement, |n| <= 126): n + 127 is 2^n's exponent
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

multiversion! {
    /// Dot product with 16 independent accumulators.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = [0f32; 16];
        let (ca, cb) = (a[..n].chunks_exact(16), b[..n].chunks_exact(16));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..16 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (x, y) in ra.iter().zip(rb) {
            s += x * y;
        }
        s
    }
}

multiversion! {
    /// `out += w * x`.
    pub fn axpy(out: &mut [f32], w: f32, x: &[f32]) {
        for (o, v) in out.iter_mut().zip(x) {
            *o += w * v;
        }
    }
}

multiversion! {
    /// `x = 1 / x` element by element.
    pub fn recip(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 1.0 / *v;
        }
    }
}

multiversion! {
    /// `out = a * b` element by element.
    pub fn mul(out: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = x * y;
        }
    }
}

multiversion! {
    /// The two dot products of a row of 4-bit code pairs with `x`: high nibbles (the even row)
    /// and low nibbles (the odd row), 16 independent accumulators each.
    pub fn nibble_dots(row: &[u8], x: &[f32]) -> (f32, f32) {
        let n = row.len().min(x.len());
        let (mut hi, mut lo) = ([0f32; 16], [0f32; 16]);
        let (cr, cx) = (row[..n].chunks_exact(16), x[..n].chunks_exact(16));
        let (rr, rx) = (cr.remainder(), cx.remainder());
        for (b, v) in cr.zip(cx) {
            for l in 0..16 {
                hi[l] += (b[l] >> 4) as f32 * v[l];
                lo[l] += (b[l] & 0xF) as f32 * v[l];
            }
        }
        let (mut h, mut o): (f32, f32) = (hi.iter().sum(), lo.iter().sum());
        for (b, v) in rr.iter().zip(rx) {
            h += (b >> 4) as f32 * v;
            o += (b & 0xF) as f32 * v;
        }
        (h, o)
    }
}

multiversion! {
    /// A row of 4-bit code pairs decoded: `even[c] = hi * inv[c] + min[c]`, `odd` from the low
    /// nibbles.
    pub fn decode_nibbles(row: &[u8], inv: &[f32], min: &[f32], even: &mut [f32], odd: &mut [f32]) {
        for c in 0..row.len() {
            even[c] = (row[c] >> 4) as f32 * inv[c] + min[c];
            odd[c] = (row[c] & 0xF) as f32 * inv[c] + min[c];
        }
    }
}

multiversion! {
    /// `a += b`.
    pub fn add_assign(a: &mut [f32], b: &[f32]) {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    }
}

multiversion! {
    /// `row = act(row + bias)`; `bias` may be empty (no bias).
    pub fn bias_act(row: &mut [f32], bias: &[f32], relu: bool) {
        if bias.is_empty() {
            if relu {
                row.iter_mut().for_each(|o| *o = o.max(0.0));
            }
        } else if relu {
            row.iter_mut().zip(bias).for_each(|(o, b)| *o = (*o + b).max(0.0));
        } else {
            row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
        }
    }
}

multiversion! {
    /// f32 -> bf16 bits, round to nearest even ([`super::bf16::to_bf16_bits`] on each value),
    /// 16 lanes at a time where the CPU has AVX-512.
    pub fn round_bf16(src: &[f32], dst: &mut [u16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = super::bf16::to_bf16_bits(*s);
        }
    }
}

multiversion! {
    /// Rows of f32 `src` (`rows` x `k`, at most 32 rows) -> bf16 bits in AMX tile order:
    /// `dst[kb][r][c]` = row `r`, column `kb * 32 + c`, for `kpad / 32` blocks of 32 columns,
    /// so each 16 x 32 A tile is 1 KiB contiguous. Columns past `k` are zero; rows past `rows`
    /// are left as they are.
    pub fn round_bf16_tiled(src: &[f32], rows: usize, k: usize, kpad: usize, dst: &mut [u16]) {
        for r in 0..rows {
            let row = &src[r * k..(r + 1) * k];
            for kb in 0..kpad / 32 {
                let d = &mut dst[kb * 1024 + r * 32..kb * 1024 + r * 32 + 32];
                let s = &row[(kb * 32).min(k)..(kb * 32 + 32).min(k)];
                for (o, v) in d.iter_mut().zip(s) {
                    *o = super::bf16::to_bf16_bits(*v);
                }
                d[s.len()..].iter_mut().for_each(|o| *o = 0);
            }
        }
    }
}

multiversion! {
    /// Layer norm of one row: `o = (r - mean) / sqrt(var + eps) * g + b`.
    pub fn layer_norm_row(r: &[f32], g: &[f32], b: &[f32], eps: f32, o: &mut [f32]) {
        let w = r.len() as f32;
        let mut acc = [0f32; 16];
        let chunks = r.chunks_exact(16);
        let rem: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for l in 0..16 {
                acc[l] += c[l];
            }
        }
        let mean = (acc.iter().sum::<f32>() + rem) / w;
        let mut acc = [0f32; 16];
        let chunks = r.chunks_exact(16);
        let rem: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
        for c in chunks {
            for l in 0..16 {
                acc[l] += (c[l] - mean) * (c[l] - mean);
            }
        }
        let var = (acc.iter().sum::<f32>() + rem) / w;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, x), gg), bb) in o.iter_mut().zip(r).zip(g).zip(b) {
            *o = (x - mean) * inv * gg + bb;
        }
    }
}

/// Masked softmax of one row of raw scores in place: positions `j < visible` with `mask[j] != 0`
/// are scaled and kept, the rest get probability 0. A row with no visible position becomes all
/// zeros.
pub fn softmax_row(row: &mut [f32], mask: &[u32], visible: usize, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        let vis = visible.min(row.len()).min(mask.len());
        row[vis..].iter_mut().for_each(|x| *x = 0.0);
        // SAFETY: avx512f is present; the kernel touches row[..vis] and mask[..vis] only.
        unsafe { softmax_avx512::row(&mut row[..vis], &mask[..vis], scale) };
        return;
    }
    softmax_row_portable(row, mask, visible, scale)
}

/// The softmax in AVX-512 intrinsics: masked loads and stores handle the tail of every row (in
/// prefill, rows of every length up to the prompt's), where the compiled loops fell back to
/// scalar code.
#[cfg(target_arch = "x86_64")]
mod softmax_avx512 {
    use std::arch::x86_64::*;

    /// e^x for x <= 0 in 16 lanes, as [`super::exp_neg`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp_neg16(x: __m512) -> __m512 {
        let xc = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let round = _mm512_set1_ps(12_582_912.0);
        let t = _mm512_fmadd_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E), round);
        let n = _mm512_sub_ps(t, round);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(round));
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            ni,
            _mm512_set1_epi32(127),
        )));
        // below -87 (and -inf, NaN): 0
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.0));
        _mm512_maskz_mul_ps(keep, p, scale)
    }

    #[inline]
    fn lanes(n: usize, c: usize) -> __mmask16 {
        let rem = (n - c * 16).min(16);
        if rem == 16 {
            0xFFFF
        } else {
            (1u16 << rem) - 1
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn row(row: &mut [f32], mask: &[u32], scale: f32) {
        let n = row.len().min(mask.len());
        let (rp, mp) = (row.as_mut_ptr(), mask.as_ptr() as *const i32);
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let sc = _mm512_set1_ps(scale);
        let mut vmax = neg_inf;
        for c in 0..n.div_ceil(16) {
            let k = lanes(n, c);
            let x = _mm512_maskz_loadu_ps(k, rp.add(c * 16));
            let m = _mm512_maskz_loadu_epi32(k, mp.add(c * 16));
            let valid = _mm512_mask_cmpneq_epi32_mask(k, m, _mm512_setzero_si512());
            let v = _mm512_mask_mul_ps(neg_inf, valid, x, sc);
            _mm512_mask_storeu_ps(rp.add(c * 16), k, v);
            vmax = _mm512_max_ps(vmax, v);
        }
        let max = _mm512_reduce_max_ps(vmax);
        if max == f32::NEG_INFINITY {
            row.iter_mut().for_each(|x| *x = 0.0);
            return;
        }
        let vm = _mm512_set1_ps(max);
        let mut vsum = _mm512_setzero_ps();
        for c in 0..n.div_ceil(16) {
            let k = lanes(n, c);
            let x = _mm512_maskz_loadu_ps(k, rp.add(c * 16));
            let e = _mm512_maskz_mov_ps(k, exp_neg16(_mm512_sub_ps(x, vm)));
            _mm512_mask_storeu_ps(rp.add(c * 16), k, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(vsum));
        for c in 0..n.div_ceil(16) {
            let k = lanes(n, c);
            let x = _mm512_maskz_loadu_ps(k, rp.add(c * 16));
            _mm512_mask_storeu_ps(rp.add(c * 16), k, _mm512_mul_ps(x, inv));
        }
    }
}

multiversion! {
    /// [`softmax_row`] in plain loops (the compiler's vectorization, scalar tails).
    pub fn softmax_row_portable(row: &mut [f32], mask: &[u32], visible: usize, scale: f32) {
        // positions past `visible` (causal) need no exp: zero them and work on the rest
        let vis = visible.min(row.len()).min(mask.len());
        row[vis..].iter_mut().for_each(|x| *x = 0.0);
        let (row, mask) = (&mut row[..vis], &mask[..vis]);
        // masking and the max in 16 lanes, so the loop vectorizes (one running max would be a
        // sequential dependence the compiler may not reorder)
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut rc = row.chunks_exact_mut(16);
        let mut mc = mask.chunks_exact(16);
        for (c, m) in (&mut rc).zip(&mut mc) {
            for l in 0..16 {
                c[l] = if m[l] != 0 { c[l] * scale } else { f32::NEG_INFINITY };
                lanes[l] = lanes[l].max(c[l]);
            }
        }
        for (x, m) in rc.into_remainder().iter_mut().zip(mc.remainder()) {
            *x = if *m != 0 { *x * scale } else { f32::NEG_INFINITY };
            lanes[0] = lanes[0].max(*x);
        }
        let max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if max == f32::NEG_INFINITY {
            row.iter_mut().for_each(|x| *x = 0.0);
            return;
        }
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for l in 0..16 {
                c[l] = exp_neg(c[l] - max);
                acc[l] += c[l];
            }
        }
        let mut sum: f32 = 0.0;
        for x in chunks.into_remainder() {
            *x = exp_neg(*x - max);
            sum += *x;
        }
        let inv = 1.0 / (sum + acc.iter().sum::<f32>());
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let e = (exp_neg(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(e);
        }
        assert!(worst < 4e-7, "{worst}");
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg(-100.0), 0.0);
        assert_eq!(exp_neg(0.0), 1.0);
    }

    #[test]
    fn softmax_and_layer_norm_match_definitions() {
        let raw: Vec<f32> = (0..37).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.9).collect();
        let mask: Vec<u32> = (0..37).map(|i| (i % 5 != 0) as u32).collect();
        // every visible length across the 16-lane tails, both implementations, and rows with
        // nothing visible
        for visible in 0..=37 {
            for (name, f) in [
                (
                    "dispatched",
                    softmax_row as fn(&mut [f32], &[u32], usize, f32),
                ),
                ("portable", softmax_row_portable),
            ] {
                let mut row = raw.clone();
                f(&mut row, &mask, visible, 0.5);
                let keep: Vec<bool> = (0..37).map(|j| j < visible && mask[j] == 1).collect();
                let max = (0..37)
                    .filter(|&j| keep[j])
                    .map(|j| raw[j] * 0.5)
                    .fold(f32::MIN, f32::max);
                let total: f64 = (0..37)
                    .filter(|&j| keep[j])
                    .map(|j| ((raw[j] * 0.5 - max) as f64).exp())
                    .sum();
                for j in 0..37 {
                    let want = if keep[j] {
                        ((raw[j] * 0.5 - max) as f64).exp() / total
                    } else {
                        0.0
                    };
                    assert!(
                        (row[j] as f64 - want).abs() < 1e-6,
                        "{name} visible {visible}, {j}: {} vs {want}",
                        row[j]
                    );
                }
            }
        }
        let g: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..37).map(|i| i as f32 * -0.02).collect();
        let mut o = vec![0f32; 37];
        layer_norm_row(&raw, &g, &b, 1e-5, &mut o);
        let mean: f64 = raw.iter().map(|&v| v as f64).sum::<f64>() / 37.0;
        let var: f64 = raw.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 37.0;
        for i in 0..37 {
            let want = (raw[i] as f64 - mean) / (var + 1e-5).sqrt() * g[i] as f64 + b[i] as f64;
            assert!((o[i] as f64 - want).abs() < 1e-5);
        }
    }
}
