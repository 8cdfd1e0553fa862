//! How the CPU device picks the next token from a row of logits: the arg max, or an
//! inverse-CDF draw from the softmax with a uniform the host drew (the CUDA kernels follow the
//! same rules, so both devices draw the same tokens).

use anyhow::{ensure, Result};

use super::tensor::CpuTensor;
use crate::device::Sampling;

/// [`crate::device::Device::sample`] on `[batch, vocab]` f32 logits.
pub fn sample(logits: &CpuTensor, how: &Sampling<'_>) -> Result<Vec<u32>> {
    let (b, v) = logits.dims2("sample logits")?;
    let l = logits.f32()?;
    let rows = l.chunks(v);
    match how {
        Sampling::Greedy => Ok(rows.map(argmax).collect()),
        Sampling::Temperature {
            temperature,
            uniforms,
        } => {
            ensure!(
                uniforms.len() == b,
                "sample: {} uniforms for {b} sequences",
                uniforms.len()
            );
            ensure!(
                *temperature > 0.0,
                "sample: temperature must be positive, got {temperature}"
            );
            Ok(rows
                .zip(uniforms.iter())
                .map(|(r, &u)| sample_row(r, *temperature, u))
                .collect())
        }
    }
}

/// Index of the largest value; the first one on ties (as torch.argmax).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Inverse-CDF draw from softmax(row / t) with the uniform `u` in [0, 1).
pub fn sample_row(row: &[f32], t: f32, u: f32) -> u32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let w: Vec<f64> = row
        .iter()
        .map(|&x| (((x - max) / t) as f64).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let target = u as f64 * total;
    let mut acc = 0.0;
    for (i, x) in w.iter().enumerate() {
        acc += x;
        if acc > target {
            return i as u32;
        }
    }
    // rounding left the target at the very end: the last token with any weight
    w.iter().rposition(|&x| x > 0.0).unwrap_or(0) as u32
}
