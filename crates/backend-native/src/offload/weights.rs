//! Weights on tiers: every tensor lives whole on the compute device, in host memory or in a file
//! of the offload directory, and the schedule fetches them to the compute device one unit (the
//! input embedding, a decoder layer, the output head) at a time.
//!
//! A fetch has two stages so the disk never waits for a copy: [`TieredWeights::read_disk`] reads
//! the unit's disk tensors with one sequential O_DIRECT read into an aligned buffer (the disk
//! thread), [`TieredWeights::materialize`] copies host and disk tensors to the compute device
//! (the transfer thread). Host-tier tensors and disk read buffers live in the device's transfer
//! memory ([`Device::alloc_host`]: pinned on CUDA), so on CUDA stage two only queues copies on the
//! upload stream ([`Device::upload_async`]) and the compute thread orders its kernels behind
//! them with [`Fetched::ready`]: no host synchronisation anywhere on the weight path.
//!
//! Where uploads are plain copies (the CPU device) a disk fetch is one job instead,
//! [`TieredWeights::fetch_staged`]: 8 MiB reads into a ring of three hot staging buffers, each
//! copied into its tensors as it arrives, which reads faster than DMA into unit-sized buffers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bench_core::{ModelConfig, Policy};
use half::f16;

use super::direct::{align_up, read_span_staged, AlignedBuf, DirectFile, OffloadDir, ALIGN};
use super::placement::{place_weights, Tier};
use super::stats::{Link, MemGuard, Stats};
use crate::device::{DType, Device, DeviceTensor, Fence, HostSlice};
use crate::model::weights::{
    layer_tensor_names, AttnWeights, LayerWeights, MlpWeights, ATTN_TENSORS,
};
use crate::model::TensorSource;

/// One tensor's place in the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub tier: Tier,
    /// The unit whose disk file holds it (its first user).
    pub unit: usize,
}

impl TensorPlan {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

/// Where every weight tensor goes, and which tensors each schedule unit uses.
#[derive(Debug, Clone)]
pub struct WeightPlan {
    pub tensors: Vec<TensorPlan>,
    /// Unit 0: input embedding; then each decoder layer (1..=L), or with `sep_layer` each
    /// layer's attention and MLP halves (1..=2L); last: the output head. Tensor indices in the
    /// order [`Fetched`]'s accessors expect.
    pub units: Vec<Vec<usize>>,
    /// Whether layers are split into two units.
    pub sep_layer: bool,
}

impl WeightPlan {
    /// FlexLLMGen's placement: the mid-point rule over each placement group (the input
    /// embedding; each layer, or each of its attention and MLP halves with `sep_layer`; the
    /// output head). A tied lm_head is the input's `embed_tokens` and lives where it does.
    pub fn new(cfg: &ModelConfig, policy: &Policy, has_lm_head: bool) -> WeightPlan {
        let (h, e, v) = (cfg.hidden_size, cfg.word_embed_proj_dim, cfg.vocab_size);
        let p = "model.decoder";
        let mut tensors: Vec<TensorPlan> = Vec::new();
        let mut units = Vec::new();
        let group =
            |list: Vec<(String, Vec<usize>)>, unit: usize, tensors: &mut Vec<TensorPlan>| {
                let sizes: Vec<usize> = list
                    .iter()
                    .map(|(_, s)| s.iter().product::<usize>() * 2)
                    .collect();
                let tiers = place_weights(&sizes, policy);
                let mut idx = Vec::new();
                for ((name, shape), tier) in list.into_iter().zip(tiers) {
                    idx.push(tensors.len());
                    tensors.push(TensorPlan {
                        name,
                        shape,
                        tier,
                        unit,
                    });
                }
                idx
            };
        let mut input = vec![
            (format!("{p}.embed_tokens.weight"), vec![v, e]),
            (
                format!("{p}.embed_positions.weight"),
                vec![cfg.max_position_embeddings + 2, h],
            ),
        ];
        if e != h {
            input.push((format!("{p}.project_in.weight"), vec![h, e]));
        }
        units.push(group(input, 0, &mut tensors));
        for i in 0..cfg.num_hidden_layers {
            let names = layer_tensor_names(cfg, i);
            if policy.sep_layer {
                // the attention and MLP halves are units of their own (FlexLLMGen's default)
                let mlp = names[ATTN_TENSORS..].to_vec();
                let a = group(names[..ATTN_TENSORS].to_vec(), units.len(), &mut tensors);
                units.push(a);
                let m = group(mlp, units.len(), &mut tensors);
                units.push(m);
            } else {
                let u = group(names, units.len(), &mut tensors);
                units.push(u);
            }
        }
        let out_unit = units.len();
        let mut out = Vec::new();
        if cfg.do_layer_norm_before {
            out.push((format!("{p}.final_layer_norm.weight"), vec![h]));
            out.push((format!("{p}.final_layer_norm.bias"), vec![h]));
        }
        if e != h {
            out.push((format!("{p}.project_out.weight"), vec![e, h]));
        }
        if has_lm_head {
            out.push(("lm_head.weight".into(), vec![v, e]));
        }
        let mut u = group(out, out_unit, &mut tensors);
        if !has_lm_head {
            u.push(units[0][0]);
        }
        units.push(u);
        WeightPlan {
            tensors,
            units,
            sep_layer: policy.sep_layer,
        }
    }

    /// Bytes of the disk files (each tensor padded to the O_DIRECT alignment).
    pub fn disk_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .filter(|t| t.tier == Tier::Disk)
            .map(|t| align_up(t.bytes()) as u64)
            .sum()
    }

    /// Bytes of the tensors placed on `tier`.
    pub fn bytes_on(&self, tier: Tier) -> u64 {
        self.tensors
            .iter()
            .filter(|t| t.tier == tier)
            .map(|t| t.bytes() as u64)
            .sum()
    }

    /// The largest number of bytes a unit moves to the compute device in one fetch.
    pub fn max_fetch_bytes(&self) -> u64 {
        self.units
            .iter()
            .map(|u| {
                u.iter()
                    .map(|&i| &self.tensors[i])
                    .filter(|t| t.tier != Tier::Compute)
                    .map(|t| t.bytes() as u64)
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0)
    }
}

/// A tensor's home.
enum Home<T> {
    Compute(Arc<T>),
    /// Host memory from [`Device::alloc_host`] (pinned on CUDA: the transfer runs at the
    /// link's full rate and overlaps compute).
    Host(AlignedBuf),
    /// `bytes` at `offset` of its unit's file.
    Disk {
        offset: usize,
    },
}

struct Stored<T> {
    plan: TensorPlan,
    home: Home<T>,
}

/// A unit's disk file: its disk tensors back to back, each at an aligned offset.
struct UnitFile {
    file: DirectFile,
}

/// All weights of a model, on their tiers.
pub struct TieredWeights<T> {
    stored: Vec<Stored<T>>,
    units: Vec<Vec<usize>>,
    files: Vec<Option<UnitFile>>,
    stats: Arc<Stats>,
    /// Read buffers returned by finished fetches: reused so the disk thread never waits for
    /// fresh pages to be zeroed between reads.
    pool: Mutex<Vec<PooledBuf>>,
    /// The staging ring of [`TieredWeights::fetch_staged`], kept between fetches (hot).
    staging: Mutex<Vec<AlignedBuf>>,
    /// Bytes per staged read request: [`STAGE_CHUNK`] (tests make it small).
    stage_chunk: usize,
    cpool: Arc<ComputePool<T>>,
    _mem: Vec<MemGuard>,
}

/// An aligned buffer with its host-memory accounting, and the copy out of it that must finish
/// before it is read into again.
pub struct PooledBuf {
    buf: AlignedBuf,
    in_flight: Option<Fence>,
    _mem: MemGuard,
}

/// A unit's disk tensors read into host memory (stage one of a fetch).
pub struct DiskRead {
    /// (owning unit, buffer holding that unit's file from offset 0)
    /// (owning unit, file offset of the buffer's first byte, buffer)
    bufs: Vec<(usize, usize, PooledBuf)>,
}

/// A unit's tensors on the compute device (stage two of a fetch), in the unit's order.
pub struct Fetched<T> {
    pub tensors: Vec<Arc<T>>,
    /// Copies still in flight into `tensors` ([`Fetched::ready`] orders compute behind them).
    fences: Vec<Fence>,
    /// Which tensors are copies from the compute pool (returned to it on drop) and their
    /// memory accounting.
    copies: Vec<Option<(Vec<usize>, MemGuard)>>,
    pool: Arc<ComputePool<T>>,
}

/// Compute-device buffers of fetched tensors, by shape, kept for the next fetch: refilling a
/// buffer ([`Device::write`]) costs one copy, a fresh one an allocation, zeroing and a copy.
pub struct ComputePool<T>(Mutex<HashMap<Vec<usize>, Vec<Pooled<T>>>>);

/// A pooled compute buffer and its memory accounting.
type Pooled<T> = (T, MemGuard);

impl<T> Drop for Fetched<T> {
    fn drop(&mut self) {
        // a unit dropped unused (a prefetch past an early stop, an error) may still be the
        // target of copies: they must end before its buffers are reused or freed
        for f in self.fences.drain(..) {
            let _ = f.wait_host();
        }
        let Ok(mut pool) = self.pool.0.lock() else {
            return;
        };
        for (t, c) in self.tensors.drain(..).zip(self.copies.drain(..)) {
            if let Some((shape, g)) = c {
                // still shared (a caller kept a clone): let it go instead
                if let Ok(t) = Arc::try_unwrap(t) {
                    pool.entry(shape).or_default().push((t, g));
                }
            }
        }
    }
}

/// The part of one unit file a fetch reads: `start..end` of the file of unit `owner`, covering
/// the disk tensors `parts` (slot in the fetched unit, file offset).
struct DiskSpan {
    owner: usize,
    start: usize,
    end: usize,
    parts: Vec<(usize, usize)>,
}

/// A tensor of a staged fetch: resident already, or a compute buffer being filled.
enum StagedSlot<T> {
    Resident(Arc<T>),
    Copy(T, MemGuard),
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
                    let data = src.load_f16(&t.name, &t.shape)?;
                    let d = dev
                        .upload(HostSlice::F16(&data), &t.shape)
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
                    src.for_each_chunk(&t.name, &t.shape, STREAM_CHUNK, &mut |c: &[f16]| {
                        buf.f16s_mut(at * 2, c.len()).copy_from_slice(c);
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
            pool: Mutex::new(Vec::new()),
            staging: Mutex::new(Vec::new()),
            stage_chunk: STAGE_CHUNK,
            cpool: Arc::new(ComputePool(Mutex::new(HashMap::new()))),
            _mem: mem,
        })
    }

    /// A buffer of at least `len` bytes: the smallest pooled one that fits (once the copy out of
    /// it is done), or a new one from the device's transfer memory.
    fn take_buf<D: Device<Tensor = T>>(&self, dev: &D, len: usize) -> Result<PooledBuf> {
        let mut pool = self.pool.lock().expect("buffer pool lock");
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
                let mem = MemGuard::new(&self.stats, Tier::Host, buf.len());
                Ok(PooledBuf {
                    buf,
                    in_flight: None,
                    _mem: mem,
                })
            }
        }
    }

    fn give_back(&self, read: DiskRead) {
        self.pool
            .lock()
            .expect("buffer pool lock")
            .extend(read.bufs.into_iter().map(|(_, _, b)| b));
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
    fn disk_spans(&self, unit: usize) -> Vec<DiskSpan> {
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
            let mut b = self.take_buf(dev, len)?;
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
                _ => self.compute_buf(dev, &s.plan.shape)?,
            };
            let n = s.plan.bytes() / 2;
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
                    let f = dev.upload_async(&mut t, 0, &b.buf, *offset - start, n);
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
            copies.push(Some((s.plan.shape.clone(), g)));
        }
        if let Some(d) = disk {
            self.give_back(d);
        }
        Ok(Fetched {
            tensors,
            fences,
            copies,
            pool: self.cpool.clone(),
        })
    }

    /// A compute buffer for an f16 tensor of `shape`: a pooled one or a new one.
    fn compute_buf<D: Device<Tensor = T>>(
        &self,
        dev: &D,
        shape: &[usize],
    ) -> Result<(T, MemGuard)> {
        if let Some(b) = self
            .cpool
            .0
            .lock()
            .expect("compute pool lock")
            .get_mut(shape)
            .and_then(|v| v.pop())
        {
            return Ok(b);
        }
        let bytes = shape.iter().product::<usize>() * 2;
        let t = dev.zeros(DType::F16, shape)?;
        Ok((t, MemGuard::new(&self.stats, Tier::Compute, bytes)))
    }

    /// Whether `unit` is fetched by [`TieredWeights::fetch_staged`]: it has disk tensors and
    /// the device's uploads are plain copies (the CPU device). On CUDA the disk reads land in
    /// pinned buffers the copy engine uploads from, so they keep the two stages.
    pub fn stages_disk_reads<D: Device<Tensor = T>>(&self, dev: &D, unit: usize) -> bool {
        self.has_disk(unit) && !dev.async_uploads()
    }

    /// A whole fetch for devices whose uploads are copies: the unit's disk spans are read one
    /// [`STAGE_CHUNK`] request at a time into a ring of [`STAGE_BUFS`] staging buffers by a
    /// reader thread, while this thread copies each arrived chunk into its tensors.
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
                    let (mut t, g) = self.compute_buf(dev, &s.plan.shape)?;
                    dev.write(&mut t, 0, HostSlice::F16(buf.f16s(0, s.plan.bytes() / 2)))
                        .with_context(|| format!("copying {} to {}", s.plan.name, dev.name()))?;
                    self.stats.add_xfer_busy(t0.elapsed().as_secs_f64());
                    self.stats.moved(Link::HostToCompute, s.plan.bytes());
                    StagedSlot::Copy(t, g)
                }
                Home::Disk { .. } => {
                    let (t, g) = self.compute_buf(dev, &s.plan.shape)?;
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
                        let vals = chunk.f16s(lo - chunk_at, (hi - lo) / 2);
                        dev.write(t, (lo - off) / 2, HostSlice::F16(vals))
                            .with_context(|| {
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
                    copies.push(Some((self.stored[i].plan.shape.clone(), g)));
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

/// Streams tensor `t` from `src` into `file` at `offset` through the aligned buffer `buf`.
fn stream_to_disk(
    src: &dyn TensorSource,
    t: &TensorPlan,
    file: &DirectFile,
    offset: usize,
    buf: &mut AlignedBuf,
) -> Result<()> {
    let cap = buf.len() / 2;
    let mut filled = 0usize; // values in buf
    let mut written = 0usize; // bytes of this tensor already on disk
    let mut flush = |buf: &mut AlignedBuf, filled: &mut usize, last: bool| -> Result<()> {
        let bytes = *filled * 2;
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
    src.for_each_chunk(&t.name, &t.shape, STREAM_CHUNK, &mut |chunk: &[f16]| {
        let mut c = chunk;
        while !c.is_empty() {
            let take = c.len().min(cap - filled);
            buf.f16s_mut(filled * 2, take).copy_from_slice(&c[..take]);
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

/// Typed views of a fetched unit.
impl<T> Fetched<T> {
    /// Orders the compute queued from now on behind the copies into these tensors (call it on
    /// the compute thread before the first op that reads them).
    pub fn ready<D: Device<Tensor = T>>(&mut self, dev: &D) -> Result<()> {
        for f in self.fences.drain(..) {
            dev.wait_fence(&f)?;
        }
        Ok(())
    }

    /// A whole decoder layer's weights (a layer unit without `sep_layer`).
    pub fn layer(&self) -> LayerWeights<Arc<T>> {
        LayerWeights::from_tensors(&mut self.tensors.iter().cloned())
            .expect("a layer unit holds 16 tensors")
    }

    /// An attention half's weights (an attention unit with `sep_layer`).
    pub fn attn(&self) -> AttnWeights<Arc<T>> {
        AttnWeights::from_tensors(&mut self.tensors.iter().cloned())
            .expect("an attention unit holds its 10 tensors")
    }

    /// An MLP half's weights (an MLP unit with `sep_layer`).
    pub fn mlp(&self) -> MlpWeights<Arc<T>> {
        MlpWeights::from_tensors(&mut self.tensors.iter().cloned())
            .expect("an MLP unit holds its 6 tensors")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cpu::{CpuDevice, CpuOptions};
    use crate::model::DummySource;

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

    #[test]
    fn plan_places_groups_and_ties_the_head() {
        let cfg = bench_core::model::lookup("opt-tiny").unwrap();
        let mut whole = Policy::new([0, 0, 100, 0, 100, 0]);
        whole.sep_layer = false;
        let all_disk = WeightPlan::new(&cfg, &whole, false);
        assert!(all_disk.tensors.iter().all(|t| t.tier == Tier::Disk));
        assert_eq!(all_disk.units.len(), cfg.num_hidden_layers + 2);
        assert!(all_disk.units[1..=cfg.num_hidden_layers]
            .iter()
            .all(|u| u.len() == 16));
        // sep_layer (the default): 2L + 2 units, the halves alternating
        let halves = WeightPlan::new(&cfg, &Policy::new([0, 0, 100, 0, 100, 0]), false);
        assert_eq!(halves.units.len(), 2 * cfg.num_hidden_layers + 2);
        for l in 0..cfg.num_hidden_layers {
            assert_eq!(halves.units[1 + 2 * l].len(), ATTN_TENSORS);
            assert_eq!(halves.units[2 + 2 * l].len(), 16 - ATTN_TENSORS);
            assert!(halves.tensors[halves.units[2 + 2 * l][0]]
                .name
                .ends_with("fc1.weight"));
        }
        // the tied head is the input's embedding table
        assert_eq!(
            *all_disk.units.last().unwrap().last().unwrap(),
            all_disk.units[0][0]
        );
        let half = WeightPlan::new(&cfg, &Policy::new([50, 0, 100, 0, 100, 0]), false);
        let d = half.bytes_on(Tier::Disk) as f64;
        let c = half.bytes_on(Tier::Compute) as f64;
        assert!(d > 0.0 && c > 0.0);
        assert!((d / (d + c) - 0.5).abs() < 0.2, "{d} {c}");
    }
}
