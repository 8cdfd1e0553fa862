//! Where the cases of a run execute: the [`Executor`] trait the suite loop drives, and [`Local`],
//! which runs them one after another on this machine. The Slurm executor
//! ([`super::slurm::Slurm`]) runs them as tasks of job arrays on a cluster.
//!
//! The suite loop owns everything that must not differ between the two: which cases run, the
//! results store, the progress line, the summary and the exit code. An executor only starts the
//! cases it is given and hands back one record per case as each ends, in whatever order they end.

use std::collections::VecDeque;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, Result};

use super::environment::{self, Probes};
use super::execute::CaseRunner;
use super::RunOptions;
use crate::backend::Backend;
use crate::case::Case;
use crate::record::Record;

/// The cases one run hands to its executor, with what running them needs.
pub struct Batch<'a> {
    pub suite: &'a str,
    /// The suite's results directory.
    pub dir: &'a Path,
    /// The cases to run (already selected: skipped ones are not here).
    pub cases: &'a [Case],
    pub backends: &'a [Box<dyn Backend>],
    pub opts: &'a RunOptions,
}

/// What [`Executor::start`] reports.
pub struct Started {
    /// What the summary names as the run's environment: an `env_id`, or how they are named when
    /// each node has its own.
    pub environment: String,
}

/// What [`Executor::next`] waited for.
pub enum Event {
    /// A case ended; its record is to be appended to results.jsonl.
    Ended(Box<Record>),
    /// Every case has ended.
    Done,
    /// The cases go on without this process (a submission without `--wait`); the text says
    /// where they run and how to follow them.
    Detached(String),
    /// Ctrl-C (or SIGTERM / SIGHUP) arrived; the suite loop calls [`Executor::interrupt`].
    Interrupted,
}

/// Runs a batch of cases somewhere and reports each as it ends.
pub trait Executor {
    /// Starts the batch. On an error nothing of it may have started.
    fn start(&mut self, batch: &Batch<'_>) -> Result<Started>;
    /// Blocks until a case ends (or the batch is done, detached or interrupted).
    fn next(&mut self, batch: &Batch<'_>) -> Result<Event>;
    /// The record [`Executor::next`] returned is now durably in results.jsonl; an executor that
    /// keeps records elsewhere until then may let go of its copy.
    fn recorded(&mut self, _record: &Record) -> Result<()> {
        Ok(())
    }
    /// Stops whatever still runs after an interrupt; returns what became of it, in words. The
    /// suite loop then calls [`Executor::next`] until [`Event::Done`], for the records that
    /// stopping leaves (a cancelled Slurm task records itself as cancelled).
    fn interrupt(&mut self) -> Result<String>;
}

/// One case after another, each in its own process group on this machine.
#[derive(Default)]
pub struct Local {
    queue: VecDeque<Case>,
    probes: Probes,
    env_id: String,
}

impl Executor for Local {
    fn start(&mut self, batch: &Batch<'_>) -> Result<Started> {
        let ctx = environment::probe_context(batch.opts, batch.dir);
        std::fs::create_dir_all(&ctx.work_dir)
            .with_context(|| format!("creating the work directory {}", ctx.work_dir.display()))?;
        // Probed once, before anything runs, so the environment file can say what was available.
        self.probes = environment::probe(batch.backends, batch.cases, &ctx);
        let environment =
            environment::capture(batch.backends, &self.probes, &ctx, SystemTime::now());
        environment.write(batch.dir)?;
        self.env_id = environment.id;
        self.queue = batch.cases.iter().cloned().collect();
        Ok(Started {
            environment: self.env_id.clone(),
        })
    }

    fn next(&mut self, batch: &Batch<'_>) -> Result<Event> {
        let Some(case) = self.queue.pop_front() else {
            return Ok(Event::Done);
        };
        let runner = CaseRunner {
            backends: batch.backends,
            probes: &self.probes,
            dir: batch.dir,
            opts: batch.opts,
            env_id: &self.env_id,
        };
        Ok(match runner.run(&case)? {
            Some(r) => Event::Ended(Box::new(r)),
            None => Event::Interrupted,
        })
    }

    fn interrupt(&mut self) -> Result<String> {
        // The supervisor has already killed the running case's process group.
        self.queue.clear();
        Ok("the running case was killed and not recorded".into())
    }
}
