//! The CPU device: fp16 storage, f32 math, rayon over all cores.
//!
//! It is the reference every CUDA kernel is tested against, the compute device on machines
//! without a GPU, and the device for attention on CPU. Matrix products go through
//! [`matmul`] (a GEMM crate for many rows, a tuned fp16 matrix-vector path for few rows, and a
//! slow obviously-correct reference they are tested against).

pub mod amx;
pub mod attention;
pub mod bf16;
pub mod convert;
pub mod matmul;
pub mod pool;
pub mod profile;
pub mod shared_out;
pub mod simd;
pub mod wide;

use std::sync::OnceLock;

use anyhow::{bail, ensure, Context, Result};
use half::f16;
use rayon::prelude::*;

pub use super::alloc::try_zeros;
use super::{Activation, AttnShape, DType, Device, DeviceTensor, HostSlice, Sampling};
pub use matmul::MatmulMode;

/// Options of the CPU device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuOptions {
    /// Dtype of the KV cache: F16 (FlexLLMGen's storage, half the bytes) or F32 (exact reference).
    pub kv_dtype: DType,
    pub matmul: MatmulMode,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            kv_dtype: DType::F16,
            matmul: MatmulMode::F32,
        }
    }
}

/// Storage of a CPU tensor.
#[derive(Debug, Clone)]
pub enum Storage {
    F16(Vec<f16>),
    F32(Vec<f32>),
    U32(Vec<u32>),
}

/// A tensor in host memory.
#[derive(Debug, Clone)]
pub struct CpuTensor {
    shape: Vec<usize>,
    data: Storage,
    /// The weight packed for AMX, made on first use in the bf16 mode (a second copy of the
    /// weight in bf16: the bf16 mode trades memory for prefill speed).
    packed: OnceLock<Vec<u16>>,
    /// The weight in f32 for the f32 mode's GEMMs, made on first use ([`wide`]).
    wide: wide::WideCell,
}

impl Drop for CpuTensor {
    fn drop(&mut self) {
        if let Storage::F32(v) = &mut self.data {
            pool::give_f32(std::mem::take(v));
        }
    }
}

impl DeviceTensor for CpuTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn dtype(&self) -> DType {
        match self.data {
            Storage::F16(_) => DType::F16,
            Storage::F32(_) => DType::F32,
            Storage::U32(_) => DType::U32,
        }
    }
}

impl CpuTensor {
    pub fn storage(&self) -> &Storage {
        &self.data
    }
    pub fn f32(&self) -> Result<&[f32]> {
        match &self.data {
            Storage::F32(v) => Ok(v),
            _ => bail!(
                "expected an f32 tensor, got {:?} {:?}",
                self.dtype(),
                self.shape
            ),
        }
    }
    pub fn f16(&self) -> Result<&[f16]> {
        match &self.data {
            Storage::F16(v) => Ok(v),
            _ => bail!(
                "expected an f16 tensor, got {:?} {:?}",
                self.dtype(),
                self.shape
            ),
        }
    }
    pub fn u32(&self) -> Result<&[u32]> {
        match &self.data {
            Storage::U32(v) => Ok(v),
            _ => bail!(
                "expected a u32 tensor, got {:?} {:?}",
                self.dtype(),
                self.shape
            ),
        }
    }
    fn f32_mut(&mut self) -> Result<&mut [f32]> {
        let (dt, shape) = (self.dtype(), self.shape.clone());
        match &mut self.data {
            Storage::F32(v) => Ok(v),
            _ => bail!("expected an f32 tensor, got {dt:?} {shape:?}"),
        }
    }
    /// An f32 tensor from owned data.
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<CpuTensor> {
        ensure!(
            shape.iter().product::<usize>() == data.len(),
            "shape {shape:?} does not hold {} values",
            data.len()
        );
        Ok(CpuTensor {
            shape: shape.to_vec(),
            data: Storage::F32(data),
            packed: OnceLock::new(),
            wide: OnceLock::new(),
        })
    }
    /// An f16 tensor from owned data (no copy).
    pub fn from_f16(shape: &[usize], data: Vec<f16>) -> Result<CpuTensor> {
        ensure!(
            shape.iter().product::<usize>() == data.len(),
            "shape {shape:?} does not hold {} values",
            data.len()
        );
        Ok(CpuTensor {
            shape: shape.to_vec(),
            data: Storage::F16(data),
            packed: OnceLock::new(),
            wide: OnceLock::new(),
        })
    }
    /// Rows and width of a 2-D tensor.
    fn dims2(&self, what: &str) -> Result<(usize, usize)> {
        match self.shape.as_slice() {
            [r, c] => Ok((*r, *c)),
            s => bail!("{what}: expected a 2-D tensor, got shape {s:?}"),
        }
    }
}

/// The CPU device.
#[derive(Debug, Clone, Default)]
pub struct CpuDevice {
    pub opts: CpuOptions,
}

impl CpuDevice {
    /// `act(x W^T + b)` for each `(W, b)`, as one [`matmul::linear_group`].
    fn products(
        &self,
        x: &CpuTensor,
        weights: &[(&CpuTensor, Option<&CpuTensor>)],
        relu: bool,
    ) -> Result<Vec<CpuTensor>> {
        profile::timed(0, || {
            let (n, k) = x.dims2("linear x")?;
            let mut outs = Vec::with_capacity(weights.len());
            for &(w, bias) in weights {
                let (m, k2) = w.dims2("linear weight")?;
                ensure!(
                    k == k2,
                    "linear: x has {k} columns but the weight [{m}, {k2}] expects {k2}"
                );
                if let Some(b) = bias {
                    let len = b.f16()?.len();
                    ensure!(len == m, "linear: bias of {len} for {m} outputs");
                }
                // every element is written by the product
                outs.push((m, pool::take_f32(n * m)?));
            }
            let mut parts = Vec::with_capacity(weights.len());
            for (&(w, bias), (m, out)) in weights.iter().zip(outs.iter_mut()) {
                parts.push(matmul::Part {
                    w: w.f16()?,
                    m: *m,
                    bias: bias.map(|b| b.f16()).transpose()?,
                    relu,
                    packed: Some(&w.packed),
                    wide: Some(&w.wide),
                    out,
                });
            }
            matmul::linear_group(self.opts.matmul, x.f32()?, n, k, &mut parts);
            outs.into_iter()
                .map(|(m, out)| CpuTensor::from_f32(&[n, m], out))
                .collect()
        })
    }
    pub fn new(opts: CpuOptions) -> CpuDevice {
        CpuDevice { opts }
    }
}

impl Device for CpuDevice {
    type Tensor = CpuTensor;

    fn name(&self) -> String {
        let mode = match self.opts.matmul {
            MatmulMode::F32 => "f32",
            MatmulMode::Bf16 => "bf16",
        };
        format!(
            "cpu ({} threads, {mode} matmul, {:?} kv cache, {})",
            rayon::current_num_threads(),
            self.opts.kv_dtype,
            matmul::simd_level()
        )
    }
    fn act_dtype(&self) -> DType {
        DType::F32
    }
    fn kv_dtype(&self) -> DType {
        self.opts.kv_dtype
    }

    fn upload(&self, data: HostSlice<'_>, shape: &[usize]) -> Result<CpuTensor> {
        let n: usize = shape.iter().product();
        ensure!(
            n == data.len(),
            "upload: shape {shape:?} holds {n} values, got {}",
            data.len()
        );
        let data = match data {
            HostSlice::F16(s) => {
                let mut v = try_zeros(n)?;
                v.copy_from_slice(s);
                Storage::F16(v)
            }
            HostSlice::F32(s) => {
                let mut v = try_zeros(n)?;
                v.copy_from_slice(s);
                Storage::F32(v)
            }
            HostSlice::U32(s) => {
                let mut v = try_zeros(n)?;
                v.copy_from_slice(s);
                Storage::U32(v)
            }
        };
        Ok(CpuTensor {
            shape: shape.to_vec(),
            data,
            packed: OnceLock::new(),
            wide: OnceLock::new(),
        })
    }

    fn write(&self, dst: &mut CpuTensor, offset: usize, data: HostSlice<'_>) -> Result<()> {
        let n = dst.numel();
        ensure!(
            offset + data.len() <= n,
            "write: {} values at offset {offset} overflow a tensor of {n}",
            data.len()
        );
        let r = offset..offset + data.len();
        // the values change: packed and f32 copies would be stale. A tensor written into is a
        // buffer refilled by the offloader (a fetched weight) or an activation: an f32 copy of
        // it would serve one product, so none is made (see `matmul::linear_group`)
        dst.packed = OnceLock::new();
        dst.wide = OnceLock::from(None);
        match (&mut dst.data, data) {
            (Storage::F16(d), HostSlice::F16(s)) => d[r].copy_from_slice(s),
            (Storage::F32(d), HostSlice::F32(s)) => d[r].copy_from_slice(s),
            (Storage::U32(d), HostSlice::U32(s)) => d[r].copy_from_slice(s),
            (_, s) => bail!(
                "write: {:?} data into a {:?} tensor",
                s.dtype(),
                dst.dtype()
            ),
        }
        Ok(())
    }

    fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<CpuTensor> {
        let n = shape.iter().product();
        let data = match dtype {
            DType::F16 => Storage::F16(try_zeros(n)?),
            DType::F32 => Storage::F32(try_zeros(n)?),
            DType::U32 => Storage::U32(try_zeros(n)?),
        };
        Ok(CpuTensor {
            shape: shape.to_vec(),
            data,
            packed: OnceLock::new(),
            wide: OnceLock::new(),
        })
    }

    fn download_f32(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(match &t.data {
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::F32(v) => v.clone(),
            Storage::U32(v) => v.iter().map(|&x| x as f32).collect(),
        })
    }

    fn download_u32(&self, t: &CpuTensor) -> Result<Vec<u32>> {
        Ok(t.u32()?.to_vec())
    }

    fn download_f16(&self, t: &CpuTensor, offset: usize, out: &mut [f16]) -> Result<()> {
        let v = t.f16()?;
        ensure!(
            offset + out.len() <= v.len(),
            "download_f16: range past the end of a tensor of {}",
            v.len()
        );
        out.copy_from_slice(&v[offset..offset + out.len()]);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn gather_rows(&self, table: &CpuTensor, ids: &CpuTensor) -> Result<CpuTensor> {
        profile::timed(5, || {
            let (rows, width) = table.dims2("gather_rows table")?;
            let t = table.f16()?;
            let ids = ids.u32()?;
            let mut out = try_zeros::<f32>(ids.len() * width)?;
            for (o, &id) in out.chunks_mut(width).zip(ids) {
                ensure!(
                    (id as usize) < rows,
                    "gather_rows: id {id} out of range for a table of {rows} rows"
                );
                let src = &t[id as usize * width..(id as usize + 1) * width];
                convert::f16_to_f32(src, o);
            }
            CpuTensor::from_f32(&[ids.len(), width], out)
        })
    }

    fn add_gathered_rows(
        &self,
        x: &mut CpuTensor,
        table: &CpuTensor,
        ids: &CpuTensor,
    ) -> Result<()> {
        profile::timed(5, || {
            let (rows, width) = table.dims2("add_gathered_rows table")?;
            let (n, w) = x.dims2("add_gathered_rows x")?;
            ensure!(
                w == width,
                "add_gathered_rows: x width {w} != table width {width}"
            );
            let ids = ids.u32()?;
            ensure!(
                ids.len() == n,
                "add_gathered_rows: {} ids for {n} rows",
                ids.len()
            );
            let t = table.f16()?;
            for (o, &id) in x.f32_mut()?.chunks_mut(width).zip(ids) {
                ensure!(
                    (id as usize) < rows,
                    "add_gathered_rows: id {id} out of range for a table of {rows} rows"
                );
                let src = &t[id as usize * width..(id as usize + 1) * width];
                for (a, b) in o.iter_mut().zip(src) {
                    *a += b.to_f32();
                }
            }
            Ok(())
        })
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        profile::timed(1, || {
            let (n, w) = x.dims2("layer_norm x")?;
            let (g, b) = (weight.f16()?, bias.f16()?);
            ensure!(
                g.len() == w && b.len() == w,
                "layer_norm: weight/bias of {} for width {w}",
                g.len()
            );
            let g: Vec<f32> = g.iter().map(|v| v.to_f32()).collect();
            let b: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
            let mut out = pool::take_f32(n * w)?; // every row is written
            out.par_chunks_mut(w)
                .zip(x.f32()?.par_chunks(w))
                .for_each(|(o, r)| simd::layer_norm_row(r, &g, &b, eps, o));
            CpuTensor::from_f32(&[n, w], out)
        })
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        act: Activation,
    ) -> Result<CpuTensor> {
        let mut outs = self.products(x, &[(w, bias)], act == Activation::Relu)?;
        Ok(outs.remove(0))
    }

    fn linear_shared_input(
        &self,
        x: &CpuTensor,
        weights: &[(&CpuTensor, Option<&CpuTensor>)],
    ) -> Result<Vec<CpuTensor>> {
        self.products(x, weights, false)
    }

    fn add_inplace(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        profile::timed(4, || {
            ensure!(
                x.shape == y.shape,
                "add_inplace: shapes {:?} and {:?}",
                x.shape,
                y.shape
            );
            let y = y.f32()?;
            x.f32_mut()?
                .par_chunks_mut(1 << 14)
                .zip(y.par_chunks(1 << 14))
                .for_each(|(a, b)| simd::add_assign(a, b));
            Ok(())
        })
    }

    fn alloc_kv(
        &self,
        batch: usize,
        heads: usize,
        max_len: usize,
        head_dim: usize,
    ) -> Result<CpuTensor> {
        self.zeros(self.opts.kv_dtype, &[batch, heads, max_len, head_dim])
            .context("allocating the KV cache")
    }

    fn append_kv(
        &self,
        k_cache: &mut CpuTensor,
        v_cache: &mut CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        s: AttnShape,
    ) -> Result<()> {
        profile::timed(3, || attention::append_kv(k_cache, v_cache, k, v, s))
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k_cache: &CpuTensor,
        v_cache: &CpuTensor,
        mask: &CpuTensor,
        s: AttnShape,
    ) -> Result<CpuTensor> {
        let amx = self.opts.matmul == MatmulMode::Bf16 && amx::available();
        profile::timed(2, || {
            attention::attention(q, k_cache, v_cache, mask, s, amx)
        })
    }

    fn last_rows(&self, x: &CpuTensor, batch: usize, seq: usize) -> Result<CpuTensor> {
        profile::timed(6, || {
            let (n, w) = x.dims2("last_rows x")?;
            ensure!(
                n == batch * seq,
                "last_rows: {n} rows are not {batch} x {seq}"
            );
            let x = x.f32()?;
            let mut out = Vec::with_capacity(batch * w);
            for b in 0..batch {
                let r = b * seq + seq - 1;
                out.extend_from_slice(&x[r * w..(r + 1) * w]);
            }
            CpuTensor::from_f32(&[batch, w], out)
        })
    }

    fn sample(&self, logits: &CpuTensor, how: &Sampling<'_>) -> Result<Vec<u32>> {
        profile::timed(7, || {
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
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Rng;

    fn rand_f32(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.uniform() * 2.0 - 1.0).collect()
    }
    fn rand_f16(n: usize, seed: u64) -> Vec<f16> {
        rand_f32(n, seed).into_iter().map(f16::from_f32).collect()
    }
    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
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
                let q = CpuTensor::from_f32(&[b * new, h * d], rand_f32(b * new * h * d, seed))
                    .unwrap();
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
                        CpuTensor::from_f32(&[b * new, h * d], rand_f32(b * new * h * d, sd))
                            .unwrap()
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
}
