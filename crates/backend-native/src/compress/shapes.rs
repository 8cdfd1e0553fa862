//! Which tensors are compressed, and the models whose shapes groups of 64 do not fit.
//!
//! A group always holds 64 values, padded with zeros: along a dimension of `n` values, 4-bit
//! groups take `18 * ceil(n / 64)` bytes per column against `2 n` in fp16, so below 19 values the
//! "compressed" tensor is larger than the original (a head_dim of 8 takes 36 bytes per position
//! instead of 16). Such shapes are refused with the policy flag to turn off, rather than run
//! slower and less accurate than without compression.

use anyhow::{ensure, Result};
use bench_core::ModelConfig;

use super::layout::Q4Layout;
use super::{CACHE_GROUP_DIM, WEIGHT_GROUP_DIM};

/// Whether a weight of `shape` is stored compressed when the policy compresses weights: every
/// tensor of two or more dimensions; biases and layer norms never.
pub fn is_compressed_weight(shape: &[usize]) -> bool {
    shape.len() >= 2
}

/// Refuses `compress_weight` for weights (name, shape) that groups along dimension 0 would not
/// shrink, naming the first such tensor.
pub fn check_weights<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Result<()> {
    for (name, shape) in tensors {
        if !is_compressed_weight(shape) {
            continue;
        }
        let l = Q4Layout::new(shape, WEIGHT_GROUP_DIM);
        ensure!(
            l.bytes() < l.f16_bytes(),
            "compress_weight: tensor {name} of shape {shape:?} cannot be grouped: its dimension 0 \
             of {} values fills {} group(s) of 64, which take {} bytes against {} in fp16; this \
             model is too small for 4-bit groups of 64: turn weight compression off \
             (compress_weight: false, or no --compress-weight)",
            l.len,
            l.groups(),
            l.bytes(),
            l.f16_bytes()
        );
    }
    Ok(())
}

/// Refuses `compress_cache` for a model whose head_dim groups of 64 would not shrink.
pub fn check_cache(cfg: &ModelConfig) -> Result<()> {
    let d = cfg.head_dim();
    let l = Q4Layout::new(&[1, d], 1);
    ensure!(
        l.bytes() < l.f16_bytes(),
        "compress_cache: {}'s head_dim of {d} (hidden {} over {} heads) cannot be grouped: a group \
         of 64 along head_dim takes {} bytes per position and head against {} in fp16; turn cache \
         compression off for this model (compress_cache: false, or no --compress-cache)",
        cfg.name,
        cfg.hidden_size,
        cfg.num_attention_heads,
        l.bytes(),
        l.f16_bytes()
    );
    // the cache's grouped dimension is its last: [batch, heads, max_len, head_dim]
    debug_assert_eq!(CACHE_GROUP_DIM, 3);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_dimensions_are_refused_with_the_flag_to_turn_off() {
        assert!(check_weights([("w", &[19usize, 5][..]), ("b", &[3][..])]).is_ok());
        let e = check_weights([("fc1.weight", &[18usize, 4][..])]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("fc1.weight") && msg.contains("compress_weight"),
            "{msg}"
        );
        let mut cfg = bench_core::model::lookup("opt-tiny").unwrap();
        // opt-tiny: head_dim 16 -> 36 bytes against 32
        assert!(format!("{:#}", check_cache(&cfg).unwrap_err()).contains("head_dim of 16"));
        cfg.num_attention_heads = 2; // head_dim 32
        assert!(check_cache(&cfg).is_ok());
    }
}
