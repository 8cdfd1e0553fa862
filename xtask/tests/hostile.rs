//! Suite files and commands as a hostile user writes them: each gets a clear error (file, line or
//! field, what to do) before anything runs, never a panic, and nothing lands outside `--out`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn xtask(args: &[&str]) -> Output {
    Command::new(XTASK).args(args).output().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("flexbench-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Runs `bench --dry-run` on `text` saved as `file` and returns its stderr; it must fail
/// cleanly (exit 2, no panic).
fn refused(dir: &Path, file: &str, text: &str) -> String {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    let o = xtask(&["bench", path.to_str().unwrap(), "--dry-run"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{file}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

const CASE: &str = r#"(model: "opt-125m", framework: "native", prompt_len: 8, gen_len: 8, gpu_batch_size: 1, placement: gpu)"#;

#[test]
fn a_suite_name_cannot_leave_the_results_root() {
    let dir = temp_dir("dots");
    let out = dir.join("o").join("out");
    for name in ["...ron", "..ron"] {
        let path = dir.join(name);
        std::fs::write(&path, format!("(cases: [{CASE}])")).unwrap();
        let o = xtask(&[
            "bench",
            path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--no-build",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("rename the file"), "{err}");
    }
    assert!(!dir.join("o").join("results.jsonl").exists());
    assert!(!dir.join("o").exists() || std::fs::read_dir(dir.join("o")).unwrap().count() == 0);
}

#[test]
fn timeouts_that_cannot_be_meant() {
    let dir = temp_dir("timeouts");
    for t in ["0", "18446744073709551615", "9300000000000000000"] {
        let e = refused(
            &dir,
            "t.ron",
            &format!("(defaults: (timeout_s: {t}), cases: [{CASE}])"),
        );
        assert!(e.contains("t.ron:1:") && e.contains("timeout"), "{e}");
    }
    for t in ["0", "9300000000000000000"] {
        let o = xtask(&["bench", "smoke", "--dry-run", "--timeout", t]);
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains("--timeout"));
    }
}

#[test]
fn sizes_that_overflow_are_refused_at_the_dry_run() {
    let dir = temp_dir("sizes");
    let grid = |prompts: &str, batches: &str| {
        format!(
            r#"(grids: [(models: ["opt-125m"], prompt_lens: [{prompts}], gen_lens: [32], frameworks: ["native"],
                 placements: [gpu], gpu_batch_sizes: [{batches}])])"#
        )
    };
    let e = refused(&dir, "p.ron", &grid("18446744073709551615", "1"));
    assert!(e.contains("positions"), "{e}");
    let e = refused(&dir, "b.ron", &grid("8", "18446744073709551615"));
    assert!(e.contains("KV cache") || e.contains("counted"), "{e}");
    let e = refused(&dir, "b2.ron", &grid("8", "9223372036854775808"));
    assert!(e.contains("smaller batch") || e.contains("counted"), "{e}");
}

#[test]
fn a_grid_too_large_is_refused_before_it_expands() {
    let dir = temp_dir("huge");
    let many: Vec<String> = (1..=1000).map(|i| i.to_string()).collect();
    let text = format!(
        r#"(grids: [(models: ["opt-125m"], prompt_lens: [{}], gen_lens: [{}], frameworks: ["native"],
             placements: [gpu], gpu_batch_sizes: [{}])])"#,
        many[..1000].join(","),
        many[..1000].join(","),
        many[..1000].join(",")
    );
    let started = std::time::Instant::now();
    let e = refused(&dir, "huge.ron", &text);
    assert!(
        e.contains("1000000000 cases")
            && e.contains("prompt_lens 1000 x gen_lens 1000 x gpu_batch_sizes 1000"),
        "{e}"
    );
    // Counted, not expanded: a billion cases would take minutes and gigabytes.
    assert!(started.elapsed().as_secs() < 30);
}

#[test]
fn messages_that_used_to_mislead() {
    let dir = temp_dir("messages");
    // A directory named like a suite file.
    std::fs::create_dir_all(dir.join("x.ron")).unwrap();
    let o = xtask(&["bench", dir.join("x.ron").to_str().unwrap(), "--dry-run"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is a directory"));
    // An unknown dotted filter key is named.
    let o = xtask(&[
        "bench",
        "smoke",
        "--dry-run",
        "--filter",
        "placement.nosuch=true",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no part `nosuch`"), "{e}");
    // ron's message with its words apart.
    let e = refused(&dir, "v.ron", "(defaults: (device: cpuu), cases: [])");
    assert!(e.contains("`cpuu` in enum"), "{e}");
    // A report of an empty results file says so.
    let results = dir.join("empty");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(results.join("results.jsonl"), "").unwrap();
    let o = xtask(&["report", results.to_str().unwrap()]);
    assert!(o.status.success());
    let md = std::fs::read_to_string(results.join("report.md")).unwrap();
    assert!(md.contains("No records yet"), "{md}");
}
