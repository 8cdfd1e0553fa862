//! fp16 <-> f32 conversion of slices, 16 values per instruction on AVX-512 (the `half` crate
//! converts 8 at a time through a function call, which dominated decode attention's cost of
//! reading the fp16 KV cache).

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// `dst[i] = src[i] as f32`.
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: avx512f is present; lengths are equal (asserted).
            unsafe { avx512::f16_to_f32(src, dst) };
            return;
        }
    }
    src.convert_to_f32_slice(dst);
}

/// `dst[i] = f16(src[i])`, round to nearest even.
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: avx512f is present; lengths are equal (asserted).
            unsafe { avx512::f32_to_f16(src, dst) };
            return;
        }
    }
    dst.convert_from_f32_slice(src);
}

/// Converts fp16 weights to f32 in parallel chunks.
pub fn to_f32(w: &[f16]) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    out.par_chunks_mut(1 << 16)
        .zip(w.par_chunks(1 << 16))
        .for_each(|(o, i)| f16_to_f32(i, o));
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
        let n = src.len();
        let full = n / 16;
        for c in 0..full {
            let v = _mm256_loadu_si256(src.as_ptr().add(c * 16) as *const __m256i);
            _mm512_storeu_ps(dst.as_mut_ptr().add(c * 16), _mm512_cvtph_ps(v));
        }
        for i in full * 16..n {
            dst[i] = src[i].to_f32();
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
        let n = src.len();
        let full = n / 16;
        for c in 0..full {
            let v = _mm512_loadu_ps(src.as_ptr().add(c * 16));
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_storeu_si256(dst.as_mut_ptr().add(c * 16) as *mut __m256i, h);
        }
        for i in full * 16..n {
            dst[i] = f16::from_f32(src[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_half() {
        let v: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 2001) as f32 / 37.0 - 27.0)
            .chain([1e-7, 70000.0, -0.0])
            .collect();
        let mut h = vec![f16::ZERO; v.len()];
        f32_to_f16(&v, &mut h);
        assert!(h
            .iter()
            .zip(&v)
            .all(|(a, b)| a.to_bits() == f16::from_f32(*b).to_bits()));
        let mut back = vec![0f32; v.len()];
        f16_to_f32(&h, &mut back);
        assert!(back
            .iter()
            .zip(&h)
            .all(|(a, b)| a.to_bits() == b.to_f32().to_bits()));
    }
}
