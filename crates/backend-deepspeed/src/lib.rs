//! backend-deepspeed: runs DeepSpeed ZeRO-Inference (ZeRO stage 3 with parameter offload) through
//! the `deepspeed` launcher, one process per rank, with FlexLLMGen's baseline settings.
//!
//! The runner script is `python/run_deepspeed.py`; the protocol code every Python runner shares
//! (`flexbench_runner.py`) lives in bench-core's `python/` directory and reaches the ranks through
//! `PYTHONPATH`. The Python environment, the shared dummy checkpoint and the prompts are
//! bench-core's (`bench_core::{pyenv, inputs}`); this crate declares what it needs of them.
//!
//! Process hygiene: the launcher (`python -m deepspeed.launcher.runner`, which is what the
//! `deepspeed` command runs) starts `deepspeed.launcher.launch`, which starts the ranks with plain
//! `Popen`: no new session or group, so the orchestrator's kill of the child's process group
//! reaches every rank. When a rank exits non-zero, `launch` kills the other ranks and exits with
//! that rank's code, which the runner passes on, so exit codes 3 (OOM) and 4 (unavailable) survive.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use bench_core::pyenv::{self, Package, PythonRequirements, SourceBuild, SystemPackage};
use bench_core::{env, inputs, Backend, Case, Placement, RunContext};

/// The runner script, relative to this crate's `python/` directory.
pub const SCRIPT: &str = "run_deepspeed.py";

/// Environment variable naming a DeepSpeed hostfile, needed for cases with `num_nodes` > 1.
pub const HOSTFILE_ENV: &str = "FLEXBENCH_HOSTFILE";

/// Where the deepspeed runner script is.
pub fn script_path(project_root: &Path) -> PathBuf {
    project_root
        .join("crates")
        .join("backend-deepspeed")
        .join("python")
        .join(SCRIPT)
}

/// What `run_deepspeed.py` imports. DeepSpeed builds from its sdist against the environment's own
/// torch (its setup imports torch), after what it needs at build and run time.
pub const REQUIREMENTS: PythonRequirements = PythonRequirements {
    packages: &[
        Package::pinned("torch", "2.15.0"),
        Package::pinned("transformers", "5.23.0"),
        Package::pinned("accelerate", "1.15.0"),
        Package::any("safetensors"),
        Package::any("numpy"),
    ],
    source_builds: &[SourceBuild {
        package: Package::pinned("deepspeed", "0.19.8"),
        build_deps: &[
            "ninja",
            "py-cpuinfo",
            "hjson",
            "msgpack",
            "einops",
            "packaging",
            "psutil",
            "pydantic",
            "tqdm",
        ],
    }],
    system: &[
        SystemPackage {
            apt: "libaio-dev",
            why: "DeepSpeed NVMe offload, deepspeed cases with placement disk",
            installed: libaio_installed,
        },
        SystemPackage {
            apt: "g++",
            why: "DeepSpeed compiles its ops at first use",
            installed: gxx_installed,
        },
    ],
};

fn gxx_installed() -> bool {
    pyenv::command_works("g++", "--version")
}

/// Whether the libaio headers DeepSpeed's async_io op compiles against are installed.
pub fn libaio_installed() -> bool {
    ["/usr/include/libaio.h", "/usr/local/include/libaio.h"]
        .iter()
        .any(|p| Path::new(p).exists())
}

pub struct DeepSpeedBackend;

impl Backend for DeepSpeedBackend {
    fn name(&self) -> &'static str {
        "deepspeed"
    }
    fn frameworks(&self) -> &'static [&'static str] {
        &["deepspeed"]
    }
    fn python_requirements(&self) -> Option<&'static PythonRequirements> {
        Some(&REQUIREMENTS)
    }
    fn probe(&self, ctx: &RunContext) -> Result<(), String> {
        let script = script_path(&ctx.project_root);
        if !script.is_file() {
            return Err(format!("runner script {} is missing", script.display()));
        }
        pyenv::probe_ctx(ctx, &REQUIREMENTS)?;
        // DeepSpeed compiles its communication op at first init (and async_io for NVMe).
        if !gxx_installed() {
            return Err(
                "DeepSpeed compiles its ops with g++, which is not installed: apt-get install g++"
                    .into(),
            );
        }
        Ok(())
    }
    fn check_case(&self, case: &Case, _ctx: &RunContext) -> Result<(), String> {
        if case.placement == Placement::Disk && !libaio_installed() {
            return Err("NVMe offload needs libaio: apt-get install libaio-dev".into());
        }
        if case.num_nodes > 1 && std::env::var_os(HOSTFILE_ENV).is_none() {
            return Err(format!(
                "{} nodes need a DeepSpeed hostfile: set {HOSTFILE_ENV} to one listing them",
                case.num_nodes
            ));
        }
        let ranks = case.num_nodes * case.num_gpus_per_node;
        if case.batch_size().checked_rem(ranks) != Some(0) {
            return Err(format!(
                "batch {} does not split over {ranks} ranks",
                case.batch_size()
            ));
        }
        env::check_device(case.device)
    }
    /// The shared checkpoint, and for NVMe offload the swap files: every parameter in the
    /// dtype the runner uses (fp16 on CUDA, fp32 on the CPU unless FLEXBENCH_CPU_DTYPE=bf16).
    fn disk_needs(&self, case: &Case, ctx: &RunContext) -> Vec<bench_core::DiskNeed> {
        let mut needs: Vec<bench_core::DiskNeed> = inputs::checkpoint_disk_need(case, ctx)
            .into_iter()
            .collect();
        if case.placement == Placement::Disk {
            if let Some(cfg) = bench_core::model::lookup(&case.model) {
                let bytes_per_param = match case.device {
                    bench_core::Device::Cuda => 2,
                    bench_core::Device::Cpu
                        if std::env::var("FLEXBENCH_CPU_DTYPE").as_deref() == Ok("bf16") =>
                    {
                        2
                    }
                    bench_core::Device::Cpu => 4,
                };
                needs.push(bench_core::DiskNeed {
                    dir: ctx.work_dir.clone(),
                    bytes: cfg.model_bytes() / 2 * bytes_per_param,
                    what: "DeepSpeed's NVMe swap files".into(),
                });
            }
        }
        needs
    }
    fn prepare(&self, case: &Case, ctx: &RunContext) -> anyhow::Result<()> {
        inputs::prepare_checkpoint_and_prompts(case, ctx)
    }
    fn versions(&self, ctx: &RunContext) -> std::collections::BTreeMap<String, String> {
        pyenv::probe_ctx(ctx, &REQUIREMENTS).unwrap_or_default()
    }
    fn command(&self, case: &Case, ctx: &RunContext) -> anyhow::Result<Command> {
        let python = pyenv::python_for(ctx);
        let mut cmd = Command::new(&python);
        // `python -m deepspeed.launcher.runner` is the `deepspeed` command, bound to this interpreter
        // (the launcher starts the ranks with the interpreter it runs under).
        cmd.arg("-u").arg("-m").arg("deepspeed.launcher.runner");
        if case.num_nodes > 1 {
            let hostfile = std::env::var_os(HOSTFILE_ENV).unwrap_or_default();
            cmd.arg("--hostfile")
                .arg(hostfile)
                .arg("--num_nodes")
                .arg(case.num_nodes.to_string());
        }
        if case.num_nodes == 1 {
            // The launcher's default rendezvous port (29500) is one per machine: two DeepSpeed
            // cases at once (parallel tests, two benches) would fail with EADDRINUSE.
            cmd.arg("--master_port").arg(free_port()?.to_string());
        }
        cmd.arg("--num_gpus")
            .arg(case.num_gpus_per_node.to_string())
            .arg(script_path(&ctx.project_root))
            .arg("--case")
            .arg(&ctx.case_file)
            .arg("--checkpoint")
            .arg(inputs::checkpoint_dir(case, ctx)?)
            .arg("--prompts")
            .arg(inputs::prompts_file(ctx))
            .arg("--offload-dir")
            .arg(&ctx.work_dir)
            .env("PATH", pyenv::path_with_interpreter_bin(&python))
            .env("PYTHONPATH", pyenv::python_path(&ctx.project_root))
            .env("PYTHONUNBUFFERED", "1")
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1");
        if case.device == bench_core::Device::Cpu {
            // Without it DeepSpeed picks CUDA whenever torch sees a GPU, even for a cpu case.
            cmd.env("DS_ACCELERATOR", "cpu");
        }
        Ok(cmd)
    }
}

/// A TCP port free on this machine right now (the kernel's pick for port 0). Another process may
/// take it before the launcher binds it, but the window is short next to a fixed port's certainty.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("finding a free port for DeepSpeed's rendezvous")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RunContext {
        RunContext {
            project_root: PathBuf::from("/repo"),
            case_file: PathBuf::from("/w/case.json"),
            work_dir: PathBuf::from("/w"),
            cache_dir: PathBuf::from("/cache"),
            bin_dir: PathBuf::from("/repo/target/release"),
            python: Some(PathBuf::from("/opt/py/bin/python")),
        }
    }

    fn case() -> Case {
        Case {
            placement: Placement::Cpu,
            num_gpus_per_node: 2,
            ..Case::example("deepspeed")
        }
    }

    #[test]
    fn command_goes_through_the_launcher_with_the_shared_module_on_the_path() {
        let cmd = DeepSpeedBackend.command(&case(), &ctx()).unwrap();
        assert_eq!(cmd.get_program(), "/opt/py/bin/python");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let launcher = args
            .iter()
            .position(|a| a == "deepspeed.launcher.runner")
            .unwrap();
        let gpus = args.iter().position(|a| a == "--num_gpus").unwrap();
        let script = args
            .iter()
            .position(|a| a.ends_with("backend-deepspeed/python/run_deepspeed.py"))
            .unwrap();
        // launcher options come before the script, the script's own after it
        assert!(launcher < gpus && gpus < script);
        assert_eq!(args[gpus + 1], "2");
        assert!(!args.contains(&"--hostfile".to_string()));
        let port = args.iter().position(|a| a == "--master_port").unwrap();
        assert!(port < script);
        assert!(args[port + 1].parse::<u16>().unwrap() > 0);
        let ckpt = args.iter().position(|a| a == "--checkpoint").unwrap();
        assert_eq!(args[ckpt + 1], "/cache/dummy/opt-125m-5eedf1e8");
        let env: std::collections::HashMap<_, _> = cmd
            .get_envs()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.map(|v| v.to_owned())))
            .collect();
        let pp = env["PYTHONPATH"].clone().unwrap();
        assert!(
            pp.to_string_lossy()
                .starts_with("/repo/crates/bench-core/python"),
            "{pp:?}"
        );
        assert_eq!(
            env["DS_ACCELERATOR"].as_deref(),
            Some(std::ffi::OsStr::new("cpu"))
        );
        assert!(env["PATH"]
            .clone()
            .unwrap()
            .to_string_lossy()
            .starts_with("/opt/py/bin"));
    }

    #[test]
    fn check_case_refuses_what_cannot_run() {
        let mut c = case();
        c.gpu_batch_size = 3;
        assert!(DeepSpeedBackend
            .check_case(&c, &ctx())
            .unwrap_err()
            .contains("does not split"));
        assert!(!DeepSpeedBackend.takes_policy(), "preset placements only");
        let mut c = case();
        c.num_nodes = 2;
        if std::env::var_os(HOSTFILE_ENV).is_none() {
            assert!(DeepSpeedBackend
                .check_case(&c, &ctx())
                .unwrap_err()
                .contains(HOSTFILE_ENV));
        }
        assert!(DeepSpeedBackend.check_case(&case(), &ctx()).is_ok());
    }
}
