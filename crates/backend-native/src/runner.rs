//! What the `flexbench-native` subcommands do: load a model, run a case under the child
//! protocol, generate for given prompts, measure the machine's floors.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use bench_core::{Case, Device as CaseDevice, ModelConfig, RawResult, Weights};

use crate::device::cpu::{CpuDevice, CpuOptions};
use crate::device::cuda::CudaDevice;
use crate::device::Device;
use crate::generate::{generate, GenOptions, GenOutput};
use crate::model::{load_config, Checkpoint, DummySource, ModelWeights, TensorSource};
use crate::schedule::{self, generate_offloaded, OffloadModel, ScheduleOptions};
use bench_core::dummy;

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
            bench_core::inputs::check_checkpoint_matches(case)?;
            let (cfg, ckpt) = open_checkpoint(dir)?;
            Ok((cfg, Box::new(ckpt)))
        }
    }
}

/// Whether this build can run the case; `Err(Unavailable)` says why not.
pub fn check_runnable(case: &Case) -> std::result::Result<(), Unavailable> {
    check_features(case)?;
    if case.device == CaseDevice::Cuda {
        cuda_available().map_err(Unavailable)?;
    }
    Ok(())
}

/// What the engine does not run whatever the machine: other frameworks, several devices. Every
/// policy feature (offloading, CPU attention, 4-bit weights and cache, sparse attention) it
/// runs on both devices.
pub fn check_features(case: &Case) -> std::result::Result<(), Unavailable> {
    if case.framework != "native" {
        return Err(Unavailable(format!(
            "framework `{}` is not the native engine",
            case.framework
        )));
    }
    if case.num_nodes * case.num_gpus_per_node != 1 {
        return Err(Unavailable("the native engine runs on one device".into()));
    }
    Ok(())
}

/// Whether this machine can run the CUDA device: the driver probe, then the cuBLAS libraries
/// (both plain dlopen checks before any cudarc call, which would panic on a missing library).
/// Answered once per process and cached: the orchestrator asks for every case of a grid.
pub fn cuda_available() -> std::result::Result<(), String> {
    static ANSWER: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    ANSWER
        .get_or_init(|| {
            crate::device::cuda::probe()?;
            crate::device::cuda::presence::probe_cublas()
        })
        .clone()
}

/// Opens GPU 0 for a case or a generation; a machine without a usable GPU gives
/// [`Unavailable`] with the probe's reason.
pub fn open_cuda() -> Result<CudaDevice> {
    cuda_available().map_err(Unavailable)?;
    CudaDevice::new(0, None).context("opening the CUDA device")
}

/// The benchmark's prompts: deterministic pseudo-random ids, never pad (1) or eos (2).
pub fn bench_prompts(batch: usize, prompt_len: usize, vocab: usize) -> Vec<Vec<u32>> {
    // The same ids the Python backends read, so tokens can be compared framework by framework.
    bench_core::prompts::tokens(batch, prompt_len, vocab)
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
/// attention on the device (the offloader's schedule would move nothing), fp16 weights and
/// cache and dense attention (compression and sparsity live in the offloader's model, whose
/// all-compute placement moves nothing either).
pub fn is_plain(case: &Case) -> bool {
    let p = case.placement.policy();
    p.percent[0] == 100
        && p.percent[2] == 100
        && p.percent[4] == 100
        && !p.cpu_attention
        && case.num_gpu_batches == 1
        && !p.compress_weight
        && !p.compress_cache
        && p.attn_sparsity >= 1.0
}

/// Runs a case on the device it names: load, warm up, measure; returns the raw result.
/// `offload_dir` holds the disk tier of placements that have one.
pub fn run_case(case: &Case, opts: CpuOptions, offload_dir: Option<&Path>) -> Result<RawResult> {
    case.validate()
        .map_err(|e| anyhow::anyhow!("invalid case: {e}"))?;
    if case.unresolved() {
        bail!(
            "the case leaves `auto` unresolved: the orchestrator plans it before the runner \
             starts (`flexbench-native plan --case FILE --json` prints it resolved)"
        );
    }
    check_runnable(case)?;
    let cfg = crate::policy::case_config(case)?;
    crate::policy::check_declared_limits(case, &cfg)?;
    let mut result = match case.device {
        CaseDevice::Cpu => run_case_on(&CpuDevice::new(opts), case, offload_dir),
        CaseDevice::Cuda => run_case_on(&open_cuda()?, case, offload_dir),
    }?;
    note_peaks_over_limits(case, &mut result);
    result.predicted = offload_dir.and_then(|d| crate::policy::prediction_here(case, &cfg, d));
    Ok(result)
}

/// Says so in the result when a measured peak went past a declared limit (the plan is meant
/// to keep every tier within it; this would be a planning error worth a look).
fn note_peaks_over_limits(case: &Case, result: &mut RawResult) {
    let Some(limits) = case.memory else {
        return;
    };
    for (tier, limit) in [
        ("compute", limits.compute),
        ("host", limits.host),
        ("disk", limits.disk),
    ] {
        let (Some(limit), Some(&peak)) = (limit, result.peak_memory_bytes.get(tier)) else {
            continue;
        };
        if peak > limit.0 {
            result.notes.push(format!(
                "measured peak of the {tier} tier {} is over its limit {}",
                bench_core::memory::human(peak),
                bench_core::memory::human(limit.0)
            ));
        }
    }
}

/// What the runner needs to know about a device beyond the [`Device`] trait.
pub trait RunnerDevice: Device {
    /// Whether the compute tier is host RAM (the CPU device): its weights then count against
    /// the RAM check, and host <-> compute "transfers" are memory copies.
    fn computes_in_ram(&self) -> bool;
    /// Peak bytes of the compute tier as the device itself measured them, where it can.
    fn measured_peak_bytes(&self) -> Option<u64>;
}

impl RunnerDevice for CpuDevice {
    fn computes_in_ram(&self) -> bool {
        true
    }
    fn measured_peak_bytes(&self) -> Option<u64> {
        None
    }
}

impl RunnerDevice for CudaDevice {
    fn computes_in_ram(&self) -> bool {
        false
    }
    fn measured_peak_bytes(&self) -> Option<u64> {
        self.peak_memory_bytes()
    }
}

/// [`run_case`] on an opened device.
pub fn run_case_on<D: RunnerDevice>(
    dev: &D,
    case: &Case,
    offload_dir: Option<&Path>,
) -> Result<RawResult> {
    if !is_plain(case) {
        return run_offloaded(dev, case, offload_dir);
    }
    let (cfg, src) = case_model(case)?;
    if dev.computes_in_ram() {
        check_ram(
            &cfg,
            case,
            resident_bytes(&cfg, case, dev.kv_dtype().size()),
        )?;
    }
    eprintln!(
        "loading {} ({}) on {}",
        cfg.name,
        src.describe(),
        dev.name()
    );
    let weights = ModelWeights::load(dev, src.as_ref(), &cfg)?;
    let prompts = bench_prompts(case.batch_size(), case.prompt_len, cfg.vocab_size);
    let mut result = measure(case, || {}, |o| generate(dev, &cfg, &weights, &prompts, o))?;
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
    let compute = dev.measured_peak_bytes().unwrap_or(wbytes + cache);
    result.peak_memory_bytes.insert("compute".into(), compute);
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
    result.versions = versions(dev);
    Ok(result)
}

/// The measured part of a case, the same for every path: `case.warmup` one-token generations,
/// then `case.repetitions` measured ones (`after_warmup` runs in between, e.g. to zero I/O
/// counters); the result holds every repetition's step times and the last one's tokens.
fn measure(
    case: &Case,
    after_warmup: impl FnOnce(),
    mut run: impl FnMut(&GenOptions) -> Result<GenOutput>,
) -> Result<RawResult> {
    for _ in 0..case.warmup {
        run(&warmup_options()).context("warm-up generation")?;
    }
    after_warmup();
    let o = measured_options(case);
    let mut result = RawResult::default();
    let mut last = None;
    for r in 0..case.repetitions {
        let out = run(&o).with_context(|| format!("repetition {r}"))?;
        result.step_times_s.push(out.step_times_s);
        last = Some(out.new_tokens);
    }
    let tokens = last.unwrap_or_default();
    result.generated_tokens = tokens.iter().map(|t| t.len() as u64).sum();
    result.tokens = Some(tokens);
    Ok(result)
}

fn gen_len_of(case: &Case) -> usize {
    case.measured_gen_len()
}

fn warmup_options() -> GenOptions {
    GenOptions::greedy(1)
}

fn measured_options(case: &Case) -> GenOptions {
    GenOptions::greedy(case.measured_gen_len())
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
fn run_offloaded<D: RunnerDevice>(
    dev: &D,
    case: &Case,
    offload_dir: Option<&Path>,
) -> Result<RawResult> {
    let (cfg, src) = case_model(case)?;
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
        offload_ram_bytes(&cfg, case, dev.kv_dtype().size(), dev.computes_in_ram()),
    )?;
    eprintln!(
        "placing {} ({}) by policy {} on {}",
        cfg.name,
        src.describe(),
        policy.label(),
        dev.name()
    );
    let model = OffloadModel::load(dev, src.as_ref(), &cfg, &policy, offload_dir, cache_disk)?;
    let sched = schedule_options(case);
    let prompts = bench_prompts(case.batch_size(), case.prompt_len, cfg.vocab_size);
    let mut result = measure(
        case,
        || model.stats.reset_counters(),
        |o| generate_offloaded(dev, &model, &prompts, o, &sched),
    )?;
    result.peak_memory_bytes = model.stats.peaks();
    // where the weights live (the I/O-bound floor of a decode step is the bytes off the compute
    // tier over the link's bandwidth: gpu-check.sh computes it for weights in host memory)
    for (key, tier) in [
        ("weights_compute", crate::offload::Tier::Compute),
        ("weights_host", crate::offload::Tier::Host),
        ("weights_disk", crate::offload::Tier::Disk),
    ] {
        result
            .peak_memory_bytes
            .insert(key.into(), model.plan.bytes_on(tier));
    }
    result
        .peak_memory_bytes
        .insert("host_rss".into(), peak_rss_bytes());
    // Per repetition, as the protocol says (the counters ran over all of them).
    let reps = case.repetitions.max(1) as u64;
    result.bytes_moved = model
        .stats
        .bytes_moved()
        .into_iter()
        .map(|(k, v)| (k, v / reps))
        .collect();
    result.io_wait_s = Some(model.stats.io_wait_s());
    result.compute_s = Some(model.stats.compute_s());
    if let Some(peak) = dev.measured_peak_bytes() {
        // the device pool's own high-water mark, with the activations the tiers do not count
        result.peak_memory_bytes.insert("compute_pool".into(), peak);
    }
    result.versions = versions(dev);
    result.notes.push(if dev.computes_in_ram() {
        "on the CPU device the compute and host tiers are both RAM: host_to_compute and \
         compute_to_host are memory copies"
            .into()
    } else {
        "host tier: pinned host memory; host_to_compute and compute_to_host cross the PCIe link"
            .into()
    });
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
/// `compute_in_ram`: whether the compute tier is RAM too (the CPU device).
pub fn offload_ram_bytes(
    cfg: &ModelConfig,
    case: &Case,
    kv_bytes_per_value: usize,
    compute_in_ram: bool,
) -> u64 {
    use crate::offload::weights::WeightPlan;
    use crate::offload::Tier;
    let policy = case.placement.policy();
    let plan = WeightPlan::new(cfg, &policy, false);
    let on_compute = if compute_in_ram {
        plan.bytes_on(Tier::Compute)
    } else {
        0
    };
    let weights = on_compute + plan.bytes_on(Tier::Host);
    // each fetch in flight: a disk buffer and its compute copy
    let fetches = 2 * (schedule::LOOKAHEAD as u64 + 2) * plan.max_fetch_bytes();
    let (gpu_pct, cpu_pct, _) = policy.cache();
    let in_ram = cpu_pct as u64 + if compute_in_ram { gpu_pct as u64 } else { 0 };
    let tokens = (case.batch_size() * (case.prompt_len + case.gen_len)) as u64;
    let cache = 2 * tokens * (cfg.num_hidden_layers * cfg.hidden_size * kv_bytes_per_value) as u64;
    let cache_ram = cache * in_ram / 100 + cache / cfg.num_hidden_layers as u64 * 2;
    let rows = (case.batch_size() * case.prompt_len) as u64;
    let acts = rows * (cfg.ffn_dim + 6 * cfg.hidden_size) as u64 * 4;
    weights + fetches + cache_ram + acts
}

/// Bytes of host memory the case needs with everything resident: fp16 weights, the KV cache,
/// and the largest activations of the prefill (fc1's output and a few hidden-sized buffers).
pub fn resident_bytes(cfg: &ModelConfig, case: &Case, kv_bytes_per_value: usize) -> u64 {
    let weights: usize = bench_core::model::layout::checkpoint_tensors(cfg)
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

pub fn versions<D: Device>(dev: &D) -> BTreeMap<String, String> {
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

/// Input of `flexbench-native score`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreInput {
    pub sequences: Vec<Vec<u32>>,
}

pub fn read_score_input(path: &Path) -> Result<ScoreInput> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "parsing {}: expected {{\"sequences\": [[token ids], ...]}}",
            path.display()
        )
    })
}

/// What `score` prints: the sum of the negative log-likelihoods (natural log) of every scored
/// token, their count, and the perplexity `exp(nll / tokens)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Score {
    pub nll: f64,
    pub tokens: usize,
    pub ppl: f64,
}

/// Teacher-forced scoring of `sequences` with `cfg`: the prompts (each sequence's first token)
/// and the options under which generation scores token `i` of every sequence from its tokens
/// `0 .. i` (`i >= 1`), one decode step per token, so that the decode paths (compressed cache,
/// sparse attention) are the ones measured.
pub fn score_options(
    cfg: &ModelConfig,
    sequences: &[Vec<u32>],
) -> Result<(Vec<Vec<u32>>, GenOptions)> {
    anyhow::ensure!(!sequences.is_empty(), "no sequences to score");
    for (i, s) in sequences.iter().enumerate() {
        anyhow::ensure!(!s.is_empty(), "sequence {i} is empty");
        anyhow::ensure!(
            s.len() <= cfg.max_position_embeddings,
            "sequence {i} has {} tokens, more than {}'s {} positions: split it",
            s.len(),
            cfg.name,
            cfg.max_position_embeddings
        );
        if let Some(t) = s.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            bail!(
                "sequence {i} has token id {t}, outside {}'s vocabulary of {}",
                cfg.name,
                cfg.vocab_size
            );
        }
    }
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
    anyhow::ensure!(
        longest >= 2,
        "nothing to score: a sequence needs at least 2 tokens (token i is scored from 0..i)"
    );
    let prompts = sequences.iter().map(|s| s[..1].to_vec()).collect();
    let opts = GenOptions {
        teacher: Some(sequences.to_vec()),
        ..GenOptions::greedy(longest - 1)
    };
    Ok((prompts, opts))
}

/// The score of a teacher-forced generation.
pub fn score_of(out: &GenOutput) -> Score {
    let (nll, tokens) = out
        .nll
        .iter()
        .fold((0.0, 0), |(a, n), &(b, m)| (a + b, n + m));
    Score {
        nll,
        tokens,
        ppl: (nll / tokens.max(1) as f64).exp(),
    }
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

/// Bytes the case's offload files take: the weights its policy puts on disk and the disk
/// share of the KV cache (fp16, both devices' cache dtype). `None` when the model's shape
/// cannot be read (the runner reports that itself).
pub fn offload_disk_bytes(case: &Case) -> Option<u64> {
    let cfg = match &case.weights {
        Weights::Dummy => bench_core::model::lookup(&case.model)?,
        Weights::Checkpoint(dir) => load_config(dir).ok()?,
    };
    let policy = case.placement.policy();
    let weights = crate::offload::weights::WeightPlan::new(&cfg, &policy, false)
        .bytes_on(crate::offload::Tier::Disk);
    let cache = crate::schedule::cache_disk_bytes(
        &cfg,
        &policy,
        crate::device::DType::F16,
        case.batch_size(),
        case.num_gpu_batches,
        case.prompt_len + case.gen_len,
    );
    Some(weights + cache)
}
