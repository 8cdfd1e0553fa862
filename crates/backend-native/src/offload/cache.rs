//! The KV cache on tiers: each (layer, GPU batch) splits its sequences into up to three runs of
//! whole sequences, on the compute device, in host memory and on disk.
//!
//! Layouts: compute and host segments are the device layout `[seqs, heads, max_len, head_dim]`
//! (host segments are [`CpuTensor`]s, so attention on the host runs on them directly). The disk
//! segment is position-major: row `p` holds K then V of position `p` for all its sequences,
//! padded to the O_DIRECT alignment, so a step appends one aligned row and a load reads one
//! sequential prefix.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use half::f16;

use super::direct::{align_up, AlignedBuf, DirectFile, OffloadDir};
use super::placement::Tier;
use super::stats::{Link, MemGuard, Stats};
use crate::device::cpu::{CpuDevice, CpuTensor};
use crate::device::{typed_slice, DType, Device, DeviceTensor, Fence};

/// Dimensions shared by every segment.
#[derive(Debug, Clone, Copy)]
pub struct KvDims {
    pub heads: usize,
    pub head_dim: usize,
    pub max_len: usize,
    pub dtype: DType,
}

impl KvDims {
    /// Bytes of one (sequence, head, position) row: head_dim values, or their 4-bit form.
    pub fn row_bytes(&self) -> usize {
        self.dtype.bytes(&[1, 1, 1, self.head_dim])
    }
    /// Bytes of K and V of `seqs` sequences over `positions` positions.
    pub fn bytes(&self, seqs: usize, positions: usize) -> usize {
        2 * seqs * self.heads * positions * self.row_bytes()
    }
    /// Padded bytes of one row of a disk segment of `seqs` sequences.
    pub fn disk_row_bytes(&self, seqs: usize) -> usize {
        align_up(self.bytes(seqs, 1))
    }
}

/// A run of sequences of one GPU batch on one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub tier: Tier,
    /// First sequence (index within the GPU batch).
    pub start: usize,
    pub len: usize,
}

/// The disk segment's file.
pub struct DiskKv {
    file: DirectFile,
    seqs: usize,
    row_bytes: usize,
}

/// One layer's cache of one GPU batch.
pub struct BatchCache<T> {
    pub segments: Vec<Segment>,
    pub dims: KvDims,
    pub compute: Mutex<Option<(T, T)>>,
    pub host: Mutex<Option<(CpuTensor, CpuTensor)>>,
    pub disk: Option<DiskKv>,
    /// Transfer-memory staging of the host segment (0) and of the disk segment read back (1),
    /// made on first use by devices with asynchronous uploads ([`segment_to_compute`]).
    pub staging: [Mutex<Option<Staging>>; 2],
    _mem: Vec<MemGuard>,
}

/// A segment's K and V in the device's transfer memory (pinned on CUDA), reused every step,
/// and the copies out of it still in flight.
pub struct Staging {
    k: AlignedBuf,
    v: AlignedBuf,
    in_flight: Vec<Fence>,
    _mem: MemGuard,
}

/// Bytes the disk segments of a whole cache need: for the offload directory's free-space check.
pub fn disk_bytes(dims: KvDims, layers: usize, disk_seqs_per_batch: &[usize]) -> u64 {
    disk_seqs_per_batch
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| (dims.disk_row_bytes(n) * dims.max_len) as u64)
        .sum::<u64>()
        * layers as u64
}

impl<T: DeviceTensor> BatchCache<T> {
    /// Allocates the segments: `counts` = sequences on (compute, host, disk).
    pub fn new<D: Device<Tensor = T>>(
        dev: &D,
        host: &CpuDevice,
        dims: KvDims,
        counts: (usize, usize, usize),
        dir: Option<&OffloadDir>,
        file_name: &str,
        stats: &Arc<Stats>,
    ) -> Result<BatchCache<T>> {
        let (c, h, d) = counts;
        let mut segments = Vec::new();
        let mut start = 0;
        for (tier, len) in [(Tier::Compute, c), (Tier::Host, h), (Tier::Disk, d)] {
            if len > 0 {
                segments.push(Segment { tier, start, len });
                start += len;
            }
        }
        let mut mem = Vec::new();
        let compute = if c > 0 {
            mem.push(MemGuard::new(
                stats,
                Tier::Compute,
                dims.bytes(c, dims.max_len),
            ));
            Some((alloc_cache(dev, dims, c)?, alloc_cache(dev, dims, c)?))
        } else {
            None
        };
        let host_seg = if h > 0 {
            mem.push(MemGuard::new(
                stats,
                Tier::Host,
                dims.bytes(h, dims.max_len),
            ));
            Some((alloc_cache(host, dims, h)?, alloc_cache(host, dims, h)?))
        } else {
            None
        };
        let disk = if d > 0 {
            let dir = dir
                .context("a KV cache placed on disk needs an offload directory (--offload-dir)")?;
            let file = dir.file(file_name)?;
            let row_bytes = dims.disk_row_bytes(d);
            file.allocate((row_bytes * dims.max_len) as u64)?;
            mem.push(MemGuard::new(stats, Tier::Disk, row_bytes * dims.max_len));
            Some(DiskKv {
                file,
                seqs: d,
                row_bytes,
            })
        } else {
            None
        };
        Ok(BatchCache {
            segments,
            dims,
            compute: Mutex::new(compute),
            host: Mutex::new(host_seg),
            disk,
            staging: [Mutex::new(None), Mutex::new(None)],
            _mem: mem,
        })
    }

    /// Whether the whole batch's cache is on the compute device.
    pub fn all_compute(&self) -> bool {
        self.segments.len() == 1 && self.segments[0].tier == Tier::Compute
    }

    pub fn has_tier(&self, tier: Tier) -> bool {
        self.segments.iter().any(|s| s.tier == tier)
    }
}

impl DiskKv {
    /// Positions `0 .. positions` read back into host tensors of the device layout (zeros after).
    pub fn load(
        &self,
        dims: KvDims,
        positions: usize,
        stats: &Stats,
    ) -> Result<(CpuTensor, CpuTensor)> {
        let (h, l, rb) = (dims.heads, dims.max_len, dims.row_bytes());
        let shape = [self.seqs, h, l, dims.head_dim];
        let host = CpuDevice::default();
        let mut k = host.zeros(dims.dtype, &shape)?;
        let mut v = host.zeros(dims.dtype, &shape)?;
        if positions == 0 {
            return Ok((k, v));
        }
        let len = positions * self.row_bytes;
        let mut buf = AlignedBuf::new(len)?;
        let t0 = std::time::Instant::now();
        self.file
            .read_at(&mut buf, len, 0)
            .context("reading the KV cache from disk")?;
        stats.add_disk_busy(t0.elapsed().as_secs_f64());
        stats.moved(Link::DiskRead, len);
        // row p: K [seqs, heads] rows, then V; scatter to [seqs, heads, max_len] rows
        let part = self.seqs * h * rb;
        let (kb, vb) = (k.raw_bytes_mut(), v.raw_bytes_mut());
        for p in 0..positions {
            let row = &buf.bytes()[p * self.row_bytes..p * self.row_bytes + 2 * part];
            for sh in 0..self.seqs * h {
                let at = (sh * l + p) * rb;
                kb[at..at + rb].copy_from_slice(&row[sh * rb..(sh + 1) * rb]);
                vb[at..at + rb].copy_from_slice(&row[part + sh * rb..part + (sh + 1) * rb]);
            }
        }
        Ok((k, v))
    }

    /// Writes positions `past .. past + new` from `k`, `v` (`[seqs * new, heads * head_dim]`
    /// rows, f32, sequence-major as the model produces them), stored in the cache dtype (rounded
    /// to fp16, or compressed).
    pub fn store(
        &self,
        dims: KvDims,
        k: &[f32],
        v: &[f32],
        past: usize,
        new: usize,
        stats: &Stats,
    ) -> Result<()> {
        let (h, d, rb) = (dims.heads, dims.head_dim, dims.row_bytes());
        let hid = h * d;
        let part = self.seqs * h * rb;
        let len = new * self.row_bytes;
        let mut buf = AlignedBuf::new(len)?;
        for i in 0..new {
            let row = &mut buf.bytes_mut()[i * self.row_bytes..i * self.row_bytes + 2 * part];
            for b in 0..self.seqs {
                for head in 0..h {
                    let src = (b * new + i) * hid + head * d;
                    let at = (b * h + head) * rb;
                    encode_row(dims.dtype, &k[src..src + d], &mut row[at..at + rb])?;
                    encode_row(
                        dims.dtype,
                        &v[src..src + d],
                        &mut row[part + at..part + at + rb],
                    )?;
                }
            }
        }
        let t0 = std::time::Instant::now();
        self.file
            .write_at(&buf, len, (past * self.row_bytes) as u64)
            .context("writing the KV cache to disk")?;
        stats.add_disk_busy(t0.elapsed().as_secs_f64());
        stats.moved(Link::DiskWrite, len);
        Ok(())
    }
}

/// One cache row of f32 values in the cache's stored form.
fn encode_row(dtype: DType, src: &[f32], out: &mut [u8]) -> Result<()> {
    match dtype {
        DType::F16 => {
            for (o, x) in out.chunks_exact_mut(2).zip(src) {
                o.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
            }
        }
        DType::F32 => {
            for (o, x) in out.chunks_exact_mut(4).zip(src) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        DType::Q4 { .. } => crate::compress::compress_row(src, out),
        DType::U32 => bail!("a u32 KV cache"),
    }
    Ok(())
}

/// A compute-device copy of host cache tensors (`[seqs, heads, max_len, d]`), positions
/// `0 .. positions` copied, the rest zeros.
pub fn host_to_compute<D: Device>(
    dev: &D,
    host: &CpuTensor,
    dims: KvDims,
    positions: usize,
    stats: &Stats,
) -> Result<D::Tensor> {
    let (seqs, h, l) = match host.shape() {
        [a, b, c, _] => (*a, *b, *c),
        s => bail!("host cache of shape {s:?}"),
    };
    let mut t = alloc_cache(dev, dims, seqs)?;
    if positions > 0 {
        let rb = dims.row_bytes();
        let unit = dims.dtype.size();
        let bytes = host.raw_bytes();
        for sh in 0..seqs * h {
            let r = sh * l * rb..(sh * l + positions) * rb;
            dev.write(
                &mut t,
                sh * l * rb / unit,
                typed_slice(dims.dtype, &bytes[r])?,
            )?;
        }
        // K or V: half of `bytes`
        stats.moved(Link::HostToCompute, dims.bytes(seqs, positions) / 2);
    }
    Ok(t)
}

/// One layer's K or V of `seqs` sequences on `dev` in the cache's dtype: the device's own
/// cache, or a compressed one.
pub fn alloc_cache<D: Device>(dev: &D, dims: KvDims, seqs: usize) -> Result<D::Tensor> {
    if dims.dtype.is_compressed() {
        dev.zeros(dims.dtype, &[seqs, dims.heads, dims.max_len, dims.head_dim])
            .context("allocating the compressed KV cache")
    } else {
        dev.alloc_kv(seqs, dims.heads, dims.max_len, dims.head_dim)
    }
}

/// A segment's K and V on the compute device, and the uploads into them still in flight.
pub type Staged<T> = ((T, T), Vec<Fence>);

/// Compute-device copies of a segment's host K and V (`[seqs, heads, max_len, d]`, positions
/// `0 .. positions` valid), and the copies the compute must wait for ([`Device::wait_fence`]).
///
/// Devices with asynchronous uploads get the segment through `staging`: the valid rows are
/// copied into transfer memory (pinned on CUDA) and go up as one copy per tensor on the upload
/// stream, which overlaps compute; the whole tensor moves (the rows past `positions` are never
/// read). Other devices get [`host_to_compute`]'s row-by-row writes of the valid positions.
pub fn segment_to_compute<D: Device>(
    dev: &D,
    (hk, hv): (&CpuTensor, &CpuTensor),
    dims: KvDims,
    positions: usize,
    stats: &Arc<Stats>,
    staging: &Mutex<Option<Staging>>,
) -> Result<Staged<D::Tensor>> {
    if !dev.async_uploads() || positions == 0 {
        let k = host_to_compute(dev, hk, dims, positions, stats)?;
        let v = host_to_compute(dev, hv, dims, positions, stats)?;
        return Ok(((k, v), Vec::new()));
    }
    let (seqs, h, l) = match hk.shape() {
        [a, b, c, _] => (*a, *b, *c),
        s => bail!("host cache of shape {s:?}"),
    };
    let rb = dims.row_bytes();
    let total = seqs * h * l * rb;
    let unit = dims.dtype.size();
    let mut guard = staging.lock().expect("staging lock");
    let st = match &mut *guard {
        Some(st) => {
            // the previous step's copies out of these buffers must be done before refilling
            for f in st.in_flight.drain(..) {
                f.wait_host()
                    .context("waiting for the previous KV upload")?;
            }
            st
        }
        None => guard.insert(Staging {
            k: dev.alloc_host(total)?,
            v: dev.alloc_host(total)?,
            in_flight: Vec::new(),
            _mem: MemGuard::new(stats, Tier::Host, 2 * align_up(total)),
        }),
    };
    let mut out = Vec::with_capacity(2);
    let mut fences = Vec::new();
    for (host, buf) in [(hk, &mut st.k), (hv, &mut st.v)] {
        let src = host.raw_bytes();
        for sh in 0..seqs * h {
            let r = sh * l * rb..(sh * l + positions) * rb;
            buf.bytes_mut()[r.clone()].copy_from_slice(&src[r]);
        }
        let mut t = alloc_cache(dev, dims, seqs)?;
        if let Some(f) = dev.upload_async(&mut t, 0, buf, 0, total / unit)? {
            fences.push(f);
        }
        stats.moved(Link::HostToCompute, total);
        out.push(t);
    }
    st.in_flight = fences.clone();
    let v = out.pop().context("staged V")?;
    let k = out.pop().context("staged K")?;
    Ok(((k, v), fences))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::direct::OffloadDir;

    /// Rows written to the disk segment come back in the device layout, rounded as the device
    /// rounds them, and the host copy to the compute device carries exactly the loaded positions.
    #[test]
    fn disk_segment_round_trip() {
        let dir = OffloadDir::open(&std::env::temp_dir(), 0).unwrap();
        let stats = Stats::new();
        for dtype in [DType::F16, DType::F32] {
            let dims = KvDims {
                heads: 3,
                head_dim: 5,
                max_len: 7,
                dtype,
            };
            let dev = CpuDevice::new(crate::device::cpu::CpuOptions {
                kv_dtype: dtype,
                ..Default::default()
            });
            let c = BatchCache::<CpuTensor>::new(
                &dev,
                &dev,
                dims,
                (0, 0, 2),
                Some(&dir),
                &format!("kv-{dtype:?}.bin"),
                &stats,
            )
            .unwrap();
            let disk = c.disk.as_ref().unwrap();
            let hid = 15;
            let val = |b: usize, p: usize, j: usize, v: bool| {
                (b * 100 + p * 10 + j) as f32 * 0.37 + if v { 0.5 } else { 0.0 }
            };
            // prefill of 4 positions, then one decode position
            let rows = |past: usize, new: usize, v: bool| -> Vec<f32> {
                let mut o = Vec::new();
                for b in 0..2 {
                    for i in 0..new {
                        o.extend((0..hid).map(|j| val(b, past + i, j, v)));
                    }
                }
                o
            };
            disk.store(dims, &rows(0, 4, false), &rows(0, 4, true), 0, 4, &stats)
                .unwrap();
            disk.store(dims, &rows(4, 1, false), &rows(4, 1, true), 4, 1, &stats)
                .unwrap();
            let (k, v) = disk.load(dims, 5, &stats).unwrap();
            let (k, v) = (dev.download_f32(&k).unwrap(), dev.download_f32(&v).unwrap());
            let round = |x: f32| match dtype {
                DType::F16 => f16::from_f32(x).to_f32(),
                _ => x,
            };
            for b in 0..2 {
                for h in 0..3 {
                    for p in 0..7 {
                        for d in 0..5 {
                            let at = ((b * 3 + h) * 7 + p) * 5 + d;
                            let j = h * 5 + d;
                            let (wk, wv) = if p < 5 {
                                (round(val(b, p, j, false)), round(val(b, p, j, true)))
                            } else {
                                (0.0, 0.0)
                            };
                            assert_eq!((k[at], v[at]), (wk, wv), "{dtype:?} b{b} h{h} p{p} d{d}");
                        }
                    }
                }
            }
        }
        assert!(stats.bytes(Link::DiskWrite) > 0 && stats.bytes(Link::DiskRead) > 0);
    }
}
