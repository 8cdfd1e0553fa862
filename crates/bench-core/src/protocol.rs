//! The child protocol: how a case reaches a runner process and how raw measurements come back.
//!
//! The orchestrator writes the case as JSON to a file and names it in the environment variable
//! [`CASE_ENV`] (environment variables pass through launchers such as `deepspeed`, stdin does not).
//! The runner prints exactly one line `FLEXBENCH_RESULT {json}` holding a [`RawResult`]; everything
//! else it prints is the case's log. Runners report raw measurements only: every metric is computed
//! by [`crate::metrics`], the same way for every backend.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::case::Case;

/// Environment variable naming the case JSON file.
pub const CASE_ENV: &str = "FLEXBENCH_CASE";
/// Prefix of the one result line on stdout.
pub const RESULT_PREFIX: &str = "FLEXBENCH_RESULT ";
/// Exit code a runner uses when it ran out of memory (host or GPU) and could tell.
pub const EXIT_OOM: i32 = 3;
/// Exit code a runner uses when the case cannot run here (missing device, framework, feature).
pub const EXIT_UNAVAILABLE: i32 = 4;

/// Raw measurements of one case, as printed by a runner.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawResult {
    /// Wall time of every generation step, one list per repetition; step 0 is the prefill.
    pub step_times_s: Vec<Vec<f64>>,
    /// Tokens generated per repetition, summed over the batch.
    #[serde(default)]
    pub generated_tokens: u64,
    /// The generated token ids of the last repetition, one list per sequence (for cross-framework
    /// agreement). Optional: a runner may omit them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<Vec<u32>>>,
    /// Peak bytes per memory tier: `host_rss`, `gpu`, `pinned`, `disk`, ...
    #[serde(default)]
    pub peak_memory_bytes: BTreeMap<String, u64>,
    /// Bytes moved per link in one measured repetition (the mean over them): `disk_read`,
    /// `disk_write`, `host_to_compute`, `compute_to_host`.
    #[serde(default)]
    pub bytes_moved: BTreeMap<String, u64>,
    /// Seconds the compute stream waited for I/O, and seconds it computed (when the runner knows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_wait_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_s: Option<f64>,
    /// Framework and library versions the runner used.
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
    /// Free-form remarks the report shows beside the case (e.g. "cpu device map offloads nothing
    /// without a GPU").
    #[serde(default)]
    pub notes: Vec<String>,
    /// A cost model's figures for this case's policy and batch, when the runner has one (the
    /// native engine with a machine profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<crate::auto::Prediction>,
}

impl RawResult {
    /// The line a runner prints.
    pub fn to_line(&self) -> String {
        format!(
            "{RESULT_PREFIX}{}",
            serde_json::to_string(self).expect("raw results always serialize")
        )
    }
}

/// Finds the result line in a runner's stdout. `Ok(None)` when there is none.
pub fn find_result(stdout: &str) -> Result<Option<RawResult>> {
    let mut found = None;
    for line in stdout.lines() {
        if let Some(json) = line.trim_end().strip_prefix(RESULT_PREFIX) {
            if found.is_some() {
                bail!("runner printed more than one {} line", RESULT_PREFIX.trim());
            }
            found = Some(serde_json::from_str(json).context("malformed FLEXBENCH_RESULT line")?);
        }
    }
    Ok(found)
}

/// For runners: reads the case named by [`CASE_ENV`].
pub fn read_case_from_env() -> Result<Case> {
    let path = std::env::var(CASE_ENV).with_context(|| {
        format!("{CASE_ENV} is not set: runners are started by `cargo xtask bench`")
    })?;
    read_case(std::path::Path::new(&path))
}

/// Reads a case JSON file.
pub fn read_case(path: &std::path::Path) -> Result<Case> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading case file {}", path.display()))?;
    let case: Case = serde_json::from_str(&text)
        .with_context(|| format!("parsing case file {}", path.display()))?;
    case.validate()
        .map_err(|e| anyhow::anyhow!("case file {}: {e}", path.display()))?;
    Ok(case)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_round_trip() {
        let r = RawResult {
            step_times_s: vec![vec![0.5, 0.1, 0.1]],
            generated_tokens: 12,
            ..Default::default()
        };
        let out = format!("loading\n{}\nbye\n", r.to_line());
        assert_eq!(find_result(&out).unwrap(), Some(r));
        assert_eq!(find_result("nothing here").unwrap(), None);
        assert!(find_result("FLEXBENCH_RESULT {oops").is_err());
    }
}
