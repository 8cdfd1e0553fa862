//! The CPU device's tensors: fp16, f32 or u32 values, or the stored bytes of a 4-bit compressed
//! tensor, in host memory, with the derived copies of an fp16 weight that the matrix products
//! keep (packed for AMX, widened to f32; compressed weights keep none, which would undo their
//! saving).
//!
//! Dropping a large f32 tensor hands its buffer to [`super::pool`] for the next op's output.

use std::sync::OnceLock;

use anyhow::{bail, ensure, Result};
use half::f16;

use super::{pool, wide};
use crate::compress::Q4Layout;
use crate::device::{DType, DeviceTensor};

/// Storage of a CPU tensor.
#[derive(Debug, Clone)]
pub enum Storage {
    F16(Vec<f16>),
    F32(Vec<f32>),
    U32(Vec<u32>),
    /// [`crate::compress`]'s stored form of a tensor grouped along `group_dim`.
    Q4 {
        bytes: Vec<u8>,
        group_dim: usize,
    },
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
            Storage::Q4 { group_dim, .. } => DType::Q4 { group_dim },
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
    /// The stored bytes, whatever the dtype (the offloader moves cache slabs as bytes).
    pub fn raw_bytes(&self) -> &[u8] {
        match &self.data {
            Storage::F16(v) => as_bytes(v),
            Storage::F32(v) => as_bytes(v),
            Storage::U32(v) => as_bytes(v),
            Storage::Q4 { bytes, .. } => bytes,
        }
    }
    /// [`CpuTensor::raw_bytes`] to write into; kept derived copies are dropped (they would go
    /// stale).
    pub fn raw_bytes_mut(&mut self) -> &mut [u8] {
        self.packed = OnceLock::new();
        self.wide = OnceLock::from(None);
        match &mut self.data {
            Storage::F16(v) => as_bytes_mut(v),
            Storage::F32(v) => as_bytes_mut(v),
            Storage::U32(v) => as_bytes_mut(v),
            Storage::Q4 { bytes, .. } => bytes,
        }
    }
    /// A compressed tensor's bytes and layout.
    pub fn q4(&self) -> Result<(&[u8], Q4Layout)> {
        match &self.data {
            Storage::Q4 { bytes, group_dim } => Ok((bytes, Q4Layout::new(&self.shape, *group_dim))),
            _ => bail!(
                "expected a compressed tensor, got {:?} {:?}",
                self.dtype(),
                self.shape
            ),
        }
    }
    /// A compressed tensor of logical `shape` from its stored bytes (no copy).
    pub fn from_q4(shape: &[usize], group_dim: usize, bytes: Vec<u8>) -> Result<CpuTensor> {
        let want = Q4Layout::new(shape, group_dim).bytes();
        ensure!(
            bytes.len() == want,
            "a compressed tensor of shape {shape:?} grouped along dimension {group_dim} takes \
             {want} bytes, got {}",
            bytes.len()
        );
        Ok(CpuTensor {
            shape: shape.to_vec(),
            data: Storage::Q4 { bytes, group_dim },
            packed: OnceLock::new(),
            wide: OnceLock::new(),
        })
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

/// The bytes of plain values (f16, f32, u32: no padding, every bit pattern valid).
fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: T is one of the plain value types above; the view covers the slice exactly.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn as_bytes_mut<T: Copy>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; any byte written makes a valid value.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}
