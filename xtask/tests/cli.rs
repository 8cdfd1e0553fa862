//! The `xtask` binary end to end: dry runs, filters, a real `bench` of the smoke suite and a report.
//! Without a built native runner the smoke cases are recorded as `unavailable` (not failures);
//! with `--bin-dir` pointing at a built `flexbench-native` the same test path runs them for real.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn xtask(args: &[&str]) -> Output {
    Command::new(XTASK).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("flexbench-xtask-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn dry_run_json_and_filters() {
    let o = xtask(&["bench", "hf_ds", "--dry-run", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cases: Vec<serde_json::Value> = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(cases.len(), 18);
    for key in [
        "id",
        "model",
        "framework",
        "prompt_len",
        "gen_len",
        "cut_gen_len",
        "gpu_batch_size",
        "num_gpu_batches",
        "placement",
        "device",
    ] {
        assert!(cases.iter().all(|c| c.get(key).is_some()), "missing {key}");
    }
    // The original's hf_s512: one framework, one prompt length, three models.
    let o = xtask(&[
        "bench",
        "hf_ds",
        "--dry-run",
        "--json",
        "--filter",
        "framework=hf",
        "--filter",
        "prompt_len=512",
    ]);
    let cases: Vec<serde_json::Value> = serde_json::from_str(&stdout(&o)).unwrap();
    let bs: Vec<u64> = cases
        .iter()
        .map(|c| c["gpu_batch_size"].as_u64().unwrap())
        .collect();
    assert_eq!(bs, [2, 8, 2]);
    // 6b7: opt-6.7b's s512 and s1024 cases of both libraries.
    let o = xtask(&[
        "bench",
        "hf_ds",
        "--dry-run",
        "--json",
        "--filter",
        "model=opt-6.7b",
        "--filter",
        "prompt_len=512,1024",
    ]);
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&stdout(&o))
            .unwrap()
            .len(),
        4
    );
    let o = xtask(&["bench", "hf_ds", "--dry-run", "--filter", "placement=disk"]);
    assert_eq!(
        stdout(&o)
            .lines()
            .filter(|l| l.contains("opt-175b"))
            .count(),
        6
    );
}

#[test]
fn bad_input_is_one_clear_error() {
    let o = xtask(&["bench", "nosuch"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("unknown suite `nosuch`") && e.contains("smoke") && e.contains("hf_ds"),
        "{e}"
    );
    assert!(
        !e.contains("panicked") && !e.contains("Stack backtrace"),
        "{e}"
    );
    let o = xtask(&["bench", "smoke", "--filter", "bogus=1"]);
    assert!(stderr(&o).contains("unknown key `bogus`"), "{}", stderr(&o));
    let o = xtask(&["report", "/nonexistent/results/dir"]);
    assert!(
        stderr(&o).contains("run `cargo xtask bench"),
        "{}",
        stderr(&o)
    );
}

/// Runs `bench smoke` into the temp dir `name` and reports on it. `bin_dir` holds the runners.
/// The end-to-end test with the real engine is this with `bin_dir` = target/release.
fn bench_and_report(
    name: &str,
    bin_dir: &Path,
    filters: &[&str],
) -> (PathBuf, Vec<bench_core::Record>) {
    let out = temp_dir(name);
    let mut args = vec![
        "bench",
        "smoke",
        "--no-build",
        "--out",
        out.to_str().unwrap(),
        "--bin-dir",
        bin_dir.to_str().unwrap(),
    ];
    for f in filters {
        args.extend(["--filter", f]);
    }
    let o = xtask(&args);
    assert!(o.status.code() == Some(0), "{}", stderr(&o));
    let dir = out.join("smoke");
    let recs = bench_core::store::read(&dir.join("results.jsonl"))
        .unwrap()
        .records;
    let o = xtask(&["report", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "report.md",
        "report.csv",
        "throughput_vs_batch.svg",
        "latency_vs_throughput.svg",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    (out, recs)
}

#[test]
fn smoke_without_a_runner_is_unavailable_not_failed() {
    let empty = temp_dir("nobin");
    let (out, recs) = bench_and_report("smoke-nobin", &empty, &["prompt_len=128", "placement=gpu"]);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].outcome, bench_core::Outcome::Unavailable);
    assert!(
        recs[0].detail.contains("flexbench-native not found"),
        "{}",
        recs[0].detail
    );
    let md = std::fs::read_to_string(out.join("smoke/report.md")).unwrap();
    assert!(md.contains("UNAVAILABLE (bs 4, gpu)"), "{md}");
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(empty);
}

/// A stand-in `flexbench-native` (a shell script) that checks the command line the native backend
/// builds and prints a fixed result: the xtask -> backend -> child -> metrics -> report path with
/// numbers, before the engine exists.
#[test]
fn smoke_through_a_stand_in_runner_gives_metrics_and_plots() {
    use std::os::unix::fs::PermissionsExt;
    let bin = temp_dir("standin");
    let steps: Vec<String> = std::iter::once("0.1".to_string())
        .chain((1..32).map(|_| "0.01".to_string()))
        .collect();
    let script = format!(
        "#!/bin/sh\n\
         [ \"$1\" = run-case ] && [ \"$2\" = --case ] && [ \"$2\" != \"\" ] && [ -f \"$FLEXBENCH_CASE\" ] \
         && [ \"$3\" = \"$FLEXBENCH_CASE\" ] && [ \"$4\" = --offload-dir ] && [ -d \"$5\" ] || {{ echo bad args: \"$@\" >&2; exit 1; }}\n\
         echo loading\n\
         echo 'FLEXBENCH_RESULT {{\"step_times_s\":[[{}]]}}'\n",
        steps.join(",")
    );
    let runner = bin.join("flexbench-native");
    std::fs::write(&runner, script).unwrap();
    std::fs::set_permissions(&runner, std::fs::Permissions::from_mode(0o755)).unwrap();

    let (out, recs) = bench_and_report("smoke-standin", &bin, &["prompt_len=128", "placement=gpu"]);
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.outcome, bench_core::Outcome::Ok, "{}", r.detail);
    // batch 4 x gen 32 / (0.1 + 31 x 0.01) s = 128 / 0.41
    let m = r.metrics.as_ref().unwrap();
    assert!(
        (m.total_throughput - 128.0 / 0.41).abs() < 1e-9,
        "{}",
        m.total_throughput
    );
    let md = std::fs::read_to_string(out.join("smoke/report.md")).unwrap();
    assert!(md.contains("| native gpu | 312.2 (bs 4, gpu) |"), "{md}");
    let csv = std::fs::read_to_string(out.join("smoke/report.csv")).unwrap();
    assert!(csv.lines().nth(1).unwrap().contains(",ok,"), "{csv}");
    let svg = std::fs::read_to_string(out.join("smoke/throughput_vs_batch.svg")).unwrap();
    assert!(
        svg.contains("<circle cx") && !svg.contains("no ok cases"),
        "{svg}"
    );
    let log = std::fs::read_to_string(out.join("smoke").join(r.log.as_ref().unwrap())).unwrap();
    assert!(log.contains("loading"), "{log}");
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(bin);
}
