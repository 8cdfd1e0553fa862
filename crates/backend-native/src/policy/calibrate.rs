//! `flexbench-native calibrate`: measures the rates the cost model needs with the engine's own
//! primitives (its `Device` ops at the model's shapes, its O_DIRECT files), the best of a few
//! runs each, and the machine's capacities.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use half::f16;

use super::profile::{Compute, Links, MachineProfile, PROFILE_SCHEMA};
use crate::device::alloc::AlignedBuf;
use crate::device::{Activation, AttnShape, DType, Device, HostSlice};
use crate::offload::direct::{read_span_staged, DirectFile};
use crate::offload::weights::store::{STAGE_BUFS, STAGE_CHUNK};

/// Shapes of the measurement: a layer of this model.
#[derive(Debug, Clone)]
pub struct CalibrationShape {
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    /// Rows of the prefill products and length of the prefill attention.
    pub prefill_rows: usize,
    /// Rows of the compute-bound decode product.
    pub decode_rows: usize,
    /// Cache length of the decode attention.
    pub cache_len: usize,
    /// Bytes of the disk and copy measurements.
    pub io_bytes: usize,
}

impl CalibrationShape {
    pub fn of(cfg: &bench_core::ModelConfig) -> CalibrationShape {
        CalibrationShape {
            hidden: cfg.hidden_size,
            ffn: cfg.ffn_dim,
            heads: cfg.num_attention_heads,
            prefill_rows: 256,
            decode_rows: 32,
            cache_len: 512,
            io_bytes: 512 << 20,
        }
    }
}

fn best_of(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm: first-touch pages, kernel compilation, pools
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best.max(1e-9))
}

/// Deterministic values in [-0.5, 0.5): never all zeros, which some kernels would shortcut.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32) / 1000.0 - 0.5)
        .collect()
}

fn f16s(n: usize, seed: usize) -> Vec<f16> {
    values(n, seed).into_iter().map(f16::from_f32).collect()
}

/// The compute rates of `dev` at `shape`'s sizes. `host` is the device attention on the host
/// runs on (`cpu_attention`): the same CPU device for the CPU device.
pub fn measure_compute<D: Device, H: Device>(
    dev: &D,
    host: &H,
    shape: &CalibrationShape,
    notes: &mut Vec<String>,
) -> Result<Compute> {
    let (h, f) = (shape.hidden, shape.ffn);
    let w = dev.upload(HostSlice::F16(&f16s(f * h, 1)), &[f, h])?;
    let wq = {
        let bytes = crate::compress::compress_f16(
            &f16s(f * h, 1),
            &[f, h],
            crate::compress::WEIGHT_GROUP_DIM,
        );
        dev.upload_compressed(&bytes, &[f, h], crate::compress::WEIGHT_GROUP_DIM)
    };
    let x_of = |rows: usize| dev.upload(HostSlice::F32(&values(rows * h, 2)), &[rows, h]);
    let linear_s = |x: &D::Tensor, w: &D::Tensor| {
        best_of(3, || {
            let y = dev.linear(x, w, None, Activation::None)?;
            dev.synchronize()?;
            drop(y);
            Ok(())
        })
    };
    let rows_p = shape.prefill_rows;
    let xp = x_of(rows_p)?;
    let t_p = linear_s(&xp, &w)?;
    let mm_prefill = 2.0 * (rows_p * h * f) as f64 / t_p;
    // Decode reads each weight once per step from memory, not from a cache: a pool of
    // matrices larger than any cache, one pass over all of them per measurement.
    let pool_n = (shape.io_bytes / (f * h * 2)).max(2);
    let pool: Vec<D::Tensor> = (0..pool_n)
        .map(|i| dev.upload(HostSlice::F16(&f16s(f * h, 10 + i)), &[f, h]))
        .collect::<Result<_>>()?;
    let pass_s = |x: &D::Tensor, ws: &[D::Tensor]| {
        best_of(3, || {
            for w in ws {
                let y = dev.linear(x, w, None, Activation::None)?;
                drop(y);
            }
            dev.synchronize()
        })
    };
    let x1 = x_of(1)?;
    let t_1 = pass_s(&x1, &pool)? / pool_n as f64;
    let weight_read = (f * h * 2) as f64 / t_1;
    let xd = x_of(shape.decode_rows)?;
    let t_d = pass_s(&xd, &pool)? / pool_n as f64;
    let mm_decode = 2.0 * (shape.decode_rows * h * f) as f64 / t_d;
    drop(pool);
    let q4_read = match &wq {
        Ok(_) => {
            let qpool: Vec<D::Tensor> = (0..pool_n * 3)
                .map(|i| {
                    let bytes = crate::compress::compress_f16(
                        &f16s(f * h, 100 + i),
                        &[f, h],
                        crate::compress::WEIGHT_GROUP_DIM,
                    );
                    dev.upload_compressed(&bytes, &[f, h], crate::compress::WEIGHT_GROUP_DIM)
                })
                .collect::<Result<_>>()?;
            let t = pass_s(&x1, &qpool)? / qpool.len() as f64;
            (DType::Q4 {
                group_dim: crate::compress::WEIGHT_GROUP_DIM,
            }
            .bytes(&[f, h])) as f64
                / t
        }
        Err(e) => {
            notes.push(format!(
                "no 4-bit products on {}: {e}; 4-bit rates = fp16",
                dev.name()
            ));
            weight_read * 0.28
        }
    };
    notes.push(format!(
        "products [{f} x {h}] fp16: {rows_p} rows {:.2} ms; from a pool of {pool_n} (larger than the caches): 1 row {:.3} ms, {} rows {:.3} ms",
        t_p * 1e3,
        t_1 * 1e3,
        shape.decode_rows,
        t_d * 1e3
    ));

    let attn = |d: &dyn AttnDev, batch: usize, past: usize, new: usize| -> Result<f64> {
        d.time(batch, shape.heads, h / shape.heads, past, new)
    };
    let batch = 4;
    let t_dec = attn(&Dev(dev), batch, shape.cache_len, 1)?;
    let bmm_decode = 4.0 * (batch * (shape.cache_len + 1) * h) as f64 / t_dec;
    let t_pre = attn(&Dev(dev), 1, 0, shape.prefill_rows)?;
    let bmm_prefill = 4.0 * (shape.prefill_rows * shape.prefill_rows * h) as f64 / t_pre;
    let t_host = attn(&Dev(host), batch, shape.cache_len, 1)?;
    let cpu_attention = 4.0 * (batch * (shape.cache_len + 1) * h) as f64 / t_host;
    notes.push(format!(
        "attention: decode batch {batch} over {} positions {:.3} ms ({} {:.3} ms on the host), prefill {} rows {:.2} ms",
        shape.cache_len,
        t_dec * 1e3,
        host.name(),
        t_host * 1e3,
        shape.prefill_rows,
        t_pre * 1e3
    ));
    Ok(Compute {
        mm_prefill_flops: mm_prefill,
        mm_decode_flops: mm_decode,
        weight_read_bps: weight_read,
        q4_weight_read_bps: q4_read,
        bmm_prefill_flops: bmm_prefill,
        bmm_decode_flops: bmm_decode,
        cpu_attention_flops: cpu_attention,
        // the 4-bit cache's decode attention is measured by the compression suite; as fp16 here
        q4_attention_factor: 1.0,
        cpu_attention_scaling: None,
    })
}

/// Attention timing through a device, object-safe so the compute and host devices share it.
trait AttnDev {
    fn time(
        &self,
        batch: usize,
        heads: usize,
        head_dim: usize,
        past: usize,
        new: usize,
    ) -> Result<f64>;
}

struct Dev<'a, D: Device>(&'a D);

impl<D: Device> AttnDev for Dev<'_, D> {
    fn time(
        &self,
        batch: usize,
        heads: usize,
        head_dim: usize,
        past: usize,
        new: usize,
    ) -> Result<f64> {
        let dev = self.0;
        let h = heads * head_dim;
        let max_len = past + new;
        let mut kc = dev.alloc_kv(batch, heads, max_len, head_dim)?;
        let mut vc = dev.alloc_kv(batch, heads, max_len, head_dim)?;
        let shape = AttnShape::new(batch, heads, head_dim, past, new);
        // `rows` rows of pseudo-random values, seeded apart
        let rows =
            |n: usize, seed: usize| dev.upload(HostSlice::F32(&values(n * h, seed)), &[n, h]);
        if past > 0 {
            // a filled cache: the measured step attends to real keys
            let fill = AttnShape::new(batch, heads, head_dim, 0, past);
            let (k, v) = (rows(batch * past, 3)?, rows(batch * past, 4)?);
            dev.append_kv(&mut kc, &mut vc, &k, &v, fill)?;
        }
        let q = rows(batch * new, 5)?;
        let (k, v) = (rows(batch * new, 6)?, rows(batch * new, 7)?);
        dev.append_kv(&mut kc, &mut vc, &k, &v, shape)?;
        let mask = dev.upload(
            HostSlice::U32(&vec![1u32; batch * max_len]),
            &[batch, max_len],
        )?;
        best_of(3, || {
            let y = dev.attention(&q, &kc, &vc, &mask, shape)?;
            dev.synchronize()?;
            drop(y);
            Ok(())
        })
    }
}

/// Host <-> compute copy rates of `dev`: host data written into a tensor allocated before (as
/// the offloader refills its pooled buffers), and read back.
pub fn measure_copies<D: Device>(dev: &D, bytes: usize) -> Result<(f64, f64)> {
    let n = bytes / 2;
    let data = f16s(n, 8);
    let mut t = dev.upload(HostSlice::F16(&data), &[n])?;
    let up = best_of(3, || {
        dev.write(&mut t, 0, HostSlice::F16(&data))?;
        dev.synchronize()
    })?;
    let mut out = vec![f16::ZERO; n];
    let down = best_of(3, || dev.download_f16(&t, 0, &mut out))?;
    Ok((bytes as f64 / up, bytes as f64 / down))
}

/// O_DIRECT write and read rates of a file of `bytes` in `dir` (written in 8 MiB requests,
/// read as the engine's staged weight fetches read), removed afterwards.
pub fn measure_disk(dir: &Path, bytes: usize) -> Result<(f64, f64)> {
    let chunk = 8 << 20;
    let bytes = bytes.div_ceil(chunk) * chunk;
    let path = dir.join(format!("flexbench-calibrate-{}.bin", std::process::id()));
    let result = (|| -> Result<(f64, f64)> {
        let f = DirectFile::create(&path)?;
        let mut buf = AlignedBuf::new(chunk)?;
        for (i, b) in buf.bytes_mut().iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let t = Instant::now();
        let mut off = 0;
        while off < bytes {
            f.write_at(&buf, chunk, off as u64)?;
            off += chunk;
        }
        let write = bytes as f64 / t.elapsed().as_secs_f64();
        drop(f);
        // the CPU device's weight fetches: one STAGE_CHUNK request at a time into a ring
        let mut read = 0f64;
        let file = DirectFile::open_read(&path)?;
        let mut ring: Vec<AlignedBuf> = (0..STAGE_BUFS)
            .map(|_| AlignedBuf::new(STAGE_CHUNK))
            .collect::<Result<_>>()?;
        let stats = crate::offload::stats::Stats::default();
        let mut sink = 0u8;
        for _ in 0..2 {
            let t = Instant::now();
            read_span_staged(
                &file,
                0..bytes,
                STAGE_CHUNK,
                &mut ring,
                &stats,
                |_, n, b| {
                    sink ^= b.bytes()[n - 1];
                    Ok(())
                },
            )?;
            read = read.max(bytes as f64 / t.elapsed().as_secs_f64());
        }
        std::hint::black_box(sink);
        Ok((write, read))
    })();
    let _ = std::fs::remove_file(&path);
    result.with_context(|| format!("measuring O_DIRECT rates in {}", dir.display()))
}

/// Calibrates `dev` (with `host` for attention on the host) into a profile.
pub fn calibrate<D: Device, H: Device>(
    dev: &D,
    host: &H,
    device: bench_core::Device,
    cfg: &bench_core::ModelConfig,
    offload_dir: &Path,
) -> Result<MachineProfile> {
    let shape = CalibrationShape::of(cfg);
    let mut notes = vec![format!(
        "measured with {} at {}'s shapes (hidden {}, ffn {})",
        dev.name(),
        cfg.name,
        shape.hidden,
        shape.ffn
    )];
    let compute = measure_compute(dev, host, &shape, &mut notes)?;
    let (h2c, c2h) = measure_copies(dev, 256 << 20)?;
    let (dw, dr) = measure_disk(offload_dir, shape.io_bytes)?;
    notes.push(format!(
        "copies host->compute {:.2} GB/s, compute->host {:.2} GB/s; disk {} O_DIRECT write {:.2} GB/s, read {:.2} GB/s",
        h2c / 1e9,
        c2h / 1e9,
        offload_dir.display(),
        dw / 1e9,
        dr / 1e9
    ));
    if crate::offload::direct::used_buffered_fallback() {
        notes
            .push("the offload directory refused O_DIRECT: disk rates are the page cache's".into());
    }
    let fingerprint = bench_core::env::machine_fingerprint(offload_dir);
    let cap = bench_core::memory::machine_capacity(device, offload_dir);
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    Ok(MachineProfile {
        schema: PROFILE_SCHEMA,
        name: format!("calibrated {}", host_name.trim()),
        fingerprint: Some(fingerprint),
        device,
        source: format!(
            "flexbench-native calibrate {} at {}",
            env!("CARGO_PKG_VERSION"),
            bench_core::record::time::rfc3339(std::time::SystemTime::now())
        ),
        capacity: cap.tiers,
        links: Links {
            host_to_compute: h2c,
            compute_to_host_cache: c2h,
            compute_to_host_hidden: c2h,
            disk_read: dr,
            disk_write_cache_prefill: dw,
            disk_write_hidden_prefill: dw,
            disk_write_decode: dw,
        },
        compute,
        notes,
    })
}
