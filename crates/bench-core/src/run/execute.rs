//! One case from start to record: pick its backend, check it can run here, write the case file,
//! prepare, start the runner under the [`supervise`](super::supervise) supervisor with its output
//! going to `logs/<id>.log`, classify how it ended, and clean its work directory.
//!
//! Whatever goes wrong with the case itself (no backend, a failed prepare, a runner that cannot
//! start) becomes its record; an `Err` means the run itself cannot go on (an unwritable results
//! directory).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::classify::{classify, mentions_oom, signal_name, ProcessEnd};
use super::environment::Probes;
use super::supervise::{supervise, CannotStart, Stream};
use super::{interrupt, RunOptions, DEFAULT_TIMEOUT};
use crate::backend::{backend_for, Backend, RunContext};
use crate::case::Case;
use crate::protocol;
use crate::record::{time, IdentifiedCase, Outcome, Record, SCHEMA};

/// Lines of stderr kept for a failure's detail.
const STDERR_TAIL_LINES: usize = 15;
/// Characters of each kept stderr line.
const STDERR_LINE_CHARS: usize = 400;

/// What every case of one run shares.
pub struct CaseRunner<'a> {
    pub backends: &'a [Box<dyn Backend>],
    /// Each needed backend's probe, run once per run (per node under a scheduler).
    pub probes: &'a Probes,
    /// The suite's results directory (`cases/`, `logs/`, `work/` below it).
    pub dir: &'a Path,
    pub opts: &'a RunOptions,
    pub env_id: &'a str,
}

/// The timeout a case runs under: `--timeout`, else its own, else the default.
pub fn timeout(opts: &RunOptions, case: &Case) -> Duration {
    opts.timeout_override
        .or(case.timeout_s.map(Duration::from_secs))
        .unwrap_or(DEFAULT_TIMEOUT)
}

/// The case as its record carries it: with the timeout it runs under.
pub fn as_run(opts: &RunOptions, case: &Case) -> Case {
    let mut case = case.clone();
    case.timeout_s = Some(timeout(opts, &case).as_secs().max(1));
    case
}

/// A record without measurements, for a case that ended before or outside its runner (no
/// backend, unavailable, stopped by a scheduler): `case` as [`as_run`] gives it.
pub fn bare_record(
    case: &Case,
    outcome: Outcome,
    detail: String,
    started_at: SystemTime,
    env_id: &str,
) -> Record {
    Record {
        schema: SCHEMA,
        case: IdentifiedCase::new(case.clone()),
        outcome,
        detail,
        metrics: None,
        raw: None,
        exit_code: None,
        signal: None,
        started_at: time::rfc3339(started_at),
        finished_at: time::rfc3339(SystemTime::now()),
        duration_s: started_at.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0),
        log: None,
        env_id: env_id.to_string(),
        job: None,
    }
}

impl CaseRunner<'_> {
    /// Runs one case; `Ok(None)` when interrupted (nothing is recorded for it).
    pub fn run(&self, case: &Case) -> Result<Option<Record>> {
        let case = as_run(self.opts, case);
        let timeout = timeout(self.opts, &case);
        let id = case.id();
        let started_at = SystemTime::now();
        let record = |outcome: Outcome, detail: String| {
            bare_record(&case, outcome, detail, started_at, self.env_id)
        };

        let Some(backend) = backend_for(self.backends, &case.framework) else {
            let names: Vec<&str> = self.backends.iter().map(|b| b.name()).collect();
            return Ok(Some(record(
                Outcome::Unavailable,
                format!(
                    "no backend serves framework `{}` (registered: {})",
                    case.framework,
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            )));
        };
        if let Some(Err(why)) = self.probes.get(backend.name()) {
            return Ok(Some(record(
                Outcome::Unavailable,
                format!("backend {} is not available: {why}", backend.name()),
            )));
        }
        let case_file = self.dir.join("cases").join(format!("{id}.json"));
        let work_dir = self.opts.work_root(self.dir).join(&id);
        let log_rel = format!("logs/{id}.log");
        let ctx = RunContext {
            project_root: self.opts.project_root.clone(),
            case_file: case_file.clone(),
            work_dir: work_dir.clone(),
            cache_dir: self.opts.cache_dir.clone(),
            bin_dir: self.opts.bin_dir.clone(),
            python: self.opts.python.clone(),
        };
        if let Err(why) = backend.check_case(&case, &ctx) {
            return Ok(Some(record(Outcome::Unavailable, why)));
        }
        // The child reads a plain Case (no id), the protocol's format.
        let json = serde_json::to_string_pretty(&case).expect("a case always serializes");
        std::fs::write(&case_file, json)
            .with_context(|| format!("writing {}", case_file.display()))?;
        if work_dir.exists() {
            std::fs::remove_dir_all(&work_dir).with_context(|| {
                format!("clearing a stale work directory {}", work_dir.display())
            })?;
        }
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;

        let result = (|| -> Result<Option<Record>> {
            if let Err(e) = backend.prepare(&case, &ctx) {
                return Ok(Some(record(
                    Outcome::Error,
                    format!("preparing the case failed: {e:#}"),
                )));
            }
            let mut cmd = match backend.command(&case, &ctx) {
                Ok(c) => c,
                Err(e) => {
                    return Ok(Some(record(
                        Outcome::Error,
                        format!("building the command failed: {e:#}"),
                    )))
                }
            };
            cmd.env(protocol::CASE_ENV, &case_file);
            let log_path = self.dir.join(&log_rel);
            let Some(end) = run_logged(&mut cmd, &log_path, timeout)? else {
                return Ok(None);
            };
            let (outcome, detail, metrics, raw) = classify(&case, &end, timeout);
            let mut r = record(outcome, detail);
            r.metrics = metrics;
            r.raw = raw;
            r.exit_code = end.exit_code;
            r.signal = end.signal.map(signal_name);
            r.log = Some(log_rel.clone());
            Ok(Some(r))
        })();
        if let Err(e) = std::fs::remove_dir_all(&work_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: could not remove {}: {e}", work_dir.display());
            }
        }
        result
    }
}

/// Runs a runner with its output copied into `log_path`, keeping only what classification needs:
/// the result lines, the stderr tail and whether stderr spoke of running out of memory.
/// `Ok(None)` when interrupted (the group is already killed).
fn run_logged(
    cmd: &mut Command,
    log_path: &PathBuf,
    timeout: Duration,
) -> Result<Option<ProcessEnd>> {
    let mut log =
        File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    writeln!(log, "== flexbench: {:?}", cmd)
        .with_context(|| format!("writing {}", log_path.display()))?;
    let mut result_lines = String::new();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut stderr_oom = false;
    let ended = supervise(cmd, timeout, &interrupt::interrupted, |piece| {
        let _ = log.write_all(&piece.bytes);
        if !piece.bytes.ends_with(b"\n") {
            let _ = log.write_all(b"\n");
        }
        let line = piece.text();
        match piece.stream {
            Stream::Stdout => {
                if line.starts_with(protocol::RESULT_PREFIX) {
                    result_lines.push_str(&line);
                    result_lines.push('\n');
                }
            }
            Stream::Stderr => {
                stderr_oom |= mentions_oom(&line);
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.chars().take(STDERR_LINE_CHARS).collect());
            }
        }
    });
    let ended = match ended {
        Ok(e) => e,
        Err(e) if e.is::<CannotStart>() => {
            // Not a run-level error: the record says the runner could not be started.
            let msg = e.to_string();
            let _ = writeln!(log, "== {msg}");
            return Ok(Some(ProcessEnd {
                exit_code: Some(127),
                stderr_tail: msg,
                ..Default::default()
            }));
        }
        Err(e) => return Err(e),
    };
    if ended.interrupted {
        return Ok(None);
    }
    if !ended.drained {
        // A process that left the group still holds the pipes; keep what we have and move on.
        tail.push_back("output pipes still held by a process that left the group".into());
    }
    let stderr_tail = Vec::from(tail).join("\n");
    Ok(Some(ProcessEnd {
        exit_code: ended.status.and_then(|s| s.code()),
        signal: ended
            .status
            .and_then(|s| s.signal())
            .or(ended.timed_out.then_some(libc::SIGKILL)),
        timed_out: ended.timed_out,
        oom_killed: ended.oom_killed,
        stderr_oom,
        stderr_tail,
        result_lines,
    }))
}

/// Runs one case through `backend` the way the orchestrator does (case file, prepare, command,
/// the supervisor with its timeout) and keeps its whole output instead of a record: for the
/// backends' own tests and ad-hoc runs of one runner.
pub fn run_alone(
    backend: &dyn Backend,
    case: &Case,
    ctx: &RunContext,
    timeout: Duration,
) -> Result<super::supervise::Captured> {
    std::fs::create_dir_all(&ctx.work_dir)
        .with_context(|| format!("creating {}", ctx.work_dir.display()))?;
    std::fs::write(&ctx.case_file, serde_json::to_vec(case)?)
        .with_context(|| format!("writing {}", ctx.case_file.display()))?;
    backend.prepare(case, ctx)?;
    let mut cmd = backend.command(case, ctx)?;
    cmd.env(protocol::CASE_ENV, &ctx.case_file);
    super::supervise::capture(cmd, timeout)
}
