//! Moving the KV cache between its tiers during a run: loading a GPU batch's host and disk
//! segments to where attention runs (disk reads on the disk thread, uploads on the transfer
//! thread), and writing a step's new keys and values back to disk.

use std::sync::mpsc::channel;

use anyhow::Result;

use super::queue::Pending;
use super::run::Run;
use crate::device::cpu::CpuTensor;
use crate::device::{Device, DeviceTensor, Fence};
use crate::offload::cache::{self, BatchCache};
use crate::offload::placement::Tier;
use crate::offload::stats::MemGuard;

/// A GPU batch's cache segments brought to where attention runs.
pub(super) struct Loaded<T> {
    /// Compute copies of the host segment (without cpu attention).
    pub(super) host: Option<(T, T)>,
    /// The disk segment read back into host memory.
    pub(super) disk_host: Option<(CpuTensor, CpuTensor)>,
    /// Compute copies of the disk segment (without cpu attention).
    pub(super) disk: Option<(T, T)>,
    /// Uploads into `host` / `disk` still in flight (devices with asynchronous uploads).
    pub(super) fences: Vec<Fence>,
    _mem: Vec<MemGuard>,
}

impl<T> Default for Loaded<T> {
    fn default() -> Self {
        Loaded {
            host: None,
            disk_host: None,
            disk: None,
            fences: Vec::new(),
            _mem: Vec::new(),
        }
    }
}

impl<'a, D: Device> Run<'a, D> {
    /// Starts bringing the cache of (layer, batch) to where attention will run, for a step with
    /// `past` positions already cached.
    pub(super) fn submit_cache_load(
        &mut self,
        layer: usize,
        k: usize,
        past: usize,
    ) -> Result<Option<Pending<Loaded<D::Tensor>>>> {
        let caches: &'a [Vec<BatchCache<D::Tensor>>] = self.caches;
        let c = &caches[layer][k];
        if c.all_compute() {
            return Ok(None);
        }
        if let Some(p) = self.stores.remove(&(layer, k)) {
            p.wait(self.stats, "writing the KV cache to disk")?;
        }
        let cpu_attn = self.sched.cpu_attention;
        let (dev, dims, stats) = (self.dev, self.dims, self.stats.clone());
        let (tx, rx) = channel();
        // the transfer part: host (and loaded disk) segments to the compute device
        let upload = move |mut l: Loaded<D::Tensor>| -> Result<Loaded<D::Tensor>> {
            if !cpu_attn {
                if let Some((hk, hv)) = c.host.lock().expect("cache lock").as_ref() {
                    let seqs = hk.shape()[0];
                    l._mem.push(MemGuard::new(
                        &stats,
                        Tier::Compute,
                        dims.bytes(seqs, dims.max_len),
                    ));
                    let (kv, f) = cache::segment_to_compute(
                        dev,
                        (hk, hv),
                        dims,
                        past,
                        &stats,
                        &c.staging[0],
                    )?;
                    l.host = Some(kv);
                    l.fences.extend(f);
                }
                if let Some((dk, dv)) = l.disk_host.take() {
                    let seqs = dk.shape()[0];
                    l._mem.push(MemGuard::new(
                        &stats,
                        Tier::Compute,
                        dims.bytes(seqs, dims.max_len),
                    ));
                    let (kv, f) = cache::segment_to_compute(
                        dev,
                        (&dk, &dv),
                        dims,
                        past,
                        &stats,
                        &c.staging[1],
                    )?;
                    l.disk = Some(kv);
                    l.fences.extend(f);
                }
            }
            Ok(l)
        };
        let needs_upload = !cpu_attn;
        if let Some(disk) = c.disk.as_ref() {
            let xfer = self.xfer_q.clone();
            let stats2 = self.stats.clone();
            self.disk_q.push(
                true,
                Box::new(move || {
                    let r = disk.load(dims, past, &stats2).map(|kv| {
                        let seqs = kv.0.shape()[0];
                        Loaded {
                            _mem: vec![MemGuard::new(
                                &stats2,
                                Tier::Host,
                                dims.bytes(seqs, dims.max_len),
                            )],
                            disk_host: Some(kv),
                            ..Default::default()
                        }
                    });
                    match r {
                        Ok(l) if needs_upload => xfer.push(
                            true,
                            Box::new(move || {
                                tx.send(upload(l)).ok();
                            }),
                        ),
                        other => {
                            tx.send(other).ok();
                        }
                    }
                }),
            );
        } else if needs_upload {
            self.xfer_q.push(
                true,
                Box::new(move || {
                    tx.send(upload(Loaded::default())).ok();
                }),
            );
        } else {
            tx.send(Ok(Loaded::default())).ok();
        }
        Ok(Some(Pending(rx)))
    }

    /// Queues the disk write of this step's keys and values of (layer, batch).
    pub(super) fn store_disk(
        &mut self,
        l: usize,
        k: usize,
        kh: CpuTensor,
        vh: CpuTensor,
        past: usize,
        new: usize,
    ) {
        let caches: &'a [Vec<BatchCache<D::Tensor>>] = self.caches;
        let disk = caches[l][k].disk.as_ref().expect("a disk segment");
        let (dims, stats) = (self.dims, self.stats.clone());
        let (tx, rx) = channel();
        self.disk_q.push(
            true,
            Box::new(move || {
                let r = match (kh.f32(), vh.f32()) {
                    (Ok(k), Ok(v)) => disk.store(dims, k, v, past, new, &stats),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
                tx.send(r).ok();
            }),
        );
        self.stores.insert((l, k), Pending(rx));
    }
}
