//! Automatic policy: the machine [`profile`] (calibrated or named), the [`cost`] model of a
//! policy and batch (time per link and compute, peak memory per tier), the [`search`] for the
//! best one within the memory limits, and [`calibrate`]; here, what ties them to a case:
//! resolving `placement: auto` / `gpu_batch_size: auto`, and the runner's limit check.

pub mod calibrate;
pub mod cli;
pub mod cost;
pub mod profile;
pub mod search;

use std::path::Path;

use anyhow::{bail, Context, Result};
use bench_core::auto::{Auto, Prediction, Resolution};
use bench_core::memory::{human, Capacity, TierBytes, MAX_AUTO_BATCH, SAFETY_MARGIN};
use bench_core::{Case, Device as CaseDevice, ModelConfig, Placement};

use crate::device::DType;
use cost::{estimate, Candidate, Estimate, WeightSplit, Workload};
use profile::MachineProfile;
use search::{Plan, Space};

/// Environment variable naming the machine profile auto cases plan with (a name such as
/// `flexllmgen-t4`, or a profile file); unset = this machine's calibrated profile.
pub const MACHINE_ENV: &str = "FLEXBENCH_MACHINE";

/// What the cost model needs of a case.
pub fn workload(case: &Case, cfg: &ModelConfig) -> Workload {
    Workload {
        cfg: cfg.clone(),
        prompt_len: case.prompt_len,
        gen_len: case.gen_len,
        kv: DType::F16,
        compute_in_ram: case.device == CaseDevice::Cpu,
    }
}

/// The candidate a resolved case runs.
pub fn candidate(case: &Case) -> Candidate {
    Candidate {
        policy: case.placement.policy(),
        gpu_batch_size: case.gpu_batch_size,
        num_gpu_batches: case.num_gpu_batches,
    }
}

/// The cost model's figures for the policy and batch a case names.
pub fn predict(p: &MachineProfile, case: &Case, cfg: &ModelConfig) -> Estimate {
    let c = candidate(case);
    estimate(
        p,
        &workload(case, cfg),
        &WeightSplit::of(cfg, &c.policy),
        &c,
    )
}

/// Where this machine's calibrated profile is cached: per machine fingerprint, device and the
/// hidden size whose shapes it measured.
pub fn cached_profile_path(
    cache_dir: &Path,
    offload_dir: &Path,
    device: CaseDevice,
    cfg: &ModelConfig,
) -> std::path::PathBuf {
    let fp = bench_core::env::machine_fingerprint(offload_dir);
    cache_dir.join("profiles").join(format!(
        "{fp}-{}-h{}.json",
        device.as_str(),
        cfg.hidden_size
    ))
}

/// Measures this machine for `device` at `cfg`'s shapes.
pub fn calibrate_here(
    device: CaseDevice,
    cfg: &ModelConfig,
    offload_dir: &Path,
) -> Result<MachineProfile> {
    let host = crate::device::cpu::CpuDevice::default();
    match device {
        CaseDevice::Cpu => calibrate::calibrate(&host, &host, device, cfg, offload_dir),
        CaseDevice::Cuda => {
            let dev = crate::runner::open_cuda()?;
            calibrate::calibrate(&dev, &host, device, cfg, offload_dir)
        }
    }
}

/// The profile to plan `device` cases of `cfg` with: `machine` (a name or file) if given, else
/// this machine's, from the cache or calibrated now (and cached).
pub fn profile_for(
    machine: Option<&str>,
    device: CaseDevice,
    cfg: &ModelConfig,
    cache_dir: &Path,
    offload_dir: &Path,
) -> Result<MachineProfile> {
    if let Some(m) = machine {
        return MachineProfile::named_or_file(m);
    }
    let path = cached_profile_path(cache_dir, offload_dir, device, cfg);
    if path.is_file() {
        return MachineProfile::from_file(&path);
    }
    eprintln!(
        "flexbench-native: no machine profile for this machine's {} device at {}'s shapes yet: calibrating (about half a minute) into {}",
        device.as_str(),
        cfg.name,
        path.display()
    );
    let p = calibrate_here(device, cfg, offload_dir)?;
    profile::write_profile(&path, &p)?;
    Ok(p)
}

/// The cost model's figures for a case on this machine, when a profile is at hand: the one
/// `FLEXBENCH_MACHINE` names, or this machine's cached one (never calibrates: a runner must not
/// spend its case's time measuring the machine).
pub fn prediction_here(case: &Case, cfg: &ModelConfig, offload_dir: &Path) -> Option<Prediction> {
    let named = std::env::var(MACHINE_ENV).ok().filter(|s| !s.is_empty());
    let p = match named {
        Some(m) => MachineProfile::named_or_file(&m).ok()?,
        None => {
            let path = cached_profile_path(
                &bench_core::dirs::cache_dir(),
                offload_dir,
                case.device,
                cfg,
            );
            MachineProfile::from_file(&path).ok()?
        }
    };
    let e = predict(&p, case, cfg);
    Some(Prediction {
        prefill_latency_s: e.prefill_latency_s,
        decode_latency_s: e.decode_latency_s,
        total_throughput: e.total_throughput,
    })
}

/// The search space of an unresolved case.
pub fn space_of(case: &Case) -> Space {
    let auto = case.auto.clone().unwrap_or_default();
    let base = match &case.placement {
        Placement::Auto => bench_core::Policy::new([100, 0, 100, 0, 100, 0]),
        p => p.policy(),
    };
    Space {
        base,
        search_policy: auto.placement || case.placement == Placement::Auto,
        batch: (!auto.gpu_batch_size).then_some((case.gpu_batch_size, case.num_gpu_batches)),
        max_batch: MAX_AUTO_BATCH,
    }
}

/// Resolves a case's `auto` with the search on `p` within `limits` (the safety margin applied):
/// the case with the chosen policy and batch and its [`Resolution`], and the plan.
pub fn resolve_case(
    case: &Case,
    cfg: &ModelConfig,
    p: &MachineProfile,
    limits: &Capacity,
) -> Result<(Case, Plan)> {
    let w = workload(case, cfg);
    let plan = search::search(p, &w, &space_of(case), limits, SAFETY_MARGIN)
        .map_err(|e| anyhow::anyhow!(e))?;
    let c = &plan.chosen;
    let mut out = case.clone();
    out.placement = Placement::Policy(c.candidate.policy.clone());
    out.gpu_batch_size = c.candidate.gpu_batch_size;
    out.num_gpu_batches = c.candidate.num_gpu_batches;
    let auto = case.auto.clone().unwrap_or(Auto {
        placement: case.placement == Placement::Auto,
        ..Default::default()
    });
    out.auto = Some(Auto {
        placement: auto.placement || case.placement == Placement::Auto,
        gpu_batch_size: auto.gpu_batch_size,
        resolved: Some(Resolution {
            by: format!(
                "native planner: highest predicted total throughput of {} candidates within {:.0}% of each limit",
                plan.evaluated,
                SAFETY_MARGIN * 100.0
            ),
            profile: Some(p.describe()),
            limits: limits.tiers,
            planned_peak: Some(c.estimate.peak),
            predicted: Some(Prediction {
                prefill_latency_s: c.estimate.prefill_latency_s,
                decode_latency_s: c.estimate.decode_latency_s,
                total_throughput: c.estimate.total_throughput,
            }),
        }),
    });
    Ok((out, plan))
}

/// The declared limits of a case the planned peak of its policy exceeds: refused before it
/// runs, naming the tier and both numbers. Tiers the case leaves unset are the machine's,
/// checked by the runner's RAM check and by the allocations themselves.
pub fn check_declared_limits(case: &Case, cfg: &ModelConfig) -> Result<TierBytes> {
    let c = candidate(case);
    let w = workload(case, cfg);
    let peak = cost::planned_peak(&w, &WeightSplit::of(cfg, &c.policy), &c);
    let Some(limits) = case.memory else {
        return Ok(peak);
    };
    for (tier, limit, need) in [
        ("compute", limits.compute, peak.compute),
        ("host", limits.host, peak.host),
        ("disk", limits.disk, peak.disk),
    ] {
        if let Some(l) = limit {
            if need > l.0 {
                bail!(
                    "policy {} at batch {}x{} plans {} on the {tier} tier, over its limit of {} \
                     (memory.{tier}); move more to a lower tier, use a smaller batch, or raise the limit",
                    c.policy.label(),
                    c.gpu_batch_size,
                    c.num_gpu_batches,
                    human(need),
                    human(l.0)
                );
            }
        }
    }
    Ok(peak)
}

/// Reads the model config of a case (registry or checkpoint).
pub fn case_config(case: &Case) -> Result<ModelConfig> {
    match &case.weights {
        bench_core::Weights::Dummy => bench_core::model::lookup(&case.model)
            .with_context(|| format!("unknown model `{}`", case.model)),
        bench_core::Weights::Checkpoint(dir) => crate::model::load_config(dir),
    }
}
