//! The orchestrator's suite loop: which cases run (given what results.jsonl holds), each run
//! through an [`Executor`] (here: [`Local`]; on a cluster: [`slurm::Slurm`]), each record
//! appended to results.jsonl through the [`Store`] as it arrives, the progress line with its ETA,
//! and the summary. The loop is the same whoever executes the cases.
//!
//! Per case: the case JSON goes to `<suite dir>/cases/<id>.json` (named by `FLEXBENCH_CASE`), the
//! child runs in its own process group ([`supervise`]) with its output copied into
//! `logs/<id>.log`, scratch space is `work/<id>` (removed afterwards), and at the timeout the whole
//! group is killed. The outcome is classified ([`classify`]). Ctrl-C ([`interrupt`]) kills the
//! running child's group (or cancels the Slurm job) and stops the run.

pub mod classify;
pub mod environment;
pub mod execute;
pub mod executor;
pub mod interrupt;
pub mod progress;
pub mod slurm;
pub mod status;
pub mod supervise;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub use classify::{classify, mentions_oom, signal_name, ProcessEnd};
pub use executor::{Batch, Event, Executor, Local, Started};
pub use interrupt::interrupted;
pub use progress::{finish, human};

use crate::backend::Backend;
use crate::case::Case;
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
    /// Only cases whose latest record is a failure ([`Outcome::is_failure`]: oom, timeout,
    /// crashed, error, and the scheduler's cancelled, preempted, node_fail, lost) (`--rerun-failed`).
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
    /// `--work-dir`: where each case's scratch directory (offload files) goes, as
    /// `<work_dir>/<suite>/<id>` [default: `<suite dir>/work/<id>`].
    pub work_dir: Option<PathBuf>,
}

impl RunOptions {
    /// The parent of the cases' scratch directories for the suite in `dir`.
    pub fn work_root(&self, dir: &Path) -> PathBuf {
        match &self.work_dir {
            Some(w) => w.join(dir.file_name().unwrap_or_default()),
            None => dir.join("work"),
        }
    }
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
    /// The run's environment file, or how they are named when there is one per node.
    pub env_id: String,
    /// Set when the cases go on without this process (a Slurm submission without `--wait`):
    /// where they run and how to follow them.
    pub detached: Option<String>,
}

impl Summary {
    /// Cases of this run whose outcome is a failure ([`Outcome::is_failure`]).
    pub fn failed(&self) -> usize {
        self.counts
            .iter()
            .filter(|(o, _)| o.is_failure())
            .map(|(_, n)| n)
            .sum()
    }
}

/// The run was stopped by Ctrl-C (or SIGTERM / SIGHUP).
#[derive(Debug)]
pub struct Interrupted {
    pub recorded: usize,
    /// What became of the cases still running, from the executor.
    pub what: String,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "interrupted: {}; {} case(s) of this run are in results.jsonl",
            self.what, self.recorded
        )
    }
}
impl std::error::Error for Interrupted {}

/// The directory holding a suite's results.
pub fn suite_dir(out_dir: &Path, suite: &str) -> Result<PathBuf> {
    crate::suite::check_suite_name(suite).map_err(anyhow::Error::msg)?;
    Ok(out_dir.join(suite))
}

/// Runs `cases` of suite `suite` with the given backends through `executor`. Returns an error only
/// for problems of the run itself (unwritable results directory, lock held, a Slurm submission
/// still running there, interrupted); a failing case is a record, and the run goes on.
pub fn run_suite(
    suite: &str,
    cases: &[Case],
    backends: &[Box<dyn Backend>],
    opts: &RunOptions,
    executor: &mut dyn Executor,
) -> Result<Summary> {
    let dir = suite_dir(&opts.out_dir, suite)?;
    let mut store = Store::open(&dir)?;
    for sub in ["logs", "cases"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    // Whatever executes this run, the records earlier Slurm submissions left here count before
    // anything is decided, and one still queued or running refuses the run, as the lock does.
    slurm::settle_earlier(&dir, &mut store, opts.progress)?;

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

    interrupt::install_interrupt_handler();
    let mut summary = Summary {
        total: cases.len(),
        results_path: store.results_path(),
        ..Default::default()
    };
    let mut to_run = Vec::new();
    let mut skipped = Vec::new();
    for case in cases {
        match skip_reason(&case.id()) {
            Some(why) => skipped.push((case, why)),
            None => to_run.push(case.clone()),
        }
    }
    if opts.progress {
        eprintln!(
            "suite {suite}: {} case(s), {} to run, results in {}",
            cases.len(),
            to_run.len(),
            dir.display()
        );
    }
    // `done` counts cases this run has finished with, skipped ones first: an executor may end
    // cases in any order, so the counter, not a case's position, is what the line shows.
    let mut done = 0usize;
    for (case, why) in skipped {
        summary.skipped += 1;
        done += 1;
        if opts.progress {
            eprintln!(
                "[{done}/{}] {} {}  skipped ({why})",
                cases.len(),
                case.id(),
                progress::describe(case)
            );
        }
    }
    let batch = Batch {
        suite,
        dir: &dir,
        cases: &to_run,
        backends,
        opts,
    };
    let started = executor.start(&batch)?;
    summary.env_id = started.environment;
    let since = Instant::now();
    let mut ran = 0usize;
    // Set once interrupted: the executor has stopped what ran, and the loop only takes the
    // records that stopping produced (a cancelled Slurm task records itself) until it is done.
    let mut stopped: Option<String> = None;
    loop {
        let event = if interrupted() && stopped.is_none() {
            Event::Interrupted
        } else {
            executor.next(&batch)?
        };
        let record = match event {
            Event::Ended(r) => r,
            Event::Done => break,
            Event::Detached(note) => {
                summary.detached = Some(note);
                break;
            }
            Event::Interrupted if stopped.is_some() => break,
            Event::Interrupted => {
                stopped = Some(executor.interrupt()?);
                continue;
            }
        };
        store.append(&record)?;
        executor.recorded(&record)?;
        ran += 1;
        done += 1;
        *summary.counts.entry(record.outcome).or_default() += 1;
        if opts.progress {
            // Wall time over cases ended, not the sum of their durations: an executor running
            // several at once finishes the rest that much sooner.
            let left = to_run.len().saturating_sub(ran);
            let eta = since.elapsed().as_secs_f64() / ran as f64 * left as f64;
            eprintln!(
                "{}  ETA {}",
                progress::line(done, cases.len(), &record),
                human(eta)
            );
        }
    }
    if let Some(what) = stopped {
        return Err(Interrupted {
            recorded: ran,
            what,
        }
        .into());
    }
    Ok(summary)
}
