//! [`generate_offloaded`]: sets up a run (the cache on its tiers, activation files, the worker
//! threads) and steps through the zig-zag: per token, the input embedding, then layer by layer
//! every GPU batch, then the output head and sampling.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use super::cache_io::Loaded;
use super::hidden::Hidden;
use super::model::{cache_dtype, group_sizes, OffloadModel};
use super::queue::Queue;
use super::run::{Run, ScheduleOptions};
use crate::device::cpu::{CpuDevice, CpuOptions};
use crate::device::{AttnShape, Device, HostSlice, Sampling};
use crate::generate::{
    check_prompts, check_teacher, teacher_step, GenOptions, GenOutput, PaddedBatch, Rng,
    SampleMode, StepEnd,
};
use crate::model::layers;
use crate::offload::cache::{BatchCache, KvDims};
use crate::offload::direct::align_up;
use crate::offload::placement::{activation_tier, split_sequences, Tier};
use crate::offload::stats::MemGuard;

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
    check_teacher(prompts, opts)?;
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
        dtype: cache_dtype(&model.policy, dev.kv_dtype()),
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
        let r = run.generate(&batch, prompts, &groups, &starts, opts);
        drop(act_mem);
        // let in-flight I/O finish (its results are dropped) before the threads are joined
        let flushed = run.finish();
        disk_q.close();
        xfer_q.close();
        r.and_then(|o| flushed.map(|()| o))
    })
}

impl<'a, D: Device> Run<'a, D> {
    pub(super) fn generate(
        &mut self,
        batch: &PaddedBatch,
        prompts: &[Vec<u32>],
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
                    )
                    .with_sparsity(self.model.policy.attn_sparsity);
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
                next.extend(match &opts.teacher {
                    Some(t) => {
                        let l = dev.download_f32(&logits)?;
                        let rows = starts[k]..starts[k] + n;
                        teacher_step(t, prompts, rows, &l, step, cfg.pad_token_id, &mut out)?
                    }
                    None => dev.sample(&logits, &how)?,
                });
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
}
