//! [`TieredWeights`]: every weight tensor on its tier (uploaded to the compute device, copied
//! into the device's transfer memory, or streamed into its unit's file), and the layout of the
//! unit files that both fetch paths read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use super::plan::{TensorPlan, WeightPlan};
use super::pool::{ComputePool, ReadBufPool};
use crate::compress::stream::for_each_stored_chunk;
use crate::compress::WEIGHT_GROUP_DIM;
use crate::device::{Device, DeviceTensor, HostSlice};
use crate::model::TensorSource;
use crate::offload::direct::{align_up, AlignedBuf, DirectFile, OffloadDir, ALIGN};
use crate::offload::placement::Tier;
use crate::offload::stats::{MemGuard, Stats};

/// A tensor's home.
pub(super) enum Home<T> {
    Compute(Arc<T>),
    /// Host memory from [`Device::alloc_host`] (pinned on CUDA: the transfer runs at the
    /// link's full rate and overlaps compute).
    Host(AlignedBuf),
    /// `bytes` at `offset` of its unit's file.
    Disk {
        offset: usize,
    },
}

pub(super) struct Stored<T> {
    pub(super) plan: TensorPlan,
    pub(super) home: Home<T>,
}

/// A unit's disk file: its disk tensors back to back, each at an aligned offset.
pub(super) struct UnitFile {
    pub(super) file: DirectFile,
}

/// All weights of a model, on their tiers.
pub struct TieredWeights<T> {
    pub(super) stored: Vec<Stored<T>>,
    pub(super) units: Vec<Vec<usize>>,
    pub(super) files: Vec<Option<UnitFile>>,
    pub(super) stats: Arc<Stats>,
    /// Read buffers returned by finished fetches: reused so the disk thread never waits for
    /// fresh pages to be zeroed between reads.
    pub(super) pool: ReadBufPool,
    /// The staging ring of [`TieredWeights::fetch_staged`], kept between fetches (hot).
    pub(super) staging: Mutex<Vec<AlignedBuf>>,
    /// Bytes per staged read request: [`STAGE_CHUNK`] (tests make it small).
    pub(super) stage_chunk: usize,
    pub(super) cpool: Arc<ComputePool<T>>,
    _mem: Vec<MemGuard>,
}

/// The part of one unit file a fetch reads: `start..end` of the file of unit `owner`, covering
/// the disk tensors `parts` (slot in the fetched unit, file offset).
pub(super) struct DiskSpan {
    pub(super) owner: usize,
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) parts: Vec<(usize, usize)>,
}

/// Bytes per read request of [`TieredWeights::fetch_staged`].
pub const STAGE_CHUNK: usize = 8 << 20;
/// Staging buffers of [`TieredWeights::fetch_staged`]: the reader fills one while the copies
/// empty another, and a third absorbs jitter.
pub const STAGE_BUFS: usize = 3;

/// Values per chunk when streaming a tensor to disk (8 MiB of fp16).
const STREAM_CHUNK: usize = 4 << 20;

impl<T: DeviceTensor> TieredWeights<T> {
    /// Puts every tensor of `plan` on its tier: uploads to the compute device, copies into host
    /// memory, or streams chunk by chunk into the unit's file (never the whole tensor in RAM).
    /// Compressed tensors are compressed here, on their way to the tier, and stay compressed on
    /// it: nothing decompresses them before the products that read them.
    pub fn build<D: Device<Tensor = T>>(
        dev: &D,
        src: &dyn TensorSource,
        plan: &WeightPlan,
        dir: Option<&OffloadDir>,
        stats: &Arc<Stats>,
    ) -> Result<TieredWeights<T>> {
        let mut files: Vec<Option<UnitFile>> = Vec::new();
        let mut offsets = vec![0usize; plan.tensors.len()];
        for (u, idx) in plan.units.iter().enumerate() {
            let mut len = 0;
            for &i in idx {
                let t = &plan.tensors[i];
                if t.tier == Tier::Disk && t.unit == u {
                    offsets[i] = len;
                    len += align_up(t.bytes());
                }
            }
            files.push(if len > 0 {
                let dir = dir
                    .context("weights placed on disk need an offload directory (--offload-dir)")?;
                let file = dir.file(&format!("weights-{u:04}.bin"))?;
                file.allocate(len as u64)?;
                Some(UnitFile { file })
            } else {
                None
            });
        }
        let mut mem = Vec::new();
        let mut stored = Vec::with_capacity(plan.tensors.len());
        let mut stage: Option<AlignedBuf> = None;
        for (i, t) in plan.tensors.iter().enumerate() {
            let home = match t.tier {
                Tier::Compute => {
                    let d = if t.compressed() {
                        let mut bytes = Vec::with_capacity(t.bytes());
                        stored_chunks(src, t, &mut |c| {
                            bytes.extend_from_slice(c);
                            Ok(())
                        })?;
                        dev.upload_compressed(&bytes, &t.shape, WEIGHT_GROUP_DIM)
                    } else {
                        let data = src.load_f16(&t.name, &t.shape)?;
                        dev.upload(HostSlice::F16(&data), &t.shape)
                    }
                    .with_context(|| format!("uploading {} to {}", t.name, dev.name()))?;
                    mem.push(MemGuard::new(stats, Tier::Compute, t.bytes()));
                    Home::Compute(Arc::new(d))
                }
                Tier::Host => {
                    mem.push(MemGuard::new(stats, Tier::Host, t.bytes()));
                    let mut buf = dev.alloc_host(t.bytes()).with_context(|| {
                        format!(
                            "allocating host memory for {} ({} bytes)",
                            t.name,
                            t.bytes()
                        )
                    })?;
                    // chunk by chunk: the tensor never exists twice in RAM
                    let mut at = 0;
                    stored_chunks(src, t, &mut |c| {
                        buf.bytes_mut()[at..at + c.len()].copy_from_slice(c);
                        at += c.len();
                        Ok(())
                    })?;
                    Home::Host(buf)
                }
                Tier::Disk => {
                    let f = files[t.unit]
                        .as_ref()
                        .expect("a file for every unit with disk tensors");
                    let buf = match &mut stage {
                        Some(b) => b,
                        None => stage.insert(AlignedBuf::new(STREAM_CHUNK * 2)?),
                    };
                    stream_to_disk(src, t, &f.file, offsets[i], buf)?;
                    mem.push(MemGuard::new(stats, Tier::Disk, align_up(t.bytes())));
                    Home::Disk { offset: offsets[i] }
                }
            };
            stored.push(Stored {
                plan: t.clone(),
                home,
            });
        }
        Ok(TieredWeights {
            stored,
            units: plan.units.clone(),
            files,
            stats: stats.clone(),
            pool: ReadBufPool(Mutex::new(Vec::new())),
            staging: Mutex::new(Vec::new()),
            stage_chunk: STAGE_CHUNK,
            cpool: Arc::new(ComputePool(Mutex::new(HashMap::new()))),
            _mem: mem,
        })
    }

    pub fn num_units(&self) -> usize {
        self.units.len()
    }

    /// Whether fetching `unit` moves nothing (every tensor already on the compute device).
    pub fn is_resident(&self, unit: usize) -> bool {
        self.units[unit]
            .iter()
            .all(|&i| matches!(self.stored[i].home, Home::Compute(_)))
    }

    /// Whether `unit` has tensors on disk.
    pub fn has_disk(&self, unit: usize) -> bool {
        self.units[unit]
            .iter()
            .any(|&i| matches!(self.stored[i].home, Home::Disk { .. }))
    }

    /// Per file holding disk tensors of `unit`, the span covering them: all of the unit's own
    /// file, or the embedding table alone when the output head reads the input's file.
    pub(super) fn disk_spans(&self, unit: usize) -> Vec<DiskSpan> {
        let mut spans: Vec<DiskSpan> = Vec::new();
        for (slot, &i) in self.units[unit].iter().enumerate() {
            let s = &self.stored[i];
            if let Home::Disk { offset } = s.home {
                let end = offset + align_up(s.plan.bytes());
                match spans.iter_mut().find(|sp| sp.owner == s.plan.unit) {
                    Some(sp) => {
                        sp.start = sp.start.min(offset);
                        sp.end = sp.end.max(end);
                        sp.parts.push((slot, offset));
                    }
                    None => spans.push(DiskSpan {
                        owner: s.plan.unit,
                        start: offset,
                        end,
                        parts: vec![(slot, offset)],
                    }),
                }
            }
        }
        spans
    }
}

impl<T> Stored<T> {
    /// Checks bytes `at .. at + chunk.len()` of this tensor, just read from `file`: a compressed
    /// tensor's scales and mins must be what the quantizer wrote (a corrupted offload file
    /// would otherwise be decoded into garbage weights without a word). The packed codes take
    /// every value, so damage to them goes unseen.
    pub(super) fn check_read(&self, at: usize, chunk: &[u8], file: &std::path::Path) -> Result<()> {
        if !self.plan.compressed() {
            return Ok(());
        }
        let l = crate::compress::Q4Layout::new(&self.plan.shape, WEIGHT_GROUP_DIM);
        let (lo, hi) = (l.data_bytes(), l.bytes());
        let (a, b) = (at.max(lo), (at + chunk.len()).min(hi));
        if a >= b {
            return Ok(());
        }
        // reads start at aligned offsets and the data block's length is even: no fp16 value is
        // split between two chunks
        let first = (a - lo) / 2;
        if let Some(bad) =
            crate::compress::layout::check_scales(&chunk[a - at..b - at], first, l.inner)
        {
            let what = if (bad / l.inner).is_multiple_of(2) {
                "scale"
            } else {
                "min"
            };
            anyhow::bail!(
                "offload file {} is corrupt: {} (4-bit, shape {:?}) has an impossible {what} in \
                 group {}, column {}: the offload directory was changed or damaged while this \
                 run used it; rerun on a healthy disk (--offload-dir; every run writes its files \
                 afresh)",
                file.display(),
                self.plan.name,
                self.plan.shape,
                bad / l.inner / 2,
                bad % l.inner
            );
        }
        Ok(())
    }
}

/// Tensor `t`'s bytes as its tiers store them (fp16, or compressed here, once, as the
/// offloader builds the tiers), chunk by chunk.
fn stored_chunks(
    src: &dyn TensorSource,
    t: &TensorPlan,
    f: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    for_each_stored_chunk(src, &t.name, &t.shape, t.compressed(), STREAM_CHUNK, f)
        .with_context(|| format!("reading {} from {}", t.name, src.describe()))
}

/// Streams tensor `t` from `src` into `file` at `offset` through the aligned buffer `buf`.
fn stream_to_disk(
    src: &dyn TensorSource,
    t: &TensorPlan,
    file: &DirectFile,
    offset: usize,
    buf: &mut AlignedBuf,
) -> Result<()> {
    let cap = buf.len();
    let mut filled = 0usize; // bytes in buf
    let mut written = 0usize; // bytes of this tensor already on disk
    let mut flush = |buf: &mut AlignedBuf, filled: &mut usize, last: bool| -> Result<()> {
        let bytes = *filled;
        let len = if last { align_up(bytes) } else { bytes };
        if len == 0 {
            return Ok(());
        }
        if last {
            buf.bytes_mut()[bytes..len].fill(0);
        }
        file.write_at(buf, len, (offset + written) as u64)
            .with_context(|| format!("writing {} to the offload directory", t.name))?;
        written += len;
        *filled = 0;
        Ok(())
    };
    stored_chunks(src, t, &mut |chunk: &[u8]| {
        let mut c = chunk;
        while !c.is_empty() {
            let take = c.len().min(cap - filled);
            buf.bytes_mut()[filled..filled + take].copy_from_slice(&c[..take]);
            filled += take;
            c = &c[take..];
            // full buffers are whole multiples of ALIGN: write them as they fill
            if filled == cap {
                flush(buf, &mut filled, false)?;
            }
        }
        Ok(())
    })?;
    flush(buf, &mut filled, true)?;
    debug_assert_eq!(written % ALIGN, 0);
    Ok(())
}
