//! Generation with offloading: the zig-zag block schedule over layers x GPU batches.
//!
//! For each token, each layer's weights are fetched once and used by every GPU batch before the
//! next layer (the zig-zag). With `sep_layer` (the policy's default, as in FlexLLMGen) a layer's
//! attention and MLP halves are separate steps, each with its own weight unit: 2L + 2 units per
//! token (input embedding, the halves, output head). Fetches run ahead on background threads by
//! [`LOOKAHEAD`] units, so the next layer's weights stream in while *all* GPU batches of this
//! layer compute, not only the first (the original synchronizes every step). The cache of GPU
//! batch k+1 loads while batch k computes; new keys and values go back to disk on the disk
//! thread. There is no global synchronize: the compute thread waits only for the one transfer it
//! needs next, and each (layer, batch) owns its buffers, so no workspace is shared between
//! batches.
//!
//! Threads: the compute thread (this one) runs the layer math; the *disk* thread runs O_DIRECT
//! reads and writes; the *transfer* thread copies between host memory and the compute device.
//! Each has a two-level queue: cache jobs, which the next compute step needs, go before weight
//! prefetches. On the CUDA device the transfer thread only queues copies out of pinned memory
//! on the upload stream ([`crate::device::Device::upload_async`]); the compute thread orders its
//! kernels behind them with [`crate::device::Device::wait_fence`] (an event wait on the compute
//! stream), so neither thread blocks on a copy.
//!
//! - [`model`]: [`OffloadModel`] and the checks and disk sizing done before a run;
//! - [`zigzag`]: [`generate_offloaded`] and the step loop itself, over the state in [`run`];
//! - [`queue`]: the worker threads' two-level queues and the results they hand back;
//! - [`prefetch`], [`cache_io`], [`hidden`]: the three kinds of data the loop moves (weight units,
//!   KV-cache segments, hidden states between layers);
//! - [`attention`]: the attention half of a layer, each cache segment where it lives.

pub mod attention;
pub mod cache_io;
pub mod hidden;
pub mod model;
pub mod prefetch;
pub mod queue;
pub mod run;
pub mod zigzag;

pub use model::{cache_disk_bytes, cache_dtype, check_policy, group_sizes, OffloadModel};
pub use prefetch::LOOKAHEAD;
pub use run::ScheduleOptions;
pub use zigzag::generate_offloaded;
