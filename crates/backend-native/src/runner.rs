//! What the `flexbench-native` subcommands do: load a model, run a case under the child
//! protocol, generate for given prompts, measure the machine's floors.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use bench_core::{Case, Device as CaseDevice, ModelConfig, RawResult, Weights};

use crate::device::cpu::{CpuDevice, CpuOptions};
use crate::device::Device;
use crate::dummy;
use crate::generate::{generate, GenOptions, SampleMode};
use crate::model::{load_config, Checkpoint, DummySource, ModelWeights, TensorSource};
use crate::schedule::{self, generate_offloaded, OffloadModel, ScheduleOptions};

/// Why a case cannot run in this build; the runner exits with `EXIT_UNAVAILABLE`.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unavailable: {}", self.0)
    }
}
impl std::error::Error for Unavailable {}

/// The model config and weight source of a checkpoint directory.
pub fn open_checkpoint(dir: &Path) -> Result<(ModelConfig, Checkpoint)> {
    let cfg = load_config(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    ckpt.check_against(&cfg)?;
    if !crate::model::config::tied_lm_head(dir)? && !ckpt.contains("lm_head.weight") {
        anyhow::bail!(
            "{} sets tie_word_embeddings = false but the checkpoint has no lm_head.weight",
            dir.join("config.json").display()
        );
    }
    Ok((cfg, ckpt))
}

/// The model config and weight source of a case.
pub fn case_model(case: &Case) -> Result<(ModelConfig, Box<dyn TensorSource>)> {
    match &case.weights {
        Weights::Dummy => {
            let cfg = bench_core::model::lookup(&case.model).with_context(|| {
                format!(
                    "unknown model `{}`; known: {}",
                    case.model,
                    bench_core::model::names().join(", ")
                )
            })?;
            let src = DummySource::new(&cfg, dummy::DEFAULT_SEED);
            Ok((cfg, Box::new(src)))
        }
        Weights::Checkpoint(dir) => {
            let (cfg, ckpt) = open_checkpoint(dir)?;
            Ok((cfg, Box::new(ckpt)))
        }
    }
}

/// Whether this build can run the case; `Err(Unavailable)` says why not.
pub fn check_runnable(case: &Case) -> std::result::Result<(), Unavailable> {
    if case.framework != "native" {
        return Err(Unavailable(format!(
            "framework `{}` is not the native engine",
            case.framework
        )));
    }
    if case.device == CaseDevice::Cuda {
        return Err(Unavailable(
            "the native CUDA device is not built into this runner yet".into(),
        ));
    }
    let p = case.placement.policy();
    if p.compress_weight || p.compress_cache || p.attn_sparsity < 1.0 {
        return Err(Unavailable(
            "compression and sparse attention are not built yet".into(),
        ));
    }
    if crate::offload::placement::activation_tier(&p) == crate::offload::Tier::Disk {
        return Err(Unavailable(
            "activations on disk are not supported by the native engine".into(),
        ));
    }
    if case.num_nodes * case.num_gpus_per_node != 1 {
        return Err(Unavailable("the native engine runs on one device".into()));
    }
    Ok(())
}

/// The benchmark's prompts: deterministic pseudo-random ids, never pad (1) or eos (2).
pub fn bench_prompts(batch: usize, prompt_len: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = crate::generate::Rng::new(0x0b00_ca5e);
    let hi = vocab.max(4) as u64;
    (0..batch)
        .map(|_| {
            (0..prompt_len)
                .map(|_| (3 + rng.next_u64() % (hi - 3)) as u32)
                .collect()
        })
        .collect()
}

/// Peak resident set size of this process, bytes: `VmHWM` of /proc/self/status. (getrusage's
/// ru_maxrss is not used: Linux carries it across exec, so a runner started by a large parent,
/// such as a Python script with torch loaded, would report the parent's peak.)
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Whether the case runs on the plain path: everything on the compute device, one GPU batch,
/// attention on the device (the offloader's schedule would move nothing).
pub fn is_plain(case: &Case) -> bool {
    let p = case.placement.policy();
    p.percent[0] == 100
        && p.percent[2] == 100
        && p.percent[4] == 100
        && !p.cpu_attention
        && case.num_gpu_batches == 1
}

/// Runs a case: load, warm up, measure; returns the raw result. `offload_dir` holds the disk
/// tier of placements that have one.
pub fn run_case(case: &Case, opts: CpuOptions, offload_dir: Option<&Path>) -> Result<RawResult> {
    case.validate()
        .map_err(|e| anyhow::anyhow!("invalid case: {e}"))?;
    check_runnable(case)?;
    if !is_plain(case) {
        return run_offloaded(case, opts, offload_dir);
    }
    let (cfg, src) = case_model(case)?;
    let dev = CpuDevice::new(opts);
    check_fits_in_memory(&cfg, case, &dev)?;
    eprintln!(
        "loading {} ({}) on {}",
        cfg.name,
        src.describe(),
        dev.name()
    );
    let weights = ModelWeights::load(&dev, src.as_ref(), &cfg)?;
    let prompts = bench_prompts(case.batch_size(), case.prompt_len, cfg.vocab_size);
    for _ in 0..case.warmup {
        generate(&dev, &cfg, &weights, &prompts, &warmup_options())
            .context("warm-up generation")?;
    }
    let o = measured_options(case);
    let mut result = RawResult::default();
    let mut last = None;
    for r in 0..case.repetitions {
        let out = generate(&dev, &cfg, &weights, &prompts, &o)
            .with_context(|| format!("repetition {r}"))?;
        result.step_times_s.push(out.step_times_s);
        last = Some(out.new_tokens);
    }
    let tokens = last.unwrap_or_default();
    result.generated_tokens = tokens.iter().map(|t| t.len() as u64).sum();
    result.tokens = Some(tokens);
    result
        .peak_memory_bytes
        .insert("host_rss".into(), peak_rss_bytes());
    let wbytes = weights.size_bytes() as u64;
    result.peak_memory_bytes.insert("weights".into(), wbytes);
    let cache = (2
        * case.batch_size()
        * (case.prompt_len + gen_len_of(case))
        * cfg.num_hidden_layers
        * cfg.hidden_size
        * dev.kv_dtype().size()) as u64;
    result
        .peak_memory_bytes
        .insert("compute".into(), wbytes + cache);
    result.peak_memory_bytes.insert("host".into(), 0);
    result.peak_memory_bytes.insert("disk".into(), 0);
    // everything is resident on the compute device: no link carries bytes during generation
    for link in [
        "disk_read",
        "disk_write",
        "host_to_compute",
        "compute_to_host",
    ] {
        result.bytes_moved.insert(link.into(), 0);
    }
    result.versions = versions(&dev);
    Ok(result)
}

fn gen_len_of(case: &Case) -> usize {
    case.measured_gen_len()
}

fn warmup_options() -> GenOptions {
    GenOptions {
        max_new_tokens: 1,
        sample: SampleMode::Greedy,
        stop_token: None,
        keep_logits: false,
    }
}

fn measured_options(case: &Case) -> GenOptions {
    GenOptions {
        max_new_tokens: case.measured_gen_len(),
        sample: SampleMode::Greedy,
        stop_token: None,
        keep_logits: false,
    }
}

/// The schedule of a case's policy.
pub fn schedule_options(case: &Case) -> ScheduleOptions {
    let p = case.placement.policy();
    ScheduleOptions {
        num_gpu_batches: case.num_gpu_batches,
        cpu_attention: p.cpu_attention,
        overlap: p.overlap,
    }
}

/// A case through the offloader: weights, cache and activations on the policy's tiers, the
/// zig-zag block schedule over `num_gpu_batches` GPU batches.
fn run_offloaded(case: &Case, opts: CpuOptions, offload_dir: Option<&Path>) -> Result<RawResult> {
    let (cfg, src) = case_model(case)?;
    let dev = CpuDevice::new(opts);
    let policy = case.placement.policy();
    let max_len = case.prompt_len + case.measured_gen_len();
    let cache_disk = schedule::cache_disk_bytes(
        &cfg,
        &policy,
        dev.kv_dtype(),
        case.batch_size(),
        case.num_gpu_batches,
        max_len,
    );
    check_ram(
        &cfg,
        case,
        offload_ram_bytes(&cfg, case, dev.kv_dtype().size()),
    )?;
    eprintln!(
        "placing {} ({}) by policy {} on {}",
        cfg.name,
        src.describe(),
        policy.label(),
        dev.name()
    );
    let model = OffloadModel::load(&dev, src.as_ref(), &cfg, &policy, offload_dir, cache_disk)?;
    let sched = schedule_options(case);
    let prompts = bench_prompts(case.batch_size(), case.prompt_len, cfg.vocab_size);
    for _ in 0..case.warmup {
        generate_offloaded(&dev, &model, &prompts, &warmup_options(), &sched)
            .context("warm-up generation")?;
    }
    model.stats.reset_counters();
    let o = measured_options(case);
    let mut result = RawResult::default();
    let mut last = None;
    for r in 0..case.repetitions {
        let out = generate_offloaded(&dev, &model, &prompts, &o, &sched)
            .with_context(|| format!("repetition {r}"))?;
        result.step_times_s.push(out.step_times_s);
        last = Some(out.new_tokens);
    }
    let tokens = last.unwrap_or_default();
    result.generated_tokens = tokens.iter().map(|t| t.len() as u64).sum();
    result.tokens = Some(tokens);
    result.peak_memory_bytes = model.stats.peaks();
    result
        .peak_memory_bytes
        .insert("host_rss".into(), peak_rss_bytes());
    result.bytes_moved = model.stats.bytes_moved();
    result.io_wait_s = Some(model.stats.io_wait_s());
    result.compute_s = Some(model.stats.compute_s());
    result.versions = versions(&dev);
    result.notes.push(
        "on the CPU device the compute and host tiers are both RAM: host_to_compute and \
         compute_to_host are memory copies"
            .into(),
    );
    if crate::offload::direct::used_buffered_fallback() {
        result.notes.push(
            "the offload directory's filesystem refused O_DIRECT: disk I/O went through the page cache"
                .into(),
        );
    }
    Ok(result)
}

/// RAM an offloaded case needs: the weights on the compute and host tiers, the fetches in
/// flight, the cache segments in RAM, and the prefill's activations.
pub fn offload_ram_bytes(cfg: &ModelConfig, case: &Case, kv_bytes_per_value: usize) -> u64 {
    use crate::offload::weights::WeightPlan;
    use crate::offload::Tier;
    let policy = case.placement.policy();
    let plan = WeightPlan::new(cfg, &policy, false);
    let weights = plan.bytes_on(Tier::Compute) + plan.bytes_on(Tier::Host);
    // each fetch in flight: a disk buffer and its compute copy
    let fetches = 2 * (schedule::LOOKAHEAD as u64 + 2) * plan.max_fetch_bytes();
    let (_, _, disk_pct) = policy.cache();
    let tokens = (case.batch_size() * (case.prompt_len + case.gen_len)) as u64;
    let cache = 2 * tokens * (cfg.num_hidden_layers * cfg.hidden_size * kv_bytes_per_value) as u64;
    let cache_ram =
        cache * (100 - disk_pct as u64) / 100 + cache / cfg.num_hidden_layers as u64 * 2;
    let rows = (case.batch_size() * case.prompt_len) as u64;
    let acts = rows * (cfg.ffn_dim + 6 * cfg.hidden_size) as u64 * 4;
    weights + fetches + cache_ram + acts
}

/// Bytes of host memory the case needs with everything resident: fp16 weights, the KV cache,
/// and the largest activations of the prefill (fc1's output and a few hidden-sized buffers).
pub fn resident_bytes(cfg: &ModelConfig, case: &Case, kv_bytes_per_value: usize) -> u64 {
    let weights: usize = dummy::opt_tensor_specs(cfg)
        .iter()
        .map(|s| s.numel() * 2)
        .sum();
    let tokens = (case.batch_size() * (case.prompt_len + case.gen_len)) as u64;
    let cache = 2 * tokens * (cfg.num_hidden_layers * cfg.hidden_size * kv_bytes_per_value) as u64;
    let rows = (case.batch_size() * case.prompt_len) as u64;
    let acts = rows * (cfg.ffn_dim + 6 * cfg.hidden_size) as u64 * 4;
    weights as u64 + cache + acts
}

/// `MemAvailable` of /proc/meminfo, bytes (None where unknown).
pub fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Fails with [`OutOfMemory`] before loading when the case cannot fit in available memory: the
/// kernel's OOM killer would otherwise end the process without a word.
fn check_fits_in_memory(cfg: &ModelConfig, case: &Case, dev: &CpuDevice) -> Result<()> {
    check_ram(cfg, case, resident_bytes(cfg, case, dev.kv_dtype().size()))
}

fn check_ram(cfg: &ModelConfig, case: &Case, need: u64) -> Result<()> {
    if let Some(avail) = mem_available_bytes() {
        if need > avail {
            return Err(anyhow::Error::new(crate::device::OutOfMemory {
                device: "cpu".into(),
                bytes: need,
            }))
            .with_context(|| {
                format!(
                    "{} with batch {} needs about {:.1} GiB of RAM, {:.1} GiB are available",
                    cfg.name,
                    case.batch_size(),
                    need as f64 / (1u64 << 30) as f64,
                    avail as f64 / (1u64 << 30) as f64
                )
            });
        }
    }
    Ok(())
}

pub fn versions(dev: &CpuDevice) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    v.insert("flexbench-native".into(), env!("CARGO_PKG_VERSION").into());
    v.insert("device".into(), dev.name());
    v
}

/// Input of `flexbench-native generate`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateInput {
    pub prompts: Vec<Vec<u32>>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

pub fn read_generate_input(path: &Path) -> Result<GenerateInput> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "parsing {}: expected {{\"prompts\": [[token ids], ...], \"max_new_tokens\": N}}",
            path.display()
        )
    })
}

/// Loads a checkpoint onto the CPU device.
pub fn load_cpu_model(
    dir: &Path,
    opts: CpuOptions,
) -> Result<(
    ModelConfig,
    CpuDevice,
    ModelWeights<crate::device::cpu::CpuTensor>,
)> {
    let (cfg, ckpt) = open_checkpoint(dir)?;
    let dev = CpuDevice::new(opts);
    let w = ModelWeights::load(&dev, &ckpt, &cfg)?;
    Ok((cfg, dev, w))
}

pub fn unavailable_reason(err: &anyhow::Error) -> Option<String> {
    err.chain()
        .find_map(|e| e.downcast_ref::<Unavailable>().map(|u| u.0.clone()))
}

pub fn ensure_positive(name: &str, v: usize) -> Result<()> {
    if v == 0 {
        bail!("{name} must be at least 1");
    }
    Ok(())
}
