//! The two-stage fetch of a weight unit, so that the disk never waits for a copy: stage one
//! reads the unit's disk spans into pooled host buffers (the disk thread), stage two copies host
//! and disk tensors to the compute device (the transfer thread); and [`TieredWeights::fetch`],
//! both at once.

use std::sync::Arc;

use anyhow::{Context, Result};

use super::fetched::Fetched;
use super::pool::PooledBuf;
use super::store::{DiskSpan, Home, TieredWeights};
use crate::device::{Device, DeviceTensor};
use crate::offload::stats::Link;

/// A unit's disk tensors read into host memory (stage one of a fetch).
pub struct DiskRead {
    /// (owning unit, buffer holding that unit's file from offset 0)
    /// (owning unit, file offset of the buffer's first byte, buffer)
    bufs: Vec<(usize, usize, PooledBuf)>,
}

impl<T: DeviceTensor> TieredWeights<T> {
    /// Stage one: reads every file that holds a disk tensor of `unit`, each with one sequential
    /// O_DIRECT read.
    pub fn read_disk<D: Device<Tensor = T>>(&self, dev: &D, unit: usize) -> Result<DiskRead> {
        let mut bufs = Vec::new();
        for DiskSpan {
            owner, start, end, ..
        } in self.disk_spans(unit)
        {
            let f = self.files[owner]
                .as_ref()
                .expect("disk tensors have a file");
            let len = end - start;
            let mut b = self.pool.take(dev, len, &self.stats)?;
            let t0 = std::time::Instant::now();
            f.file
                .read_at(&mut b.buf, len, start as u64)
                .with_context(|| format!("reading the weights of schedule unit {owner}"))?;
            self.stats.add_disk_busy(t0.elapsed().as_secs_f64());
            self.stats.moved(Link::DiskRead, len);
            bufs.push((owner, start, b));
        }
        Ok(DiskRead { bufs })
    }

    /// Stage two: the unit's tensors on the compute device.
    pub fn materialize<D: Device<Tensor = T>>(
        &self,
        dev: &D,
        unit: usize,
        disk: Option<DiskRead>,
    ) -> Result<Fetched<T>> {
        let mut tensors = Vec::with_capacity(self.units[unit].len());
        let mut copies = Vec::with_capacity(self.units[unit].len());
        let mut fences = Vec::new();
        let mut disk = disk;
        for &i in &self.units[unit] {
            let s = &self.stored[i];
            let t0 = std::time::Instant::now();
            let (mut t, g) = match &s.home {
                Home::Compute(t) => {
                    tensors.push(t.clone());
                    copies.push(None);
                    continue;
                }
                _ => self
                    .cpool
                    .take(dev, &s.plan.shape, s.plan.dtype, &self.stats)?,
            };
            let n = s.plan.bytes() / s.plan.dtype.size();
            let fence = match &s.home {
                Home::Host(buf) => dev.upload_async(&mut t, 0, buf, 0, n),
                Home::Disk { offset } => {
                    let (start, b) = disk
                        .as_mut()
                        .and_then(|d| d.bufs.iter_mut().find(|(u, _, _)| *u == s.plan.unit))
                        .map(|(_, start, b)| (*start, b))
                        .with_context(|| {
                            format!("{} was not read from disk before its upload", s.plan.name)
                        })?;
                    let at = *offset - start;
                    let file = self.files[s.plan.unit]
                        .as_ref()
                        .expect("disk tensors have a file");
                    s.check_read(0, &b.buf.bytes()[at..at + s.plan.bytes()], file.file.path())?;
                    let f = dev.upload_async(&mut t, 0, &b.buf, at, n);
                    if let Ok(Some(f)) = &f {
                        // copies out of one buffer finish in queue order: the last one covers all
                        b.in_flight = Some(f.clone());
                    }
                    f
                }
                Home::Compute(_) => unreachable!("handled above"),
            }
            .with_context(|| format!("copying {} to {}", s.plan.name, dev.name()))?;
            // queueing time on CUDA (the copy itself runs on the upload stream), copy time here
            self.stats.add_xfer_busy(t0.elapsed().as_secs_f64());
            fences.extend(fence);
            self.stats.moved(Link::HostToCompute, s.plan.bytes());
            tensors.push(Arc::new(t));
            copies.push(Some(((s.plan.shape.clone(), s.plan.dtype), g)));
        }
        if let Some(d) = disk {
            self.pool.give_back(d.bufs.into_iter().map(|(_, _, b)| b));
        }
        Ok(Fetched {
            tensors,
            fences,
            copies,
            pool: self.cpool.clone(),
        })
    }

    /// Both stages at once, ready for compute.
    pub fn fetch<D: Device<Tensor = T>>(&self, dev: &D, unit: usize) -> Result<Fetched<T>> {
        if self.stages_disk_reads(dev, unit) {
            return self.fetch_staged(dev, unit);
        }
        let disk = if self.has_disk(unit) {
            Some(self.read_disk(dev, unit)?)
        } else {
            None
        };
        let mut f = self.materialize(dev, unit, disk)?;
        f.ready(dev)?;
        Ok(f)
    }
}
