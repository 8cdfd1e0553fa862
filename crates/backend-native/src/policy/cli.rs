//! The `plan` and `calibrate` subcommands of `flexbench-native`: their flags and what they print.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bench_core::memory::{human, ByteSize, Capacity, MemoryLimits, TierBytes, SAFETY_MARGIN};
use bench_core::{Case, Device as CaseDevice, ModelConfig, Policy};
use serde::Serialize;

use super::cost::{estimate, Candidate, Estimate, WeightSplit};
use super::profile::{write_profile, MachineProfile};
use super::search::{search, Plan, Scored, Space};
use super::{workload, MACHINE_ENV};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlanDevice {
    Cpu,
    Cuda,
}

impl From<PlanDevice> for CaseDevice {
    fn from(d: PlanDevice) -> CaseDevice {
        match d {
            PlanDevice::Cpu => CaseDevice::Cpu,
            PlanDevice::Cuda => CaseDevice::Cuda,
        }
    }
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    ByteSize::parse(s)
}

/// `flexbench-native plan`: the best policy and batch for a model and shape on a machine, or
/// the prediction of a given policy.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// Plan this case file (a case with `placement: auto` or `gpu_batch_size: auto`, as the
    /// orchestrator writes it) and print it resolved; the other shape flags are then not given.
    #[arg(long, conflicts_with_all = ["model", "prompt_len", "gen_len"])]
    pub case: Option<PathBuf>,
    /// Registry model (e.g. opt-30b).
    #[arg(long, required_unless_present = "case")]
    pub model: Option<String>,
    #[arg(long, required_unless_present = "case")]
    pub prompt_len: Option<usize>,
    #[arg(long, required_unless_present = "case")]
    pub gen_len: Option<usize>,
    /// The machine: a named profile (flexllmgen-t4) or a profile file; default: $FLEXBENCH_MACHINE,
    /// else this machine's calibrated profile (calibrated now if none is cached).
    #[arg(long)]
    pub machine: Option<String>,
    /// Compute device of this machine's profile (default cpu; a named profile says its own).
    #[arg(long, value_enum)]
    pub device: Option<PlanDevice>,
    /// Capacity of the compute tier (GPU memory; RAM on the CPU device), e.g. 16GiB; default:
    /// the profile's, or for this machine what is free.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub compute_mem: Option<ByteSize>,
    /// Capacity of the host tier (RAM), e.g. 200GiB.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub host_mem: Option<ByteSize>,
    /// Capacity of the disk tier, e.g. 1.5TB.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub disk_mem: Option<ByteSize>,
    /// 4-bit compression of weights and KV cache in every candidate.
    #[arg(long)]
    pub compress: bool,
    /// Predict this policy instead of searching: six percents (weight gpu, weight cpu, cache
    /// gpu, cache cpu, activation gpu, activation cpu).
    #[arg(long, num_args = 6, value_names = ["W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"])]
    pub percent: Option<Vec<u8>>,
    /// Fix the GPU batch size (with --percent: predict; without: search the policy for it).
    #[arg(long)]
    pub gpu_batch_size: Option<usize>,
    /// Fix the number of GPU batches (default 1 when --gpu-batch-size is given).
    #[arg(long, requires = "gpu_batch_size")]
    pub num_gpu_batches: Option<usize>,
    /// With --percent: attention over host and disk cache on the host.
    #[arg(long, requires = "percent")]
    pub cpu_attention: bool,
    /// With --percent: transfers and compute one after another.
    #[arg(long, requires = "percent")]
    pub no_overlap: bool,
    /// Where the disk tier would be (its free space, and this machine's disk rates when
    /// calibrating); default: the system's temporary directory.
    #[arg(long)]
    pub offload_dir: Option<PathBuf>,
    /// Share of each limit a plan may fill.
    #[arg(long, default_value_t = SAFETY_MARGIN)]
    pub margin: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `flexbench-native calibrate`: measures this machine into a profile.
#[derive(clap::Args, Debug)]
pub struct CalibrateArgs {
    /// Directory whose disk is measured (O_DIRECT writes and reads of a 512 MiB file); default:
    /// the system's temporary directory.
    #[arg(long)]
    pub offload_dir: Option<PathBuf>,
    /// Registry model whose layer shapes the products and attention are measured at.
    #[arg(long, default_value = "opt-1.3b")]
    pub model: String,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: PlanDevice,
    /// Write the profile here instead of this machine's cache entry.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the profile as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One row of a plan's table and JSON.
#[derive(Debug, Clone, Serialize)]
pub struct PlanRow {
    pub percent: [u8; 6],
    pub gpu_batch_size: usize,
    pub num_gpu_batches: usize,
    pub cpu_attention: bool,
    pub compress_weight: bool,
    pub compress_cache: bool,
    pub overlap: bool,
    pub predicted: Predicted,
    pub peak: TierBytes,
    /// The term deciding an overlapped prefill and decode layer.
    pub bound: Bound,
}

#[derive(Debug, Clone, Serialize)]
pub struct Predicted {
    pub prefill_latency_s: f64,
    pub decode_latency_s: f64,
    pub total_throughput: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bound {
    pub prefill: &'static str,
    pub decode: &'static str,
}

impl PlanRow {
    fn of(c: &Candidate, e: &Estimate) -> PlanRow {
        PlanRow {
            percent: c.policy.percent,
            gpu_batch_size: c.gpu_batch_size,
            num_gpu_batches: c.num_gpu_batches,
            cpu_attention: c.policy.cpu_attention,
            compress_weight: c.policy.compress_weight,
            compress_cache: c.policy.compress_cache,
            overlap: c.policy.overlap,
            predicted: Predicted {
                prefill_latency_s: e.prefill_latency_s,
                decode_latency_s: e.decode_latency_s,
                total_throughput: e.total_throughput,
            },
            peak: e.peak,
            bound: Bound {
                prefill: e.prefill_layer.bound(),
                decode: e.decode_layer.bound(),
            },
        }
    }
}

/// What `plan --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct PlanOutput {
    pub model: String,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub machine: String,
    pub device: CaseDevice,
    pub limits: TierBytes,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_ram: Option<u64>,
    pub margin: f64,
    /// The chosen (or the given) policy and batch, and its prediction.
    #[serde(flatten)]
    pub chosen: PlanRow,
    /// Whether the given policy fits the limits (a searched one always does).
    pub fits: bool,
    pub runners_up: Vec<PlanRow>,
    pub evaluated: usize,
    pub search_s: f64,
}

/// The limits of a plan: declared ones over the named profile's capacity, or over what this
/// machine has.
fn limits_for(
    declared: &MemoryLimits,
    named: Option<&MachineProfile>,
    device: CaseDevice,
    offload_dir: &Path,
) -> Capacity {
    let base = match named {
        Some(p) => Capacity {
            tiers: p.capacity,
            shared_ram: None,
        },
        None => bench_core::memory::machine_capacity(device, offload_dir),
    };
    bench_core::memory::with_declared(base, declared)
}

fn default_offload_dir(given: &Option<PathBuf>) -> PathBuf {
    given.clone().unwrap_or_else(std::env::temp_dir)
}

/// The profile: `--machine`, else $FLEXBENCH_MACHINE, else this machine's.
fn profile_of(
    machine: &Option<String>,
    device: CaseDevice,
    cfg: &ModelConfig,
    offload_dir: &Path,
) -> Result<(MachineProfile, bool)> {
    let named = machine
        .clone()
        .or_else(|| std::env::var(MACHINE_ENV).ok().filter(|s| !s.is_empty()));
    let is_named = named.is_some();
    let p = super::profile_for(
        named.as_deref(),
        device,
        cfg,
        &bench_core::dirs::cache_dir(),
        offload_dir,
    )?;
    Ok((p, is_named))
}

pub fn run_plan(a: &PlanArgs) -> Result<()> {
    anyhow::ensure!(
        a.margin > 0.0 && a.margin <= 1.0,
        "--margin {} must be in (0, 1]",
        a.margin
    );
    let offload_dir = default_offload_dir(&a.offload_dir);
    if let Some(path) = &a.case {
        return plan_case_file(a, path, &offload_dir);
    }
    let model = a.model.as_deref().expect("clap requires --model");
    let cfg = bench_core::model::lookup(model).with_context(|| {
        format!(
            "unknown model `{model}`; known: {}",
            bench_core::model::names().join(", ")
        )
    })?;
    let (prompt_len, gen_len) = (a.prompt_len.unwrap(), a.gen_len.unwrap());
    anyhow::ensure!(
        prompt_len >= 1 && gen_len >= 1,
        "--prompt-len and --gen-len must be at least 1"
    );
    anyhow::ensure!(
        prompt_len + gen_len <= cfg.max_position_embeddings,
        "--prompt-len + --gen-len = {} exceeds {}'s {} positions",
        prompt_len + gen_len,
        cfg.name,
        cfg.max_position_embeddings
    );
    let device_hint = a.device.map(CaseDevice::from);
    let (profile, named) = profile_of(
        &a.machine,
        device_hint.unwrap_or(CaseDevice::Cpu),
        &cfg,
        &offload_dir,
    )?;
    let device = if named {
        device_hint.unwrap_or(profile.device)
    } else {
        profile.device
    };
    let declared = MemoryLimits {
        compute: a.compute_mem,
        host: a.host_mem,
        disk: a.disk_mem,
    };
    let limits = limits_for(&declared, named.then_some(&profile), device, &offload_dir);
    let mut case = Case::example("native");
    case.model = cfg.name.clone();
    case.prompt_len = prompt_len;
    case.gen_len = gen_len;
    case.device = device;
    let w = workload(&case, &cfg);
    let mut base = Policy::new([100, 0, 100, 0, 100, 0]);
    base.compress_weight = a.compress;
    base.compress_cache = a.compress;
    let t0 = Instant::now();
    let out = match &a.percent {
        Some(p) => {
            let percent: [u8; 6] = p
                .as_slice()
                .try_into()
                .context("--percent takes six numbers")?;
            base.percent = percent;
            base.cpu_attention = a.cpu_attention;
            base.overlap = !a.no_overlap;
            base.validate()
                .map_err(|e| anyhow::anyhow!("--percent: {e}"))?;
            let c = Candidate {
                policy: base,
                gpu_batch_size: a.gpu_batch_size.unwrap_or(1),
                num_gpu_batches: a.num_gpu_batches.unwrap_or(1),
            };
            anyhow::ensure!(
                c.gpu_batch_size >= 1 && c.num_gpu_batches >= 1,
                "--gpu-batch-size and --num-gpu-batches must be at least 1"
            );
            let e = estimate(&profile, &w, &WeightSplit::of(&cfg, &c.policy), &c);
            let fits = limits.scaled(a.margin).exceeded(&e.peak).is_none();
            output(
                &cfg,
                &case,
                &profile,
                &limits,
                a.margin,
                PlanRow::of(&c, &e),
                fits,
                vec![],
                1,
                t0,
            )
        }
        None => {
            let space = Space {
                base,
                search_policy: true,
                batch: a
                    .gpu_batch_size
                    .map(|g| (g, a.num_gpu_batches.unwrap_or(1))),
                max_batch: bench_core::memory::MAX_AUTO_BATCH,
            };
            let plan =
                search(&profile, &w, &space, &limits, a.margin).map_err(|e| anyhow::anyhow!(e))?;
            plan_output(&cfg, &case, &profile, &limits, a.margin, &plan, t0)
        }
    };
    print_plan(&out, a.json)
}

#[allow(clippy::too_many_arguments)]
fn output(
    cfg: &ModelConfig,
    case: &Case,
    profile: &MachineProfile,
    limits: &Capacity,
    margin: f64,
    chosen: PlanRow,
    fits: bool,
    runners_up: Vec<PlanRow>,
    evaluated: usize,
    t0: Instant,
) -> PlanOutput {
    PlanOutput {
        model: cfg.name.clone(),
        prompt_len: case.prompt_len,
        gen_len: case.gen_len,
        machine: profile.describe(),
        device: case.device,
        limits: limits.tiers,
        shared_ram: limits.shared_ram,
        margin,
        chosen,
        fits,
        runners_up,
        evaluated,
        search_s: t0.elapsed().as_secs_f64(),
    }
}

fn plan_output(
    cfg: &ModelConfig,
    case: &Case,
    profile: &MachineProfile,
    limits: &Capacity,
    margin: f64,
    plan: &Plan,
    t0: Instant,
) -> PlanOutput {
    let row = |s: &Scored| PlanRow::of(&s.candidate, &s.estimate);
    output(
        cfg,
        case,
        profile,
        limits,
        margin,
        row(&plan.chosen),
        true,
        plan.runners_up.iter().map(row).collect(),
        plan.evaluated,
        t0,
    )
}

/// `plan --case FILE`: the case resolved, as `{"case": ..., "plan": ...}` (the orchestrator's
/// input) or a table.
fn plan_case_file(a: &PlanArgs, path: &Path, offload_dir: &Path) -> Result<()> {
    let case = bench_core::protocol::read_case(path)?;
    let cfg = super::case_config(&case)?;
    let (profile, named) = profile_of(&a.machine, case.device, &cfg, offload_dir)?;
    let limits = limits_for(
        &case.memory.unwrap_or_default(),
        named.then_some(&profile),
        case.device,
        offload_dir,
    );
    let t0 = Instant::now();
    let (resolved, plan) = super::resolve_case(&case, &cfg, &profile, &limits)?;
    let out = plan_output(&cfg, &case, &profile, &limits, SAFETY_MARGIN, &plan, t0);
    if a.json {
        println!("{}", serde_json::json!({ "case": resolved, "plan": out }));
        Ok(())
    } else {
        print_plan(&out, false)
    }
}

fn print_plan(out: &PlanOutput, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(out)?);
        return Ok(());
    }
    let lim = |b: u64| {
        if b == u64::MAX {
            "unlimited".into()
        } else {
            human(b)
        }
    };
    println!(
        "{} prompt {} gen {} on {} ({} device); limits compute {}, host {}, disk {}{}; plans fill at most {:.0}%",
        out.model,
        out.prompt_len,
        out.gen_len,
        out.machine,
        out.device.as_str(),
        lim(out.limits.compute),
        lim(out.limits.host),
        lim(out.limits.disk),
        out.shared_ram
            .map(|r| format!(" (compute + host within {} of RAM)", human(r)))
            .unwrap_or_default(),
        out.margin * 100.0
    );
    let header = [
        "",
        "percent",
        "batch",
        "cpu_attn",
        "prefill s",
        "decode s",
        "token/s",
        "peak compute",
        "peak host",
        "peak disk",
        "bound (prefill/decode)",
    ];
    let row = |tag: &str, r: &PlanRow| -> Vec<String> {
        vec![
            tag.to_string(),
            r.percent.map(|p| p.to_string()).join("/"),
            format!("{}x{}", r.gpu_batch_size, r.num_gpu_batches),
            if r.cpu_attention { "yes" } else { "no" }.into(),
            format!("{:.3}", r.predicted.prefill_latency_s),
            format!("{:.3}", r.predicted.decode_latency_s),
            format!("{:.3}", r.predicted.total_throughput),
            human(r.peak.compute),
            human(r.peak.host),
            human(r.peak.disk),
            format!("{}/{}", r.bound.prefill, r.bound.decode),
        ]
    };
    let mut rows = vec![row(
        if out.runners_up.is_empty() && out.evaluated == 1 {
            "given"
        } else {
            "chosen"
        },
        &out.chosen,
    )];
    for (i, r) in out.runners_up.iter().enumerate() {
        rows.push(row(&format!("#{}", i + 2), r));
    }
    print!("{}", bench_core::table::render(&header, &rows));
    if !out.fits {
        println!("the given policy does NOT fit these limits (with the margin)");
    }
    println!(
        "{} candidates costed in {:.2} s",
        out.evaluated, out.search_s
    );
    Ok(())
}

pub fn run_calibrate(a: &CalibrateArgs) -> Result<()> {
    let cfg = bench_core::model::lookup(&a.model).with_context(|| {
        format!(
            "unknown model `{}`; known: {}",
            a.model,
            bench_core::model::names().join(", ")
        )
    })?;
    let dir = default_offload_dir(&a.offload_dir);
    if !dir.is_dir() {
        bail!("--offload-dir {} is not a directory", dir.display());
    }
    let device = CaseDevice::from(a.device);
    let p = super::calibrate_here(device, &cfg, &dir)?;
    let path = match &a.out {
        Some(p) => p.clone(),
        None => super::cached_profile_path(&bench_core::dirs::cache_dir(), &dir, device, &cfg),
    };
    write_profile(&path, &p)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        let c = &p.compute;
        let l = &p.links;
        println!("{} -> {}", p.describe(), path.display());
        println!(
            "products: prefill {:.1} GFLOP/s, decode {:.1} GFLOP/s, weight reads {:.2} GB/s (4-bit {:.2} GB/s)",
            c.mm_prefill_flops / 1e9,
            c.mm_decode_flops / 1e9,
            c.weight_read_bps / 1e9,
            c.q4_weight_read_bps / 1e9
        );
        println!(
            "attention: prefill {:.1} GFLOP/s, decode {:.2} GFLOP/s, on the host {:.2} GFLOP/s",
            c.bmm_prefill_flops / 1e9,
            c.bmm_decode_flops / 1e9,
            c.cpu_attention_flops / 1e9
        );
        println!(
            "links: host->compute {:.2} GB/s, compute->host {:.2} GB/s, disk read {:.2} GB/s, write {:.2} GB/s",
            l.host_to_compute / 1e9,
            l.compute_to_host_cache / 1e9,
            l.disk_read / 1e9,
            l.disk_write_decode / 1e9
        );
        for n in &p.notes {
            println!("  {n}");
        }
    }
    Ok(())
}
