//! The quantizer against the element-by-element reference (bytes and scales identical, partial
//! groups and constant groups included), a group worked out by hand, the streamed form of a
//! weight, and the decoding error bound.

use half::f16;

use super::layout::{f16_at, Q4Layout};
use super::stream::{for_each_stored_chunk, WeightStream};
use super::{compress_f16, compress_f32, compress_row, decompress, reference};
use crate::generate::Rng;
use crate::model::TensorSource;

/// fp16-representable values in [-a, a) with an offset, so groups are neither centred nor
/// symmetric.
fn values(n: usize, seed: u64, a: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| f16::from_f32((r.uniform() * 2.0 - 1.0) * a + 0.3 * a).to_f32())
        .collect()
}

#[test]
fn a_group_worked_out_by_hand() {
    // [1, -1] padded with 62 zeros: min -1, max 1, scale 7.5; 1 -> 15, -1 -> 0, 0 -> 7.5 -> 8
    let b = compress_f32(&[1.0, -1.0], &[2, 1], 0);
    assert_eq!(b.len(), 32 + 4);
    assert_eq!(b[0], 0xF0);
    assert!(b[1..32].iter().all(|&x| x == 0x88), "{:?}", &b[..32]);
    assert_eq!(f16_at(&b, 32).to_f32(), 7.5);
    assert_eq!(f16_at(&b, 34).to_f32(), -1.0);
    let d = decompress(&b, Q4Layout::new(&[2, 1], 0));
    assert_eq!(d, vec![1.0, -1.0]);
}

#[test]
fn bytes_and_scales_match_the_reference() {
    // weights along dim 0 (partial last groups, one lone partial group, a 3-D tensor), cache
    // rows along the last dim (head_dim 64, 80 = a group and a partial one, 128)
    let cases: &[(&[usize], usize)] = &[
        (&[130, 7], 0),
        (&[64, 3], 0),
        (&[5, 9], 0),
        (&[70, 2, 3], 0),
        (&[2, 3, 4, 64], 3),
        (&[1, 2, 3, 80], 3),
        (&[3, 128], 1),
        (&[4, 100, 5], 1),
    ];
    for (i, &(shape, dim)) in cases.iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut x = values(n, 40 + i as u64, 1.5);
        // a constant column: scale = inf, every code 0, decodes to its min
        if dim == 0 && shape.len() == 2 {
            for r in 0..shape[0] {
                x[r * shape[1]] = 0.25;
            }
        }
        let want = reference::compress(&x, shape, dim);
        assert!(
            compress_f32(&x, shape, dim) == want,
            "{shape:?} along {dim}"
        );
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        assert!(
            compress_f16(&h, shape, dim) == want,
            "{shape:?} along {dim} (f16)"
        );
        let l = Q4Layout::new(shape, dim);
        assert_eq!(want.len(), l.bytes());
        let back = decompress(&want, l);
        assert_eq!(back, reference::decompress(&want, shape, dim), "{shape:?}");
    }
}

#[test]
fn rows_compress_as_the_cache_does() {
    for d in [64, 80, 128, 20] {
        let x = values(3 * d, d as u64, 4.0);
        let l = Q4Layout::new(&[3, d], 1);
        let mut got = vec![0u8; l.bytes()];
        for (r, out) in got.chunks_mut(l.block_bytes()).enumerate() {
            compress_row(&x[r * d..(r + 1) * d], out);
        }
        assert!(got == reference::compress(&x, &[3, d], 1), "head_dim {d}");
    }
}

#[test]
fn decoding_error_is_within_half_a_step() {
    let (m, k) = (200, 33);
    let x = values(m * k, 9, 2.0);
    let b = compress_f32(&x, &[m, k], 0);
    let l = Q4Layout::new(&[m, k], 0);
    let d = decompress(&b, l);
    for c in 0..k {
        for g in 0..l.groups() {
            let rows = (g * 64..(g * 64 + 64).min(m)).collect::<Vec<_>>();
            // the padding's zeros count in the range
            let lo = rows.iter().map(|&r| x[r * k + c]).fold(0f32, f32::min);
            let hi = rows.iter().map(|&r| x[r * k + c]).fold(0f32, f32::max);
            // half a step, plus the fp16 rounding of scale and min
            let tol = (hi - lo) / 15.0 * 0.5 * 1.01 + (hi - lo) * 2e-3;
            for &r in &rows {
                let e = (d[r * k + c] - x[r * k + c]).abs();
                assert!(e <= tol, "row {r} col {c}: error {e} > {tol}");
            }
        }
    }
}

struct Values(Vec<f16>);
impl TensorSource for Values {
    fn describe(&self) -> String {
        "test values".into()
    }
    fn contains(&self, _: &str) -> bool {
        true
    }
    fn load_f16(&self, _: &str, _: &[usize]) -> anyhow::Result<Vec<f16>> {
        Ok(self.0.clone())
    }
    fn for_each_chunk(
        &self,
        _: &str,
        _: &[usize],
        chunk: usize,
        f: &mut dyn FnMut(&[f16]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // chunks of an odd size that splits rows and groups, whatever was asked
        let _ = chunk;
        self.0.chunks(13).try_for_each(f)
    }
}

#[test]
fn streamed_weights_are_the_whole_tensor_s_bytes() {
    let shape = [150usize, 7];
    let h: Vec<f16> = values(150 * 7, 3, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let whole = compress_f16(&h, &shape, 0);
    let src = Values(h.clone());
    let mut got = Vec::new();
    for_each_stored_chunk(&src, "w", &shape, true, 64, &mut |b| {
        got.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    assert!(got == whole);
    // uncompressed (and 1-D tensors even when compressing): the fp16 bytes themselves
    let mut raw = Vec::new();
    for_each_stored_chunk(&src, "b", &[1050], true, 64, &mut |b| {
        raw.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    assert_eq!(raw.len(), 2100);
    assert_eq!(f16_at(&raw, 2 * 17), h[17]);
    // pushing everything at once gives the same bytes too
    let mut s = WeightStream::new(&shape);
    let mut again = Vec::new();
    let mut emit = |b: &[u8]| {
        again.extend_from_slice(b);
        Ok(())
    };
    s.push(&h, &mut emit).unwrap();
    s.finish(&mut emit).unwrap();
    assert!(again == whole);
}
