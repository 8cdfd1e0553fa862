//! The CUDA device's row and elementwise ops: embedding gathers, layer norm, the residual add,
//! the last position of each sequence, and the f32 -> f16 conversion every op applies to inputs
//! a caller uploaded in f32.

use anyhow::{bail, ensure, Result};

use super::device::CudaDevice;
use super::launch::{launch, rows_cfg};
use super::tensor::{check_2d, CudaTensor};
use crate::device::{DType, DeviceTensor};

impl CudaDevice {
    /// `t` as F16: itself, or an F16 copy made by the conversion kernel (callers may hand over
    /// F32 tensors they uploaded themselves).
    pub(super) fn as_f16<'a>(
        &self,
        t: &'a CudaTensor,
        tmp: &'a mut Option<CudaTensor>,
    ) -> Result<&'a CudaTensor> {
        match t.dtype {
            DType::F16 => Ok(t),
            DType::F32 => {
                let mut out = self.alloc(DType::F16, &t.shape)?;
                let n = t.numel() as i64;
                let (o, i) = (self.ptr_mut(&mut out), self.ptr(t));
                // SAFETY: out holds n halves, t holds n floats.
                unsafe { launch!(self, "f32_to_f16", self.grid_stride(n as usize), &o, &i, &n) }?;
                Ok(tmp.insert(out))
            }
            DType::U32 | DType::Q4 { .. } => bail!(
                "expected an fp16 or f32 tensor, got {:?} of shape {:?}",
                t.dtype,
                t.shape
            ),
        }
    }
}

pub(super) fn gather_rows(
    dev: &CudaDevice,
    table: &CudaTensor,
    ids: &CudaTensor,
) -> Result<CudaTensor> {
    let (rows, width) = check_2d(table, "gather_rows table")?;
    ensure!(
        (table.dtype == DType::F16 || table.dtype.is_compressed()) && ids.dtype == DType::U32,
        "gather_rows: F16 or compressed table and U32 ids expected"
    );
    let n = ids.numel();
    let mut out = dev.alloc(DType::F16, &[n, width])?;
    if table.dtype.is_compressed() {
        super::q4::gather(dev, &mut out, table, ids, false)?;
        return Ok(out);
    }
    let (o, t, i) = (dev.ptr_mut(&mut out), dev.ptr(table), dev.ptr(ids));
    let (nn, w, r) = (n as i32, width as i32, rows as i32);
    // SAFETY: out is [n, width], table [rows, width], ids [n].
    unsafe {
        launch!(
            dev,
            "gather_rows_f16",
            rows_cfg(n, 256),
            &o,
            &t,
            &i,
            &nn,
            &w,
            &r
        )
    }?;
    Ok(out)
}

pub(super) fn add_gathered_rows(
    dev: &CudaDevice,
    x: &mut CudaTensor,
    table: &CudaTensor,
    ids: &CudaTensor,
) -> Result<()> {
    let (rows, width) = check_2d(table, "add_gathered_rows table")?;
    let (n, xw) = check_2d(x, "add_gathered_rows x")?;
    ensure!(
        xw == width && ids.numel() == n,
        "add_gathered_rows: x {:?}, table {:?}, {} ids",
        x.shape,
        table.shape,
        ids.numel()
    );
    ensure!(
        x.dtype == DType::F16 && ids.dtype == DType::U32,
        "add_gathered_rows: F16 x and U32 ids expected"
    );
    if table.dtype.is_compressed() {
        return super::q4::gather(dev, x, table, ids, true);
    }
    let (o, t, i) = (dev.ptr_mut(x), dev.ptr(table), dev.ptr(ids));
    let (nn, w, r) = (n as i32, width as i32, rows as i32);
    // SAFETY: as in gather_rows.
    unsafe {
        launch!(
            dev,
            "add_gathered_rows_f16",
            rows_cfg(n, 256),
            &o,
            &t,
            &i,
            &nn,
            &w,
            &r
        )
    }?;
    Ok(())
}

pub(super) fn layer_norm(
    dev: &CudaDevice,
    x: &CudaTensor,
    weight: &CudaTensor,
    bias: &CudaTensor,
    eps: f32,
) -> Result<CudaTensor> {
    let mut tmp = None;
    let x = dev.as_f16(x, &mut tmp)?;
    let (rows, cols) = check_2d(x, "layer_norm")?;
    ensure!(
        weight.numel() == cols && bias.numel() == cols,
        "layer_norm: weight/bias of {} / {} for width {cols}",
        weight.numel(),
        bias.numel()
    );
    let mut out = dev.alloc(DType::F16, &[rows, cols])?;
    let (o, xp, wp, bp) = (
        dev.ptr_mut(&mut out),
        dev.ptr(x),
        dev.ptr(weight),
        dev.ptr(bias),
    );
    let (r, c) = (rows as i32, cols as i32);
    let threads = if cols >= 8192 {
        1024
    } else if cols >= 2048 {
        512
    } else {
        256
    };
    // SAFETY: out and x are [rows, cols]; weight and bias [cols].
    unsafe {
        launch!(
            dev,
            "layernorm_f16",
            rows_cfg(rows, threads),
            &o,
            &xp,
            &wp,
            &bp,
            &r,
            &c,
            &eps
        )
    }?;
    Ok(out)
}

pub(super) fn add_inplace(dev: &CudaDevice, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
    ensure!(
        x.shape == y.shape,
        "add_inplace: shapes {:?} and {:?}",
        x.shape,
        y.shape
    );
    ensure!(
        x.dtype == DType::F16,
        "add_inplace: x must be F16, got {:?}",
        x.dtype
    );
    let mut tmp = None;
    let y = dev.as_f16(y, &mut tmp)?;
    let n = x.numel() as i64;
    let (o, yp) = (dev.ptr_mut(x), dev.ptr(y));
    // SAFETY: out aliases x (the kernel reads each element before writing it); y has n halves.
    unsafe {
        launch!(
            dev,
            "residual_add_f16",
            dev.grid_stride(n as usize),
            &o,
            &o,
            &yp,
            &n
        )
    }?;
    Ok(())
}

pub(super) fn last_rows(
    dev: &CudaDevice,
    x: &CudaTensor,
    batch: usize,
    seq: usize,
) -> Result<CudaTensor> {
    let mut tmp = None;
    let x = dev.as_f16(x, &mut tmp)?;
    let (rows, width) = check_2d(x, "last_rows")?;
    ensure!(
        rows == batch * seq && seq > 0,
        "last_rows: {rows} rows for batch {batch} x seq {seq}"
    );
    let mut out = dev.alloc(DType::F16, &[batch, width])?;
    let (o, xp) = (dev.ptr_mut(&mut out), dev.ptr(x));
    let (b, sq, w) = (batch as i32, seq as i32, width as i32);
    // SAFETY: out is [batch, width], x [batch * seq, width].
    unsafe {
        launch!(
            dev,
            "last_rows_f16",
            rows_cfg(batch, 256),
            &o,
            &xp,
            &b,
            &sq,
            &w
        )
    }?;
    Ok(out)
}
