//! Weights compressed chunk by chunk, as the offloader writes them to a tier: the source hands
//! out fp16 values in row-major chunks, whole groups of rows are quantized as soon as they are
//! there, their data bytes go out at once and the (much smaller) scale tensor goes out last, so
//! that neither the fp16 tensor nor its f32 values are ever whole in memory.

use anyhow::Result;
use half::f16;
use rayon::prelude::*;

use super::layout::{put_f16, Q4Layout, GROUP, GROUP_BYTES};
use super::quantize::quantize_group;
use super::shapes::is_compressed_weight;
use super::WEIGHT_GROUP_DIM;
use crate::model::TensorSource;

/// A weight being compressed (grouped along dimension 0).
pub struct WeightStream {
    layout: Q4Layout,
    /// Values of the rows not yet quantized (fewer than a group's, or fewer than a batch of
    /// groups).
    pending: Vec<f32>,
    /// The scale tensor so far, as stored bytes.
    scales: Vec<u8>,
    rows_done: usize,
}

impl WeightStream {
    pub fn new(shape: &[usize]) -> WeightStream {
        let layout = Q4Layout::new(shape, WEIGHT_GROUP_DIM);
        WeightStream {
            layout,
            pending: Vec::new(),
            scales: Vec::with_capacity(2 * layout.scale_count()),
            rows_done: 0,
        }
    }

    /// The next values in row-major order; the data rows of every group completed go to `emit`.
    pub fn push(&mut self, vals: &[f16], emit: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.pending.extend(vals.iter().map(|v| v.to_f32()));
        let group_vals = GROUP * self.layout.inner;
        let whole = self.pending.len() / group_vals.max(1);
        if whole > 0 {
            self.quantize(whole, GROUP, emit)?;
            self.pending.drain(..whole * group_vals);
        }
        Ok(())
    }

    /// The last, partial group (padded with zeros), then the scale tensor.
    pub fn finish(mut self, emit: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let rows = self.pending.len() / self.layout.inner.max(1);
        if rows > 0 {
            self.quantize(1, rows, emit)?;
        }
        debug_assert_eq!(self.rows_done, self.layout.len);
        emit(&self.scales)
    }

    /// Quantizes `groups` groups of `rows` rows each from the front of `pending`, in parallel.
    fn quantize(
        &mut self,
        groups: usize,
        rows: usize,
        emit: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let inner = self.layout.inner;
        let mut data = vec![0u8; groups * GROUP_BYTES * inner];
        let mut sc = vec![f16::ZERO; groups * 2 * inner];
        let pending = &self.pending;
        data.par_chunks_mut(GROUP_BYTES * inner)
            .zip(sc.par_chunks_mut(2 * inner))
            .enumerate()
            .for_each(|(g, (d, s))| {
                let x = &pending[g * GROUP * inner..(g * GROUP + rows) * inner];
                let (scale, min) = s.split_at_mut(inner);
                quantize_group(x, rows, inner, d, scale, min);
            });
        let at = self.scales.len();
        self.scales.resize(at + sc.len() * 2, 0);
        for (j, v) in sc.iter().enumerate() {
            put_f16(&mut self.scales, at + 2 * j, *v);
        }
        self.rows_done += groups * rows;
        emit(&data)
    }
}

/// A tensor's stored bytes, chunk by chunk: fp16 values as they are, or (`compressed`, for a
/// tensor [`is_compressed_weight`] accepts) its 4-bit form.
pub fn for_each_stored_chunk(
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
    compressed: bool,
    chunk_values: usize,
    f: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    if !(compressed && is_compressed_weight(shape)) {
        return src.for_each_chunk(name, shape, chunk_values, &mut |c: &[f16]| {
            f(bytemuck_f16(c))
        });
    }
    let mut s = WeightStream::new(shape);
    // whole groups of rows per chunk where they fit, so that little waits in `pending`
    let group_vals = GROUP * s.layout.inner;
    let chunk = (chunk_values / group_vals).max(1) * group_vals;
    src.for_each_chunk(name, shape, chunk, &mut |c: &[f16]| s.push(c, f))?;
    s.finish(f)
}

/// The bytes of fp16 values (little-endian, as the engine runs on x86_64 and aarch64 only).
pub fn bytemuck_f16(v: &[f16]) -> &[u8] {
    // SAFETY: f16 is a plain 2-byte value without padding; the byte view covers the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}
