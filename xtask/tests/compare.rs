//! `report A --compare B` as a regression gate: a run against itself has no significant change
//! and passes the gate; against a copy with every step time scaled by 1.3 every case is slower
//! and `--fail-on-regression 10` fails; drift between the environments is said before any
//! verdict.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bench_core::record::{IdentifiedCase, Outcome, SCHEMA};
use bench_core::{metrics, Case, Placement, RawResult, Record};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn xtask(args: &[&str]) -> Output {
    Command::new(XTASK).args(args).output().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("flexbench-compare-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Four cases of four repetitions each, with a little spread between repetitions.
fn run(scale: f64) -> Vec<Record> {
    let cases = [
        (Placement::Gpu, 4),
        (Placement::Cpu, 4),
        (Placement::Disk, 1),
        (Placement::Gpu, 16),
    ];
    cases
        .iter()
        .map(|(p, bs)| {
            let case = Case {
                gen_len: 8,
                gpu_batch_size: *bs,
                placement: p.clone(),
                repetitions: 4,
                ..Case::example("native")
            };
            let raw = RawResult {
                step_times_s: (0..4)
                    .map(|r| {
                        let jitter = 1.0 + 0.01 * r as f64;
                        (0..8)
                            .map(|i| scale * jitter * if i == 0 { 0.5 } else { 0.05 })
                            .collect()
                    })
                    .collect(),
                ..Default::default()
            };
            Record {
                schema: SCHEMA,
                metrics: Some(metrics::compute(&case, &raw).unwrap()),
                case: IdentifiedCase::new(case),
                outcome: Outcome::Ok,
                detail: String::new(),
                raw: Some(raw),
                exit_code: Some(0),
                signal: None,
                started_at: "2026-12-01T00:00:00.000Z".into(),
                finished_at: "2026-12-01T00:00:01.000Z".into(),
                duration_s: 1.0,
                log: None,
                env_id: "env-test".into(),
                log_error: None,
                job: None,
            }
        })
        .collect()
}

fn write(dir: &Path, recs: &[Record], torch: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let lines: String = recs.iter().map(|r| r.to_line() + "\n").collect();
    std::fs::write(dir.join("results.jsonl"), lines).unwrap();
    let env = bench_core::env::Environment {
        id: "env-test".into(),
        cpu_model: Some("Test CPU".into()),
        versions: [("torch".to_string(), torch.to_string())].into(),
        ..Default::default()
    };
    std::fs::write(
        dir.join("env-test.json"),
        serde_json::to_string(&env).unwrap(),
    )
    .unwrap();
}

#[test]
fn the_gate_passes_an_identical_run_and_fails_a_slower_one() {
    let tmp = temp_dir("gate");
    let (a, same, slow) = (tmp.join("a"), tmp.join("same"), tmp.join("slow"));
    write(&a, &run(1.0), "2.15.0");
    write(&same, &run(1.0), "2.15.0");
    write(&slow, &run(1.0), "2.16.0");
    // B's step times are A's x 1.3: A is "faster" against B; the slow run is the copy.
    let scaled: Vec<Record> = run(1.3);
    write(&slow, &scaled, "2.16.0");

    let o = xtask(&[
        "report",
        a.to_str().unwrap(),
        "--compare",
        same.to_str().unwrap(),
        "--fail-on-regression",
        "10",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let md = std::fs::read_to_string(a.join("report.md")).unwrap();
    assert!(
        md.contains("4 cases matched (4 no significant change)"),
        "{md}"
    );
    assert!(md.contains("same recorded machine and software"), "{md}");
    assert_eq!(std::fs::read_dir(a.join("steps")).unwrap().count(), 4);

    let o = xtask(&[
        "report",
        slow.to_str().unwrap(),
        "--compare",
        a.to_str().unwrap(),
        "--fail-on-regression",
        "10",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("4 case(s) significantly slower"), "{err}");
    let md = std::fs::read_to_string(slow.join("report.md")).unwrap();
    assert!(md.contains("4 cases matched (4 slower)"), "{md}");
    assert!(md.contains("0.77x"), "1 / 1.3: {md}");
    // The drift comes first: torch differs between the two runs.
    let drift = md.find("torch: 2.16.0 vs 2.15.0").expect("drift named");
    assert!(drift < md.find("| verdict |").unwrap(), "{md}");
    // A gate of 30% lets a 23% slowdown through.
    let o = xtask(&[
        "report",
        slow.to_str().unwrap(),
        "--compare",
        a.to_str().unwrap(),
        "--fail-on-regression",
        "30",
    ]);
    assert_eq!(o.status.code(), Some(0));
}
