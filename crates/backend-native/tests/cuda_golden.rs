//! Golden checkpoints on the CUDA device: transformers' greedy tokens must come out identical
//! (the fixtures of `scripts/make_golden.py`, the same ones `golden.rs` checks on the CPU).
//!
//! GPU-only, so `#[ignore]`d; run by `scripts/gpu-check.sh`. The CUDA device keeps activations
//! and the KV cache in fp16 (the CPU reference in f32), so logits are only expected within about
//! 1e-2 of transformers' f32 ones (printed per fixture); the tokens must still match exactly,
//! which every fixture's top-2 margin (> 0.01, checked) leaves room for. With compression, the
//! trained fixture's perplexities (`scripts/train_tiny_opt.py`) are the check, resident and
//! offloaded.

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

#[derive(Deserialize)]
struct Reference {
    ppl: f64,
    tokens: usize,
}

#[derive(Deserialize)]
struct Trained {
    sequences: Vec<Vec<u32>>,
    fp16: Reference,
    q4_weights: Reference,
}

/// The accuracy of compression on CUDA: the trained fixture (tests/accuracy.rs checks the same
/// on the CPU) scored teacher-forced with 4-bit weights and cache, resident and offloaded, and
/// sparse attention; each line `GOLDEN score ...` goes to gpu-check's report.
#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 (run by cargo xtask gpu-check / scripts/gpu-check.sh)"]
fn trained_model_scores_on_cuda_with_compression() {
    use backend_native::runner::{score_of, score_options};
    use backend_native::schedule::{generate_offloaded, OffloadModel, ScheduleOptions};
    use bench_core::Policy;
    let dev = CudaDevice::new(0, None).expect("opening the CUDA device");
    let dir = fixture("trained_stdlib");
    let exp: Trained =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let (cfg, ckpt) = open_checkpoint(&dir).unwrap();
    let (prompts, opts) = score_options(&cfg, &exp.sequences).unwrap();
    let off = std::env::temp_dir().join(format!("flexbench-cuda-score-{}", std::process::id()));
    std::fs::create_dir_all(&off).unwrap();
    let with = |p: [u8; 6], f: fn(&mut Policy)| {
        let mut p = Policy::new(p);
        f(&mut p);
        p
    };
    // (label, policy, reference perplexity, relative bound)
    let cases = [
        (
            "fp16 resident",
            with([100, 0, 100, 0, 100, 0], |_| ()),
            exp.fp16.ppl,
            0.005,
        ),
        (
            "4-bit weights resident",
            with([100, 0, 100, 0, 100, 0], |p| p.compress_weight = true),
            exp.q4_weights.ppl,
            0.01,
        ),
        (
            "4-bit weights on host",
            with([0, 100, 100, 0, 100, 0], |p| p.compress_weight = true),
            exp.q4_weights.ppl,
            0.01,
        ),
        (
            "4-bit weights on disk",
            with([0, 0, 100, 0, 100, 0], |p| p.compress_weight = true),
            exp.q4_weights.ppl,
            0.01,
        ),
        (
            "4-bit cache resident",
            with([100, 0, 100, 0, 100, 0], |p| p.compress_cache = true),
            exp.fp16.ppl,
            0.05,
        ),
        (
            "4-bit cache on host, cpu attention",
            with([100, 0, 0, 100, 100, 0], |p| {
                p.compress_cache = true;
                p.cpu_attention = true;
            }),
            exp.fp16.ppl,
            0.05,
        ),
        (
            "4-bit cache on disk",
            with([100, 0, 0, 0, 100, 0], |p| p.compress_cache = true),
            exp.fp16.ppl,
            0.05,
        ),
        (
            "sparse attention 0.5",
            with([100, 0, 100, 0, 100, 0], |p| p.attn_sparsity = 0.5),
            exp.fp16.ppl,
            0.05,
        ),
    ];
    let mut failed = Vec::new();
    for (label, policy, want, bound) in cases {
        let model = OffloadModel::load(&dev, &ckpt, &cfg, &policy, Some(&off), 0).unwrap();
        let sched = ScheduleOptions {
            num_gpu_batches: 2,
            cpu_attention: policy.cpu_attention,
            overlap: true,
        };
        let s = score_of(&generate_offloaded(&dev, &model, &prompts, &opts, &sched).unwrap());
        let d = s.ppl / want - 1.0;
        println!(
            "GOLDEN score {label}: ppl {:.4} over {} tokens, reference {want:.4} ({:+.3}%, bound {:.1}%)",
            s.ppl,
            s.tokens,
            100.0 * d,
            100.0 * bound
        );
        assert_eq!(s.tokens, exp.fp16.tokens);
        if d.is_nan() || d.abs() >= bound {
            failed.push(label);
        }
    }
    std::fs::remove_dir_all(&off).ok();
    assert!(exp.q4_weights.tokens == exp.fp16.tokens);
    assert!(failed.is_empty(), "outside their bounds: {failed:?}");
}
