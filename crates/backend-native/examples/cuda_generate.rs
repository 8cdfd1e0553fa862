//! Whole-model generation on the CUDA device with dummy weights, everything resident on the GPU:
//! the "all on GPU" rows of gpu-check's short benchmark, measured through the engine's own
//! `generate()` (the runner's placements that need the offloader are run by the script through
//! `flexbench-native` and reported as they come out).
//!
//! `cuda_generate [MODEL ...]` (default opt-1.3b opt-6.7b): prompt 512, batch 4, one warm-up
//! token, then prefill + 8 decode steps timed by `generate()` (each step until its tokens are on
//! the host). Prints one `BENCH` line per model.

use std::time::Instant;

use anyhow::{Context, Result};
use backend_native::device::cuda::CudaDevice;
use backend_native::device::Device;
use backend_native::generate::{generate, GenOptions, SampleMode};
use backend_native::model::checkpoint::DummySource;
use backend_native::model::weights::ModelWeights;
use backend_native::runner::bench_prompts;
use bench_core::dummy::DEFAULT_SEED;

const BATCH: usize = 4;
const PROMPT: usize = 512;
const MEASURED_DECODE: usize = 8;

fn main() -> Result<()> {
    let models: Vec<String> = std::env::args().skip(1).collect();
    let models = if models.is_empty() {
        vec!["opt-1.3b".to_string(), "opt-6.7b".to_string()]
    } else {
        models
    };
    let dev = CudaDevice::new(0, None).context("opening the CUDA device")?;
    println!("device: {}", dev.name());
    for name in &models {
        let cfg =
            bench_core::model::lookup(name).with_context(|| format!("unknown model {name}"))?;
        let t0 = Instant::now();
        let src = DummySource::new(&cfg, DEFAULT_SEED);
        let weights = ModelWeights::load(&dev, &src, &cfg)
            .with_context(|| format!("loading {name} onto the GPU"))?;
        dev.synchronize()?;
        let load_s = t0.elapsed().as_secs_f64();
        let prompts = bench_prompts(BATCH, PROMPT, cfg.vocab_size);
        let opts = |n| GenOptions {
            max_new_tokens: n,
            sample: SampleMode::Greedy,
            stop_token: None,
            keep_logits: false,
            teacher: None,
        };
        generate(&dev, &cfg, &weights, &prompts, &opts(1)).context("warm-up")?;
        let out = generate(&dev, &cfg, &weights, &prompts, &opts(MEASURED_DECODE + 1))
            .context("measured generation")?;
        let prefill = out.step_times_s[0];
        let decode = &out.step_times_s[1..];
        let per_step = decode.iter().sum::<f64>() / decode.len() as f64;
        println!(
            "BENCH {name} all-gpu load_s={load_s:.1} prefill_s={prefill:.4} decode_s_per_step={per_step:.5} decode_tok_s={:.1} peak_pool_gib={:.2}",
            BATCH as f64 / per_step,
            dev.peak_memory_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64
        );
        drop(weights);
    }
    Ok(())
}
