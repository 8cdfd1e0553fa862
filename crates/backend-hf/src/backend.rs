//! The `Backend` that runs hf cases: `python -u python/run_hf.py` with the shared checkpoint and
//! prompts, in the pinned Python environment it declares.

use std::path::{Path, PathBuf};
use std::process::Command;

use bench_core::pyenv::{self, Package, PythonRequirements};
use bench_core::{env, inputs, Backend, Case, RunContext};

/// The runner script, relative to this crate's `python/` directory.
pub const SCRIPT: &str = "run_hf.py";

/// What `run_hf.py` imports, at the versions it was tested with.
pub const REQUIREMENTS: PythonRequirements = PythonRequirements {
    packages: &[
        Package::pinned("torch", "2.15.0"),
        Package::pinned("transformers", "5.23.0"),
        Package::pinned("accelerate", "1.15.0"),
        Package::any("safetensors"),
        Package::any("numpy"),
    ],
    source_builds: &[],
    system: &[],
};

/// Where the hf runner script is.
pub fn script_path(project_root: &Path) -> PathBuf {
    project_root
        .join("crates")
        .join("backend-hf")
        .join("python")
        .join(SCRIPT)
}

pub struct HfBackend;

impl Backend for HfBackend {
    fn name(&self) -> &'static str {
        "hf"
    }
    fn frameworks(&self) -> &'static [&'static str] {
        &["hf"]
    }
    fn python_requirements(&self) -> Option<&'static PythonRequirements> {
        Some(&REQUIREMENTS)
    }
    fn probe(&self, ctx: &RunContext) -> Result<(), String> {
        let script = script_path(&ctx.project_root);
        if !script.is_file() {
            return Err(format!("runner script {} is missing", script.display()));
        }
        pyenv::probe_ctx(ctx, &REQUIREMENTS).map(|_| ())
    }
    fn check_case(&self, case: &Case, _ctx: &RunContext) -> Result<(), String> {
        if case.num_nodes > 1 {
            return Err(
                "hf (accelerate device maps) runs on one node; use deepspeed for several".into(),
            );
        }
        env::check_device(case.device)
    }
    /// The shared checkpoint only: transformers reads disk-offloaded safetensors weights from the
    /// checkpoint itself, with no copy in accelerate's offload folder.
    fn disk_needs(&self, case: &Case, ctx: &RunContext) -> Vec<bench_core::DiskNeed> {
        inputs::checkpoint_disk_need(case, ctx)
            .into_iter()
            .collect()
    }
    fn prepare(&self, case: &Case, ctx: &RunContext) -> anyhow::Result<()> {
        inputs::prepare_checkpoint_and_prompts(case, ctx)
    }
    fn versions(&self, ctx: &RunContext) -> std::collections::BTreeMap<String, String> {
        // The probe's answer (cached per process): the versions this run's cases will import.
        pyenv::probe_ctx(ctx, &REQUIREMENTS).unwrap_or_default()
    }
    fn command(&self, case: &Case, ctx: &RunContext) -> anyhow::Result<Command> {
        let python = pyenv::python_for(ctx);
        let mut cmd = Command::new(&python);
        cmd.arg("-u")
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
            // Hub lookups cannot succeed offline and only add retries: everything is local.
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1");
        Ok(cmd)
    }
}
