//! The CPU device: fp16 storage, f32 math, rayon over all cores.
//!
//! It is the reference every CUDA kernel is tested against, the compute device on machines
//! without a GPU, and the device for attention on CPU. Matrix products go through
//! [`matmul`] (a GEMM crate for many rows, a tuned fp16 matrix-vector path for few rows, and a
//! slow obviously-correct reference they are tested against).
//!
//! - [`tensor`]: [`CpuTensor`] and its [`Storage`];
//! - [`device`]: [`CpuDevice`], the [`crate::device::Device`] implementation, and its options;
//! - [`matmul`] (with [`amx`], [`bf16`] and [`wide`]) and [`attention`]: the heavy kernels;
//! - [`q4_matmul`], [`q4_attention`] (over [`q4`]): the same products and attention with 4-bit
//!   compressed weights and cache, decoded inside the kernels; [`sparse`]: sparse attention's
//!   selection;
//! - [`convert`], [`simd`], [`shared_out`], [`pool`]: their building blocks and buffers;
//! - [`sampling`]: the next token from the logits; [`profile`]: time per op.

pub mod amx;
pub mod attention;
pub mod bf16;
pub mod convert;
pub mod device;
pub mod matmul;
pub mod pool;
pub mod profile;
pub mod q4;
pub mod q4_attention;
pub mod q4_matmul;
pub mod sampling;
pub mod shared_out;
pub mod simd;
pub mod sparse;
pub mod tensor;
pub mod wide;

#[cfg(test)]
mod q4_tests;
#[cfg(test)]
mod tests;

pub use super::alloc::try_zeros;
pub use device::{CpuDevice, CpuOptions};
pub use matmul::MatmulMode;
pub use sampling::{argmax, sample_row};
pub use tensor::{CpuTensor, Storage};
