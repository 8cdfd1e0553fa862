//! The CUDA device: kernels from `kernels/` compiled at run time by NVRTC, cuBLAS GEMMs, a
//! device memory pool, pinned staging buffers and copy streams, through cudarc with dynamically
//! loaded CUDA 13 libraries (nothing CUDA is needed to build; [`presence::probe`] is called before
//! any CUDA API so that a machine without a driver gets an error, not cudarc's panic).
//!
//! - [`device`]: [`CudaDevice`] itself (opening the GPU, allocating tensors) and [`tensor`]:
//!   [`CudaTensor`];
//! - [`transfer`], [`ops`], [`gemm`], [`attention`], [`sampling`]: the trait's methods by
//!   concern ([`q4`]: their 4-bit compressed and sparse-attention paths), each kernel started through [`launch`]'s one helper, and [`device_impl`], which
//!   joins them into the [`crate::device::Device`] trait;
//! - [`kernels`], [`module`], [`nvrtc`]: the kernel sources and their compilation and loading;
//! - [`memory`] (pool, pinned buffers, copy streams), [`lt`] (cuBLASLt), [`presence`].

pub mod attention;
pub mod device;
pub mod device_impl;
pub mod gemm;
pub mod kernels;
pub mod launch;
pub mod lt;
pub mod memory;
pub mod module;
pub mod nvrtc;
pub mod ops;
pub mod presence;
pub mod q4;
pub mod sampling;
pub mod tensor;
pub mod transfer;

pub use device::CudaDevice;
pub use presence::probe;
pub use tensor::CudaTensor;
