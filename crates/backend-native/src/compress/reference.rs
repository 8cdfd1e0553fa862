//! The slow, obviously-correct 4-bit compression, written straight from FlexLLMGen's
//! description element by element (pad the group with zeros, take its min and max, scale as
//! torch computes it, clamp, round, pack two per byte, even element high): the oracle the quantizer
//! ([`super::quantize`]) and every fused kernel that decodes its output are tested against. Not
//! used by the engine.

use half::f16;

use super::layout::{Q4Layout, GROUP};

/// `x` (row-major `shape`) grouped along `group_dim`: FlexLLMGen's data tensor and scale tensor,
/// per outer index one after the other.
pub fn compress(x: &[f32], shape: &[usize], group_dim: usize) -> Vec<u8> {
    let l = Q4Layout::new(shape, group_dim);
    let mut out = vec![0u8; l.bytes()];
    for o in 0..l.outer {
        let base = o * l.block_bytes();
        for g in 0..l.groups() {
            for c in 0..l.inner {
                // the group, padded with zeros to 64 values
                let v: Vec<f32> = (0..GROUP)
                    .map(|j| {
                        let i = g * GROUP + j;
                        if i < l.len {
                            x[(o * l.len + i) * l.inner + c]
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mn = v.iter().copied().fold(f32::INFINITY, f32::min);
                let mx = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // torch's `15 / tensor` is 15 times the tensor's reciprocal
                let scale = 15.0 * (1.0 / (mx - mn));
                let q: Vec<u8> = v
                    .iter()
                    .map(|&e| {
                        let t = ((e - mn) * scale).clamp(0.0, 15.0).round_ties_even();
                        if t.is_nan() {
                            0
                        } else {
                            t as u8
                        }
                    })
                    .collect();
                for j in 0..GROUP / 2 {
                    // data[o][g * 32 + j][c]
                    out[base + (g * GROUP / 2 + j) * l.inner + c] = (q[2 * j] << 4) | q[2 * j + 1];
                }
                // scale[o][g][0][c] = scale, scale[o][g][1][c] = min
                let s = base + l.data_bytes() + 2 * ((g * 2) * l.inner + c);
                out[s..s + 2].copy_from_slice(&f16::from_f32(scale).to_le_bytes());
                let m = base + l.data_bytes() + 2 * ((g * 2 + 1) * l.inner + c);
                out[m..m + 2].copy_from_slice(&f16::from_f32(mn).to_le_bytes());
            }
        }
    }
    out
}

/// Every value of `bytes` (as [`compress`] lays them out), decoded as `q / scale + min`.
pub fn decompress(bytes: &[u8], shape: &[usize], group_dim: usize) -> Vec<f32> {
    let l = Q4Layout::new(shape, group_dim);
    let mut out = vec![0f32; l.outer * l.len * l.inner];
    for o in 0..l.outer {
        let base = o * l.block_bytes();
        for i in 0..l.len {
            let (g, j) = (i / GROUP, i % GROUP);
            for c in 0..l.inner {
                let b = bytes[base + (g * GROUP / 2 + j / 2) * l.inner + c];
                let q = if j % 2 == 0 { b >> 4 } else { b & 0xF };
                let at = |k: usize| {
                    let p = base + l.data_bytes() + 2 * ((g * 2 + k) * l.inner + c);
                    f16::from_le_bytes([bytes[p], bytes[p + 1]]).to_f32()
                };
                out[(o * l.len + i) * l.inner + c] = q as f32 / at(0) + at(1);
            }
        }
    }
    out
}
