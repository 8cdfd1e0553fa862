//! Decode-shaped matrix-vector products over a model's worth of distinct weights (cold caches,
//! as in a real decode step): `cargo run --release -p backend-native --example decode_bw`.
use std::time::Instant;

use backend_native::device::cpu::{matmul, MatmulMode};
use half::f16;

// the runner's allocator, so that memory behaves as in `flexbench-native`
#[global_allocator]
static ALLOC: backend_native::huge_alloc::HugePageAlloc = backend_native::huge_alloc::HugePageAlloc;

fn main() {
    // on a pool worker, as flexbench-native runs the engine
    rayon::scope(|_| run());
}

fn run() {
    let n: usize = std::env::args().nth(1).map_or(4, |s| s.parse().unwrap());
    let (h, f, v, layers) = (768, 3072, 50272, 12);
    let mut shapes = vec![];
    for _ in 0..layers {
        shapes.extend([(h, h), (h, h), (h, h), (h, h), (h, f), (f, h)]);
    }
    shapes.push((h, v));
    let ws: Vec<Vec<f16>> = shapes
        .iter()
        .enumerate()
        .map(|(s, &(k, m))| {
            (0..m * k)
                .map(|i| f16::from_f32(((i + s) % 13) as f32 * 0.01))
                .collect()
        })
        .collect();
    let bytes: usize = ws.iter().map(|w| w.len() * 2).sum();
    let x: Vec<f32> = (0..n * f).map(|i| (i % 17) as f32 * 0.01).collect();
    let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(_, m)| vec![0f32; n * m]).collect();
    for mode in [MatmulMode::F32, MatmulMode::Bf16] {
        let mut times = vec![];
        let mut per = [0f64; 3];
        for _ in 0..30 {
            let t = Instant::now();
            for ((&(k, m), w), out) in shapes.iter().zip(&ws).zip(&mut outs) {
                let t1 = Instant::now();
                matmul::linear(mode, &x[..n * k], w, None, n, k, m, out);
                let cls = if m == v {
                    2
                } else if k * m > h * h {
                    1
                } else {
                    0
                };
                per[cls] += t1.elapsed().as_secs_f64();
            }
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let gb = |b: usize, t: f64| b as f64 / (t / 30.0) / 1e9;
        println!(
            "  per step: attn-shaped {:.2} ms ({:.1} GB/s), mlp {:.2} ms ({:.1} GB/s), lm_head {:.2} ms ({:.1} GB/s)",
            per[0] * 1e3 / 30.0, gb(layers * 4 * h * h * 2, per[0]),
            per[1] * 1e3 / 30.0, gb(layers * 2 * h * f * 2, per[1]),
            per[2] * 1e3 / 30.0, gb(h * v * 2, per[2])
        );
        let med = times[times.len() / 2];
        println!(
            "{mode:?} n={n}: step {:.2} ms (best {:.2}), {:.1} GB/s of weights ({:.0} MB)",
            med * 1e3,
            times[0] * 1e3,
            bytes as f64 / med / 1e9,
            bytes as f64 / 1e6
        );
    }
}
