//! The Slurm executor: the cases of a run as tasks of `sbatch --array` jobs on a cluster whose
//! nodes share the results directory, the repository's release binaries and the cache.
//!
//! How a record travels: [`Slurm::start`] writes the submission ([`submission`]) and submits
//! one array per kind of resource request; each task runs `<task command> <submission.json>
//! <array>` on its node ([`task`]: the local supervisor, then its record into `records/`, one
//! file per task, written durably); the orchestrator ([`collect`]) takes each file once Slurm says
//! the task has ended, completes it with Slurm's final state, and hands it to the suite loop,
//! which appends it to results.jsonl like any local record; only then is the file moved to
//! `merged/`. A task that ended without a record gets one from Slurm's account (cancelled,
//! timeout, node_fail, preempted, oom, or lost). Without `--wait` the orchestrator leaves after
//! submitting, and the next `bench` or `status` does the merging ([`collect::settle`]).

pub mod collect;
pub mod scheduler;
pub mod submission;
pub mod task;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

pub use collect::{settle, settle_earlier, Active, Settled};

use self::collect::Tracker;
use self::scheduler::Cli;
use self::submission::{Paths, Submission};
use super::executor::{Batch, Event, Executor, Started};
use super::interrupt;
use crate::record::{time, Record};

/// How often a following orchestrator asks Slurm about its tasks.
const POLL: Duration = Duration::from_secs(2);
/// How long an interrupted `--wait` waits, after scancel, for the cancelled tasks' records.
const DRAIN_AFTER_CANCEL: Duration = Duration::from_secs(60);

/// What `bench --executor slurm` was told.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    /// `--partition`; `None` = the cluster's default partition.
    pub partition: Option<String>,
    /// `--gpus-per-task`: GPUs each cuda case's task asks for (default: its `num_gpus_per_node`).
    pub gpus_per_task: Option<u32>,
    /// `--max-parallel`: at most this many tasks of an array at once (`--array=...%K`).
    pub max_parallel: Option<u32>,
    /// `--sbatch-arg`, each passed to sbatch after flexbench's own options.
    pub sbatch_args: Vec<String>,
    /// `--wait`: follow the job to its end instead of leaving after the submission.
    pub wait: bool,
    /// The program (an absolute path on the shared file system) and leading arguments that run
    /// one array task: `[.../target/release/xtask, slurm-task]`. The submission file and the array
    /// number are appended.
    pub task_command: Vec<String>,
}

/// Runs cases as Slurm array tasks.
pub struct Slurm {
    opts: SlurmOptions,
    cli: Cli,
    progress: bool,
    tracker: Option<Tracker>,
    ready: VecDeque<Record>,
    detached: Option<String>,
    finished: bool,
    cancelled_at: Option<Instant>,
    next_poll: Instant,
    last_counts: Option<(usize, usize)>,
}

impl Slurm {
    /// Checks that a submission can work before anything is written or submitted: Slurm's
    /// commands are on PATH, the controller answers, the partition exists (or a default does),
    /// and the task program is there.
    pub fn new(opts: SlurmOptions, progress: bool) -> Result<Slurm> {
        for cmd in scheduler::COMMANDS {
            if scheduler::which(cmd).is_none() {
                bail!(
                    "`{cmd}` is not on PATH: --executor slurm submits and follows jobs with Slurm's \
                     commands ({}); run on a machine of the cluster (a login node), or start the \
                     local test cluster with `scripts/slurm-local.sh start`",
                    scheduler::COMMANDS.join(", ")
                );
            }
        }
        let cli = Cli::default();
        let partitions = cli.partitions()?;
        let names: Vec<&str> = partitions.iter().map(|p| p.name.as_str()).collect();
        match &opts.partition {
            Some(p) if !names.contains(&p.as_str()) => bail!(
                "partition `{p}` does not exist on this cluster (its partitions: {}); pick one \
                 with --partition, or leave it out for the default",
                names.join(", ")
            ),
            Some(_) => {}
            None if !partitions.iter().any(|p| p.default) => bail!(
                "this cluster has no default partition; name one with --partition (its \
                 partitions: {})",
                names.join(", ")
            ),
            None => {}
        }
        if opts.max_parallel == Some(0) {
            bail!("--max-parallel 0 would run nothing; give at least 1");
        }
        match opts.task_command.first() {
            Some(p) if Path::new(p).is_absolute() && Path::new(p).is_file() => {}
            Some(p) => bail!(
                "the task program {p} is not an absolute path to a file; every node runs it from \
                 the shared file system"
            ),
            None => bail!("no task program to run on the nodes"),
        }
        Ok(Slurm {
            opts,
            cli,
            progress,
            tracker: None,
            ready: VecDeque::new(),
            detached: None,
            finished: false,
            cancelled_at: None,
            next_poll: Instant::now(),
            last_counts: None,
        })
    }

    fn submit(&self, batch: &Batch<'_>, paths: &Paths, sub: &mut Submission) -> Result<()> {
        sub.save(&paths.submission())?;
        let mut ids: Vec<String> = Vec::new();
        let submitted = (|| -> Result<()> {
            let mut jobs = Vec::new();
            for g in 0..sub.arrays.len() {
                let script = paths.script(g);
                std::fs::write(
                    &script,
                    submission::script(sub, paths, g, &self.opts.task_command),
                )
                .with_context(|| format!("writing {}", script.display()))?;
                let args = submission::sbatch_args(
                    sub,
                    paths,
                    g,
                    self.opts.partition.as_deref(),
                    self.opts.max_parallel,
                    &self.opts.sbatch_args,
                )?;
                // Every array checked before the first is submitted: a refused one then leaves
                // nothing behind.
                self.cli.sbatch_would_take(&args, &script)?;
                jobs.push((args, script));
            }
            for (g, (args, script)) in jobs.into_iter().enumerate() {
                let mut line = vec!["sbatch".to_string()];
                line.extend(args.iter().cloned());
                line.push(script.display().to_string());
                sub.arrays[g].sbatch = line;
                let id = self.cli.sbatch(&args, &script)?;
                ids.push(id.clone());
                sub.arrays[g].job_id = Some(id);
                sub.save(&paths.submission())?;
            }
            Ok(())
        })();
        if let Err(e) = submitted {
            let undone = if ids.is_empty() {
                "nothing of it runs".to_string()
            } else {
                // Only when sbatch refuses a later array after taking an earlier one.
                let cancelled = self.cli.cancel(&ids);
                format!(
                    "job(s) {} it had accepted {}",
                    ids.join(","),
                    if cancelled.is_ok() {
                        "are cancelled"
                    } else {
                        "could not be cancelled: scancel them"
                    }
                )
            };
            let _ = std::fs::remove_dir_all(&paths.root);
            return Err(e.context(format!(
                "submitting suite {} to Slurm; {undone}",
                batch.suite
            )));
        }
        Ok(())
    }

    fn say_counts(&mut self, active: &[Active], ended: usize) {
        let pending = active.iter().filter(|a| a.state == "PENDING").count();
        let counts = (pending, active.len() - pending);
        if self.progress && self.last_counts != Some(counts) {
            let jobs = self
                .tracker
                .as_ref()
                .map(|t| t.sub.job_ids())
                .unwrap_or_default();
            eprintln!(
                "Slurm job {jobs}: {} pending, {} running, {ended} ended",
                counts.0, counts.1
            );
        }
        self.last_counts = Some(counts);
    }
}

impl Executor for Slurm {
    fn start(&mut self, batch: &Batch<'_>) -> Result<Started> {
        if batch.cases.is_empty() {
            self.finished = true;
            return Ok(Started {
                environment: "none (nothing submitted)".into(),
            });
        }
        // Every node must find the same directory, whatever its working directory.
        let dir = std::path::absolute(batch.dir)
            .with_context(|| format!("making {} absolute", batch.dir.display()))?;
        let now = SystemTime::now();
        let stamp = time::stamp(now);
        let paths = Paths::new(&dir, &stamp);
        paths.create()?;
        let mut sub = Submission::new(
            batch.suite,
            stamp,
            time::rfc3339(now),
            batch.cases,
            batch.opts,
            self.opts.gpus_per_task,
        )?;
        self.submit(batch, &paths, &mut sub)?;
        let jobs = sub.job_ids();
        let shapes: Vec<String> = sub
            .arrays
            .iter()
            .map(|a| {
                let mut words = vec![format!(
                    "job {}: {} task(s)",
                    a.job_id.as_deref().unwrap_or("?"),
                    a.cases.len()
                )];
                words.extend(a.request.sbatch_args());
                words.join(" ")
            })
            .collect();
        if self.progress {
            eprintln!(
                "submitted to Slurm{}{}: {}; its files are in {}",
                self.opts
                    .partition
                    .as_deref()
                    .map(|p| format!(" (partition {p})"))
                    .unwrap_or_default(),
                self.opts
                    .max_parallel
                    .map(|k| format!(", at most {k} task(s) of an array at once"))
                    .unwrap_or_default(),
                shapes.join("; "),
                paths.root.display()
            );
        }
        self.detached = Some(format!(
            "Slurm job(s) {jobs} run the {} case(s) without waiting for this command; \
             `cargo xtask status {suite}` shows them and merges finished tasks' records into \
             {}/results.jsonl (as the next `cargo xtask bench {suite}` does); \
             `scancel {}` cancels them",
            batch.cases.len(),
            batch.dir.display(),
            jobs.replace(',', " "),
            suite = batch.suite,
        ));
        let environment = format!("env-{}-<node>.json, one per node", sub.stamp);
        self.tracker = Some(Tracker::new(paths, sub, &[]));
        self.next_poll = Instant::now() + Duration::from_millis(500);
        Ok(Started { environment })
    }

    fn next(&mut self, _batch: &Batch<'_>) -> Result<Event> {
        if !self.opts.wait {
            if let Some(note) = self.detached.take() {
                return Ok(Event::Detached(note));
            }
        }
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Ok(Event::Ended(Box::new(r)));
            }
            if self.finished {
                if let Some(t) = &self.tracker {
                    t.mark_settled()?;
                }
                return Ok(Event::Done);
            }
            match self.cancelled_at {
                None if interrupt::interrupted() => return Ok(Event::Interrupted),
                Some(at) if at.elapsed() > DRAIN_AFTER_CANCEL => return Ok(Event::Done),
                _ => {}
            }
            if Instant::now() >= self.next_poll {
                let Some(tracker) = self.tracker.as_mut() else {
                    return Ok(Event::Done);
                };
                let poll = tracker.poll()?;
                for w in &poll.warnings {
                    eprintln!("warning: {w}");
                }
                self.finished = poll.finished();
                self.ready.extend(poll.ready);
                let total: usize = tracker.sub.arrays.iter().map(|a| a.cases.len()).sum();
                let ended = total - poll.active.len() - poll.settling;
                self.say_counts(&poll.active, ended);
                self.next_poll = Instant::now() + POLL;
                continue;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn recorded(&mut self, record: &Record) -> Result<()> {
        match self.tracker.as_mut() {
            Some(t) => t.merged(record),
            None => Ok(()),
        }
    }

    fn interrupt(&mut self) -> Result<String> {
        let Some(tracker) = &self.tracker else {
            return Ok("nothing had been submitted".into());
        };
        let ids: Vec<String> = tracker
            .sub
            .arrays
            .iter()
            .filter_map(|a| a.job_id.clone())
            .collect();
        self.cli.cancel(&ids)?;
        self.cancelled_at = Some(Instant::now());
        self.next_poll = Instant::now();
        if self.progress {
            eprintln!(
                "interrupted: cancelled Slurm job(s) {} (scancel); merging what the tasks leave",
                ids.join(",")
            );
        }
        Ok(format!(
            "cancelled Slurm job(s) {} (scancel); its tasks are recorded as cancelled (any whose \
             record came after this command stopped waiting are merged by the next \
             `cargo xtask status` or `bench`)",
            ids.join(",")
        ))
    }
}

/// The absolute path of the running program, for the task command.
pub fn this_program() -> Result<PathBuf> {
    std::env::current_exe().context("finding this program's path for the Slurm tasks to run")
}
