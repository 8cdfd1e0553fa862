//! What a Python runner reads besides the case: the model checkpoint and the prompt token ids.
//!
//! Dummy weights are written once per model into the cache as a HuggingFace checkpoint by the
//! native engine's generator (`backend_native::checkpoint_writer`), so every framework runs on the
//! same weights. Prompts come from `bench_core::prompts` and are written as JSON into the case's
//! work directory: one generator, no re-implementation in Python.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use backend_native::{checkpoint_writer, dummy::DEFAULT_SEED};
use bench_core::{Case, RunContext, Weights};

/// Name of the prompts file in the case's work directory.
pub const PROMPTS_FILE: &str = "prompts.json";

/// The checkpoint directory a case loads.
pub fn checkpoint_dir(case: &Case, ctx: &RunContext) -> Result<PathBuf> {
    match &case.weights {
        Weights::Checkpoint(p) => Ok(p.clone()),
        Weights::Dummy => {
            let cfg = bench_core::model::lookup(&case.model)
                .with_context(|| format!("no dummy weights for unknown model `{}`", case.model))?;
            Ok(checkpoint_writer::dummy_checkpoint_dir(
                &ctx.cache_dir,
                &cfg.name,
                DEFAULT_SEED,
            ))
        }
    }
}

/// The prompts file of a case.
pub fn prompts_file(ctx: &RunContext) -> PathBuf {
    ctx.work_dir.join(PROMPTS_FILE)
}

/// `Backend::prepare` for the Python backends: writes (or reuses) the dummy checkpoint and writes
/// the prompts.
pub fn prepare(case: &Case, ctx: &RunContext) -> Result<()> {
    match &case.weights {
        Weights::Dummy => {
            let cfg = bench_core::model::lookup(&case.model)
                .with_context(|| format!("no dummy weights for unknown model `{}`", case.model))?;
            checkpoint_writer::ensure_dummy_checkpoint(&ctx.cache_dir, &cfg, DEFAULT_SEED)
                .context("preparing the shared dummy checkpoint")?;
        }
        Weights::Checkpoint(p) => check_checkpoint(p)?,
    }
    std::fs::create_dir_all(&ctx.work_dir)
        .with_context(|| format!("creating work dir {}", ctx.work_dir.display()))?;
    let path = prompts_file(ctx);
    let json = serde_json::to_vec(&bench_core::prompts::prompt_tokens(case))?;
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn check_checkpoint(dir: &Path) -> Result<()> {
    if !dir.join("config.json").is_file() {
        bail!(
            "checkpoint {} has no config.json: give a HuggingFace model directory (config.json + *.safetensors)",
            dir.display()
        );
    }
    Ok(())
}
