//! The child protocol through real `flexbench-native run-case` processes.

use std::path::Path;
use std::process::{Command, Output};

use bench_core::protocol::{find_result, EXIT_OOM, EXIT_UNAVAILABLE};
use bench_core::{Case, Device, Placement, Weights};

fn case(model: &str) -> Case {
    Case {
        model: model.into(),
        framework: "native".into(),
        prompt_len: 12,
        gen_len: 6,
        cut_gen_len: None,
        gpu_batch_size: 3,
        num_gpu_batches: 1,
        placement: Placement::Gpu,
        device: Device::Cpu,
        weights: Weights::Dummy,
        num_nodes: 1,
        num_gpus_per_node: 1,
        warmup: 1,
        repetitions: 2,
        timeout_s: None,
    }
}

fn run(c: &Case, tag: &str, via_env: bool) -> Output {
    let file =
        std::env::temp_dir().join(format!("flexbench-case-{}-{tag}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_string(c).unwrap()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flexbench-native"));
    cmd.arg("run-case");
    if via_env {
        cmd.env("FLEXBENCH_CASE", &file);
    } else {
        cmd.arg("--case").arg(&file);
    }
    let out = cmd.output().unwrap();
    std::fs::remove_file(&file).ok();
    out
}

#[test]
fn dummy_case_prints_one_result() {
    let mut c = case("opt-tiny-odd");
    c.cut_gen_len = Some(4);
    let out = run(&c, "dummy", false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r = find_result(&String::from_utf8_lossy(&out.stdout))
        .unwrap()
        .expect("a result line");
    assert_eq!(r.step_times_s.len(), 2, "one list per repetition");
    assert!(r
        .step_times_s
        .iter()
        .all(|s| s.len() == 4 && s.iter().all(|&t| t > 0.0)));
    assert_eq!(r.generated_tokens, 3 * 4);
    let tokens = r.tokens.unwrap();
    assert_eq!(tokens.len(), 3);
    assert!(tokens.iter().flatten().all(|&t| (t as usize) < 997));
    assert!(r.peak_memory_bytes["host_rss"] > 1 << 20);
    assert!(r.versions.contains_key("flexbench-native"));
    // deterministic: the same case gives the same tokens
    let again = find_result(&String::from_utf8_lossy(&run(&c, "dummy2", true).stdout))
        .unwrap()
        .unwrap();
    assert_eq!(again.tokens.unwrap(), tokens);
}

#[test]
fn checkpoint_case_runs() {
    let mut c = case("golden");
    c.weights = Weights::Checkpoint(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/postln_bf16"),
    );
    c.repetitions = 1;
    let out = run(&c, "ckpt", false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = find_result(&String::from_utf8_lossy(&out.stdout))
        .unwrap()
        .unwrap();
    assert_eq!(r.generated_tokens, 3 * 6);
}

#[test]
fn unavailable_cases_exit_4_with_a_reason() {
    let mut c = case("opt-tiny");
    c.device = Device::Cuda;
    let out = run(&c, "cuda", false);
    assert_eq!(out.status.code(), Some(EXIT_UNAVAILABLE));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CUDA"));
    let mut c = case("opt-tiny");
    c.placement = Placement::Disk;
    let out = run(&c, "disk", false);
    assert_eq!(out.status.code(), Some(EXIT_UNAVAILABLE));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("offloader") && err.lines().count() == 1,
        "{err}"
    );
    assert!(find_result(&String::from_utf8_lossy(&out.stdout))
        .unwrap()
        .is_none());
}

#[test]
fn too_big_for_memory_exits_3() {
    let mut c = case("opt-175b");
    c.prompt_len = 8;
    let out = run(&c, "oom", false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_OOM), "{err}");
    assert!(
        err.contains("out of memory") && err.contains("GiB"),
        "{err}"
    );
}

#[test]
fn bad_case_file_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_flexbench-native"))
        .args(["run-case", "--case", "/nonexistent/case.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/case.json"));
}
