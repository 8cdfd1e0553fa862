//! GPU speed goals of issue 5, measured in one run on one card (run by scripts/gpu-check.sh):
//!
//! - ceilings: device-to-device copy bandwidth (bytes read + written), pinned host-to-device and
//!   device-to-host bandwidth, and the best fp16 rate cuBLAS reaches on 8192^3 products;
//! - prefill GEMMs of opt-1.3b / opt-6.7b shapes (through the engine's own linear path) as a
//!   fraction of that rate (goal >= 70%);
//! - decode GEMMs and decode attention as a fraction of the copy bandwidth (goal >= 70%).
//!
//! Every timing is the median of 10 event-timed repetitions after 3 warm-ups, on random data
//! (never zeros), with weights rotated over several copies so that repeated products do not run
//! out of the 50 MB L2 cache. Prints `SPEED ...` lines and a final table; asserts nothing about
//! speed (a slow card is a finding, not a failure).
//!
//! `cargo run --release -p backend-native --example gpu_speed`

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use backend_native::device::cuda::memory::{PinnedBuffer, PinnedUse};
use backend_native::device::cuda::{CudaDevice, CudaTensor};
use backend_native::device::{Activation, AttnShape, DType, Device, HostSlice};
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};
use half::f16;

const WARMUP: usize = 3;
const REPS: usize = 10;

fn event(ctx: &Arc<CudaContext>) -> Result<CudaEvent> {
    ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| anyhow!("event: {e:?}"))
}

/// Median milliseconds of `f` on `stream`, timed with events.
fn time_ms(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    for i in 0..WARMUP {
        f(i)?;
    }
    let mut times = Vec::with_capacity(REPS);
    for i in 0..REPS {
        let (a, b) = (event(dev.context())?, event(dev.context())?);
        a.record(stream).map_err(|e| anyhow!("{e:?}"))?;
        f(WARMUP + i)?;
        b.record(stream).map_err(|e| anyhow!("{e:?}"))?;
        b.synchronize().map_err(|e| anyhow!("{e:?}"))?;
        times.push(a.elapsed_ms(&b).map_err(|e| anyhow!("{e:?}"))? as f64);
    }
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    Ok(times[REPS / 2])
}

/// Random fp16 data (a 1 Mi-element random block, tiled), never zeros.
fn random_f16(n: usize, seed: u64, scale: f32) -> Vec<f16> {
    let mut s = seed | 1;
    let block: Vec<f16> = (0..(1 << 20).min(n))
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            f16::from_f32((((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale)
        })
        .collect();
    block.iter().copied().cycle().take(n).collect()
}

fn upload(dev: &CudaDevice, shape: &[usize], seed: u64, scale: f32) -> Result<CudaTensor> {
    let n = shape.iter().product();
    dev.upload(HostSlice::F16(&random_f16(n, seed, scale)), shape)
}

struct Row {
    name: String,
    value: String,
    ratio: Option<f64>,
    goal: Option<f64>,
}

fn main() -> Result<()> {
    let dev = CudaDevice::new(0, None).context("opening the CUDA device")?;
    let stream = dev.stream().clone();
    println!("device: {}", dev.name());
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |name: String, value: String, ratio: Option<f64>, goal: Option<f64>| {
        println!(
            "SPEED {name}: {value}{}",
            ratio
                .map(|r| format!(" ({:.0}% of ceiling)", r * 100.0))
                .unwrap_or_default()
        );
        rows.push(Row {
            name,
            value,
            ratio,
            goal,
        });
    };

    // ---- ceilings ----
    let copy_bytes = 1usize << 30;
    let src = dev.zeros(DType::U32, &[copy_bytes / 4])?;
    let mut dst = dev.zeros(DType::U32, &[copy_bytes / 4])?;
    let ms = time_ms(&dev, &stream, |_| {
        stream
            .memcpy_dtod(src.buffer(), dst.buffer_mut())
            .map_err(|e| anyhow!("dtod: {e:?}"))
    })?;
    let d2d = 2.0 * copy_bytes as f64 / (ms * 1e-3);
    push(
        "device-to-device copy (read+write)".into(),
        format!("{:.0} GB/s", d2d / 1e9),
        None,
        None,
    );
    drop((src, dst));

    let pin_bytes = 256usize << 20;
    for (usage, label) in [
        (PinnedUse::Upload, "pinned host-to-device (write-combined)"),
        (PinnedUse::ReadBack, "pinned host-to-device (cached)"),
    ] {
        let mut pinned = PinnedBuffer::new(dev.context(), pin_bytes, usage)?;
        pinned
            .buf
            .as_mut_slice()
            .map_err(|e| anyhow!("{e:?}"))?
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 31 % 251) as u8);
        let mut target = dev.zeros(DType::U32, &[pin_bytes / 4])?;
        let h2d = dev.copies.h2d.clone();
        let ms = time_ms(&dev, &h2d, |_| {
            dev.copies
                .upload(&pinned, target.buffer_mut(), None)
                .map(drop)
        })?;
        let rate = pin_bytes as f64 / (ms * 1e-3);
        push(label.into(), format!("{:.1} GB/s", rate / 1e9), None, None);
        if usage == PinnedUse::Upload {
            // the offloader's host tier is write-combined pinned memory: gpu-check.sh divides the
            // weights-on-CPU decode step time by (host weight bytes / this rate)
            println!("PINNED_H2D_BYTES_PER_S={rate:.0}");
        }
        if usage == PinnedUse::ReadBack {
            let d2h = dev.copies.d2h.clone();
            let ms = time_ms(&dev, &d2h, |_| {
                dev.copies
                    .download(target.buffer(), &mut pinned, None)
                    .map(drop)
            })?;
            push(
                "pinned device-to-host (cached)".into(),
                format!("{:.1} GB/s", pin_bytes as f64 / (ms * 1e-3) / 1e9),
                None,
                None,
            );
        }
    }

    let sq = 8192;
    let a = upload(&dev, &[sq, sq], 1, 1.0)?;
    let b = upload(&dev, &[sq, sq], 2, 1.0)?;
    let mut c = dev.empty(DType::F16, &[sq, sq])?;
    let mut best = 0.0f64;
    for (lt, label) in [(false, "cublasGemmEx"), (true, "cublasLt")] {
        let ms = time_ms(&dev, &stream, |_| {
            dev.gemm_into(&a, &b, None, Activation::None, &mut c, lt)
        })?;
        let rate = 2.0 * (sq as f64).powi(3) / (ms * 1e-3);
        best = best.max(rate);
        push(
            format!("fp16 GEMM {sq}^3 ({label})"),
            format!("{:.0} TFLOP/s", rate / 1e12),
            None,
            None,
        );
    }
    drop((a, b, c));

    // ---- prefill GEMMs: rows = batch x prompt = 4 x 512 ----
    let rows_prefill = 2048;
    for (model, h) in [("opt-1.3b", 2048usize), ("opt-6.7b", 4096)] {
        for (label, k, m, relu) in [
            ("qkv/out", h, h, false),
            ("fc1+relu", h, 4 * h, true),
            ("fc2", 4 * h, h, false),
        ] {
            let x = upload(&dev, &[rows_prefill, k], 3, 1.0)?;
            let w = upload(&dev, &[m, k], 4, 0.05)?;
            let bias = upload(&dev, &[m], 5, 0.1)?;
            let mut y = dev.empty(DType::F16, &[rows_prefill, m])?;
            let act = if relu {
                Activation::Relu
            } else {
                Activation::None
            };
            let ms = time_ms(&dev, &stream, |_| {
                dev.gemm_into(&x, &w, Some(&bias), act, &mut y, true)
            })?;
            let rate = 2.0 * (rows_prefill * k * m) as f64 / (ms * 1e-3);
            push(
                format!("prefill GEMM {model} {label} [{rows_prefill}x{k}x{m}]"),
                format!("{:.0} TFLOP/s", rate / 1e12),
                Some(rate / best),
                Some(0.7),
            );
        }
    }

    // ---- decode GEMMs: one token per sequence, weights streamed from device memory ----
    for (model, h) in [("opt-1.3b", 2048usize), ("opt-6.7b", 4096)] {
        for batch in [1usize, 32] {
            for (label, k, m) in [("qkv/out", h, h), ("fc1", h, 4 * h), ("fc2", 4 * h, h)] {
                // Enough weight copies that one pass over them exceeds L2 several times.
                let copies = (256usize << 20).div_ceil(m * k * 2).max(2);
                let ws: Vec<CudaTensor> = (0..copies)
                    .map(|i| upload(&dev, &[m, k], 10 + i as u64, 0.05))
                    .collect::<Result<_>>()?;
                let x = upload(&dev, &[batch, k], 6, 1.0)?;
                let bias = upload(&dev, &[m], 7, 0.1)?;
                let mut y = dev.empty(DType::F16, &[batch, m])?;
                // Both GEMM paths: the engine uses cuBLASLt's fused epilogue where it has an
                // algorithm; the other is the fallback (and the faster one is worth knowing).
                for (lt, path) in [
                    (true, "cublasLt+bias epilogue"),
                    (false, "cublasGemmEx+bias kernel"),
                ] {
                    let ms = time_ms(&dev, &stream, |i| {
                        dev.gemm_into(
                            &x,
                            &ws[i % copies],
                            Some(&bias),
                            Activation::None,
                            &mut y,
                            lt,
                        )
                    })?;
                    let bytes = ((m * k) + batch * k + batch * m + m) * 2;
                    let bw = bytes as f64 / (ms * 1e-3);
                    push(
                        format!("decode GEMM {model} {label} batch {batch} [{k}x{m}] {path}"),
                        format!("{:.0} GB/s ({:.1} us)", bw / 1e9, ms * 1e3),
                        Some(bw / d2d),
                        Some(0.7),
                    );
                }
            }
        }
    }

    // ---- decode attention: one query per sequence over a long cache ----
    for (model, heads, hd) in [("opt-1.3b", 32usize, 64usize), ("opt-6.7b", 32, 128)] {
        for (batch, len) in [(32usize, 544usize), (4, 2048)] {
            let s = AttnShape::new(batch, heads, hd, len - 1, 1);
            let copies = (512usize << 20)
                .div_ceil(2 * batch * heads * len * hd * 2)
                .max(2);
            let caches: Vec<(CudaTensor, CudaTensor)> = (0..copies)
                .map(|i| {
                    Ok((
                        upload(&dev, &[batch, heads, len, hd], 20 + i as u64, 1.0)?,
                        upload(&dev, &[batch, heads, len, hd], 40 + i as u64, 1.0)?,
                    ))
                })
                .collect::<Result<_>>()?;
            let q = upload(&dev, &[batch, heads * hd], 8, 1.0)?;
            let mask = dev.upload(HostSlice::U32(&vec![1u32; batch * len]), &[batch, len])?;
            let ms = time_ms(&dev, &stream, |i| {
                let (k, v) = &caches[i % copies];
                dev.attention(&q, k, v, &mask, s).map(drop)
            })?;
            let bytes =
                2 * batch * heads * len * hd * 2 + batch * len * 4 + 2 * batch * heads * hd * 2;
            let bw = bytes as f64 / (ms * 1e-3);
            push(
                format!("decode attention {model} batch {batch} len {len}"),
                format!("{:.0} GB/s ({:.1} us)", bw / 1e9, ms * 1e3),
                Some(bw / d2d),
                Some(0.7),
            );
        }
    }

    println!("\n| measurement | value | of ceiling | goal | met |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let (ratio, goal, met) = match (r.ratio, r.goal) {
            (Some(x), Some(g)) => (
                format!("{:.0}%", x * 100.0),
                format!(">= {:.0}%", g * 100.0),
                if x >= g { "yes" } else { "NO" }.to_string(),
            ),
            _ => ("".into(), "".into(), "".into()),
        };
        println!("| {} | {} | {ratio} | {goal} | {met} |", r.name, r.value);
    }
    println!(
        "\nceilings: copy bandwidth {:.0} GB/s, best fp16 GEMM {:.0} TFLOP/s",
        d2d / 1e9,
        best / 1e12
    );
    println!("decode step time with weights in host memory: measured by gpu-check.sh's benchmark (run-case, weights-cpu rows) against PINNED_H2D_BYTES_PER_S");
    if let Some(p) = dev.peak_memory_bytes() {
        println!(
            "device memory pool peak: {:.2} GiB",
            p as f64 / (1u64 << 30) as f64
        );
    }
    let _ = dev.synchronize();
    Ok(())
}
