//! The machine's floors: the rates a benchmark figure is compared against (`flexbench-native
//! floor`). A matrix product's rate bounds compute-bound phases (prefill), memory read
//! bandwidth bounds bandwidth-bound ones (decode).

use std::time::Instant;

use half::f16;
use rayon::prelude::*;
use serde::Serialize;

use crate::device::cpu::{matmul, MatmulMode};

#[derive(Debug, Clone, Serialize)]
pub struct Floors {
    /// f32 GEMM rate of the CPU device's prefill path (fp16 weights), GFLOP/s, best of runs.
    pub gemm_f32_gflops: f64,
    /// Matrix size used for it.
    pub gemm_n: usize,
    /// The same product in the bf16 mode (None without AVX-512 BF16).
    pub gemm_bf16_gflops: Option<f64>,
    /// Parallel sequential read bandwidth over a buffer much larger than the caches, GB/s.
    pub mem_read_gbs: f64,
    pub threads: usize,
}

fn best_of<F: FnMut()>(runs: usize, mut f: F) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Rate of `linear` on an `n x n x n` product, GFLOP/s.
pub fn gemm_gflops(n: usize, mode: MatmulMode, runs: usize) -> f64 {
    let x: Vec<f32> = (0..n * n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w: Vec<f16> = (0..n * n)
        .map(|i| f16::from_f32(((i * 104729) % 1000) as f32 / 1000.0 - 0.5))
        .collect();
    let mut out = vec![0f32; n * n];
    let t = best_of(runs, || {
        matmul::linear(mode, &x, &w, None, n, n, n, &mut out)
    });
    2.0 * (n as f64).powi(3) / t / 1e9
}

/// Read bandwidth of a parallel sum over `bytes`, GB/s.
pub fn mem_read_gbs(bytes: usize, runs: usize) -> f64 {
    let n = bytes / 4;
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 13) as f32).collect();
    let mut sink = 0f32;
    let t = best_of(runs, || {
        sink += buf
            .par_chunks(1 << 18)
            .map(|c| {
                let mut acc = [0f32; 16];
                for ch in c.chunks_exact(16) {
                    for l in 0..16 {
                        acc[l] += ch[l];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum::<f32>();
    });
    std::hint::black_box(sink);
    (n * 4) as f64 / t / 1e9
}

pub fn measure() -> Floors {
    let gemm_n = 2048;
    Floors {
        gemm_f32_gflops: gemm_gflops(gemm_n, MatmulMode::F32, 3),
        gemm_n,
        gemm_bf16_gflops: crate::device::cpu::bf16::available()
            .then(|| gemm_gflops(gemm_n, MatmulMode::Bf16, 3)),
        mem_read_gbs: mem_read_gbs(1 << 30, 5),
        threads: rayon::current_num_threads(),
    }
}
