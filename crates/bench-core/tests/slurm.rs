//! The Slurm executor against a real Slurm (the local test cluster of `scripts/slurm-local.sh`
//! in CI): `flexbench-test-driver --executor slurm` submits fake-runner cases as job arrays, and
//! the tests check what reaches results.jsonl. Skipped, saying why, where no cluster answers,
//! unless `FLEXBENCH_REQUIRE_SLURM=1`.
//!
//! The tests take turns (one lock): they share the cluster's CPUs, and one of them needs two
//! tasks running at the same moment.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bench_core::record::WrittenBy;
use bench_core::run::slurm::submission::{Paths, Submission};
use bench_core::store;
use bench_core::testkit::{slurm_ready, TestSlurm};
use bench_core::{Outcome, Record, Weights};
use common::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn driver(slurm: &TestSlurm, suite: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = slurm.command(DRIVER);
    cmd.arg(suite)
        .arg(out)
        .args(["--executor", "slurm"])
        .args(extra);
    cmd
}

fn drive_slurm(slurm: &TestSlurm, suite: &Path, out: &Path, extra: &[&str]) -> Output {
    driver(slurm, suite, out, extra).output().unwrap()
}

fn status(slurm: &TestSlurm, suite: &Path, out: &Path) -> String {
    let o = slurm
        .command(DRIVER)
        .arg("status")
        .arg(suite)
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits for the `hang` case of the suite in `dir` to run on its node; its runner's child's pid.
fn hang_started(dir: &Path) -> i32 {
    let mut grandchild = None;
    wait_for("the hanging case to start", Duration::from_secs(60), || {
        grandchild = grandchild_in_logs(dir);
        grandchild.is_some()
    });
    grandchild.unwrap()
}

fn submissions(dir: &Path) -> Vec<(Paths, Submission)> {
    Paths::all(dir)
        .unwrap()
        .into_iter()
        .map(|p| {
            let s = Submission::load(&p.submission()).unwrap();
            (p, s)
        })
        .collect()
}

fn behavior(r: &Record) -> String {
    match &r.case.case.weights {
        Weights::Checkpoint(p) => p.display().to_string(),
        Weights::Dummy => "dummy".into(),
    }
}

fn hostname() -> String {
    let o = Command::new("hostname").arg("-s").output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Milliseconds since the epoch of an RFC 3339 record time (`2026-12-01T21:39:07.123Z`).
fn epoch_ms(t: &str) -> i64 {
    let n = |a: usize, b: usize| t[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let days = era * 146097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719468;
    ((days * 24 + n(11, 13)) * 60 + n(14, 16)) * 60_000 + n(17, 19) * 1000 + n(20, 23)
}

#[test]
fn record_times_read_back() {
    let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
    assert_eq!(
        epoch_ms(&bench_core::record::time::rfc3339(t)),
        1_709_210_096_789
    );
}

#[test]
fn faults_end_as_they_do_locally_and_each_record_names_its_task() {
    let Some(slurm) = slurm_ready() else { return };
    let _turn = serial();
    let tmp = TempDir::new("slurm-faults");
    let cases = every_fault();
    let suite = write_suite(&tmp.0, "faults", &cases);

    let local = drive(&suite, &tmp.0.join("local"), &["--timeout", "2"]);
    assert_eq!(local.status.code(), Some(1));
    let local = records(&tmp.0.join("local/faults/results.jsonl"));

    let out = tmp.0.join("slurm");
    let dir = out.join("faults");
    // The cuda case asks for no GPU (the test cluster has none), so it reaches the node and is
    // found unavailable there, as locally.
    // Short timeouts, followed to the end, and no GPU asked for the cuda case.
    let args = ["--timeout", "2", "--wait", "--gpus-per-task", "0"];
    let o = drive_slurm(
        &slurm,
        &suite,
        &out,
        &[&args[..], &["--max-parallel", "2"]].concat(),
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "failures make the exit code 1\n{stderr}"
    );
    let recs = records(&dir.join("results.jsonl"));
    assert_eq!(recs.len(), cases.len(), "{stderr}");
    let outcomes = |rs: &[Record]| -> BTreeMap<String, Outcome> {
        rs.iter().map(|r| (r.case.id.clone(), r.outcome)).collect()
    };
    assert_eq!(outcomes(&recs), outcomes(&local), "{stderr}");
    for r in &recs {
        assert_eq!(
            (r.outcome, r.detail.lines().next()),
            local
                .iter()
                .find(|l| l.case.id == r.case.id)
                .map(|l| (l.outcome, l.detail.lines().next()))
                .unwrap(),
            "{}",
            behavior(r)
        );
    }

    let subs = submissions(&dir);
    assert_eq!(subs.len(), 1);
    let (paths, sub) = &subs[0];
    // Like cases, one array, throttled as asked.
    assert_eq!(sub.arrays.len(), 1);
    let job_id = sub.arrays[0].job_id.clone().unwrap();
    let range = format!("--array=0-{}%2", cases.len() - 1);
    assert!(
        sub.arrays[0].sbatch.contains(&range),
        "{:?}",
        sub.arrays[0].sbatch
    );
    let node = hostname();
    let mut indices = BTreeSet::new();
    for r in &recs {
        let job = r.job.as_ref().expect("every record names its task");
        assert_eq!(job.scheduler, "slurm");
        assert_eq!(job.job_id, job_id);
        assert_eq!(job.node.as_deref(), Some(node.as_str()));
        assert_eq!(job.written_by, WrittenBy::Task);
        assert_eq!(job.state.as_deref(), Some("COMPLETED"), "{}", behavior(r));
        assert_eq!(
            sub.arrays[0].cases[job.array_index as usize].id(),
            r.case.id,
            "task {} ran its own case",
            job.array_index
        );
        indices.insert(job.array_index);
        assert_eq!(r.env_id, sub.env_id(&node));
    }
    assert_eq!(indices.len(), cases.len());
    // One environment file for the node, with what it found there.
    let env: bench_core::env::Environment = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{}.json", sub.env_id(&node)))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        env.backends.get("fake").map(String::as_str),
        Some("available")
    );
    // The timed-out case's process group died with it on the node too.
    let hang = recs.iter().find(|r| behavior(r) == "hang").unwrap();
    let log = std::fs::read_to_string(dir.join(hang.log.as_ref().unwrap())).unwrap();
    let pid: i32 = log
        .lines()
        .find_map(|l| l.strip_prefix("grandchild pid "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until("the grandchild to die", || process_gone(pid));
    // Every task's file was merged once and moved aside; the submission is settled.
    assert_eq!(std::fs::read_dir(paths.records()).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(paths.merged()).unwrap().count(),
        cases.len()
    );
    assert!(paths.settled().is_file());
    let progress = stderr
        .lines()
        .filter(|l| {
            l.starts_with('[') && l.contains("ETA") && l.contains(&format!("(job {job_id}_"))
        })
        .count();
    assert_eq!(progress, cases.len(), "{stderr}");

    // --rerun-failed across submissions: a new job with only the failed cases.
    let failed: BTreeSet<String> = recs
        .iter()
        .filter(|r| r.outcome.is_failure())
        .map(|r| r.case.id.clone())
        .collect();
    let o = drive_slurm(
        &slurm,
        &suite,
        &out,
        &[&args[..], &["--rerun-failed"]].concat(),
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let after = records(&dir.join("results.jsonl"));
    let rerun: BTreeSet<String> = after[recs.len()..]
        .iter()
        .map(|r| r.case.id.clone())
        .collect();
    assert_eq!(rerun, failed);
    assert_eq!(after.len(), recs.len() + failed.len());
    assert!(after[recs.len()..]
        .iter()
        .all(|r| r.job.as_ref().unwrap().job_id != job_id));
    assert_every_line_parses(&dir.join("results.jsonl"));
}

#[test]
fn two_tasks_ending_at_the_same_moment_both_keep_their_records() {
    let Some(slurm) = slurm_ready() else { return };
    let _turn = serial();
    let tmp = TempDir::new("slurm-together");
    // Both runners sleep until the same instant, far enough ahead for both tasks to be running.
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 6000;
    let until = format!("until-{at}");
    let suite = write_suite(
        &tmp.0,
        "together",
        &[case(&until, 16, ""), case(&until, 32, "")],
    );
    let out = tmp.0.join("results");
    let o = drive_slurm(&slurm, &suite, &out, &["--wait"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    let recs = records(&out.join("together/results.jsonl"));
    assert_eq!(recs.len(), 2, "{stderr}");
    assert!(recs.iter().all(|r| r.outcome == Outcome::Ok), "{recs:?}");
    let indices: BTreeSet<u32> = recs
        .iter()
        .map(|r| r.job.as_ref().unwrap().array_index)
        .collect();
    assert_eq!(indices, BTreeSet::from([0, 1]));
    // They did end together: both after the instant, within a moment of each other.
    let ends: Vec<i64> = recs.iter().map(|r| epoch_ms(&r.finished_at)).collect();
    assert!(ends.iter().all(|&e| e >= at as i64), "{ends:?} vs {at}");
    assert!((ends[0] - ends[1]).abs() < 1000, "{ends:?}");
    let (paths, _) = &submissions(&out.join("together"))[0];
    assert_eq!(std::fs::read_dir(paths.merged()).unwrap().count(), 2);
}

#[test]
fn a_cancelled_task_is_recorded_and_a_resubmission_runs_only_its_case() {
    let Some(slurm) = slurm_ready() else { return };
    let _turn = serial();
    let tmp = TempDir::new("slurm-cancel");
    let suite = write_suite(
        &tmp.0,
        "cancel",
        &[case("ok", 8, ""), case("ok", 16, ""), case("hang", 32, "")],
    );
    let out = tmp.0.join("results");
    let dir = out.join("cancel");

    // Without --wait: submitted, and the command returns.
    let o = drive_slurm(&slurm, &suite, &out, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("scancel") && stderr.contains("status"),
        "{stderr}"
    );
    let (_, sub) = &submissions(&dir)[0];
    let job = sub.arrays[0].job_id.clone().unwrap();
    let hang_index = sub.arrays[0]
        .cases
        .iter()
        .position(|c| c.weights == Weights::Checkpoint("hang".into()))
        .unwrap();

    // While it runs, neither another submission nor a local run may use the directory.
    let grandchild = hang_started(&dir);
    let again = drive_slurm(&slurm, &suite, &out, &[]);
    let again_err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(2), "{again_err}");
    assert!(
        again_err.contains("still have") && again_err.contains(&job),
        "{again_err}"
    );
    let local = drive(&suite, &out, &[]);
    assert_eq!(local.status.code(), Some(2));
    assert_eq!(submissions(&dir).len(), 1, "nothing more was submitted");

    // `status` shows it running, and merges the finished ones.
    let mut shown = String::new();
    wait_for(
        "status to show 2 done, 1 running",
        Duration::from_secs(60),
        || {
            shown = status(&slurm, &suite, &out);
            shown.contains("0 pending, 1 running, 2 done")
        },
    );
    assert!(
        shown.contains(&format!("running on {} job {job}_{hang_index}", hostname())),
        "{shown}"
    );
    assert_eq!(records(&dir.join("results.jsonl")).len(), 2);

    let cancelled = slurm
        .command("scancel")
        .arg(format!("{job}_{hang_index}"))
        .status()
        .unwrap();
    assert!(cancelled.success());
    wait_for(
        "status to show the cancelled case",
        Duration::from_secs(60),
        || {
            shown = status(&slurm, &suite, &out);
            shown.contains("0 running, 3 done")
        },
    );
    let recs = records(&dir.join("results.jsonl"));
    assert_eq!(recs.len(), 3, "{shown}");
    let hang = recs.iter().find(|r| behavior(r) == "hang").unwrap();
    assert_eq!(hang.outcome, Outcome::Cancelled, "{}", hang.detail);
    assert!(hang.detail.contains("scancel"), "{}", hang.detail);
    let task = hang.job.as_ref().unwrap();
    assert!(task.stopped_by_scheduler);
    assert_eq!(task.state.as_deref(), Some("CANCELLED"));
    assert_eq!(task.array_index as usize, hang_index);
    wait_until("the cancelled case's group to die", || {
        process_gone(grandchild)
    });

    // The resubmission runs the cancelled case only (here into its timeout).
    let o = drive_slurm(&slurm, &suite, &out, &["--wait", "--timeout", "1"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("3 case(s), 1 to run"), "{stderr}");
    let after = records(&dir.join("results.jsonl"));
    assert_eq!(after.len(), 4);
    assert_eq!(after[3].case.id, hang.case.id);
    assert_eq!(after[3].outcome, Outcome::Timeout);
    assert_ne!(after[3].job.as_ref().unwrap().job_id, job);
}

#[test]
fn ctrl_c_with_wait_cancels_the_job_and_records_what_ran() {
    let Some(slurm) = slurm_ready() else { return };
    let _turn = serial();
    let tmp = TempDir::new("slurm-sigint");
    let suite = write_suite(&tmp.0, "sigint", &[case("ok", 8, ""), case("hang", 16, "")]);
    let out = tmp.0.join("results");
    let dir = out.join("sigint");
    let child = driver(&slurm, &suite, &out, &["--wait"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let grandchild = hang_started(&dir);
    wait_for("the ok case's record", Duration::from_secs(60), || {
        store::read(&dir.join("results.jsonl")).is_ok_and(|r| r.records.len() == 1)
    });
    // SAFETY: sending SIGINT to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("scancel"), "{stderr}");
    let (_, sub) = &submissions(&dir)[0];
    let job = sub.arrays[0].job_id.clone().unwrap();
    let queued = slurm
        .command("squeue")
        .args(["-h", "-j", &job])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&queued.stdout).trim(),
        "",
        "job {job} still queued"
    );
    let recs = records(&dir.join("results.jsonl"));
    let by: BTreeMap<String, Outcome> = recs.iter().map(|r| (behavior(r), r.outcome)).collect();
    assert_eq!(
        by,
        BTreeMap::from([
            ("ok".into(), Outcome::Ok),
            ("hang".into(), Outcome::Cancelled)
        ]),
        "{stderr}"
    );
    wait_until("the hanging case's group to die", || {
        process_gone(grandchild)
    });
}

#[test]
fn a_task_killed_without_a_word_is_recorded_as_lost() {
    let Some(slurm) = slurm_ready() else { return };
    let _turn = serial();
    let tmp = TempDir::new("slurm-lost");
    let suite = write_suite(&tmp.0, "lost", &[case("hang", 8, "")]);
    let out = tmp.0.join("results");
    let dir = out.join("lost");
    let child = driver(&slurm, &suite, &out, &["--wait"])
        .env("FLEXBENCH_SLURM_GRACE_S", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let grandchild = hang_started(&dir);
    let runner = parent_of(grandchild).unwrap();
    let task = parent_of(runner).unwrap();
    let cmdline = std::fs::read_to_string(format!("/proc/{task}/cmdline")).unwrap();
    assert!(cmdline.contains("slurm-task"), "{cmdline:?}");
    // SIGKILL leaves the task no chance to write anything; the runner it leaves behind is ours
    // to end (Slurm's linuxproc tracking loses processes whose parent died).
    for pid in [task, runner, grandchild] {
        // SAFETY: killing processes this test's driver started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "lost is a failure\n{stderr}");
    let recs = records(&dir.join("results.jsonl"));
    assert_eq!(recs.len(), 1, "{stderr}");
    let r = &recs[0];
    assert_eq!(r.outcome, Outcome::Lost, "{}", r.detail);
    let job = r.job.as_ref().unwrap();
    assert_eq!(job.written_by, WrittenBy::Scheduler);
    assert_eq!(job.state.as_deref(), Some("FAILED"));
    assert!(
        r.detail.contains("without writing a record"),
        "{}",
        r.detail
    );
    let log = r.log.as_ref().unwrap();
    assert!(
        log.starts_with("slurm/") && dir.join(log).is_file(),
        "{log}"
    );
}

#[test]
fn a_submission_sbatch_refuses_leaves_nothing_behind() {
    let Some(slurm) = slurm_ready() else { return };
    let _turn = serial();
    let tmp = TempDir::new("slurm-refused");
    let suite = write_suite(&tmp.0, "refused", &[case("ok", 8, "")]);
    let out = tmp.0.join("results");
    // More memory than any node has.
    let o = drive_slurm(&slurm, &suite, &out, &["--sbatch-arg", "--mem=999999999"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("sbatch --test-only")
            && stderr.contains("node configuration is not available")
            && stderr.contains("nothing of it runs"),
        "{stderr}"
    );
    assert!(submissions(&out.join("refused")).is_empty());
    assert!(records(&out.join("refused/results.jsonl")).is_empty());
}
