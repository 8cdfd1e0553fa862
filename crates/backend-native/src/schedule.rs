//! Generation with offloading: the zig-zag block schedule over layers x GPU batches.
//!
//! For each token, each layer's weights are fetched once and used by every GPU batch before the
//! next layer (the zig-zag). With `sep_layer` (the policy's default, as in FlexLLMGen) a layer's
//! attention and MLP halves are separate steps, each with its own weight unit: 2L + 2 units per
//! token (input embedding, the halves, output head). Fetches run ahead on background threads by [`LOOKAHEAD`] units, so
//! the next layer's weights stream in while *all* GPU batches of this layer compute, not only
//! the first (the original synchronizes every step). The cache of GPU batch k+1 loads while
//! batch k computes; new keys and values go back to disk on the disk thread. There is no global
//! synchronize: the compute thread waits only for the one transfer it needs next, and each
//! (layer, batch) owns its buffers, so no workspace is shared between batches.
//!
//! Threads: the compute thread (this one) runs the layer math; the *disk* thread runs O_DIRECT
//! reads and writes; the *transfer* thread copies between host memory and the compute device.
//! Each has a two-level queue: cache jobs, which the next compute step needs, go before weight
//! prefetches. On the CUDA device the transfer thread only queues copies out of pinned memory
//! on the upload stream ([`Device::upload_async`]); the compute thread orders its kernels
//! behind them with [`Device::wait_fence`] (an event wait on the compute stream), so neither
//! thread blocks on a copy.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use bench_core::{ModelConfig, Policy};

use crate::device::cpu::{CpuDevice, CpuOptions, CpuTensor};
use crate::device::{AttnShape, DType, Device, DeviceTensor, Fence, HostSlice, Sampling};
use crate::generate::{
    check_prompts, GenOptions, GenOutput, PaddedBatch, Rng, SampleMode, StepEnd,
};
use crate::model::layers;
use crate::model::TensorSource;
use crate::offload::cache::{self, BatchCache, KvDims};
use crate::offload::direct::{align_up, AlignedBuf, DirectFile, OffloadDir};
use crate::offload::placement::{activation_tier, split_sequences, Tier};
use crate::offload::stats::{Link, MemGuard, Stats};
use crate::offload::weights::{Fetched, TieredWeights, WeightPlan};

/// Weight units fetched ahead of the one in use (with overlap on).
pub const LOOKAHEAD: usize = 2;

/// How generation is scheduled.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleOptions {
    pub num_gpu_batches: usize,
    /// Attention over host and disk cache segments runs on the host (only q, k, v and the
    /// result move).
    pub cpu_attention: bool,
    /// Background I/O threads overlapping compute; off = every transfer runs when needed, on the
    /// compute thread.
    pub overlap: bool,
}

/// A model whose weights live on the policy's tiers.
pub struct OffloadModel<T> {
    pub cfg: ModelConfig,
    pub policy: Policy,
    pub weights: TieredWeights<T>,
    pub plan: WeightPlan,
    pub stats: Arc<Stats>,
    // dropped last: removes the offload files
    dir: Option<OffloadDir>,
}

impl<T: DeviceTensor> OffloadModel<T> {
    /// Places the weights of `src` by `policy`. `extra_disk_bytes` (the cache's disk segments,
    /// when known) joins the free-space check of the offload directory, which runs before any
    /// file is written.
    pub fn load<D: Device<Tensor = T>>(
        dev: &D,
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        policy: &Policy,
        offload_dir: Option<&Path>,
        extra_disk_bytes: u64,
    ) -> Result<OffloadModel<T>> {
        check_policy(policy)?;
        let plan = WeightPlan::new(cfg, policy, src.contains("lm_head.weight"));
        let need = plan.disk_bytes() + extra_disk_bytes;
        let needs_dir = need > 0 || policy.cache().2 > 0 || activation_tier(policy) == Tier::Disk;
        let dir = if needs_dir {
            let parent = offload_dir.context(
                "the placement puts tensors on disk: pass an offload directory (--offload-dir DIR)",
            )?;
            Some(OffloadDir::open(parent, need)?)
        } else {
            None
        };
        let stats = Stats::new();
        let weights = TieredWeights::build(dev, src, &plan, dir.as_ref(), &stats)?;
        Ok(OffloadModel {
            cfg: cfg.clone(),
            policy: policy.clone(),
            weights,
            plan,
            stats,
            dir,
        })
    }

    pub fn offload_dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(|d| d.path())
    }
}

/// What this engine does not run, in the policy's terms.
pub fn check_policy(p: &Policy) -> Result<()> {
    p.validate().map_err(|e| anyhow!("invalid policy: {e}"))?;
    if p.compress_weight || p.compress_cache {
        bail!("compressed weights or cache are not implemented in the native engine yet");
    }
    if p.attn_sparsity < 1.0 {
        bail!("sparse attention is not implemented in the native engine yet");
    }
    Ok(())
}

/// Bytes the cache's disk segments will take for this shape (for the free-space check).
pub fn cache_disk_bytes(
    cfg: &ModelConfig,
    policy: &Policy,
    kv: DType,
    batch: usize,
    num_gpu_batches: usize,
    max_len: usize,
) -> u64 {
    let dims = KvDims {
        heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim(),
        max_len,
        dtype: kv,
    };
    let per: Vec<usize> = group_sizes(batch, num_gpu_batches)
        .into_iter()
        .map(|n| split_sequences(n, policy.cache()).2)
        .collect();
    cache::disk_bytes(dims, cfg.num_hidden_layers, &per)
}

/// Sizes of the GPU batches: `n` sequences in `min(k, n)` batches as even as can be (equal when
/// `k` divides `n`, as in every benchmark case: batch = gpu_batch_size x num_gpu_batches).
pub fn group_sizes(n: usize, k: usize) -> Vec<usize> {
    let k = k.clamp(1, n.max(1));
    (0..k).map(|i| n / k + usize::from(i < n % k)).collect()
}

// ---------------------------------------------------------------- background work

type Job<'a> = Box<dyn FnOnce() + Send + 'a>;

#[derive(Default)]
struct QueueState<'a> {
    high: VecDeque<Job<'a>>,
    low: VecDeque<Job<'a>>,
    closed: bool,
}

/// A worker thread's queue: cache jobs (high) before weight prefetches (low).
struct Queue<'a> {
    state: Mutex<QueueState<'a>>,
    cv: Condvar,
    /// Without overlap, jobs run at once on the submitting thread.
    inline: bool,
}

impl<'a> Queue<'a> {
    fn new(inline: bool) -> Queue<'a> {
        Queue {
            state: Mutex::new(QueueState {
                high: VecDeque::new(),
                low: VecDeque::new(),
                closed: false,
            }),
            cv: Condvar::new(),
            inline,
        }
    }
    fn push(&self, high: bool, job: Job<'a>) {
        if self.inline {
            job();
            return;
        }
        let mut s = self.state.lock().expect("queue lock");
        if high {
            s.high.push_back(job);
        } else {
            s.low.push_back(job);
        }
        self.cv.notify_one();
    }
    fn close(&self) {
        self.state.lock().expect("queue lock").closed = true;
        self.cv.notify_all();
    }
    fn run(&self) {
        loop {
            let job = {
                let mut s = self.state.lock().expect("queue lock");
                loop {
                    if let Some(j) = s.high.pop_front().or_else(|| s.low.pop_front()) {
                        break j;
                    }
                    if s.closed {
                        return;
                    }
                    s = self.cv.wait(s).expect("queue lock");
                }
            };
            job();
        }
    }
}

/// A result another thread is producing.
struct Pending<T>(Receiver<Result<T>>);

impl<T> Pending<T> {
    fn wait(self, stats: &Stats, what: &str) -> Result<T> {
        let t0 = Instant::now();
        let r = self
            .0
            .recv()
            .map_err(|_| anyhow!("the I/O thread stopped before {what}"))?;
        stats.add_io_wait(t0.elapsed().as_secs_f64());
        r.with_context(|| what.to_string())
    }
}

/// A GPU batch's cache segments brought to where attention runs.
struct Loaded<T> {
    /// Compute copies of the host segment (without cpu attention).
    host: Option<(T, T)>,
    /// The disk segment read back into host memory.
    disk_host: Option<(CpuTensor, CpuTensor)>,
    /// Compute copies of the disk segment (without cpu attention).
    disk: Option<(T, T)>,
    /// Uploads into `host` / `disk` still in flight (devices with asynchronous uploads).
    fences: Vec<Fence>,
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

/// A GPU batch's hidden states between layers, on the activation tier.
enum Hidden<T> {
    Compute(T),
    Host(Vec<f32>, Vec<usize>, MemGuard),
    /// In the batch's activation file (f32 values from offset 0), of this shape.
    Disk(Vec<usize>),
    Empty,
}

// ---------------------------------------------------------------- generation

/// Generation with the model's weights on their tiers, the cache on the policy's tiers, and the
/// zig-zag schedule. Produces the same tokens as [`crate::generate::generate`] for every policy.
pub fn generate_offloaded<D: Device>(
    dev: &D,
    model: &OffloadModel<D::Tensor>,
    prompts: &[Vec<u32>],
    opts: &GenOptions,
    sched: &ScheduleOptions,
) -> Result<GenOutput> {
    let cfg = &model.cfg;
    check_prompts(cfg, prompts, opts.max_new_tokens)?;
    ensure!(
        sched.num_gpu_batches >= 1,
        "num_gpu_batches must be at least 1"
    );
    let stats = &model.stats;
    let batch = PaddedBatch::new(prompts, cfg.pad_token_id);
    let (b, s) = (batch.batch, batch.seq);
    let groups = group_sizes(b, sched.num_gpu_batches);
    let starts: Vec<usize> = groups
        .iter()
        .scan(0, |acc, &n| {
            let s0 = *acc;
            *acc += n;
            Some(s0)
        })
        .collect();
    let nl = cfg.num_hidden_layers;
    let dims = KvDims {
        heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim(),
        max_len: s + opts.max_new_tokens,
        dtype: dev.kv_dtype(),
    };
    let host_dev = CpuDevice::new(CpuOptions {
        kv_dtype: dev.kv_dtype(),
        ..Default::default()
    });
    let dir = model.dir.as_ref();
    let mut caches: Vec<Vec<BatchCache<D::Tensor>>> = Vec::with_capacity(nl);
    for l in 0..nl {
        let mut row = Vec::new();
        for (k, &n) in groups.iter().enumerate() {
            row.push(
                BatchCache::new(
                    dev,
                    &host_dev,
                    dims,
                    split_sequences(n, model.policy.cache()),
                    dir,
                    &format!("kv-{l:04}-{k:03}.bin"),
                    stats,
                )
                .with_context(|| format!("allocating the KV cache of layer {l}, GPU batch {k}"))?,
            );
        }
        caches.push(row);
    }
    let act_tier = activation_tier(&model.policy);
    // hidden states on disk: a file per GPU batch, its largest size (the prefill's) reserved
    // now, so a full disk fails here and not in the middle of generation
    let mut act_files = Vec::new();
    let mut act_mem = Vec::new();
    if act_tier == Tier::Disk {
        let dir = dir.context("activations on disk need an offload directory")?;
        for (k, &n) in groups.iter().enumerate() {
            let f = dir.file(&format!("act-{k:03}.bin"))?;
            let bytes = align_up(n * s * cfg.hidden_size.max(cfg.word_embed_proj_dim) * 4);
            f.allocate(bytes as u64)?;
            act_files.push(f);
            act_mem.push(MemGuard::new(stats, Tier::Disk, bytes));
        }
    }
    let overlap = sched.overlap;
    let disk_q = Arc::new(Queue::new(!overlap));
    let xfer_q = Arc::new(Queue::new(!overlap));
    std::thread::scope(|scope| {
        if overlap {
            let (d, x) = (disk_q.clone(), xfer_q.clone());
            scope.spawn(move || d.run());
            scope.spawn(move || x.run());
        }
        let mut run = Run {
            dev,
            model,
            sched,
            stats,
            caches: &caches,
            dims,
            host_dev: &host_dev,
            disk_q: disk_q.clone(),
            xfer_q: xfer_q.clone(),
            fetch_next: 0,
            fetch_total: opts.max_new_tokens * model.weights.num_units(),
            fetches: VecDeque::new(),
            stores: HashMap::new(),
            act_tier,
            act_files,
        };
        let r = run.generate(&batch, &groups, &starts, opts);
        drop(act_mem);
        // let in-flight I/O finish (its results are dropped) before the threads are joined
        let flushed = run.finish();
        disk_q.close();
        xfer_q.close();
        r.and_then(|o| flushed.map(|()| o))
    })
}

struct Run<'a, D: Device> {
    dev: &'a D,
    model: &'a OffloadModel<D::Tensor>,
    sched: &'a ScheduleOptions,
    stats: &'a Arc<Stats>,
    caches: &'a [Vec<BatchCache<D::Tensor>>],
    dims: KvDims,
    host_dev: &'a CpuDevice,
    disk_q: Arc<Queue<'a>>,
    xfer_q: Arc<Queue<'a>>,
    /// Index (step * units + unit) of the next weight fetch to submit.
    fetch_next: usize,
    fetch_total: usize,
    fetches: VecDeque<Pending<Fetched<D::Tensor>>>,
    /// Disk writes of the cache per (layer, batch), awaited before that cache is read again.
    stores: HashMap<(usize, usize), Pending<()>>,
    act_tier: Tier,
    /// One file per GPU batch for hidden states on the disk tier (empty otherwise).
    act_files: Vec<DirectFile>,
}

impl<'a, D: Device> Run<'a, D> {
    fn units(&self) -> usize {
        self.model.weights.num_units()
    }

    /// Submits the fetch of weight unit `idx % units` (of step `idx / units`).
    fn submit_fetch(&mut self, idx: usize) {
        let unit = idx % self.units();
        let (tx, rx) = channel();
        let model: &'a OffloadModel<D::Tensor> = self.model;
        let w = &model.weights;
        let dev = self.dev;
        if w.is_resident(unit) {
            // nothing moves: no thread needed
            tx.send(w.materialize(dev, unit, None)).ok();
        } else if w.stages_disk_reads(dev, unit) {
            // reads and copies in one job on the disk thread
            self.disk_q.push(
                false,
                Box::new(move || {
                    tx.send(w.fetch_staged(dev, unit)).ok();
                }),
            );
        } else if w.has_disk(unit) {
            let xfer = self.xfer_q.clone();
            self.disk_q.push(
                false,
                Box::new(move || match w.read_disk(dev, unit) {
                    Ok(d) => xfer.push(
                        false,
                        Box::new(move || {
                            tx.send(w.materialize(dev, unit, Some(d))).ok();
                        }),
                    ),
                    Err(e) => {
                        tx.send(Err(e)).ok();
                    }
                }),
            );
        } else {
            self.xfer_q.push(
                false,
                Box::new(move || {
                    tx.send(w.materialize(dev, unit, None)).ok();
                }),
            );
        }
        self.fetches.push_back(Pending(rx));
    }

    /// Weight unit `idx`, with the next ones submitted behind it.
    fn weights(&mut self, idx: usize) -> Result<Fetched<D::Tensor>> {
        let ahead = if self.sched.overlap { LOOKAHEAD } else { 0 };
        while self.fetch_next <= idx + ahead && self.fetch_next < self.fetch_total {
            self.submit_fetch(self.fetch_next);
            self.fetch_next += 1;
        }
        let p = self
            .fetches
            .pop_front()
            .context("weight fetches out of order")?;
        let mut f = p.wait(
            self.stats,
            &format!("fetching weight unit {}", idx % self.units()),
        )?;
        // the copies may still be in flight on the device's upload stream: the kernels queued
        // from here on wait for them on the device, not here
        f.ready(self.dev)?;
        Ok(f)
    }

    /// Starts bringing the cache of (layer, batch) to where attention will run, for a step with
    /// `past` positions already cached.
    fn submit_cache_load(
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

    /// Waits for every outstanding disk write.
    fn finish(&mut self) -> Result<()> {
        self.fetches.clear();
        let mut first = Ok(());
        for (_, p) in self.stores.drain() {
            if let Err(e) = p.wait(self.stats, "writing the KV cache to disk") {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    fn generate(
        &mut self,
        batch: &PaddedBatch,
        groups: &[usize],
        starts: &[usize],
        opts: &GenOptions,
    ) -> Result<GenOutput> {
        let cfg = &self.model.cfg;
        let dev = self.dev;
        let (b, s) = (batch.batch, batch.seq);
        let nl = cfg.num_hidden_layers;
        let nb = groups.len();
        let units = self.units();
        let mut rng = match opts.sample {
            SampleMode::Temperature { seed, .. } => Rng::new(seed),
            SampleMode::Greedy => Rng::new(0),
        };
        let mut out = GenOutput {
            new_tokens: vec![Vec::new(); b],
            ..Default::default()
        };
        let mut mask = batch.mask.clone();
        let mut counts: Vec<u32> = batch.mask.chunks(s).map(|m| m.iter().sum()).collect();
        let mut unfinished = vec![true; b];
        let (mut ids, mut positions) = (batch.ids.clone(), batch.positions.clone());
        for step in 0..opts.max_new_tokens {
            let t0 = Instant::now();
            let (past, new) = if step == 0 { (0, s) } else { (s + step - 1, 1) };
            let total = past + new;
            let base = step * units;
            // input embedding of every GPU batch
            let input = self.weights(base)?;
            let tc = Instant::now();
            let mut hidden: Vec<Hidden<D::Tensor>> = Vec::with_capacity(nb);
            let mut masks: Vec<(Vec<u32>, D::Tensor)> = Vec::with_capacity(nb);
            for (k, &n) in groups.iter().enumerate() {
                let (r0, r1) = (starts[k] * new, (starts[k] + n) * new);
                let ids_t = dev.upload(HostSlice::U32(&ids[r0..r1]), &[n * new])?;
                let pos_t = dev.upload(HostSlice::U32(&positions[r0..r1]), &[n * new])?;
                let m = mask[starts[k] * total..(starts[k] + n) * total].to_vec();
                let mask_t = dev.upload(HostSlice::U32(&m), &[n, total])?;
                let t = &input.tensors;
                let x =
                    layers::embed_with(dev, &t[0], &t[1], t.get(2).map(|a| &**a), &ids_t, &pos_t)?;
                hidden.push(self.put_hidden(k, x)?);
                masks.push((m, mask_t));
            }
            self.stats.add_compute(tc.elapsed().as_secs_f64());
            drop(input);
            // the zig-zag: layer by layer, every GPU batch through a layer before the next
            let mut next_load = self.submit_cache_load(0, 0, past)?;
            let sep = self.model.plan.sep_layer;
            for l in 0..nl {
                // with sep_layer (FlexLLMGen's default) the halves are units of their own: the
                // MLP's weights stream in while the attention half of every GPU batch computes,
                // and only half a layer's weights need to be on the compute device at once
                let (attn_unit, mlp_unit) = if sep {
                    (base + 1 + 2 * l, Some(base + 2 + 2 * l))
                } else {
                    (base + 1 + l, None)
                };
                let fetched = self.weights(attn_unit)?;
                let (aw, whole_mlp) = if sep {
                    (fetched.attn(), None)
                } else {
                    let w = fetched.layer();
                    (w.attn, Some(w.mlp))
                };
                for k in 0..nb {
                    let mut loaded = match next_load.take() {
                        Some(p) => p.wait(self.stats, "loading the KV cache")?,
                        None => Loaded::default(),
                    };
                    // attention's kernels wait for the cache uploads on the device, not here
                    for f in loaded.fences.drain(..) {
                        dev.wait_fence(&f)?;
                    }
                    // the next (layer, batch) in zig-zag order loads while this one computes
                    let (nl_, nk) = if k + 1 < nb { (l, k + 1) } else { (l + 1, 0) };
                    if nl_ < nl {
                        next_load = self.submit_cache_load(nl_, nk, past)?;
                    }
                    let tc = Instant::now();
                    let mut x = self.take_hidden(k, &mut hidden[k])?;
                    let shape = AttnShape::new(
                        groups[k],
                        cfg.num_attention_heads,
                        cfg.head_dim(),
                        past,
                        new,
                    );
                    self.attention(l, k, &aw, &mut x, &masks[k], shape, loaded)
                        .with_context(|| {
                            format!("attention of layer {l}, GPU batch {k}, step {step}")
                        })?;
                    if let Some(mw) = &whole_mlp {
                        layers::mlp_block(dev, cfg, mw, &mut x).with_context(|| {
                            format!("MLP of layer {l}, GPU batch {k}, step {step}")
                        })?;
                    }
                    hidden[k] = self.put_hidden(k, x)?;
                    self.stats.add_compute(tc.elapsed().as_secs_f64());
                }
                // the weights go before their unit, so its buffers return to the pool
                drop((aw, whole_mlp));
                drop(fetched);
                if let Some(u) = mlp_unit {
                    let fetched = self.weights(u)?;
                    let mw = fetched.mlp();
                    for (k, h) in hidden.iter_mut().enumerate() {
                        let tc = Instant::now();
                        let mut x = self.take_hidden(k, h)?;
                        layers::mlp_block(dev, cfg, &mw, &mut x).with_context(|| {
                            format!("MLP of layer {l}, GPU batch {k}, step {step}")
                        })?;
                        *h = self.put_hidden(k, x)?;
                        self.stats.add_compute(tc.elapsed().as_secs_f64());
                    }
                    drop(mw);
                }
            }
            // output head of every GPU batch
            let output = self.weights(base + units - 1)?;
            let tc = Instant::now();
            let t = &output.tensors;
            let mut i = 0;
            let final_ln = if cfg.do_layer_norm_before {
                i = 2;
                Some((&*t[0], &*t[1]))
            } else {
                None
            };
            let project_out = if cfg.word_embed_proj_dim != cfg.hidden_size {
                i += 1;
                Some(&*t[i - 1])
            } else {
                None
            };
            let lm_head = &*t[i];
            let uniforms: Vec<f32> = match opts.sample {
                SampleMode::Greedy => Vec::new(),
                SampleMode::Temperature { .. } => (0..b).map(|_| rng.uniform()).collect(),
            };
            let mut next = Vec::with_capacity(b);
            let mut step_logits = Vec::new();
            for (k, &n) in groups.iter().enumerate() {
                let x = self.take_hidden(k, &mut hidden[k])?;
                let logits = layers::head_with(dev, final_ln, project_out, lm_head, &x, n, new)?;
                let how = match opts.sample {
                    SampleMode::Greedy => Sampling::Greedy,
                    SampleMode::Temperature { temperature, .. } => Sampling::Temperature {
                        temperature,
                        uniforms: &uniforms[starts[k]..starts[k] + n],
                    },
                };
                next.extend(dev.sample(&logits, &how)?);
                if opts.keep_logits {
                    step_logits.extend(dev.download_f32(&logits)?);
                }
            }
            self.stats.add_compute(tc.elapsed().as_secs_f64());
            drop(output);
            if opts.keep_logits {
                out.logits.push(step_logits);
            }
            out.step_times_s.push(t0.elapsed().as_secs_f64());
            let step = StepEnd {
                pad: cfg.pad_token_id,
                stop: opts.stop_token,
                total,
            };
            match step.apply(&mut next, &mut unfinished, &mut mask, &mut counts, &mut out) {
                Some(p) => positions = p,
                None => break,
            }
            ids = next;
        }
        Ok(out)
    }

    /// Hidden states to the activation tier.
    fn put_hidden(&self, k: usize, x: D::Tensor) -> Result<Hidden<D::Tensor>> {
        if self.act_tier == Tier::Compute {
            return Ok(Hidden::Compute(x));
        }
        let shape = x.shape().to_vec();
        let v = self.dev.download_f32(&x)?;
        self.stats.moved(Link::ComputeToHost, x.size_bytes());
        if self.act_tier == Tier::Host {
            let g = MemGuard::new(self.stats, Tier::Host, v.len() * 4);
            return Ok(Hidden::Host(v, shape, g));
        }
        let file = &self.act_files[k];
        let len = align_up(v.len() * 4);
        let mut buf = AlignedBuf::new(len)?;
        buf.f32s_mut(0, v.len()).copy_from_slice(&v);
        let t = Instant::now();
        file.write_at(&buf, len, 0)
            .context("writing hidden states to the offload directory")?;
        self.stats.add_disk_busy(t.elapsed().as_secs_f64());
        self.stats.moved(Link::DiskWrite, len);
        Ok(Hidden::Disk(shape))
    }

    /// Hidden states back on the compute device.
    fn take_hidden(&self, k: usize, h: &mut Hidden<D::Tensor>) -> Result<D::Tensor> {
        let (v, shape) = match std::mem::replace(h, Hidden::Empty) {
            Hidden::Compute(x) => return Ok(x),
            Hidden::Host(v, shape, _g) => (v, shape),
            Hidden::Disk(shape) => {
                let n: usize = shape.iter().product();
                let len = align_up(n * 4);
                let mut buf = AlignedBuf::new(len)?;
                let t = Instant::now();
                self.act_files[k]
                    .read_at(&mut buf, len, 0)
                    .context("reading hidden states from the offload directory")?;
                self.stats.add_disk_busy(t.elapsed().as_secs_f64());
                self.stats.moved(Link::DiskRead, len);
                (buf.f32s(0, n).to_vec(), shape)
            }
            Hidden::Empty => bail!("hidden states taken twice"),
        };
        let t = upload_act(self.dev, &v, &shape)?;
        self.stats.moved(Link::HostToCompute, t.size_bytes());
        Ok(t)
    }

    /// The attention half of layer `l` for GPU batch `k`, each cache segment where it lives.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        l: usize,
        k: usize,
        w: &crate::model::AttnWeights<Arc<D::Tensor>>,
        x: &mut D::Tensor,
        mask: &(Vec<u32>, D::Tensor),
        shape: AttnShape,
        mut loaded: Loaded<D::Tensor>,
    ) -> Result<()> {
        let dev = self.dev;
        let cfg = &self.model.cfg;
        let cache = &self.caches[l][k];
        let (q, kk, vv) = layers::attn_qkv(dev, cfg, w, x)?;
        if cache.all_compute() {
            let mut g = cache.compute.lock().expect("cache lock");
            let (kc, vc) = g.as_mut().context("compute cache segment missing")?;
            dev.append_kv(kc, vc, &kk, &vv, shape)?;
            let a = dev.attention(&q, kc, vc, &mask.1, shape)?;
            return layers::attn_out(dev, cfg, w, x, &a);
        }
        let single = cache.segments.len() == 1;
        let (new, total) = (shape.new_len, shape.total_len());
        let mut parts = Vec::with_capacity(cache.segments.len());
        for seg in cache.segments.clone() {
            let sh = AttnShape::new(seg.len, shape.heads, shape.head_dim, shape.past_len, new);
            let rows = (seg.start * new, seg.len * new);
            let (qs, ks, vs) = if single {
                (None, None, None)
            } else {
                (
                    Some(slice_rows(dev, self.stats, &q, rows.0, rows.1)?),
                    Some(slice_rows(dev, self.stats, &kk, rows.0, rows.1)?),
                    Some(slice_rows(dev, self.stats, &vv, rows.0, rows.1)?),
                )
            };
            let (qs, ks, vs) = (
                qs.as_ref().unwrap_or(&q),
                ks.as_ref().unwrap_or(&kk),
                vs.as_ref().unwrap_or(&vv),
            );
            let m = &mask.0[seg.start * total..(seg.start + seg.len) * total];
            let a = match seg.tier {
                Tier::Compute => {
                    let mask_t = dev.upload(HostSlice::U32(m), &[seg.len, total])?;
                    let mut g = cache.compute.lock().expect("cache lock");
                    let (kc, vc) = g.as_mut().context("compute cache segment missing")?;
                    dev.append_kv(kc, vc, ks, vs, sh)?;
                    dev.attention(qs, kc, vc, &mask_t, sh)?
                }
                tier if self.sched.cpu_attention => {
                    // only q, the new k and v, and the result cross the link
                    let qh = self.to_host(qs)?;
                    let kh = self.to_host(ks)?;
                    let vh = self.to_host(vs)?;
                    let mask_h = self.host_dev.upload(HostSlice::U32(m), &[seg.len, total])?;
                    let a = if tier == Tier::Host {
                        let mut g = cache.host.lock().expect("cache lock");
                        let (hk, hv) = g.as_mut().context("host cache segment missing")?;
                        self.host_dev.append_kv(hk, hv, &kh, &vh, sh)?;
                        self.host_dev.attention(&qh, hk, hv, &mask_h, sh)?
                    } else {
                        let (mut dk, mut dv) = loaded
                            .disk_host
                            .take()
                            .context("disk cache segment was not loaded")?;
                        self.host_dev.append_kv(&mut dk, &mut dv, &kh, &vh, sh)?;
                        let a = self.host_dev.attention(&qh, &dk, &dv, &mask_h, sh)?;
                        self.store_disk(l, k, kh, vh, shape.past_len, new);
                        a
                    };
                    let r = upload_act(dev, a.f32()?, a.shape())?;
                    self.stats.moved(Link::HostToCompute, r.size_bytes());
                    r
                }
                tier => {
                    let mask_t = dev.upload(HostSlice::U32(m), &[seg.len, total])?;
                    let (mut wk, mut wv) = if tier == Tier::Host {
                        loaded
                            .host
                            .take()
                            .context("host cache segment was not loaded")?
                    } else {
                        loaded
                            .disk
                            .take()
                            .context("disk cache segment was not loaded")?
                    };
                    dev.append_kv(&mut wk, &mut wv, ks, vs, sh)?;
                    let a = dev.attention(qs, &wk, &wv, &mask_t, sh)?;
                    // the new keys and values go back to their tier
                    let kh = self.to_host(ks)?;
                    let vh = self.to_host(vs)?;
                    if tier == Tier::Host {
                        let mut g = cache.host.lock().expect("cache lock");
                        let (hk, hv) = g.as_mut().context("host cache segment missing")?;
                        self.host_dev.append_kv(hk, hv, &kh, &vh, sh)?;
                    } else {
                        self.store_disk(l, k, kh, vh, shape.past_len, new);
                    }
                    a
                }
            };
            parts.push(a);
        }
        let a = if single {
            parts.pop().context("no cache segment")?
        } else {
            concat_rows(dev, self.stats, &parts)?
        };
        layers::attn_out(dev, cfg, w, x, &a)
    }

    /// A compute tensor's values as an f32 host tensor (counted on the compute -> host link).
    fn to_host(&self, t: &D::Tensor) -> Result<CpuTensor> {
        let v = self.dev.download_f32(t)?;
        self.stats.moved(Link::ComputeToHost, t.size_bytes());
        CpuTensor::from_f32(t.shape(), v)
    }

    /// Queues the disk write of this step's keys and values of (layer, batch).
    fn store_disk(
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

/// f32 host values to a compute tensor in the device's activation dtype.
fn upload_act<D: Device>(dev: &D, v: &[f32], shape: &[usize]) -> Result<D::Tensor> {
    match dev.act_dtype() {
        DType::F32 => dev.upload(HostSlice::F32(v), shape),
        DType::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            dev.upload(HostSlice::F16(&h), shape)
        }
        DType::U32 => bail!("u32 activations"),
    }
}

/// Rows `start .. start + n` of a 2-D activation tensor. Through the host: the device trait has
/// no device-side copy yet (a CUDA device would do it in place); only split caches need it.
/// Both crossings are counted on their links.
fn slice_rows<D: Device>(
    dev: &D,
    stats: &Stats,
    t: &D::Tensor,
    start: usize,
    n: usize,
) -> Result<D::Tensor> {
    let w = t.shape()[1];
    let v = dev.download_f32(t)?;
    stats.moved(Link::ComputeToHost, t.size_bytes());
    let r = upload_act(dev, &v[start * w..(start + n) * w], &[n, w])?;
    stats.moved(Link::HostToCompute, r.size_bytes());
    Ok(r)
}

/// The rows of `parts` stacked.
///
/// Through host memory like [`slice_rows`], and counted likewise.
fn concat_rows<D: Device>(dev: &D, stats: &Stats, parts: &[D::Tensor]) -> Result<D::Tensor> {
    let w = parts[0].shape()[1];
    let mut all = Vec::new();
    for p in parts {
        all.extend(dev.download_f32(p)?);
        stats.moved(Link::ComputeToHost, p.size_bytes());
    }
    let rows = all.len() / w;
    let r = upload_act(dev, &all, &[rows, w])?;
    stats.moved(Link::HostToCompute, r.size_bytes());
    Ok(r)
}
