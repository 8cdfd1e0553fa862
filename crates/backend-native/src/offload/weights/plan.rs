//! [`WeightPlan`]: which tier each weight tensor goes to (FlexLLMGen's mid-point rule per
//! placement group) and which tensors each schedule unit fetches.

use bench_core::{ModelConfig, Policy};

use bench_core::model::layout::{self, TensorSpec, ATTN_TENSORS};

use crate::compress::shapes::is_compressed_weight;
use crate::compress::WEIGHT_GROUP_DIM;
use crate::device::DType;
use crate::offload::direct::align_up;
use crate::offload::placement::{place_weights, Tier};

/// One tensor's place in the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub tier: Tier,
    /// The unit whose disk file holds it (its first user).
    pub unit: usize,
    /// How it is stored on every tier: fp16, or compressed (the policy's compress_weight, for
    /// tensors of two or more dimensions).
    pub dtype: DType,
}

impl TensorPlan {
    /// Bytes it takes on its tier and moves per fetch.
    pub fn bytes(&self) -> usize {
        self.dtype.bytes(&self.shape)
    }
    pub fn compressed(&self) -> bool {
        self.dtype.is_compressed()
    }
}

/// Where every weight tensor goes, and which tensors each schedule unit uses.
#[derive(Debug, Clone)]
pub struct WeightPlan {
    pub tensors: Vec<TensorPlan>,
    /// Unit 0: input embedding; then each decoder layer (1..=L), or with `sep_layer` each
    /// layer's attention and MLP halves (1..=2L); last: the output head. Tensor indices in the
    /// order [`super::Fetched`]'s accessors expect.
    pub units: Vec<Vec<usize>>,
    /// Whether layers are split into two units.
    pub sep_layer: bool,
}

impl WeightPlan {
    /// FlexLLMGen's placement: the mid-point rule over each placement group (the input
    /// embedding; each layer, or each of its attention and MLP halves with `sep_layer`; the
    /// output head), by the tensors' fp16 sizes as FlexLLMGen places them whether compressed or
    /// not. A tied lm_head is the input's `embed_tokens` and lives where it does.
    pub fn new(cfg: &ModelConfig, policy: &Policy, has_lm_head: bool) -> WeightPlan {
        let mut tensors: Vec<TensorPlan> = Vec::new();
        let mut units = Vec::new();
        let group = |list: Vec<TensorSpec>, unit: usize, tensors: &mut Vec<TensorPlan>| {
            let sizes: Vec<usize> = list.iter().map(|s| s.numel() * 2).collect();
            let tiers = place_weights(&sizes, policy);
            let mut idx = Vec::new();
            for (TensorSpec { name, shape }, tier) in list.into_iter().zip(tiers) {
                idx.push(tensors.len());
                let dtype = if policy.compress_weight && is_compressed_weight(&shape) {
                    DType::Q4 {
                        group_dim: WEIGHT_GROUP_DIM,
                    }
                } else {
                    DType::F16
                };
                tensors.push(TensorPlan {
                    name,
                    shape,
                    tier,
                    unit,
                    dtype,
                });
            }
            idx
        };
        units.push(group(layout::input_tensors(cfg), 0, &mut tensors));
        for i in 0..cfg.num_hidden_layers {
            let names = layout::layer_tensors(cfg, i);
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
        let mut u = group(
            layout::output_tensors(cfg, has_lm_head),
            out_unit,
            &mut tensors,
        );
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

#[cfg(test)]
mod tests {
    use super::*;

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
