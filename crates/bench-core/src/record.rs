//! The result record: one JSON line per case run in `<out>/<suite>/results.jsonl`.
//!
//! Versioned by [`SCHEMA`]; a reader refuses records of a newer schema rather than misread them.

use std::fmt;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::case::Case;
use crate::metrics::Metrics;
use crate::protocol::RawResult;

/// Version of the record layout; bump it when a field changes meaning or goes away.
pub const SCHEMA: u32 = 1;

/// How a case ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exit 0 with a valid result line; metrics computed.
    Ok,
    /// Out of memory, host or GPU (exit 3, an out-of-memory message, or the kernel's OOM killer).
    Oom,
    /// Still running at the timeout; its process group was killed.
    Timeout,
    /// Killed by a signal (detail names it).
    Crashed,
    /// Any other failure: non-zero exit, missing or malformed result line (detail says which).
    Error,
    /// Not run on purpose.
    Skipped,
    /// Cannot run here: no backend, backend not available, or the runner said so (exit 4).
    Unavailable,
    /// A batch scheduler's task was cancelled (`scancel`, or Ctrl-C on `bench --wait`) before the
    /// case ended; its process group was killed.
    Cancelled,
    /// The scheduler preempted the task for a job of higher priority.
    Preempted,
    /// The node running the task failed.
    NodeFail,
    /// The scheduler's task ended without leaving a record, for no reason the scheduler gave
    /// (the task was killed with SIGKILL, its binary was missing on the node, ...).
    Lost,
}

impl Outcome {
    pub const ALL: [Outcome; 11] = [
        Outcome::Ok,
        Outcome::Oom,
        Outcome::Timeout,
        Outcome::Crashed,
        Outcome::Error,
        Outcome::Skipped,
        Outcome::Unavailable,
        Outcome::Cancelled,
        Outcome::Preempted,
        Outcome::NodeFail,
        Outcome::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Oom => "oom",
            Outcome::Timeout => "timeout",
            Outcome::Crashed => "crashed",
            Outcome::Error => "error",
            Outcome::Skipped => "skipped",
            Outcome::Unavailable => "unavailable",
            Outcome::Cancelled => "cancelled",
            Outcome::Preempted => "preempted",
            Outcome::NodeFail => "node_fail",
            Outcome::Lost => "lost",
        }
    }

    /// Outcomes that make `bench` exit non-zero and that `--rerun-failed` reruns: the case could
    /// run here and has no result. A case the scheduler cancelled, preempted or lost counts: like
    /// a crash, it is a case someone has to run again; `unavailable` and `skipped` do not.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Outcome::Oom
                | Outcome::Timeout
                | Outcome::Crashed
                | Outcome::Error
                | Outcome::Cancelled
                | Outcome::Preempted
                | Outcome::NodeFail
                | Outcome::Lost
        )
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A case with its id: the object `--dry-run --json` prints and every record carries. In JSON it
/// is the [`Case`]'s fields plus `id`.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentifiedCase {
    pub id: String,
    pub case: Case,
}

impl IdentifiedCase {
    pub fn new(case: Case) -> IdentifiedCase {
        IdentifiedCase {
            id: case.id(),
            case,
        }
    }

    /// The JSON object: `id` first, then the case's fields.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        map.insert("id".into(), serde_json::Value::String(self.id.clone()));
        if let serde_json::Value::Object(fields) =
            serde_json::to_value(&self.case).expect("a case always serializes")
        {
            map.extend(fields);
        }
        serde_json::Value::Object(map)
    }
}

impl Serialize for IdentifiedCase {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for IdentifiedCase {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut v = serde_json::Value::deserialize(d)?;
        let id = v
            .as_object_mut()
            .and_then(|m| m.remove("id"))
            .and_then(|id| id.as_str().map(String::from))
            .ok_or_else(|| serde::de::Error::custom("case object without a string `id`"))?;
        let case = Case::deserialize(v).map_err(serde::de::Error::custom)?;
        Ok(IdentifiedCase { id, case })
    }
}

/// One line of results.jsonl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub schema: u32,
    pub case: IdentifiedCase,
    pub outcome: Outcome,
    /// Why, in words: the reason for unavailable, the signal, the exit code and stderr tail, ...
    #[serde(default)]
    pub detail: String,
    /// Present for `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// The runner's raw result when it printed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawResult>,
    /// The child's exit code, or the signal that ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// UTC, RFC 3339.
    pub started_at: String,
    pub finished_at: String,
    pub duration_s: f64,
    /// The case's output, relative to the suite's results directory (`logs/<id>.log`); later runs
    /// of the same case overwrite it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// Names the environment file `<env_id>.json` beside results.jsonl.
    pub env_id: String,
    /// Why the case's log is incomplete (e.g. the disk filled up while it was written); absent
    /// when the log holds everything the runner printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_error: Option<String>,
    /// Set when a batch scheduler ran the case as one task of a job (`--executor slurm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobTask>,
}

/// Which task of which scheduler job ran a case, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTask {
    /// `slurm`.
    pub scheduler: String,
    /// The array job's id (Slurm's `SLURM_ARRAY_JOB_ID`).
    pub job_id: String,
    /// The task's index in the array.
    pub array_index: u32,
    /// How often the scheduler had restarted the task (requeued after preemption or a node
    /// failure) when it ran the case.
    #[serde(default)]
    pub restarts: u32,
    /// The node the task ran on, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The scheduler's state of the task when it ended (`COMPLETED`, `CANCELLED`, `TIMEOUT`, ...),
    /// when the scheduler still knew it at the time the record was merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Who wrote the record: the task itself (`task`), or the orchestrator from the scheduler's
    /// account of a task that ended without one (`scheduler`).
    pub written_by: WrittenBy,
    /// The scheduler stopped the task (SIGTERM) while its case ran; the outcome is the
    /// scheduler's ending (cancelled, timeout, preempted), not the runner's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped_by_scheduler: bool,
}

/// The author of a scheduled case's record; with the job id, array index and restart count it
/// identifies a record, so merging one twice is recognized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WrittenBy {
    Task,
    Scheduler,
}

impl Record {
    /// Parses one line, refusing records newer than this build understands.
    pub fn from_line(line: &str) -> Result<Record> {
        let v: serde_json::Value = serde_json::from_str(line).context("not JSON")?;
        let schema = v
            .get("schema")
            .and_then(|s| s.as_u64())
            .context("no `schema` number")?;
        if schema > SCHEMA as u64 {
            bail!("record schema {schema} is newer than this build's {SCHEMA}; update flexbench");
        }
        serde_json::from_value(v).context("not a flexbench record")
    }

    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("records always serialize")
    }
}

/// UTC time helpers without a date crate: RFC 3339 text and a file-name-safe stamp.
pub mod time {
    use std::time::{SystemTime, UNIX_EPOCH};

    /// `2026-11-28T01:27:42.123Z`
    pub fn rfc3339(t: SystemTime) -> String {
        let (y, mo, d, h, mi, s, ms) = parts(t);
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
    }

    /// `20261128T012742.123Z`: sortable, safe in file names, distinct for runs started within the same second.
    pub fn stamp(t: SystemTime) -> String {
        let (y, mo, d, h, mi, s, ms) = parts(t);
        format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}.{ms:03}Z")
    }

    fn parts(t: SystemTime) -> (i64, u32, u32, u32, u32, u32, u32) {
        let dur = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = dur.as_secs() as i64;
        let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
        let (y, m, d) = civil_from_days(days);
        (
            y,
            m,
            d,
            (rem / 3600) as u32,
            (rem % 3600 / 60) as u32,
            (rem % 60) as u32,
            dur.subsec_millis(),
        )
    }

    /// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
    fn civil_from_days(z: i64) -> (i64, u32, u32) {
        let z = z + 719468;
        let era = z.div_euclid(146097);
        let doe = z.rem_euclid(146097);
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        (if m <= 2 { y + 1 } else { y }, m, d)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::time::Duration;

        #[test]
        fn known_dates() {
            let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // 2024-02-29 12:34:56.789
            assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789Z");
            assert_eq!(stamp(UNIX_EPOCH), "19700101T000000.000Z");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::Placement;

    #[test]
    fn record_round_trip_and_case_object() {
        let case = Case {
            prompt_len: 8,
            gen_len: 4,
            gpu_batch_size: 2,
            placement: Placement::Disk,
            timeout_s: Some(10),
            ..Case::example("example")
        };
        let r = Record {
            schema: SCHEMA,
            case: IdentifiedCase::new(case.clone()),
            outcome: Outcome::Unavailable,
            detail: "no disk tier yet".into(),
            metrics: None,
            raw: None,
            exit_code: Some(4),
            signal: None,
            started_at: "2026-01-01T00:00:00.000Z".into(),
            finished_at: "2026-01-01T00:00:01.000Z".into(),
            duration_s: 1.0,
            log: Some("logs/x.log".into()),
            env_id: "env-x".into(),
            log_error: None,
            job: None,
        };
        let line = r.to_line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["case"]["id"], case.id());
        assert_eq!(v["case"]["prompt_len"], 8);
        assert_eq!(v["case"]["placement"], "disk");
        assert_eq!(v["outcome"], "unavailable");
        assert_eq!(Record::from_line(&line).unwrap(), r);
        let newer = line.replacen("\"schema\":1", "\"schema\":99", 1);
        assert!(Record::from_line(&newer)
            .unwrap_err()
            .to_string()
            .contains("newer"));
    }

    #[test]
    fn records_written_before_job_fields_existed_still_read() {
        // A line as flexbench wrote it before scheduler runs (no `job`), verbatim.
        let old = r#"{"schema":1,"case":{"id":"76f119e6e4b93dc5","model":"opt-125m","framework":"engine","prompt_len":128,"gen_len":32,"cut_gen_len":null,"gpu_batch_size":4,"num_gpu_batches":1,"placement":"gpu","device":"cpu","weights":"dummy","num_nodes":1,"num_gpus_per_node":1,"warmup":1,"repetitions":1,"timeout_s":120},"outcome":"timeout","detail":"still running after 120s","started_at":"2026-12-01T21:24:50.700Z","finished_at":"2026-12-01T21:26:50.700Z","duration_s":120.0,"env_id":"env-20261201T212450.681Z"}"#;
        let r = Record::from_line(old).unwrap();
        assert_eq!(r.outcome, Outcome::Timeout);
        assert_eq!(r.job, None);
        // A scheduled record keeps its task through a round trip; every outcome has its name.
        let mut r = r;
        r.outcome = Outcome::NodeFail;
        r.job = Some(JobTask {
            scheduler: "slurm".into(),
            job_id: "12".into(),
            array_index: 3,
            restarts: 1,
            node: Some("n07".into()),
            state: Some("NODE_FAIL".into()),
            written_by: WrittenBy::Scheduler,
            stopped_by_scheduler: false,
        });
        let line = r.to_line();
        assert!(line.contains(r#""outcome":"node_fail""#), "{line}");
        assert!(line.contains(r#""written_by":"scheduler""#), "{line}");
        assert_eq!(Record::from_line(&line).unwrap(), r);
        for o in Outcome::ALL {
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(json, format!("\"{}\"", o.as_str()));
        }
    }
}
