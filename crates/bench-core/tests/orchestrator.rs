//! The orchestrator with real child processes: the test-only `flexbench-test-driver` runs suites
//! through `flexbench-fake-runner`, which fails on purpose in every way a runner can.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bench_core::store::{self, Store};
use bench_core::{Outcome, Record};

mod common;

use common::*;

#[test]
fn every_outcome_from_real_processes() {
    let tmp = TempDir::new("outcomes");
    let cases = every_fault();
    let suite = write_suite(&tmp.0, "faults", &cases);
    let out = tmp.0.join("results");
    let o = drive(&suite, &out, &["--timeout", "1"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "failures make the exit code 1\n{stderr}"
    );

    let dir = out.join("faults");
    let recs = records(&dir.join("results.jsonl"));
    assert_eq!(
        recs.len(),
        cases.len(),
        "one record per case, even after failures\n{stderr}"
    );
    let by_behavior = |b: &str, fw: &str, reps: usize| -> &Record {
        recs.iter()
            .find(|r| {
                r.case.case.weights == bench_core::Weights::Checkpoint(b.into())
                    && r.case.case.framework == fw
                    && r.case.case.repetitions == reps
                    && (b != "ok" || fw != "fake" || r.case.case.device == bench_core::Device::Cpu)
            })
            .unwrap_or_else(|| panic!("no record for {b}"))
    };

    let ok = by_behavior("ok", "fake", 1);
    assert_eq!(ok.outcome, Outcome::Ok, "{}", ok.detail);
    let m = ok.metrics.as_ref().unwrap();
    // 8 steps: prefill 0.04, 7 x 0.01 decode; batch 2, prompt 16.
    assert!((m.prefill_latency_s - 0.04).abs() < 1e-12);
    assert!((m.decode_latency_s - 0.07).abs() < 1e-12);
    assert!((m.total_throughput - 2.0 * 8.0 / 0.11).abs() < 1e-9);
    assert!(!m.projected);
    assert_eq!(ok.raw.as_ref().unwrap().step_times_s[0].len(), 8);
    assert_eq!(ok.exit_code, Some(0));
    assert_eq!(ok.case.id, ok.case.case.id());
    assert!(ok.env_id.starts_with("env-") && dir.join(format!("{}.json", ok.env_id)).is_file());

    let reps = by_behavior("ok", "fake", 3);
    assert_eq!(reps.outcome, Outcome::Ok);
    let m = reps.metrics.as_ref().unwrap();
    assert_eq!(m.repetitions.len(), 3);
    assert!(m.cv_total_throughput.unwrap() > 0.0);

    let oom = by_behavior("oom", "fake", 1);
    assert_eq!(oom.outcome, Outcome::Oom);
    assert!(oom.detail.contains("CUDA out of memory"), "{}", oom.detail);
    assert_eq!(by_behavior("oom3", "fake", 1).outcome, Outcome::Oom);

    let hang = by_behavior("hang", "fake", 1);
    assert_eq!(hang.outcome, Outcome::Timeout, "{}", hang.detail);
    assert!(hang.detail.contains("1s"), "{}", hang.detail);
    // The runner's own child was in its process group and died with it.
    let log = std::fs::read_to_string(dir.join(hang.log.as_ref().unwrap())).unwrap();
    let pid: i32 = log
        .lines()
        .find_map(|l| l.strip_prefix("grandchild pid "))
        .expect("the hang runner logs its child's pid")
        .trim()
        .parse()
        .unwrap();
    wait_until("the grandchild to die", || process_gone(pid));

    let segv = by_behavior("segv", "fake", 1);
    assert_eq!(segv.outcome, Outcome::Crashed);
    assert_eq!(segv.signal.as_deref(), Some("SIGSEGV"));
    assert!(segv.detail.contains("SIGSEGV"), "{}", segv.detail);

    let err = by_behavior("error", "fake", 1);
    assert_eq!(err.outcome, Outcome::Error);
    assert!(
        err.detail.contains("exit code 1") && err.detail.contains("bad tensor shape"),
        "{}",
        err.detail
    );

    let nores = by_behavior("noresult", "fake", 1);
    assert_eq!(nores.outcome, Outcome::Error);
    assert!(
        nores.detail.contains("without a FLEXBENCH_RESULT"),
        "{}",
        nores.detail
    );
    let bad = by_behavior("badresult", "fake", 1);
    assert_eq!(bad.outcome, Outcome::Error);
    assert!(bad.detail.contains("unusable"), "{}", bad.detail);

    let unav = by_behavior("unavailable", "fake", 1);
    assert_eq!(unav.outcome, Outcome::Unavailable);
    assert!(
        unav.detail.contains("disk tier is not built yet"),
        "{}",
        unav.detail
    );
    let nobackend = by_behavior("ok", "unserved", 1);
    assert_eq!(nobackend.outcome, Outcome::Unavailable);
    assert!(
        nobackend
            .detail
            .contains("no backend serves framework `unserved`"),
        "{}",
        nobackend.detail
    );
    let cuda = recs
        .iter()
        .find(|r| r.case.case.device == bench_core::Device::Cuda)
        .unwrap();
    assert_eq!(cuda.outcome, Outcome::Unavailable);
    assert!(cuda.detail.contains("no GPU"), "{}", cuda.detail);

    // Logs, case files; work directories are cleaned up.
    for r in recs.iter().filter(|r| r.log.is_some()) {
        let log = std::fs::read_to_string(dir.join(r.log.as_ref().unwrap())).unwrap();
        assert!(log.contains("fake runner: case"), "{log}");
        assert!(dir
            .join("cases")
            .join(format!("{}.json", r.case.id))
            .is_file());
    }
    assert_eq!(std::fs::read_dir(dir.join("work")).unwrap().count(), 0);
    // One progress line per case.
    let progress = stderr
        .lines()
        .filter(|l| l.starts_with('[') && l.contains("ETA"))
        .count();
    assert_eq!(progress, cases.len(), "{stderr}");
    assert!(stderr.contains(&format!("[1/{}]", cases.len())), "{stderr}");

    // A rerun skips the ok cases and reruns the rest; --rerun-failed only the failures;
    // --force everything.
    let failed_or_unavailable = recs.iter().filter(|r| r.outcome != Outcome::Ok).count();
    let failed = recs.iter().filter(|r| r.outcome.is_failure()).count();
    let o = drive(&suite, &out, &["--timeout", "1"]);
    assert_eq!(o.status.code(), Some(1));
    let n1 = records(&dir.join("results.jsonl")).len();
    assert_eq!(n1, cases.len() + failed_or_unavailable);
    let o = drive(&suite, &out, &["--timeout", "1", "--rerun-failed"]);
    assert_eq!(o.status.code(), Some(1));
    let n2 = records(&dir.join("results.jsonl")).len();
    assert_eq!(n2, n1 + failed);
    assert_every_line_parses(&dir.join("results.jsonl"));
}

#[test]
fn kill_9_mid_suite_then_rerun_loses_and_duplicates_nothing() {
    let tmp = TempDir::new("kill9");
    let cases: Vec<String> = (0..8).map(|i| case("slow", 8 + i, "")).collect();
    let suite = write_suite(&tmp.0, "slow", &cases);
    let out = tmp.0.join("results");
    let results = out.join("slow").join("results.jsonl");

    let mut child = Command::new(DRIVER)
        .arg(&suite)
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("two records", || {
        std::fs::read_to_string(&results)
            .map(|t| t.lines().count() >= 2)
            .unwrap_or(false)
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The kill may in principle land mid-write; a reader must cope with a torn last line.
    let read = store::read(&results).unwrap();
    assert!(
        read.warnings.iter().all(|w| w.contains("torn last line")),
        "{:?}",
        read.warnings
    );
    let before = read.records;
    assert!(before.len() >= 2 && before.len() < 8, "{}", before.len());
    assert!(before.iter().all(|r| r.outcome == Outcome::Ok));

    // As if the kill had landed in the middle of a write.
    let mut torn = std::fs::read(&results).unwrap();
    torn.extend_from_slice(br#"{"schema":1,"case":{"id":"abc"#);
    std::fs::write(&results, &torn).unwrap();
    let r = store::read(&results).unwrap();
    assert_eq!(r.records.len(), before.len());
    assert!(
        r.warnings.len() == 1 && r.warnings[0].contains("torn last line"),
        "{:?}",
        r.warnings
    );

    let o = drive(&suite, &out, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("torn"), "{stderr}");
    assert_every_line_parses(&results);
    let after = records(&results);
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &after {
        assert_eq!(r.outcome, Outcome::Ok);
        *per_id.entry(r.case.id.clone()).or_default() += 1;
    }
    assert_eq!(per_id.len(), 8, "every case recorded");
    assert!(
        per_id.values().all(|&n| n == 1),
        "no case recorded twice: {per_id:?}"
    );
    // The records from before the kill are still there, first, unchanged.
    assert_eq!(&after[..before.len()], &before[..]);
}

#[test]
fn second_bench_on_the_same_directory_is_refused() {
    let tmp = TempDir::new("lock");
    let suite = write_suite(&tmp.0, "locked", &[case("ok", 8, "")]);
    let out = tmp.0.join("results");
    let held = Store::open(&out.join("locked")).unwrap();
    let o = drive(&suite, &out, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("another `cargo xtask bench` is running"),
        "{stderr}"
    );
    assert!(records(&out.join("locked").join("results.jsonl")).is_empty());
    drop(held);
    let o = drive(&suite, &out, &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let results = out.join("locked").join("results.jsonl");
    // A rerun skips the ok case; --force runs it again.
    let o = drive(&suite, &out, &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("skipped (already ok"));
    assert_eq!(records(&results).len(), 1);
    drive(&suite, &out, &["--force"]);
    assert_eq!(records(&results).len(), 2);
}

#[test]
fn unwritable_results_directory_is_a_clear_error() {
    let tmp = TempDir::new("unwritable");
    let suite = write_suite(&tmp.0, "s", &[case("ok", 8, "")]);
    // A path below a regular file cannot be created, whoever runs the test (root included).
    let file = tmp.0.join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let o = drive(&suite, &file.join("results"), &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot create results directory") && stderr.contains("--out"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&tmp.0).unwrap().count(),
        2,
        "nothing else was created"
    );
}

#[test]
fn ctrl_c_kills_the_case_and_records_nothing_partial() {
    let tmp = TempDir::new("sigint");
    let suite = write_suite(
        &tmp.0,
        "int",
        &[case("ok", 8, ""), case("hang", 16, ""), case("ok", 32, "")],
    );
    let out = tmp.0.join("results");
    let dir = out.join("int");
    let child = Command::new(DRIVER)
        .arg(&suite)
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut grandchild = None;
    wait_until("the hanging case to start", || {
        grandchild = grandchild_in_logs(&dir);
        grandchild.is_some()
    });
    // SAFETY: sending SIGINT to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let recs = records(&dir.join("results.jsonl"));
    assert_eq!(recs.len(), 1, "only the case finished before Ctrl-C");
    assert_eq!(recs[0].outcome, Outcome::Ok);
    wait_until("the hanging case's group to die", || {
        process_gone(grandchild.unwrap())
    });
    let counts: BTreeMap<_, _> = recs
        .iter()
        .map(|r| (r.case.id.clone(), r.outcome))
        .collect();
    assert_eq!(counts.len(), 1);
}

/// Pids of live processes whose environment names a case file under `dir`.
fn runners_under(dir: &Path) -> Vec<i32> {
    let prefix = format!("FLEXBENCH_CASE={}", dir.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let env = std::fs::read(e.path().join("environ")).ok()?;
            let live = !process_gone(pid);
            (live
                && env
                    .split(|b| *b == 0)
                    .any(|kv| kv.starts_with(prefix.as_bytes())))
            .then_some(pid)
        })
        .collect()
}

/// Starts the driver on a suite whose only case hangs (with a grandchild) and returns it once
/// the grandchild's pid is in the case's log.
fn driver_in_a_hanging_case(tmp: &TempDir, name: &str) -> (std::process::Child, i32, PathBuf) {
    let suite = write_suite(&tmp.0, name, &[case("hang", 8, "")]);
    let out = tmp.0.join("results");
    let dir = out.join(name);
    let child = Command::new(DRIVER)
        .arg(&suite)
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut grandchild = None;
    wait_until("the hanging case to start", || {
        grandchild = std::fs::read_dir(dir.join("logs"))
            .ok()
            .and_then(|d| d.flatten().next())
            .and_then(|e| std::fs::read_to_string(e.path()).ok())
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("grandchild pid ")?.trim().parse().ok())
            });
        grandchild.is_some()
    });
    (child, grandchild.unwrap(), dir)
}

#[test]
fn kill_9_of_the_orchestrator_takes_the_runner_and_its_group_with_it() {
    let tmp = TempDir::new("orphans");
    let (mut child, grandchild, dir) = driver_in_a_hanging_case(&tmp, "orphans");
    assert!(!runners_under(&dir).is_empty());
    child.kill().unwrap(); // SIGKILL: no handler, no cleanup of its own
    child.wait().unwrap();
    wait_until("the grandchild to die with its orchestrator", || {
        process_gone(grandchild)
    });
    wait_until("no runner of the suite to be left", || {
        runners_under(&dir).is_empty()
    });
}

#[test]
fn a_second_ctrl_c_right_after_the_first_still_kills_the_case() {
    let tmp = TempDir::new("sigint2");
    let (child, grandchild, dir) = driver_in_a_hanging_case(&tmp, "twice");
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
        std::thread::sleep(Duration::from_millis(3));
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130));
    wait_until("the case's group to die", || process_gone(grandchild));
    wait_until("no runner left", || runners_under(&dir).is_empty());
}

#[test]
fn a_last_record_without_its_newline_is_kept_not_cut() {
    let tmp = TempDir::new("newline");
    let suite = write_suite(&tmp.0, "nl", &[case("ok", 8, ""), case("ok", 16, "")]);
    let out = tmp.0.join("results");
    let results = out.join("nl").join("results.jsonl");
    assert_eq!(drive(&suite, &out, &[]).status.code(), Some(0));
    let text = std::fs::read_to_string(&results).unwrap();
    std::fs::write(&results, text.trim_end_matches('\n')).unwrap();
    let o = drive(&suite, &out, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("torn"), "{stderr}");
    assert_eq!(stderr.matches("skipped (already ok").count(), 2, "{stderr}");
    assert_eq!(std::fs::read_to_string(&results).unwrap(), text);
}

#[test]
fn a_log_that_cannot_be_written_is_said_in_the_record() {
    let tmp = TempDir::new("logfull");
    let suite = write_suite(&tmp.0, "full", &[case("ok", 8, "")]);
    let out = tmp.0.join("results");
    let dir = out.join("full");
    assert_eq!(drive(&suite, &out, &[]).status.code(), Some(0));
    let id = records(&dir.join("results.jsonl"))[0].case.id.clone();
    // Every write to /dev/full fails with ENOSPC, as on a full disk.
    let log = dir.join("logs").join(format!("{id}.log"));
    std::fs::remove_file(&log).unwrap();
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    let o = drive(&suite, &out, &["--force"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let recs = records(&dir.join("results.jsonl"));
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1].outcome, Outcome::Ok, "the case itself is fine");
    let why = recs[1].log_error.as_deref().unwrap_or("");
    assert!(why.contains("No space left on device"), "{why:?}");
    assert!(recs[0].log_error.is_none());
}

#[test]
fn a_runner_printing_a_huge_line_does_not_fill_the_orchestrator_s_memory() {
    let tmp = TempDir::new("flood");
    let suite = write_suite(&tmp.0, "flood", &[case("flood", 8, "")]);
    let out = tmp.0.join("results");
    // Reaped by wait4 below, which also reports its peak memory.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(DRIVER)
        .arg(&suite)
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // SAFETY: wait4 on our own child with properly sized out-parameters.
    let (status, usage) = unsafe {
        let mut status = 0;
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::wait4(child.id() as i32, &mut status, 0, &mut usage);
        (status, usage)
    };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    let recs = records(&out.join("flood").join("results.jsonl"));
    assert_eq!(recs[0].outcome, Outcome::Ok, "{}", recs[0].detail);
    // The line is 300 MB; the orchestrator holds a few pieces of it at a time.
    let peak_mib = usage.ru_maxrss / 1024;
    assert!(peak_mib < 120, "orchestrator peak RSS {peak_mib} MiB");
    let log = std::fs::metadata(out.join("flood").join(recs[0].log.as_ref().unwrap())).unwrap();
    assert!(log.len() > 300 << 20, "the whole line is in the log");
}

#[test]
fn adaptive_repetitions_stop_at_the_target_or_at_max() {
    let tmp = TempDir::new("adaptive");
    let auto = ", repetitions: auto(min: 3, max: 6, target_ci: 0.05)";
    let suite = write_suite(
        &tmp.0,
        "adaptive",
        &[case("steady", 8, auto), case("ok", 16, auto)],
    );
    let out = tmp.0.join("results");
    let o = drive(&suite, &out, &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let recs = records(&out.join("adaptive").join("results.jsonl"));
    let steady = recs.iter().find(|r| r.case.case.prompt_len == 8).unwrap();
    let m = steady.metrics.as_ref().unwrap();
    assert_eq!(
        m.repetitions.len(),
        3,
        "within 0.1%: the first three suffice"
    );
    assert!(m
        .repetitions_stop
        .as_deref()
        .unwrap()
        .starts_with("target met"));
    // 10% apart: the interval stays wide, so it runs to max, in more than one process
    let wide = recs.iter().find(|r| r.case.case.prompt_len == 16).unwrap();
    let m = wide.metrics.as_ref().unwrap();
    assert_eq!(m.repetitions.len(), 6);
    assert!(
        m.repetitions_stop.as_deref().unwrap().starts_with("max 6"),
        "{:?}",
        m.repetitions_stop
    );
    let log =
        std::fs::read_to_string(out.join("adaptive").join(wide.log.as_ref().unwrap())).unwrap();
    assert_eq!(
        log.matches("fake runner: case").count(),
        2,
        "two processes share the log"
    );
    // The record keeps the suite's case (and so its id), not a process's.
    assert_eq!(wide.case.case.repetitions, 3);
    assert_eq!(wide.case.id, wide.case.case.id());
}

#[test]
fn a_case_that_would_fill_the_disk_is_refused_before_anything_is_written() {
    let tmp = TempDir::new("hugedisk");
    let suite = write_suite(
        &tmp.0,
        "disk",
        &[case("hugedisk", 8, ""), case("ok", 16, "")],
    );
    let out = tmp.0.join("results");
    let o = drive(&suite, &out, &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let recs = records(&out.join("disk").join("results.jsonl"));
    let huge = recs.iter().find(|r| r.case.case.prompt_len == 8).unwrap();
    assert_eq!(huge.outcome, Outcome::Unavailable);
    assert!(
        huge.detail.contains("not enough disk space")
            && huge
                .detail
                .contains("the fake offload files 1152921504.6 GB")
            && huge.detail.contains("GB free"),
        "{}",
        huge.detail
    );
    assert!(huge.log.is_none(), "no runner started");
    assert_eq!(
        recs.iter()
            .find(|r| r.case.case.prompt_len == 16)
            .unwrap()
            .outcome,
        Outcome::Ok
    );
}
