//! One array task on its node: the case the task's index names, run by the same
//! [`CaseRunner`](crate::run::execute::CaseRunner) as a local run (supervisor, timeout, process
//! group, classification), its record written durably into the submission's `records/`.
//!
//! The task never touches results.jsonl or its lock: many tasks on many nodes finish at once, so
//! each writes its own file (a temporary name, fsynced, renamed) and the orchestrator merges them.
//! The first task on a node writes the node's environment file. When Slurm stops the task
//! (scancel, the time limit, preemption: SIGTERM), the supervisor kills the case's process group
//! and the task records the case as cancelled; the orchestrator corrects that to the ending Slurm
//! reports (timeout, preempted, ...) when it merges the record.

use std::fs::OpenOptions;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

use super::submission::{Paths, Submission};
use crate::backend::Backend;
use crate::record::{JobTask, Outcome, WrittenBy};
use crate::run::environment;
use crate::run::execute::{self, CaseRunner};
use crate::run::{interrupt, progress};
use crate::store;

/// Who this task is, from the variables Slurm sets.
#[derive(Debug, Clone)]
pub struct Identity {
    pub job_id: String,
    pub index: u32,
    pub node: String,
    pub restarts: u32,
}

impl Identity {
    pub fn from_env() -> Result<Identity> {
        let var = |name: &str| -> Result<String> {
            std::env::var(name).with_context(|| {
                format!(
                    "{name} is not set: slurm-task runs inside a Slurm array task, started by \
                     `cargo xtask bench <suite> --executor slurm`, not by hand"
                )
            })
        };
        let index = var("SLURM_ARRAY_TASK_ID")?;
        Ok(Identity {
            job_id: var("SLURM_ARRAY_JOB_ID")?,
            index: index
                .parse()
                .with_context(|| format!("SLURM_ARRAY_TASK_ID={index} is not an index"))?,
            node: std::env::var("SLURMD_NODENAME")
                .ok()
                .or_else(|| {
                    std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .ok()
                        .map(|h| h.trim().to_string())
                })
                .unwrap_or_else(|| "unknown".into()),
            // Unset until Slurm restarts the task.
            restarts: std::env::var("SLURM_RESTART_COUNT")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0),
        })
    }
}

/// Runs array `group`'s task of the submission in `submission` as `me`, and writes its record.
/// An `Err` leaves no record; the orchestrator then records the case as `lost`, pointing at the
/// task's Slurm output where this error is printed.
pub fn run(
    backends: &[Box<dyn Backend>],
    submission: &Path,
    group: usize,
    me: &Identity,
) -> Result<()> {
    let started_at = SystemTime::now();
    let sub = Submission::load(submission)?;
    let root = submission
        .parent()
        .context("the submission file has no directory")?;
    let paths = Paths {
        root: root.to_path_buf(),
    };
    let dir = paths.suite_dir();
    let Some(array) = sub.arrays.get(group) else {
        bail!(
            "{} has {} array(s), no array {group}",
            submission.display(),
            sub.arrays.len()
        );
    };
    let Some(case) = array.cases.get(me.index as usize) else {
        bail!(
            "array {group} of {} has {} case(s), no index {}",
            submission.display(),
            array.cases.len(),
            me.index
        );
    };
    let opts = sub.settings.run_options(&dir);
    // SIGTERM from Slurm sets the flag the supervisor watches, as Ctrl-C does locally.
    interrupt::install_interrupt_handler();
    let ctx = environment::probe_context(&opts, &dir);
    for d in [dir.join("logs"), dir.join("cases"), ctx.work_dir.clone()] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let probes = environment::probe(backends, &sub.cases(), &ctx);
    let env_id = sub.env_id(&me.node);
    write_node_environment(backends, &probes, &ctx, &paths, &dir, &env_id, &me.node)?;

    let runner = CaseRunner {
        backends,
        probes: &probes,
        dir: &dir,
        opts: &opts,
        env_id: &env_id,
    };
    let ran = runner.run(case)?;
    // Slurm signals every process of the task, the runner too: a runner that died of the SIGTERM
    // before the supervisor saw the flag must not read as a crash of the case.
    let stopped = interrupt::interrupted();
    let mut record = match ran {
        Some(r) if !stopped => r,
        ran => {
            let mut r = execute::bare_record(
                &execute::as_run(&opts, case),
                Outcome::Cancelled,
                format!(
                    "stopped by Slurm's SIGTERM after {}; the case's process group was killed",
                    progress::human(started_at.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0))
                ),
                started_at,
                &env_id,
            );
            r.log = ran.and_then(|r| r.log);
            r
        }
    };
    record.job = Some(JobTask {
        scheduler: "slurm".into(),
        job_id: me.job_id.clone(),
        array_index: me.index,
        restarts: me.restarts,
        node: Some(me.node.clone()),
        state: None,
        written_by: WrittenBy::Task,
        stopped_by_scheduler: stopped,
    });
    let mut line = record.to_line();
    line.push('\n');
    store::write_durably(
        &paths.record_file(&me.job_id, me.index, me.restarts),
        line.as_bytes(),
    )
}

/// The first task on a node captures the node's environment; the others find it claimed.
fn write_node_environment(
    backends: &[Box<dyn Backend>],
    probes: &environment::Probes,
    ctx: &crate::backend::RunContext,
    paths: &Paths,
    dir: &Path,
    env_id: &str,
    node: &str,
) -> Result<()> {
    let claim = paths
        .env_claims()
        .join(format!("{}.claim", env_id.trim_start_matches("env-")));
    match OpenOptions::new().write(true).create_new(true).open(&claim) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("creating {}", claim.display())),
    }
    let mut environment = environment::capture(backends, probes, ctx, SystemTime::now());
    environment.id = env_id.to_string();
    if environment.hostname.is_none() {
        environment.hostname = Some(node.to_string());
    }
    let text = serde_json::to_string_pretty(&environment).expect("environment always serializes");
    store::write_durably(
        &dir.join(format!("{env_id}.json")),
        (text + "\n").as_bytes(),
    )
}
