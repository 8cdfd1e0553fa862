//! The state of one offloaded generation (`Run`), shared by the step loop and the modules
//! that move data for it, and the options it runs under ([`ScheduleOptions`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use anyhow::Result;

use super::model::OffloadModel;
use super::queue::{Pending, Queue};
use crate::device::cpu::CpuDevice;
use crate::device::Device;
use crate::offload::cache::{BatchCache, KvDims};
use crate::offload::direct::DirectFile;
use crate::offload::placement::Tier;
use crate::offload::stats::Stats;
use crate::offload::weights::Fetched;

/// How generation is scheduled.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleOptions {
    pub num_gpu_batches: usize,
    /// Attention over host and disk cache segments runs on the host (only q, k, v and the
    /// result move).
    pub cpu_attention: bool,
    /// Background I/O threads overlapping compute; off = every transfer runs when needed, on the
    /// compute thread.
    pub overlap: bool,
}

/// One offloaded generation in progress: what it reads (model, caches), the worker queues, and
/// the transfers in flight.
pub(super) struct Run<'a, D: Device> {
    pub(super) dev: &'a D,
    pub(super) model: &'a OffloadModel<D::Tensor>,
    pub(super) sched: &'a ScheduleOptions,
    pub(super) stats: &'a Arc<Stats>,
    pub(super) caches: &'a [Vec<BatchCache<D::Tensor>>],
    pub(super) dims: KvDims,
    pub(super) host_dev: &'a CpuDevice,
    pub(super) disk_q: Arc<Queue<'a>>,
    pub(super) xfer_q: Arc<Queue<'a>>,
    /// Index (step * units + unit) of the next weight fetch to submit.
    pub(super) fetch_next: usize,
    pub(super) fetch_total: usize,
    pub(super) fetches: VecDeque<Pending<Fetched<D::Tensor>>>,
    /// Disk writes of the cache per (layer, batch), awaited before that cache is read again.
    pub(super) stores: HashMap<(usize, usize), Pending<()>>,
    pub(super) act_tier: Tier,
    /// One file per GPU batch for hidden states on the disk tier (empty otherwise).
    pub(super) act_files: Vec<DirectFile>,
}

impl<'a, D: Device> Run<'a, D> {
    pub(super) fn units(&self) -> usize {
        self.model.weights.num_units()
    }

    /// Waits for every outstanding disk write.
    pub(super) fn finish(&mut self) -> Result<()> {
        self.fetches.clear();
        let mut first = Ok(());
        for (_, p) in self.stores.drain() {
            if let Err(e) = p.wait(self.stats, "writing the KV cache to disk") {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}
