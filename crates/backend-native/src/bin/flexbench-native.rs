//! `flexbench-native`: the native engine's runner.
//!
//! - `run-case`: the child protocol (case JSON in, one `FLEXBENCH_RESULT` line out);
//! - `generate`: greedy continuations of token-id prompts from a checkpoint;
//! - `score`: teacher-forced negative log-likelihood and perplexity of token-id sequences;
//! - `floor`: this machine's matrix-product rate and memory bandwidth;
//! - `calibrate`, `plan`: the machine profile, and the cost model's best (or given) policy;
//! - `disk-speed`, `compress-speed`: the speed benchmarks of `scripts/`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use backend_native::device::cpu::CpuDevice;
use backend_native::device::cpu::{CpuOptions, MatmulMode};
use backend_native::device::{is_out_of_memory, DType, Device};
use backend_native::generate::{generate, GenOptions, GenOutput, SampleMode};
use backend_native::model::ModelWeights;
use backend_native::runner;
use backend_native::schedule::{self, generate_offloaded, OffloadModel, ScheduleOptions};
use bench_core::protocol::{self, EXIT_OOM, EXIT_UNAVAILABLE};
use bench_core::{ModelConfig, Policy};
use clap::{Parser, Subcommand, ValueEnum};

#[global_allocator]
static ALLOC: backend_native::huge_alloc::HugePageAlloc = backend_native::huge_alloc::HugePageAlloc;

#[derive(Parser)]
#[command(
    name = "flexbench-native",
    version,
    about = "flexbench's native OPT engine (CPU and CUDA devices)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum KvDtype {
    F16,
    F32,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum Matmul {
    F32,
    Bf16,
}

#[derive(clap::Args, Clone)]
struct DeviceArgs {
    /// Math of the matrix products: f32 (default, the correctness reference) or bf16 (inputs
    /// rounded to bf16, f32 accumulation; for products of many rows, on CPUs with avx512_bf16).
    #[arg(long, value_enum, default_value = "f32")]
    matmul: Matmul,
    /// Storage of the KV cache: f16 (FlexLLMGen's, half the bytes) or f32 (exact reference).
    #[arg(long, value_enum, default_value = "f16")]
    kv_dtype: KvDtype,
    /// Threads of the compute pool (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

impl DeviceArgs {
    fn options(&self) -> CpuOptions {
        CpuOptions {
            kv_dtype: match self.kv_dtype {
                KvDtype::F16 => DType::F16,
                KvDtype::F32 => DType::F32,
            },
            matmul: match self.matmul {
                Matmul::F32 => MatmulMode::F32,
                Matmul::Bf16 => MatmulMode::Bf16,
            },
        }
    }
}

/// FlexLLMGen's policy flags. Any of them runs generation through the offloader and the block
/// schedule; the greedy tokens do not depend on them.
#[derive(clap::Args)]
struct PolicyArgs {
    /// Six percents: weight gpu, weight cpu, cache gpu, cache cpu, activation gpu, activation cpu
    /// (disk gets the rest of each pair; on the CPU device "gpu" is the compute device's RAM).
    #[arg(long, num_args = 6, value_names = ["W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"])]
    percent: Option<Vec<u8>>,
    /// Sequences per GPU batch (default: all prompts over --num-gpu-batches).
    #[arg(long)]
    gpu_batch_size: Option<usize>,
    /// GPU batches of the block schedule.
    #[arg(long)]
    num_gpu_batches: Option<usize>,
    /// Directory for the disk tier (a private subdirectory is made and removed in it).
    #[arg(long)]
    offload_dir: Option<PathBuf>,
    /// Attention over host and disk cache runs on the host.
    #[arg(long)]
    cpu_attention: bool,
    /// Overlap I/O with compute on background threads.
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    overlap: Option<bool>,
    /// Attention and MLP as separate schedule steps, each fetching its own weights (default
    /// true, as in FlexLLMGen); false fetches whole layers.
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    sep_layer: Option<bool>,
    /// Store the weights (every tensor of two or more dimensions) in FlexLLMGen's 4-bit
    /// group-wise form on every tier, decoded inside the products.
    #[arg(long)]
    compress_weight: bool,
    /// Store the KV cache in the 4-bit form (groups along head_dim).
    #[arg(long)]
    compress_cache: bool,
    /// Sparse attention: a decode query keeps the ceil(S x n) largest of its n attention
    /// weights, its own key always among them; in (0, 1], 1 = dense (default).
    #[arg(long, value_name = "S")]
    attn_sparsity: Option<f64>,
}

impl PolicyArgs {
    fn given(&self) -> bool {
        self.percent.is_some()
            || self.gpu_batch_size.is_some()
            || self.num_gpu_batches.is_some()
            || self.offload_dir.is_some()
            || self.cpu_attention
            || self.overlap.is_some()
            || self.sep_layer.is_some()
            || self.compress_weight
            || self.compress_cache
            || self.attn_sparsity.is_some()
    }

    /// The policy and schedule for `n` prompts.
    fn resolve(&self, n: usize) -> Result<(bench_core::Policy, ScheduleOptions)> {
        let percent: [u8; 6] = match &self.percent {
            Some(p) => p
                .as_slice()
                .try_into()
                .context("--percent takes six numbers")?,
            None => [100, 0, 100, 0, 100, 0],
        };
        let mut policy = bench_core::Policy::new(percent);
        policy.cpu_attention = self.cpu_attention;
        policy.overlap = self.overlap.unwrap_or(true);
        policy.sep_layer = self.sep_layer.unwrap_or(true);
        policy.compress_weight = self.compress_weight;
        policy.compress_cache = self.compress_cache;
        let s = self.attn_sparsity.unwrap_or(1.0);
        anyhow::ensure!(
            s > 0.0 && s <= 1.0,
            "--attn-sparsity {s}: must be in (0, 1] (1 = dense attention; 0.1 keeps a decode \
             query's largest tenth of its attention weights)"
        );
        policy.attn_sparsity = s;
        policy
            .validate()
            .map_err(|e| anyhow::anyhow!("--percent: {e}"))?;
        let nb = match (self.gpu_batch_size, self.num_gpu_batches) {
            (_, Some(nb)) => nb,
            (Some(gbs), None) => n.div_ceil(gbs.max(1)),
            (None, None) => 1,
        };
        runner::ensure_positive("--num-gpu-batches", nb)?;
        if let Some(gbs) = self.gpu_batch_size {
            runner::ensure_positive("--gpu-batch-size", gbs)?;
            let holds = gbs.checked_mul(nb).with_context(|| {
                format!("--gpu-batch-size {gbs} x --num-gpu-batches {nb} is more sequences than can be counted")
            })?;
            anyhow::ensure!(
                holds >= n,
                "--gpu-batch-size {gbs} x --num-gpu-batches {nb} holds {holds} sequences, the input has {n} prompts",
            );
        }
        Ok((
            policy.clone(),
            ScheduleOptions {
                num_gpu_batches: nb,
                cpu_attention: policy.cpu_attention,
                overlap: policy.overlap,
            },
        ))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one benchmark case (the child protocol): load the model, warm up with one-token
    /// generations, run the measured generation, print one `FLEXBENCH_RESULT {json}` line.
    /// Exit codes: 3 = out of memory, 4 = case unavailable in this build, 1 = other errors.
    RunCase {
        /// The case JSON file (default: the file named by $FLEXBENCH_CASE).
        #[arg(long)]
        case: Option<PathBuf>,
        /// Directory for offloaded tensors (used by placements with a disk tier).
        #[arg(long)]
        offload_dir: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Generate continuations of token-id prompts with a HuggingFace OPT checkpoint.
    /// The input file is `{"prompts": [[ids], ...], "max_new_tokens": N}`; prompts of different
    /// lengths are left-padded together.
    Generate {
        /// Checkpoint directory: config.json + model.safetensors (or a sharded index).
        #[arg(long)]
        model: PathBuf,
        /// The prompts JSON file.
        #[arg(long)]
        input: PathBuf,
        /// New tokens per prompt (overrides the file's max_new_tokens; default 16).
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// Sampling temperature; 0 = greedy (default).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Seed of temperature sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop a sequence at the model's eos token (later tokens are pads, as transformers).
        #[arg(long)]
        stop_at_eos: bool,
        /// Print {"new_tokens": [[...], ...]} instead of one line per prompt.
        #[arg(long)]
        json: bool,
        /// Compute device: cpu, or cuda (GPU 0; exits with code 4 where there is no usable GPU).
        /// With cuda the policy's "gpu" tier is device memory and its "cpu" tier pinned host
        /// memory; --matmul, --kv-dtype and --threads apply to the CPU device.
        #[arg(long = "device", value_enum, default_value = "cpu")]
        device_kind: DeviceKind,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Teacher-forced scoring of token-id sequences with a HuggingFace OPT checkpoint: every
    /// token i >= 1 of each sequence is predicted from its tokens 0..i-1 (one decode step per
    /// token). The input file is `{"sequences": [[ids], ...]}`; prints the sum of the negative
    /// log-likelihoods (natural log), the scored token count and the perplexity.
    Score {
        /// Checkpoint directory: config.json + model.safetensors (or a sharded index).
        #[arg(long)]
        model: PathBuf,
        /// The sequences JSON file.
        #[arg(long)]
        input: PathBuf,
        /// Print {"nll": .., "tokens": .., "ppl": ..}.
        #[arg(long)]
        json: bool,
        /// Compute device: cpu, or cuda (GPU 0; exits with code 4 where there is no usable GPU).
        #[arg(long = "device", value_enum, default_value = "cpu")]
        device_kind: DeviceKind,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// The disk-offload speed benchmark: dummy weights 100% on disk, greedy generation on the CPU
    /// device; prints the decode phase's weight read rate against the sequential O_DIRECT read
    /// bandwidth of the same files, in rounds (reference read, generation, reference read, ...)
    /// so that the disk's drift cancels, and the memory peaks, as JSON.
    DiskSpeed {
        /// Registry model (dummy weights).
        #[arg(long, default_value = "opt-1.3b")]
        model: String,
        /// Directory on the disk to measure.
        #[arg(long)]
        offload_dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 32)]
        prompt_len: usize,
        /// Tokens generated (prefill + gen_len - 1 decode steps).
        #[arg(long, default_value_t = 6)]
        gen_len: usize,
        /// Block size of the reference sequential read, MiB (dd's bs).
        #[arg(long, default_value_t = 16)]
        block_mib: usize,
        /// Generations, each between two reference reads (the ratio is the median round's).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Attention and MLP halves as separate weight units (FlexLLMGen's default); false reads
        /// whole layers.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
        sep_layer: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// The compression speed benchmark: decode with and without 4-bit compression on the CPU
    /// device (dummy weights), in alternating rounds: weights on disk at batch 1, weights in
    /// memory at batch 4, the KV cache on disk. Prints JSON (ratios, bytes read per token,
    /// memory peaks, which kernels ran).
    CompressSpeed {
        /// Registry model (dummy weights).
        #[arg(long, default_value = "opt-1.3b")]
        model: String,
        /// Directory on the disk to measure (room for the fp16 and 4-bit weights).
        #[arg(long)]
        offload_dir: PathBuf,
        #[arg(long, default_value_t = 32)]
        prompt_len: usize,
        /// Tokens generated per round (prefill + gen_len - 1 decode steps).
        #[arg(long, default_value_t = 6)]
        gen_len: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Batch of the KV-cache comparison.
        #[arg(long, default_value_t = 4)]
        cache_batch: usize,
        /// Prompt of the KV-cache comparison.
        #[arg(long, default_value_t = 256)]
        cache_prompt_len: usize,
        /// Run only these comparisons (disk, memory, cache); default all.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Measure this machine's floors: f32 matrix-product rate (GFLOP/s) of the CPU device's
    /// prefill path and memory read bandwidth (GB/s). Prints JSON.
    Floor {
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Measure the rates the cost model needs (products and attention at a model's shapes,
    /// host<->compute copies, O_DIRECT disk reads and writes) into this machine's profile,
    /// cached per machine; `plan` and `placement: auto` use it.
    Calibrate(backend_native::policy::cli::CalibrateArgs),
    /// The policy and batch of highest predicted throughput for a model and shape within the
    /// memory limits, with the runners-up; or, with --percent, the prediction of that policy.
    /// For this machine (its profile, calibrated if none is cached) or a named one
    /// (--machine flexllmgen-t4, the paper's T4 with FlexLLMGen's fitted constants).
    Plan(backend_native::policy::cli::PlanArgs),
}

fn print_tokens(tokens: &[Vec<u32>], json: bool) {
    if json {
        println!("{}", serde_json::json!({ "new_tokens": tokens }));
    } else {
        for (i, t) in tokens.iter().enumerate() {
            let s: Vec<String> = t.iter().map(|x| x.to_string()).collect();
            println!("{i}: {}", s.join(" "));
        }
    }
}

/// Runs `f` on a worker of the thread pool (`--threads`, else one per core). The engine's ops
/// are short parallel loops, and a loop started from a thread outside the pool hands its work
/// over and sleeps until it is done: two thread wake-ups per op, which made a decode-sized
/// matrix product (OPT-125m, batch 4) 2-3x slower than the same loop started from a worker.
fn on_pool<R: Send>(d: &DeviceArgs, f: impl FnOnce() -> R + Send) -> Result<R> {
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(n) = d.threads {
        b = b.num_threads(n);
    }
    b.build_global().context("setting up the thread pool")?;
    Ok(rayon::scope(|_| f()))
}

/// Keeps large freed blocks in the heap: the engine allocates activation-sized buffers every
/// op, and glibc's default (mmap above 128 KiB, unmap on free) makes each one fresh zeroed pages,
/// which cost more than the arithmetic on them. M_MMAP_MAX = 0 serves every allocation from the
/// heap (M_MMAP_THRESHOLD cannot exceed 32 MiB, smaller than prefill activations); the trim
/// threshold keeps freed memory for reuse.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let is_case = matches!(cli.cmd, Cmd::RunCase { .. });
    let result = run(cli);
    if let Some(table) = backend_native::device::cpu::profile::report() {
        eprint!("{table}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(reason) = runner::unavailable_reason(&e) {
                eprintln!("flexbench-native: case unavailable: {reason}");
                return ExitCode::from(EXIT_UNAVAILABLE as u8);
            }
            eprintln!("flexbench-native: error: {e:#}");
            if is_case && is_out_of_memory(&e) {
                return ExitCode::from(EXIT_OOM as u8);
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let device = match &cli.cmd {
        Cmd::RunCase { device, .. }
        | Cmd::Generate { device, .. }
        | Cmd::Score { device, .. }
        | Cmd::DiskSpeed { device, .. }
        | Cmd::CompressSpeed { device, .. }
        | Cmd::Floor { device } => device.clone(),
        Cmd::Calibrate(_) | Cmd::Plan(_) => DeviceArgs {
            matmul: Matmul::F32,
            kv_dtype: KvDtype::F16,
            threads: None,
        },
    };
    on_pool(&device, || run_on_pool(cli))?
}

fn run_on_pool(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Calibrate(a) => backend_native::policy::cli::run_calibrate(&a),
        Cmd::Plan(a) => backend_native::policy::cli::run_plan(&a),
        Cmd::RunCase {
            case,
            offload_dir,
            device,
        } => {
            let case = match case {
                Some(p) => protocol::read_case(&p)?,
                None => protocol::read_case_from_env()?,
            };
            let result = runner::run_case(&case, device.options(), offload_dir.as_deref())?;
            println!("{}", result.to_line());
            Ok(())
        }
        Cmd::Generate {
            model,
            input,
            max_new_tokens,
            temperature,
            seed,
            stop_at_eos,
            json,
            device_kind,
            policy,
            device,
        } => {
            let inp = runner::read_generate_input(&input)?;
            let n = max_new_tokens.or(inp.max_new_tokens).unwrap_or(16);
            runner::ensure_positive("max_new_tokens", n)?;
            let (cfg, ckpt) = runner::open_checkpoint(&model)?;
            let opts = GenOptions {
                max_new_tokens: n,
                sample: if temperature > 0.0 {
                    SampleMode::Temperature { temperature, seed }
                } else {
                    SampleMode::Greedy
                },
                stop_token: stop_at_eos.then_some(cfg.eos_token_id),
                keep_logits: false,
                teacher: None,
            };
            let placed = if policy.given() {
                Some(policy.resolve(inp.prompts.len())?)
            } else {
                None
            };
            let g = Generation {
                cfg: &cfg,
                ckpt: &ckpt,
                prompts: &inp.prompts,
                opts: &opts,
                placed: placed.as_ref(),
                offload_dir: policy.offload_dir.as_deref(),
            };
            let out = match device_kind {
                DeviceKind::Cpu => g.run(&CpuDevice::new(device.options()))?,
                DeviceKind::Cuda => g.run(&runner::open_cuda()?)?,
            };
            print_tokens(&out.new_tokens, json);
            Ok(())
        }
        Cmd::Score {
            model,
            input,
            json,
            device_kind,
            policy,
            device,
        } => {
            let inp = runner::read_score_input(&input)?;
            let (cfg, ckpt) = runner::open_checkpoint(&model)?;
            let (prompts, opts) = runner::score_options(&cfg, &inp.sequences)?;
            let placed = if policy.given() {
                Some(policy.resolve(prompts.len())?)
            } else {
                None
            };
            let g = Generation {
                cfg: &cfg,
                ckpt: &ckpt,
                prompts: &prompts,
                opts: &opts,
                placed: placed.as_ref(),
                offload_dir: policy.offload_dir.as_deref(),
            };
            let out = match device_kind {
                DeviceKind::Cpu => g.run(&CpuDevice::new(device.options()))?,
                DeviceKind::Cuda => g.run(&runner::open_cuda()?)?,
            };
            let score = runner::score_of(&out);
            if json {
                println!("{}", serde_json::to_string(&score)?);
            } else {
                println!(
                    "nll {:.6} over {} tokens: perplexity {:.6}",
                    score.nll, score.tokens, score.ppl
                );
            }
            Ok(())
        }
        Cmd::DiskSpeed {
            model,
            offload_dir,
            batch,
            prompt_len,
            gen_len,
            block_mib,
            rounds,
            sep_layer,
            device: _,
        } => {
            let r =
                backend_native::disk_speed::measure(&backend_native::disk_speed::DiskSpeedArgs {
                    model,
                    offload_dir,
                    batch,
                    prompt_len,
                    gen_len,
                    block: block_mib << 20,
                    rounds,
                    sep_layer,
                })?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::CompressSpeed {
            model,
            offload_dir,
            prompt_len,
            gen_len,
            rounds,
            cache_batch,
            cache_prompt_len,
            only,
            device: _,
        } => {
            let r = backend_native::compress_speed::measure(
                &backend_native::compress_speed::CompressSpeedArgs {
                    model,
                    offload_dir,
                    prompt_len,
                    gen_len,
                    rounds,
                    cache_batch,
                    cache_prompt_len,
                    only,
                },
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Floor { device: _ } => {
            let f = backend_native::floor::measure();
            println!("{}", serde_json::to_string(&f)?);
            Ok(())
        }
    }
}

/// One `generate` invocation, run on whichever device was asked for.
struct Generation<'a> {
    cfg: &'a ModelConfig,
    ckpt: &'a backend_native::model::Checkpoint,
    prompts: &'a [Vec<u32>],
    opts: &'a GenOptions,
    /// The policy flags, when given: generation goes through the offloader.
    placed: Option<&'a (Policy, ScheduleOptions)>,
    offload_dir: Option<&'a std::path::Path>,
}

impl Generation<'_> {
    fn run<D: Device>(&self, dev: &D) -> Result<GenOutput> {
        // Before any size is computed from them.
        backend_native::generate::check_prompts(self.cfg, self.prompts, self.opts.max_new_tokens)?;
        let Some((pol, sched)) = self.placed else {
            let w = ModelWeights::load(dev, self.ckpt, self.cfg)?;
            return generate(dev, self.cfg, &w, self.prompts, self.opts);
        };
        let prompt_len = self.prompts.iter().map(Vec::len).max().unwrap_or(0);
        let cache_disk = schedule::cache_disk_bytes(
            self.cfg,
            pol,
            dev.kv_dtype(),
            self.prompts.len(),
            sched.num_gpu_batches,
            prompt_len + self.opts.max_new_tokens,
        );
        let m = OffloadModel::load(dev, self.ckpt, self.cfg, pol, self.offload_dir, cache_disk)?;
        generate_offloaded(dev, &m, self.prompts, self.opts, sched)
    }
}
