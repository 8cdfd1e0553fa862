//! [`CudaTensor`]: device memory with a shape and an element type, and the shape check the ops
//! share.
//!
//! Its memory is raw bytes (`CudaSlice<u8>`) whatever the dtype: kernels take raw addresses, and
//! typed views are made only where cuBLAS needs them.

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use half::f16;

use crate::device::{DType, DeviceTensor};

/// A tensor in device memory: raw bytes plus its shape and element type.
pub struct CudaTensor {
    pub(super) buf: CudaSlice<u8>,
    pub(super) shape: Vec<usize>,
    pub(super) dtype: DType,
}

impl DeviceTensor for CudaTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

impl CudaTensor {
    /// Addressable units: elements, or bytes of a compressed tensor.
    pub(super) fn units(&self) -> usize {
        self.size_bytes() / self.dtype.size()
    }
    /// The underlying device buffer (at least `size_bytes()` long), e.g. for
    /// [`super::memory::CopyStreams`].
    pub fn buffer(&self) -> &CudaSlice<u8> {
        &self.buf
    }
    pub fn buffer_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.buf
    }
    pub(super) fn f16_view(&self) -> CudaView<'_, f16> {
        // SAFETY: the buffer holds numel() f16 values (checked by callers through the dtype) and
        // device allocations are 256-byte aligned.
        unsafe { self.buf.transmute::<f16>(self.numel()) }
            .expect("an F16 tensor's buffer holds numel halves")
    }
    pub(super) fn f16_view_mut(&mut self) -> CudaViewMut<'_, f16> {
        let n = self.numel();
        // SAFETY: as in f16_view.
        unsafe { self.buf.transmute_mut::<f16>(n) }
            .expect("an F16 tensor's buffer holds numel halves")
    }
}

/// Rows and columns of a 2-d tensor; an error naming `what` for any other rank.
pub(super) fn check_2d(t: &CudaTensor, what: &str) -> Result<(usize, usize)> {
    match t.shape.as_slice() {
        [r, c] => Ok((*r, *c)),
        s => bail!("{what}: expected a 2-d tensor, got shape {s:?}"),
    }
}
