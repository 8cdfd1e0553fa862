//! What the orchestrator's process tests share: temporary directories, suites of fake-runner
//! cases, running `flexbench-test-driver`, reading records back, waiting for processes.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bench_core::store;
use bench_core::Record;

pub const DRIVER: &str = env!("CARGO_BIN_EXE_flexbench-test-driver");

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "flexbench-test-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One explicit case per behavior; `extra` adds RON fields.
pub fn case(behavior: &str, prompt_len: usize, extra: &str) -> String {
    format!(
        r#"(model: "opt-tiny", framework: "fake", prompt_len: {prompt_len}, gen_len: 8, gpu_batch_size: 2,
            placement: gpu, weights: checkpoint("{behavior}"){extra})"#
    )
}

/// A case of every behavior the fake runner has, one with a framework no backend serves, a cuda
/// case (unavailable where the fake backend runs), and one with three repetitions.
pub fn every_fault() -> Vec<String> {
    let behaviors = [
        "ok",
        "oom",
        "oom3",
        "hang",
        "segv",
        "error",
        "noresult",
        "badresult",
        "unavailable",
    ];
    let mut cases: Vec<String> = behaviors.iter().map(|b| case(b, 16, "")).collect();
    cases.push(case("ok", 16, ", framework: \"unserved\"").replace("framework: \"fake\", ", ""));
    cases.push(case("ok", 16, ", device: cuda"));
    cases.push(case("ok", 32, ", repetitions: 3"));
    cases
}

pub fn write_suite(dir: &Path, name: &str, cases: &[String]) -> PathBuf {
    let path = dir.join(format!("{name}.ron"));
    let text = format!(
        "(defaults: (device: cpu, timeout_s: 60), cases: [\n{}\n])",
        cases.join(",\n")
    );
    std::fs::write(&path, text).unwrap();
    path
}

pub fn drive(suite: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(DRIVER)
        .arg(suite)
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

pub fn records(path: &Path) -> Vec<Record> {
    let r = store::read(path).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    r.records
}

/// Every line of the file is a complete record.
pub fn assert_every_line_parses(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'));
    for (i, line) in text.lines().enumerate() {
        Record::from_line(line).unwrap_or_else(|e| panic!("line {}: {e:#}: {line}", i + 1));
    }
}

pub fn process_gone(pid: i32) -> bool {
    // Gone, or a zombie waiting for its (new) parent to reap it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
    }
}

pub fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(20), cond)
}

pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid the `hang` runner printed into its log in `dir/logs`: its own child's.
pub fn grandchild_in_logs(dir: &Path) -> Option<i32> {
    std::fs::read_dir(dir.join("logs"))
        .ok()?
        .flatten()
        .find_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            text.lines().find_map(|l| {
                l.strip_prefix("grandchild pid ")?
                    .trim()
                    .parse::<i32>()
                    .ok()
            })
        })
}

/// The parent of a live process.
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
