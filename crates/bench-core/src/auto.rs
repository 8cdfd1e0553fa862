//! `auto` in a case: what it asks the backend to choose (`placement: auto`, `gpu_batch_size:
//! auto`) and, once resolved before the case runs, who chose and what it predicted. A resolved
//! case carries concrete values in its ordinary fields, so metrics and reports need nothing
//! special; its id stays the id of what the suite asked for.

use serde::{Deserialize, Serialize};

use crate::memory::TierBytes;

/// What a case left to the backend, and how it was resolved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auto {
    /// `placement: auto`: the policy (percents, cpu attention) is chosen; native only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub placement: bool,
    /// `gpu_batch_size: auto`: the batch is chosen (by the native engine with its number of GPU
    /// batches; for the baselines the largest batch that fits the placement's tiers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gpu_batch_size: bool,
    /// Set when resolved, before the case runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Resolution>,
}

/// Who resolved a case's `auto`, under which limits, and what it expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolution {
    /// In words: `native planner, profile <name>` or `largest batch that fits (baseline rule)`.
    pub by: String,
    /// The machine profile the prediction used (its name and fingerprint), when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The limits planned against, per tier (declared, else the machine's).
    pub limits: TierBytes,
    /// The planned peak per tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_peak: Option<TierBytes>,
    /// The cost model's figures for the chosen policy and batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<Prediction>,
}

/// A cost model's figures for one case, with FlexLLMGen's definitions (see `metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub prefill_latency_s: f64,
    pub decode_latency_s: f64,
    pub total_throughput: f64,
}
