//! Where the bytes of a 4-bit compressed tensor are.
//!
//! A tensor of shape `S` grouped along dimension `g` is seen as `[outer, len, inner]`
//! (`outer` = the product of `S[..g]`, `len` = `S[g]`, `inner` = the product of `S[g + 1..]`).
//! Along `len` the values go in groups of [`GROUP`], the last one padded with zeros. Per outer
//! index FlexLLMGen keeps a data tensor `[groups * 32, inner]` (two 4-bit values per byte,
//! element `2k` of a group in the high nibble of byte `k`) and a scale tensor
//! `[groups, 2, inner]` holding `[scale, min]` as fp16.
//!
//! Stored form: for each outer index its data block, then its scale block. Weights are grouped
//! along dimension 0 (`outer` = 1): the whole data tensor, then the whole scale tensor, exactly
//! FlexLLMGen's two tensors one after the other. The KV cache is grouped along head_dim
//! (`inner` = 1): every position's row is its packed bytes followed by its (scale, min) pairs,
//! so that a run of positions stays one contiguous slab, as the fp16 cache's rows do.

use half::f16;

/// Values per group.
pub const GROUP: usize = 64;
/// Bytes of packed data per group and column.
pub const GROUP_BYTES: usize = GROUP / 2;
/// The largest 4-bit code: `2^4 - 1`.
pub const LEVELS: f32 = 15.0;

/// A compressed tensor's shape split at its grouped dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Q4Layout {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
}

impl Q4Layout {
    /// The layout of `shape` grouped along `group_dim` (a dimension past the shape's rank counts
    /// as a dimension of 1).
    pub fn new(shape: &[usize], group_dim: usize) -> Q4Layout {
        let g = group_dim.min(shape.len());
        Q4Layout {
            outer: shape[..g].iter().product(),
            len: shape.get(g).copied().unwrap_or(1),
            inner: shape.get(g + 1..).map_or(1, |s| s.iter().product()),
        }
    }

    pub fn groups(&self) -> usize {
        self.len.div_ceil(GROUP)
    }

    /// Packed data bytes of one outer block.
    pub fn data_bytes(&self) -> usize {
        self.groups() * GROUP_BYTES * self.inner
    }

    /// fp16 values (scales and mins) of one outer block.
    pub fn scale_count(&self) -> usize {
        self.groups() * 2 * self.inner
    }

    /// Bytes of one outer block: its data, then its scales.
    pub fn block_bytes(&self) -> usize {
        self.data_bytes() + 2 * self.scale_count()
    }

    /// Bytes of the whole stored tensor.
    pub fn bytes(&self) -> usize {
        self.outer * self.block_bytes()
    }

    /// Bytes the same values take in fp16.
    pub fn f16_bytes(&self) -> usize {
        2 * self.outer * self.len * self.inner
    }
}

/// The fp16 value stored at byte `at` (little-endian, any alignment).
#[inline]
pub fn f16_at(bytes: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Stores `v` at byte `at`.
#[inline]
pub fn put_f16(bytes: &mut [u8], at: usize, v: f16) {
    bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Checks part of a stored tensor's scale block as the quantizer writes it: every scale positive
/// (a constant group's is +inf) and every min finite. `bytes` starts at fp16 value `first` of
/// the block, whose rows of `inner` values alternate scales and mins. Returns the index (within
/// the block) of the first value no quantizer writes: a disk that changed the bytes.
pub fn check_scales(bytes: &[u8], first: usize, inner: usize) -> Option<usize> {
    let inner = inner.max(1);
    let n = bytes.len() / 2;
    // row by row (a row is all scales or all mins), each row's flags OR-ed without branches so
    // the loop vectorizes: every disk read of a compressed weight passes through here
    let mut i = 0;
    while i < n {
        let at = first + i;
        let row_end = (at / inner + 1) * inner;
        let len = (row_end - at).min(n - i);
        let seg = &bytes[2 * i..2 * (i + len)];
        let scales = (at / inner).is_multiple_of(2);
        let bad = seg.chunks_exact(2).fold(false, |acc, c| {
            let bits = u16::from_le_bytes([c[0], c[1]]);
            acc | if scales {
                bits == 0 || bits > 0x7C00
            } else {
                bits & 0x7C00 == 0x7C00
            }
        });
        if bad {
            let j = seg.chunks_exact(2).position(|c| {
                let bits = u16::from_le_bytes([c[0], c[1]]);
                if scales {
                    bits == 0 || bits > 0x7C00
                } else {
                    bits & 0x7C00 == 0x7C00
                }
            });
            return j.map(|j| at + j);
        }
        i += len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_flexllmgen_shapes() {
        // a linear [out 130, in 7] along dim 0: 3 groups -> data [96, 7], scales [3, 2, 7]
        let w = Q4Layout::new(&[130, 7], 0);
        assert_eq!((w.outer, w.len, w.inner, w.groups()), (1, 130, 7, 3));
        assert_eq!(w.data_bytes(), 96 * 7);
        assert_eq!(w.bytes(), 96 * 7 + 3 * 2 * 7 * 2);
        // a cache [2, 3, 5, 64] along head_dim: 36 bytes per position
        let c = Q4Layout::new(&[2, 3, 5, 64], 3);
        assert_eq!((c.outer, c.len, c.inner), (30, 64, 1));
        assert_eq!(c.block_bytes(), 36);
        assert_eq!(c.bytes(), 30 * 36);
        assert_eq!(c.f16_bytes(), 30 * 128);
        let mut b = vec![0u8; 5];
        put_f16(&mut b, 1, f16::from_f32(-2.5));
        assert_eq!(f16_at(&b, 1).to_f32(), -2.5);
    }

    #[test]
    fn scale_checks_find_what_no_quantizer_writes() {
        // inner 2: [scale, scale, min, min]: +inf scales and negative mins are fine
        let good = [7.5f32, f32::INFINITY, -3.0, 0.0];
        let mut b: Vec<u8> = good
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(check_scales(&b, 0, 2), None);
        // from the middle of the block: value 2 is the first min
        assert_eq!(check_scales(&b[4..], 2, 2), None);
        put_f16(&mut b, 2, f16::from_f32(-1.0)); // a negative scale
        assert_eq!(check_scales(&b, 0, 2), Some(1));
        put_f16(&mut b, 2, f16::ZERO);
        assert_eq!(check_scales(&b, 0, 2), Some(1));
        put_f16(&mut b, 2, f16::ONE);
        put_f16(&mut b, 6, f16::NAN); // a NaN min
        assert_eq!(check_scales(&b, 0, 2), Some(3));
    }
}
