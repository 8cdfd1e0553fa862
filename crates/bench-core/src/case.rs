//! One benchmark case: what to run (model, framework, shape, placement) and how (device, weights, timing).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::auto::Auto;
use crate::hash::fnv1a64;
use crate::memory::MemoryLimits;
use crate::model;

/// The x86-64 virtual address space (48 bits): no KV cache of a runnable case is larger.
pub const MAX_ADDRESSABLE_BYTES: u64 = 1 << 48;
/// The longest per-case timeout accepted, 30 days; longer is a typo, not a benchmark.
pub const MAX_TIMEOUT_S: u64 = 30 * 24 * 3600;

/// Whether `secs` is a usable per-case timeout (1 s to [`MAX_TIMEOUT_S`]).
pub fn check_timeout(secs: u64) -> Result<(), String> {
    if secs == 0 {
        Err("a timeout of 0 s would time every case out at once; give at least 1 second".into())
    } else if secs > MAX_TIMEOUT_S {
        Err(format!(
            "a timeout of {secs} s is over {MAX_TIMEOUT_S} s (30 days); give the seconds a case may run"
        ))
    } else {
        Ok(())
    }
}

/// Where the model lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Gpu,
    Cpu,
    Disk,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Cpu => "cpu",
            Tier::Disk => "disk",
        }
    }
}

/// FlexLLMGen's offloading policy. `percent` is `--percent`: weight GPU%, weight CPU%, cache GPU%,
/// cache CPU%, activation GPU%, activation CPU%; disk gets the rest of each pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub percent: [u8; 6],
    #[serde(default = "yes")]
    pub overlap: bool,
    #[serde(default = "yes")]
    pub sep_layer: bool,
    #[serde(default = "yes")]
    pub pin_weight: bool,
    #[serde(default)]
    pub cpu_attention: bool,
    #[serde(default = "one")]
    pub attn_sparsity: f64,
    #[serde(default)]
    pub compress_weight: bool,
    #[serde(default)]
    pub compress_cache: bool,
}

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}

impl Policy {
    pub fn new(percent: [u8; 6]) -> Policy {
        Policy {
            percent,
            overlap: true,
            sep_layer: true,
            pin_weight: true,
            cpu_attention: false,
            attn_sparsity: 1.0,
            compress_weight: false,
            compress_cache: false,
        }
    }
    /// (gpu, cpu, disk) percent of the weights.
    pub fn weights(&self) -> (u8, u8, u8) {
        split(self.percent[0], self.percent[1])
    }
    /// (gpu, cpu, disk) percent of the KV cache.
    pub fn cache(&self) -> (u8, u8, u8) {
        split(self.percent[2], self.percent[3])
    }
    /// (gpu, cpu, disk) percent of the activations.
    pub fn activations(&self) -> (u8, u8, u8) {
        split(self.percent[4], self.percent[5])
    }

    /// The slowest tier holding any weights or cache.
    pub fn lowest_tier(&self) -> Tier {
        let (_, wc, wd) = self.weights();
        let (_, cc, cd) = self.cache();
        if wd > 0 || cd > 0 {
            Tier::Disk
        } else if wc > 0 || cc > 0 {
            Tier::Cpu
        } else {
            Tier::Gpu
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let names = ["weight", "cache", "activation"];
        for (i, name) in names.iter().enumerate() {
            let (g, c) = (self.percent[2 * i] as u32, self.percent[2 * i + 1] as u32);
            if g + c > 100 {
                return Err(format!(
                    "{name} percents sum to {} (gpu {g} + cpu {c}); they may sum to at most 100, disk gets the rest",
                    g + c
                ));
            }
        }
        let (ag, ac, ad) = self.activations();
        if ![ag, ac, ad].contains(&100) {
            return Err(format!(
                "activations must be 100% on one tier (got gpu {ag}, cpu {ac}, disk {ad})"
            ));
        }
        if !(self.attn_sparsity > 0.0 && self.attn_sparsity <= 1.0) {
            return Err(format!(
                "attn_sparsity must be in (0, 1], got {}",
                self.attn_sparsity
            ));
        }
        Ok(())
    }

    /// Short label for tables and filters, e.g. `100/0/100/0/100/0+cpu_attn`.
    pub fn label(&self) -> String {
        let p = self.percent.map(|x| x.to_string()).join("/");
        let mut s = p;
        if self.cpu_attention {
            s.push_str("+cpu_attn");
        }
        if self.compress_weight {
            s.push_str("+cw");
        }
        if self.compress_cache {
            s.push_str("+cc");
        }
        if self.attn_sparsity < 1.0 {
            s.push_str(&format!("+sparse{}", self.attn_sparsity));
        }
        if !self.overlap {
            s.push_str("+no_overlap");
        }
        if !self.sep_layer {
            s.push_str("+whole_layers");
        }
        s
    }
}

fn split(gpu: u8, cpu: u8) -> (u8, u8, u8) {
    (gpu, cpu, 100u8.saturating_sub(gpu.saturating_add(cpu)))
}

/// Placement: a tier preset (how the process-wrapper frameworks are configured), a full policy,
/// or `auto` (the native engine's planner chooses the policy before the case runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    Gpu,
    Cpu,
    Disk,
    Policy(Policy),
    Auto,
}

impl Placement {
    /// The policy the native engine runs for this placement. Presets mean: the whole model on the
    /// tier, cache and activations on the compute device. An unresolved `auto` has no policy yet
    /// and gives the all-compute one; runners refuse unresolved cases ([`Case::unresolved`]).
    pub fn policy(&self) -> Policy {
        match self {
            Placement::Gpu | Placement::Auto => Policy::new([100, 0, 100, 0, 100, 0]),
            Placement::Cpu => Policy::new([0, 100, 100, 0, 100, 0]),
            Placement::Disk => Policy::new([0, 0, 100, 0, 100, 0]),
            Placement::Policy(p) => p.clone(),
        }
    }
    pub fn lowest_tier(&self) -> Tier {
        match self {
            Placement::Gpu | Placement::Auto => Tier::Gpu,
            Placement::Cpu => Tier::Cpu,
            Placement::Disk => Tier::Disk,
            Placement::Policy(p) => p.lowest_tier(),
        }
    }
    pub fn label(&self) -> String {
        match self {
            Placement::Gpu => "gpu".into(),
            Placement::Cpu => "cpu".into(),
            Placement::Disk => "disk".into(),
            Placement::Policy(p) => p.label(),
            Placement::Auto => "auto".into(),
        }
    }
}

/// The compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    Cuda,
    Cpu,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cuda => "cuda",
            Device::Cpu => "cpu",
        }
    }
}

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weights {
    /// Deterministic pseudo-random fp16 weights (FlexLLMGen's benchmarking mode).
    Dummy,
    /// A HuggingFace checkpoint directory (config.json + safetensors).
    Checkpoint(PathBuf),
}

/// One benchmark case. Serialized as JSON it is what the child process receives and what
/// every result record carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub model: String,
    pub framework: String,
    pub prompt_len: usize,
    pub gen_len: usize,
    /// Decode steps actually run; the rest of `gen_len` is projected. `None` = all.
    #[serde(default)]
    pub cut_gen_len: Option<usize>,
    pub gpu_batch_size: usize,
    #[serde(default = "one_usize")]
    pub num_gpu_batches: usize,
    pub placement: Placement,
    #[serde(default = "default_device")]
    pub device: Device,
    #[serde(default = "default_weights")]
    pub weights: Weights,
    #[serde(default = "one_usize")]
    pub num_nodes: usize,
    #[serde(default = "one_usize")]
    pub num_gpus_per_node: usize,
    /// Warm-up generations (one token each, as FlexLLMGen) before the measured ones.
    #[serde(default = "one_usize")]
    pub warmup: usize,
    /// Measured generations per runner process; with `adaptive_repetitions` the first
    /// process's count (the spec's `min`).
    #[serde(default = "one_usize")]
    pub repetitions: usize,
    /// Per-case timeout in seconds; `None` = the run's default. Not part of the case id.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Repeat until the confidence interval is narrow enough (the orchestrator runs more
    /// repetitions in further processes); absent = exactly `repetitions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_repetitions: Option<AdaptiveRepetitions>,
    /// A full-length run that also projects its decode latency from its first N steps, as a
    /// case with `cut_gen_len: N` would, so the report can say how wrong the projection is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_projection_at: Option<usize>,
    /// The capacity the case may use per tier; unset tiers mean what the machine has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryLimits>,
    /// What the case leaves to the backend (`placement: auto`, `gpu_batch_size: auto`) and,
    /// once resolved, how. Unresolved, `placement` is `auto` and the batch fields hold 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<Auto>,
}

/// `repetitions: auto(min: 3, max: 10, target_ci: 0.05)`: at least `min` repetitions, more
/// until the 95% confidence interval's half-width of the total throughput is at most
/// `target_ci` of its median, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveRepetitions {
    pub min: usize,
    pub max: usize,
    pub target_ci: f64,
}

impl Default for AdaptiveRepetitions {
    fn default() -> Self {
        AdaptiveRepetitions {
            min: 3,
            max: 10,
            target_ci: 0.05,
        }
    }
}

impl AdaptiveRepetitions {
    pub fn validate(&self) -> Result<(), String> {
        if self.min < 2 {
            return Err(format!(
                "auto repetitions need min >= 2 (a confidence interval needs two), got {}",
                self.min
            ));
        }
        if self.max < self.min {
            return Err(format!(
                "auto repetitions: max {} is below min {}",
                self.max, self.min
            ));
        }
        if self.max > 1000 {
            return Err(format!("auto repetitions: max {} is over 1000", self.max));
        }
        if !(self.target_ci > 0.0 && self.target_ci < 1.0) {
            return Err(format!(
                "auto repetitions: target_ci {} is not a share in (0, 1), e.g. 0.05 for ±5%",
                self.target_ci
            ));
        }
        Ok(())
    }
}

fn one_usize() -> usize {
    1
}
fn default_device() -> Device {
    Device::Cuda
}
fn default_weights() -> Weights {
    Weights::Dummy
}

impl Case {
    /// Sequences per generation: gpu_batch_size x num_gpu_batches.
    pub fn batch_size(&self) -> usize {
        self.gpu_batch_size * self.num_gpu_batches
    }

    /// Tokens generated per sequence in the measured run (prefill's token included).
    pub fn measured_gen_len(&self) -> usize {
        self.cut_gen_len.unwrap_or(self.gen_len).min(self.gen_len)
    }

    /// Stable identity: a hash of the normalized case (the timeout is not part of it), so renaming
    /// a suite or reordering its axes keeps ids.
    pub fn id(&self) -> String {
        let mut norm = self.requested();
        norm.timeout_s = None;
        norm.model = norm
            .model
            .rsplit('/')
            .next()
            .unwrap_or(&norm.model)
            .to_string();
        if norm.cut_gen_len == Some(norm.gen_len) {
            norm.cut_gen_len = None;
        }
        let json = serde_json::to_string(&norm).expect("a case always serializes");
        format!("{:016x}", fnv1a64(json.as_bytes()))
    }

    /// The case as the suite asked for it: a resolved `auto` case with its choices taken back.
    pub fn requested(&self) -> Case {
        let mut c = self.clone();
        if let Some(a) = &mut c.auto {
            a.resolved = None;
            if a.placement {
                c.placement = Placement::Auto;
            }
            if a.gpu_batch_size {
                c.gpu_batch_size = 1;
                c.num_gpu_batches = 1;
            }
        }
        c
    }

    /// Whether something is still left to choose (`auto` not yet resolved): such a case cannot
    /// run, and runners refuse it.
    pub fn unresolved(&self) -> bool {
        self.auto.as_ref().is_some_and(|a| a.resolved.is_none())
            || self.placement == Placement::Auto
    }

    /// The placement for tables: `auto` cases say so, with what was chosen once resolved.
    pub fn placement_label(&self) -> String {
        match &self.auto {
            Some(a) if a.placement && a.resolved.is_some() => {
                format!("auto: {}", self.placement.label())
            }
            _ => self.placement.label(),
        }
    }

    /// Checks everything that does not need a backend. The message says what to change.
    /// Which frameworks exist and which take policies is the backends' to say
    /// ([`crate::backend::Frameworks::check`]).
    pub fn validate(&self) -> Result<(), String> {
        let cfg = match (&self.weights, model::lookup(&self.model)) {
            (_, Some(cfg)) => Some(cfg),
            (Weights::Checkpoint(_), None) => None,
            (Weights::Dummy, None) => {
                return Err(format!(
                    "unknown model `{}`; known: {}",
                    self.model,
                    model::names().join(", ")
                ))
            }
        };
        if self.prompt_len == 0 || self.gen_len == 0 {
            return Err("prompt_len and gen_len must be at least 1".into());
        }
        if self.gpu_batch_size == 0 || self.num_gpu_batches == 0 {
            return Err("gpu_batch_size and num_gpu_batches must be at least 1".into());
        }
        if self.repetitions == 0 {
            return Err("repetitions must be at least 1".into());
        }
        if let Some(a) = &self.adaptive_repetitions {
            a.validate()?;
            if a.min != self.repetitions {
                return Err(format!(
                    "repetitions {} differs from auto's min {}",
                    self.repetitions, a.min
                ));
            }
        }
        if let Some(at) = self.check_projection_at {
            if self.cut_gen_len.is_some() {
                return Err(
                    "a projection check runs the full gen_len: it has no cut_gen_len".into(),
                );
            }
            if at < 4 || at >= self.gen_len {
                return Err(format!(
                    "check_projection_at {at} must be at least 4 and below gen_len {}",
                    self.gen_len
                ));
            }
        }
        if let Some(cut) = self.cut_gen_len {
            if cut < 4 {
                return Err(format!(
                    "cut_gen_len {cut} is below 4: projection needs at least 4 measured steps"
                ));
            }
            if cut > self.gen_len {
                return Err(format!(
                    "cut_gen_len {cut} exceeds gen_len {}",
                    self.gen_len
                ));
            }
        }
        let seq_len = self.prompt_len.checked_add(self.gen_len).ok_or_else(|| {
            format!(
                "prompt_len {} + gen_len {} is past any model's positions",
                self.prompt_len, self.gen_len
            )
        })?;
        if let Some(cfg) = &cfg {
            if seq_len > cfg.max_position_embeddings {
                return Err(format!(
                    "prompt_len + gen_len = {seq_len} exceeds {}'s {} positions",
                    cfg.name, cfg.max_position_embeddings
                ));
            }
        }
        let batch = self
            .gpu_batch_size
            .checked_mul(self.num_gpu_batches)
            .ok_or_else(|| {
                format!(
                    "gpu_batch_size {} x num_gpu_batches {} is more sequences than can be counted",
                    self.gpu_batch_size, self.num_gpu_batches
                )
            })?;
        // Memory bounds what a case can be, whatever the machine: its KV cache (or for a model
        // the registry does not know, its token count) must fit an address space.
        let cache = match &cfg {
            Some(cfg) => {
                (batch as u128)
                    * (seq_len as u128)
                    * cfg.num_hidden_layers as u128
                    * cfg.hidden_size as u128
                    * 4
            }
            None => (batch as u128) * (seq_len as u128) * 4096,
        };
        if cache > MAX_ADDRESSABLE_BYTES as u128 {
            return Err(format!(
                "batch {batch} x {seq_len} tokens needs a KV cache of {cache} bytes, more than any \
                 machine can address ({MAX_ADDRESSABLE_BYTES} bytes); use a smaller batch"
            ));
        }
        if self.num_nodes == 0 || self.num_gpus_per_node == 0 {
            return Err("num_nodes and num_gpus_per_node must be at least 1".into());
        }
        if self.num_nodes.checked_mul(self.num_gpus_per_node).is_none() {
            return Err("num_nodes x num_gpus_per_node is more ranks than can be counted".into());
        }
        if let Some(t) = self.timeout_s {
            check_timeout(t)?;
        }
        if let Placement::Policy(p) = &self.placement {
            p.validate()?;
        }
        let auto_placement = self.auto.as_ref().is_some_and(|a| a.placement);
        if (self.placement == Placement::Auto) != (auto_placement && self.unresolved()) {
            return Err(
                "placement auto and the case's `auto.placement` disagree; write `placement: auto`"
                    .into(),
            );
        }
        Ok(())
    }

    /// A small valid case for tests and examples: opt-125m on the CPU, prompt 128, gen 32,
    /// batch 4, everything in compute memory, one repetition. Tests change what they need.
    #[doc(hidden)]
    pub fn example(framework: &str) -> Case {
        Case {
            model: "opt-125m".into(),
            framework: framework.into(),
            prompt_len: 128,
            gen_len: 32,
            cut_gen_len: None,
            gpu_batch_size: 4,
            num_gpu_batches: 1,
            placement: Placement::Gpu,
            device: Device::Cpu,
            weights: Weights::Dummy,
            num_nodes: 1,
            num_gpus_per_node: 1,
            warmup: 1,
            repetitions: 1,
            timeout_s: None,
            adaptive_repetitions: None,
            check_projection_at: None,
            memory: None,
            auto: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case() -> Case {
        Case::example("example")
    }

    #[test]
    fn id_is_stable_and_ignores_timeout() {
        let a = case();
        let mut b = case();
        b.timeout_s = Some(5);
        b.model = "facebook/opt-125m".into();
        assert_eq!(a.id(), b.id());
        b.prompt_len = 256;
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id().len(), 16);
    }

    #[test]
    fn json_round_trip() {
        let mut c = case();
        c.placement = Placement::Policy(Policy::new([20, 80, 0, 100, 0, 100]));
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Case>(&j).unwrap(), c);
    }

    #[test]
    fn policy_rules() {
        assert!(Policy::new([60, 50, 100, 0, 100, 0])
            .validate()
            .unwrap_err()
            .contains("110"));
        assert!(Policy::new([100, 0, 100, 0, 50, 50])
            .validate()
            .unwrap_err()
            .contains("activations"));
        assert_eq!(Policy::new([0, 50, 0, 0, 0, 100]).lowest_tier(), Tier::Disk);
        assert_eq!(
            Policy::new([20, 80, 0, 100, 0, 100]).lowest_tier(),
            Tier::Cpu
        );
        let mut c = case();
        c.cut_gen_len = Some(3);
        assert!(c.validate().unwrap_err().contains("below 4"));
        c.cut_gen_len = Some(5);
        assert!(c.validate().is_ok());
        c.placement = Placement::Policy(Policy::new([100, 0, 100, 60, 100, 0]));
        assert!(c.validate().unwrap_err().contains("cache percents"));
    }

    #[test]
    fn a_resolved_auto_case_keeps_the_requested_id() {
        let mut c = case();
        c.placement = Placement::Auto;
        c.gpu_batch_size = 1;
        c.auto = Some(Auto {
            placement: true,
            gpu_batch_size: true,
            resolved: None,
        });
        assert!(c.unresolved());
        assert!(c.validate().is_ok());
        let id = c.id();
        let mut r = c.clone();
        r.placement = Placement::Policy(Policy::new([20, 80, 0, 100, 0, 100]));
        r.gpu_batch_size = 48;
        r.num_gpu_batches = 3;
        r.auto.as_mut().unwrap().resolved = Some(crate::auto::Resolution {
            by: "test".into(),
            profile: None,
            limits: Default::default(),
            planned_peak: None,
            predicted: None,
        });
        assert!(!r.unresolved());
        assert!(r.validate().is_ok());
        assert_eq!(r.id(), id);
        assert_eq!(r.requested(), c);
        assert_eq!(r.placement_label(), "auto: 20/80/0/100/0/100");
        // a plain case's id is what it was before auto existed
        assert_eq!(case().id(), Case::example("example").requested().id());
    }

    #[test]
    fn labels_name_every_non_default_switch() {
        let mut p = Policy::new([20, 80, 0, 100, 0, 100]);
        assert_eq!(p.label(), "20/80/0/100/0/100");
        p.cpu_attention = true;
        p.overlap = false;
        p.sep_layer = false;
        assert_eq!(
            p.label(),
            "20/80/0/100/0/100+cpu_attn+no_overlap+whole_layers"
        );
    }
}
