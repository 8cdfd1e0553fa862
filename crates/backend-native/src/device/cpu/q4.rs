//! Reading 4-bit compressed tensors on the CPU device: a weight group's scales as the f32
//! factors the fused kernels multiply by, a row of a compressed table (the embeddings), and the
//! SIMD path the kernels run on this CPU.
//!
//! Every kernel decodes `q / scale + min` as `q * (1 / scale) + min`: one multiply-add per value
//! instead of a division (the two differ by at most an ulp of f32).

use crate::compress::layout::f16_at;
use crate::compress::{Q4Layout, GROUP, GROUP_BYTES};

/// The kernels' instruction set, picked at run time: AVX-512 where the CPU has it, else plain
/// loops (what the compiler vectorizes for the baseline target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    Avx512,
    Portable,
}

impl Simd {
    pub fn detect() -> Simd {
        if super::simd::has_avx512() {
            Simd::Avx512
        } else {
            Simd::Portable
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx512 => "avx512",
            Simd::Portable => "portable",
        }
    }
}

/// `1 / scale` and `min` of group `g` of a weight (grouped along dimension 0, `outer` = 1) for
/// every column, as f32. Converted 16 at a time: the kernels call this per group of 64 rows,
/// and converting one value at a time took four times as long as the product itself.
pub fn group_factors(bytes: &[u8], l: Q4Layout, g: usize, inv: &mut [f32], min: &mut [f32]) {
    let base = l.data_bytes();
    let w = l.inner;
    let (s0, m0) = (base + 2 * (2 * g) * w, base + 2 * (2 * g + 1) * w);
    halves_to_f32(&bytes[s0..s0 + 2 * w], &mut inv[..w]);
    halves_to_f32(&bytes[m0..m0 + 2 * w], &mut min[..w]);
    super::simd::recip(&mut inv[..w]);
}

/// fp16 values stored as bytes, into f32.
fn halves_to_f32(bytes: &[u8], out: &mut [f32]) {
    if (bytes.as_ptr() as usize).is_multiple_of(2) {
        // SAFETY: aligned for f16 (checked), whole values, every bit pattern is a valid f16, and
        // the view borrows `bytes`.
        let h = unsafe {
            std::slice::from_raw_parts(bytes.as_ptr().cast::<half::f16>(), bytes.len() / 2)
        };
        super::convert::f16_to_f32(h, out);
    } else {
        for (i, o) in out.iter_mut().enumerate() {
            *o = f16_at(bytes, 2 * i).to_f32();
        }
    }
}

/// Row `i` (along the grouped dimension 0) of a compressed table `[rows, width]`, decoded.
pub fn table_row(bytes: &[u8], l: Q4Layout, i: usize, out: &mut [f32]) {
    let (g, w) = (i / GROUP, l.inner);
    let row = &bytes[(g * GROUP_BYTES + (i % GROUP) / 2) * w..][..w];
    let shift = if i.is_multiple_of(2) { 4 } else { 0 };
    let base = l.data_bytes();
    for c in 0..w {
        let s = f16_at(bytes, base + 2 * (2 * g * w + c)).to_f32();
        let m = f16_at(bytes, base + 2 * ((2 * g + 1) * w + c)).to_f32();
        out[c] = ((row[c] >> shift) & 0xF) as f32 * (1.0 / s) + m;
    }
}

/// The (scale, min) of group `g` of a cache row (grouped along itself), as `1 / scale` and min.
#[inline]
pub fn row_factors(row: &[u8], groups: usize, g: usize) -> (f32, f32) {
    let at = groups * GROUP_BYTES + 4 * g;
    (1.0 / f16_at(row, at).to_f32(), f16_at(row, at + 2).to_f32())
}

/// A whole cache row of `d` values decoded into `out`.
pub fn decode_row(row: &[u8], d: usize, out: &mut [f32]) {
    let groups = d.div_ceil(GROUP);
    for (i, o) in out.iter_mut().enumerate().take(d) {
        let (inv, mn) = row_factors(row, groups, i / GROUP);
        let b = row[i / 2];
        let q = if i % 2 == 0 { b >> 4 } else { b & 0xF };
        *o = q as f32 * inv + mn;
    }
}
