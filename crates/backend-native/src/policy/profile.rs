//! A machine profile: the rates of the engine's primitives and the capacities the cost model
//! needs, measured on this machine by `flexbench-native calibrate` (cached per machine,
//! keyed by `bench_core::env::machine_fingerprint`), or a named one: `flexllmgen-t4`, the
//! paper's machine with FlexLLMGen's own fitted constants.

use std::path::Path;

use anyhow::{bail, Context, Result};
use bench_core::memory::TierBytes;
use serde::{Deserialize, Serialize};

/// Version of the profile layout; a file of another version is refused (recalibrate).
pub const PROFILE_SCHEMA: u32 = 1;
/// The paper's machine.
pub const T4: &str = "flexllmgen-t4";

/// Bandwidths of the links between tiers, bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Links {
    /// Host memory to the compute device (weights, cache, hidden states).
    pub host_to_compute: f64,
    /// Compute device to host: KV cache entries.
    pub compute_to_host_cache: f64,
    /// Compute device to host: hidden states.
    pub compute_to_host_hidden: f64,
    /// Disk reads into host memory (O_DIRECT).
    pub disk_read: f64,
    /// Disk writes of the KV cache during prefill (large sequential writes).
    pub disk_write_cache_prefill: f64,
    /// Disk writes of hidden states during prefill.
    pub disk_write_hidden_prefill: f64,
    /// Disk writes during decode (one new cache row per sequence).
    pub disk_write_decode: f64,
}

/// Rates of the compute device, flop/s or bytes/s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compute {
    /// Matrix products of prefill (many rows), flop/s.
    pub mm_prefill_flops: f64,
    /// Matrix products of decode (few rows), flop/s, where they are compute-bound.
    pub mm_decode_flops: f64,
    /// Bytes/s at which decode's products read fp16 weights from compute memory (the
    /// bandwidth bound FlexLLMGen's model lacks).
    pub weight_read_bps: f64,
    /// The same for 4-bit weights (packed bytes/s, the dequantization included).
    pub q4_weight_read_bps: f64,
    /// Attention of prefill (batched products over the prompt), flop/s.
    pub bmm_prefill_flops: f64,
    /// Decode attention on the compute device over its fp16 cache, flop/s (4 x rows x len x h).
    pub bmm_decode_flops: f64,
    /// Decode attention on the host over a host cache (cpu_attention), flop/s.
    pub cpu_attention_flops: f64,
    /// Decode attention over a 4-bit cache relative to fp16 (1 = as fast).
    pub q4_attention_factor: f64,
    /// FlexLLMGen's correction of the CPU attention rate for small batches and hidden sizes
    /// (c1, c2, c3 of its cost model); absent = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_attention_scaling: Option<[f64; 3]>,
}

/// Everything the cost model knows about a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineProfile {
    pub schema: u32,
    /// `flexllmgen-t4`, or `calibrated <hostname>`.
    pub name: String,
    /// The machine fingerprint it was measured on (named profiles have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// `cpu` or `cuda`: which compute device the rates are of.
    pub device: bench_core::Device,
    /// Where the numbers come from, in words.
    pub source: String,
    /// Capacities per tier, bytes: what the machine has (limits left unset fall back to them
    /// when planning for this machine by name).
    pub capacity: TierBytes,
    pub links: Links,
    pub compute: Compute,
    /// What the calibration measured, for the record (shape, threads, kernels).
    #[serde(default)]
    pub notes: Vec<String>,
}

const GB: f64 = 1073741824.0; // FlexLLMGen's GB is 2^30
const T: f64 = 1e12;

impl MachineProfile {
    /// The paper's machine (GCP, NVIDIA T4 16 GB, 208 GB DRAM, 1.5 TB SSD) with FlexLLMGen's
    /// fitted constants (experimental/cost_model.py), and the T4's data-sheet memory bandwidth
    /// (320 GB/s) for reading weights in decode, which FlexLLMGen's model has no term for.
    pub fn flexllmgen_t4() -> MachineProfile {
        MachineProfile {
            schema: PROFILE_SCHEMA,
            name: T4.into(),
            fingerprint: None,
            device: bench_core::Device::Cuda,
            source: "FlexLLMGen's fitted T4 constants (experimental/cost_model.py); weight reads \
                     at the T4's data-sheet 320 GB/s; 4-bit rates as fp16 (FlexLLMGen fitted none)"
                .into(),
            capacity: TierBytes {
                compute: (15.0 * GB) as u64,
                host: (204.0 * GB) as u64,
                disk: (1500.0 * GB) as u64,
            },
            links: Links {
                host_to_compute: 12.89 * GB,
                compute_to_host_cache: 0.97 * GB,
                compute_to_host_hidden: 4.82 * GB,
                disk_read: 0.473 * GB,
                disk_write_cache_prefill: 0.746 * GB,
                disk_write_hidden_prefill: 2.015 * GB,
                disk_write_decode: 2.015 * GB,
            },
            compute: Compute {
                mm_prefill_flops: 21.24 * T,
                mm_decode_flops: 4.3 * T,
                weight_read_bps: 320e9,
                q4_weight_read_bps: 320e9,
                bmm_prefill_flops: 9.97 * T,
                bmm_decode_flops: 0.079 * T,
                cpu_attention_flops: 0.0123 * T,
                q4_attention_factor: 1.0,
                cpu_attention_scaling: Some([0.0168, 0.0328, 0.0621]),
            },
            notes: Vec::new(),
        }
    }

    /// Checks that every rate is a positive finite number and the schema is this build's.
    pub fn validate(&self) -> Result<(), String> {
        if self.schema != PROFILE_SCHEMA {
            return Err(format!(
                "profile schema {} is not this build's {PROFILE_SCHEMA}: recalibrate (`flexbench-native calibrate`)",
                self.schema
            ));
        }
        let l = &self.links;
        let c = &self.compute;
        let rates = [
            ("links.host_to_compute", l.host_to_compute),
            ("links.compute_to_host_cache", l.compute_to_host_cache),
            ("links.compute_to_host_hidden", l.compute_to_host_hidden),
            ("links.disk_read", l.disk_read),
            ("links.disk_write_cache_prefill", l.disk_write_cache_prefill),
            (
                "links.disk_write_hidden_prefill",
                l.disk_write_hidden_prefill,
            ),
            ("links.disk_write_decode", l.disk_write_decode),
            ("compute.mm_prefill_flops", c.mm_prefill_flops),
            ("compute.mm_decode_flops", c.mm_decode_flops),
            ("compute.weight_read_bps", c.weight_read_bps),
            ("compute.q4_weight_read_bps", c.q4_weight_read_bps),
            ("compute.bmm_prefill_flops", c.bmm_prefill_flops),
            ("compute.bmm_decode_flops", c.bmm_decode_flops),
            ("compute.cpu_attention_flops", c.cpu_attention_flops),
            ("compute.q4_attention_factor", c.q4_attention_factor),
        ];
        for (name, v) in rates {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!(
                    "{name} is {v}: every rate must be a positive number"
                ));
            }
        }
        Ok(())
    }

    /// Reads a profile file; errors name the file, and for a parse error its line and column.
    pub fn from_file(path: &Path) -> Result<MachineProfile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading machine profile {}", path.display()))?;
        let p: MachineProfile = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}:{}: not a flexbench machine profile: {e}\n  fix: recalibrate with \
                 `flexbench-native calibrate`, or name a profile ({T4})",
                path.display(),
                e.line(),
                e.column()
            )
        })?;
        p.validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(p)
    }

    /// A named profile, or a profile file.
    pub fn named_or_file(name: &str) -> Result<MachineProfile> {
        if name == T4 {
            return Ok(MachineProfile::flexllmgen_t4());
        }
        let path = Path::new(name);
        if path.is_file() {
            return MachineProfile::from_file(path);
        }
        bail!("unknown machine `{name}`: name {T4}, or give a profile file (as `calibrate` writes)")
    }

    /// `name (fingerprint)` for records.
    pub fn describe(&self) -> String {
        match &self.fingerprint {
            Some(f) => format!("{} ({f})", self.name),
            None => self.name.clone(),
        }
    }
}

/// Writes a profile atomically (temporary file, rename).
pub fn write_profile(path: &Path, p: &MachineProfile) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(p)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_t4_profile_is_valid_and_files_round_trip() {
        let t4 = MachineProfile::flexllmgen_t4();
        assert!(t4.validate().is_ok());
        let dir =
            std::env::temp_dir().join(format!("flexbench-profile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.json");
        write_profile(&path, &t4).unwrap();
        assert_eq!(MachineProfile::from_file(&path).unwrap(), t4);
        assert_eq!(MachineProfile::named_or_file(T4).unwrap(), t4);
        // a foreign file, a corrupt one and a bad rate: errors naming the file (and line)
        std::fs::write(&path, "{\"schema\": 1,\n \"name\": 3}").unwrap();
        let e = format!("{:#}", MachineProfile::from_file(&path).unwrap_err());
        assert!(
            e.contains("p.json:2:") && e.contains("not a flexbench machine profile"),
            "{e}"
        );
        let mut bad = t4.clone();
        bad.links.disk_read = -1.0;
        write_profile(&path, &bad).unwrap();
        let e = format!("{:#}", MachineProfile::from_file(&path).unwrap_err());
        assert!(e.contains("links.disk_read is -1"), "{e}");
        let e = format!(
            "{:#}",
            MachineProfile::named_or_file("a100-dreams").unwrap_err()
        );
        assert!(e.contains("unknown machine"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
