//! Products with 4-bit compressed weights against the same products in fp16, at decode and
//! prefill row counts, on weights larger than the caches (a decode step streams them from
//! memory): `cargo run --release -p backend-native --example q4_products` (`Q4_ROWS=1,4` picks
//! the row counts, `Q4_REPS` the repetitions).
use std::time::Instant;

use backend_native::compress::compress_f16;
use backend_native::device::cpu::q4::Simd;
use backend_native::device::cpu::q4_matmul::{self, Q4Part};
use backend_native::device::cpu::{matmul, MatmulMode};
use half::f16;

// the runner's allocator, so that memory behaves as in `flexbench-native`
#[global_allocator]
static ALLOC: backend_native::huge_alloc::HugePageAlloc = backend_native::huge_alloc::HugePageAlloc;

fn main() {
    rayon::scope(|_| run());
}

/// Rows of x to time: `Q4_ROWS=1,4,128` or the default list.
fn rows() -> Vec<usize> {
    std::env::var("Q4_ROWS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 16, 32, 64, 96, 97, 128])
}

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    let reps = std::env::var("Q4_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(reps);
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn run() {
    // the first two shapes fit the caches: the kernels' own rate, without memory (the first is
    // short enough that starting the tasks weighs)
    for &(k, m) in &[(2048, 256), (2048, 1024), (2048, 8192), (8192, 2048)] {
        // several distinct weights, cycled, so that none stays in cache between products
        let ws: Vec<Vec<f16>> = (0..6)
            .map(|s| {
                (0..m * k)
                    .map(|i| f16::from_f32((((i * 7 + s) % 23) as f32 - 11.0) * 0.01))
                    .collect()
            })
            .collect();
        let qs: Vec<Vec<u8>> = ws.iter().map(|w| compress_f16(w, &[m, k], 0)).collect();
        for n in rows() {
            let x: Vec<f32> = (0..n * k).map(|i| (i % 17) as f32 * 0.01).collect();
            let mut out = vec![0f32; n * m];
            let mut i = 0;
            let fp16 = best_of(12, || {
                i += 1;
                matmul::linear(MatmulMode::F32, &x, &ws[i % 6], None, n, k, m, &mut out)
            });
            let mut q4 = |simd| {
                best_of(12, || {
                    i += 1;
                    let mut parts = [Q4Part {
                        w: &qs[i % 6],
                        m,
                        bias: None,
                        relu: false,
                        out: &mut out,
                    }];
                    q4_matmul::linear_group(MatmulMode::F32, simd, &x, n, k, &mut parts)
                })
            };
            let (fast, portable) = (q4(Simd::detect()), q4(Simd::Portable));
            println!(
                "n={n:4} k={k:5} m={m:5}: fp16 {:7.3} ms ({:5.1} GB/s), 4-bit {} {:7.3} ms ({:5.1} GB/s, {:.2}x), portable {:7.3} ms",
                fp16 * 1e3,
                (2 * m * k) as f64 / fp16 / 1e9,
                Simd::detect().name(),
                fast * 1e3,
                qs[0].len() as f64 / fast / 1e9,
                fp16 / fast,
                portable * 1e3
            );
        }
    }
}
