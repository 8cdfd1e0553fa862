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
use crate::case::{AdaptiveRepetitions, Case};
use crate::metrics::{self, Metrics};
use crate::protocol::{self, RawResult};
use crate::record::{time, IdentifiedCase, Outcome, Record, SCHEMA};

/// Lines of stderr kept for a failure's detail.
const STDERR_TAIL_LINES: usize = 15;
/// Characters of each kept stderr line.
const STDERR_LINE_CHARS: usize = 400;
/// Result-line bytes kept in memory; a runner prints one line of a few KiB.
const MAX_RESULT_BYTES: usize = 64 << 20;

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
        log_error: None,
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
        // `auto` is chosen here, before anything is written: the record carries what was chosen
        // (and predicted) under the id of what the suite asked for.
        let case = match backend.resolve(&case, &ctx) {
            Ok(c) => c,
            Err(why) => return Ok(Some(record(Outcome::Error, why))),
        };
        let record = |outcome: Outcome, detail: String| {
            bare_record(&case, outcome, detail, started_at, self.env_id)
        };
        if let Err(why) = crate::backend::check_disk_needs(&backend.disk_needs(&case, &ctx)) {
            return Ok(Some(record(Outcome::Unavailable, why)));
        }
        // The child reads a plain Case (no id), the protocol's format, written before each
        // runner process (with that process's repetition count).
        // A runner of this case may outlive an orchestrator killed outright (kill -9 lands
        // between the fork and the death signal's arming); it must not share the work dir.
        let stale = super::supervise::end_processes_with_env(
            protocol::CASE_ENV,
            &case_file.to_string_lossy(),
        );
        if !stale.is_empty() {
            eprintln!(
                "warning: ended {} runner process(es) of case {id} left by an earlier run: {stale:?}",
                stale.len()
            );
        }
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
            let log_path = self.dir.join(&log_rel);
            // One runner process, or with adaptive repetitions as many as the interval needs,
            // each running `batch` repetitions; their raw results are merged.
            let mut merged: Option<RawResult> = None;
            let mut batch = case.repetitions;
            loop {
                let this = Case {
                    repetitions: batch,
                    ..case.clone()
                };
                let json = serde_json::to_string_pretty(&this).expect("a case always serializes");
                std::fs::write(&case_file, json)
                    .with_context(|| format!("writing {}", case_file.display()))?;
                let mut cmd = match backend.command(&this, &ctx) {
                    Ok(c) => c,
                    Err(e) => {
                        return Ok(Some(record(
                            Outcome::Error,
                            format!("building the command failed: {e:#}"),
                        )))
                    }
                };
                cmd.env(protocol::CASE_ENV, &case_file);
                let append = merged.is_some();
                let Some((end, log_error)) = run_logged(&mut cmd, &log_path, timeout, append)?
                else {
                    return Ok(None);
                };
                let (outcome, detail, metrics, raw) = classify(&this, &end, timeout);
                let mut r = record(outcome, detail);
                r.exit_code = end.exit_code;
                r.signal = end.signal.map(signal_name);
                r.log = Some(log_rel.clone());
                r.log_error = log_error;
                let (Some(auto), Some(raw), Outcome::Ok) =
                    (case.adaptive_repetitions, raw.clone(), outcome)
                else {
                    // A fixed count, or a process that failed: its record is the case's, with
                    // what earlier processes measured kept in `raw`.
                    r.metrics = metrics.filter(|_| merged.is_none());
                    r.raw = match (merged, raw) {
                        (Some(m), Some(raw)) => Some(merge_raw(m, raw)),
                        (m, raw) => raw.or(m),
                    };
                    return Ok(Some(r));
                };
                let all = match merged.take() {
                    Some(m) => merge_raw(m, raw),
                    None => raw,
                };
                let done = all.step_times_s.len();
                let mut m = metrics::compute(&case, &all)?;
                let share = ci_share(&m);
                let next = adaptive_next(&auto, done, share);
                if next == 0 {
                    m.repetitions_stop = Some(match share {
                        Some(s) if s <= auto.target_ci => format!(
                            "target met: ci95 half-width {:.1}% <= {:.1}% of the median after {done} repetitions",
                            s * 100.0,
                            auto.target_ci * 100.0
                        ),
                        s => format!(
                            "max {} repetitions reached; ci95 half-width {} of the median (target {:.1}%)",
                            auto.max,
                            s.map_or("unknown".into(), |s| format!("{:.1}%", s * 100.0)),
                            auto.target_ci * 100.0
                        ),
                    });
                    r.metrics = Some(m);
                    r.raw = Some(all);
                    return Ok(Some(r));
                }
                merged = Some(all);
                batch = next;
            }
        })();
        if let Err(e) = std::fs::remove_dir_all(&work_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: could not remove {}: {e}", work_dir.display());
            }
        }
        result
    }
}

/// The 95% interval's half-width over the median of the total throughput.
fn ci_share(m: &Metrics) -> Option<f64> {
    let [lo, hi] = m.total_throughput_ci95?;
    (m.total_throughput > 0.0).then(|| (hi - lo) / 2.0 / m.total_throughput)
}

/// How many more repetitions adaptive repetitions run after `done` with the interval at
/// `share` of the median (0 = stop): enough, by the interval's 1/sqrt(n) shrinking, to reach
/// the target in one more process, at least one, never past `max`.
fn adaptive_next(auto: &AdaptiveRepetitions, done: usize, share: Option<f64>) -> usize {
    let left = auto.max.saturating_sub(done);
    match share {
        Some(s) if s <= auto.target_ci => 0,
        _ if left == 0 => 0,
        Some(s) => {
            let needed = (done as f64 * (s / auto.target_ci).powi(2)).ceil() as usize;
            needed.saturating_sub(done).clamp(1, left)
        }
        None => left.min(done.max(1)),
    }
}

/// Raw results of two processes of one case as one: repetitions appended, peaks the higher,
/// tokens and notes of the later.
fn merge_raw(mut a: RawResult, b: RawResult) -> RawResult {
    a.step_times_s.extend(b.step_times_s);
    for (k, v) in b.peak_memory_bytes {
        let e = a.peak_memory_bytes.entry(k).or_default();
        *e = (*e).max(v);
    }
    for (k, v) in b.bytes_moved {
        let e = a.bytes_moved.entry(k).or_default();
        *e = (*e).max(v);
    }
    a.generated_tokens = b.generated_tokens;
    a.tokens = b.tokens.or(a.tokens);
    a.versions.extend(b.versions);
    for n in b.notes {
        if !a.notes.contains(&n) {
            a.notes.push(n);
        }
    }
    a
}

/// The case's log file. A failed write (a full disk) is remembered instead of stopping the run:
/// the case still gets its record, which says the log is incomplete.
struct CaseLog {
    file: Option<File>,
    path: PathBuf,
    error: Option<String>,
}

impl CaseLog {
    /// A new log, or (for a case's further processes) the end of its existing one.
    fn create(path: &Path, append: bool) -> CaseLog {
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path);
        match opened {
            Ok(f) => CaseLog {
                file: Some(f),
                path: path.to_path_buf(),
                error: None,
            },
            Err(e) => CaseLog {
                file: None,
                path: path.to_path_buf(),
                error: Some(format!("creating {} failed: {e}", path.display())),
            },
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if let Some(f) = &mut self.file {
            if let Err(e) = f.write_all(bytes) {
                self.error = Some(format!(
                    "writing {} failed: {e}; the log stops there",
                    self.path.display()
                ));
                self.file = None;
            }
        }
    }
}

/// Runs a runner with its output copied into `log_path`, keeping only what classification needs:
/// the result lines (at most [`MAX_RESULT_BYTES`]), the stderr tail and whether stderr spoke of
/// running out of memory. Also returns why the log is incomplete, if it is. `Ok(None)` when
/// interrupted (the group is already killed).
fn run_logged(
    cmd: &mut Command,
    log_path: &Path,
    timeout: Duration,
    append: bool,
) -> Result<Option<(ProcessEnd, Option<String>)>> {
    let mut log = CaseLog::create(log_path, append);
    log.write(format!("== flexbench: {cmd:?}\n").as_bytes());
    let mut result_lines = String::new();
    let mut results_dropped = false;
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut stderr_oom = false;
    let mut oom_line = String::new();
    let ended = supervise(cmd, timeout, &interrupt::interrupted, |piece| {
        log.write(&piece.bytes);
        if !piece.bytes.ends_with(b"\n") {
            log.write(b"\n");
        }
        let line = piece.text();
        match piece.stream {
            Stream::Stdout => {
                if line.starts_with(protocol::RESULT_PREFIX) {
                    if result_lines.len() + line.len() > MAX_RESULT_BYTES {
                        results_dropped = true;
                    } else {
                        result_lines.push_str(&line);
                        result_lines.push('\n');
                    }
                }
            }
            Stream::Stderr => {
                if !stderr_oom && mentions_oom(&line) {
                    stderr_oom = true;
                    oom_line = line.chars().take(STDERR_LINE_CHARS).collect();
                }
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
            log.write(format!("== {msg}\n").as_bytes());
            let end = ProcessEnd {
                exit_code: Some(127),
                stderr_tail: msg,
                ..Default::default()
            };
            return Ok(Some((end, log.error)));
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
    if results_dropped {
        // Classified as a missing result: a runner that floods result lines is broken.
        result_lines.clear();
        tail.push_back(format!(
            "result lines beyond {MAX_RESULT_BYTES} bytes were not kept (see the log)"
        ));
    }
    let stderr_tail = Vec::from(tail).join("\n");
    let end = ProcessEnd {
        exit_code: ended.status.and_then(|s| s.code()),
        signal: ended
            .status
            .and_then(|s| s.signal())
            .or(ended.timed_out.then_some(libc::SIGKILL)),
        timed_out: ended.timed_out,
        oom_killed: ended.oom_killed,
        stderr_oom,
        oom_line,
        stderr_tail,
        result_lines,
    };
    Ok(Some((end, log.error)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_repetitions_aim_for_the_target_in_one_more_process() {
        let auto = AdaptiveRepetitions {
            min: 3,
            max: 10,
            target_ci: 0.05,
        };
        // twice the target: 4x the repetitions (the interval shrinks as 1/sqrt(n)), capped at max
        assert_eq!(adaptive_next(&auto, 3, Some(0.10)), 7);
        // 1.2x the target: ceil(3 x 1.44) = 5, two more
        assert_eq!(adaptive_next(&auto, 3, Some(0.06)), 2);
        assert_eq!(adaptive_next(&auto, 3, Some(0.05)), 0, "met");
        assert_eq!(adaptive_next(&auto, 10, Some(0.5)), 0, "max reached");
        assert_eq!(
            adaptive_next(&auto, 3, None),
            3,
            "no interval: as many again"
        );
    }

    #[test]
    fn merged_raw_results_keep_every_repetition() {
        let a = RawResult {
            step_times_s: vec![vec![1.0]],
            peak_memory_bytes: [("host_rss".to_string(), 5)].into(),
            notes: vec!["n".into()],
            ..Default::default()
        };
        let b = RawResult {
            step_times_s: vec![vec![2.0], vec![3.0]],
            peak_memory_bytes: [("host_rss".to_string(), 7)].into(),
            notes: vec!["n".into()],
            tokens: Some(vec![vec![4]]),
            ..Default::default()
        };
        let m = merge_raw(a, b);
        assert_eq!(m.step_times_s, vec![vec![1.0], vec![2.0], vec![3.0]]);
        assert_eq!(m.peak_memory_bytes["host_rss"], 7);
        assert_eq!(m.notes, vec!["n".to_string()]);
        assert_eq!(m.tokens, Some(vec![vec![4]]));
    }
}
