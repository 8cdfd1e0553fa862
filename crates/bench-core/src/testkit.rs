//! Helpers for tests that run real processes: a fresh context per test, and the rule for tests
//! that need something a machine may lack, the Python environment or a Slurm cluster (skip saying
//! why, unless CI asks for them with `FLEXBENCH_REQUIRE_PYTHON=1` / `FLEXBENCH_REQUIRE_SLURM=1`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::backend::{Backend, RunContext};

/// Set to `1` where the Python environment must be there (CI after `cargo xtask python-env`).
pub const REQUIRE_PYTHON_ENV: &str = "FLEXBENCH_REQUIRE_PYTHON";

/// The repository root, from a crate directory two levels below it (`crates/<name>`).
pub fn project_root(crate_dir: &str) -> PathBuf {
    Path::new(crate_dir)
        .join("../..")
        .canonicalize()
        .expect("crates live two levels below the repository root")
}

/// A context under `tmp` (a test's `CARGO_TARGET_TMPDIR`) whose cache persists across test runs
/// (dummy checkpoints are reused) and whose work dir is fresh. `FLEXBENCH_TEST_PYTHON` picks
/// another interpreter.
pub fn ctx(project_root: &Path, tmp: &str, test: &str) -> RunContext {
    let tmp = PathBuf::from(tmp);
    let work = tmp.join(format!("work-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("creating a test's work dir");
    RunContext {
        project_root: project_root.to_path_buf(),
        case_file: work.join("case.json"),
        work_dir: work,
        cache_dir: tmp.join("cache"),
        bin_dir: tmp.join("bin"),
        python: std::env::var_os("FLEXBENCH_TEST_PYTHON").map(PathBuf::from),
    }
}

/// Whether the backend's environment is usable; when not, the test says so and is skipped,
/// unless [`REQUIRE_PYTHON_ENV`] turns that into a failure.
pub fn python_ready(backend: &dyn Backend, ctx: &RunContext) -> bool {
    match backend.probe(ctx) {
        Ok(()) => true,
        Err(e) if std::env::var(REQUIRE_PYTHON_ENV).as_deref() == Ok("1") => {
            panic!(
                "{REQUIRE_PYTHON_ENV}=1 but the {} backend is unavailable: {e}",
                backend.name()
            )
        }
        Err(e) => {
            eprintln!("SKIPPED: {} backend unavailable here: {e}", backend.name());
            false
        }
    }
}

/// A case a Python runner finishes in seconds: prompt 8, gen 5, batch 2, two repetitions, on
/// the CPU with dummy weights.
pub fn small_case(model: &str, framework: &str, placement: crate::Placement) -> crate::Case {
    crate::Case {
        model: model.into(),
        prompt_len: 8,
        gen_len: 5,
        gpu_batch_size: 2,
        placement,
        repetitions: 2,
        ..crate::Case::example(framework)
    }
}

/// Set to `1` where a Slurm cluster must answer (CI, after `scripts/slurm-local.sh start`).
pub const REQUIRE_SLURM_ENV: &str = "FLEXBENCH_REQUIRE_SLURM";

/// The Slurm cluster tests submit to: the one `SLURM_CONF` names, else the local test cluster
/// of `scripts/slurm-local.sh` (its config under `$FLEXBENCH_SLURM_DIR`, default the cache's
/// `slurm/`), else the machine's own configuration.
#[derive(Debug, Clone)]
pub struct TestSlurm {
    /// The `SLURM_CONF` to give Slurm's commands, when the environment does not set one.
    pub conf: Option<PathBuf>,
}

impl TestSlurm {
    /// `cmd` with this cluster's configuration in its environment.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        if let Some(conf) = &self.conf {
            cmd.env("SLURM_CONF", conf);
        }
        cmd
    }
}

/// The cluster when its controller answers `scontrol ping`; when not, the test says so and is
/// skipped, unless [`REQUIRE_SLURM_ENV`] turns that into a failure.
pub fn slurm_ready() -> Option<TestSlurm> {
    let conf = match std::env::var_os("SLURM_CONF") {
        Some(_) => None,
        None => {
            let dir = std::env::var_os("FLEXBENCH_SLURM_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| crate::dirs::cache_dir().join("slurm"));
            Some(dir.join("slurm.conf")).filter(|c| c.is_file())
        }
    };
    let slurm = TestSlurm { conf };
    let answer = slurm.command("scontrol").arg("ping").output();
    let why = match answer {
        Ok(o) if o.status.success() => return Some(slurm),
        Ok(o) => {
            let said = format!(
                "{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let last = said.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
            format!("`scontrol ping` says: {}", last.trim())
        }
        Err(e) => format!("cannot run scontrol: {e}"),
    };
    let hint = "start the local test cluster with `scripts/slurm-local.sh start`";
    if std::env::var(REQUIRE_SLURM_ENV).as_deref() == Ok("1") {
        panic!("{REQUIRE_SLURM_ENV}=1 but no Slurm cluster answers ({why}); {hint}");
    }
    eprintln!("SKIPPED: no Slurm cluster answers ({why}); {hint}");
    None
}
