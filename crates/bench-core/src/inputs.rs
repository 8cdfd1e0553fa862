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

/// The shared dummy checkpoint a case still needs written (none when it is complete, or for a
/// case with its own checkpoint), for `Backend::disk_needs`.
pub fn checkpoint_disk_need(case: &Case, ctx: &RunContext) -> Option<crate::backend::DiskNeed> {
    let cfg = match &case.weights {
        Weights::Dummy => model::lookup(&case.model)?,
        Weights::Checkpoint(_) => return None,
    };
    let dir = checkpoint::dummy_checkpoint_dir(&ctx.cache_dir, &cfg.name, dummy::DEFAULT_SEED);
    (!checkpoint::is_complete_checkpoint(&dir, &cfg)).then(|| crate::backend::DiskNeed {
        dir: ctx.cache_dir.clone(),
        bytes: checkpoint::checkpoint_bytes(&cfg),
        what: format!("the shared dummy checkpoint of {}", cfg.name),
    })
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
        Weights::Checkpoint(p) => {
            check_checkpoint(p)?;
            check_checkpoint_matches(case)?;
        }
    }
    std::fs::create_dir_all(&ctx.work_dir)
        .with_context(|| format!("creating work dir {}", ctx.work_dir.display()))?;
    let path = prompts_file(ctx);
    let json = serde_json::to_vec(&prompts::prompt_tokens(case))?;
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A case whose model is a registry name and whose weights are a checkpoint must load that
/// model: its metrics use the registry's sizes. Compares config.json's shape with the
/// registry's and names what differs (nothing to check for other names or dummy weights).
pub fn check_checkpoint_matches(case: &Case) -> Result<()> {
    let (Weights::Checkpoint(dir), Some(reg)) = (&case.weights, model::lookup(&case.model)) else {
        return Ok(());
    };
    let path = dir.join(checkpoint::CONFIG_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let expect = [
        ("num_hidden_layers", reg.num_hidden_layers),
        ("num_attention_heads", reg.num_attention_heads),
        ("hidden_size", reg.hidden_size),
        ("ffn_dim", reg.ffn_dim),
        ("vocab_size", reg.vocab_size),
        ("max_position_embeddings", reg.max_position_embeddings),
    ];
    let differs: Vec<String> = expect
        .iter()
        .filter_map(|(key, want)| {
            let got = config.get(key).and_then(|v| v.as_u64());
            (got != Some(*want as u64)).then(|| {
                format!(
                    "{key} {} (the model's is {want})",
                    got.map_or("missing".to_string(), |g| g.to_string())
                )
            })
        })
        .collect();
    if !differs.is_empty() {
        bail!(
            "the case names model `{}`, but the checkpoint in {} is another model: {}; \
             name the case's model after the checkpoint (e.g. its directory name), or give {}'s checkpoint",
            case.model,
            dir.display(),
            differs.join(", "),
            reg.name
        );
    }
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
