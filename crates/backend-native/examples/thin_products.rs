//! Products of a few dozen rows by weights seen once (an offloaded prefill: each weight arrives
//! fresh from its tier, so no f32 copy is kept): `cargo run --release -p backend-native
//! --example thin_products`.
use std::time::Instant;

use backend_native::device::cpu::{matmul, MatmulMode};
use half::f16;

// the runner's allocator, so that memory behaves as in `flexbench-native`
#[global_allocator]
static ALLOC: backend_native::huge_alloc::HugePageAlloc = backend_native::huge_alloc::HugePageAlloc;

fn main() {
    rayon::scope(|_| run());
}

fn run() {
    for &(k, m) in &[(768, 3072), (2048, 8192), (4096, 16384)] {
        // distinct weights per repetition, as a stream of fetched units
        let ws: Vec<Vec<f16>> = (0..4)
            .map(|s| {
                (0..m * k)
                    .map(|i| f16::from_f32(((i + s) % 13) as f32 * 0.01))
                    .collect()
            })
            .collect();
        for n in [8, 16, 24, 32, 48, 64, 96, 128] {
            let x: Vec<f32> = (0..n * k).map(|i| (i % 17) as f32 * 0.01).collect();
            let mut out = vec![0f32; n * m];
            let mut best = f64::INFINITY;
            for w in ws.iter().cycle().take(8) {
                let t = Instant::now();
                matmul::linear(MatmulMode::F32, &x, w, None, n, k, m, &mut out);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gflops = 2.0 * (n * k * m) as f64 / best / 1e9;
            println!(
                "n={n:4} k={k:5} m={m:6}: {:8.3} ms {gflops:7.1} GFLOP/s",
                best * 1e3
            );
        }
    }
}
