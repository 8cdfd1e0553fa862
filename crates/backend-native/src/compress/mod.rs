//! FlexLLMGen's 4-bit group-wise compression of weights and KV cache (its
//! `flexllmgen/compression.py`, `CompressionConfig(num_bits=4, group_size=64, asymmetric)`):
//! groups of 64 values, per group a `min` and `scale = 15 / (max - min)` stored as fp16, two
//! codes per byte. The same format as the original, so accuracy matches it and speed comparisons
//! with it are fair.
//!
//! - [`layout`]: where a compressed tensor's bytes are ([`Q4Layout`]);
//! - [`quantize`]: the formula (once) and whole-tensor and per-row compression;
//! - [`stream`]: weights compressed chunk by chunk as the offloader writes them out;
//! - [`shapes`]: which tensors are compressed, and the models whose shapes groups of 64 do not
//!   fit;
//! - [`reference`]: the slow element-by-element version the others are tested against.
//!
//! Weights are grouped along dimension 0 of every tensor of two or more dimensions as the
//! checkpoint stores it (`[out, in]` linears, and the embedding tables, the tied output
//! projection with them); 1-D tensors (biases, layer norms) are never compressed. The KV cache
//! is grouped along head_dim.

pub mod layout;
pub mod quantize;
pub mod reference;
pub mod shapes;
pub mod stream;

#[cfg(test)]
mod tests;

pub use layout::{Q4Layout, GROUP, GROUP_BYTES, LEVELS};
pub use quantize::{compress_f16, compress_f32, compress_row, decompress};

/// The grouped dimension of compressed weights.
pub const WEIGHT_GROUP_DIM: usize = 0;
/// The grouped dimension of a compressed KV cache `[batch, heads, max_len, head_dim]`.
pub const CACHE_GROUP_DIM: usize = 3;
