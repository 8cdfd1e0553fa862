//! Golden checkpoints on the CUDA device: transformers' greedy tokens must come out identical
//! (the fixtures of `scripts/make_golden.py`, the same ones `golden.rs` checks on the CPU).
//!
//! GPU-only, so `#[ignore]`d; run by `scripts/gpu-check.sh`. The CUDA device keeps activations
//! and the KV cache in fp16 (the CPU reference in f32), so logits are only expected within about
//! 1e-2 of transformers' f32 ones (printed per fixture); the tokens must still match exactly,
//! which every fixture's top-2 margin (> 0.01, checked) leaves room for.

use std::path::{Path, PathBuf};

use backend_native::device::cuda::CudaDevice;
use backend_native::device::Device;
use backend_native::generate::{generate, GenOptions, SampleMode};
use backend_native::model::weights::ModelWeights;
use backend_native::runner::open_checkpoint;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<Vec<u32>>,
    new_tokens: Vec<Vec<u32>>,
    logits: Vec<Vec<f32>>,
    max_new_tokens: usize,
    eos_token_id: u32,
    min_top2_margin: f64,
}

/// The fixture directory: this crate's when it exists (cargo test here), else the one under the
/// current directory (the carried test binary on the GPU machine runs from the repository root,
/// where the build machine's absolute path does not exist).
fn fixture(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let base = if built.is_dir() {
        built
    } else {
        PathBuf::from("crates/backend-native/tests/fixtures")
    };
    base.join(name)
}

/// max |a - b| / max |b|, as golden.rs measures it.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    num / b.iter().map(|y| y.abs()).fold(0f32, f32::max)
}

fn check(dev: &CudaDevice, name: &str) {
    let dir = fixture(name);
    let exp: Expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert!(
        exp.min_top2_margin > 0.01,
        "{name}: fixture margin {}",
        exp.min_top2_margin
    );
    let (cfg, ckpt) = open_checkpoint(&dir).unwrap();
    let w = ModelWeights::load(dev, &ckpt, &cfg).unwrap();
    let opts = GenOptions {
        max_new_tokens: exp.max_new_tokens,
        sample: SampleMode::Greedy,
        stop_token: Some(exp.eos_token_id),
        keep_logits: true,
        teacher: None,
    };
    let out = generate(dev, &cfg, &w, &exp.prompts, &opts).unwrap();
    let worst = out
        .logits
        .iter()
        .zip(&exp.logits)
        .map(|(a, b)| rel_err(a, b))
        .fold(0f32, f32::max);
    let same = out.new_tokens == exp.new_tokens;
    println!("GOLDEN {name} tokens_identical={same} worst_logit_err={worst:.3e}");
    assert!(
        same,
        "{name}: tokens differ from transformers'\n ours:   {:?}\n theirs: {:?}",
        out.new_tokens, exp.new_tokens
    );
    assert!(
        worst <= 2e-2,
        "{name}: logits differ by {worst:e} relative to max |logit|"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 (run by cargo xtask gpu-check / scripts/gpu-check.sh)"]
fn golden_checkpoints_on_cuda() {
    let dev = CudaDevice::new(0, None).expect("opening the CUDA device");
    println!("device: {}", dev.name());
    for name in ["prenorm_f32", "odd_f16", "postln_bf16"] {
        check(&dev, name);
    }
}
