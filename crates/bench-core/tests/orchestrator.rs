//! The orchestrator with real child processes: the test-only `flexbench-test-driver` runs suites
//! through `flexbench-fake-runner`, which fails on purpose in every way a runner can.

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};

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
