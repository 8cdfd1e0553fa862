//! The three-tier offloader: weights, KV cache and activations placed on the compute device,
//! host memory and disk by FlexLLMGen's policy, and moved between them by background threads
//! while the compute thread works (see [`crate::schedule`]).
//!
//! - [`placement`]: the policy's percents -> a tier per weight tensor and per sequence's cache;
//! - [`weights`]: weights on their tiers, fetched to the compute device one unit at a time;
//! - [`cache`]: the KV cache split by whole sequences;
//! - [`direct`]: O_DIRECT files, aligned buffers, the offload directory;
//! - [`stats`]: bytes per link, memory per tier, I/O wait against compute time.
//!
//! "Compute memory" is whatever the [`crate::device::Device`] allocates; "host memory" is RAM
//! (where pinned buffers go once the compute device is CUDA); "disk" is files.

pub mod cache;
pub mod direct;
pub mod placement;
pub mod stats;
pub mod weights;

pub use placement::Tier;
