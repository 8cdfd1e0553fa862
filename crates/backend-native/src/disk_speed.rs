//! The disk-offload speed benchmark: weights 100% on disk on the CPU device; the rate at which
//! the decode phase reads weights against the disk's sequential O_DIRECT read bandwidth, both
//! measured in the same run on the same files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use bench_core::Policy;
use serde::Serialize;

use crate::device::cpu::{CpuDevice, CpuOptions};
use crate::device::Device;
use crate::dummy;
use crate::generate::{GenOptions, SampleMode};
use crate::model::DummySource;
use crate::offload::direct::sequential_read;
use crate::offload::stats::Link;
use crate::runner::{bench_prompts, peak_rss_bytes};
use crate::schedule::{generate_offloaded, OffloadModel, ScheduleOptions};

#[derive(Debug, Clone)]
pub struct DiskSpeedArgs {
    pub model: String,
    pub offload_dir: PathBuf,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    /// Block size of the reference sequential read (bytes).
    pub block: usize,
}

#[derive(Debug, Serialize)]
pub struct DiskSpeedReport {
    pub model: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub weight_file_bytes: u64,
    /// Weight bytes read from disk during the decode steps, and their wall time.
    pub decode_read_bytes: u64,
    pub decode_s: f64,
    pub decode_read_gb_s: f64,
    /// Sequential O_DIRECT reads of the same files, before and after the generation.
    pub direct_read_gb_s_before: f64,
    pub direct_read_gb_s_after: f64,
    /// decode_read_gb_s / mean(before, after)
    pub ratio: f64,
    pub io_wait_s: f64,
    pub compute_s: f64,
    /// Time the disk thread spent in reads, over the whole generation's wall time.
    pub disk_busy_fraction: f64,
    /// Time spent copying weights from the read buffers to the compute device, likewise.
    pub transfer_busy_fraction: f64,
    pub peak_memory_bytes: BTreeMap<String, u64>,
    pub step_times_s: Vec<f64>,
}

pub fn measure(a: &DiskSpeedArgs) -> Result<DiskSpeedReport> {
    ensure!(
        a.gen_len >= 2,
        "--gen-len must be at least 2 (one decode step)"
    );
    let cfg = bench_core::model::lookup(&a.model)
        .with_context(|| format!("unknown model `{}`", a.model))?;
    let dev = CpuDevice::new(CpuOptions::default());
    let policy = Policy::new([0, 0, 100, 0, 100, 0]);
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
    let (b0, s0) = sequential_read(&files, a.block)?;
    let before = b0 as f64 / s0 / 1e9;
    eprintln!("sequential O_DIRECT read: {before:.3} GB/s; generating ...");
    let prompts = bench_prompts(a.batch, a.prompt_len, cfg.vocab_size);
    let sched = ScheduleOptions {
        num_gpu_batches: 1,
        cpu_attention: false,
        overlap: true,
    };
    let opts = GenOptions {
        max_new_tokens: a.gen_len,
        sample: SampleMode::Greedy,
        stop_token: None,
        keep_logits: false,
    };
    model.stats.reset_counters();
    let out = generate_offloaded(&dev, &model, &prompts, &opts, &sched)?;
    let read = model.stats.bytes(Link::DiskRead);
    // every step reads every weight file once; the prefetch runs ahead but stops at the last step
    let per_step = read / a.gen_len as u64;
    let decode_steps = (out.step_times_s.len() - 1) as u64;
    let decode_s: f64 = out.step_times_s[1..].iter().sum();
    let decode_bytes = per_step * decode_steps;
    let rate = decode_bytes as f64 / decode_s / 1e9;
    let (b1, s1) = sequential_read(&files, a.block)?;
    let after = b1 as f64 / s1 / 1e9;
    let mut peaks = model.stats.peaks();
    peaks.insert("host_rss".into(), peak_rss_bytes());
    eprintln!("{}", dev.name());
    Ok(DiskSpeedReport {
        model: cfg.name.clone(),
        batch: a.batch,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        weight_file_bytes: file_bytes,
        decode_read_bytes: decode_bytes,
        decode_s,
        decode_read_gb_s: rate,
        direct_read_gb_s_before: before,
        direct_read_gb_s_after: after,
        ratio: rate / ((before + after) / 2.0),
        io_wait_s: model.stats.io_wait_s(),
        disk_busy_fraction: model.stats.disk_busy_s() / out.step_times_s.iter().sum::<f64>(),
        transfer_busy_fraction: model.stats.xfer_busy_s() / out.step_times_s.iter().sum::<f64>(),
        compute_s: model.stats.compute_s(),
        peak_memory_bytes: peaks,
        step_times_s: out.step_times_s,
    })
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
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
