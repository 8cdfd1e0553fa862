//! The offloader on the CUDA device: transformers' greedy tokens for offloaded placements, with
//! the GPU tier as device memory, the host tier as pinned memory (weights uploaded on the copy
//! stream, compute ordered behind them by events) and the disk tier as O_DIRECT files staged
//! through pinned buffers; attention on the host for a host-resident cache.
//!
//! GPU-only, so `#[ignore]`d; run by `scripts/gpu-check.sh` with `--ignored`. On a machine
//! without a GPU the CPU half of the same code runs in `offload.rs`.

use std::path::{Path, PathBuf};

use backend_native::device::cuda::CudaDevice;
use backend_native::device::Device;
use backend_native::generate::{GenOptions, SampleMode};
use backend_native::offload::stats::Link;
use backend_native::runner::open_checkpoint;
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

/// As in cuda_golden.rs: the crate's fixtures, or the ones under the repository root where the
/// carried binary runs.
fn fixture(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let base = if built.is_dir() {
        built
    } else {
        PathBuf::from("crates/backend-native/tests/fixtures")
    };
    base.join(name)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "flexbench-cuda-offload-{}-{tag}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Setup {
    label: &'static str,
    percent: [u8; 6],
    nb: usize,
    cpu_attention: bool,
    overlap: bool,
}

/// The placements the issue names (weights on CPU, cache on CPU with CPU attention, weights on
/// disk) and the mixed ones that exercise split caches and several GPU batches.
const SETUPS: &[Setup] = &[
    Setup {
        label: "weights-cpu",
        percent: [0, 100, 100, 0, 100, 0],
        nb: 1,
        cpu_attention: false,
        overlap: true,
    },
    Setup {
        label: "cache-cpu-cpu-attn",
        percent: [100, 0, 0, 100, 100, 0],
        nb: 1,
        cpu_attention: true,
        overlap: true,
    },
    Setup {
        label: "weights-disk",
        percent: [0, 0, 100, 0, 100, 0],
        nb: 1,
        cpu_attention: false,
        overlap: true,
    },
    Setup {
        label: "cache-cpu-gpu-attn",
        percent: [100, 0, 0, 100, 100, 0],
        nb: 2,
        cpu_attention: false,
        overlap: true,
    },
    Setup {
        label: "cache-disk-cpu-attn",
        percent: [100, 0, 0, 0, 100, 0],
        nb: 2,
        cpu_attention: true,
        overlap: true,
    },
    Setup {
        label: "three-way-splits",
        percent: [20, 30, 30, 30, 100, 0],
        nb: 3,
        cpu_attention: false,
        overlap: true,
    },
    Setup {
        label: "host-disk-acts-cpu-no-overlap",
        percent: [0, 50, 0, 50, 0, 100],
        nb: 2,
        cpu_attention: true,
        overlap: false,
    },
];

fn run(dev: &CudaDevice, name: &str, s: &Setup, off: &Path) {
    let dir = fixture(name);
    let exp: Expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let (cfg, ckpt) = open_checkpoint(&dir).unwrap();
    let mut policy = Policy::new(s.percent);
    policy.cpu_attention = s.cpu_attention;
    policy.overlap = s.overlap;
    let model = OffloadModel::load(dev, &ckpt, &cfg, &policy, Some(off), 0).unwrap();
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
    let out = generate_offloaded(dev, &model, &exp.prompts, &opts, &sched).unwrap();
    let st = &model.stats;
    let same = out.new_tokens == exp.new_tokens;
    println!(
        "CUDA_OFFLOAD {name} {} tokens_identical={same} host_to_compute={} disk_read={}",
        s.label,
        st.bytes(Link::HostToCompute),
        st.bytes(Link::DiskRead)
    );
    assert!(
        same,
        "{name} {}: tokens differ from transformers'\n ours:   {:?}\n theirs: {:?}",
        s.label, out.new_tokens, exp.new_tokens
    );
    let (wgpu, _, wdisk) = policy.weights();
    if wgpu < 100 {
        assert!(st.bytes(Link::HostToCompute) > 0, "{}", s.label);
    }
    if wdisk > 0 {
        assert!(st.bytes(Link::DiskRead) > 0, "{}", s.label);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn offloaded_placements_give_transformers_tokens_on_cuda() {
    let dev = CudaDevice::new(0, None).expect("opening the CUDA device");
    println!("device: {}", dev.name());
    let off = scratch("placements");
    for name in ["prenorm_f32", "odd_f16", "postln_bf16"] {
        for s in SETUPS {
            run(&dev, name, s, &off);
        }
    }
    let stray: Vec<_> = std::fs::read_dir(&off).unwrap().collect();
    assert!(stray.is_empty(), "stray offload files: {stray:?}");
    std::fs::remove_dir_all(&off).ok();
}

/// The host tier on CUDA is pinned memory, and uploads out of it are asynchronous: the device
/// tensor must hold the data once compute has waited on the fence, and a buffer that is not
/// pinned falls back to an ordered plain write.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_upload_async_from_pinned_and_plain_host_memory() {
    use backend_native::device::{AlignedBuf, DType};
    use half::f16;
    let dev = CudaDevice::new(0, None).expect("opening the CUDA device");
    let n = 3000;
    let vals: Vec<f16> = (0..n).map(|i| f16::from_f32(i as f32 * 0.25)).collect();
    for pinned in [true, false] {
        let mut buf = if pinned {
            dev.alloc_host(n * 2 + 100).unwrap()
        } else {
            AlignedBuf::new(n * 2 + 100).unwrap()
        };
        // data at a non-zero offset, as a unit's second tensor in a disk read buffer
        buf.f16s_mut(64, n).copy_from_slice(&vals);
        let mut t = dev.zeros(DType::F16, &[n]).unwrap();
        let fence = dev.upload_async(&mut t, 0, &buf, 64, n).unwrap();
        assert_eq!(fence.is_some(), pinned);
        if let Some(f) = &fence {
            dev.wait_fence(f).unwrap();
        }
        let got = dev.download_f32(&t).unwrap();
        let want: Vec<f32> = vals.iter().map(|v| v.to_f32()).collect();
        assert_eq!(got, want, "pinned {pinned}");
        if let Some(f) = fence {
            f.wait_host().unwrap();
        }
    }
}
