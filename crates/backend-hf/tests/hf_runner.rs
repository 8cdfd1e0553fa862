//! Runs the hf runner for real (Python child processes) on small dummy models.

use std::time::Duration;

use backend_hf::HfBackend;
use bench_core::protocol::{find_result, EXIT_OOM, EXIT_UNAVAILABLE};
use bench_core::run::execute::run_alone;
use bench_core::run::supervise::capture;
use bench_core::{testkit, Backend, Device, Placement, RunContext};

fn ctx(test: &str) -> RunContext {
    let root = testkit::project_root(env!("CARGO_MANIFEST_DIR"));
    testkit::ctx(&root, env!("CARGO_TARGET_TMPDIR"), test)
}

#[test]
fn every_placement_runs_and_agrees_token_for_token() {
    let ctx = ctx("hf-placements");
    if !testkit::python_ready(&HfBackend, &ctx) {
        return;
    }
    let mut tokens = Vec::new();
    for placement in [Placement::Gpu, Placement::Cpu, Placement::Disk] {
        let case = testkit::small_case("opt-tiny-odd", "hf", placement.clone());
        HfBackend.check_case(&case, &ctx).unwrap();
        let out = run_alone(&HfBackend, &case, &ctx, Duration::from_secs(300)).unwrap();
        assert!(
            out.status.unwrap().success(),
            "{placement:?}: {}",
            out.stderr
        );
        let r = find_result(&out.stdout).unwrap().expect("a result line");
        assert_eq!(r.step_times_s.len(), 2, "one list per repetition");
        assert!(r
            .step_times_s
            .iter()
            .all(|s| s.len() == 5 && s.iter().all(|t| *t > 0.0)));
        assert_eq!(r.generated_tokens, 2 * 5);
        let t = r.tokens.clone().unwrap();
        assert_eq!((t.len(), t[0].len()), (2, 5));
        assert!(t.iter().flatten().all(|&id| id < 997));
        assert!(r.peak_memory_bytes["host_rss"] > 10 << 20);
        assert_eq!(r.versions["transformers"], "5.23.0".to_string());
        if placement == Placement::Cpu {
            assert!(
                r.notes.iter().any(|n| n.contains("offloads nothing")),
                "{:?}",
                r.notes
            );
        }
        if placement == Placement::Disk {
            assert!(
                r.peak_memory_bytes.get("disk").copied().unwrap_or(0) > 0,
                "{:?}",
                r.peak_memory_bytes
            );
        }
        tokens.push(t);
    }
    // same weights, same prompts, same fp32 math: the placements must not change a single token
    assert_eq!(tokens[0], tokens[1]);
    assert_eq!(tokens[0], tokens[2]);
}

#[test]
fn injected_oom_exits_with_the_oom_code() {
    let ctx = ctx("hf-oom");
    if !testkit::python_ready(&HfBackend, &ctx) {
        return;
    }
    let case = testkit::small_case("opt-tiny", "hf", Placement::Gpu);
    std::fs::write(&ctx.case_file, serde_json::to_vec(&case).unwrap()).unwrap();
    HfBackend.prepare(&case, &ctx).unwrap();
    let mut cmd = HfBackend.command(&case, &ctx).unwrap();
    cmd.env("FLEXBENCH_TEST_FAULT", "oom");
    let out = capture(cmd, Duration::from_secs(300)).unwrap();
    assert_eq!(out.status.unwrap().code(), Some(EXIT_OOM), "{}", out.stderr);
    assert!(out.stderr.contains("out of memory"), "{}", out.stderr);
    assert!(find_result(&out.stdout).unwrap().is_none());
}

#[test]
fn cuda_case_is_refused_without_a_gpu() {
    let ctx = ctx("hf-cuda");
    let mut case = testkit::small_case("opt-tiny", "hf", Placement::Gpu);
    case.device = Device::Cuda;
    if bench_core::env::nvidia_gpu_present() {
        assert!(HfBackend.check_case(&case, &ctx).is_ok());
        return;
    }
    let err = HfBackend.check_case(&case, &ctx).unwrap_err();
    assert!(err.contains("no CUDA GPU"), "{err}");
    // Run anyway (as if check_case were skipped): the runner itself answers "unavailable".
    if !testkit::python_ready(&HfBackend, &ctx) {
        return;
    }
    let out = run_alone(&HfBackend, &case, &ctx, Duration::from_secs(300)).unwrap();
    assert_eq!(
        out.status.unwrap().code(),
        Some(EXIT_UNAVAILABLE),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("no CUDA GPU"), "{}", out.stderr);
}

#[test]
fn missing_interpreter_makes_the_backend_unavailable() {
    let mut ctx = ctx("hf-nopython");
    ctx.python = Some("/nonexistent/python3".into());
    let err = HfBackend.probe(&ctx).unwrap_err();
    assert!(err.contains("cargo xtask python-env"), "{err}");
}

#[test]
fn checkpoint_without_config_is_a_clear_prepare_error() {
    let ctx = ctx("hf-badckpt");
    let mut case = testkit::small_case("opt-tiny", "hf", Placement::Gpu);
    case.weights = bench_core::Weights::Checkpoint(ctx.work_dir.join("no-such-checkpoint"));
    let err = format!("{:#}", HfBackend.prepare(&case, &ctx).unwrap_err());
    assert!(
        err.contains("no config.json") && err.contains("no-such-checkpoint"),
        "{err}"
    );
}
