//! Micro-benchmark of the CPU device's matrix products at OPT-125m shapes:
//! `cargo run --release -p backend-native --example ops`.
use std::time::Instant;

use backend_native::device::cpu::{matmul, MatmulMode};
use half::f16;

// the runner's allocator, so that memory behaves as in `flexbench-native`
#[global_allocator]
static ALLOC: backend_native::huge_alloc::HugePageAlloc = backend_native::huge_alloc::HugePageAlloc;

fn main() {
    for &(n, k, m) in &[
        (4, 768, 768),
        (4, 768, 3072),
        (4, 3072, 768),
        (4, 768, 50272),
        (16, 768, 3072),
        (16, 768, 50272),
        (512, 768, 3072),
        (4096, 768, 768),
        (4096, 768, 3072),
        (4096, 3072, 768),
    ] {
        let x: Vec<f32> = (0..n * k).map(|i| (i % 17) as f32 * 0.01).collect();
        let w: Vec<f16> = (0..m * k)
            .map(|i| f16::from_f32((i % 13) as f32 * 0.01))
            .collect();
        let mut out = vec![0f32; n * m];
        let packed = std::sync::OnceLock::new();
        let wide = std::sync::OnceLock::new();
        for mode in [MatmulMode::F32, MatmulMode::Bf16] {
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                matmul::linear_cached(
                    mode,
                    &x,
                    &w,
                    Some(&packed),
                    Some(&wide),
                    None,
                    false,
                    n,
                    k,
                    m,
                    &mut out,
                );
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gflops = 2.0 * (n * k * m) as f64 / best / 1e9;
            let gbs = (m * k * 2) as f64 / best / 1e9;
            println!("{mode:?} n={n:5} k={k:5} m={m:6}: {:8.3} ms  {gflops:7.1} GFLOP/s  {gbs:6.1} GB/s of weights", best * 1e3);
        }
    }
}
