//! Recycled activation buffers of the CPU device.
//!
//! Every op allocates its output, and a fresh zero-filled buffer costs a memset of the whole
//! activation (50 MB for an OPT-125m MLP at batch 16, prompt 256), which in prefill was a tenth
//! of the run. Ops whose kernels write every output element take a recycled buffer instead: large
//! f32 tensors return theirs here when dropped. The pool holds memory the allocator would keep
//! anyway (the runner sets glibc to keep freed memory), and it is bounded in count and bytes.

use std::sync::Mutex;

use anyhow::Result;

/// Buffers smaller than this are not worth pooling (the memset is cheap).
const MIN_LEN: usize = 1 << 16;
/// At most this many buffers and this many bytes wait in the pool.
const MAX_BUFFERS: usize = 16;
const MAX_BYTES: usize = 512 << 20;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// An f32 buffer of `n` values with unspecified (stale but initialized) contents: only for
/// outputs the caller overwrites entirely.
pub fn take_f32(n: usize) -> Result<Vec<f32>> {
    if n >= MIN_LEN {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pool.iter().position(|v| v.len() == n) {
            return Ok(pool.swap_remove(i));
        }
    }
    crate::device::alloc::try_zeros(n)
}

/// Gives a dropped tensor's buffer back for reuse (or frees it when the pool is full).
pub fn give_f32(v: Vec<f32>) {
    if v.len() < MIN_LEN {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let bytes: usize = pool.iter().map(|b| b.len() * 4).sum();
    if pool.len() < MAX_BUFFERS && bytes + v.len() * 4 <= MAX_BYTES {
        pool.push(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_with_their_length() {
        let n = MIN_LEN + 3;
        let v = take_f32(n).unwrap();
        assert_eq!(v.len(), n);
        let p = v.as_ptr();
        give_f32(v);
        // the same length gets the pooled buffer back (no other test pools this length)
        let w = take_f32(n).unwrap();
        assert_eq!((w.len(), w.as_ptr()), (n, p));
        // a small request is a fresh zeroed buffer, and a small one is not pooled
        assert_eq!(take_f32(5).unwrap(), vec![0.0; 5]);
    }
}
