//! [`CpuDevice`]: the [`Device`] trait in host memory, with f32 math on fp16 weights; the matrix
//! products and attention it runs live in [`super::matmul`] and [`super::attention`].
//!
//! Each op is timed under its [`super::profile`] slot, so a profiled run shows where the time
//! goes by op.

use std::sync::OnceLock;

use anyhow::{bail, ensure, Context, Result};
use half::f16;
use rayon::prelude::*;

use super::matmul::MatmulMode;
use super::q4::{self, Simd};
use super::tensor::{CpuTensor, Storage};
use super::{amx, attention, convert, matmul, pool, profile, q4_matmul, sampling, simd};
use crate::compress::Q4Layout;
use crate::device::alloc::try_zeros;
use crate::device::{Activation, AttnShape, DType, Device, DeviceTensor, HostSlice, Sampling};

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

/// The CPU device.
#[derive(Debug, Clone, Default)]
pub struct CpuDevice {
    pub opts: CpuOptions,
}

impl CpuDevice {
    /// `act(x W^T + b)` for each `(W, b)`, as one [`matmul::linear_group`] for the fp16
    /// weights and one [`q4_matmul::linear_group`] for the compressed ones.
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
                ensure!(
                    matches!(w.dtype(), DType::F16 | DType::Q4 { group_dim: 0 }),
                    "linear: weights must be fp16 or compressed along dimension 0, got {:?}",
                    w.dtype()
                );
                if let Some(b) = bias {
                    let len = b.f16()?.len();
                    ensure!(len == m, "linear: bias of {len} for {m} outputs");
                }
                // every element is written by the product
                outs.push((m, pool::take_f32(n * m)?));
            }
            let (mut plain, mut packed) = (Vec::new(), Vec::new());
            for (&(w, bias), (m, out)) in weights.iter().zip(outs.iter_mut()) {
                let bias = bias.map(|b| b.f16()).transpose()?;
                if let Storage::Q4 { bytes, .. } = &w.data {
                    packed.push(q4_matmul::Q4Part {
                        w: bytes,
                        m: *m,
                        bias,
                        relu,
                        out,
                    });
                } else {
                    plain.push(matmul::Part {
                        w: w.f16()?,
                        m: *m,
                        bias,
                        relu,
                        packed: Some(&w.packed),
                        wide: Some(&w.wide),
                        out,
                    });
                }
            }
            let x = x.f32()?;
            if !plain.is_empty() {
                matmul::linear_group(self.opts.matmul, x, n, k, &mut plain);
            }
            if !packed.is_empty() {
                q4_matmul::linear_group(self.opts.matmul, Simd::detect(), x, n, k, &mut packed);
            }
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
            "cpu ({} threads, {mode} matmul, {:?} kv cache, {}, 4-bit kernels {})",
            rayon::current_num_threads(),
            self.opts.kv_dtype,
            matmul::simd_level(),
            Simd::detect().name()
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
            HostSlice::Bytes(_) => bail!("upload: compressed bytes go through upload_compressed"),
        };
        Ok(CpuTensor {
            shape: shape.to_vec(),
            data,
            packed: OnceLock::new(),
            wide: OnceLock::new(),
        })
    }

    fn upload_compressed(
        &self,
        bytes: &[u8],
        shape: &[usize],
        group_dim: usize,
    ) -> Result<CpuTensor> {
        let mut v = try_zeros(bytes.len())?;
        v.copy_from_slice(bytes);
        CpuTensor::from_q4(shape, group_dim, v)
    }

    fn write(&self, dst: &mut CpuTensor, offset: usize, data: HostSlice<'_>) -> Result<()> {
        let n = dst.size_bytes() / dst.dtype().size();
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
            (Storage::Q4 { bytes, .. }, HostSlice::Bytes(s)) => bytes[r].copy_from_slice(s),
            (_, s) => bail!(
                "write: {} data into a {:?} tensor",
                s.dtype()
                    .map_or("compressed".to_string(), |d| format!("{d:?}")),
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
            DType::Q4 { group_dim } => Storage::Q4 {
                bytes: try_zeros(dtype.bytes(shape))?,
                group_dim,
            },
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
            Storage::Q4 { bytes, group_dim } => {
                crate::compress::decompress(bytes, Q4Layout::new(&t.shape, *group_dim))
            }
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
            let ids = ids.u32()?;
            let mut out = try_zeros::<f32>(ids.len() * width)?;
            for (o, &id) in out.chunks_mut(width).zip(ids) {
                ensure!(
                    (id as usize) < rows,
                    "gather_rows: id {id} out of range for a table of {rows} rows"
                );
                table_row(table, id as usize, o)?;
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
            let mut row = vec![0f32; width];
            for (o, &id) in x.f32_mut()?.chunks_mut(width).zip(ids) {
                ensure!(
                    (id as usize) < rows,
                    "add_gathered_rows: id {id} out of range for a table of {rows} rows"
                );
                table_row(table, id as usize, &mut row)?;
                simd::add_assign(o, &row);
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
            attention::attention(q, k_cache, v_cache, mask, s, amx, None)
        })
    }

    fn attention_with_new(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        k_cache: &CpuTensor,
        v_cache: &CpuTensor,
        mask: &CpuTensor,
        s: AttnShape,
    ) -> Result<CpuTensor> {
        let amx = self.opts.matmul == MatmulMode::Bf16 && amx::available();
        profile::timed(2, || {
            attention::attention(q, k_cache, v_cache, mask, s, amx, Some((k, v)))
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
        profile::timed(7, || sampling::sample(logits, how))
    }
}

/// Row `i` of an embedding table (fp16, or compressed along its rows) as f32 into `out`.
fn table_row(table: &CpuTensor, i: usize, out: &mut [f32]) -> Result<()> {
    let width = out.len();
    match &table.data {
        Storage::F16(t) => convert::f16_to_f32(&t[i * width..(i + 1) * width], out),
        Storage::Q4 {
            bytes,
            group_dim: 0,
        } => q4::table_row(bytes, Q4Layout::new(&table.shape, 0), i, out),
        _ => bail!(
            "an embedding table must be fp16 or compressed along its rows, got {:?}",
            table.dtype()
        ),
    }
    Ok(())
}
