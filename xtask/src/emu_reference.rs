//! The CPU device's answers for the emulated check of the 4-bit kernels (`check-kernels
//! --emulate`): inputs drawn here, outputs computed by the engine's own CPU code (the quantizer,
//! the compressed products, gathers and attention), written to one file that `kernels/emu/check.cpp`
//! reads and compares the emulated CUDA kernels against. So the kernels' reference is the CPU
//! implementation itself, not a second one written in C++.
//!
//! Format: `FBEMU1`, then records of (u32 name length, name, u8 kind: 0 bytes, 1 fp16 bits,
//! 2 f32, 3 u32, 4 i64; u64 count; the values, little-endian).

use std::path::Path;

use anyhow::{Context, Result};
use backend_native::compress::{compress_f16, decompress, Q4Layout};
use backend_native::device::cpu::{CpuDevice, CpuOptions, CpuTensor};
use backend_native::device::{Activation, AttnShape, DType, Device, HostSlice};
use backend_native::generate::Rng;
use half::f16;

struct Out(Vec<u8>);

impl Out {
    fn put(&mut self, name: &str, kind: u8, count: usize, data: &[u8]) {
        self.0.extend((name.len() as u32).to_le_bytes());
        self.0.extend(name.as_bytes());
        self.0.push(kind);
        self.0.extend((count as u64).to_le_bytes());
        self.0.extend(data);
    }
    fn bytes(&mut self, name: &str, v: &[u8]) {
        self.put(name, 0, v.len(), v);
    }
    fn halves(&mut self, name: &str, v: &[f16]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(name, 1, v.len(), &b);
    }
    fn floats(&mut self, name: &str, v: &[f32]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(name, 2, v.len(), &b);
    }
    fn words(&mut self, name: &str, v: &[u32]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(name, 3, v.len(), &b);
    }
    fn ints(&mut self, name: &str, v: &[i64]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(name, 4, v.len(), &b);
    }
}

/// fp16 values in [-a, a) plus an offset, so groups are neither centred nor symmetric.
fn halves(r: &mut Rng, n: usize, a: f32) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32((r.uniform() * 2.0 - 1.0) * a + 0.2 * a))
        .collect()
}

fn wide(v: &[f16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Writes every case to `path`; `seed` draws the inputs.
pub fn write(path: &Path, seed: u64) -> Result<()> {
    let mut r = Rng::new(seed);
    let mut o = Out(b"FBEMU1".to_vec());
    let dev = CpuDevice::new(CpuOptions::default());

    // packing: a weight along dimension 0 (partial last group) and cache rows along head_dim
    for (name, shape, dim) in [("pack_w", [130usize, 40], 0), ("pack_c", [6, 80], 1)] {
        let x = halves(&mut r, shape[0] * shape[1], 1.5);
        let l = Q4Layout::new(&shape, dim);
        o.ints(
            &format!("{name}.shape"),
            &[l.outer as i64, l.len as i64, l.inner as i64],
        );
        o.halves(&format!("{name}.x"), &x);
        let packed = compress_f16(&x, &shape, dim);
        o.floats(&format!("{name}.decoded"), &decompress(&packed, l));
        o.bytes(&format!("{name}.packed"), &packed);
    }

    // appending to a compressed cache [2, 2, 5, 80] at position 1, three new rows each
    {
        let (b, h, d, max_len, past, new) = (2usize, 2, 80, 5, 1, 3);
        let src = halves(&mut r, b * new * h * d, 2.0);
        let q4 = DType::Q4 { group_dim: 3 };
        let (mut kc, mut vc) = (
            dev.zeros(q4, &[b, h, max_len, d])?,
            dev.zeros(q4, &[b, h, max_len, d])?,
        );
        let t = CpuTensor::from_f32(&[b * new, h * d], wide(&src))?;
        dev.append_kv(&mut kc, &mut vc, &t, &t, AttnShape::new(b, h, d, past, new))?;
        o.ints(
            "append.shape",
            &[
                b as i64,
                h as i64,
                d as i64,
                max_len as i64,
                past as i64,
                new as i64,
            ],
        );
        o.halves("append.src", &src);
        o.bytes("append.cache", kc.raw_bytes());
    }

    // products: rows of x on both sides of the kernel's 4-row launches
    {
        let (k, m) = (256usize, 130);
        let w = compress_f16(&halves(&mut r, m * k, 1.0), &[m, k], 0);
        let bias = halves(&mut r, m, 0.5);
        let wt = dev.upload_compressed(&w, &[m, k], 0)?;
        let bt = dev.upload(HostSlice::F16(&bias), &[m])?;
        o.ints("matvec.shape", &[k as i64, m as i64]);
        o.bytes("matvec.w", &w);
        o.halves("matvec.bias", &bias);
        for n in [1usize, 4, 6] {
            let x = halves(&mut r, n * k, 1.0);
            let xt = CpuTensor::from_f32(&[n, k], wide(&x))?;
            let y = dev.download_f32(&dev.linear(&xt, &wt, Some(&bt), Activation::Relu)?)?;
            o.halves(&format!("matvec.x{n}"), &x);
            o.floats(&format!("matvec.y{n}"), &y);
        }
    }

    // gathers from a compressed table [150, 24]
    {
        let (rows, width) = (150usize, 24);
        let table = compress_f16(&halves(&mut r, rows * width, 1.0), &[rows, width], 0);
        let ids: Vec<u32> = vec![0, 63, 64, 149, 2, 101, 101];
        let t = dev.upload_compressed(&table, &[rows, width], 0)?;
        let it = dev.upload(HostSlice::U32(&ids), &[ids.len()])?;
        let rows_out = dev.download_f32(&dev.gather_rows(&t, &it)?)?;
        o.ints("gather.shape", &[rows as i64, width as i64]);
        o.bytes("gather.table", &table);
        o.words("gather.ids", &ids);
        o.floats("gather.rows", &rows_out);
    }

    // decode attention: a compressed cache (dense, and sparse) and an fp16 cache (sparse), the
    // step's own key and value fresh; head_dim 64 (one group) and 80 (a group and a part)
    for (kv, kv_name) in [(DType::Q4 { group_dim: 3 }, "q4"), (DType::F16, "f16")] {
        for d in [64usize, 80] {
            for s in [1.0f64, 0.3] {
                if kv == DType::F16 && s == 1.0 {
                    continue; // attention_decode_f16's own check covers it
                }
                let name = format!("attn.{kv_name}.d{d}.s{}", (s * 10.0) as u32);
                let (b, h, past) = (2usize, 2, 37);
                let max_len = past + 2;
                let t_len = past + 1;
                let (mut kc, mut vc) = (
                    dev.zeros(kv, &[b, h, max_len, d])?,
                    dev.zeros(kv, &[b, h, max_len, d])?,
                );
                let prefill = |r: &mut Rng| {
                    CpuTensor::from_f32(&[b * past, h * d], wide(&halves(r, b * past * h * d, 1.0)))
                };
                let (pk, pv) = (prefill(&mut r)?, prefill(&mut r)?);
                dev.append_kv(&mut kc, &mut vc, &pk, &pv, AttnShape::new(b, h, d, 0, past))?;
                let (q, kn, vn) = (
                    halves(&mut r, b * h * d, 1.0),
                    halves(&mut r, b * h * d, 1.0),
                    halves(&mut r, b * h * d, 1.0),
                );
                let up = |v: &[f16]| CpuTensor::from_f32(&[b, h * d], wide(v));
                let (qt, kt, vt) = (up(&q)?, up(&kn)?, up(&vn)?);
                let shape = AttnShape::new(b, h, d, past, 1).with_sparsity(s);
                dev.append_kv(&mut kc, &mut vc, &kt, &vt, shape)?;
                // sequence 1 left-padded by 5
                let mask: Vec<u32> = (0..b)
                    .flat_map(|bb| (0..t_len).map(move |j| (bb == 0 || j >= 5) as u32))
                    .collect();
                let mt = dev.upload(HostSlice::U32(&mask), &[b, t_len])?;
                let out = dev
                    .download_f32(&dev.attention_with_new(&qt, &kt, &vt, &kc, &vc, &mt, shape)?)?;
                o.ints(
                    &format!("{name}.shape"),
                    &[b as i64, h as i64, d as i64, max_len as i64, t_len as i64],
                );
                o.floats(&format!("{name}.sparsity"), &[s as f32]);
                o.halves(&format!("{name}.q"), &q);
                o.halves(&format!("{name}.k_new"), &kn);
                o.halves(&format!("{name}.v_new"), &vn);
                o.bytes(&format!("{name}.k_cache"), kc.raw_bytes());
                o.bytes(&format!("{name}.v_cache"), vc.raw_bytes());
                o.words(&format!("{name}.mask"), &mask);
                o.floats(&format!("{name}.out"), &out);
                if kv.is_compressed() {
                    // without the step's rows every position comes from the cache
                    let stale = dev.download_f32(&dev.attention(&qt, &kc, &vc, &mt, shape)?)?;
                    o.floats(&format!("{name}.out_from_cache"), &stale);
                }
            }
        }
    }
    std::fs::write(path, &o.0).with_context(|| format!("writing {}", path.display()))
}
