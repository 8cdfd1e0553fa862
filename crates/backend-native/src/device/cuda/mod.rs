//! The CUDA device: kernels from `kernels/` compiled at run time by NVRTC, cuBLAS GEMMs, streams
//! and events, through cudarc with dynamically loaded CUDA libraries.

pub mod kernels;
pub mod nvrtc;
