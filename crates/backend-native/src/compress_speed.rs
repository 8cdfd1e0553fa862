//! The compression speed benchmark (`flexbench-native compress-speed`, run by
//! `scripts/compress_speed.sh`): decode with and without 4-bit compression on the CPU device,
//! both sides in one run, in alternating rounds (A, B, A, B, ...) so that a disk or a neighbour
//! drifting between minutes hits both alike; each side's figure is its median round.
//!
//! Three comparisons, dummy weights:
//! - weights 100% on disk, batch 1: compressed weights (goal: decode >= 2.5x the token/s, disk
//!   bytes read per token <= 0.3x);
//! - weights in memory, batch 4: compressed weights (goal: decode >= 1.5x);
//! - the KV cache on disk: compressed cache (goal: decode faster).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use bench_core::metrics::median;
use bench_core::Policy;
use serde::Serialize;

use crate::device::cpu::{CpuDevice, CpuOptions};
use crate::device::Device;
use crate::generate::GenOptions;
use crate::model::DummySource;
use crate::offload::stats::Link;
use crate::runner::{bench_prompts, peak_rss_bytes};
use crate::schedule::{cache_disk_bytes, generate_offloaded, OffloadModel, ScheduleOptions};

#[derive(Debug, Clone)]
pub struct CompressSpeedArgs {
    pub model: String,
    pub offload_dir: PathBuf,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub rounds: usize,
    /// Batch and prompt of the cache comparison (the cache must outweigh the rest of a step).
    pub cache_batch: usize,
    pub cache_prompt_len: usize,
    /// Which comparisons to run (all when empty): "disk", "memory", "cache".
    pub only: Vec<String>,
}

/// One side of a comparison.
#[derive(Debug, Serialize)]
pub struct Side {
    pub policy: String,
    /// Decode token/s of each round (batch x decode steps / decode time).
    pub decode_tok_s: Vec<f64>,
    pub median_decode_tok_s: f64,
    /// Disk bytes read per generated token, averaged over a generation's steps.
    pub disk_read_per_token: f64,
    /// Over the measured rounds: time the compute thread waited for I/O, computed, and the disk
    /// thread spent reading and writing, against the generations' wall time.
    pub io_wait_s: f64,
    pub compute_s: f64,
    pub disk_busy_fraction: f64,
    pub peak_memory_bytes: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Comparison {
    pub name: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub uncompressed: Side,
    pub compressed: Side,
    /// compressed / uncompressed median decode token/s
    pub speedup: f64,
    pub goal: String,
    pub goal_met: bool,
    /// compressed / uncompressed disk bytes per token (where the disk is read)
    pub disk_read_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct CompressSpeedReport {
    pub model: String,
    /// What ran: the device's name, with the instruction set of the 4-bit kernels.
    pub device: String,
    pub amx: bool,
    pub comparisons: Vec<Comparison>,
    pub host_rss_peak: u64,
}

struct Setup {
    name: &'static str,
    base: Policy,
    compressed: Policy,
    batch: usize,
    prompt_len: usize,
    goal: &'static str,
}

pub fn measure(a: &CompressSpeedArgs) -> Result<CompressSpeedReport> {
    ensure!(
        a.gen_len >= 2,
        "--gen-len must be at least 2 (one decode step)"
    );
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    let cfg = bench_core::model::lookup(&a.model)
        .with_context(|| format!("unknown model `{}`", a.model))?;
    let dev = CpuDevice::new(CpuOptions::default());
    let src = DummySource::new(&cfg, bench_core::dummy::DEFAULT_SEED);
    let with = |p: [u8; 6], f: fn(&mut Policy)| {
        let mut p = Policy::new(p);
        f(&mut p);
        p
    };
    let setups = [
        Setup {
            name: "disk",
            base: Policy::new([0, 0, 100, 0, 100, 0]),
            compressed: with([0, 0, 100, 0, 100, 0], |p| p.compress_weight = true),
            batch: 1,
            prompt_len: a.prompt_len,
            goal: "decode >= 2.5x, disk bytes per token <= 0.3x",
        },
        Setup {
            name: "memory",
            base: Policy::new([100, 0, 100, 0, 100, 0]),
            compressed: with([100, 0, 100, 0, 100, 0], |p| p.compress_weight = true),
            batch: 4,
            prompt_len: a.prompt_len,
            goal: "decode >= 1.5x",
        },
        Setup {
            name: "cache",
            base: Policy::new([100, 0, 0, 0, 100, 0]),
            compressed: with([100, 0, 0, 0, 100, 0], |p| p.compress_cache = true),
            batch: a.cache_batch,
            prompt_len: a.cache_prompt_len,
            goal: "decode faster",
        },
    ];
    let mut comparisons = Vec::new();
    for s in setups
        .iter()
        .filter(|s| a.only.is_empty() || a.only.iter().any(|o| o == s.name))
    {
        comparisons.push(compare(&dev, &cfg, &src, s, a)?);
    }
    Ok(CompressSpeedReport {
        model: cfg.name.clone(),
        device: dev.name(),
        amx: crate::device::cpu::amx::available(),
        comparisons,
        host_rss_peak: peak_rss_bytes(),
    })
}

fn compare(
    dev: &CpuDevice,
    cfg: &bench_core::ModelConfig,
    src: &DummySource,
    s: &Setup,
    a: &CompressSpeedArgs,
) -> Result<Comparison> {
    let prompts = bench_prompts(s.batch, s.prompt_len, cfg.vocab_size);
    let opts = GenOptions::greedy(a.gen_len);
    let sched = ScheduleOptions {
        num_gpu_batches: 1,
        cpu_attention: false,
        overlap: true,
    };
    let max_len = s.prompt_len + a.gen_len;
    let mut models = Vec::new();
    for p in [&s.base, &s.compressed] {
        eprintln!("{}: placing {} by {} ...", s.name, cfg.name, p.label());
        let extra = cache_disk_bytes(cfg, p, dev.kv_dtype(), s.batch, 1, max_len);
        let m = OffloadModel::load(dev, src, cfg, p, Some(&a.offload_dir), extra)?;
        // a warm-up generation: first-touch page faults and the staging buffers
        generate_offloaded(
            dev,
            &m,
            &prompts,
            &GenOptions {
                max_new_tokens: 1,
                ..opts.clone()
            },
            &sched,
        )?;
        models.push(m);
    }
    let mut rates = [Vec::new(), Vec::new()];
    let mut reads = [Vec::new(), Vec::new()];
    let mut wall = [0f64; 2];
    for m in &models {
        m.stats.reset_counters();
    }
    // other processes' dirty pages would be written back during the measurement
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    for r in 0..a.rounds {
        for (i, m) in models.iter().enumerate() {
            let read0 = m.stats.bytes(Link::DiskRead);
            let out = generate_offloaded(dev, m, &prompts, &opts, &sched)?;
            let read = m.stats.bytes(Link::DiskRead) - read0;
            let decode_s: f64 = out.step_times_s[1..].iter().sum();
            let steps = out.step_times_s.len() - 1;
            rates[i].push((s.batch * steps) as f64 / decode_s);
            wall[i] += out.step_times_s.iter().sum::<f64>();
            reads[i].push(read as f64 / (s.batch * out.step_times_s.len()) as f64);
            eprintln!(
                "{} round {}/{}: {} {:.3} token/s",
                s.name,
                r + 1,
                a.rounds,
                m.policy.label(),
                rates[i].last().unwrap_or(&0.0)
            );
        }
    }
    let side = |i: usize| {
        let m = &models[i];
        Side {
            policy: m.policy.label(),
            median_decode_tok_s: median(&rates[i]),
            decode_tok_s: rates[i].clone(),
            disk_read_per_token: median(&reads[i]),
            io_wait_s: m.stats.io_wait_s(),
            compute_s: m.stats.compute_s(),
            disk_busy_fraction: m.stats.disk_busy_s() / wall[i].max(1e-9),
            peak_memory_bytes: m.stats.peaks(),
        }
    };
    let (u, c) = (side(0), side(1));
    let speedup = c.median_decode_tok_s / u.median_decode_tok_s;
    let disk_read_ratio =
        (u.disk_read_per_token > 0.0).then(|| c.disk_read_per_token / u.disk_read_per_token);
    let goal_met = match s.name {
        "disk" => speedup >= 2.5 && disk_read_ratio.is_some_and(|r| r <= 0.3),
        "memory" => speedup >= 1.5,
        _ => speedup > 1.0,
    };
    Ok(Comparison {
        name: s.name.into(),
        batch: s.batch,
        prompt_len: s.prompt_len,
        gen_len: a.gen_len,
        uncompressed: u,
        compressed: c,
        speedup,
        goal: s.goal.into(),
        goal_met,
        disk_read_ratio,
    })
}
