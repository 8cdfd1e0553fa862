//! The child protocol through real `flexbench-native run-case` processes.

use std::path::Path;
use std::process::{Command, Output};

use bench_core::protocol::{find_result, EXIT_OOM, EXIT_UNAVAILABLE};
use bench_core::{Backend, Case, Device, Placement, Policy, RunContext, Weights};

/// A context for `NativeBackend::check_case` (which looks at none of its paths).
fn context() -> RunContext {
    let tmp = std::env::temp_dir();
    RunContext {
        project_root: tmp.clone(),
        case_file: tmp.join("case.json"),
        work_dir: tmp.clone(),
        cache_dir: tmp.clone(),
        bin_dir: tmp,
        python: None,
    }
}

fn case(model: &str) -> Case {
    Case {
        model: model.into(),
        prompt_len: 12,
        gen_len: 6,
        gpu_batch_size: 3,
        repetitions: 2,
        ..Case::example("native")
    }
}

fn run_in(c: &Case, tag: &str, offload_dir: Option<&Path>) -> Output {
    let file =
        std::env::temp_dir().join(format!("flexbench-case-{}-{tag}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_string(c).unwrap()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flexbench-native"));
    cmd.arg("run-case").arg("--case").arg(&file);
    if let Some(d) = offload_dir {
        cmd.arg("--offload-dir").arg(d);
    }
    let out = cmd.output().unwrap();
    std::fs::remove_file(&file).ok();
    out
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
    // a cuda case is unavailable exactly where the probe says so, with the probe's reason
    // (the orchestrator's check_case gives the same answer before it starts a child)
    let check = backend_native::NativeBackend.check_case(&c, &context());
    match backend_native::runner::cuda_available() {
        Err(reason) => {
            assert_eq!(out.status.code(), Some(EXIT_UNAVAILABLE));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&reason), "{err}");
            assert_eq!(check, Err(reason));
        }
        Ok(()) => {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(check, Ok(()));
        }
    }
    // more than one device is what the engine does not run
    let mut c = case("opt-tiny");
    c.num_gpus_per_node = 2;
    let check = backend_native::NativeBackend.check_case(&c, &context());
    assert!(check.unwrap_err().contains("one device"));
}

/// Compressed weights on disk: the case runs, and the disk reads and the disk tier's peak are
/// the compressed bytes (about 0.28 of fp16's); a cache compression the model's head_dim
/// cannot use is a clear error, not a result.
#[test]
fn compressed_cases_move_compressed_bytes() {
    let dir = std::env::temp_dir().join(format!("flexbench-rc-q4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = case("opt-tiny-odd");
    c.repetitions = 1;
    let mut results = Vec::new();
    let cfg = bench_core::model::lookup("opt-tiny-odd").unwrap();
    for compress in [false, true] {
        let mut p = Policy::new([0, 0, 100, 0, 100, 0]);
        p.compress_weight = compress;
        let plan = backend_native::offload::weights::WeightPlan::new(&cfg, &p, false);
        c.placement = Placement::Policy(p);
        let out = run_in(&c, &format!("q4-{compress}"), Some(&dir));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = find_result(&String::from_utf8_lossy(&out.stdout))
            .unwrap()
            .unwrap();
        assert_eq!(r.generated_tokens, 3 * 6);
        // the disk tier holds the files as written: compressed tensors at their packed size
        assert_eq!(
            r.peak_memory_bytes["disk"],
            plan.disk_bytes(),
            "compressed {compress}"
        );
        results.push(r);
    }
    let ratio = |key: &str, f: fn(&bench_core::RawResult, &str) -> u64| {
        f(&results[1], key) as f64 / f(&results[0], key) as f64
    };
    let read = ratio("disk_read", |r, k| r.bytes_moved[k]);
    let disk = ratio("disk", |r, k| r.peak_memory_bytes[k]);
    // opt-tiny-odd's tensors are small, so O_DIRECT's 4 KiB padding and the fp16 biases weigh
    // more than at real sizes (opt-1.3b: 0.28); every step reads the whole files either way
    assert!(
        read < 0.55 && (read / disk - 1.0).abs() < 0.1,
        "disk reads {read:.3}, disk tier {disk:.3} of fp16's"
    );
    let mut p = Policy::new([100, 0, 100, 0, 100, 0]);
    p.compress_cache = true;
    c.placement = Placement::Policy(p);
    let out = run_in(&c, "q4-cache", Some(&dir));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("head_dim of 16")
            && err.contains("compress_cache")
            && !err.contains("panicked"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Offloaded placements run through the block schedule: the same tokens as all in memory, the
/// bytes on the links the placement implies, memory per tier, I/O wait against compute, and no
/// files left in the offload directory.
#[test]
fn offloaded_placements_run_and_report_their_traffic() {
    let dir = std::env::temp_dir().join(format!("flexbench-rc-offload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = case("opt-tiny-odd");
    let plain = find_result(&String::from_utf8_lossy(&run(&base, "plain", false).stdout))
        .unwrap()
        .unwrap();
    for (tag, percent, nb) in [
        ("wdisk", [0, 0, 100, 0, 100, 0], 1),
        ("cdisk", [100, 0, 0, 0, 100, 0], 1),
        ("split", [50, 50, 50, 50, 0, 100], 3),
    ] {
        let mut c = base.clone();
        c.placement = Placement::Policy(Policy::new(percent));
        c.num_gpu_batches = nb;
        c.gpu_batch_size = 3 / nb;
        let out = run_in(&c, tag, Some(&dir));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{tag}: {err}");
        let r = find_result(&String::from_utf8_lossy(&out.stdout))
            .unwrap()
            .expect("a result line");
        assert_eq!(
            r.tokens, plain.tokens,
            "{tag}: tokens depend on the placement"
        );
        let moved = |k: &str| r.bytes_moved[k];
        let peak = |k: &str| r.peak_memory_bytes[k];
        match tag {
            "wdisk" => {
                assert!(
                    moved("disk_read") > 0 && moved("host_to_compute") > 0,
                    "{tag}: {:?}",
                    r.bytes_moved
                );
                assert_eq!(moved("disk_write"), 0);
                assert!(peak("disk") > 0);
                // every weight byte is on disk: none on the other tiers
                assert!(peak("weights_disk") > 0);
                // bytes_moved is per repetition: each of its steps reads every weight once, plus
                // the 4 KiB alignment of O_DIRECT spans (much of a model this small); summed over
                // the two repetitions it would be twice that
                let steps = c.measured_gen_len() as u64;
                let read = moved("disk_read");
                let want = steps * peak("weights_disk");
                assert!(
                    read >= want && read < 2 * want,
                    "{tag}: read {read} for {steps} steps of {} weight bytes ({} repetitions)",
                    peak("weights_disk"),
                    c.repetitions
                );
                assert_eq!(peak("weights_host") + peak("weights_compute"), 0);
            }
            "cdisk" => {
                assert!(
                    moved("disk_write") > 0 && moved("disk_read") > 0,
                    "{tag}: {:?}",
                    r.bytes_moved
                );
                assert!(peak("disk") > 0);
            }
            _ => {
                assert!(moved("host_to_compute") > 0 && moved("compute_to_host") > 0);
                assert!(peak("host") > 0 && peak("compute") > 0);
            }
        }
        assert!(r.io_wait_s.is_some() && r.compute_s.unwrap() > 0.0);
        assert!(peak("host_rss") > 0);
    }
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "stray files: {left:?}");
    std::fs::remove_dir(&dir).unwrap();
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
