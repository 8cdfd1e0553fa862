//! Helpers for backend crates' tests that run real runner processes: a fresh context per test,
//! and the rule for tests that need the Python environment (skip saying why, unless CI asks for
//! them with `FLEXBENCH_REQUIRE_PYTHON=1`).

use std::path::{Path, PathBuf};

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
