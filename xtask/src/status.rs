//! `cargo xtask status <suite>`: every case of a suite with its state in the results directory
//! (pending or running as a Slurm task, or its latest outcome), merging the records of finished
//! Slurm tasks into results.jsonl on the way when no bench holds the directory.

use std::path::PathBuf;

use anyhow::Result;
use bench_core::run;
use bench_core::{suite, Frameworks, Suite};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    cargo xtask status hf_ds\n  \
    cargo xtask status smoke --out /shared/results")]
pub struct Args {
    /// Suite name (a file in suites/) or path to a .ron suite file.
    pub suite: String,
    /// Results root the suite was run into [default: results/ in the repository].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let backends = crate::backends::registry();
    let path = suite::resolve(&crate::suites_dir(), &args.suite)?;
    let suite = Suite::load(&path, &Frameworks::of(&backends))?;
    let cases = suite.expand();
    let out = args.out.unwrap_or_else(crate::default_results_dir);
    let dir = run::suite_dir(&out, &suite.name)?;
    let (statuses, settled) = run::status::status(&dir, &cases)?;
    run::status::print(&cases, &statuses, &settled);
    Ok(())
}
