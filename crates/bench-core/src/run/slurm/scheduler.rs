//! Talking to Slurm through its commands (sbatch, scontrol, scancel, sinfo, and sacct where the
//! cluster keeps accounting), and reading their answers.
//!
//! The state of a job array comes from `scontrol -o show job <id>`: one line per task record,
//! pending tasks still folded into one record whose `ArrayTaskId` is a range. Slurm keeps an
//! ended task there for `MinJobAge` seconds (300 by default); after that only accounting (sacct,
//! with slurmdbd) knows how it ended, and without accounting the task's own record is all there is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::record::Outcome;

/// One array task as Slurm reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskInfo {
    pub index: u32,
    /// `PENDING`, `RUNNING`, `COMPLETING`, `COMPLETED`, `CANCELLED`, `TIMEOUT`, ...
    pub state: String,
    /// Why it is pending (`Priority`, `JobArrayTaskLimit`, `JobHeldUser`, ...), when Slurm says.
    pub reason: Option<String>,
    pub node: Option<String>,
    /// `exit:signal` of the batch script, as Slurm writes it.
    pub exit_code: Option<String>,
    pub restarts: u32,
}

/// States after which Slurm will not run the task again by itself.
const FINAL_STATES: [&str; 10] = [
    "COMPLETED",
    "CANCELLED",
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
    "REVOKED",
];

impl TaskInfo {
    /// Still queued, running or being cleaned up: its record may yet come.
    pub fn active(&self) -> bool {
        !FINAL_STATES.contains(&self.state.as_str())
    }

    /// The outcome this ending gives a case by itself, when it is one of the scheduler's own
    /// (a task that completed or failed says nothing about its case: its record does).
    pub fn scheduler_outcome(&self) -> Option<Outcome> {
        match self.state.as_str() {
            "CANCELLED" => Some(Outcome::Cancelled),
            "TIMEOUT" | "DEADLINE" => Some(Outcome::Timeout),
            "NODE_FAIL" | "BOOT_FAIL" => Some(Outcome::NodeFail),
            "PREEMPTED" => Some(Outcome::Preempted),
            "OUT_OF_MEMORY" => Some(Outcome::Oom),
            _ => None,
        }
    }
}

/// What Slurm knows of one array job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobView {
    /// Its task records by array index.
    Known(BTreeMap<u32, TaskInfo>),
    /// Slurm has no record of the job any more (it ended more than `MinJobAge` ago).
    Forgotten,
}

/// A partition as `scontrol show partition` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub default: bool,
}

/// Slurm's client commands on this machine's PATH.
#[derive(Debug, Clone, Default)]
pub struct Cli {
    accounting: std::cell::OnceCell<bool>,
}

/// The commands a submission needs, checked before anything is submitted.
pub const COMMANDS: [&str; 3] = ["sbatch", "scontrol", "scancel"];

/// The program `name` on PATH, like the shell finds it.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs a Slurm command; `Ok((success, stdout, stderr))`, `Err` only when it cannot start.
fn run(cmd: &mut Command) -> Result<(bool, String, String)> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?} (is Slurm installed here?)", cmd))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

/// Runs a Slurm command that must succeed; its stdout.
fn checked(cmd: &mut Command, what: &str) -> Result<String> {
    let shown = format!("{cmd:?}");
    let (ok, stdout, stderr) = run(cmd)?;
    if !ok {
        bail!("{what} failed ({shown}): {stderr}");
    }
    Ok(stdout)
}

impl Cli {
    /// The partitions, or an error saying the controller does not answer.
    pub fn partitions(&self) -> Result<Vec<Partition>> {
        let out = checked(
            Command::new("scontrol").args(["-o", "show", "partition"]),
            "asking Slurm's controller for its partitions (is slurmctld running and SLURM_CONF right?)",
        )?;
        Ok(parse_partitions(&out))
    }

    /// Submits a job script; the job id.
    pub fn sbatch(&self, args: &[String], script: &Path) -> Result<String> {
        let out = checked(
            Command::new("sbatch").args(args).arg(script),
            "submitting the job array",
        )?;
        // `--parsable` prints `<id>` or `<id>;<cluster>`.
        let id = out
            .trim()
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            bail!("sbatch printed no job id: {out:?}");
        }
        Ok(id)
    }

    /// Asks sbatch whether it would take the job (`--test-only`: checked as a real submission
    /// is, nothing submitted). A held job would not do: Slurm defers some checks (memory no node
    /// has) until release, and the job then pends forever.
    pub fn sbatch_would_take(&self, args: &[String], script: &Path) -> Result<()> {
        checked(
            Command::new("sbatch")
                .arg("--test-only")
                .args(args)
                .arg(script),
            "checking the job array with sbatch --test-only",
        )
        .map(drop)
    }

    /// Cancels jobs (or `<job>_<index>` tasks).
    pub fn cancel(&self, ids: &[String]) -> Result<()> {
        checked(Command::new("scancel").args(ids), "cancelling with scancel").map(drop)
    }

    /// What the controller knows of array job `job_id`.
    pub fn job(&self, job_id: &str) -> Result<JobView> {
        let (ok, out, err) = run(Command::new("scontrol").args(["-o", "show", "job", job_id]))?;
        if !ok {
            if err.contains("Invalid job id") {
                return Ok(JobView::Forgotten);
            }
            bail!("asking Slurm about job {job_id} (scontrol -o show job {job_id}): {err}");
        }
        Ok(JobView::Known(parse_job(&out)))
    }

    /// How the tasks of `job_id` ended, from accounting; `None` where the cluster keeps none.
    pub fn accounting(&self, job_id: &str) -> Result<Option<BTreeMap<u32, TaskInfo>>> {
        let enabled = *self.accounting.get_or_init(|| {
            which("sacct").is_some()
                && run(Command::new("scontrol").args(["show", "config"]))
                    .map(|(ok, out, _)| ok && accounting_enabled(&out))
                    .unwrap_or(false)
        });
        if !enabled {
            return Ok(None);
        }
        let out = checked(
            Command::new("sacct").args([
                "-n",
                "-P",
                "-X",
                "-j",
                job_id,
                "-o",
                "JobID,State,ExitCode,NodeList",
            ]),
            "asking Slurm's accounting how the tasks ended",
        )?;
        Ok(Some(parse_sacct(&out)))
    }
}

/// Whether `scontrol show config` names an accounting storage.
fn accounting_enabled(config: &str) -> bool {
    config.lines().any(|l| {
        let mut kv = l.splitn(2, '=');
        kv.next().map(str::trim) == Some("AccountingStorageType")
            && kv
                .next()
                .is_some_and(|v| !v.trim().is_empty() && v.trim() != "accounting_storage/none")
    })
}

/// The `Key=Value` fields of one `scontrol -o` line. Values never hold spaces in the fields we
/// read; a word without `=` (part of a free-text value) is skipped.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

fn parse_partitions(out: &str) -> Vec<Partition> {
    out.lines()
        .filter_map(|l| {
            let f = fields(l);
            Some(Partition {
                name: f.get("PartitionName")?.to_string(),
                default: f.get("Default") == Some(&"YES"),
            })
        })
        .collect()
}

fn known(v: Option<&&str>) -> Option<String> {
    v.filter(|s| !s.is_empty() && !matches!(**s, "(null)" | "None" | "Unknown"))
        .map(|s| s.to_string())
}

/// The task records of `scontrol -o show job <array id>`, pending ranges expanded.
fn parse_job(out: &str) -> BTreeMap<u32, TaskInfo> {
    let mut tasks = BTreeMap::new();
    for line in out.lines() {
        let f = fields(line);
        let (Some(ids), Some(state)) = (f.get("ArrayTaskId"), f.get("JobState")) else {
            continue;
        };
        for index in expand_indices(ids) {
            tasks.insert(
                index,
                TaskInfo {
                    index,
                    state: state.to_string(),
                    reason: known(f.get("Reason")),
                    node: known(f.get("BatchHost")).or_else(|| known(f.get("NodeList"))),
                    exit_code: known(f.get("ExitCode")),
                    restarts: f.get("Restarts").and_then(|r| r.parse().ok()).unwrap_or(0),
                },
            );
        }
    }
    tasks
}

/// `3`, `0-7%2`, `1,4-6`, `0-9:3` to the indices they name.
fn expand_indices(spec: &str) -> Vec<u32> {
    let spec = spec.split('%').next().unwrap_or("");
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (range, step) = match part.split_once(':') {
            Some((r, s)) => (r, s.parse::<u32>().unwrap_or(1).max(1)),
            None => (part, 1),
        };
        match range.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    out.extend((a..=b).step_by(step as usize));
                }
            }
            None => out.extend(range.parse::<u32>().ok()),
        }
    }
    out
}

/// `sacct -n -P -X -o JobID,State,ExitCode,NodeList` lines (`12_3|CANCELLED by 0|0:15|n07`).
fn parse_sacct(out: &str) -> BTreeMap<u32, TaskInfo> {
    let mut tasks = BTreeMap::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split('|').collect();
        let [job, state, exit, nodes, ..] = cols.as_slice() else {
            continue;
        };
        let Some((_, ids)) = job.split_once('_') else {
            continue;
        };
        // Pending tasks are listed as `12_[3-5]`.
        let ids = ids.trim_start_matches('[').trim_end_matches(']');
        let state = state.split_whitespace().next().unwrap_or("").to_string();
        for index in expand_indices(ids) {
            tasks.insert(
                index,
                TaskInfo {
                    index,
                    state: state.clone(),
                    reason: None,
                    node: known(Some(nodes)),
                    exit_code: known(Some(exit)),
                    restarts: 0,
                },
            );
        }
    }
    tasks
}

/// The cause slurmstepd wrote into a task's output when it stopped the task
/// (`*** JOB 12 ON n07 CANCELLED AT <time> DUE TO TIME LIMIT ***`): for a task whose ending Slurm
/// has forgotten. The last such line counts (a requeued task appends).
pub fn stop_cause_in_output(text: &str) -> Option<Outcome> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("*** JOB ") && l.contains(" CANCELLED AT "))?;
    Some(if line.contains("DUE TO TIME LIMIT") {
        Outcome::Timeout
    } else if line.contains("DUE TO PREEMPTION") {
        Outcome::Preempted
    } else if line.contains("DUE TO NODE FAILURE") {
        Outcome::NodeFail
    } else {
        Outcome::Cancelled
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as Slurm 22.05's `scontrol -o show job` printed them on the local test cluster
    // (shortened to the fields read, plus neighbours that look alike).
    const SHOW_JOB: &str = "\
JobId=2 ArrayJobId=1 ArrayTaskId=0 ArrayTaskThrottle=2 JobName=j.sh JobState=COMPLETED Reason=None Requeue=1 Restarts=0 ExitCode=0:0 ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm
JobId=3 ArrayJobId=1 ArrayTaskId=1 ArrayTaskThrottle=2 JobName=j.sh JobState=RUNNING Reason=None Restarts=1 ExitCode=0:0 NodeList=vm BatchHost=vm
JobId=1 ArrayJobId=1 ArrayTaskId=2-3%2 ArrayTaskThrottle=2 JobName=j.sh JobState=PENDING Reason=JobArrayTaskLimit Restarts=0 ExitCode=0:0 NodeList= BatchHost=(null)
";

    #[test]
    fn reads_scontrol_job_lines_with_pending_ranges() {
        let tasks = parse_job(SHOW_JOB);
        assert_eq!(tasks.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(tasks[&0].state, "COMPLETED");
        assert!(!tasks[&0].active());
        assert_eq!(tasks[&0].node.as_deref(), Some("vm"));
        assert_eq!(tasks[&1].restarts, 1);
        assert!(tasks[&1].active());
        assert_eq!(tasks[&3].state, "PENDING");
        assert_eq!(tasks[&3].reason.as_deref(), Some("JobArrayTaskLimit"));
        assert_eq!(tasks[&3].node, None);
        assert_eq!(expand_indices("1,4-6"), [1, 4, 5, 6]);
        assert_eq!(expand_indices("0-9:3%1"), [0, 3, 6, 9]);
        assert_eq!(expand_indices("7"), [7]);
    }

    #[test]
    fn reads_sacct_lines_and_partitions_and_config() {
        let tasks = parse_sacct("12_0|COMPLETED|0:0|n01\n12_1|CANCELLED by 0|0:15|n02\n12_[2-3]|PENDING|0:0|None assigned\n");
        assert_eq!(tasks[&1].state, "CANCELLED");
        assert_eq!(tasks[&1].scheduler_outcome(), Some(Outcome::Cancelled));
        assert_eq!(tasks[&0].scheduler_outcome(), None);
        assert_eq!(tasks[&3].state, "PENDING");
        let parts = parse_partitions(
            "PartitionName=debug AllowGroups=ALL Default=YES MaxTime=UNLIMITED\nPartitionName=gpu Default=NO\n",
        );
        assert_eq!(
            parts,
            [
                Partition {
                    name: "debug".into(),
                    default: true
                },
                Partition {
                    name: "gpu".into(),
                    default: false
                }
            ]
        );
        assert!(!accounting_enabled(
            "AccountingStorageType   = accounting_storage/none\n"
        ));
        assert!(accounting_enabled(
            "AccountingStorageType   = accounting_storage/slurmdbd\n"
        ));
    }

    #[test]
    fn reads_why_slurmstepd_stopped_a_task() {
        let out = |cause: &str| {
            format!("starting\nslurmstepd-vm: error: *** JOB 7 ON vm CANCELLED AT 2026-12-01T21:26:54{cause} ***\n")
        };
        assert_eq!(
            stop_cause_in_output(&out(" DUE TO TIME LIMIT")),
            Some(Outcome::Timeout)
        );
        assert_eq!(
            stop_cause_in_output(&out(" DUE TO PREEMPTION")),
            Some(Outcome::Preempted)
        );
        assert_eq!(stop_cause_in_output(&out("")), Some(Outcome::Cancelled));
        assert_eq!(stop_cause_in_output("just output\n"), None);
    }
}
