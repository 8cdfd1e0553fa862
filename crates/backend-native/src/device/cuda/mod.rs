//! The CUDA device: kernels from `kernels/` compiled at run time by NVRTC, cuBLAS GEMMs, a
//! device memory pool, pinned staging buffers and copy streams, through cudarc with dynamically
//! loaded CUDA 13 libraries (nothing CUDA is needed to build; [`presence::probe`] is called before
//! any CUDA API so that a machine without a driver gets an error, not cudarc's panic).

pub mod device;
pub mod kernels;
pub mod lt;
pub mod memory;
pub mod module;
pub mod nvrtc;
pub mod presence;

pub use device::{CudaDevice, CudaTensor};
pub use presence::probe;
