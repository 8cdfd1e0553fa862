//! The raw output pointer that the parallel matrix-product paths share between their tasks.
//!
//! Both [`super::matmul`] and [`super::amx`] need it; it lives below both so that neither imports
//! the other for it.

/// The output pointer shared by tasks that write disjoint parts of it (the matrix-vector and
/// GEMM paths of [`super::matmul`], the AMX path in [`super::amx`]).
#[derive(Clone, Copy)]
pub(super) struct SharedOut(pub(super) *mut f32);

// SAFETY: tasks write disjoint elements, and the output outlives the parallel loop (each user
// borrows it mutably around the loop).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Through a method, so closures capture the whole (Send, Sync) wrapper, not the raw field.
    pub(super) fn ptr(&self) -> *mut f32 {
        self.0
    }
}
