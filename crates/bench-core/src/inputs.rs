//! What every runner reads besides the case: the model checkpoint and the prompt token ids.
//!
//! Dummy weights are written once per model into the shared cache as a HuggingFace checkpoint
//! ([`crate::checkpoint`]), so every framework runs on the very same weights. Prompts come from
//! [`crate::prompts`] and are written as JSON into the case's work directory: one generator, no
//! re-implementation in any runner's language.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::backend::RunContext;
use crate::case::{Case, Weights};
use crate::{checkpoint, dummy, model, prompts};

/// Name of the prompts file in the case's work directory.
pub const PROMPTS_FILE: &str = "prompts.json";

/// The checkpoint directory a case loads: its own, or the shared dummy checkpoint of its model.
pub fn checkpoint_dir(case: &Case, ctx: &RunContext) -> Result<PathBuf> {
    match &case.weights {
        Weights::Checkpoint(p) => Ok(p.clone()),
        Weights::Dummy => {
            let cfg = dummy_model(case)?;
            Ok(checkpoint::dummy_checkpoint_dir(
                &ctx.cache_dir,
                &cfg.name,
                dummy::DEFAULT_SEED,
            ))
        }
    }
}

/// The prompts file of a case.
pub fn prompts_file(ctx: &RunContext) -> PathBuf {
    ctx.work_dir.join(PROMPTS_FILE)
}

/// `Backend::prepare` for runners that read a checkpoint directory and a prompts file: writes (or
/// reuses) the dummy checkpoint, checks a given one, and writes the prompts.
pub fn prepare_checkpoint_and_prompts(case: &Case, ctx: &RunContext) -> Result<()> {
    match &case.weights {
        Weights::Dummy => {
            let cfg = dummy_model(case)?;
            checkpoint::ensure_dummy_checkpoint(&ctx.cache_dir, &cfg, dummy::DEFAULT_SEED)
                .context("preparing the shared dummy checkpoint")?;
        }
        Weights::Checkpoint(p) => check_checkpoint(p)?,
    }
    std::fs::create_dir_all(&ctx.work_dir)
        .with_context(|| format!("creating work dir {}", ctx.work_dir.display()))?;
    let path = prompts_file(ctx);
    let json = serde_json::to_vec(&prompts::prompt_tokens(case))?;
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn dummy_model(case: &Case) -> Result<model::ModelConfig> {
    model::lookup(&case.model)
        .with_context(|| format!("no dummy weights for unknown model `{}`", case.model))
}

fn check_checkpoint(dir: &Path) -> Result<()> {
    if !dir.join(checkpoint::CONFIG_FILE).is_file() {
        bail!(
            "checkpoint {} has no config.json: give a HuggingFace model directory (config.json + *.safetensors)",
            dir.display()
        );
    }
    Ok(())
}
