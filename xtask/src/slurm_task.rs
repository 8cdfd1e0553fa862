//! `xtask slurm-task SUBMISSION ARRAY` (hidden): what each array task of a Slurm submission runs
//! on its node, from the release binary on the shared file system. Not for people: `bench
//! --executor slurm` writes the job scripts that call it.

use std::path::PathBuf;

use anyhow::Result;
use bench_core::run::slurm::task;

/// The subcommand's name, as the job scripts call it.
pub const SUBCOMMAND: &str = "slurm-task";

#[derive(clap::Args)]
pub struct Args {
    /// The submission's `submission.json`.
    pub submission: PathBuf,
    /// Which array of the submission this task belongs to.
    pub array: usize,
}

pub fn run(args: Args) -> Result<()> {
    let me = task::Identity::from_env()?;
    task::run(
        &crate::backends::registry(),
        &args.submission,
        args.array,
        &me,
    )
}
