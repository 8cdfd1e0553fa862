//! `cargo xtask bench --executor slurm` from the outside: bad input is refused before anything
//! is built or submitted, and the smoke suite run through Slurm by the real commands (release
//! binaries on the nodes) ends with the same cases and outcomes as a local run. The tests that
//! need a cluster skip, saying why, where none answers, unless `FLEXBENCH_REQUIRE_SLURM=1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use bench_core::testkit::slurm_ready;
use bench_core::{store, Outcome};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "flexbench-xtask-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
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

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |e| e.count())
}

#[test]
fn an_unknown_executor_is_refused_naming_the_known_ones() {
    let o = Command::new(XTASK)
        .args(["bench", "smoke", "--executor", "pbs"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("invalid value 'pbs' for '--executor <NAME>'")
            && err.contains("[possible values: local, slurm]"),
        "{err}"
    );
}

#[test]
fn slurm_options_need_the_slurm_executor() {
    let tmp = TempDir::new("local-flags");
    let o = Command::new(XTASK)
        .args(["bench", "smoke", "--wait", "--max-parallel", "2", "--out"])
        .arg(&tmp.0)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--max-parallel, --wait only mean something with --executor slurm"),
        "{err}"
    );
    assert_eq!(entries(&tmp.0), 0, "nothing was written");
}

#[test]
fn without_sbatch_on_path_nothing_is_built_or_submitted() {
    let tmp = TempDir::new("no-sbatch");
    let empty = tmp.0.join("bin");
    std::fs::create_dir_all(&empty).unwrap();
    let out = tmp.0.join("results");
    let o = Command::new(XTASK)
        .args(["bench", "smoke", "--executor", "slurm", "--out"])
        .arg(&out)
        .env("PATH", &empty)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`sbatch` is not on PATH") && err.contains("scripts/slurm-local.sh start"),
        "{err}"
    );
    assert!(!err.contains("building"), "refused before the build: {err}");
    assert!(!out.exists(), "nothing was written");
}

#[test]
fn an_unknown_partition_is_refused_before_anything_is_submitted() {
    let Some(slurm) = slurm_ready() else { return };
    let tmp = TempDir::new("partition");
    let out = tmp.0.join("results");
    let mut cmd = slurm.command(XTASK);
    let o = cmd
        .args([
            "bench",
            "smoke",
            "--executor",
            "slurm",
            "--partition",
            "no-such-partition",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let known = slurm
        .command("sinfo")
        .args(["-h", "-o", "%R"])
        .output()
        .unwrap();
    let known = String::from_utf8_lossy(&known.stdout);
    assert!(
        err.contains("partition `no-such-partition` does not exist on this cluster"),
        "{err}"
    );
    for p in known.split_whitespace() {
        assert!(err.contains(p), "the error lists partition {p}: {err}");
    }
    assert!(!err.contains("building"), "{err}");
    assert!(!out.exists(), "nothing was written");
}

/// Runs `cargo xtask <args>` in the repository, as a user would.
fn cargo_xtask(slurm: &bench_core::testkit::TestSlurm, args: &[&str]) -> Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    let o = slurm
        .command(cargo)
        .arg("xtask")
        .args(args)
        .current_dir(xtask::project_root())
        .output()
        .unwrap();
    eprintln!(
        "cargo xtask {}: exit {:?} in {:.1}s",
        args.join(" "),
        o.status.code(),
        started.elapsed().as_secs_f64()
    );
    o
}

#[test]
fn the_smoke_suite_through_slurm_ends_as_it_does_locally() {
    let Some(slurm) = slurm_ready() else { return };
    let tmp = TempDir::new("smoke");
    let (local_out, slurm_out) = (tmp.0.join("local"), tmp.0.join("slurm"));
    let dry = cargo_xtask(&slurm, &["bench", "smoke", "--dry-run", "--json"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let cases: Vec<serde_json::Value> = serde_json::from_slice(&dry.stdout).unwrap();
    let mut ids: Vec<String> = cases
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();

    let local = cargo_xtask(
        &slurm,
        &["bench", "smoke", "--out", local_out.to_str().unwrap()],
    );
    assert!(local.status.success(), "{}", stderr(&local));
    let through = cargo_xtask(
        &slurm,
        &[
            "bench",
            "smoke",
            "--executor",
            "slurm",
            "--wait",
            "--out",
            slurm_out.to_str().unwrap(),
        ],
    );
    let err = stderr(&through);
    assert!(through.status.success(), "{err}");

    let read = |dir: &Path| {
        let r = store::read(&dir.join("smoke").join(store::RESULTS_FILE)).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        r.records
    };
    let outcomes = |recs: &[bench_core::Record]| -> BTreeMap<String, Outcome> {
        recs.iter()
            .map(|r| (r.case.id.clone(), r.outcome))
            .collect()
    };
    let (local, remote) = (read(&local_out), read(&slurm_out));
    let all_ok: BTreeMap<String, Outcome> =
        ids.iter().map(|id| (id.clone(), Outcome::Ok)).collect();
    assert_eq!(outcomes(&local), all_ok);
    assert_eq!(outcomes(&remote), all_ok, "{err}");
    let node =
        String::from_utf8_lossy(&Command::new("hostname").arg("-s").output().unwrap().stdout)
            .trim()
            .to_string();
    for r in &remote {
        let job = r.job.as_ref().expect("each record names its job");
        assert!(!job.job_id.is_empty() && job.job_id.chars().all(|c| c.is_ascii_digit()));
        assert_eq!(job.node.as_deref(), Some(node.as_str()));
        assert_eq!(job.state.as_deref(), Some("COMPLETED"));
        assert!(
            slurm_out
                .join("smoke")
                .join(format!("{}.json", r.env_id))
                .is_file(),
            "{}",
            r.env_id
        );
        assert!(r.metrics.as_ref().unwrap().total_throughput > 0.0);
        let ran = slurm_out.join("smoke").join(r.log.as_ref().unwrap());
        let log = std::fs::read_to_string(&ran).unwrap();
        // The node ran the release runner the build step made, from the shared checkout.
        assert!(log.contains("target/release/flexbench-native"), "{log}");
    }
    let lines = err
        .lines()
        .filter(|l| l.contains("ETA") && l.contains("(job "))
        .count();
    assert_eq!(lines, ids.len(), "{err}");
}
