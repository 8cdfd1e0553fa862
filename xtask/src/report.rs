//! `cargo xtask report`: finds the results and hands them to bench-report.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    cargo xtask report smoke\n  \
    cargo xtask report results/hf_ds --compare results-old/hf_ds")]
pub struct Args {
    /// Suite name (results in <results-root>/<name>), suite file path, or a results directory
    /// holding results.jsonl. The report files are written into that results directory.
    pub target: String,
    /// Another suite name or results directory: adds a speedup table (this / other total
    /// throughput), matched by case id.
    #[arg(long, value_name = "OTHER")]
    pub compare: Option<String>,
    /// Where suite names are looked up [default: results/ in the repository].
    #[arg(long, value_name = "DIR")]
    pub results_root: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let root = args
        .results_root
        .clone()
        .unwrap_or_else(crate::default_results_dir);
    let (dir, name) = bench_report::results_dir(&root, &args.target)?;
    let other = match &args.compare {
        Some(o) => {
            let (odir, oname) = bench_report::results_dir(&root, o)?;
            // The same suite from two runs: name them by directory instead.
            let oname = if oname == name {
                odir.display().to_string()
            } else {
                oname
            };
            Some((oname, odir))
        }
        None => None,
    };
    let written = bench_report::write_report(
        &dir,
        &name,
        other.as_ref().map(|(n, d)| (n.as_str(), d.as_path())),
    )?;
    for f in written {
        println!("{}", f.display());
    }
    Ok(())
}
