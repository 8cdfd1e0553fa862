//! Bringing the tasks' records home: a [`Tracker`] follows one submission, taking each task's
//! record file once Slurm says the task has ended, completing it with Slurm's final state, and
//! writing a record from Slurm's account for a task that ended without one. [`settle`] does this
//! for every submission into a results directory (before a run, and for `status`).
//!
//! Merging is idempotent: a record is identified by its job id, array index, restart count and
//! author ([`Key`]); a file whose record is already in results.jsonl (the orchestrator died
//! between appending it and moving the file to `merged/`) is moved without being appended again,
//! and a task that has a record is never given a second one from Slurm's account. A record that
//! shows up late, after Slurm's account was written for its task, is still merged: it comes later
//! in results.jsonl, so it is the case's latest record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use super::scheduler::{stop_cause_in_output, Cli, JobView, TaskInfo};
use super::submission::{Paths, Submission};
use crate::case::Case;
use crate::record::{JobTask, Outcome, Record, WrittenBy};
use crate::run::execute;
use crate::run::progress;
use crate::store::{self, Store};

/// How long a task that Slurm says has ended may go without its record file showing up before
/// the orchestrator writes one from Slurm's account: the task writes its file before it exits,
/// but a shared file system may show another node's new file a little late.
/// `FLEXBENCH_SLURM_GRACE_S` changes it.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

pub fn grace() -> Duration {
    std::env::var("FLEXBENCH_SLURM_GRACE_S")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_GRACE)
}

/// What identifies a scheduled case's record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub job_id: String,
    pub index: u32,
    pub restarts: u32,
    pub written_by: WrittenBy,
}

impl Key {
    pub fn of(r: &Record) -> Option<Key> {
        r.job.as_ref().map(|j| Key {
            job_id: j.job_id.clone(),
            index: j.array_index,
            restarts: j.restarts,
            written_by: j.written_by,
        })
    }
}

/// A task still queued or running, for progress lines and `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active {
    pub case_id: String,
    pub job_id: String,
    pub index: u32,
    pub state: String,
    pub reason: Option<String>,
    pub node: Option<String>,
}

/// What one [`Tracker::poll`] found.
#[derive(Debug, Default)]
pub struct Poll {
    /// Records to append to results.jsonl, then to pass to [`Tracker::merged`].
    pub ready: Vec<Record>,
    pub active: Vec<Active>,
    /// Tasks that have ended without a record yet, still within the grace period.
    pub settling: usize,
    pub warnings: Vec<String>,
}

impl Poll {
    /// Every task has ended and has its record (merged, or in `ready`).
    pub fn finished(&self) -> bool {
        self.active.is_empty() && self.settling == 0
    }
}

/// Follows the tasks of one submission.
pub struct Tracker {
    pub paths: Paths,
    pub sub: Submission,
    cli: Cli,
    /// Keys of this submission's records already in results.jsonl.
    merged: HashSet<Key>,
    /// Records handed out by `poll` and not yet merged, with the file each came from.
    outstanding: HashMap<Key, Option<PathBuf>>,
    ended_unrecorded: HashMap<(String, u32), Instant>,
    grace: Duration,
}

impl Tracker {
    /// A tracker for `sub`, given the records results.jsonl already holds.
    pub fn new(paths: Paths, sub: Submission, results: &[Record]) -> Tracker {
        let jobs: HashSet<&str> = sub
            .arrays
            .iter()
            .filter_map(|a| a.job_id.as_deref())
            .collect();
        let merged = results
            .iter()
            .filter_map(Key::of)
            .filter(|k| jobs.contains(k.job_id.as_str()))
            .collect();
        Tracker {
            paths,
            sub,
            cli: Cli::default(),
            merged,
            outstanding: HashMap::new(),
            ended_unrecorded: HashMap::new(),
            grace: grace(),
        }
    }

    pub fn open(paths: Paths, results: &[Record]) -> Result<Tracker> {
        let sub = Submission::load(&paths.submission())?;
        Ok(Tracker::new(paths, sub, results))
    }

    /// The record files in `records/` not yet merged, by task. Files of records already in
    /// results.jsonl are moved to `merged/` on the way.
    fn scan(&mut self, warnings: &mut Vec<String>) -> Result<BTreeMap<(String, u32), Vec<Record>>> {
        let dir = self.paths.records();
        let mut found: BTreeMap<(String, u32), Vec<Record>> = BTreeMap::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            // Dot files are other writers' temporary names: a record is there once renamed.
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let record = match Record::from_line(text.trim()) {
                Ok(r) => r,
                Err(e) => {
                    warnings.push(format!("{}: skipped: {e:#}", path.display()));
                    continue;
                }
            };
            let Some(key) = Key::of(&record) else {
                warnings.push(format!(
                    "{}: skipped: a record without its job and task",
                    path.display()
                ));
                continue;
            };
            if self.merged.contains(&key) {
                self.move_to_merged(&path)?;
                continue;
            }
            if self.outstanding.contains_key(&key) {
                continue;
            }
            found
                .entry((key.job_id.clone(), key.index))
                .or_default()
                .push(record);
        }
        Ok(found)
    }

    fn move_to_merged(&self, file: &Path) -> Result<()> {
        let to = self
            .paths
            .merged()
            .join(file.file_name().unwrap_or_default());
        match std::fs::rename(file, &to) {
            Ok(()) => Ok(()),
            // Moved already (by a `status` running beside us).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                Err(e).with_context(|| format!("moving {} to {}", file.display(), to.display()))
            }
        }
    }

    /// Looks at the record files and asks Slurm how the tasks are doing.
    pub fn poll(&mut self) -> Result<Poll> {
        let mut poll = Poll::default();
        let mut files = self.scan(&mut poll.warnings)?;
        let sub = self.sub.clone();
        for array in &sub.arrays {
            // An array sbatch never accepted has no tasks.
            let Some(job_id) = array.job_id.as_deref() else {
                continue;
            };
            let view = self.cli.job(job_id).with_context(|| {
                format!(
                    "following submission {}; run this where Slurm's commands reach the cluster, \
                     or remove {} to forget that submission",
                    self.sub.stamp,
                    self.paths.root.display()
                )
            })?;
            let mut accounting: Option<Option<BTreeMap<u32, TaskInfo>>> = None;
            for (i, case) in array.cases.iter().enumerate() {
                let index = i as u32;
                let task = (job_id.to_string(), index);
                let listed = match &view {
                    JobView::Known(tasks) => tasks.get(&index).cloned(),
                    JobView::Forgotten => None,
                };
                if let Some(info) = listed.as_ref().filter(|t| t.active()) {
                    poll.active.push(Active {
                        case_id: case.id(),
                        job_id: job_id.to_string(),
                        index,
                        state: info.state.clone(),
                        reason: info.reason.clone(),
                        node: info.node.clone(),
                    });
                    continue;
                }
                let forgotten = listed.is_none();
                let info = match listed {
                    Some(t) => Some(t),
                    None => {
                        let acct = match &accounting {
                            Some(a) => a.clone(),
                            None => {
                                let a = self.cli.accounting(job_id)?;
                                accounting = Some(a.clone());
                                a
                            }
                        };
                        acct.and_then(|a| a.get(&index).cloned())
                    }
                };
                if let Some(records) = files.remove(&task) {
                    for r in records {
                        let r = self.complete(r, info.as_ref());
                        self.hand_out(&r, true);
                        poll.ready.push(r);
                    }
                    continue;
                }
                if self.has_record(&task, info.as_ref().map(|t| t.restarts)) {
                    continue;
                }
                let first = *self
                    .ended_unrecorded
                    .entry(task)
                    .or_insert_with(Instant::now);
                if !forgotten && first.elapsed() < self.grace {
                    poll.settling += 1;
                    continue;
                }
                let r = self.record_from_account(job_id, index, case, info.as_ref());
                self.hand_out(&r, false);
                poll.ready.push(r);
            }
        }
        Ok(poll)
    }

    /// Records of a settled submission that showed up after it was settled.
    pub fn late_records(&mut self) -> Result<(Vec<Record>, Vec<String>)> {
        let mut warnings = Vec::new();
        let files = self.scan(&mut warnings)?;
        let mut out = Vec::new();
        for r in files.into_values().flatten() {
            let r = self.complete(r, None);
            self.hand_out(&r, true);
            out.push(r);
        }
        Ok((out, warnings))
    }

    fn hand_out(&mut self, r: &Record, from_file: bool) {
        if let (Some(key), Some(job)) = (Key::of(r), r.job.as_ref()) {
            let file = from_file.then(|| {
                self.paths
                    .record_file(&job.job_id, job.array_index, job.restarts)
            });
            self.outstanding.insert(key, file);
        }
    }

    fn has_record(&self, task: &(String, u32), restarts: Option<u32>) -> bool {
        self.merged.iter().chain(self.outstanding.keys()).any(|k| {
            k.job_id == task.0 && k.index == task.1 && restarts.is_none_or(|r| k.restarts == r)
        })
    }

    /// `record`, handed out by [`Tracker::poll`], is in results.jsonl now.
    pub fn merged(&mut self, record: &Record) -> Result<()> {
        let Some(key) = Key::of(record) else {
            return Ok(());
        };
        if let Some(Some(file)) = self.outstanding.remove(&key) {
            self.move_to_merged(&file)?;
        }
        self.merged.insert(key);
        Ok(())
    }

    /// Marks the submission as having nothing more to come from Slurm.
    pub fn mark_settled(&self) -> Result<()> {
        store::write_durably(
            &self.paths.settled(),
            format!("{}\n", self.sub.job_ids()).as_bytes(),
        )
    }

    /// The task's output file, relative to the suite directory (where record logs are).
    fn out_rel(&self, job_id: &str, index: u32) -> String {
        format!("slurm/{}/out/{job_id}_{index}.out", self.sub.stamp)
    }

    /// A task's record with what Slurm says of its ending: the final state, and for a task
    /// Slurm stopped, the outcome of that stop (the task itself cannot tell a time limit from a
    /// scancel: both are a SIGTERM).
    fn complete(&self, mut r: Record, info: Option<&TaskInfo>) -> Record {
        let Some(job) = r.job.as_mut() else {
            return r;
        };
        if let Some(info) = info {
            job.state = Some(info.state.clone());
            if job.node.is_none() {
                job.node = info.node.clone();
            }
        }
        if !job.stopped_by_scheduler {
            return r;
        }
        let cause = info.and_then(TaskInfo::scheduler_outcome).or_else(|| {
            let out = self.paths.out_file(&job.job_id, job.array_index);
            stop_cause_in_output(&std::fs::read_to_string(out).unwrap_or_default())
        });
        let cause = cause.unwrap_or(Outcome::Cancelled);
        let said = match &job.state {
            Some(s) => format!(" (Slurm state {s})"),
            None => String::new(),
        };
        r.detail = format!(
            "{}{said}; {}",
            stop_words(cause, job.node.as_deref()),
            r.detail
        );
        r.outcome = cause;
        r
    }

    /// The record of a task that ended without writing one, from Slurm's account of it.
    fn record_from_account(
        &self,
        job_id: &str,
        index: u32,
        case: &Case,
        info: Option<&TaskInfo>,
    ) -> Record {
        let out_rel = self.out_rel(job_id, index);
        let (outcome, why) = match info {
            Some(t) => match t.scheduler_outcome() {
                Some(o) => (o, ended_words(o, t)),
                None => (
                    Outcome::Lost,
                    format!(
                        "the task ended (Slurm state {}, exit code {}) without writing a record",
                        t.state,
                        t.exit_code.as_deref().unwrap_or("unknown")
                    ),
                ),
            },
            None => {
                let text =
                    std::fs::read_to_string(self.paths.out_file(job_id, index)).unwrap_or_default();
                match stop_cause_in_output(&text) {
                    Some(o) => (
                        o,
                        format!(
                            "{} (says the task's Slurm output; Slurm no longer knows the job), \
                             before the task recorded anything",
                            stop_words(o, None)
                        ),
                    ),
                    None => (
                        Outcome::Lost,
                        "the task wrote no record, and Slurm no longer knows it (it ended more than \
                         MinJobAge ago, and the cluster keeps no accounting to ask)"
                            .to_string(),
                    ),
                }
            }
        };
        let opts = self.sub.settings.run_options(&self.paths.suite_dir());
        let node = info.and_then(|t| t.node.clone());
        let env_id = node
            .as_deref()
            .map(|n| self.sub.env_id(n))
            .filter(|id| self.paths.suite_dir().join(format!("{id}.json")).is_file())
            .unwrap_or_default();
        let mut r = execute::bare_record(
            &execute::as_run(&opts, case),
            outcome,
            format!("{why}; the task's own output is in {out_rel}"),
            SystemTime::now(),
            &env_id,
        );
        r.log = Some(out_rel);
        r.job = Some(JobTask {
            scheduler: "slurm".into(),
            job_id: job_id.to_string(),
            array_index: index,
            restarts: info.map_or(0, |t| t.restarts),
            node,
            state: info.map(|t| t.state.clone()),
            written_by: WrittenBy::Scheduler,
            stopped_by_scheduler: false,
        });
        r
    }
}

/// Why Slurm stopped a running task, in words.
fn stop_words(o: Outcome, node: Option<&str>) -> String {
    let on = node.map(|n| format!(" on {n}")).unwrap_or_default();
    match o {
        Outcome::Timeout => {
            format!("Slurm's time limit ended the task{on} (the case's timeout plus a margin)")
        }
        Outcome::Preempted => format!("Slurm preempted the task{on}"),
        Outcome::NodeFail => format!("the node{on} failed"),
        Outcome::Oom => {
            format!("Slurm stopped the task{on} for using more memory than it asked for (--mem)")
        }
        _ => format!("by scancel while running{on}"),
    }
}

/// How a task that left no record ended, in words.
fn ended_words(o: Outcome, t: &TaskInfo) -> String {
    match (o, &t.node) {
        (Outcome::Cancelled, None) => "by scancel before it started".to_string(),
        (Outcome::Cancelled, Some(n)) => {
            format!("by scancel while running on {n}, before the task recorded anything")
        }
        (Outcome::NodeFail, n) => format!(
            "the node {} failed while the task ran (Slurm state {})",
            n.as_deref().unwrap_or("(unknown)"),
            t.state
        ),
        (o, n) => format!(
            "{}, before the task recorded anything",
            stop_words(o, n.as_deref())
        ),
    }
}

/// What [`settle`] brought in and found still going.
#[derive(Debug, Default)]
pub struct Settled {
    /// Tasks still queued or running.
    pub active: Vec<Active>,
    /// Records appended to results.jsonl.
    pub merged: usize,
    /// Records found but not appended (no store given: another process holds the lock).
    pub unmerged: Vec<Record>,
}

/// Brings every submission into the suite directory `dir` into results.jsonl as far as it has
/// come (through `store`; without one, only looks), waiting out the grace period of tasks that
/// just ended when `wait_for_endings` is set. Prints a line per merged record when `progress`.
pub fn settle(
    dir: &Path,
    mut store: Option<&mut Store>,
    wait_for_endings: bool,
    progress: bool,
) -> Result<Settled> {
    let mut settled = Settled::default();
    let submissions = Paths::all(dir)?;
    if submissions.is_empty() {
        return Ok(settled);
    }
    let results = store::read(&dir.join(store::RESULTS_FILE))?.records;
    for paths in submissions {
        let was_settled = paths.settled().is_file();
        let mut tracker = Tracker::open(paths, &results)?;
        loop {
            let (ready, warnings, poll) = if was_settled {
                let (ready, warnings) = tracker.late_records()?;
                (ready, warnings, None)
            } else {
                let mut poll = tracker.poll()?;
                (
                    std::mem::take(&mut poll.ready),
                    std::mem::take(&mut poll.warnings),
                    Some(poll),
                )
            };
            for w in warnings {
                eprintln!("warning: {w}");
            }
            for r in ready {
                match store.as_deref_mut() {
                    Some(s) => {
                        s.append(&r)?;
                        tracker.merged(&r)?;
                        settled.merged += 1;
                        if progress {
                            eprintln!(
                                "merged from Slurm submission {}: {}",
                                tracker.sub.stamp,
                                progress::line(settled.merged, settled.merged, &r)
                            );
                        }
                    }
                    None => settled.unmerged.push(r),
                }
            }
            let Some(poll) = poll else { break };
            if poll.settling > 0 && wait_for_endings {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            if poll.finished() && store.is_some() {
                tracker.mark_settled()?;
            }
            settled.active.extend(poll.active);
            break;
        }
    }
    Ok(settled)
}

/// Before a run: merges what earlier submissions left and refuses while one still has tasks
/// queued or running, as the lock refuses a second local run.
pub fn settle_earlier(dir: &Path, store: &mut Store, progress: bool) -> Result<()> {
    let settled = settle(dir, Some(store), true, progress)?;
    if settled.active.is_empty() {
        return Ok(());
    }
    let mut jobs: Vec<&str> = settled.active.iter().map(|a| a.job_id.as_str()).collect();
    jobs.dedup();
    let running = settled
        .active
        .iter()
        .filter(|a| a.state != "PENDING")
        .count();
    let suite = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    bail!(
        "Slurm job(s) {} of an earlier submission into {} still have {} task(s) queued or running \
         ({running} running); wait for them to end (`cargo xtask status {suite}` shows them) or \
         cancel them (`scancel {}`) before running this suite into the same directory again",
        jobs.join(","),
        dir.display(),
        settled.active.len(),
        jobs.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::slurm::submission::Settings;

    fn submission(dir: &Path, n: usize) -> (Paths, Submission) {
        let paths = Paths::new(dir, "20260101T000000.000Z");
        paths.create().unwrap();
        let cases: Vec<Case> = (0..n)
            .map(|i| Case {
                prompt_len: 8 + i,
                ..Case::example("e")
            })
            .collect();
        let sub = Submission {
            suite: "s".into(),
            stamp: "20260101T000000.000Z".into(),
            submitted_at: "t".into(),
            settings: Settings {
                project_root: "/p".into(),
                cache_dir: "/c".into(),
                bin_dir: "/b".into(),
                python: None,
                timeout_override_s: None,
                work_dir: None,
            },
            arrays: vec![super::super::submission::Array {
                request: super::super::submission::Request {
                    time_limit_min: Some(5),
                    mem_mib: None,
                    gpus: 0,
                },
                cases,
                job_id: Some("41".into()),
                sbatch: Vec::new(),
            }],
        };
        sub.save(&paths.submission()).unwrap();
        (paths, sub)
    }

    fn task_record(sub: &Submission, index: u32) -> Record {
        let mut r = execute::bare_record(
            &sub.arrays[0].cases[index as usize],
            Outcome::Ok,
            String::new(),
            SystemTime::now(),
            "env-x",
        );
        r.job = Some(JobTask {
            scheduler: "slurm".into(),
            job_id: "41".into(),
            array_index: index,
            restarts: 0,
            node: Some("n1".into()),
            state: None,
            written_by: WrittenBy::Task,
            stopped_by_scheduler: false,
        });
        r
    }

    /// The merge path without Slurm: late records of a settled submission (what a crash between
    /// appending and moving leaves, too) are merged once, however often the merge runs.
    #[test]
    fn merging_twice_appends_once_and_a_torn_temp_file_is_ignored() {
        let tmp = std::env::temp_dir().join(format!("flexbench-collect-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let dir = tmp.join("s");
        let (paths, sub) = submission(&dir, 2);
        std::fs::write(paths.settled(), "41\n").unwrap();
        for i in 0..2 {
            let line = task_record(&sub, i).to_line();
            store::write_durably(&paths.record_file("41", i, 0), line.as_bytes()).unwrap();
        }
        // A writer that died before its rename leaves a dot file with half a record.
        std::fs::write(
            paths.records().join(".41_1.0.json.tmp-n1-7-9"),
            "{\"schema\":1,",
        )
        .unwrap();
        let mut store = Store::open(&dir).unwrap();
        let first = settle(&dir, Some(&mut store), true, false).unwrap();
        assert_eq!(first.merged, 2);
        // As if the orchestrator had died after appending, before moving the file.
        std::fs::copy(
            paths.merged().join("41_0.0.json"),
            paths.record_file("41", 0, 0),
        )
        .unwrap();
        let again = settle(&dir, Some(&mut store), true, false).unwrap();
        assert_eq!(again.merged, 0);
        assert!(
            !paths.record_file("41", 0, 0).exists(),
            "moved, not appended"
        );
        let recs = store::read(&dir.join(store::RESULTS_FILE)).unwrap();
        assert!(recs.warnings.is_empty(), "{:?}", recs.warnings);
        let mut keys: Vec<Key> = recs.records.iter().filter_map(Key::of).collect();
        keys.sort_by_key(|k| k.index);
        assert_eq!(keys.len(), 2);
        assert_eq!((keys[0].index, keys[1].index), (0, 1));
        // Without the lock, settle only looks.
        drop(store);
        std::fs::copy(
            paths.merged().join("41_1.0.json"),
            paths.record_file("41", 1, 0),
        )
        .unwrap();
        let look = settle(&dir, None, true, false).unwrap();
        assert_eq!(look.merged, 0);
        assert_eq!(look.unmerged.len(), 0, "already in results.jsonl");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
