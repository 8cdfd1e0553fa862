//! Tests of the CPU device through its trait and of its kernels against their slow references:
//! matrix products on both sides of every path switch, attention (prefill, decode, blocked,
//! AMX), sampling, and shape errors.

use std::sync::OnceLock;

use half::f16;

use super::device::{CpuDevice, CpuOptions};
use super::matmul::{self, MatmulMode};
use super::sampling::{argmax, sample_row};
use super::tensor::CpuTensor;
use super::{amx, attention};
use crate::device::{Activation, AttnShape, DType, Device, HostSlice, Sampling};
use crate::generate::Rng;

pub(super) fn rand_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform() * 2.0 - 1.0).collect()
}
fn rand_f16(n: usize, seed: u64) -> Vec<f16> {
    rand_f32(n, seed).into_iter().map(f16::from_f32).collect()
}
pub(super) fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    num / b.iter().map(|y| y.abs()).fold(1e-30f32, f32::max)
}

#[test]
fn linear_paths_match_reference() {
    // row counts on both sides of the matvec/GEMM switch, widths off the SIMD width
    for &(n, k, m) in &[
        (1, 40, 33),
        (3, 100, 70),
        (16, 64, 129),
        (17, 72, 50),
        (40, 130, 96),
        // many rows through the matrix-vector path (weights without an f32 copy), and past
        // the rows where those take the GEMM again
        (60, 70, 90),
        (100, 70, 90),
        (7, 16, 1),
        // several matvec tasks, the last one short and odd
        (4, 96, 1001),
        (10, 200, 517),
    ] {
        let x = rand_f32(n * k, n as u64);
        let w = rand_f16(m * k, 7 + k as u64);
        let b = rand_f16(m, 99);
        let mut out = vec![0f32; n * m];
        matmul::linear(MatmulMode::F32, &x, &w, Some(&b), n, k, m, &mut out);
        let r = matmul::linear_reference(&x, &w, Some(&b), n, k, m);
        assert!(
            max_rel(&out, &r) < 1e-5,
            "n={n} k={k} m={m}: {}",
            max_rel(&out, &r)
        );
    }
}

#[test]
fn kept_f32_weights_give_the_same_products() {
    let (n, k, m) = (80, 72, 130);
    let x = rand_f32(n * k, 5);
    let w = rand_f16(m * k, 6);
    let want = matmul::linear_reference(&x, &w, None, n, k, m);
    let (packed, wide) = (OnceLock::new(), OnceLock::new());
    // the first call converts and keeps the weight, the second reads the kept copy
    for _ in 0..2 {
        let mut out = vec![0f32; n * m];
        matmul::linear_cached(
            MatmulMode::F32,
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
        assert!(max_rel(&out, &want) < 1e-5, "{}", max_rel(&out, &want));
    }
    assert!(
        matches!(wide.get(), Some(Some(_))),
        "the weight was kept in f32"
    );
}

#[test]
fn shared_input_products_match_separate_references() {
    // matvec rows (one pass over all parts, task blocks crossing parts, odd widths) and
    // GEMM rows; relu through `linear`, bias on some parts only
    let dev = CpuDevice::new(CpuOptions::default());
    for &(n, k) in &[(1, 40), (4, 96), (16, 64), (17, 72)] {
        let x = rand_f32(n * k, n as u64);
        let xt = CpuTensor::from_f32(&[n, k], x.clone()).unwrap();
        let shapes = [(33, true), (70, false), (1, true), (517, true)];
        let ws: Vec<Vec<f16>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(m, _))| rand_f16(m * k, 20 + i as u64))
            .collect();
        let bs: Vec<Vec<f16>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(m, _))| rand_f16(m, 40 + i as u64))
            .collect();
        let up = |v: &[f16], shape: &[usize]| dev.upload(HostSlice::F16(v), shape).unwrap();
        let wt: Vec<CpuTensor> = ws
            .iter()
            .zip(&shapes)
            .map(|(w, &(m, _))| up(w, &[m, k]))
            .collect();
        let bt: Vec<CpuTensor> = bs
            .iter()
            .zip(&shapes)
            .map(|(b, &(m, _))| up(b, &[m]))
            .collect();
        let pairs: Vec<(&CpuTensor, Option<&CpuTensor>)> = wt
            .iter()
            .zip(&bt)
            .zip(&shapes)
            .map(|((w, b), &(_, has))| (w, has.then_some(b)))
            .collect();
        let outs = dev.linear_shared_input(&xt, &pairs).unwrap();
        for (i, &(m, has)) in shapes.iter().enumerate() {
            let bias = has.then_some(&bs[i][..]);
            let want = matmul::linear_reference(&x, &ws[i], bias, n, k, m);
            let got = dev.download_f32(&outs[i]).unwrap();
            assert!(max_rel(&got, &want) < 1e-5, "n={n} part {i}");
            let relu = dev
                .linear(&xt, &wt[i], pairs[i].1, Activation::Relu)
                .unwrap();
            let want: Vec<f32> = want.iter().map(|v| v.max(0.0)).collect();
            let got = dev.download_f32(&relu).unwrap();
            assert!(max_rel(&got, &want) < 1e-5, "relu n={n} part {i}");
        }
    }
}

#[test]
fn attention_matches_reference_prefill_and_decode() {
    // head_dim 64 and 128 take the decode kernel with the head in registers
    for (kv, d) in [
        (DType::F32, 8),
        (DType::F16, 8),
        (DType::F16, 64),
        (DType::F16, 128),
    ] {
        let dev = CpuDevice::new(CpuOptions {
            kv_dtype: kv,
            ..Default::default()
        });
        let (b, h, s, max_len) = (3, 5, 6, 9);
        let mut kc = dev.alloc_kv(b, h, max_len, d).unwrap();
        let mut vc = dev.alloc_kv(b, h, max_len, d).unwrap();
        // left padding: 0, 2 and 5 pads
        let pads = [0, 2, 5];
        let mut mask = Vec::new();
        for p in pads {
            mask.extend((0..s).map(|i| (i >= p) as u32));
        }
        let mut seed = 1;
        let mut run = |past: usize, new: usize, mask: &[u32]| {
            seed += 10;
            let shape = AttnShape::new(b, h, d, past, new);
            let q =
                CpuTensor::from_f32(&[b * new, h * d], rand_f32(b * new * h * d, seed)).unwrap();
            let k = CpuTensor::from_f32(&[b * new, h * d], rand_f32(b * new * h * d, seed + 1))
                .unwrap();
            let v = CpuTensor::from_f32(&[b * new, h * d], rand_f32(b * new * h * d, seed + 2))
                .unwrap();
            dev.append_kv(&mut kc, &mut vc, &k, &v, shape).unwrap();
            let m = dev.upload(HostSlice::U32(mask), &[b, past + new]).unwrap();
            let got = dev
                .download_f32(&dev.attention(&q, &kc, &vc, &m, shape).unwrap())
                .unwrap();
            // the reference reads the cache's stored (possibly fp16-rounded) values
            let t = past + new;
            let (kf, vf) = (
                dev.download_f32(&kc).unwrap(),
                dev.download_f32(&vc).unwrap(),
            );
            let trim = |c: &[f32]| -> Vec<f32> {
                let mut o = Vec::new();
                for bh in 0..b * h {
                    o.extend_from_slice(&c[bh * max_len * d..][..t * d]);
                }
                o
            };
            let want = attention::attention_reference(
                q.f32().unwrap(),
                &trim(&kf),
                &trim(&vf),
                mask,
                shape,
            );
            assert!(
                max_rel(&got, &want) < 1e-5,
                "{kv:?} head_dim {d} past {past}: {}",
                max_rel(&got, &want)
            );
            got
        };
        let got = run(0, s, &mask);
        // the fully padded query rows (sequence 2, positions 0..5) are zeros
        let row = |bb: usize, i: usize| &got[(bb * s + i) * h * d..][..h * d];
        assert!(row(2, 0).iter().all(|&x| x == 0.0));
        assert!(row(2, 5).iter().any(|&x| x != 0.0));
        let mut m2 = Vec::new();
        for r in mask.chunks(s) {
            m2.extend_from_slice(r);
            m2.push(1);
        }
        run(s, 1, &m2);
    }
}

/// Prefill attention in blocks of queries (f32, and the bf16 mode's AMX path) against the
/// f64 reference: several query blocks and key panels, left padding, a second chunk after a
/// past, odd widths.
#[test]
fn blocked_attention_matches_reference() {
    for (mode, kv, tol) in [
        (MatmulMode::F32, DType::F32, 1e-5),
        (MatmulMode::F32, DType::F16, 1e-5),
        // bf16 inputs: about 3 significant digits
        (MatmulMode::Bf16, DType::F32, 2e-2),
        (MatmulMode::Bf16, DType::F16, 2e-2),
    ] {
        if mode == MatmulMode::Bf16 && !amx::available() {
            eprintln!("bf16 part skipped: no AMX-BF16 for this process");
            continue;
        }
        let dev = CpuDevice::new(CpuOptions {
            kv_dtype: kv,
            matmul: mode,
        });
        for &(b, h, d, first, second) in &[
            (2, 3, 64, 40, 33),
            (1, 2, 24, 70, 5),
            (3, 1, 8, 2, 31),
            (1, 2, 16, 150, 70),
        ] {
            let max_len = first + second;
            let mut kc = dev.alloc_kv(b, h, max_len, d).unwrap();
            let mut vc = dev.alloc_kv(b, h, max_len, d).unwrap();
            let pads: Vec<usize> = (0..b).map(|i| (i * 7) % first.max(1)).collect();
            let mut seed = 100;
            for (past, new) in [(0, first), (first, second)] {
                seed += 10;
                let t = past + new;
                let mask: Vec<u32> = pads
                    .iter()
                    .flat_map(|&p| (0..t).map(move |j| (j >= p) as u32))
                    .collect();
                let shape = AttnShape::new(b, h, d, past, new);
                let mk = |sd| {
                    CpuTensor::from_f32(&[b * new, h * d], rand_f32(b * new * h * d, sd)).unwrap()
                };
                let (q, k, v) = (mk(seed), mk(seed + 1), mk(seed + 2));
                dev.append_kv(&mut kc, &mut vc, &k, &v, shape).unwrap();
                let m = dev.upload(HostSlice::U32(&mask), &[b, t]).unwrap();
                let got = dev
                    .download_f32(&dev.attention(&q, &kc, &vc, &m, shape).unwrap())
                    .unwrap();
                let trim = |c: &CpuTensor| -> Vec<f32> {
                    let c = dev.download_f32(c).unwrap();
                    let mut o = Vec::new();
                    for bh in 0..b * h {
                        o.extend_from_slice(&c[bh * max_len * d..][..t * d]);
                    }
                    o
                };
                let want = attention::attention_reference(
                    q.f32().unwrap(),
                    &trim(&kc),
                    &trim(&vc),
                    &mask,
                    shape,
                );
                let e = max_rel(&got, &want);
                assert!(
                    e < tol,
                    "{mode:?} {kv:?} b{b} h{h} d{d} past {past} new {new}: {e}"
                );
                assert!(e < 2e-2, "{kv:?} b{b} h{h} d{d} past {past} new {new}: {e}");
            }
        }
    }
}

#[test]
fn sampling() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    // softmax([0, ln 3]) = [0.25, 0.75]
    let row = [0.0, 3f32.ln()];
    assert_eq!(sample_row(&row, 1.0, 0.2), 0);
    assert_eq!(sample_row(&row, 1.0, 0.3), 1);
    assert_eq!(sample_row(&row, 1.0, 0.999_999), 1);
    let dev = CpuDevice::default();
    let l = CpuTensor::from_f32(&[2, 2], vec![0.0, 3f32.ln(), 5.0, 0.0]).unwrap();
    let u = [0.3, 0.3];
    let got = dev
        .sample(
            &l,
            &Sampling::Temperature {
                temperature: 1.0,
                uniforms: &u,
            },
        )
        .unwrap();
    assert_eq!(got, vec![1, 0]);
    assert_eq!(dev.sample(&l, &Sampling::Greedy).unwrap(), vec![1, 0]);
}

#[test]
fn shape_errors_are_errors() {
    let dev = CpuDevice::default();
    let x = CpuTensor::from_f32(&[2, 3], vec![0.5; 6]).unwrap();
    let w = CpuTensor::from_f16(&[4, 5], vec![f16::ONE; 20]).unwrap();
    assert!(dev
        .linear(&x, &w, None, Activation::None)
        .unwrap_err()
        .to_string()
        .contains("columns"));
    let ids = dev.upload(HostSlice::U32(&[7]), &[1]).unwrap();
    assert!(dev.gather_rows(&w, &ids).is_err());
    assert!(dev.upload(HostSlice::F32(&[1.0; 5]), &[2, 3]).is_err());
}
