//! The offloader and the block schedule: the golden checkpoints give transformers' greedy tokens
//! for every placement, GPU-batch count, attention site and overlap setting; bad offload
//! directories fail before generation and leave nothing behind.

use std::path::{Path, PathBuf};

use backend_native::device::cpu::{CpuDevice, CpuOptions};
use backend_native::device::DType;
use backend_native::generate::{GenOptions, SampleMode};
use backend_native::model::{load_config, Checkpoint};
use backend_native::schedule::{generate_offloaded, OffloadModel, ScheduleOptions};
use bench_core::Policy;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<Vec<u32>>,
    new_tokens: Vec<Vec<u32>>,
    max_new_tokens: usize,
    eos_token_id: u32,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(dir: &Path) -> Expected {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap()
}

/// A fresh directory under the system temp dir for one test.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "flexbench-offload-test-{}-{tag}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

struct Setup {
    percent: [u8; 6],
    nb: usize,
    cpu_attention: bool,
    overlap: bool,
    kv: DType,
    /// Attention and MLP as separate schedule steps (FlexLLMGen's default) or whole layers.
    sep_layer: bool,
}

fn run(name: &str, s: &Setup, offload: &Path) -> Vec<Vec<u32>> {
    let dir = fixture(name);
    let exp = expected(&dir);
    let cfg = load_config(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let dev = CpuDevice::new(CpuOptions {
        kv_dtype: s.kv,
        ..Default::default()
    });
    let mut policy = Policy::new(s.percent);
    policy.cpu_attention = s.cpu_attention;
    policy.overlap = s.overlap;
    policy.sep_layer = s.sep_layer;
    let model = OffloadModel::load(&dev, &ckpt, &cfg, &policy, Some(offload), 0).unwrap();
    let opts = GenOptions {
        max_new_tokens: exp.max_new_tokens,
        sample: SampleMode::Greedy,
        stop_token: Some(exp.eos_token_id),
        keep_logits: false,
        teacher: None,
    };
    let sched = ScheduleOptions {
        num_gpu_batches: s.nb,
        cpu_attention: s.cpu_attention,
        overlap: s.overlap,
    };
    let out = generate_offloaded(&dev, &model, &exp.prompts, &opts, &sched).unwrap();
    // bytes really moved where the placement says they must
    let st = &model.stats;
    let (_, _, wdisk) = policy.weights();
    let (_, _, cdisk) = policy.cache();
    if wdisk > 0 || cdisk > 0 {
        assert!(
            st.bytes(backend_native::offload::stats::Link::DiskRead) > 0,
            "{:?}",
            s.percent
        );
    }
    if policy.activations().2 > 0 {
        assert!(
            st.bytes(backend_native::offload::stats::Link::DiskWrite) > 0,
            "activations on disk: {:?}",
            s.percent
        );
    }
    // (with GPU batches of one sequence a 50% split rounds the whole sequence to one side)
    if cdisk > 0 && s.nb == 1 {
        assert!(
            st.bytes(backend_native::offload::stats::Link::DiskWrite) > 0,
            "{:?}",
            s.percent
        );
    }
    out.new_tokens
}

const PLACEMENTS: &[[u8; 6]] = &[
    [100, 0, 100, 0, 100, 0], // all on the compute device
    [0, 100, 100, 0, 100, 0], // weights in host memory
    [0, 0, 100, 0, 100, 0],   // weights on disk
    [100, 0, 0, 100, 100, 0], // cache in host memory
    [100, 0, 0, 0, 100, 0],   // cache on disk
    [50, 50, 50, 50, 100, 0], // 50/50 compute/host splits
    [50, 0, 50, 0, 100, 0],   // 50/50 compute/disk splits
    [0, 50, 0, 50, 0, 100],   // 50/50 host/disk, activations on the host
    [20, 30, 30, 30, 100, 0], // three-way splits
    [0, 0, 0, 0, 0, 0],       // everything on disk, activations too
    [100, 0, 50, 50, 0, 0],   // activations on disk, the rest in memory
];

#[test]
fn every_placement_gives_transformers_tokens() {
    let off = scratch("placements");
    for name in ["prenorm_f32", "odd_f16", "postln_bf16"] {
        let exp = expected(&fixture(name));
        for &percent in PLACEMENTS {
            for nb in [1, 2, 3] {
                for cpu_attention in [false, true] {
                    for sep_layer in [true, false] {
                        let s = Setup {
                            percent,
                            nb,
                            cpu_attention,
                            overlap: true,
                            kv: DType::F32,
                            sep_layer,
                        };
                        let got = run(name, &s, &off);
                        assert_eq!(
                            got, exp.new_tokens,
                            "{name}: percent {percent:?}, {nb} GPU batches, cpu attention \
                             {cpu_attention}, sep_layer {sep_layer}"
                        );
                    }
                }
            }
        }
    }
    assert!(entries(&off).is_empty(), "stray files: {:?}", entries(&off));
    std::fs::remove_dir_all(&off).ok();
}

#[test]
fn fp16_cache_and_no_overlap_give_the_same_tokens() {
    let off = scratch("overlap");
    let exp = expected(&fixture("odd_f16"));
    for &percent in &[
        [0, 0, 0, 0, 100, 0],
        [50, 0, 50, 0, 100, 0],
        [0, 50, 0, 50, 0, 100],
    ] {
        for overlap in [false, true] {
            for cpu_attention in [false, true] {
                let s = Setup {
                    percent,
                    nb: 2,
                    cpu_attention,
                    overlap,
                    kv: DType::F16,
                    sep_layer: true,
                };
                assert_eq!(
                    run("odd_f16", &s, &off),
                    exp.new_tokens,
                    "percent {percent:?} overlap {overlap} cpu attention {cpu_attention}"
                );
            }
        }
    }
    assert!(entries(&off).is_empty(), "stray files: {:?}", entries(&off));
    std::fs::remove_dir_all(&off).ok();
}

/// Temperature sampling draws the same tokens through the schedule as through the plain path
/// (uniforms drawn per sequence in the same order), and every step's logits agree closely.
#[test]
fn sampling_and_logits_match_the_plain_path() {
    use backend_native::generate::generate;
    use backend_native::runner::load_cpu_model;
    let off = scratch("sampling");
    let dir = fixture("prenorm_f32");
    let exp = expected(&dir);
    let opts = GenOptions {
        max_new_tokens: exp.max_new_tokens,
        sample: SampleMode::Temperature {
            temperature: 0.8,
            seed: 7,
        },
        stop_token: None,
        keep_logits: true,
        teacher: None,
    };
    let kv = CpuOptions {
        kv_dtype: DType::F32,
        ..Default::default()
    };
    let (cfg, dev, w) = load_cpu_model(&dir, kv).unwrap();
    let plain = generate(&dev, &cfg, &w, &exp.prompts, &opts).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    for (percent, nb, cpu_attention) in [
        ([0, 0, 0, 0, 100, 0], 3, true),
        ([50, 50, 50, 50, 0, 100], 2, false),
    ] {
        let mut policy = Policy::new(percent);
        policy.cpu_attention = cpu_attention;
        let model = OffloadModel::load(&dev, &ckpt, &cfg, &policy, Some(&off), 0).unwrap();
        let sched = ScheduleOptions {
            num_gpu_batches: nb,
            cpu_attention,
            overlap: true,
        };
        let got = generate_offloaded(&dev, &model, &exp.prompts, &opts, &sched).unwrap();
        assert_eq!(got.new_tokens, plain.new_tokens, "{percent:?}");
        for (step, (a, b)) in got.logits.iter().zip(&plain.logits).enumerate() {
            let num = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            let den = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
            assert!(num / den < 1e-5, "{percent:?} step {step}: {}", num / den);
        }
    }
    assert!(entries(&off).is_empty());
    std::fs::remove_dir_all(&off).ok();
}

/// `flexbench-native generate` with FlexLLMGen's policy flags prints transformers' tokens, as
/// it does without them.
#[test]
fn policy_flags_of_generate_keep_the_tokens() {
    let off = scratch("cli");
    let dir = fixture("prenorm_f32");
    let exp = expected(&dir);
    let input = off.join("prompts.json");
    std::fs::write(
        &input,
        serde_json::json!({"prompts": exp.prompts, "max_new_tokens": exp.max_new_tokens})
            .to_string(),
    )
    .unwrap();
    let work = off.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let w = work.to_str().unwrap();
    let variants: &[&[&str]] = &[
        &[],
        &[
            "--percent",
            "0",
            "0",
            "0",
            "0",
            "100",
            "0",
            "--offload-dir",
            w,
        ],
        &[
            "--percent",
            "0",
            "50",
            "0",
            "50",
            "100",
            "0",
            "--offload-dir",
            w,
            "--sep-layer",
            "false",
            "--num-gpu-batches",
            "2",
        ],
        &[
            "--percent",
            "0",
            "0",
            "50",
            "0",
            "100",
            "0",
            "--offload-dir",
            w,
            "--cpu-attention",
            "--overlap",
            "false",
        ],
    ];
    for flags in variants {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flexbench-native"))
            .args(["generate", "--json", "--stop-at-eos", "--model"])
            .arg(&dir)
            .arg("--input")
            .arg(&input)
            .args(*flags)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let got: Vec<Vec<u32>> = serde_json::from_value(got["new_tokens"].clone()).unwrap();
        assert_eq!(got, exp.new_tokens, "{flags:?}");
    }
    assert!(
        entries(&work).is_empty(),
        "stray files: {:?}",
        entries(&work)
    );
    std::fs::remove_dir_all(&off).ok();
}
