//! `status`: where every case of a suite stands in a results directory: its latest record, or
//! its Slurm task pending or running. Finished tasks' records are merged into results.jsonl first
//! when nobody holds the directory's lock, so a report made afterwards has them.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;

use super::progress;
use super::slurm::submission::Paths;
use super::slurm::{settle, Settled};
use crate::case::Case;
use crate::record::Record;
use crate::store::{self, Store};

/// Where one case stands.
#[derive(Debug, Clone, PartialEq)]
pub enum CaseStatus {
    /// Its task waits in Slurm's queue (with the reason, when Slurm gives one).
    Pending { job: String, reason: Option<String> },
    /// Its task runs (or is being cleaned up: `COMPLETING`) on a node.
    Running {
        job: String,
        state: String,
        node: Option<String>,
    },
    /// Its latest record.
    Done(Box<Record>),
    /// No record, and nothing queued.
    NotRun,
}

impl CaseStatus {
    /// The state column: `pending (Priority) job 12_3`, `running on n07 job 12_3`, the outcome.
    pub fn words(&self) -> String {
        match self {
            CaseStatus::Pending { job, reason } => format!(
                "pending{} job {job}",
                reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
            CaseStatus::Running { job, state, node } => format!(
                "{}{} job {job}",
                state.to_ascii_lowercase(),
                node.as_deref()
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default()
            ),
            CaseStatus::Done(r) => format!("{}{}", r.outcome, progress::short_detail(r)),
            CaseStatus::NotRun => "not run".into(),
        }
    }
}

/// The state of every case of `cases` in the suite directory `dir`, and what merging found.
pub fn status(dir: &Path, cases: &[Case]) -> Result<(Vec<CaseStatus>, Settled)> {
    let results = dir.join(store::RESULTS_FILE);
    // Looking must not create a results directory where there is none.
    let settled = if !results.exists() && !Paths::parent(dir).exists() {
        Settled::default()
    } else {
        match Store::open_if_free(dir)? {
            Some(mut store) => settle(dir, Some(&mut store), false, false)?,
            None => settle(dir, None, false, false)?,
        }
    };
    let mut latest: HashMap<String, Record> = HashMap::new();
    let read = store::read(&results)?;
    for w in &read.warnings {
        eprintln!("warning: {w}");
    }
    for r in read
        .records
        .into_iter()
        .chain(settled.unmerged.iter().cloned())
    {
        latest.insert(r.case.id.clone(), r);
    }
    let out = cases
        .iter()
        .map(|c| {
            let id = c.id();
            if let Some(a) = settled.active.iter().find(|a| a.case_id == id) {
                let job = format!("{}_{}", a.job_id, a.index);
                return if a.state == "PENDING" {
                    CaseStatus::Pending {
                        job,
                        reason: a.reason.clone(),
                    }
                } else {
                    CaseStatus::Running {
                        job,
                        state: a.state.clone(),
                        node: a.node.clone(),
                    }
                };
            }
            match latest.remove(&id) {
                Some(r) => CaseStatus::Done(Box::new(r)),
                None => CaseStatus::NotRun,
            }
        })
        .collect();
    Ok((out, settled))
}

/// Prints the status of each case, a count per state, and what was merged, to stdout.
pub fn print(cases: &[Case], statuses: &[CaseStatus], settled: &Settled) {
    let (mut pending, mut running, mut done, mut not_run) = (0, 0, 0, 0);
    for (c, s) in cases.iter().zip(statuses) {
        match s {
            CaseStatus::Pending { .. } => pending += 1,
            CaseStatus::Running { .. } => running += 1,
            CaseStatus::Done(_) => done += 1,
            CaseStatus::NotRun => not_run += 1,
        }
        println!("{} {}  {}", c.id(), progress::describe(c), s.words());
    }
    println!(
        "{} case(s): {pending} pending, {running} running, {done} done, {not_run} not run",
        cases.len()
    );
    if settled.merged > 0 {
        println!(
            "merged {} record(s) of finished Slurm tasks into results.jsonl",
            settled.merged
        );
    }
    if !settled.unmerged.is_empty() {
        println!(
            "{} finished task(s) not merged yet: a bench holds the results directory and merges them",
            settled.unmerged.len()
        );
    }
}
