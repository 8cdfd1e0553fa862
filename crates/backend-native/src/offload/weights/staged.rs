//! The one-job fetch for devices whose uploads are plain copies (the CPU device): a reader
//! thread fills a small ring of hot staging buffers while this thread copies each chunk into its
//! tensors.

use std::sync::Arc;

use anyhow::{Context, Result};

use super::fetched::Fetched;
use super::store::{Home, TieredWeights, STAGE_BUFS};
use crate::device::{host_slice, Device, DeviceTensor};
use crate::offload::direct::{read_span_staged, AlignedBuf};
use crate::offload::stats::{Link, MemGuard};

/// A tensor of a staged fetch: resident already, or a compute buffer being filled.
enum StagedSlot<T> {
    Resident(Arc<T>),
    Copy(T, MemGuard),
}

impl<T: DeviceTensor> TieredWeights<T> {
    /// Whether `unit` is fetched by [`TieredWeights::fetch_staged`]: it has disk tensors and
    /// the device's uploads are plain copies (the CPU device). On CUDA the disk reads land in
    /// pinned buffers the copy engine uploads from, so they keep the two stages.
    pub fn stages_disk_reads<D: Device<Tensor = T>>(&self, dev: &D, unit: usize) -> bool {
        self.has_disk(unit) && !dev.async_uploads()
    }

    /// A whole fetch for devices whose uploads are copies: the unit's disk spans are read one
    /// [`STAGE_CHUNK`](super::STAGE_CHUNK) request at a time into a ring of [`STAGE_BUFS`]
    /// staging buffers by a reader thread, while this thread copies each arrived chunk into its
    /// tensors.
    ///
    /// The disk's DMA thus always lands in the same small, hot set of buffers. On this project's
    /// virtual disk that decides the read rate: one request at a time into 8-24 MiB of buffers
    /// read 2.7-2.8 GB/s, into 64 MiB 2.2, into unit-sized read buffers 2.1-2.3 (huge pages
    /// both ways). It also saves the unit-sized host buffers.
    pub fn fetch_staged<D: Device<Tensor = T>>(&self, dev: &D, unit: usize) -> Result<Fetched<T>> {
        let idx = &self.units[unit];
        let mut slots = Vec::with_capacity(idx.len());
        for &i in idx {
            let s = &self.stored[i];
            slots.push(match &s.home {
                Home::Compute(t) => StagedSlot::Resident(t.clone()),
                Home::Host(buf) => {
                    let t0 = std::time::Instant::now();
                    let (mut t, g) =
                        self.cpool
                            .take(dev, &s.plan.shape, s.plan.dtype, &self.stats)?;
                    let n = s.plan.bytes() / s.plan.dtype.size();
                    dev.write(&mut t, 0, host_slice(buf, s.plan.dtype, 0, n)?)
                        .with_context(|| format!("copying {} to {}", s.plan.name, dev.name()))?;
                    self.stats.add_xfer_busy(t0.elapsed().as_secs_f64());
                    self.stats.moved(Link::HostToCompute, s.plan.bytes());
                    StagedSlot::Copy(t, g)
                }
                Home::Disk { .. } => {
                    let (t, g) = self
                        .cpool
                        .take(dev, &s.plan.shape, s.plan.dtype, &self.stats)?;
                    StagedSlot::Copy(t, g)
                }
            });
        }
        let mut ring = std::mem::take(&mut *self.staging.lock().expect("staging lock"));
        while ring.len() < STAGE_BUFS {
            ring.push(AlignedBuf::new(self.stage_chunk)?);
        }
        let result = (|| -> Result<()> {
            for span in self.disk_spans(unit) {
                let f = &self.files[span.owner]
                    .as_ref()
                    .expect("disk tensors have a file")
                    .file;
                let copy = |chunk_at: usize, len: usize, chunk: &AlignedBuf| -> Result<()> {
                    let t0 = std::time::Instant::now();
                    for &(slot, off) in &span.parts {
                        let s = &self.stored[idx[slot]];
                        // the tensor's bytes [off, off + bytes) within this chunk
                        let lo = off.max(chunk_at);
                        let hi = (off + s.plan.bytes()).min(chunk_at + len);
                        if lo >= hi {
                            continue;
                        }
                        let StagedSlot::Copy(t, _) = &mut slots[slot] else {
                            unreachable!("disk tensors get a compute buffer")
                        };
                        s.check_read(
                            lo - off,
                            &chunk.bytes()[lo - chunk_at..hi - chunk_at],
                            f.path(),
                        )?;
                        let unit = s.plan.dtype.size();
                        let vals =
                            host_slice(chunk, s.plan.dtype, lo - chunk_at, (hi - lo) / unit)?;
                        dev.write(t, (lo - off) / unit, vals).with_context(|| {
                            format!("copying {} to {}", s.plan.name, dev.name())
                        })?;
                        self.stats.moved(Link::HostToCompute, hi - lo);
                    }
                    self.stats.add_xfer_busy(t0.elapsed().as_secs_f64());
                    Ok(())
                };
                read_span_staged(
                    f,
                    span.start..span.end,
                    self.stage_chunk,
                    &mut ring,
                    &self.stats,
                    copy,
                )
                .with_context(|| format!("reading the weights of schedule unit {}", span.owner))?;
            }
            Ok(())
        })();
        *self.staging.lock().expect("staging lock") = ring;
        result?;
        let (mut tensors, mut copies) = (Vec::new(), Vec::new());
        for (slot, &i) in slots.into_iter().zip(idx) {
            match slot {
                StagedSlot::Resident(t) => {
                    tensors.push(t);
                    copies.push(None);
                }
                StagedSlot::Copy(t, g) => {
                    tensors.push(Arc::new(t));
                    let p = &self.stored[i].plan;
                    copies.push(Some(((p.shape.clone(), p.dtype), g)));
                }
            }
        }
        Ok(Fetched {
            tensors,
            fences: Vec::new(),
            copies,
            pool: self.cpool.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::device::cpu::{CpuDevice, CpuOptions};
    use crate::model::{DummySource, TensorSource};
    use crate::offload::direct::{OffloadDir, ALIGN};
    use crate::offload::stats::Stats;
    use crate::offload::weights::plan::WeightPlan;
    use bench_core::Policy;

    #[test]
    fn staged_fetches_give_every_tensor_whole() {
        // chunks of 12 KiB: tensors spanning chunks, chunks holding several tensors, and the
        // last chunk of a span short
        let cfg = bench_core::model::lookup("opt-tiny-odd").unwrap();
        let dev = CpuDevice::new(CpuOptions::default());
        let src = DummySource::new(&cfg, 7);
        let parent = std::env::temp_dir().join(format!("flexbench-staged-{}", std::process::id()));
        std::fs::create_dir_all(&parent).unwrap();
        for percent in [[0, 0, 100, 0, 100, 0], [0, 50, 100, 0, 100, 0]] {
            let plan = WeightPlan::new(&cfg, &Policy::new(percent), false);
            let dir = OffloadDir::open(&parent, plan.disk_bytes()).unwrap();
            let mut w = TieredWeights::build(&dev, &src, &plan, Some(&dir), &Stats::new()).unwrap();
            w.stage_chunk = 3 * ALIGN;
            let mut staged_units = 0;
            for u in 0..w.num_units() {
                staged_units += w.stages_disk_reads(&dev, u) as usize;
                // twice: the second fetch reuses pooled compute buffers and the staging ring
                for _ in 0..2 {
                    let f = w.fetch(&dev, u).unwrap();
                    for (t, &i) in f.tensors.iter().zip(&w.units[u]) {
                        let p = &w.stored[i].plan;
                        let want = src.load_f16(&p.name, &p.shape).unwrap();
                        let mut got = vec![f16::ZERO; want.len()];
                        dev.download_f16(t, 0, &mut got).unwrap();
                        assert!(got == want, "{percent:?}: {} differs", p.name);
                    }
                }
            }
            assert!(staged_units > 0, "{percent:?}: no unit read from disk");
        }
        std::fs::remove_dir_all(&parent).ok();
    }
}
