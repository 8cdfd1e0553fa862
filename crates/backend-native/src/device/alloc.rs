//! Allocation that fails with an error instead of aborting, shared by the devices and the
//! offloader: the [`OutOfMemory`] marker (the runner turns it into its out-of-memory exit code),
//! zero-filled vectors ([`try_zeros`]) and page-aligned host buffers ([`AlignedBuf`], which
//! O_DIRECT reads and CUDA's pinned staging memory both need).
//!
//! It sits below [`crate::device`] and [`crate::offload::direct`], so that neither of those has
//! to import the other.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;

use anyhow::{ensure, Context, Result};
use half::f16;

/// Marker error: an allocation failed on the device (or in host memory for the CPU device).
/// Put it in an error chain (`anyhow::Error::new(OutOfMemory{..})`) and test with
/// [`is_out_of_memory`].
#[derive(Debug, Clone)]
pub struct OutOfMemory {
    pub device: String,
    pub bytes: u64,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "out of memory on {}: could not allocate {} bytes",
            self.device, self.bytes
        )
    }
}

impl std::error::Error for OutOfMemory {}

/// Whether an error chain contains an [`OutOfMemory`].
pub fn is_out_of_memory(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<OutOfMemory>().is_some())
}

/// Allocates a zero-filled vector, reporting failure as [`OutOfMemory`] instead of aborting.
pub fn try_zeros<T: Clone + Default>(n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        anyhow::Error::new(OutOfMemory {
            device: "cpu".into(),
            bytes: (n * std::mem::size_of::<T>()) as u64,
        })
    })?;
    v.resize(n, T::default());
    Ok(v)
}

/// Alignment of O_DIRECT offsets, lengths and buffers (the page size; every Linux block device's
/// logical block size divides it).
pub const ALIGN: usize = 4096;

/// `n` rounded up to a multiple of [`ALIGN`].
pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A zero-initialized host buffer aligned to [`ALIGN`], its length a multiple of [`ALIGN`].
/// Either heap memory of its own or memory a device allocated ([`AlignedBuf::from_owner`]: pinned
/// host memory on CUDA), which the device recognises again through [`AlignedBuf::owner`].
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    /// The allocation the bytes belong to; `None` = our own heap allocation.
    owner: Option<Box<dyn std::any::Any + Send + Sync>>,
}

// SAFETY: the buffer is uniquely owned memory, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// At least `len` bytes (rounded up to [`ALIGN`]); an allocation failure is [`OutOfMemory`].
    pub fn new(len: usize) -> Result<AlignedBuf> {
        let len = align_up(len.max(1));
        let layout = Layout::from_size_align(len, ALIGN).context("aligned buffer layout")?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(anyhow::Error::new(OutOfMemory {
                device: "host".into(),
                bytes: len as u64,
            }));
        }
        Ok(AlignedBuf {
            ptr,
            len,
            owner: None,
        })
    }

    /// A view of memory owned by `owner` (freed when the buffer drops), zero-filled here.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for as long as `owner` lives, and
    /// nothing else may access that memory meanwhile.
    pub unsafe fn from_owner(
        ptr: *mut u8,
        len: usize,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<AlignedBuf> {
        ensure!(
            (ptr as usize).is_multiple_of(ALIGN) && len.is_multiple_of(ALIGN) && len > 0,
            "device host memory at {ptr:p} of {len} bytes is not {ALIGN}-byte aligned"
        );
        // SAFETY: valid for len bytes (the caller's promise).
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(AlignedBuf {
            ptr,
            len,
            owner: Some(owner),
        })
    }

    /// The allocation behind the bytes, if a device made it and it is a `T`.
    pub fn owner<T: 'static>(&self) -> Option<&T> {
        self.owner.as_ref()?.downcast_ref::<T>()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialized bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees uniqueness.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    /// `n` f16 values starting at byte `offset` (which must be even; ours are 4096-aligned).
    pub fn f16s(&self, offset: usize, n: usize) -> &[f16] {
        assert!(offset.is_multiple_of(2) && offset + 2 * n <= self.len);
        // SAFETY: in bounds (checked), 2-byte aligned (ptr is 4096-aligned, offset even), and
        // every bit pattern is a valid f16.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset) as *const f16, n) }
    }
    pub fn f16s_mut(&mut self, offset: usize, n: usize) -> &mut [f16] {
        assert!(offset.is_multiple_of(2) && offset + 2 * n <= self.len);
        // SAFETY: as in f16s, with unique access through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset) as *mut f16, n) }
    }
    pub fn f32s(&self, offset: usize, n: usize) -> &[f32] {
        assert!(offset.is_multiple_of(4) && offset + 4 * n <= self.len);
        // SAFETY: in bounds, 4-byte aligned, every bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset) as *const f32, n) }
    }
    pub fn f32s_mut(&mut self, offset: usize, n: usize) -> &mut [f32] {
        assert!(offset.is_multiple_of(4) && offset + 4 * n <= self.len);
        // SAFETY: as in f32s, with unique access through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset) as *mut f32, n) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.owner.is_some() {
            return; // the owner frees its memory when it drops
        }
        // SAFETY: allocated in `new` with this exact layout.
        unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.len, ALIGN)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device memory wrapped as a buffer (pinned memory on CUDA): zeroed, recognised again by
    /// its owner's type, freed by the owner only; misaligned memory is refused.
    #[test]
    fn buffers_over_owned_memory() {
        let mut inner = AlignedBuf::new(2 * ALIGN).unwrap();
        inner.bytes_mut().fill(7);
        let ptr = inner.bytes_mut().as_mut_ptr();
        // SAFETY: inner's memory lives in the owner box and nothing else touches it.
        let mut b = unsafe { AlignedBuf::from_owner(ptr, 2 * ALIGN, Box::new(inner)) }.unwrap();
        assert!(b.bytes().iter().all(|&x| x == 0));
        assert!(b.owner::<AlignedBuf>().is_some());
        assert!(b.owner::<u32>().is_none());
        b.f16s_mut(2, 3).fill(f16::ONE);
        assert_eq!(b.f16s(2, 3), &[f16::ONE; 3]);
        assert!(AlignedBuf::new(10).unwrap().owner::<AlignedBuf>().is_none());
        let mut other = AlignedBuf::new(2 * ALIGN).unwrap();
        let p = other.bytes_mut().as_mut_ptr();
        // SAFETY: refused before any access.
        let bad = unsafe { AlignedBuf::from_owner(p.wrapping_add(1), ALIGN, Box::new(())) };
        assert!(bad.is_err());
    }
}
