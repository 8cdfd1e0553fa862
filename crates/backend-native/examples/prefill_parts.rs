//! Where an f32 prefill's matrix-product time goes, at OPT-125m shapes with distinct (cold)
//! weights per layer: `cargo run --release -p backend-native --example prefill_parts [rows]`.
use std::time::Instant;

use backend_native::device::cpu::{convert, matmul, MatmulMode};
use half::f16;

// the runner's allocator, so that memory behaves as in `flexbench-native`
#[global_allocator]
static ALLOC: backend_native::huge_alloc::HugePageAlloc = backend_native::huge_alloc::HugePageAlloc;

fn main() {
    rayon::scope(|_| run());
}

fn run() {
    let n: usize = std::env::args().nth(1).map_or(512, |s| s.parse().unwrap());
    let (h, f, layers) = (768, 3072, 12);
    let mut shapes = vec![];
    for _ in 0..layers {
        shapes.extend([(h, h), (h, h), (h, h), (h, h), (h, f), (f, h)]);
    }
    let ws: Vec<Vec<f16>> = shapes
        .iter()
        .enumerate()
        .map(|(s, &(k, m))| {
            (0..m * k)
                .map(|i| f16::from_f32(((i + s) % 13) as f32 * 0.01 - 0.06))
                .collect()
        })
        .collect();
    let x: Vec<f32> = (0..n * f).map(|i| (i % 17) as f32 * 0.01).collect();
    let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(_, m)| vec![0f32; n * m]).collect();
    let flops: f64 = shapes.iter().map(|&(k, m)| 2.0 * (n * k * m) as f64).sum();
    for mode in [MatmulMode::F32, MatmulMode::Bf16] {
        let mut times = vec![];
        let mut conv = vec![];
        for _ in 0..7 {
            let t = Instant::now();
            for ((&(k, m), w), out) in shapes.iter().zip(&ws).zip(&mut outs) {
                matmul::linear(mode, &x[..n * k], w, None, n, k, m, out);
            }
            times.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for w in &ws {
                std::hint::black_box(convert::to_f32(w));
            }
            conv.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        conv.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        println!(
            "{mode:?} n={n}: {:.1} ms per pass of all layers' products = {:.0} GFLOP/s; weight conversion alone {:.1} ms",
            med * 1e3,
            flops / med / 1e9,
            conv[conv.len() / 2] * 1e3
        );
    }
}
