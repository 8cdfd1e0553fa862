//! What the offloader measures: bytes over each link, memory per tier (current and peak), time
//! the compute thread waited for I/O and time it computed. Shared by the compute thread and the
//! I/O threads through atomics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::placement::Tier;

/// A data path between tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    DiskRead,
    DiskWrite,
    HostToCompute,
    ComputeToHost,
}

impl Link {
    pub const ALL: [Link; 4] = [
        Link::DiskRead,
        Link::DiskWrite,
        Link::HostToCompute,
        Link::ComputeToHost,
    ];
    /// The key in `RawResult.bytes_moved`.
    pub fn key(self) -> &'static str {
        match self {
            Link::DiskRead => "disk_read",
            Link::DiskWrite => "disk_write",
            Link::HostToCompute => "host_to_compute",
            Link::ComputeToHost => "compute_to_host",
        }
    }
}

const TIERS: [Tier; 3] = [Tier::Compute, Tier::Host, Tier::Disk];

#[derive(Default)]
pub struct Stats {
    moved: [AtomicU64; 4],
    current: [AtomicU64; 3],
    peak: [AtomicU64; 3],
    io_wait_ns: AtomicU64,
    compute_ns: AtomicU64,
    disk_busy_ns: AtomicU64,
    xfer_busy_ns: AtomicU64,
}

fn tier_index(t: Tier) -> usize {
    TIERS
        .iter()
        .position(|&x| x == t)
        .expect("every tier is listed")
}

impl Stats {
    pub fn new() -> Arc<Stats> {
        Arc::new(Stats::default())
    }
    pub fn moved(&self, link: Link, bytes: usize) {
        self.moved[link as usize].fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub fn bytes(&self, link: Link) -> u64 {
        self.moved[link as usize].load(Ordering::Relaxed)
    }
    pub fn alloc(&self, tier: Tier, bytes: usize) {
        let i = tier_index(tier);
        let now = self.current[i].fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        self.peak[i].fetch_max(now, Ordering::Relaxed);
    }
    pub fn free(&self, tier: Tier, bytes: usize) {
        self.current[tier_index(tier)].fetch_sub(bytes as u64, Ordering::Relaxed);
    }
    pub fn peak(&self, tier: Tier) -> u64 {
        self.peak[tier_index(tier)].load(Ordering::Relaxed)
    }
    pub fn add_io_wait(&self, s: f64) {
        self.io_wait_ns
            .fetch_add((s * 1e9) as u64, Ordering::Relaxed);
    }
    pub fn add_compute(&self, s: f64) {
        self.compute_ns
            .fetch_add((s * 1e9) as u64, Ordering::Relaxed);
    }
    /// Time the disk thread spent inside reads and writes.
    pub fn add_disk_busy(&self, s: f64) {
        self.disk_busy_ns
            .fetch_add((s * 1e9) as u64, Ordering::Relaxed);
    }
    /// Time spent copying between host memory and the compute device.
    pub fn add_xfer_busy(&self, s: f64) {
        self.xfer_busy_ns
            .fetch_add((s * 1e9) as u64, Ordering::Relaxed);
    }
    pub fn xfer_busy_s(&self) -> f64 {
        self.xfer_busy_ns.load(Ordering::Relaxed) as f64 / 1e9
    }
    pub fn disk_busy_s(&self) -> f64 {
        self.disk_busy_ns.load(Ordering::Relaxed) as f64 / 1e9
    }
    pub fn io_wait_s(&self) -> f64 {
        self.io_wait_ns.load(Ordering::Relaxed) as f64 / 1e9
    }
    pub fn compute_s(&self) -> f64 {
        self.compute_ns.load(Ordering::Relaxed) as f64 / 1e9
    }
    /// Zeroes the link counters and times (not the memory peaks): the measured run starts here.
    pub fn reset_counters(&self) {
        for m in &self.moved {
            m.store(0, Ordering::Relaxed);
        }
        self.io_wait_ns.store(0, Ordering::Relaxed);
        self.disk_busy_ns.store(0, Ordering::Relaxed);
        self.xfer_busy_ns.store(0, Ordering::Relaxed);
        self.compute_ns.store(0, Ordering::Relaxed);
    }
    /// Link counters as `RawResult.bytes_moved` wants them.
    pub fn bytes_moved(&self) -> BTreeMap<String, u64> {
        Link::ALL
            .iter()
            .map(|&l| (l.key().to_string(), self.bytes(l)))
            .collect()
    }
    /// Peak bytes per tier as `RawResult.peak_memory_bytes` wants them.
    pub fn peaks(&self) -> BTreeMap<String, u64> {
        TIERS
            .iter()
            .map(|&t| (t.as_str().to_string(), self.peak(t)))
            .collect()
    }
}

/// Accounts `bytes` on `tier` for as long as it lives.
pub struct MemGuard {
    stats: Arc<Stats>,
    tier: Tier,
    bytes: usize,
}

impl MemGuard {
    pub fn new(stats: &Arc<Stats>, tier: Tier, bytes: usize) -> MemGuard {
        stats.alloc(tier, bytes);
        MemGuard {
            stats: stats.clone(),
            tier,
            bytes,
        }
    }
}

impl Drop for MemGuard {
    fn drop(&mut self) {
        self.stats.free(self.tier, self.bytes);
    }
}
