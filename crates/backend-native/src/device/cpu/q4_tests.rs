//! The CPU device's 4-bit kernels against their slow references on random inputs: products
//! with compressed weights on both sides of the one-pass/panel switch and on both instruction
//! sets, compressed embedding tables, attention over a compressed cache (decode and prefill,
//! with and without the step's exact keys), and sparse attention over every cache dtype.

use half::f16;

use super::attention;
use super::device::{CpuDevice, CpuOptions};
use super::matmul::MatmulMode;
use super::q4::Simd;
use super::q4_attention::{self, Fresh};
use super::q4_matmul::{self, Q4Part};
use super::tensor::CpuTensor;
use super::tests::{max_rel, rand_f32};
use crate::compress::{self, reference, Q4Layout, CACHE_GROUP_DIM};
use crate::device::{Activation, AttnShape, DType, Device, DeviceTensor, HostSlice};

/// fp16 weights with a per-row offset, so groups are not centred on zero.
fn rand_weight(m: usize, k: usize, seed: u64) -> Vec<f16> {
    let v = rand_f32(m * k, seed);
    (0..m * k)
        .map(|i| f16::from_f32(v[i] + 0.1 * ((i / k) % 7) as f32))
        .collect()
}
fn paths() -> Vec<Simd> {
    let mut v = vec![Simd::Portable];
    if Simd::detect() == Simd::Avx512 {
        v.push(Simd::Avx512);
    } else {
        eprintln!("AVX-512 path not tested: this CPU lacks it");
    }
    v
}

#[test]
fn compressed_products_match_the_reference() {
    // rows of x on both sides of the one-pass/panel switch (and across its 8-row chunks),
    // widths off the 16-lane width, outputs of partial groups and a single row
    for &(n, k, m) in &[
        (1, 40, 33),
        (2, 100, 130),
        (3, 16, 64),
        (5, 72, 129),
        (8, 17, 1),
        (12, 64, 70),
        (32, 48, 65),
        (33, 40, 130),
        (70, 100, 64),
    ] {
        let x = rand_f32(n * k, n as u64 + 3);
        let w = compress::compress_f16(&rand_weight(m, k, 7 + k as u64), &[m, k], 0);
        let b: Vec<f16> = rand_f32(m, 9).into_iter().map(f16::from_f32).collect();
        let want = q4_matmul::linear_reference(&x, &w, Some(&b), n, k, m);
        for simd in paths() {
            for relu in [false, true] {
                let mut out = vec![f32::NAN; n * m];
                let mut parts = [Q4Part {
                    w: &w,
                    m,
                    bias: Some(&b),
                    relu,
                    out: &mut out,
                }];
                q4_matmul::linear_group(MatmulMode::F32, simd, &x, n, k, &mut parts);
                let want: Vec<f32> = want
                    .iter()
                    .map(|&v| if relu { v.max(0.0) } else { v })
                    .collect();
                let e = max_rel(&out, &want);
                assert!(e < 1e-5, "{simd:?} n={n} k={k} m={m} relu={relu}: {e}");
            }
        }
        if super::bf16::available() {
            let mut out = vec![f32::NAN; n * m];
            let mut parts = [Q4Part {
                w: &w,
                m,
                bias: Some(&b),
                relu: false,
                out: &mut out,
            }];
            q4_matmul::linear_group(MatmulMode::Bf16, Simd::detect(), &x, n, k, &mut parts);
            let e = max_rel(&out, &want);
            assert!(e < 3e-2, "bf16 n={n} k={k} m={m}: {e}");
        }
    }
}

#[test]
fn the_device_mixes_compressed_and_fp16_weights() {
    let dev = CpuDevice::new(CpuOptions::default());
    let (n, k) = (3, 80);
    let x = rand_f32(n * k, 1);
    let xt = CpuTensor::from_f32(&[n, k], x.clone()).unwrap();
    let (w1, w2) = (rand_weight(70, k, 2), rand_weight(20, k, 3));
    let q1 = compress::compress_f16(&w1, &[70, k], 0);
    let t1 = dev.upload_compressed(&q1, &[70, k], 0).unwrap();
    let t2 = dev.upload(HostSlice::F16(&w2), &[20, k]).unwrap();
    assert_eq!(t1.dtype(), DType::Q4 { group_dim: 0 });
    assert_eq!(t1.size_bytes(), q1.len());
    let outs = dev
        .linear_shared_input(&xt, &[(&t1, None), (&t2, None)])
        .unwrap();
    let want1 = q4_matmul::linear_reference(&x, &q1, None, n, k, 70);
    let want2 = super::matmul::linear_reference(&x, &w2, None, n, k, 20);
    assert!(max_rel(&dev.download_f32(&outs[0]).unwrap(), &want1) < 1e-5);
    assert!(max_rel(&dev.download_f32(&outs[1]).unwrap(), &want2) < 1e-5);
    let r = dev.linear(&xt, &t1, None, Activation::Relu).unwrap();
    let want: Vec<f32> = want1.iter().map(|v| v.max(0.0)).collect();
    assert!(max_rel(&dev.download_f32(&r).unwrap(), &want) < 1e-5);
    // the wrong bytes for a shape are refused, not misread
    assert!(dev.upload_compressed(&q1[1..], &[70, k], 0).is_err());
}

#[test]
fn compressed_tables_gather_their_rows() {
    let dev = CpuDevice::new(CpuOptions::default());
    let (rows, width) = (150, 24);
    let table = rand_weight(rows, width, 5);
    let q = compress::compress_f16(&table, &[rows, width], 0);
    let decoded = reference::decompress(&q, &[rows, width], 0);
    let t = dev.upload_compressed(&q, &[rows, width], 0).unwrap();
    let ids = [0u32, 63, 64, 149, 2, 2, 101];
    let idt = dev.upload(HostSlice::U32(&ids), &[ids.len()]).unwrap();
    let got = dev
        .download_f32(&dev.gather_rows(&t, &idt).unwrap())
        .unwrap();
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&i| decoded[i as usize * width..(i as usize + 1) * width].to_vec())
        .collect();
    assert!(max_rel(&got, &want) < 1e-6);
    let mut x = CpuTensor::from_f32(&[ids.len(), width], want.clone()).unwrap();
    dev.add_gathered_rows(&mut x, &t, &idt).unwrap();
    let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
    assert!(max_rel(&dev.download_f32(&x).unwrap(), &twice) < 1e-6);
    let bad = dev.upload(HostSlice::U32(&[150]), &[1]).unwrap();
    assert!(dev.gather_rows(&t, &bad).is_err());
}

/// Prefill then decode steps over a compressed cache (and an fp16 one, for sparsity), checked
/// against the f64 reference over what the cache holds: decoded past positions, and this step's
/// exact keys and values.
fn run_cache(kv: DType, d: usize, sparsity: f64, fresh: bool) {
    let dev = CpuDevice::new(CpuOptions::default());
    let (b, h, s, steps) = (3, 2, 7, 4);
    let max_len = s + steps;
    let alloc = || dev.zeros(kv, &[b, h, max_len, d]).unwrap();
    let (mut kc, mut vc) = (alloc(), alloc());
    let pads = [0usize, 2, 5];
    let mut seed = 1000 + d as u64;
    // what the reference sees: per (sequence, head), the positions so far
    let mut kref = vec![vec![Vec::<f32>::new(); b * h]; 2];
    for step in 0..=steps {
        let (past, new) = if step == 0 { (0, s) } else { (s + step - 1, 1) };
        let t = past + new;
        let shape = AttnShape::new(b, h, d, past, new).with_sparsity(sparsity);
        let mask: Vec<u32> = pads
            .iter()
            .flat_map(|&p| (0..t).map(move |j| (j >= p) as u32))
            .collect();
        seed += 10;
        let mk =
            |sd| CpuTensor::from_f32(&[b * new, h * d], rand_f32(b * new * h * d, sd)).unwrap();
        let (q, k, v) = (mk(seed), mk(seed + 1), mk(seed + 2));
        dev.append_kv(&mut kc, &mut vc, &k, &v, shape).unwrap();
        let m = dev.upload(HostSlice::U32(&mask), &[b, t]).unwrap();
        let got = if fresh {
            dev.attention_with_new(&q, &k, &v, &kc, &vc, &m, shape)
        } else {
            dev.attention(&q, &kc, &vc, &m, shape)
        };
        let got = dev.download_f32(&got.unwrap()).unwrap();
        // the reference's K and V: exact rows for the new positions when attended fresh, the
        // cache's stored values for the others
        let stored = [
            dev.download_f32(&kc).unwrap(),
            dev.download_f32(&vc).unwrap(),
        ];
        for (which, src) in [(0, &k), (1, &v)] {
            let src = src.f32().unwrap();
            for bh in 0..b * h {
                let (bb, hh) = (bh / h, bh % h);
                for i in 0..new {
                    let row: Vec<f32> = if fresh && kv.is_compressed() {
                        src[(bb * new + i) * h * d + hh * d..][..d].to_vec()
                    } else {
                        stored[which][(bh * max_len + past + i) * d..][..d].to_vec()
                    };
                    kref[which][bh].extend(row);
                }
            }
        }
        // later steps see the new rows as stored
        let (kr, vr): (Vec<f32>, Vec<f32>) = (kref[0].concat(), kref[1].concat());
        let want = attention::attention_reference(q.f32().unwrap(), &kr, &vr, &mask, shape);
        let e = max_rel(&got, &want);
        assert!(
            e < 1e-4,
            "{kv:?} d{d} sparsity {sparsity} fresh {fresh} step {step}: {e}"
        );
        for (rows, st) in kref.iter_mut().zip(&stored) {
            for (bh, r) in rows.iter_mut().enumerate() {
                let (len, at) = (r.len(), (bh * max_len + past) * d);
                r[len - new * d..].copy_from_slice(&st[at..at + new * d]);
            }
        }
    }
}

#[test]
fn attention_over_a_compressed_cache_matches_the_reference() {
    let q4 = DType::Q4 {
        group_dim: CACHE_GROUP_DIM,
    };
    // head_dim of one group, two, and a group and a partial one
    for d in [64, 128, 80] {
        run_cache(q4, d, 1.0, true);
        run_cache(q4, d, 1.0, false);
    }
}

#[test]
fn sparse_attention_keeps_the_largest_weights_on_every_cache() {
    let q4 = DType::Q4 {
        group_dim: CACHE_GROUP_DIM,
    };
    for (kv, d) in [
        (DType::F16, 64),
        (DType::F16, 24),
        (DType::F32, 128),
        (q4, 64),
    ] {
        for s in [0.5, 0.2] {
            run_cache(kv, d, s, true);
        }
    }
}

#[test]
fn both_instruction_sets_decode_the_same_pairs() {
    let d = 128;
    let t = 37;
    let rb = Q4Layout::new(&[1, d], 1).bytes();
    let kv = |seed| compress::compress_f32(&rand_f32(t * d, seed), &[t, d], 1);
    let (k, v) = (kv(1), kv(2));
    let q = rand_f32(d, 3);
    let (fk, fv) = (rand_f32(d, 4), rand_f32(d, 5));
    let fresh = Fresh {
        k: &fk,
        v: &fv,
        at: 0,
        stride: d,
        past: t - 1,
    };
    let mask: Vec<u32> = (0..t).map(|j| (j % 5 != 1) as u32).collect();
    let outs: Vec<Vec<f32>> = paths()
        .into_iter()
        .map(|simd| {
            q4_attention::decode_pair(simd, &q, &k, &v, rb, Some(fresh), &mask, t, 0.088, 9)
        })
        .collect();
    for o in &outs[1..] {
        assert!(max_rel(o, &outs[0]) < 1e-5);
    }
    assert!(outs[0].iter().all(|x| x.is_finite()) && outs[0].iter().any(|&x| x != 0.0));
}

#[test]
fn kept_keys_round_as_flexllmgen() {
    let s = AttnShape::new(1, 1, 8, 9, 1);
    assert_eq!(s.with_sparsity(0.3).kept_keys(10), 3);
    assert_eq!(s.with_sparsity(0.1).kept_keys(10), 1);
    assert_eq!(s.with_sparsity(0.25).kept_keys(10), 3);
    assert_eq!(s.with_sparsity(1e-6).kept_keys(10), 1);
    assert_eq!(s.kept_keys(10), 10);
    // prefill stays dense
    assert_eq!(
        AttnShape::new(1, 1, 8, 0, 10)
            .with_sparsity(0.1)
            .kept_keys(10),
        10
    );
}
