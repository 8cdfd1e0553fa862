//! Memory limits as data: the capacity a case may use per tier (`memory: (compute: "16GiB",
//! host: "200GiB", disk: "1.5TB")`), byte sizes written with their unit, and the baselines' batch
//! rule (the largest batch whose weights, cache and activations fit the placement's tiers).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::case::{Case, Device, Placement};
use crate::model::ModelConfig;

/// A byte count, written with its unit: `512MiB`, `16GiB`, `1.5TB`, `200 GB`, `4096B`.
/// Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB) of 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

const UNITS: [(&str, f64); 9] = [
    ("B", 1.0),
    ("kB", 1e3),
    ("KB", 1e3),
    ("MB", 1e6),
    ("GB", 1e9),
    ("TB", 1e12),
    ("KiB", 1024.0),
    ("MiB", 1048576.0),
    ("GiB", 1073741824.0),
];
const TIB: f64 = 1099511627776.0;

impl ByteSize {
    /// Parses `16GiB`, `1.5 TB`, `4096B`; a number without a unit, a negative one or an unknown
    /// unit is an error saying what to write.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
            .unwrap_or(t.len());
        let (num, unit) = (t[..split].trim(), t[split..].trim());
        let hint = "write a size with its unit, e.g. \"512MiB\", \"16GiB\" or \"1.5TB\"";
        if num.is_empty() {
            return Err(format!("`{text}` is not a size: {hint}"));
        }
        let value: f64 = num
            .parse()
            .map_err(|_| format!("`{text}`: `{num}` is not a number; {hint}"))?;
        if value < 0.0 || num.starts_with('-') {
            return Err(format!(
                "`{text}` is negative: a memory limit is at least 0 bytes"
            ));
        }
        if unit.is_empty() {
            return Err(format!("`{text}` has no unit: {hint}"));
        }
        let scale = UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, s)| *s)
            .or((unit == "TiB").then_some(TIB))
            .ok_or_else(|| {
                format!(
                    "`{text}`: unknown unit `{unit}`; use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB"
                )
            })?;
        let bytes = value * scale;
        if !bytes.is_finite() || bytes > u64::MAX as f64 / 2.0 {
            return Err(format!("`{text}` is more bytes than any machine has"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

/// `1.5 GiB`-style text for messages and tables.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= TIB {
        format!("{:.2} TiB", b / TIB)
    } else if b >= 1073741824.0 {
        format!("{:.2} GiB", b / 1073741824.0)
    } else if b >= 1048576.0 {
        format!("{:.1} MiB", b / 1048576.0)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&human(self.0))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Exact bytes: a record must say precisely what limit the case ran under.
        s.serialize_str(&format!("{}B", self.0))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, Visitor};
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size with its unit, e.g. \"16GiB\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "{n} has no unit: write it as a string with its unit, e.g. \"{n}B\" or \"16GiB\""
                )))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "{n} is not a size: write a string with a unit, e.g. \"16GiB\""
                )))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "{n} is not a size: write a string with a unit, e.g. \"16GiB\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// The capacity a case may use per tier; an unset tier means what the machine has (free GPU
/// memory, available RAM, free space of the offload directory). On the CPU device the compute
/// and host tiers are both RAM, so limits are how a CPU run exercises offloading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<ByteSize>,
}

impl MemoryLimits {
    /// `self` where set, else `base`.
    pub fn over(&self, base: &MemoryLimits) -> MemoryLimits {
        MemoryLimits {
            compute: self.compute.or(base.compute),
            host: self.host.or(base.host),
            disk: self.disk.or(base.disk),
        }
    }
}

/// A tier's name in limits and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemTier {
    Compute,
    Host,
    Disk,
}

impl MemTier {
    pub const ALL: [MemTier; 3] = [MemTier::Compute, MemTier::Host, MemTier::Disk];
    pub fn as_str(self) -> &'static str {
        match self {
            MemTier::Compute => "compute",
            MemTier::Host => "host",
            MemTier::Disk => "disk",
        }
    }
}

/// Bytes per tier, a limit or a need.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierBytes {
    pub compute: u64,
    pub host: u64,
    pub disk: u64,
}

impl TierBytes {
    pub fn get(&self, t: MemTier) -> u64 {
        match t {
            MemTier::Compute => self.compute,
            MemTier::Host => self.host,
            MemTier::Disk => self.disk,
        }
    }
    pub fn set(&mut self, t: MemTier, v: u64) {
        match t {
            MemTier::Compute => self.compute = v,
            MemTier::Host => self.host = v,
            MemTier::Disk => self.disk = v,
        }
    }
    /// The first tier where `need` is over `self`, with both numbers.
    pub fn first_exceeded(&self, need: &TierBytes) -> Option<(MemTier, u64, u64)> {
        MemTier::ALL
            .into_iter()
            .find(|&t| need.get(t) > self.get(t))
            .map(|t| (t, need.get(t), self.get(t)))
    }
}

/// The capacity a case may use: per tier, and on the CPU device (whose compute and host tiers
/// are the same RAM) the RAM both share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub tiers: TierBytes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_ram: Option<u64>,
}

impl Capacity {
    /// No limit anywhere.
    pub fn unlimited() -> Capacity {
        Capacity {
            tiers: TierBytes {
                compute: u64::MAX,
                host: u64::MAX,
                disk: u64::MAX,
            },
            shared_ram: None,
        }
    }

    /// Each limit scaled by `share` (a safety margin: 0.9 plans within 90%).
    pub fn scaled(&self, share: f64) -> Capacity {
        let s = |b: u64| {
            if b == u64::MAX {
                b
            } else {
                (b as f64 * share) as u64
            }
        };
        Capacity {
            tiers: TierBytes {
                compute: s(self.tiers.compute),
                host: s(self.tiers.host),
                disk: s(self.tiers.disk),
            },
            shared_ram: self.shared_ram.map(s),
        }
    }

    /// The first limit `need` is over: (what, needed, allowed).
    pub fn exceeded(&self, need: &TierBytes) -> Option<(&'static str, u64, u64)> {
        if let Some((t, n, have)) = self.tiers.first_exceeded(need) {
            return Some((t.as_str(), n, have));
        }
        let both = need.compute.saturating_add(need.host);
        match self.shared_ram {
            Some(ram) if both > ram => Some(("RAM (compute + host)", both, ram)),
            _ => None,
        }
    }
}

/// What the machine has per tier for a case: free GPU memory (cuda) or available RAM (cpu) for
/// compute, available RAM for host, free space of `offload_dir` for disk; a tier that cannot be
/// read counts as unlimited.
pub fn machine_capacity(device: Device, offload_dir: &std::path::Path) -> Capacity {
    let ram = crate::env::available_ram_bytes().unwrap_or(u64::MAX);
    let compute = match device {
        Device::Cpu => ram,
        Device::Cuda => crate::env::free_gpu_bytes().unwrap_or(u64::MAX),
    };
    let disk = crate::env::free_bytes(offload_dir).unwrap_or(u64::MAX);
    Capacity {
        tiers: TierBytes {
            compute,
            host: ram,
            disk,
        },
        shared_ram: (device == Device::Cpu).then_some(ram),
    }
}

/// The limits a case runs under: its declared ones, the machine's for the tiers it leaves unset.
/// A declared limit wins even over what the machine has (a run over it fails as the machine
/// would: that is the user's call).
pub fn effective_limits(case: &Case, offload_dir: &std::path::Path) -> Capacity {
    with_declared(
        machine_capacity(case.device, offload_dir),
        &case.memory.unwrap_or_default(),
    )
}

/// `base` with the tiers `declared` sets replaced; with both compute and host declared the user
/// has said how the RAM splits, so no shared-RAM bound is left.
pub fn with_declared(mut base: Capacity, declared: &MemoryLimits) -> Capacity {
    if let Some(c) = declared.compute {
        base.tiers.compute = c.0;
    }
    if let Some(h) = declared.host {
        base.tiers.host = h.0;
    }
    if let Some(d) = declared.disk {
        base.tiers.disk = d.0;
    }
    if declared.compute.is_some() && declared.host.is_some() {
        base.shared_ram = None;
    }
    base
}

/// What a preset placement (gpu, cpu, disk: the whole model on that tier, the KV cache and
/// activations on the compute device, as the baselines run them) needs per tier at `batch`
/// sequences: weights, the fp16 KV cache of prompt + gen tokens, and the prefill's activations
/// (the hidden states and the MLP's intermediate of one layer, fp32 as the frameworks compute
/// on a CPU, with the attention scores), plus the layers being worked on when the weights live
/// off the compute device.
pub fn preset_needs(cfg: &ModelConfig, case: &Case, batch: usize) -> TierBytes {
    let weights = cfg.model_bytes();
    let seq = case.prompt_len + case.gen_len;
    let cache = cfg.cache_bytes(batch, seq);
    let rows = (batch * case.prompt_len) as u64;
    let scores = (batch * cfg.num_attention_heads * case.prompt_len * case.prompt_len) as u64 * 4;
    let acts = rows * (cfg.ffn_dim + 4 * cfg.hidden_size) as u64 * 4 + scores;
    let layer = weights / cfg.num_hidden_layers.max(1) as u64;
    let mut need = TierBytes {
        compute: cache + acts,
        ..Default::default()
    };
    match &case.placement {
        Placement::Cpu => {
            need.compute += 2 * layer;
            need.host = weights;
        }
        Placement::Disk => {
            need.compute += 2 * layer;
            need.host = 2 * layer;
            need.disk = weights;
        }
        _ => need.compute += weights,
    }
    need
}

/// The paper's rule for its baselines: the largest batch (at most `max`, by doubling then
/// bisection) whose [`preset_needs`] fit `limits` x `margin`. `Err` says which tier holds
/// not even one sequence, with the smallest limits that would.
pub fn largest_preset_batch(
    cfg: &ModelConfig,
    case: &Case,
    limits: &Capacity,
    margin: f64,
    max: usize,
) -> Result<usize, String> {
    let cap = limits.scaled(margin);
    let fits = |b: usize| cap.exceeded(&preset_needs(cfg, case, b)).is_none();
    if !fits(1) {
        let need = preset_needs(cfg, case, 1);
        let parts: Vec<String> = MemTier::ALL
            .iter()
            .filter(|&&t| need.get(t) > 0)
            .map(|&t| {
                format!(
                    "{} {}",
                    t.as_str(),
                    human((need.get(t) as f64 / margin).ceil() as u64)
                )
            })
            .collect();
        let (tier, n, have) = cap.exceeded(&need).expect("one limit is over");
        return Err(format!(
            "gpu_batch_size auto: not even one sequence of {} fits placement {}: the {tier} \
             tier needs {} and may use {} ({:.0}% of its limit); the smallest limits that fit \
             one sequence: {}",
            cfg.name,
            case.placement.label(),
            human(n),
            human(have),
            margin * 100.0,
            parts.join(", ")
        ));
    }
    let (mut lo, mut hi) = (1usize, 2usize);
    while hi <= max && fits(hi) {
        lo = hi;
        hi *= 2;
    }
    let mut hi = hi.min(max + 1);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Share of each limit a plan may fill: what is measured runs a little past what is planned
/// (allocator slack, buffers the plan does not see), so plans leave a tenth free.
pub const SAFETY_MARGIN: f64 = 0.9;
/// The largest batch `auto` considers.
pub const MAX_AUTO_BATCH: usize = 4096;

/// The default resolution of `auto` (the baselines'): `gpu_batch_size: auto` becomes the
/// largest batch whose [`preset_needs`] fit the case's limits with the [`SAFETY_MARGIN`]; a case
/// with nothing left to choose comes back as it is. `placement: auto` needs a planner
/// (a backend that takes policies overrides [`crate::Backend::resolve`]).
pub fn resolve_preset(case: &Case, offload_dir: &std::path::Path) -> Result<Case, String> {
    if !case.unresolved() {
        return Ok(case.clone());
    }
    let auto = case.auto.clone().unwrap_or_default();
    if auto.placement || case.placement == Placement::Auto {
        return Err(format!(
            "framework `{}` has no planner for `placement: auto`",
            case.framework
        ));
    }
    let cfg = crate::model::lookup(&case.model).ok_or_else(|| {
        format!(
            "gpu_batch_size auto needs the model's sizes: `{}` is not in the registry (give a \
             number instead)",
            case.model
        )
    })?;
    let limits = effective_limits(case, offload_dir);
    let batch = largest_preset_batch(&cfg, case, &limits, SAFETY_MARGIN, MAX_AUTO_BATCH)?;
    let mut out = case.clone();
    out.gpu_batch_size = batch;
    out.num_gpu_batches = 1;
    out.auto = Some(crate::auto::Auto {
        resolved: Some(crate::auto::Resolution {
            by: format!(
                "largest batch whose weights, KV cache and activations fit the placement's tiers \
                 within {:.0}% of each limit (the baselines' rule)",
                SAFETY_MARGIN * 100.0
            ),
            profile: None,
            limits: limits.tiers,
            planned_peak: Some(preset_needs(&cfg, case, batch)),
            predicted: None,
        }),
        ..auto
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_only() {
        assert_eq!(ByteSize::parse("16GiB").unwrap().0, 16 << 30);
        assert_eq!(ByteSize::parse("1.5TB").unwrap().0, 1_500_000_000_000);
        assert_eq!(ByteSize::parse(" 200 GB ").unwrap().0, 200_000_000_000);
        assert_eq!(ByteSize::parse("512MiB").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("4096B").unwrap().0, 4096);
        assert_eq!(ByteSize::parse("2TiB").unwrap().0, 2 << 40);
        assert!(ByteSize::parse("16").unwrap_err().contains("no unit"));
        assert!(ByteSize::parse("-1GiB").unwrap_err().contains("negative"));
        assert!(ByteSize::parse("3 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(ByteSize::parse("GiB").unwrap_err().contains("not a size"));
        assert!(ByteSize::parse("99999999999999TB")
            .unwrap_err()
            .contains("more bytes"));
        // a record says the exact bytes and reads them back
        let j = serde_json::to_string(&ByteSize(12345)).unwrap();
        assert_eq!(j, "\"12345B\"");
        assert_eq!(serde_json::from_str::<ByteSize>(&j).unwrap().0, 12345);
        assert!(serde_json::from_str::<ByteSize>("12")
            .unwrap_err()
            .to_string()
            .contains("no unit"));
    }

    #[test]
    fn preset_batch_is_the_largest_that_fits() {
        let cfg = crate::model::lookup("opt-1.3b").unwrap();
        let mut case = Case::example("wrapper");
        case.model = "opt-1.3b".into();
        case.device = Device::Cuda;
        case.placement = Placement::Gpu;
        let need = |b| preset_needs(&cfg, &case, b).compute;
        // by hand: weights + cache(b) + activations(b)
        let seq = (case.prompt_len + case.gen_len) as u64;
        let cache1 = 2 * seq * 24 * 2048 * 2;
        let acts1 = 128 * (8192 + 4 * 2048) * 4 + 32 * 128 * 128 * 4;
        assert_eq!(need(1), cfg.model_bytes() + cache1 + acts1);
        let mut limit = Capacity::unlimited();
        limit.tiers.compute = need(10) + 1;
        assert_eq!(
            largest_preset_batch(&cfg, &case, &limit, 1.0, 1024).unwrap(),
            10
        );
        assert_eq!(
            largest_preset_batch(&cfg, &case, &limit, 1.0, 4).unwrap(),
            4
        );
        let mut tiny = limit;
        tiny.tiers.compute = 1 << 20;
        let e = largest_preset_batch(&cfg, &case, &tiny, 0.9, 1024).unwrap_err();
        assert!(
            e.contains("compute tier") && e.contains("smallest limits"),
            "{e}"
        );
        // weights on disk leave the compute tier the cache, activations and two layers
        case.placement = Placement::Disk;
        let d = preset_needs(&cfg, &case, 1);
        assert_eq!(d.disk, cfg.model_bytes());
        assert!(d.compute < cfg.model_bytes() / 4);
        // on the CPU device compute and host share the RAM
        let shared = Capacity {
            shared_ram: Some(d.compute + d.host - 1),
            ..Capacity::unlimited()
        };
        assert!(shared.exceeded(&d).unwrap().0.contains("RAM"));
    }
}
