//! Buffers kept between fetches: host read buffers for the disk tier (a fresh one would be
//! zeroed pages for every read) and compute buffers by shape (refilling one costs one copy).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use crate::device::{AlignedBuf, DType, Device, Fence};
use crate::offload::placement::Tier;
use crate::offload::stats::{MemGuard, Stats};

/// An aligned buffer with its host-memory accounting, and the copy out of it that must finish
/// before it is read into again.
pub struct PooledBuf {
    pub(super) buf: AlignedBuf,
    pub(super) in_flight: Option<Fence>,
    _mem: MemGuard,
}

/// Compute-device buffers of fetched tensors, by shape, kept for the next fetch: refilling a
/// buffer ([`Device::write`]) costs one copy, a fresh one an allocation, zeroing and a copy.
pub struct ComputePool<T>(pub(super) Mutex<HashMap<PoolKey, Vec<Pooled<T>>>>);

/// What a pooled compute buffer fits: a tensor's shape and storage dtype.
pub type PoolKey = (Vec<usize>, DType);

/// A pooled compute buffer and its memory accounting.
type Pooled<T> = (T, MemGuard);

/// The host read buffers of finished fetches, for the next disk reads.
pub(super) struct ReadBufPool(pub(super) Mutex<Vec<PooledBuf>>);

impl ReadBufPool {
    /// A buffer of at least `len` bytes: the smallest pooled one that fits (once the copy out of
    /// it is done), or a new one from the device's transfer memory.
    pub(super) fn take<D: Device>(
        &self,
        dev: &D,
        len: usize,
        stats: &Arc<Stats>,
    ) -> Result<PooledBuf> {
        let mut pool = self.0.lock().expect("buffer pool lock");
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.buf.len() >= len)
            .min_by_key(|(_, b)| b.buf.len())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let mut b = pool.swap_remove(i);
                drop(pool);
                if let Some(f) = b.in_flight.take() {
                    f.wait_host()
                        .context("waiting for an upload out of a disk read buffer")?;
                }
                Ok(b)
            }
            None => {
                drop(pool);
                let buf = dev.alloc_host(len)?;
                let mem = MemGuard::new(stats, Tier::Host, buf.len());
                Ok(PooledBuf {
                    buf,
                    in_flight: None,
                    _mem: mem,
                })
            }
        }
    }

    pub(super) fn give_back(&self, bufs: impl IntoIterator<Item = PooledBuf>) {
        self.0.lock().expect("buffer pool lock").extend(bufs);
    }
}

impl<T> ComputePool<T> {
    /// A compute buffer for a tensor of `shape` stored as `dtype` (fp16 or compressed): a
    /// pooled one or a new one.
    pub(super) fn take<D: Device<Tensor = T>>(
        &self,
        dev: &D,
        shape: &[usize],
        dtype: DType,
        stats: &Arc<Stats>,
    ) -> Result<(T, MemGuard)> {
        if let Some(b) = self
            .0
            .lock()
            .expect("compute pool lock")
            .get_mut(&(shape.to_vec(), dtype))
            .and_then(|v| v.pop())
        {
            return Ok(b);
        }
        let bytes = dtype.bytes(shape);
        let t = dev.zeros(dtype, shape)?;
        Ok((t, MemGuard::new(stats, Tier::Compute, bytes)))
    }
}
