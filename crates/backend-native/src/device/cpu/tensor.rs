//! The CPU device's tensors: fp16, f32 or u32 values in host memory, with the derived copies of a
//! weight that the matrix products keep (packed for AMX, widened to f32).
//!
//! Dropping a large f32 tensor hands its buffer to [`super::pool`] for the next op's output.

use std::sync::OnceLock;

use anyhow::{bail, ensure, Result};
use half::f16;

use super::{pool, wide};
use crate::device::{DType, DeviceTensor};

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
    pub(super) shape: Vec<usize>,
    pub(super) data: Storage,
    /// The weight packed for AMX, made on first use in the bf16 mode (a second copy of the
    /// weight in bf16: the bf16 mode trades memory for prefill speed).
    pub(super) packed: OnceLock<Vec<u16>>,
    /// The weight in f32 for the f32 mode's GEMMs, made on first use ([`wide`]).
    pub(super) wide: wide::WideCell,
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
    pub(super) fn f32_mut(&mut self) -> Result<&mut [f32]> {
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
    pub(super) fn dims2(&self, what: &str) -> Result<(usize, usize)> {
        match self.shape.as_slice() {
            [r, c] => Ok((*r, *c)),
            s => bail!("{what}: expected a 2-D tensor, got shape {s:?}"),
        }
    }
}
