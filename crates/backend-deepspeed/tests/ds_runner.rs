//! Runs the deepspeed runner for real (launcher + rank processes) on small dummy models, including
//! the failure paths: a failing rank, a hung rank, and what is left behind (nothing).

use std::time::Duration;

use backend_deepspeed::DeepSpeedBackend;
use bench_core::protocol::{find_result, EXIT_OOM};
use bench_core::run::execute::run_alone;
use bench_core::run::supervise::capture;
use bench_core::{testkit, Backend, Placement, RunContext};

fn ctx(test: &str) -> RunContext {
    let root = testkit::project_root(env!("CARGO_MANIFEST_DIR"));
    testkit::ctx(&root, env!("CARGO_TARGET_TMPDIR"), test)
}

/// Pids of live processes whose environment holds `marker` (every process a run started inherits it).
fn processes_with(marker: &str) -> Vec<u32> {
    let needle = format!("FLEXBENCH_TEST_MARKER={marker}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false);
        if !zombie && env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// (That its tokens equal HF Accelerate's on the same case is checked in xtask's
/// `frameworks_agree` test, which sees every backend.)
#[test]
fn zero3_cpu_offload_runs_and_cleans_up() {
    let ctx = ctx("ds-cpu");
    if !testkit::python_ready(&DeepSpeedBackend, &ctx) {
        return;
    }
    let case = testkit::small_case("opt-tiny-odd", "deepspeed", Placement::Cpu);
    DeepSpeedBackend.check_case(&case, &ctx).unwrap();
    let out = run_alone(&DeepSpeedBackend, &case, &ctx, Duration::from_secs(600)).unwrap();
    assert!(out.status.unwrap().success(), "{}", out.stderr);
    // DeepSpeed's CPU all-reduce buffers (a 69 MB file in /dev/shm per rank, named after the
    // rendezvous port the launcher logs) must not outlive the run
    let log = format!("{}{}", out.stdout, out.stderr);
    let port = log
        .split("--master_port=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the launcher logs its command with --master_port");
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.starts_with("deepspeed_allreduce_buffer") && n.contains(&format!("_{port}_"))
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
    let r = find_result(&out.stdout).unwrap().expect("a result line");
    assert_eq!(r.step_times_s.len(), 2);
    assert!(r
        .step_times_s
        .iter()
        .all(|s| s.len() == 5 && s.iter().all(|t| *t > 0.0)));
    assert_eq!(r.generated_tokens, 10);
    assert_eq!(r.versions["deepspeed"], "0.19.8".to_string());
    assert!(r.notes[0].contains("offload_param cpu"), "{:?}", r.notes);
}

#[test]
fn zero3_nvme_offload_runs() {
    let ctx = ctx("ds-nvme");
    // opt-125m: a tiny model fits DeepSpeed's swap buffers whole and never touches the disk
    let mut case = testkit::small_case("opt-125m", "deepspeed", Placement::Disk);
    case.repetitions = 1;
    if !backend_deepspeed::libaio_installed() {
        let err = DeepSpeedBackend.check_case(&case, &ctx).unwrap_err();
        assert!(err.contains("libaio-dev"), "{err}");
        return;
    }
    if !testkit::python_ready(&DeepSpeedBackend, &ctx) {
        return;
    }
    // the first run compiles DeepSpeed's async_io op (minutes); later runs reuse it
    let out = run_alone(&DeepSpeedBackend, &case, &ctx, Duration::from_secs(900)).unwrap();
    assert!(out.status.unwrap().success(), "{}", out.stderr);
    let r = find_result(&out.stdout).unwrap().expect("a result line");
    assert!(r.notes[0].contains("offload_param nvme"), "{:?}", r.notes);
    // the parameters live in swap files (fp32: 4 bytes each) and are read back for every step
    let disk = r.peak_memory_bytes.get("disk").copied().unwrap_or(0);
    assert!(disk > 400 << 20, "{:?}", r.peak_memory_bytes);
    assert!(
        r.bytes_moved["disk_read"] > 100 << 20,
        "{:?}",
        r.bytes_moved
    );
}

/// Two ranks; rank 1 fails with the OOM code mid-generation while rank 0 waits for it in a
/// collective: the launcher must end rank 0 and exit with rank 1's code, leaving nothing behind.
#[test]
fn failing_rank_ends_the_launcher_with_its_code() {
    let ctx = ctx("ds-rankfail");
    if !testkit::python_ready(&DeepSpeedBackend, &ctx) {
        return;
    }
    let mut case = testkit::small_case("opt-tiny", "deepspeed", Placement::Cpu);
    case.num_gpus_per_node = 2;
    case.repetitions = 1;
    std::fs::write(&ctx.case_file, serde_json::to_vec(&case).unwrap()).unwrap();
    DeepSpeedBackend.prepare(&case, &ctx).unwrap();
    let marker = format!("rankfail-{}", std::process::id());
    let mut cmd = DeepSpeedBackend.command(&case, &ctx).unwrap();
    cmd.env("FLEXBENCH_TEST_FAULT", format!("exit:{EXIT_OOM}@1"))
        .env("FLEXBENCH_TEST_MARKER", &marker);
    let out = capture(cmd, Duration::from_secs(600)).unwrap();
    let status = out
        .status
        .expect("the launcher ends by itself, no timeout needed");
    assert_eq!(status.code(), Some(EXIT_OOM), "{}", out.stderr);
    assert!(find_result(&out.stdout).unwrap().is_none());
    assert_eq!(processes_with(&marker), Vec::<u32>::new());
}

/// A rank that hangs: the timeout kills the child's process group, and with it every rank.
#[test]
fn hung_rank_is_killed_with_its_group() {
    let ctx = ctx("ds-hang");
    if !testkit::python_ready(&DeepSpeedBackend, &ctx) {
        return;
    }
    let mut case = testkit::small_case("opt-tiny", "deepspeed", Placement::Cpu);
    case.num_gpus_per_node = 2;
    case.repetitions = 1;
    std::fs::write(&ctx.case_file, serde_json::to_vec(&case).unwrap()).unwrap();
    DeepSpeedBackend.prepare(&case, &ctx).unwrap();
    let marker = format!("hang-{}", std::process::id());
    let mut cmd = DeepSpeedBackend.command(&case, &ctx).unwrap();
    cmd.env("FLEXBENCH_TEST_FAULT", "hang@1")
        .env("FLEXBENCH_TEST_MARKER", &marker);
    let out = capture(cmd, Duration::from_secs(90)).unwrap();
    assert!(
        out.status.is_none(),
        "expected a hang, got {:?}: {}",
        out.status,
        out.stderr
    );
    assert!(
        out.stderr.contains("test fault injected: hang"),
        "the hang was reached: {}",
        out.stderr
    );
    // killpg is asynchronous: give the kernel a moment to reap
    let mut left = processes_with(&marker);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = processes_with(&marker);
    }
    assert_eq!(left, Vec::<u32>::new(), "processes left behind");
}

/// The launcher itself cannot start (an interpreter without DeepSpeed, as when the probe is
/// bypassed): the child fails fast with a non-zero code and says why on stderr.
#[test]
fn launcher_failure_is_a_quick_error_with_the_reason() {
    let Some(py) = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
    else {
        eprintln!("SKIPPED: no system python3 without DeepSpeed to launch with");
        return;
    };
    let mut ctx = ctx("ds-nolauncher");
    ctx.python = Some(py.clone());
    if DeepSpeedBackend.probe(&ctx).is_ok() {
        eprintln!("SKIPPED: {} has DeepSpeed", py.display());
        return;
    }
    let case = testkit::small_case("opt-tiny", "deepspeed", Placement::Cpu);
    let out = run_alone(&DeepSpeedBackend, &case, &ctx, Duration::from_secs(120)).unwrap();
    let status = out.status.expect("fails by itself");
    assert!(!status.success());
    assert!(out.stderr.contains("No module named"), "{}", out.stderr);
    assert!(find_result(&out.stdout).unwrap().is_none());
}
