//! The cost model: prefill and decode time and the peak memory per tier of one policy and batch,
//! from a [`MachineProfile`]. One implementation, used by `plan`, by the search and by the
//! runner's limit check.
//!
//! Time. Per decoder layer, each link carries what the engine's placement moves over it (the
//! bytes come from the engine's own [`WeightPlan`] and sequence split, so predicted bytes are
//! the bytes that move) and the compute device runs the layer's products for every GPU batch:
//! - prefill: products of `gbs x s` rows at the prefill rate, attention `4 gbs s^2 h` at the
//!   batched rate; the weights off the compute device come in once; the KV cache of the
//!   sequences whose cache lives on the host or disk goes out;
//! - decode (at the mean cache length `s + n/2`, as FlexLLMGen): each GPU batch's products take
//!   the longer of their flops at the decode rate and reading the layer's weights from compute
//!   memory at the weight-read bandwidth (a roofline; FlexLLMGen's model has no read term);
//!   attention over the compute cache at the decode attention rate, over the host cache on the
//!   host (`cpu_attention`) or after bringing it in; weights off the device come in once per
//!   layer for all GPU batches; the disk share of the cache is read every step.
//! - overlapped (`overlap: true`): a layer takes the longest of its disk (reads + writes, one
//!   device), host-to-compute, compute-to-host and compute times; not overlapped, their sum.
//!   On the CPU device the copies between tiers are made by the cores that compute, so they add
//!   to the compute time.
//!
//! The input embedding and the output head are one more unit per token, costed the same way.
//! Total time = L x prefill layer + head + (gen_len - 1) x (L x decode layer + head).
//!
//! Memory. The planned peak per tier is what the engine holds there: the weights placed on it,
//! the fetch buffers in flight (LOOKAHEAD + 2 units), the cache segments, the loaded copies of
//! host and disk cache (two GPU batches), the staging buffers, the hidden states between
//! layers, and on the compute tier the prefill's working set of one GPU batch.

use bench_core::memory::TierBytes;
use bench_core::{ModelConfig, Policy};
use serde::Serialize;

use super::profile::MachineProfile;
use crate::device::DType;
use crate::offload::cache::KvDims;
use crate::offload::placement::{activation_tier, split_sequences, Tier};
use crate::offload::weights::WeightPlan;
use crate::schedule::LOOKAHEAD;

/// What is being planned: the model and the generation's shape.
#[derive(Debug, Clone)]
pub struct Workload {
    pub cfg: ModelConfig,
    pub prompt_len: usize,
    pub gen_len: usize,
    /// The cache's dtype without compression (the device's: fp16).
    pub kv: DType,
    /// Whether the compute tier is host RAM (the CPU device): activations are fp32 there.
    pub compute_in_ram: bool,
}

/// One policy and batch to cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub policy: Policy,
    pub gpu_batch_size: usize,
    pub num_gpu_batches: usize,
}

/// Where a policy's weights go, in bytes per tier: what the cost model needs of a
/// [`WeightPlan`], computed once per weight placement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightSplit {
    /// One decoder layer's bytes on (compute, host, disk), as stored (fp16 or 4-bit).
    pub layer: [f64; 3],
    /// The embedding and head units' bytes on (compute, host, disk), the tied table counted
    /// for both uses.
    pub head: [f64; 3],
    /// Bytes on each tier of the whole model (each tensor once).
    pub total: [u64; 3],
    /// The disk files' bytes (aligned).
    pub disk_files: u64,
    /// The largest decoder-layer unit fetched to the compute device.
    pub max_fetch: u64,
    /// The largest embedding or head unit fetched to the compute device.
    pub max_head_fetch: u64,
    /// Whether the weights are 4-bit.
    pub compressed: bool,
}

fn tier_index(t: Tier) -> usize {
    match t {
        Tier::Compute => 0,
        Tier::Host => 1,
        Tier::Disk => 2,
    }
}

impl WeightSplit {
    pub fn of(cfg: &ModelConfig, policy: &Policy) -> WeightSplit {
        let plan = WeightPlan::new(cfg, policy, false);
        let mut layer = [0f64; 3];
        let mut head = [0f64; 3];
        let last = plan.units.len() - 1;
        for (u, unit) in plan.units.iter().enumerate() {
            for &i in unit {
                let t = &plan.tensors[i];
                let b = t.bytes() as f64;
                if u == 0 || u == last {
                    head[tier_index(t.tier)] += b;
                } else {
                    layer[tier_index(t.tier)] += b;
                }
            }
        }
        let fetch_of = |u: &Vec<usize>| -> u64 {
            u.iter()
                .map(|&i| &plan.tensors[i])
                .filter(|t| t.tier != Tier::Compute)
                .map(|t| t.bytes() as u64)
                .sum()
        };
        let max_fetch = plan.units[1..last].iter().map(fetch_of).max().unwrap_or(0);
        let max_head_fetch = fetch_of(&plan.units[0]).max(fetch_of(&plan.units[last]));
        let l = cfg.num_hidden_layers.max(1) as f64;
        for x in &mut layer {
            *x /= l;
        }
        WeightSplit {
            layer,
            head,
            total: [
                plan.bytes_on(Tier::Compute),
                plan.bytes_on(Tier::Host),
                plan.bytes_on(Tier::Disk),
            ],
            disk_files: plan.disk_bytes(),
            max_fetch,
            max_head_fetch,
            compressed: policy.compress_weight,
        }
    }
}

/// Seconds per link and compute of one layer (or of the head unit), before overlap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Terms {
    pub disk_s: f64,
    pub host_to_compute_s: f64,
    pub compute_to_host_s: f64,
    pub compute_s: f64,
}

impl Terms {
    fn time(&self, overlap: bool) -> f64 {
        let t = [
            self.disk_s,
            self.host_to_compute_s,
            self.compute_to_host_s,
            self.compute_s,
        ];
        if overlap {
            t.into_iter().fold(0.0, f64::max)
        } else {
            t.into_iter().sum()
        }
    }
    /// Which term decides an overlapped layer.
    pub fn bound(&self) -> &'static str {
        let t = [
            (self.disk_s, "disk"),
            (self.host_to_compute_s, "host->compute"),
            (self.compute_to_host_s, "compute->host"),
            (self.compute_s, "compute"),
        ];
        t.into_iter()
            .fold((f64::MIN, "compute"), |a, b| if b.0 > a.0 { b } else { a })
            .1
    }
}

/// The model's figures for one candidate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    pub prefill_latency_s: f64,
    pub decode_latency_s: f64,
    pub total_throughput: f64,
    /// Planned peak bytes per tier.
    pub peak: TierBytes,
    /// Per decoder layer: prefill, and one decode step at the mean cache length.
    pub prefill_layer: Terms,
    pub decode_layer: Terms,
}

/// FlexLLMGen's CPU attention rate correction for small GPU batches and hidden sizes.
fn cpu_attention_rate(p: &MachineProfile, gbs: usize, h: usize) -> f64 {
    let base = p.compute.cpu_attention_flops;
    let Some([c1, c2, c3]) = p.compute.cpu_attention_scaling else {
        return base;
    };
    let b = (64.0 / gbs as f64).log2().max(0.0);
    let hh = (4096.0 / h as f64).log2().max(0.0);
    base * (1.0 + c1 * b * hh - c2 * b - c3 * hh).max(0.1)
}

/// Costs `c` for `w` on the machine `p`, with its weights placed as `ws` (= `WeightSplit::of`
/// of its policy; passed in so a search computes each placement once).
pub fn estimate(p: &MachineProfile, w: &Workload, ws: &WeightSplit, c: &Candidate) -> Estimate {
    let cfg = &w.cfg;
    let pol = &c.policy;
    let (h, f, v) = (
        cfg.hidden_size as f64,
        cfg.ffn_dim as f64,
        cfg.vocab_size as f64,
    );
    let l = cfg.num_hidden_layers as f64;
    let (s, n) = (w.prompt_len as f64, w.gen_len as f64);
    let gbs = c.gpu_batch_size;
    let k = c.num_gpu_batches as f64;
    let bls = gbs as f64 * k;
    let kv_dtype = crate::schedule::cache_dtype(pol, w.kv);
    let dims = KvDims {
        heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim(),
        max_len: w.prompt_len + w.gen_len,
        dtype: kv_dtype,
    };
    // K and V of one token of one sequence in one layer
    let row = dims.bytes(1, 1) as f64;
    let (cg, cc, cn) = split_sequences(gbs, pol.cache());
    let (cg, cc, cn) = (cg as f64, cc as f64, cn as f64);
    let act = activation_tier(pol);
    let hidden_off = act != Tier::Compute;
    let hidden_disk = act == Tier::Disk;
    let links = &p.links;
    let comp = &p.compute;
    let wread = if ws.compressed {
        comp.q4_weight_read_bps
    } else {
        comp.weight_read_bps
    };
    let attn_factor = if pol.compress_cache {
        comp.q4_attention_factor
    } else {
        1.0
    };
    let params = 4.0 * h * h + 2.0 * h * f;
    let w_layer: f64 = ws.layer.iter().sum();
    let w_off = ws.layer[1] + ws.layer[2];
    let w_disk = ws.layer[2];
    let cpu_rate = cpu_attention_rate(p, gbs, cfg.hidden_size);
    let gbs_f = gbs as f64;

    // ---- prefill, one layer, all GPU batches ----
    let hidden_p = 2.0 * s * h * bls; // fp16 hidden states of the block
    let pre = Terms {
        disk_s: (w_disk + if hidden_disk { hidden_p } else { 0.0 }) / links.disk_read
            + k * cn * s * row / links.disk_write_cache_prefill
            + if hidden_disk {
                hidden_p / links.disk_write_hidden_prefill
            } else {
                0.0
            },
        host_to_compute_s: (w_off + if hidden_off { hidden_p } else { 0.0 })
            / links.host_to_compute,
        compute_to_host_s: k * (cc + cn) * s * row / links.compute_to_host_cache
            + if hidden_off {
                hidden_p / links.compute_to_host_hidden
            } else {
                0.0
            },
        compute_s: k
            * ((2.0 * gbs_f * s * params / comp.mm_prefill_flops).max(w_layer / wread)
                + 4.0 * gbs_f * s * s * h / comp.bmm_prefill_flops),
    };

    // ---- decode, one layer, one step at the mean length ----
    let len = s + n / 2.0;
    let hidden_g = 2.0 * h * bls;
    let (dev_attn_seqs, host_attn_seqs) = if pol.cpu_attention {
        (cg, cc + cn)
    } else {
        (gbs_f, 0.0)
    };
    let loaded_cache = if pol.cpu_attention {
        0.0
    } else {
        k * (cc + cn) * len * row
    };
    let dec = Terms {
        disk_s: (w_disk + k * cn * len * row + if hidden_disk { hidden_g } else { 0.0 })
            / links.disk_read
            + (k * cn * row + if hidden_disk { hidden_g } else { 0.0 }) / links.disk_write_decode,
        host_to_compute_s: (w_off + loaded_cache + if hidden_off { hidden_g } else { 0.0 })
            / links.host_to_compute,
        compute_to_host_s: k * (cc + cn) * row / links.compute_to_host_cache
            + if hidden_off {
                hidden_g / links.compute_to_host_hidden
            } else {
                0.0
            },
        compute_s: k
            * ((2.0 * gbs_f * params / comp.mm_decode_flops).max(w_layer / wread)
                + 4.0 * dev_attn_seqs * len * h / (comp.bmm_decode_flops * attn_factor)
                + 4.0 * host_attn_seqs * len * h / (cpu_rate * attn_factor)),
    };

    // ---- the embedding and head unit, per token: the head's product over the last position ----
    let head_bytes: f64 = ws.head.iter().sum();
    let head = Terms {
        disk_s: ws.head[2] / links.disk_read,
        host_to_compute_s: (ws.head[1] + ws.head[2]) / links.host_to_compute,
        compute_to_host_s: 0.0,
        compute_s: k * (2.0 * gbs_f * v * h / comp.mm_decode_flops).max(head_bytes / 2.0 / wread),
    };

    // On the CPU device the copies between the tiers are memory copies by the same cores that
    // compute: they add to compute rather than overlap with it.
    let (pre, dec, head) = if w.compute_in_ram {
        let fold = |t: Terms| Terms {
            compute_s: t.compute_s + t.host_to_compute_s + t.compute_to_host_s,
            ..t
        };
        (fold(pre), fold(dec), fold(head))
    } else {
        (pre, dec, head)
    };
    let overlap = pol.overlap;
    let prefill = l * pre.time(overlap) + head.time(overlap);
    let decode = (n - 1.0).max(0.0) * (l * dec.time(overlap) + head.time(overlap));
    let total = prefill + decode;

    let peak = planned_peak(w, ws, c);
    Estimate {
        prefill_latency_s: prefill,
        decode_latency_s: decode,
        total_throughput: if total > 0.0 { bls * n / total } else { 0.0 },
        peak,
        prefill_layer: pre,
        decode_layer: dec,
    }
}

/// The planned peak bytes per tier of `c` for `w` with its weights placed as `ws`.
pub fn planned_peak(w: &Workload, ws: &WeightSplit, c: &Candidate) -> TierBytes {
    let cfg = &w.cfg;
    let pol = &c.policy;
    let gbs = c.gpu_batch_size;
    let bls = gbs * c.num_gpu_batches;
    let dims = KvDims {
        heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim(),
        max_len: w.prompt_len + w.gen_len,
        dtype: crate::schedule::cache_dtype(pol, w.kv),
    };
    let act = activation_tier(pol);
    let hidden_disk = act == Tier::Disk;
    // ---- planned peak memory ----
    let max_len = w.prompt_len + w.gen_len;
    let seq_layer = dims.bytes(1, max_len) as u64; // one sequence's cache in one layer
    let layers = cfg.num_hidden_layers as u64;
    let ku = c.num_gpu_batches as u64;
    let act_bytes: u64 = if w.compute_in_ram { 4 } else { 2 };
    let rows = (gbs * w.prompt_len) as u64;
    let working = rows * (cfg.ffn_dim + 6 * cfg.hidden_size) as u64 * act_bytes
        + (gbs * cfg.num_attention_heads * w.prompt_len * w.prompt_len) as u64 * 4;
    let hidden_all = (bls as u64) * w.prompt_len as u64 * cfg.hidden_size as u64 * 4;
    let offloaded_weights = ws.total[1] + ws.total[2] > 0;
    // pooled compute buffers per unit shape: LOOKAHEAD + 2 layer units in flight, and the
    // embedding table for the input and for the tied head
    let fetch = if offloaded_weights {
        (LOOKAHEAD as u64 + 2) * ws.max_fetch + 2 * ws.max_head_fetch
    } else {
        0
    };
    let (cg_u, cc_u, cn_u) = split_sequences(gbs, pol.cache());
    let (cg_u, cc_u, cn_u) = (cg_u as u64, cc_u as u64, cn_u as u64);
    let loaded = if pol.cpu_attention {
        0
    } else {
        2 * (cc_u + cn_u) * seq_layer
    };
    let mut peak = TierBytes {
        compute: ws.total[0]
            + fetch
            + layers * ku * cg_u * seq_layer
            + loaded
            + working
            + if act == Tier::Compute { hidden_all } else { 0 },
        host: ws.total[1]
            + layers * ku * cc_u * seq_layer
            // disk cache read into host memory (two GPU batches), upload staging
            + 2 * cn_u * seq_layer
            + 2 * (cc_u + cn_u) * seq_layer
            + if act == Tier::Host { hidden_all } else { 0 },
        disk: ws.disk_files
            + layers * ku * cn_u * dims.disk_row_bytes(1) as u64 * max_len as u64
            + if hidden_disk { hidden_all } else { 0 },
    };
    if !w.compute_in_ram && ws.total[2] > 0 {
        // pinned read buffers of disk fetches on the host
        peak.host += (LOOKAHEAD as u64 + 2) * ws.max_fetch + 2 * ws.max_head_fetch;
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::profile::{Compute, Links};

    /// A machine with round numbers, so the expected figures can be worked out by hand.
    fn round_machine() -> MachineProfile {
        MachineProfile {
            schema: super::super::profile::PROFILE_SCHEMA,
            name: "round".into(),
            fingerprint: None,
            device: bench_core::Device::Cuda,
            source: "test".into(),
            capacity: TierBytes {
                compute: 1 << 40,
                host: 1 << 40,
                disk: 1 << 40,
            },
            links: Links {
                host_to_compute: 1e9,
                compute_to_host_cache: 1e9,
                compute_to_host_hidden: 1e9,
                disk_read: 1e8,
                disk_write_cache_prefill: 1e8,
                disk_write_hidden_prefill: 1e8,
                disk_write_decode: 1e8,
            },
            compute: Compute {
                mm_prefill_flops: 1e12,
                mm_decode_flops: 1e11,
                weight_read_bps: 1e10,
                q4_weight_read_bps: 1e10,
                bmm_prefill_flops: 1e11,
                bmm_decode_flops: 1e10,
                cpu_attention_flops: 1e9,
                q4_attention_factor: 1.0,
                cpu_attention_scaling: None,
            },
            notes: vec![],
        }
    }

    fn workload(s: usize, n: usize) -> Workload {
        Workload {
            cfg: bench_core::model::lookup("opt-125m").unwrap(),
            prompt_len: s,
            gen_len: n,
            kv: DType::F16,
            compute_in_ram: false,
        }
    }

    fn cand(p: [u8; 6], gbs: usize, k: usize) -> Candidate {
        Candidate {
            policy: Policy::new(p),
            gpu_batch_size: gbs,
            num_gpu_batches: k,
        }
    }

    fn est(p: [u8; 6], gbs: usize, k: usize) -> Estimate {
        let c = cand(p, gbs, k);
        let ws = WeightSplit::of(&workload(8, 4).cfg, &c.policy);
        estimate(&round_machine(), &workload(8, 4), &ws, &c)
    }

    #[test]
    fn resident_decode_is_the_roofline_of_the_weight_read() {
        // opt-125m: h 768, ffn 3072, 12 layers; all on the compute device, batch 1
        let e = est([100, 0, 100, 0, 100, 0], 1, 1);
        let h = 768f64;
        let layer_bytes = 2.0 * (4.0 * h * h + 2.0 * h * 3072.0 + 9.0 * h + 3072.0);
        // decode: the weight read (1e10 B/s) beats 2 x params flops at 1e11
        let attn = 4.0 * (8.0 + 2.0) * h / 1e10;
        let want = layer_bytes / 1e10 + attn;
        assert!(
            (e.decode_layer.compute_s - want).abs() / want < 1e-9,
            "{} vs {want}",
            e.decode_layer.compute_s
        );
        assert_eq!(e.decode_layer.disk_s, 0.0);
        assert_eq!(e.decode_layer.host_to_compute_s, 0.0);
        // prefill: 8 rows of products at 1e12 lose to the weight read as well
        let pre = layer_bytes / 1e10 + 4.0 * 64.0 * h / 1e11;
        assert!((e.prefill_layer.compute_s - pre).abs() / pre < 1e-9);
        // throughput = batch x gen_len / total
        let t = e.prefill_latency_s + e.decode_latency_s;
        assert!((e.total_throughput - 4.0 / t).abs() < 1e-9);
    }

    #[test]
    fn weights_on_disk_are_read_once_per_layer_for_every_gpu_batch() {
        let one = est([0, 0, 100, 0, 100, 0], 4, 1);
        let four = est([0, 0, 100, 0, 100, 0], 4, 4);
        let h = 768f64;
        let layer_bytes = 2.0 * (4.0 * h * h + 2.0 * h * 3072.0 + 9.0 * h + 3072.0);
        assert!(
            (one.decode_layer.disk_s - layer_bytes / 1e8).abs() / one.decode_layer.disk_s < 1e-9
        );
        assert_eq!(one.decode_layer.disk_s, four.decode_layer.disk_s);
        assert_eq!(one.decode_layer.bound(), "disk");
        // the same bytes pass the host link on their way in
        assert!((one.decode_layer.host_to_compute_s - layer_bytes / 1e9).abs() < 1e-12);
        // disk-bound: four GPU batches get nearly four times the throughput
        let r = four.total_throughput / one.total_throughput;
        assert!(r > 3.0 && r <= 4.0, "{r}");
        // without overlap the terms add up
        let mut c = cand([0, 0, 100, 0, 100, 0], 4, 1);
        c.policy.overlap = false;
        let w = workload(8, 4);
        let e = estimate(
            &round_machine(),
            &w,
            &WeightSplit::of(&w.cfg, &c.policy),
            &c,
        );
        let d = &e.decode_layer;
        assert!(e.decode_latency_s > one.decode_latency_s);
        let sum = d.disk_s + d.host_to_compute_s + d.compute_to_host_s + d.compute_s;
        assert!(sum > d.disk_s);
    }

    #[test]
    fn cache_on_disk_is_read_every_step_and_cpu_attention_moves_none_of_it() {
        let h = 768f64;
        let row = 2.0 * h * 2.0; // K and V, fp16
        let len = 8.0 + 2.0;
        let d = est([100, 0, 0, 0, 100, 0], 2, 1);
        let want = (2.0 * len * row) / 1e8 + 2.0 * row / 1e8;
        assert!((d.decode_layer.disk_s - want).abs() / want < 1e-9);
        let host = est([100, 0, 0, 100, 100, 0], 2, 1);
        assert!((host.decode_layer.host_to_compute_s - 2.0 * len * row / 1e9).abs() < 1e-12);
        let mut c = cand([100, 0, 0, 100, 100, 0], 2, 1);
        c.policy.cpu_attention = true;
        let w = workload(8, 4);
        let e = estimate(
            &round_machine(),
            &w,
            &WeightSplit::of(&w.cfg, &c.policy),
            &c,
        );
        assert_eq!(e.decode_layer.host_to_compute_s, 0.0);
        // attention on the host at 1e9 flop/s
        let attn = 4.0 * 2.0 * len * h / 1e9;
        assert!(e.decode_layer.compute_s > attn);
        // the cache's memory is where the policy put it
        assert!(e.peak.host >= 12 * 2 * (12 * 768 * 2 * 2) as u64);
        assert!(d.peak.disk >= 12 * 2 * 12 * 768 * 2 * 2);
    }

    #[test]
    fn compression_quarters_the_bytes() {
        let mut c = cand([0, 0, 100, 0, 100, 0], 1, 1);
        let w = workload(8, 4);
        let plain = estimate(
            &round_machine(),
            &w,
            &WeightSplit::of(&w.cfg, &c.policy),
            &c,
        );
        c.policy.compress_weight = true;
        let ws = WeightSplit::of(&w.cfg, &c.policy);
        let q = estimate(&round_machine(), &w, &ws, &c);
        let r = q.decode_layer.disk_s / plain.decode_layer.disk_s;
        assert!((0.27..0.30).contains(&r), "{r}");
        assert!(ws.disk_files < plain.peak.disk / 3);
    }
}
