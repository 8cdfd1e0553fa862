//! backend-native: flexbench's own OPT inference engine (fp16 weights, a CPU device and a CUDA
//! device, a GPU/CPU/disk offloader) and the `Backend` that runs it through `flexbench-native`.
//!
//! - [`device`]: the compute-device trait, the CPU device (f32 math, optional bf16 on AMX) and
//!   the CUDA device (NVRTC kernels, cuBLAS, pinned memory and copy streams);
//! - [`offload`] and [`schedule`]: weights, KV cache and activations on GPU / CPU / disk tiers
//!   and the zig-zag block schedule that overlaps their movement with compute;
//! - [`compress`]: FlexLLMGen's 4-bit group-wise format of weights and KV cache;
//! - [`policy`]: machine profiles, the cost model and the search behind `placement: auto`;
//! - [`model`]: OPT configs, weights (safetensors checkpoints or `bench_core::dummy`), the layer
//!   math, and the [`model::weights::WeightStore`] through which generation reaches weights;
//! - [`generate`]: left-padded batched generation with a KV cache;
//! - [`runner`]: what the `flexbench-native` subcommands do (child protocol, generate) on the
//!   device a case names (cuda: unavailable, exit 4, where the probe finds no usable GPU);
//! - [`compress_speed`], [`disk_speed`]: the speed benchmarks behind `scripts/`;
//! - [`floor`]: the machine's matrix-product rate and memory bandwidth;
//! - [`huge_alloc`]: the runner's allocator (large blocks on transparent huge pages);
//! - [`backend`]: the orchestrator's `Backend` for the `native` framework.

pub mod backend;
pub mod compress;
pub mod compress_speed;
pub mod device;
pub mod disk_speed;
pub mod floor;
pub mod generate;
pub mod huge_alloc;
pub mod model;
pub mod offload;
pub mod policy;
pub mod runner;
pub mod schedule;

pub use backend::NativeBackend;
