//! backend-native: flexbench's own OPT inference engine (fp16 weights, a CPU device and a CUDA
//! device, a GPU/CPU/disk offloader) and the `Backend` that runs it through `flexbench-native`.

pub mod backend;
pub mod device;
pub mod disk_speed;
pub mod dummy;
pub mod floor;
pub mod generate;
pub mod model;
pub mod offload;
pub mod runner;
pub mod schedule;

pub use backend::NativeBackend;
