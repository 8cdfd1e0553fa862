//! The quantizer: FlexLLMGen's formula, in this crate once. Per group, with the zero padding of a
//! partial group included: `min`, `max`, `scale = 15 / (max - min)`, and for every value
//! `q = round(clamp((x - min) * scale, 0, 15))` (ties to even as `torch.round`); `scale` and
//! `min` are stored as fp16. Decoding is `q / scale + min` with the stored fp16 values.
//!
//! All in f32, operation for operation as torch runs FlexLLMGen's code, so that the bytes are
//! FlexLLMGen's: torch evaluates its `B / (mx - mn)` (a number over a tensor) as
//! `B * reciprocal(mx - mn)`, which is an ulp off the quotient for some ranges and then moves a
//! code sitting on a rounding tie (found against the Python reference of
//! `scripts/train_tiny_opt.py`).
//!
//! The weights are compressed on the host when the offload files are built (FlexLLMGen does it
//! on the CPU in f32 too, from the fp16 checkpoint); the KV cache's rows are compressed as they
//! are appended, on the device that holds them (the CUDA pack kernel is checked against this
//! code).

use half::f16;
use rayon::prelude::*;

use super::layout::{put_f16, Q4Layout, GROUP, GROUP_BYTES, LEVELS};

/// A group's scale from its min and max: `15 * (1 / (max - min))`, as torch computes
/// FlexLLMGen's `15 / (max - min)` (see the module docs).
#[inline]
pub fn scale_of(min: f32, max: f32) -> f32 {
    LEVELS * (1.0 / (max - min))
}

/// One value's 4-bit code. A constant group has `scale = inf` and `(x - min) * inf` is NaN,
/// which the saturating cast turns into 0 (what torch's uint8 cast of NaN gives on x86): such a
/// group decodes to its min whatever its codes.
#[inline]
pub fn code(x: f32, min: f32, scale: f32) -> u8 {
    let v = ((x - min) * scale).clamp(0.0, LEVELS);
    // round half to even without a call to rintf: adding 2^23 leaves no fraction bits, so the
    // addition itself rounds (to nearest even, the default mode); exact for 0 <= v < 2^22
    const SHIFT: f32 = 8_388_608.0;
    ((v + SHIFT) - SHIFT) as u8
}

/// A code back to its value (what every fused kernel computes, as `q * (1 / scale) + min`).
#[inline]
pub fn decode(q: u8, scale: f16, min: f16) -> f32 {
    q as f32 / scale.to_f32() + min.to_f32()
}

/// Quantizes one group: `x` holds `rows` (at most [`GROUP`]) rows of `inner` values, the rows
/// past `rows` being the zero padding. Writes its `32 * inner` data bytes (rows `2k` and
/// `2k + 1` of column `c` in byte `k * inner + c`, the even row in the high nibble) and the
/// `inner` scales and mins.
pub fn quantize_group(
    x: &[f32],
    rows: usize,
    inner: usize,
    data: &mut [u8],
    scale: &mut [f16],
    min: &mut [f16],
) {
    assert!(rows <= GROUP && x.len() >= rows * inner);
    assert!(data.len() >= GROUP_BYTES * inner && scale.len() >= inner && min.len() >= inner);
    // columns in chunks of 64 so the statistics stay on the stack (the cache calls this per row)
    const COLS: usize = 64;
    for c0 in (0..inner).step_by(COLS) {
        let cols = COLS.min(inner - c0);
        let (mut lo, mut hi) = ([f32::INFINITY; COLS], [f32::NEG_INFINITY; COLS]);
        for r in 0..rows {
            let row = &x[r * inner + c0..r * inner + c0 + cols];
            for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                *l = l.min(v);
                *h = h.max(v);
            }
        }
        if rows < GROUP {
            // the padding's zeros are part of the group
            for (l, h) in lo.iter_mut().zip(hi.iter_mut()).take(cols) {
                *l = l.min(0.0);
                *h = h.max(0.0);
            }
        }
        let mut sc = [0f32; COLS];
        for c in 0..cols {
            sc[c] = scale_of(lo[c], hi[c]);
            scale[c0 + c] = f16::from_f32(sc[c]);
            min[c0 + c] = f16::from_f32(lo[c]);
        }
        let at = |r: usize, c: usize| if r < rows { x[r * inner + c0 + c] } else { 0.0 };
        for k in 0..GROUP_BYTES {
            let out = &mut data[k * inner + c0..k * inner + c0 + cols];
            for (c, o) in out.iter_mut().enumerate() {
                let q0 = code(at(2 * k, c), lo[c], sc[c]);
                let q1 = code(at(2 * k + 1, c), lo[c], sc[c]);
                *o = (q0 << 4) | q1;
            }
        }
    }
}

/// Quantizes group `g` of outer block `o`, its values read by `value(o, i, c)` (`i` along the
/// grouped dimension), into the group's data rows `data` (`32 * inner` bytes) and scale rows
/// `scales` (`2 * inner` fp16 values as bytes).
fn quantize_block_group(
    layout: Q4Layout,
    (o, g): (usize, usize),
    data: &mut [u8],
    scales: &mut [u8],
    value: &impl Fn(usize, usize, usize) -> f32,
    buf: &mut Vec<f32>,
    sc: &mut Vec<f16>,
) {
    let inner = layout.inner;
    let rows = GROUP.min(layout.len - g * GROUP);
    buf.clear();
    for r in 0..rows {
        buf.extend((0..inner).map(|c| value(o, g * GROUP + r, c)));
    }
    sc.clear();
    sc.resize(2 * inner, f16::ZERO);
    let (s, m) = sc.split_at_mut(inner);
    quantize_group(buf, rows, inner, data, s, m);
    for (j, v) in sc.iter().enumerate() {
        put_f16(scales, j * 2, *v);
    }
}

/// A whole tensor in its stored form ([`Q4Layout`]), from `value(o, i, c)`; the groups run in
/// parallel (each owns its data rows and its scale rows).
pub fn compress_with(
    layout: Q4Layout,
    value: impl Fn(usize, usize, usize) -> f32 + Sync,
) -> Vec<u8> {
    let mut out = vec![0u8; layout.bytes()];
    let (db, sb) = (GROUP_BYTES * layout.inner, 4 * layout.inner);
    if db == 0 {
        return out;
    }
    out.par_chunks_mut(layout.block_bytes())
        .enumerate()
        .for_each(|(o, block)| {
            let (data, scales) = block.split_at_mut(layout.data_bytes());
            data.par_chunks_mut(db)
                .zip(scales.par_chunks_mut(sb))
                .enumerate()
                .for_each_init(
                    || (Vec::new(), Vec::new()),
                    |(buf, sc), (g, (d, s))| {
                        quantize_block_group(layout, (o, g), d, s, &value, buf, sc)
                    },
                );
        });
    out
}

/// An fp16 tensor of `shape` grouped along `group_dim`, in its stored form.
pub fn compress_f16(x: &[f16], shape: &[usize], group_dim: usize) -> Vec<u8> {
    let l = Q4Layout::new(shape, group_dim);
    assert_eq!(x.len(), l.outer * l.len * l.inner, "values for {shape:?}");
    compress_with(l, |o, i, c| x[(o * l.len + i) * l.inner + c].to_f32())
}

/// An f32 tensor of `shape` grouped along `group_dim`, in its stored form.
pub fn compress_f32(x: &[f32], shape: &[usize], group_dim: usize) -> Vec<u8> {
    let l = Q4Layout::new(shape, group_dim);
    assert_eq!(x.len(), l.outer * l.len * l.inner, "values for {shape:?}");
    compress_with(l, |o, i, c| x[(o * l.len + i) * l.inner + c])
}

/// One row of `len` values grouped along itself (a KV-cache position: `inner` = 1) into its
/// `Q4Layout { outer: 1, len, inner: 1 }.bytes()` stored bytes.
pub fn compress_row(x: &[f32], out: &mut [u8]) {
    let len = x.len();
    let groups = len.div_ceil(GROUP);
    let data_bytes = groups * GROUP_BYTES;
    let (data, scales) = out.split_at_mut(data_bytes);
    for g in 0..groups {
        let rows = GROUP.min(len - g * GROUP);
        let (mut s, mut m) = ([f16::ZERO], [f16::ZERO]);
        quantize_group(
            &x[g * GROUP..g * GROUP + rows],
            rows,
            1,
            &mut data[g * GROUP_BYTES..(g + 1) * GROUP_BYTES],
            &mut s,
            &mut m,
        );
        put_f16(scales, g * 4, s[0]);
        put_f16(scales, g * 4 + 2, m[0]);
    }
}

/// Every value of a stored tensor, decoded (f32, the logical shape's row-major order).
pub fn decompress(bytes: &[u8], layout: Q4Layout) -> Vec<f32> {
    let (len, inner) = (layout.len, layout.inner);
    let mut out = vec![0f32; layout.outer * len * inner];
    out.par_chunks_mut((len * inner).max(1))
        .zip(bytes.par_chunks(layout.block_bytes().max(1)))
        .for_each(|(o, block)| {
            let (data, scales) = block.split_at(layout.data_bytes());
            for i in 0..len {
                let g = i / GROUP;
                let row = &data[(i / 2) * inner..(i / 2 + 1) * inner];
                for c in 0..inner {
                    let b = row[c];
                    let q = if i % 2 == 0 { b >> 4 } else { b & 15 };
                    let s = super::layout::f16_at(scales, (g * 2 * inner + c) * 2);
                    let m = super::layout::f16_at(scales, ((g * 2 + 1) * inner + c) * 2);
                    o[i * inner + c] = decode(q, s, m);
                }
            }
        });
    out
}
