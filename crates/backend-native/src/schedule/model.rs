//! [`OffloadModel`]: a model whose weights are placed on the policy's tiers, with the offload
//! directory they need; and what is settled before a run starts: the policy checks, the GPU
//! batch sizes, and the disk bytes of the cache for the free-space check.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use bench_core::{ModelConfig, Policy};

use crate::compress::{shapes, CACHE_GROUP_DIM};
use crate::device::{DType, Device, DeviceTensor};
use crate::model::TensorSource;
use crate::offload::cache::{self, KvDims};
use crate::offload::direct::OffloadDir;
use crate::offload::placement::{activation_tier, split_sequences, Tier};
use crate::offload::stats::Stats;
use crate::offload::weights::{TieredWeights, WeightPlan};

/// A model whose weights live on the policy's tiers.
pub struct OffloadModel<T> {
    pub cfg: ModelConfig,
    pub policy: Policy,
    pub weights: TieredWeights<T>,
    pub plan: WeightPlan,
    pub stats: Arc<Stats>,
    // dropped last: removes the offload files
    pub(super) dir: Option<OffloadDir>,
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
        if policy.compress_weight {
            shapes::check_weights(
                plan.tensors
                    .iter()
                    .map(|t| (t.name.as_str(), t.shape.as_slice())),
            )
            .with_context(|| format!("compressing the weights of {}", cfg.name))?;
        }
        if policy.compress_cache {
            shapes::check_cache(cfg)?;
        }
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

/// The policy's own consistency (percents, activations on one tier, attn_sparsity in (0, 1]).
pub fn check_policy(p: &Policy) -> Result<()> {
    p.validate().map_err(|e| anyhow!("invalid policy: {e}"))
}

/// The stored dtype of the KV cache: the device's own, or 4-bit groups along head_dim with the
/// policy's compress_cache.
pub fn cache_dtype(policy: &Policy, device_kv: DType) -> DType {
    if policy.compress_cache {
        DType::Q4 {
            group_dim: CACHE_GROUP_DIM,
        }
    } else {
        device_kv
    }
}

/// Bytes the cache's disk segments will take for this shape (for the free-space check); `kv`
/// is the device's cache dtype.
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
        dtype: cache_dtype(policy, kv),
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
