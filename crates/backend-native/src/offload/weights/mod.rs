//! Weights on tiers: every tensor lives whole on the compute device, in host memory or in a file
//! of the offload directory, and the schedule fetches them to the compute device one unit (the
//! input embedding, a decoder layer, the output head) at a time.
//!
//! A fetch has two stages so the disk never waits for a copy: [`TieredWeights::read_disk`] reads
//! the unit's disk tensors with one sequential O_DIRECT read into an aligned buffer (the disk
//! thread), [`TieredWeights::materialize`] copies host and disk tensors to the compute device
//! (the transfer thread). Host-tier tensors and disk read buffers live in the device's transfer
//! memory ([`crate::device::Device::alloc_host`]: pinned on CUDA), so on CUDA stage two only
//! queues copies on the upload stream ([`crate::device::Device::upload_async`]) and the compute
//! thread orders its kernels behind them with [`Fetched::ready`]: no host synchronisation
//! anywhere on the weight path.
//!
//! Where uploads are plain copies (the CPU device) a disk fetch is one job instead,
//! [`TieredWeights::fetch_staged`]: 8 MiB reads into a ring of three hot staging buffers, each
//! copied into its tensors as it arrives, which reads faster than DMA into unit-sized buffers.
//!
//! - [`plan`]: where each tensor goes ([`WeightPlan`]), over bench-core's tensor layout;
//! - [`store`]: [`TieredWeights`], the tensors put on their tiers and the unit files' layout;
//! - [`fetch`] (two stages) and [`staged`] (one job, CPU device): fetches into [`Fetched`]
//!   ([`fetched`]);
//! - [`pool`]: the host read buffers and compute buffers kept between fetches.

pub mod fetch;
pub mod fetched;
pub mod plan;
pub mod pool;
pub mod staged;
pub mod store;

pub use fetch::DiskRead;
pub use fetched::Fetched;
pub use plan::{TensorPlan, WeightPlan};
pub use pool::{ComputePool, PooledBuf};
pub use store::{TieredWeights, STAGE_BUFS, STAGE_CHUNK};
