//! The orchestrator: runs each case in its own child process and records how it ended.
//!
//! Per case: the case JSON goes to `<suite dir>/cases/<id>.json` (named by `FLEXBENCH_CASE`), the
//! child runs in its own process group with stdout and stderr copied line by line into
//! `logs/<id>.log`, scratch space is `work/<id>` (removed afterwards), and at the timeout the whole
//! group is killed. The outcome is classified ([`classify`]) and appended to results.jsonl through
//! the [`Store`] before the next case starts. Ctrl-C kills the running child's group and stops the
//! run without recording the interrupted case.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use crate::backend::{Backend, RunContext};
use crate::case::Case;
use crate::env;
use crate::metrics::{self, Metrics};
use crate::protocol::{self, RawResult};
use crate::record::{time, IdentifiedCase, Outcome, Record, SCHEMA};
use crate::store::{self, Store};

/// Timeout of a case when neither `--timeout` nor the suite sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Lines of stderr kept for a failure's detail.
const STDERR_TAIL_LINES: usize = 15;
/// How long to wait for the output pipes to close after the child's group was killed.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Which cases a run executes, given what results.jsonl already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rerun {
    /// Every case without an `ok` record (the default).
    Pending,
    /// Every case (`--force`).
    All,
    /// Only cases whose latest record is a failure: oom, timeout, crashed, error (`--rerun-failed`).
    Failed,
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Results root; the suite's files go to `<out_dir>/<suite>/`.
    pub out_dir: PathBuf,
    pub project_root: PathBuf,
    pub cache_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub python: Option<PathBuf>,
    /// `--timeout`: replaces every case's own timeout.
    pub timeout_override: Option<Duration>,
    pub rerun: Rerun,
    /// Print one progress line per case to stderr.
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub total: usize,
    /// Cases run (or found unavailable) in this run, by outcome.
    pub counts: BTreeMap<Outcome, usize>,
    /// Cases not run because of earlier records.
    pub skipped: usize,
    pub results_path: PathBuf,
    pub env_id: String,
}

impl Summary {
    /// Cases of this run that ended in oom, timeout, crashed or error.
    pub fn failed(&self) -> usize {
        self.counts
            .iter()
            .filter(|(o, _)| o.is_failure())
            .map(|(_, n)| n)
            .sum()
    }
}

/// The run was stopped by Ctrl-C (or SIGTERM / SIGHUP); the interrupted case was not recorded.
#[derive(Debug)]
pub struct Interrupted {
    pub recorded: usize,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "interrupted: the running case was killed and not recorded; {} case(s) of this run are in results.jsonl",
            self.recorded
        )
    }
}
impl std::error::Error for Interrupted {}

/// The directory holding a suite's results.
pub fn suite_dir(out_dir: &Path, suite: &str) -> PathBuf {
    out_dir.join(suite)
}

/// Runs `cases` of suite `suite` with the given backends. Returns an error only for problems of
/// the run itself (unwritable results directory, lock held, interrupted); a failing case is a
/// record, and the run goes on.
pub fn run_suite(
    suite: &str,
    cases: &[Case],
    backends: &[Box<dyn Backend>],
    opts: &RunOptions,
) -> Result<Summary> {
    let dir = suite_dir(&opts.out_dir, suite);
    let mut store = Store::open(&dir)?;
    for sub in ["logs", "cases", "work"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }

    let earlier = store::read(&store.results_path())?;
    for w in &earlier.warnings {
        eprintln!("warning: {w}");
    }
    let mut latest: HashMap<String, Outcome> = HashMap::new();
    let mut has_ok: HashMap<String, bool> = HashMap::new();
    for r in &earlier.records {
        latest.insert(r.case.id.clone(), r.outcome);
        *has_ok.entry(r.case.id.clone()).or_default() |= r.outcome == Outcome::Ok;
    }
    let skip_reason = |id: &str| -> Option<&'static str> {
        match opts.rerun {
            Rerun::All => None,
            Rerun::Pending if has_ok.get(id).copied().unwrap_or(false) => {
                Some("already ok in results.jsonl; --force reruns it")
            }
            Rerun::Pending => None,
            Rerun::Failed => match latest.get(id) {
                Some(o) if o.is_failure() => None,
                Some(_) => Some("last record did not fail (--rerun-failed)"),
                None => Some("never run (--rerun-failed runs only failed cases)"),
            },
        }
    };

    // Probe each backend the cases need once, before anything runs, so the environment file can
    // say what was available.
    let probe_ctx = RunContext {
        project_root: opts.project_root.clone(),
        case_file: dir.join("cases"),
        work_dir: dir.join("work"),
        cache_dir: opts.cache_dir.clone(),
        bin_dir: opts.bin_dir.clone(),
        python: opts.python.clone(),
    };
    let mut probes: BTreeMap<&'static str, Result<(), String>> = BTreeMap::new();
    for c in cases {
        if let Some(b) = backend_for(backends, &c.framework) {
            probes
                .entry(b.name())
                .or_insert_with(|| b.probe(&probe_ctx));
        }
    }
    let mut environment = env::capture(&opts.project_root, &dir.join("work"), SystemTime::now());
    environment
        .versions
        .insert("flexbench".into(), env!("CARGO_PKG_VERSION").into());
    for (name, p) in &probes {
        let status = match p {
            Ok(()) => "available".to_string(),
            Err(why) => format!("unavailable: {why}"),
        };
        environment.backends.insert(name.to_string(), status);
        if p.is_ok() {
            if let Some(b) = backends.iter().find(|b| b.name() == *name) {
                environment.versions.extend(b.versions(&probe_ctx));
            }
        }
    }
    environment.write(&dir)?;

    install_interrupt_handler();
    let mut summary = Summary {
        total: cases.len(),
        results_path: store.results_path(),
        env_id: environment.id.clone(),
        ..Default::default()
    };
    let to_run = cases
        .iter()
        .filter(|c| skip_reason(&c.id()).is_none())
        .count();
    if opts.progress {
        eprintln!(
            "suite {suite}: {} case(s), {to_run} to run, results in {}",
            cases.len(),
            dir.display()
        );
    }
    let (mut ran, mut spent) = (0usize, Duration::ZERO);
    for (i, case) in cases.iter().enumerate() {
        if interrupted() {
            return Err(Interrupted { recorded: ran }.into());
        }
        let id = case.id();
        if let Some(why) = skip_reason(&id) {
            summary.skipped += 1;
            if opts.progress {
                eprintln!(
                    "[{}/{}] {} {}  skipped ({why})",
                    i + 1,
                    cases.len(),
                    id,
                    describe(case)
                );
            }
            continue;
        }
        let started = Instant::now();
        let record = match run_case(case, backends, &probes, &dir, opts, &environment.id)? {
            Some(r) => r,
            None => return Err(Interrupted { recorded: ran }.into()),
        };
        store.append(&record)?;
        ran += 1;
        spent += started.elapsed();
        *summary.counts.entry(record.outcome).or_default() += 1;
        if opts.progress {
            let left = to_run - ran;
            let eta = spent.as_secs_f64() / ran as f64 * left as f64;
            eprintln!(
                "[{}/{}] {} {}  {}{}  {}  ETA {}",
                i + 1,
                cases.len(),
                id,
                describe(case),
                record.outcome,
                short_detail(&record),
                human(started.elapsed().as_secs_f64()),
                human(eta)
            );
        }
    }
    Ok(summary)
}

/// The columns of a progress line after the id.
fn describe(c: &Case) -> String {
    format!(
        "{} {} {} p{} g{} bs{}x{} {}",
        c.model,
        c.framework,
        c.device.as_str(),
        c.prompt_len,
        c.gen_len,
        c.gpu_batch_size,
        c.num_gpu_batches,
        c.placement.label()
    )
}

fn short_detail(r: &Record) -> String {
    match (&r.metrics, r.outcome) {
        (Some(m), _) => format!(
            " {:.2} tok/s{}",
            m.total_throughput,
            if m.projected { " (projected)" } else { "" }
        ),
        (None, Outcome::Ok) => String::new(),
        (None, _) => {
            let first = r.detail.lines().next().unwrap_or("");
            let cut: String = first.chars().take(100).collect();
            if cut.is_empty() {
                String::new()
            } else {
                format!(" ({cut})")
            }
        }
    }
}

/// `42.0s`, `3m05s`, `2h10m`.
pub fn human(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{}h{:02}m", (s / 3600.0) as u64, (s % 3600.0 / 60.0) as u64)
    }
}

fn backend_for<'a>(backends: &'a [Box<dyn Backend>], framework: &str) -> Option<&'a dyn Backend> {
    backends
        .iter()
        .find(|b| b.frameworks().contains(&framework))
        .map(|b| b.as_ref())
}

/// Runs one case; `Ok(None)` when interrupted.
fn run_case(
    case: &Case,
    backends: &[Box<dyn Backend>],
    probes: &BTreeMap<&'static str, Result<(), String>>,
    dir: &Path,
    opts: &RunOptions,
    env_id: &str,
) -> Result<Option<Record>> {
    let mut case = case.clone();
    let timeout = opts
        .timeout_override
        .or(case.timeout_s.map(Duration::from_secs))
        .unwrap_or(DEFAULT_TIMEOUT);
    case.timeout_s = Some(timeout.as_secs().max(1));
    let id = case.id();
    let started_at = SystemTime::now();
    let record = |outcome: Outcome, detail: String| Record {
        schema: SCHEMA,
        case: IdentifiedCase {
            id: id.clone(),
            case: case.clone(),
        },
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
    };

    let Some(backend) = backend_for(backends, &case.framework) else {
        let names: Vec<&str> = backends.iter().map(|b| b.name()).collect();
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
    if let Some(Err(why)) = probes.get(backend.name()) {
        return Ok(Some(record(
            Outcome::Unavailable,
            format!("backend {} is not available: {why}", backend.name()),
        )));
    }
    let case_file = dir.join("cases").join(format!("{id}.json"));
    let work_dir = dir.join("work").join(&id);
    let log_rel = format!("logs/{id}.log");
    let ctx = RunContext {
        project_root: opts.project_root.clone(),
        case_file: case_file.clone(),
        work_dir: work_dir.clone(),
        cache_dir: opts.cache_dir.clone(),
        bin_dir: opts.bin_dir.clone(),
        python: opts.python.clone(),
    };
    if let Err(why) = backend.check_case(&case, &ctx) {
        return Ok(Some(record(Outcome::Unavailable, why)));
    }
    // The child reads a plain Case (no id), the protocol's format.
    let json = serde_json::to_string_pretty(&case).expect("a case always serializes");
    std::fs::write(&case_file, json).with_context(|| format!("writing {}", case_file.display()))?;
    if work_dir.exists() {
        std::fs::remove_dir_all(&work_dir)
            .with_context(|| format!("clearing a stale work directory {}", work_dir.display()))?;
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
        let log_path = dir.join(&log_rel);
        let Some(end) = run_process(&mut cmd, &log_path, timeout)? else {
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

/// How a child process ended, as far as classification cares.
#[derive(Debug, Default)]
pub struct ProcessEnd {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// We killed it at the timeout.
    pub timed_out: bool,
    /// The kernel's OOM-kill counter of our cgroup went up while it ran; `None` if unreadable.
    pub oom_killed: Option<bool>,
    /// Some stderr line mentioned running out of memory.
    pub stderr_oom: bool,
    pub stderr_tail: String,
    /// The `FLEXBENCH_RESULT` lines it printed, joined.
    pub result_lines: String,
}

/// Decides the outcome of a finished process. Returns (outcome, detail, metrics, raw).
pub fn classify(
    case: &Case,
    end: &ProcessEnd,
    timeout: Duration,
) -> (Outcome, String, Option<Metrics>, Option<RawResult>) {
    let tail = if end.stderr_tail.is_empty() {
        String::new()
    } else {
        format!("\nstderr tail:\n{}", end.stderr_tail)
    };
    let parsed = protocol::find_result(&end.result_lines);
    let raw = parsed.as_ref().ok().cloned().flatten();
    if end.timed_out {
        return (
            Outcome::Timeout,
            format!(
                "still running after {}s; its process group was killed{tail}",
                timeout.as_secs()
            ),
            None,
            raw,
        );
    }
    if end.exit_code == Some(0) {
        return match parsed {
            Ok(Some(raw)) => match metrics::compute(case, &raw) {
                Ok(m) => (Outcome::Ok, String::new(), Some(m), Some(raw)),
                Err(e) => (
                    Outcome::Error,
                    format!("the result line is unusable: {e:#}"),
                    None,
                    Some(raw),
                ),
            },
            Ok(None) => (
                Outcome::Error,
                format!(
                    "exited 0 without a {} line{tail}",
                    protocol::RESULT_PREFIX.trim()
                ),
                None,
                None,
            ),
            Err(e) => (Outcome::Error, format!("{e:#}{tail}"), None, None),
        };
    }
    if end.exit_code == Some(protocol::EXIT_OOM) {
        return (
            Outcome::Oom,
            format!("the runner reported out of memory (exit 3){tail}"),
            None,
            raw,
        );
    }
    if end.exit_code == Some(protocol::EXIT_UNAVAILABLE) {
        let reason = end.stderr_tail.lines().last().unwrap_or("").trim();
        let reason = if reason.is_empty() {
            "no reason given".to_string()
        } else {
            reason.to_string()
        };
        return (
            Outcome::Unavailable,
            format!("the runner cannot run this case here (exit 4): {reason}"),
            None,
            raw,
        );
    }
    if end.stderr_oom {
        let how = match (end.exit_code, end.signal) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => signal_name(s),
            _ => "unknown status".into(),
        };
        return (
            Outcome::Oom,
            format!("out of memory ({how}; stderr says so){tail}"),
            None,
            raw,
        );
    }
    if let Some(sig) = end.signal {
        if sig == libc::SIGKILL {
            match end.oom_killed {
                Some(true) => {
                    return (Outcome::Oom, format!("killed by the kernel's OOM killer (SIGKILL){tail}"), None, raw)
                }
                None => {
                    return (
                        Outcome::Oom,
                        format!("killed by SIGKILL from outside, most likely the kernel's OOM killer (its counter is not readable here){tail}"),
                        None,
                        raw,
                    )
                }
                Some(false) => {}
            }
        }
        return (
            Outcome::Crashed,
            format!("killed by {} (signal {sig}){tail}", signal_name(sig)),
            None,
            raw,
        );
    }
    let code = end
        .exit_code
        .map_or("unknown".to_string(), |c| c.to_string());
    (Outcome::Error, format!("exit code {code}{tail}"), None, raw)
}

/// Does this stderr line say the process ran out of memory (host or GPU, any framework)?
pub fn mentions_oom(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    l.contains("out of memory")
        || l.contains("outofmemoryerror")
        || l.contains("memory allocation failed")
        || l.contains("memory allocation of") // Rust's "memory allocation of N bytes failed"
        || l.contains("cannot allocate memory")
}

/// Starts `cmd` in its own process group, copies its output to `log_path`, and waits for it, the
/// timeout, or an interrupt. `Ok(None)` when interrupted (the group is already killed).
fn run_process(
    cmd: &mut Command,
    log_path: &Path,
    timeout: Duration,
) -> Result<Option<ProcessEnd>> {
    let mut log =
        File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    writeln!(log, "== flexbench: {:?}", cmd)
        .with_context(|| format!("writing {}", log_path.display()))?;
    let log = Arc::new(Mutex::new(log));
    let oom_before = oom_kill_count();
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            // Not a run-level error: the record says the runner could not be started.
            let msg = format!("cannot start {:?}: {e}", cmd.get_program());
            let _ = writeln!(log.lock().unwrap(), "== {msg}");
            return Ok(Some(ProcessEnd {
                exit_code: Some(127),
                stderr_tail: msg,
                ..Default::default()
            }));
        }
    };
    let pgid = child.id() as i32;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let out_thread = {
        let (log, tx) = (log.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let mut results = String::new();
            copy_lines(stdout, &log, |line| {
                if line.starts_with(protocol::RESULT_PREFIX) {
                    results.push_str(line);
                    results.push('\n');
                }
            });
            let _ = tx.send(());
            results
        })
    };
    let err_thread = {
        let (log, tx) = (log.clone(), done_tx);
        std::thread::spawn(move || {
            let mut tail: VecDeque<String> = VecDeque::new();
            let mut oom = false;
            copy_lines(stderr, &log, |line| {
                oom |= mentions_oom(line);
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.chars().take(400).collect());
            });
            let _ = tx.send(());
            (Vec::from(tail).join("\n"), oom)
        })
    };

    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    loop {
        if exited_unreaped(pgid).context("waiting for the runner")? {
            break;
        }
        if interrupted() {
            kill_group(pgid);
            let _ = child.wait();
            return Ok(None);
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // At the timeout this kills the runner; otherwise whatever it left behind in its group
    // (launcher workers, ...), which would keep the pipes open. The runner is not reaped yet,
    // so its pid, and with it the group id, cannot have been reused.
    kill_group(pgid);
    let status: ExitStatus = child.wait().context("waiting for the runner")?;
    let drained = (0..2).all(|_| done_rx.recv_timeout(PIPE_DRAIN_TIMEOUT).is_ok());
    let (result_lines, (stderr_tail, stderr_oom)) = if drained {
        (
            out_thread.join().unwrap_or_default(),
            err_thread.join().unwrap_or_default(),
        )
    } else {
        // A process that left the group still holds the pipes; keep what we have and move on.
        (
            String::new(),
            (
                "output pipes still held by a process that left the group".to_string(),
                false,
            ),
        )
    };
    let oom_after = oom_kill_count();
    Ok(Some(ProcessEnd {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        oom_killed: oom_before.zip(oom_after).map(|(a, b)| b > a),
        stderr_oom,
        stderr_tail,
        result_lines,
    }))
}

/// Copies lines from a pipe into the log, handing each (without its newline) to `each`.
fn copy_lines(pipe: impl Read, log: &Mutex<File>, mut each: impl FnMut(&str)) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if let Ok(mut f) = log.lock() {
                    let _ = f.write_all(&buf);
                    if !buf.ends_with(b"\n") {
                        let _ = f.write_all(b"\n");
                    }
                }
                let line = String::from_utf8_lossy(&buf);
                each(line.trim_end_matches(['\n', '\r']));
            }
        }
    }
}

/// Whether the child has exited, leaving it a zombie (WNOWAIT) so its pid stays reserved.
fn exited_unreaped(pid: i32) -> std::io::Result<bool> {
    // SAFETY: `info` is a zeroed out-parameter of the right type; waitid with WNOHANG | WNOWAIT
    // neither blocks nor reaps.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(info.si_pid() != 0)
    }
}

fn kill_group(pgid: i32) {
    // SAFETY: killpg has no memory-safety preconditions; ESRCH (group already gone) is fine.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

/// The kernel's count of OOM kills in this process's memory cgroup (v2 `memory.events` or v1
/// `memory.oom_control`), to tell an OOM kill from another SIGKILL.
fn oom_kill_count() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut candidates = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(Path::new("/sys/fs/cgroup").join(path).join("memory.events"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(
                Path::new("/sys/fs/cgroup/memory")
                    .join(path)
                    .join("memory.oom_control"),
            );
        }
    }
    candidates.iter().find_map(|p| {
        let text = std::fs::read_to_string(p).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// `SIGSEGV` for 11, etc.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C (SIGINT), SIGTERM or SIGHUP arrived during the run.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

extern "C" fn on_interrupt(_sig: libc::c_int) {
    // A second interrupt means the user does not want to wait for the cleanup.
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// Children run in their own process groups, so the terminal's Ctrl-C reaches only us; we kill
/// the running child's group ourselves and stop.
fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe;
        // `sa` is fully initialized before use.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Prints the end of a run to stderr and gives the process exit code: 0 when nothing failed,
/// 1 when a case failed (oom, timeout, crashed, error), 130 when interrupted, 2 when the run
/// itself could not proceed.
pub fn finish(result: Result<Summary>) -> i32 {
    match result {
        Ok(s) => {
            let counts: Vec<String> = s.counts.iter().map(|(o, n)| format!("{n} {o}")).collect();
            let ran = if counts.is_empty() {
                "nothing run".to_string()
            } else {
                counts.join(", ")
            };
            eprintln!(
                "{} case(s): {ran}; {} skipped. Results: {} (environment {})",
                s.total,
                s.skipped,
                s.results_path.display(),
                s.env_id
            );
            if s.failed() > 0 {
                eprintln!(
                    "{} case(s) failed; see `detail` in results.jsonl and the logs beside it",
                    s.failed()
                );
                1
            } else {
                0
            }
        }
        Err(e) if e.is::<Interrupted>() => {
            eprintln!("{e}");
            130
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::{Device, Placement, Weights};

    fn case() -> Case {
        Case {
            model: "opt-tiny".into(),
            framework: "native".into(),
            prompt_len: 4,
            gen_len: 4,
            cut_gen_len: None,
            gpu_batch_size: 1,
            num_gpu_batches: 1,
            placement: Placement::Gpu,
            device: Device::Cpu,
            weights: Weights::Dummy,
            num_nodes: 1,
            num_gpus_per_node: 1,
            warmup: 1,
            repetitions: 1,
            timeout_s: None,
        }
    }

    fn outcome(end: ProcessEnd) -> (Outcome, String) {
        let (o, d, _, _) = classify(&case(), &end, Duration::from_secs(7));
        (o, d)
    }

    // The kernel's OOM killer cannot be provoked in a test; these cover how its SIGKILL is read.
    #[test]
    fn sigkill_is_oom_only_when_the_kernel_says_so() {
        let killed = |oom_killed| ProcessEnd {
            signal: Some(libc::SIGKILL),
            oom_killed,
            ..Default::default()
        };
        let (o, d) = outcome(killed(Some(true)));
        assert_eq!(o, Outcome::Oom);
        assert!(d.contains("OOM killer"), "{d}");
        let (o, d) = outcome(killed(Some(false)));
        assert_eq!(o, Outcome::Crashed);
        assert!(d.contains("SIGKILL"), "{d}");
        let (o, d) = outcome(killed(None));
        assert_eq!(o, Outcome::Oom);
        assert!(d.contains("most likely"), "{d}");
    }

    #[test]
    fn precedence_of_the_signs() {
        // A timeout wins over whatever the killed process printed.
        let (o, d) = outcome(ProcessEnd {
            timed_out: true,
            signal: Some(libc::SIGKILL),
            stderr_oom: true,
            ..Default::default()
        });
        assert_eq!(o, Outcome::Timeout);
        assert!(d.contains("7s"), "{d}");
        // An abort after an out-of-memory message is an OOM, not a crash.
        let (o, _) = outcome(ProcessEnd {
            signal: Some(libc::SIGABRT),
            stderr_oom: true,
            ..Default::default()
        });
        assert_eq!(o, Outcome::Oom);
        let (o, d) = outcome(ProcessEnd {
            exit_code: Some(4),
            stderr_tail: "loading\nno CUDA device".into(),
            ..Default::default()
        });
        assert_eq!(o, Outcome::Unavailable);
        assert!(d.ends_with("no CUDA device"), "{d}");
        let raw = RawResult {
            step_times_s: vec![vec![1.0, 0.5, 0.5, 0.5]],
            ..Default::default()
        };
        let (o, _, m, _) = classify(
            &case(),
            &ProcessEnd {
                exit_code: Some(0),
                result_lines: raw.to_line(),
                ..Default::default()
            },
            Duration::from_secs(1),
        );
        assert_eq!(o, Outcome::Ok);
        assert_eq!(m.unwrap().total_throughput, 4.0 / 2.5);
        let (o, d) = outcome(ProcessEnd {
            exit_code: Some(0),
            result_lines: format!("{}\n{}", raw.to_line(), raw.to_line()),
            ..Default::default()
        });
        assert_eq!(o, Outcome::Error);
        assert!(d.contains("more than one"), "{d}");
    }

    #[test]
    fn oom_messages_of_the_frameworks() {
        for line in [
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB",
            "RuntimeError: [enforce fail at alloc_cpu.cpp:83] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes. Error code 12 (Cannot allocate memory)",
            "memory allocation of 1048576 bytes failed",
            "CUDA_ERROR_OUT_OF_MEMORY: out of memory",
        ] {
            assert!(mentions_oom(line), "{line}");
        }
        assert!(!mentions_oom("loaded 32 layers"));
        assert_eq!(signal_name(libc::SIGSEGV), "SIGSEGV");
        assert_eq!(signal_name(64), "signal 64");
        assert_eq!(human(185.0), "3m05s");
    }
}
