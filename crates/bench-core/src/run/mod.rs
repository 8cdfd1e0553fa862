//! The orchestrator's suite loop: which cases run (given what results.jsonl holds), the
//! environment captured once, each case through [`execute::CaseRunner`], its record appended to
//! results.jsonl through the [`Store`] before the next case starts, and the progress line.
//!
//! Per case: the case JSON goes to `<suite dir>/cases/<id>.json` (named by `FLEXBENCH_CASE`), the
//! child runs in its own process group ([`supervise`]) with its output copied into
//! `logs/<id>.log`, scratch space is `work/<id>` (removed afterwards), and at the timeout the whole
//! group is killed. The outcome is classified ([`classify`]). Ctrl-C ([`interrupt`]) kills the
//! running child's group and stops the run without recording the interrupted case.

pub mod classify;
pub mod execute;
pub mod interrupt;
pub mod progress;
pub mod supervise;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

pub use classify::{classify, mentions_oom, signal_name, ProcessEnd};
pub use interrupt::interrupted;
pub use progress::{finish, human};

use crate::backend::{backend_for, Backend, RunContext};
use crate::case::Case;
use crate::env;
use crate::record::Outcome;
use crate::store::{self, Store};

/// Timeout of a case when neither `--timeout` nor the suite sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

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
pub fn suite_dir(out_dir: &Path, suite: &str) -> Result<PathBuf> {
    crate::suite::check_suite_name(suite).map_err(anyhow::Error::msg)?;
    Ok(out_dir.join(suite))
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
    let dir = suite_dir(&opts.out_dir, suite)?;
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

    interrupt::install_interrupt_handler();
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
    let runner = execute::CaseRunner {
        backends,
        probes: &probes,
        dir: &dir,
        opts,
        env_id: &environment.id,
    };
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
                    progress::describe(case)
                );
            }
            continue;
        }
        let started = Instant::now();
        let record = match runner.run(case)? {
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
                progress::describe(case),
                record.outcome,
                progress::short_detail(&record),
                human(started.elapsed().as_secs_f64()),
                human(eta)
            );
        }
    }
    Ok(summary)
}
