//! bf16-math matrix products for the CPU device's optional bf16 mode (prefill).
//!
//! Inputs are rounded to bf16 (x from f32, W from fp16), products are exact in f32 and
//! accumulated in f32 by AVX-512 BF16 dot products (`vdpbf16ps`: 32 multiply-adds per
//! instruction, twice the f32 FMA's 16). Layout: W^T is packed per panel of 32 output columns as
//! `[k/2][32][2]` bf16 pairs, so one 64-byte load feeds a dot-product instruction against a
//! broadcast pair of one x row; a micro-kernel holds 8 rows x 32 columns of accumulators.
//! [`reference()`] rounds the same way and multiplies naively, for tests.

use half::{bf16, f16};
use rayon::prelude::*;

/// Output columns per packed panel (two 16-lane registers).
const NR: usize = 32;
/// Rows of x per micro-kernel call.
const MR: usize = 8;

/// Whether this CPU has AVX-512 BF16.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 -> bf16 bits, round to nearest even; written branch-free so loops over it vectorize
/// (`half::bf16::from_f32` is a scalar call). NaNs stay NaNs (quiet).
#[inline(always)]
pub fn to_bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x40;
    if v.is_nan() {
        nan
    } else {
        rounded
    }
}

/// Converts a row of f32 to bf16 bits.
pub fn round_row(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = to_bf16_bits(*s);
    }
}

/// `k` rounded up to whole pairs.
fn k_pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// x `[n, k]` f32 -> bf16 bit patterns `[n, 2 * k_pairs]` (a zero pads odd k).
fn pack_x(x: &[f32], n: usize, k: usize) -> Vec<u16> {
    let kp = 2 * k_pairs(k);
    let mut out = vec![0u16; n * kp];
    out.par_chunks_mut(kp)
        .zip(x.par_chunks(k))
        .for_each(|(o, r)| {
            for (a, b) in o.iter_mut().zip(r) {
                *a = to_bf16_bits(*b);
            }
        });
    out
}

/// W `[m, k]` fp16 -> panels of NR columns, each `[k_pairs][NR][2]` bf16 (zeros pad m and k).
fn pack_w(w: &[f16], m: usize, k: usize) -> Vec<u16> {
    let kp = k_pairs(k);
    let panels = m.div_ceil(NR);
    let mut out = vec![0u16; panels * kp * NR * 2];
    out.par_chunks_mut(kp * NR * 2)
        .enumerate()
        .for_each(|(pi, panel)| {
            for jj in 0..NR {
                let j = pi * NR + jj;
                if j >= m {
                    break;
                }
                let row = &w[j * k..(j + 1) * k];
                for (p, v) in row.iter().enumerate() {
                    panel[(p / 2) * NR * 2 + jj * 2 + p % 2] = bf16::from_f32(v.to_f32()).to_bits();
                }
            }
        });
    out
}

/// `out[n, m] = bf16(x) · bf16(W)^T` (no bias). Requires [`available`].
pub fn linear(x: &[f32], w: &[f16], n: usize, k: usize, m: usize, out: &mut [f32]) {
    assert!(
        available(),
        "bf16 matmul called on a CPU without AVX-512 BF16"
    );
    let xp = pack_x(x, n, k);
    let wp = pack_w(w, m, k);
    let kp = k_pairs(k);
    let panels = m.div_ceil(NR);
    let row_blocks = n.div_ceil(MR);
    // tasks: (row group, panel); row groups of 64 rows keep a task's x rows in L2 across panels
    const ROWS_PER_TASK: usize = 64;
    let groups = n.div_ceil(ROWS_PER_TASK);
    let results: Vec<(usize, usize, Vec<f32>)> = (0..groups * panels)
        .into_par_iter()
        .map(|t| {
            let (g, pi) = (t / panels, t % panels);
            let r0 = g * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(n);
            let panel = &wp[pi * kp * NR * 2..(pi + 1) * kp * NR * 2];
            let mut tile = vec![0f32; (r1 - r0) * NR];
            let mut rb = r0;
            while rb < r1 {
                let rows = (r1 - rb).min(MR);
                // SAFETY: available() was asserted; the slices hold `rows` packed x rows of
                // 2*kp values, a panel of kp*NR*2 values and `rows` tile rows of NR.
                unsafe {
                    kernels::tile(
                        &xp[rb * 2 * kp..(rb + rows) * 2 * kp],
                        panel,
                        kp,
                        rows,
                        &mut tile[(rb - r0) * NR..(rb - r0 + rows) * NR],
                    );
                }
                rb += rows;
            }
            (r0, pi, tile)
        })
        .collect();
    let _ = row_blocks;
    for (r0, pi, tile) in results {
        let j0 = pi * NR;
        let cols = NR.min(m - j0);
        for (i, row) in tile.chunks(NR).enumerate() {
            out[(r0 + i) * m + j0..(r0 + i) * m + j0 + cols].copy_from_slice(&row[..cols]);
        }
    }
}

/// The same rounding, multiplied naively (f64 accumulation).
pub fn reference(x: &[f32], w: &[f16], n: usize, k: usize, m: usize) -> Vec<f32> {
    let r = |v: f32| bf16::from_f32(v).to_f32() as f64;
    let mut out = vec![0f32; n * m];
    for i in 0..n {
        for j in 0..m {
            out[i * m + j] = (0..k)
                .map(|p| r(x[i * k + p]) * r(w[j * k + p].to_f32()))
                .sum::<f64>() as f32;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn micro<const R: usize>(x: &[u16], panel: &[u16], kp: usize, tile: &mut [f32]) {
        let mut acc0 = [_mm512_setzero_ps(); R];
        let mut acc1 = [_mm512_setzero_ps(); R];
        let xq = x.as_ptr() as *const u32; // one u32 = one bf16 pair
        let wq = panel.as_ptr();
        for p in 0..kp {
            let b0: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(wq.add(p * NR * 2) as *const _));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(wq.add(p * NR * 2 + 32) as *const _));
            for r in 0..R {
                let a: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*xq.add(r * kp + p) as i32));
                acc0[r] = _mm512_dpbf16_ps(acc0[r], a, b0);
                acc1[r] = _mm512_dpbf16_ps(acc1[r], a, b1);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR), acc0[r]);
            _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR + 16), acc1[r]);
        }
    }

    /// `tile[rows][NR] = x[rows] · panel`.
    pub unsafe fn tile(x: &[u16], panel: &[u16], kp: usize, rows: usize, tile: &mut [f32]) {
        debug_assert!(rows <= MR && x.len() >= rows * 2 * kp && tile.len() >= rows * NR);
        match rows {
            1 => micro::<1>(x, panel, kp, tile),
            2 => micro::<2>(x, panel, kp, tile),
            3 => micro::<3>(x, panel, kp, tile),
            4 => micro::<4>(x, panel, kp, tile),
            5 => micro::<5>(x, panel, kp, tile),
            6 => micro::<6>(x, panel, kp, tile),
            7 => micro::<7>(x, panel, kp, tile),
            _ => micro::<8>(x, panel, kp, tile),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    pub unsafe fn tile(_: &[u16], _: &[u16], _: usize, _: usize, _: &mut [f32]) {
        unreachable!("bf16::available() is false off x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_half() {
        for v in [
            0.0f32,
            -0.0,
            1.0,
            1.003_906_2,
            1.005_859_4,
            -3.1e-5,
            65504.0,
            1e30,
            f32::INFINITY,
            f32::MIN_POSITIVE,
        ] {
            assert_eq!(to_bf16_bits(v), bf16::from_f32(v).to_bits(), "{v}");
        }
        assert!(bf16::from_bits(to_bf16_bits(f32::NAN)).is_nan());
        let mut r = 12345u32;
        for _ in 0..10000 {
            r = r.wrapping_mul(1664525).wrapping_add(1013904223);
            let v = f32::from_bits(r);
            if !v.is_nan() {
                assert_eq!(to_bf16_bits(v), bf16::from_f32(v).to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn matches_rounded_reference() {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        for &(n, k, m) in &[
            (1, 2, 1),
            (9, 33, 70),
            (17, 64, 32),
            (64, 100, 65),
            (70, 48, 31),
        ] {
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0)
                .collect();
            let w: Vec<f16> = (0..m * k)
                .map(|i| f16::from_f32(((i * 53 % 89) as f32 - 44.0) / 61.0))
                .collect();
            let mut out = vec![0f32; n * m];
            linear(&x, &w, n, k, m, &mut out);
            let r = reference(&x, &w, n, k, m);
            let scale = r.iter().fold(0f32, |a, b| a.max(b.abs()));
            let err = out
                .iter()
                .zip(&r)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()))
                / scale;
            assert!(err < 1e-5, "n={n} k={k} m={m}: {err}");
        }
    }
}
