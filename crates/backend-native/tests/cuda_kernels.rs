//! Every CUDA kernel against the CPU device (the reference), on fresh random inputs.
//!
//! The tests that need a GPU are `#[ignore]`d (a GPU-less CI cannot run them) and are run by
//! `scripts/gpu-check.sh` with `--ignored --nocapture`; each prints one line
//! `KERNEL <name> rel_err=<e> tol=<t>` (‖cuda − cpu‖ / ‖cpu‖) that the script collects into its
//! report. Inputs are drawn from a seed printed first, different on every run.

use backend_native::device::cpu::{CpuDevice, CpuOptions};
use backend_native::device::cuda::{self, CudaDevice};
use backend_native::device::{Activation, AttnShape, DType, Device, HostSlice, Sampling};
use half::f16;

/// splitmix64: a tiny deterministic generator, so a failing draw can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn fresh(test: &str) -> Rng {
        let seed = std::env::var("FLEXBENCH_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("{test}: seed {seed} (FLEXBENCH_TEST_SEED={seed} replays it)");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [-a, a), rounded to f16 so both devices see the same values.
    fn halves(&mut self, n: usize, a: f32) -> Vec<f16> {
        (0..n)
            .map(|_| f16::from_f32((self.unit() * 2.0 - 1.0) * a))
            .collect()
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % n as u64) as u32
    }
}

fn wide(v: &[f16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// An activation tensor in the device's own activation dtype.
fn act<D: Device>(d: &D, v: &[f16], shape: &[usize]) -> D::Tensor {
    match d.act_dtype() {
        DType::F16 => d.upload(HostSlice::F16(v), shape).unwrap(),
        _ => d.upload(HostSlice::F32(&wide(v)), shape).unwrap(),
    }
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite output");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn report(name: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    println!("KERNEL {name} rel_err={e:.3e} tol={tol:.0e}");
    assert!(e <= tol, "{name}: relative error {e:.3e} above {tol:.0e}");
}

fn devices() -> (CudaDevice, CpuDevice) {
    let gpu = CudaDevice::new(0, None).expect("opening the CUDA device");
    println!("device: {}", gpu.name());
    (gpu, CpuDevice::new(CpuOptions::default()))
}

/// fp16 outputs against the CPU's f32 ones: one fp16 rounding is 2^-11 relative at worst, so
/// errors of a few 1e-4 are expected; 2e-3 leaves room for reordered f32 sums without hiding a
/// wrong element (one wrong element in a thousand already gives ~3e-2).
const TOL_F16: f64 = 2e-3;

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 (run by cargo xtask gpu-check / scripts/gpu-check.sh)"]
fn embeddings_match_cpu() {
    let (g, c) = devices();
    let mut r = Rng::fresh("embeddings");
    let (vocab, pos_rows, width, n) = (997, 130, 80, 37);
    let tok = r.halves(vocab * width, 1.0);
    let pos = r.halves(pos_rows * width, 1.0);
    let ids: Vec<u32> = (0..n).map(|_| r.below(vocab as u32)).collect();
    let pids: Vec<u32> = (0..n).map(|_| r.below(pos_rows as u32)).collect();
    let g_out = {
        let t = g.upload(HostSlice::F16(&tok), &[vocab, width]).unwrap();
        let p = g.upload(HostSlice::F16(&pos), &[pos_rows, width]).unwrap();
        let i = g.upload(HostSlice::U32(&ids), &[n]).unwrap();
        let pi = g.upload(HostSlice::U32(&pids), &[n]).unwrap();
        let mut x = g.gather_rows(&t, &i).unwrap();
        g.add_gathered_rows(&mut x, &p, &pi).unwrap();
        g.download_f32(&x).unwrap()
    };
    let c_out = {
        let t = c.upload(HostSlice::F16(&tok), &[vocab, width]).unwrap();
        let p = c.upload(HostSlice::F16(&pos), &[pos_rows, width]).unwrap();
        let i = c.upload(HostSlice::U32(&ids), &[n]).unwrap();
        let pi = c.upload(HostSlice::U32(&pids), &[n]).unwrap();
        let mut x = c.gather_rows(&t, &i).unwrap();
        c.add_gathered_rows(&mut x, &p, &pi).unwrap();
        c.download_f32(&x).unwrap()
    };
    report("gather_rows+add_gathered_rows", &g_out, &c_out, TOL_F16);
}

fn layer_norm_on<D: Device>(
    d: &D,
    x: &[f16],
    w: &[f16],
    b: &[f16],
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let xt = act(d, x, &[rows, cols]);
    let wt = d.upload(HostSlice::F16(w), &[cols]).unwrap();
    let bt = d.upload(HostSlice::F16(b), &[cols]).unwrap();
    let y = d.layer_norm(&xt, &wt, &bt, 1e-5).unwrap();
    d.download_f32(&y).unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 (run by cargo xtask gpu-check / scripts/gpu-check.sh)"]
fn layer_norm_matches_cpu() {
    let (g, c) = devices();
    let mut r = Rng::fresh("layer_norm");
    for (rows, cols) in [(5, 80), (33, 2048), (3, 12288)] {
        // A large common offset: the two-pass variance must not cancel.
        let x: Vec<f16> = r
            .halves(rows * cols, 2.0)
            .into_iter()
            .map(|v| f16::from_f32(v.to_f32() + 30.0))
            .collect();
        let w = r.halves(cols, 1.5);
        let b = r.halves(cols, 0.5);
        let got = layer_norm_on(&g, &x, &w, &b, rows, cols);
        let want = layer_norm_on(&c, &x, &w, &b, rows, cols);
        report(&format!("layernorm[{rows}x{cols}]"), &got, &want, TOL_F16);
    }
}

#[allow(clippy::too_many_arguments)]
fn linear_on<D: Device>(
    d: &D,
    x: &[f16],
    w: &[f16],
    b: Option<&[f16]>,
    n: usize,
    k: usize,
    m: usize,
    a: Activation,
) -> Vec<f32> {
    let xt = act(d, x, &[n, k]);
    let wt = d.upload(HostSlice::F16(w), &[m, k]).unwrap();
    let bt = b.map(|b| d.upload(HostSlice::F16(b), &[m]).unwrap());
    let y = d.linear(&xt, &wt, bt.as_ref(), a).unwrap();
    d.download_f32(&y).unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 (run by cargo xtask gpu-check / scripts/gpu-check.sh)"]
fn linear_matches_cpu() {
    let (g, c) = devices();
    let mut r = Rng::fresh("linear");
    // Small row counts take cuBLAS + the bias kernel, large ones cuBLASLt's fused epilogue.
    for (n, k, m) in [(3, 80, 200), (40, 256, 997), (256, 512, 768)] {
        let x = r.halves(n * k, 1.0);
        let w = r.halves(m * k, 0.1);
        let b = r.halves(m, 0.5);
        for (label, bias, a) in [
            ("gemm", None, Activation::None),
            ("gemm+bias", Some(&b[..]), Activation::None),
            ("gemm+bias+relu", Some(&b[..]), Activation::Relu),
        ] {
            let got = linear_on(&g, &x, &w, bias, n, k, m, a);
            let want = linear_on(&c, &x, &w, bias, n, k, m, a);
            report(&format!("{label}[{n}x{k}x{m}]"), &got, &want, TOL_F16);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 (run by cargo xtask gpu-check / scripts/gpu-check.sh)"]
fn residual_add_and_last_rows_match_cpu() {
    let (g, c) = devices();
    let mut r = Rng::fresh("residual");
    let (batch, seq, w) = (3, 7, 200);
    let x = r.halves(batch * seq * w, 4.0);
    let y = r.halves(batch * seq * w, 4.0);
    let (ga, gl) = {
        let mut xt = act(&g, &x, &[batch * seq, w]);
        let yt = act(&g, &y, &[batch * seq, w]);
        g.add_inplace(&mut xt, &yt).unwrap();
        let l = g.last_rows(&xt, batch, seq).unwrap();
        (g.download_f32(&xt).unwrap(), g.download_f32(&l).unwrap())
    };
    let mut xt = act(&c, &x, &[batch * seq, w]);
    let yt = act(&c, &y, &[batch * seq, w]);
    c.add_inplace(&mut xt, &yt).unwrap();
    let l = c.last_rows(&xt, batch, seq).unwrap();
    let (ca, cl) = (c.download_f32(&xt).unwrap(), c.download_f32(&l).unwrap());
    report("residual_add", &ga, &ca, TOL_F16);
    report("last_rows", &gl, &cl, TOL_F16);
}

/// Left padding: sequence b has `pads[b]` pad tokens first.
fn mask_for(batch: usize, total: usize, pads: &[usize]) -> Vec<u32> {
    let mut m = vec![1u32; batch * total];
    for b in 0..batch {
        for j in 0..pads[b].min(total) {
            m[b * total + j] = 0;
        }
    }
    m
}

/// Appends `steps` (new_len per step) of random keys/values to fresh caches and runs attention
/// after each step; returns every step's output.
#[allow(clippy::too_many_arguments)]
fn attention_on<D: Device>(
    d: &D,
    batch: usize,
    heads: usize,
    hd: usize,
    max_len: usize,
    steps: &[usize],
    data: &[(Vec<f16>, Vec<f16>, Vec<f16>)],
    mask: &[u32],
    total_final: usize,
) -> Vec<Vec<f32>> {
    let (kc, vc) = (
        d.alloc_kv(batch, heads, max_len, hd).unwrap(),
        d.alloc_kv(batch, heads, max_len, hd).unwrap(),
    );
    let shape = |past, new| AttnShape::new(batch, heads, hd, past, new);
    attention_steps(d, (kc, vc), shape, steps, data, mask, total_final)
}

/// [`attention_on`] over the caches given, with the step's keys and values handed to
/// attention too (`attention_with_new`), each step's shape from `shape(past, new)`.
fn attention_steps<D: Device>(
    d: &D,
    (mut kc, mut vc): (D::Tensor, D::Tensor),
    shape: impl Fn(usize, usize) -> AttnShape,
    steps: &[usize],
    data: &[(Vec<f16>, Vec<f16>, Vec<f16>)],
    mask: &[u32],
    total_final: usize,
) -> Vec<Vec<f32>> {
    let mut past = 0;
    let mut outs = Vec::new();
    for (step, &new) in steps.iter().enumerate() {
        let s = shape(past, new);
        let (batch, heads, hd) = (s.batch, s.heads, s.head_dim);
        let (q, k, v) = &data[step];
        let rows = batch * new;
        let qt = act(d, q, &[rows, heads * hd]);
        let kt = act(d, k, &[rows, heads * hd]);
        let vt = act(d, v, &[rows, heads * hd]);
        d.append_kv(&mut kc, &mut vc, &kt, &vt, s).unwrap();
        // The mask of this step: the first total_len columns of each row of the final mask.
        let total = s.total_len();
        let m: Vec<u32> = (0..batch)
            .flat_map(|b| mask[b * total_final..b * total_final + total].to_vec())
            .collect();
        let mt = d.upload(HostSlice::U32(&m), &[batch, total]).unwrap();
        let o = d
            .attention_with_new(&qt, &kt, &vt, &kc, &vc, &mt, s)
            .unwrap();
        outs.push(d.download_f32(&o).unwrap());
        past += new;
    }
    outs
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 (run by cargo xtask gpu-check / scripts/gpu-check.sh)"]
fn attention_matches_cpu() {
    let (g, c) = devices();
    let mut r = Rng::fresh("attention");
    // (batch, heads, head_dim, steps): a prefill with left padding, then decode steps (one
    // query, flash-decoding splits once the cache is long), then a multi-token step with a past.
    let cases: &[(usize, usize, usize, Vec<usize>)] = &[
        (3, 4, 16, vec![9, 1, 1, 3]),
        (2, 5, 80, vec![37, 1, 2, 1]),
        (2, 4, 128, vec![70, 1, 1]),
        (1, 2, 64, vec![1500, 1, 600, 1]),
    ];
    for (batch, heads, hd, steps) in cases {
        let (batch, heads, hd) = (*batch, *heads, *hd);
        let total: usize = steps.iter().sum();
        let pads: Vec<usize> = (0..batch)
            .map(|b| {
                if b == 0 {
                    0
                } else {
                    r.below(steps[0] as u32 / 2 + 1) as usize
                }
            })
            .collect();
        let mask = mask_for(batch, total, &pads);
        let data: Vec<(Vec<f16>, Vec<f16>, Vec<f16>)> = steps
            .iter()
            .map(|&n| {
                let e = batch * n * heads * hd;
                (r.halves(e, 1.0), r.halves(e, 1.0), r.halves(e, 1.0))
            })
            .collect();
        let go = attention_on(&g, batch, heads, hd, total + 5, steps, &data, &mask, total);
        let co = attention_on(&c, batch, heads, hd, total + 5, steps, &data, &mask, total);
        for (i, (a, b)) in go.iter().zip(&co).enumerate() {
            let kind = if steps[i] == 1 { "decode" } else { "prefill" };
            report(
                &format!(
                    "attention_{kind}[b{batch} h{heads} d{hd} step{i} new{}]",
                    steps[i]
                ),
                a,
                b,
                TOL_F16,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 (run by cargo xtask gpu-check / scripts/gpu-check.sh)"]
fn sampling_and_softmax_match_cpu() {
    let (g, c) = devices();
    let mut r = Rng::fresh("sampling");
    let (rows, vocab) = (5, 50272);
    let mut logits = r.halves(rows * vocab, 8.0);
    // A planted tie in row 0: the lowest index must win, as with torch.argmax.
    let top = f16::from_f32(20.0);
    logits[123] = top;
    logits[4567] = top;
    let lg = act(&g, &logits, &[rows, vocab]);
    let lc = act(&c, &logits, &[rows, vocab]);
    let got = g.sample(&lg, &Sampling::Greedy).unwrap();
    let want = c.sample(&lc, &Sampling::Greedy).unwrap();
    assert_eq!(got, want, "argmax");
    assert_eq!(got[0], 123);
    println!("KERNEL argmax rel_err=0 tol=0 (ids identical: {got:?})");

    let temperature = 0.8;
    let uniforms: Vec<f32> = (0..rows).map(|_| r.unit()).collect();
    let how = Sampling::Temperature {
        temperature,
        uniforms: &uniforms,
    };
    let got = g.sample(&lg, &how).unwrap();
    let want = c.sample(&lc, &how).unwrap();
    // Inverse CDF can differ only when a uniform falls within rounding of a CDF step; then the
    // ids are adjacent in the CDF, so check the GPU's pick brackets the target within 1e-5.
    let probs = g
        .download_f32(&g.softmax(&lg, temperature).unwrap())
        .unwrap();
    for row in 0..rows {
        if got[row] == want[row] {
            continue;
        }
        let p = &probs[row * vocab..(row + 1) * vocab];
        let before: f64 = p[..got[row] as usize].iter().map(|&x| x as f64).sum();
        let after = before + p[got[row] as usize] as f64;
        let u = uniforms[row] as f64;
        assert!(
            before - 1e-5 <= u && u <= after + 1e-5,
            "row {row}: sampled {} but the CPU drew {} (u={u}, cdf {before}..{after})",
            got[row],
            want[row]
        );
    }
    println!("KERNEL sample_temperature rel_err=0 tol=0 (ids {got:?}, cpu {want:?})");

    // Softmax against an f64 reference of the same f16 logits.
    let mut want_p = Vec::with_capacity(rows * vocab);
    for row in logits.chunks(vocab) {
        let x = wide(row);
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = x
            .iter()
            .map(|&v| ((v as f64 - m) / temperature as f64).exp())
            .collect();
        let s: f64 = e.iter().sum();
        want_p.extend(e.iter().map(|v| (v / s) as f32));
    }
    report("softmax", &probs, &want_p, 1e-4);
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 (run by cargo xtask gpu-check / scripts/gpu-check.sh)"]
fn conversions_roundtrip() {
    let (g, _) = devices();
    let mut r = Rng::fresh("convert");
    let n = 100_003;
    let v: Vec<f32> = (0..n).map(|_| (r.unit() * 2.0 - 1.0) * 1000.0).collect();
    let t = g.upload(HostSlice::F32(&v), &[n]).unwrap();
    // linear's input path converts F32 to F16 on the device; download_f32 widens on the device.
    let w = g.upload(HostSlice::F16(&[f16::ONE]), &[1, 1]).unwrap();
    let as_col = g.upload(HostSlice::F32(&v), &[n, 1]).unwrap();
    let y = g.linear(&as_col, &w, None, Activation::None).unwrap();
    let got = g.download_f32(&y).unwrap();
    let want: Vec<f32> = v.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    assert_eq!(
        got, want,
        "f32 -> f16 -> f32 must round to nearest even exactly like half::f16"
    );
    assert_eq!(g.download_f32(&t).unwrap(), v);
    println!("KERNEL f32_to_f16+f16_to_f32 rel_err=0 tol=0 (bit-exact)");
}

/// Runs everywhere. Without a driver, opening the device fails with a message that names the
/// missing library (never a panic); with one, it opens.
#[test]
fn cuda_device_reports_absence_clearly() {
    match (cuda::probe(), CudaDevice::new(0, None)) {
        (Err(probe_msg), Err(e)) => {
            let msg = format!("{e:#}");
            assert_eq!(msg, probe_msg);
            assert!(
                msg.contains("libcuda.so.1") || msg.contains("driver"),
                "{msg}"
            );
            println!("no GPU here, as reported: {msg}");
        }
        (Ok(_), Ok(d)) => println!("GPU present: {}", d.name()),
        (Ok(_), Err(e)) => println!("driver present but the device did not open: {e:#}"),
        (Err(p), Ok(_)) => panic!("probe said no GPU ({p}) but the device opened"),
    }
}

/// [`attention_steps`] over zeroed caches of `kv` and shape `dims`, allocated on `d`.
#[allow(clippy::too_many_arguments)]
fn steps_over_zeros<D: Device>(
    d: &D,
    kv: DType,
    dims: &[usize],
    shape: impl Fn(usize, usize) -> AttnShape,
    steps: &[usize],
    data: &[(Vec<f16>, Vec<f16>, Vec<f16>)],
    mask: &[u32],
    total: usize,
) -> Vec<Vec<f32>> {
    let caches = (d.zeros(kv, dims).unwrap(), d.zeros(kv, dims).unwrap());
    attention_steps(d, caches, shape, steps, data, mask, total)
}

/// A compressed `[m, k]` weight on device `d` (compressed once on the host, as the offloader does).
fn compressed<D: Device>(d: &D, w: &[f16], m: usize, k: usize) -> D::Tensor {
    let bytes = backend_native::compress::compress_f16(w, &[m, k], 0);
    d.upload_compressed(&bytes, &[m, k], 0).unwrap()
}

/// `relu(x W^T + b)` with W compressed, on `d`.
fn q4_linear_on<D: Device>(
    d: &D,
    x: &[f16],
    w: &[f16],
    b: &[f16],
    n: usize,
    k: usize,
    m: usize,
) -> Vec<f32> {
    let (xt, wt) = (act(d, x, &[n, k]), compressed(d, w, m, k));
    let bt = d.upload(HostSlice::F16(b), &[m]).unwrap();
    d.download_f32(&d.linear(&xt, &wt, Some(&bt), Activation::Relu).unwrap())
        .unwrap()
}

/// Rows `ids` of a compressed table, gathered and then added once more, on `d`.
fn q4_gather_on<D: Device>(d: &D, table: &D::Tensor, ids: &[u32]) -> Vec<f32> {
    let i = d.upload(HostSlice::U32(ids), &[ids.len()]).unwrap();
    let mut x = d.gather_rows(table, &i).unwrap();
    d.add_gathered_rows(&mut x, table, &i).unwrap();
    d.download_f32(&x).unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 (run by cargo xtask gpu-check / scripts/gpu-check.sh)"]
fn compressed_weights_match_cpu() {
    let (g, c) = devices();
    let mut r = Rng::fresh("compressed_weights");
    // up to 8 rows the fused decode + matrix-vector kernel (4 rows per launch), past them cuBLAS
    // on a decoded copy; partial last groups, an output count below one group
    for (n, k, m) in [
        (1, 256, 130),
        (3, 80, 200),
        (4, 2048, 512),
        (6, 512, 1000),
        (8, 256, 50),
        (9, 256, 130),
        (40, 512, 300),
    ] {
        let x = r.halves(n * k, 1.0);
        let w = r.halves(m * k, 0.1);
        let b = r.halves(m, 0.5);
        let (got, want) = (
            q4_linear_on(&g, &x, &w, &b, n, k, m),
            q4_linear_on(&c, &x, &w, &b, n, k, m),
        );
        report(
            &format!("q4_linear+bias+relu[{n}x{k}x{m}]"),
            &got,
            &want,
            TOL_F16,
        );
    }
    // the stored bytes come back as the CPU decodes them
    let w = r.halves(130 * 24, 1.0);
    let (gt, ct) = (compressed(&g, &w, 130, 24), compressed(&c, &w, 130, 24));
    report(
        "q4_upload_download",
        &g.download_f32(&gt).unwrap(),
        &c.download_f32(&ct).unwrap(),
        1e-6,
    );
    // gathers from a compressed table (the embeddings)
    let ids: Vec<u32> = (0..37).map(|_| r.below(130)).collect();
    report(
        "q4_gather_rows+add_gathered_rows",
        &q4_gather_on(&g, &gt, &ids),
        &q4_gather_on(&c, &ct, &ids),
        TOL_F16,
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU with CUDA 13 (run by cargo xtask gpu-check / scripts/gpu-check.sh)"]
fn compressed_cache_and_sparse_attention_match_cpu() {
    let (g, c) = devices();
    let mut r = Rng::fresh("compressed_cache");
    let q4 = DType::Q4 { group_dim: 3 };
    // (cache dtype, sparsity, batch, heads, head_dim, steps): a prefill over the cache, then
    // decode steps (split once the cache is long); sparse decode over fp16 and compressed caches
    type Case = (DType, f64, usize, usize, usize, Vec<usize>);
    let cases: &[Case] = &[
        (q4, 1.0, 3, 4, 64, vec![9, 1, 1]),
        (q4, 1.0, 2, 2, 80, vec![37, 1, 2, 1]),
        (q4, 1.0, 1, 2, 128, vec![700, 1, 1]),
        (q4, 0.3, 2, 4, 64, vec![40, 1, 1]),
        (DType::F16, 0.3, 2, 4, 64, vec![40, 1, 1]),
        (DType::F16, 0.1, 2, 2, 128, vec![300, 1]),
    ];
    for (kv, sparsity, batch, heads, hd, steps) in cases {
        let (batch, heads, hd) = (*batch, *heads, *hd);
        let total: usize = steps.iter().sum();
        let pads: Vec<usize> = (0..batch).map(|b| if b == 0 { 0 } else { 3 }).collect();
        let mask = mask_for(batch, total, &pads);
        let data: Vec<(Vec<f16>, Vec<f16>, Vec<f16>)> = steps
            .iter()
            .map(|&n| {
                let e = batch * n * heads * hd;
                (r.halves(e, 1.0), r.halves(e, 1.0), r.halves(e, 1.0))
            })
            .collect();
        let max_len = total + 3;
        let shape =
            |past, new| AttnShape::new(batch, heads, hd, past, new).with_sparsity(*sparsity);
        let dims = [batch, heads, max_len, hd];
        let go = steps_over_zeros(&g, *kv, &dims, shape, steps, &data, &mask, total);
        let co = steps_over_zeros(&c, *kv, &dims, shape, steps, &data, &mask, total);
        for (i, (a, b)) in go.iter().zip(&co).enumerate() {
            let kind = if steps[i] == 1 { "decode" } else { "prefill" };
            let cache = if kv.is_compressed() { "q4" } else { "f16" };
            report(
                &format!(
                    "attention_{kind}_{cache}_sparsity{sparsity}[b{batch} h{heads} d{hd} step{i}]"
                ),
                a,
                b,
                TOL_F16,
            );
        }
    }
}
