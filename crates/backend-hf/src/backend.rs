//! The `Backend` that runs hf cases: `python -u python/run_hf.py` with the shared checkpoint and
//! prompts.

use std::process::Command;

use bench_core::{Backend, Case, Placement, RunContext};

use crate::{gpu, inputs, pyenv, python_dir};

/// The runner script, relative to [`python_dir`].
pub const SCRIPT: &str = "run_hf.py";

pub struct HfBackend;

impl Backend for HfBackend {
    fn name(&self) -> &'static str {
        "hf"
    }
    fn frameworks(&self) -> &'static [&'static str] {
        &["hf"]
    }
    fn probe(&self, ctx: &RunContext) -> Result<(), String> {
        let script = python_dir(&ctx.project_root).join(SCRIPT);
        if !script.is_file() {
            return Err(format!("runner script {} is missing", script.display()));
        }
        pyenv::probe_ctx(ctx, pyenv::HF_MODULES).map(|_| ())
    }
    fn check_case(&self, case: &Case, _ctx: &RunContext) -> Result<(), String> {
        if let Placement::Policy(_) = case.placement {
            return Err("hf takes a preset placement (gpu, cpu or disk), not a policy".into());
        }
        if case.num_nodes > 1 {
            return Err(
                "hf (accelerate device maps) runs on one node; use deepspeed for several".into(),
            );
        }
        gpu::check_device(case.device)
    }
    fn prepare(&self, case: &Case, ctx: &RunContext) -> anyhow::Result<()> {
        inputs::prepare(case, ctx)
    }
    fn versions(&self, ctx: &RunContext) -> std::collections::BTreeMap<String, String> {
        // The probe's answer (cached per process): the versions this run's cases will import.
        pyenv::probe_ctx(ctx, pyenv::HF_MODULES).unwrap_or_default()
    }
    fn command(&self, case: &Case, ctx: &RunContext) -> anyhow::Result<Command> {
        let python = pyenv::python_for(ctx);
        let mut cmd = Command::new(&python);
        cmd.arg("-u")
            .arg(python_dir(&ctx.project_root).join(SCRIPT))
            .arg("--case")
            .arg(&ctx.case_file)
            .arg("--checkpoint")
            .arg(inputs::checkpoint_dir(case, ctx)?)
            .arg("--prompts")
            .arg(inputs::prompts_file(ctx))
            .arg("--offload-dir")
            .arg(&ctx.work_dir)
            .env("PATH", pyenv::path_with_interpreter_bin(&python))
            .env("PYTHONUNBUFFERED", "1")
            // Hub lookups cannot succeed offline and only add retries: everything is local.
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1");
        Ok(cmd)
    }
}
