//! The three-tier offloader: weights, KV cache and activations placed on the compute device,
//! host memory and disk by FlexLLMGen's policy, and moved between them by background threads
//! while the compute thread works (see [`crate::schedule`]).
//!
//! - [`placement`]: the policy's percents -> a tier per weight tensor and per sequence's cache;
//! - [`weights`]: weights on their tiers, fetched to the compute device one unit at a time;
//! - [`cache`]: the KV cache split by whole sequences;
//! - [`direct`]: O_DIRECT files and the offload directory (the aligned buffers they need are
//!   [`crate::device::alloc`]'s, re-exported here);
//! - [`stats`]: bytes per link, memory per tier, I/O wait against compute time.
//!
//! "Compute memory" is whatever the [`crate::device::Device`] allocates; "host memory" is RAM;
//! "disk" is files.
//!
//! Pinned memory (the CUDA device): the host-tier weights of [`weights::TieredWeights::build`]
//! and the disk read buffers that [`weights::TieredWeights`] pools come from
//! [`crate::device::Device::alloc_host`] (pinned on CUDA, ordinary aligned memory on the CPU
//! device), and move up with [`crate::device::Device::upload_async`]: on CUDA a copy on the
//! upload stream whose event the compute stream waits on. The host segments of
//! [`cache::BatchCache::new`] stay ordinary memory (attention on the host reads them directly;
//! without CPU attention they move with plain, stream-ordered writes).
//!
//! On the CPU device compute and host memory are both RAM, yet kept apart (separate buffers,
//! explicit copies counted on the host_to_compute and compute_to_host links), so the same code
//! drives the CUDA device and the CPU device tests it.

pub mod cache;
pub mod direct;
pub mod placement;
pub mod stats;
pub mod weights;

pub use placement::Tier;
