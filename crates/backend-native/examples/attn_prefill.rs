//! Prefill attention alone at OPT-125m shapes (batch 4, 12 heads of 64, prompt 128), the f32
//! path: `cargo run --release -p backend-native --example attn_prefill [batch] [prompt]`.
use std::time::Instant;

use backend_native::device::cpu::{CpuDevice, CpuOptions};
use backend_native::device::{AttnShape, Device, HostSlice};

// the runner's allocator, so that memory behaves as in `flexbench-native`
#[global_allocator]
static ALLOC: backend_native::huge_alloc::HugePageAlloc = backend_native::huge_alloc::HugePageAlloc;

fn main() {
    rayon::scope(|_| run());
}

fn run() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (b, s) = (
        args.first().copied().unwrap_or(4),
        args.get(1).copied().unwrap_or(128),
    );
    let (h, d) = (12, 64);
    let dev = CpuDevice::new(CpuOptions::default());
    let shape = AttnShape::new(b, h, d, 0, s);
    let vals = |seed: usize| -> Vec<f32> {
        (0..b * s * h * d)
            .map(|i| (((i * 7919 + seed) % 1000) as f32 / 1000.0 - 0.5) * 0.3)
            .collect()
    };
    let up = |v: &[f32]| dev.upload(HostSlice::F32(v), &[b * s, h * d]).unwrap();
    let (q, k, v) = (up(&vals(1)), up(&vals(2)), up(&vals(3)));
    let mask: Vec<u32> = vec![1; b * s];
    let m = dev.upload(HostSlice::U32(&mask), &[b, s]).unwrap();
    let mut kc = dev.alloc_kv(b, h, s + 32, d).unwrap();
    let mut vc = dev.alloc_kv(b, h, s + 32, d).unwrap();
    dev.append_kv(&mut kc, &mut vc, &k, &v, shape).unwrap();
    let mut times = vec![];
    for _ in 0..20 {
        let t = Instant::now();
        for _ in 0..12 {
            std::hint::black_box(dev.attention(&q, &kc, &vc, &m, shape).unwrap());
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "b{b} p{s}: 12 layers of prefill attention {:.2} ms (median of 20)",
        times[10] * 1e3
    );
}
