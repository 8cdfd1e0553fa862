//! The disk-offload speed benchmark: weights 100% on disk on the CPU device; the rate at which
//! the decode phase reads weights against the disk's sequential O_DIRECT read bandwidth, both
//! measured in the same run on the same files.
//!
//! Virtual disks drift (here: 0.9 to 2.4 GB/s within a minute, with bursts), so one reference
//! read before and one after a generation says little. The benchmark runs in rounds: reference
//! read, generation, reference read, generation, ..., reference read; each round's ratio is its
//! decode rate over the mean of the reference reads on both sides of it, and the result is the
//! median round.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use bench_core::metrics::median;
use bench_core::Policy;
use serde::Serialize;

use crate::device::cpu::{CpuDevice, CpuOptions};
use crate::device::Device;
use crate::generate::GenOptions;
use crate::model::DummySource;
use crate::offload::direct::sequential_read;
use crate::offload::stats::Link;
use crate::runner::{bench_prompts, peak_rss_bytes};
use crate::schedule::{generate_offloaded, OffloadModel, ScheduleOptions};
use bench_core::dummy;

#[derive(Debug, Clone)]
pub struct DiskSpeedArgs {
    pub model: String,
    pub offload_dir: PathBuf,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    /// Block size of the reference sequential read (bytes).
    pub block: usize,
    /// Generations, each between two reference reads.
    pub rounds: usize,
    /// The policy's sep_layer: attention and MLP halves as separate weight units.
    pub sep_layer: bool,
}

/// One generation between two reference reads.
#[derive(Debug, Serialize)]
pub struct Round {
    /// Weight bytes read from disk during the decode steps, their wall time and rate.
    pub decode_read_bytes: u64,
    pub decode_s: f64,
    pub decode_read_gb_s: f64,
    /// The sequential O_DIRECT reads right before and right after.
    pub direct_read_gb_s_before: f64,
    pub direct_read_gb_s_after: f64,
    /// decode_read_gb_s / mean(before, after)
    pub ratio: f64,
    /// Time the disk thread spent in reads, over the generation's wall time.
    pub disk_busy_fraction: f64,
    pub step_times_s: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct DiskSpeedReport {
    pub model: String,
    pub sep_layer: bool,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub weight_file_bytes: u64,
    pub rounds: Vec<Round>,
    /// Medians over the rounds.
    pub decode_read_gb_s: f64,
    pub direct_read_gb_s: f64,
    pub ratio: f64,
    /// The reference read once more, beside a thread streaming through memory as decode's
    /// matrix products do: on virtual disks the disk's transfers compete with the CPU's memory
    /// traffic (here 1.55 GB/s beside it against 1.6-2.5 alone).
    pub direct_read_beside_memory_load_gb_s: f64,
    /// decode_read_gb_s / direct_read_beside_memory_load_gb_s
    pub ratio_beside_memory_load: f64,
    /// Over all rounds.
    pub io_wait_s: f64,
    pub compute_s: f64,
    pub disk_busy_fraction: f64,
    /// Time spent copying weights from the read buffers to the compute device, likewise.
    pub transfer_busy_fraction: f64,
    pub peak_memory_bytes: BTreeMap<String, u64>,
}

pub fn measure(a: &DiskSpeedArgs) -> Result<DiskSpeedReport> {
    ensure!(
        a.gen_len >= 2,
        "--gen-len must be at least 2 (one decode step)"
    );
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    let cfg = bench_core::model::lookup(&a.model)
        .with_context(|| format!("unknown model `{}`", a.model))?;
    let dev = CpuDevice::new(CpuOptions::default());
    let mut policy = Policy::new([0, 0, 100, 0, 100, 0]);
    policy.sep_layer = a.sep_layer;
    let src = DummySource::new(&cfg, dummy::DEFAULT_SEED);
    eprintln!(
        "writing {}'s weights to {} ...",
        cfg.name,
        a.offload_dir.display()
    );
    let model = OffloadModel::load(&dev, &src, &cfg, &policy, Some(&a.offload_dir), 0)?;
    let dir = model
        .offload_dir()
        .context("weights on disk have an offload directory")?
        .to_path_buf();
    let files = weight_files(&dir)?;
    let file_bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let reference = || -> Result<f64> {
        let (bytes, secs) = sequential_read(&files, a.block)?;
        Ok(bytes as f64 / secs / 1e9)
    };
    let prompts = bench_prompts(a.batch, a.prompt_len, cfg.vocab_size);
    let sched = ScheduleOptions {
        num_gpu_batches: 1,
        cpu_attention: false,
        overlap: true,
    };
    let opts = GenOptions::greedy(a.gen_len);
    // other processes' dirty pages (a build just before, say) would be written back during the
    // measurement, and the long decode phase suffers more from that than the short reference
    // reads: one run right after a release build read 0.66 of the reference, the next one 0.90
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    model.stats.reset_counters();
    let mut before = reference()?;
    let mut rounds = Vec::new();
    let mut wall = 0.0;
    for r in 0..a.rounds {
        eprintln!(
            "round {}/{}: sequential O_DIRECT read {before:.3} GB/s; generating ...",
            r + 1,
            a.rounds
        );
        let read0 = model.stats.bytes(Link::DiskRead);
        let busy0 = model.stats.disk_busy_s();
        let out = generate_offloaded(&dev, &model, &prompts, &opts, &sched)?;
        let read = model.stats.bytes(Link::DiskRead) - read0;
        // every step reads every weight file once; the prefetch runs ahead but stops at the
        // last step
        let per_step = read / a.gen_len as u64;
        let decode_steps = (out.step_times_s.len() - 1) as u64;
        let decode_s: f64 = out.step_times_s[1..].iter().sum();
        let decode_bytes = per_step * decode_steps;
        let rate = decode_bytes as f64 / decode_s / 1e9;
        let total_s: f64 = out.step_times_s.iter().sum();
        wall += total_s;
        let after = reference()?;
        rounds.push(Round {
            decode_read_bytes: decode_bytes,
            decode_s,
            decode_read_gb_s: rate,
            direct_read_gb_s_before: before,
            direct_read_gb_s_after: after,
            ratio: rate / ((before + after) / 2.0),
            disk_busy_fraction: (model.stats.disk_busy_s() - busy0) / total_s,
            step_times_s: out.step_times_s,
        });
        before = after;
    }
    let loaded = reference_beside_memory_load(&files, a.block)?;
    let mut peaks = model.stats.peaks();
    peaks.insert("host_rss".into(), peak_rss_bytes());
    eprintln!("{}", dev.name());
    let mut refs: Vec<f64> = rounds.iter().map(|r| r.direct_read_gb_s_before).collect();
    refs.extend(rounds.last().map(|r| r.direct_read_gb_s_after));
    let decode_rate = median(
        &rounds
            .iter()
            .map(|r| r.decode_read_gb_s)
            .collect::<Vec<_>>(),
    );
    Ok(DiskSpeedReport {
        model: cfg.name.clone(),
        sep_layer: a.sep_layer,
        batch: a.batch,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        weight_file_bytes: file_bytes,
        decode_read_gb_s: decode_rate,
        direct_read_gb_s: median(&refs),
        ratio: median(&rounds.iter().map(|r| r.ratio).collect::<Vec<_>>()),
        direct_read_beside_memory_load_gb_s: loaded,
        ratio_beside_memory_load: decode_rate / loaded,
        io_wait_s: model.stats.io_wait_s(),
        compute_s: model.stats.compute_s(),
        disk_busy_fraction: model.stats.disk_busy_s() / wall,
        transfer_busy_fraction: model.stats.xfer_busy_s() / wall,
        peak_memory_bytes: peaks,
        rounds,
    })
}

/// The sequential O_DIRECT read of `files` while another thread streams through 1 GiB of
/// memory, GB/s.
pub fn reference_beside_memory_load(files: &[PathBuf], block: usize) -> Result<f64> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let v = vec![1u64; 1 << 27];
            let mut acc = 0u64;
            while !stop.load(Ordering::Relaxed) {
                acc = acc.wrapping_add(v.iter().sum::<u64>());
            }
            std::hint::black_box(acc);
        });
        let r = sequential_read(files, block);
        stop.store(true, Ordering::Relaxed);
        let (bytes, secs) = r?;
        Ok(bytes as f64 / secs / 1e9)
    })
}

/// The weight files of an offload directory, in unit order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("weights-"))
        })
        .collect();
    v.sort();
    Ok(v)
}
