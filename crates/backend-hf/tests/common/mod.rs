//! Helpers for tests that run real Python children.
#![allow(dead_code)]

use std::path::PathBuf;

use bench_core::{Case, Device, Placement, RunContext, Weights};

pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A context whose cache persists across test runs (dummy checkpoints are reused) and whose work
/// dir is fresh.
pub fn ctx(test: &str) -> RunContext {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let work = tmp.join(format!("work-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    RunContext {
        project_root: project_root(),
        case_file: work.join("case.json"),
        work_dir: work,
        cache_dir: tmp.join("cache"),
        bin_dir: tmp.join("bin"),
        python: std::env::var_os("FLEXBENCH_TEST_PYTHON").map(PathBuf::from),
    }
}

pub fn case(model: &str, framework: &str, placement: Placement) -> Case {
    Case {
        model: model.into(),
        framework: framework.into(),
        prompt_len: 8,
        gen_len: 5,
        cut_gen_len: None,
        gpu_batch_size: 2,
        num_gpu_batches: 1,
        placement,
        device: Device::Cpu,
        weights: Weights::Dummy,
        num_nodes: 1,
        num_gpus_per_node: 1,
        warmup: 1,
        repetitions: 2,
        timeout_s: None,
    }
}

/// Whether the Python environment is usable; when not, the test says so and is skipped, unless
/// FLEXBENCH_REQUIRE_PYTHON=1 (CI after `cargo xtask python-env`) turns that into a failure.
pub fn python_ready(backend: &dyn bench_core::Backend, ctx: &RunContext) -> bool {
    match backend.probe(ctx) {
        Ok(()) => true,
        Err(e) if std::env::var("FLEXBENCH_REQUIRE_PYTHON").as_deref() == Ok("1") => {
            panic!(
                "FLEXBENCH_REQUIRE_PYTHON=1 but the {} backend is unavailable: {e}",
                backend.name()
            )
        }
        Err(e) => {
            eprintln!("SKIPPED: {} backend unavailable here: {e}", backend.name());
            false
        }
    }
}
