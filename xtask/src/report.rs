//! `cargo xtask report`: finds the results and hands them to bench-report.

use std::path::PathBuf;

use anyhow::{bail, Result};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    cargo xtask report smoke\n  \
    cargo xtask report results/hf_ds --compare results-old/hf_ds\n  \
    cargo xtask report smoke --compare /tmp/baseline/smoke --fail-on-regression 10")]
pub struct Args {
    /// Suite name (results in <results-root>/<name>), suite file path, or a results directory
    /// holding results.jsonl. The report files are written into that results directory.
    pub target: String,
    /// Another suite name or results directory: adds a comparison table (this / other mean
    /// total throughput with its 95% interval and a Welch t-test verdict), matched by case id,
    /// after what differs between the two runs' environments.
    #[arg(long, value_name = "OTHER")]
    pub compare: Option<String>,
    /// With --compare: exit 1 when any case is significantly slower (Welch's t-test at 5%) than
    /// in OTHER by more than PCT percent. For CI regression gates.
    #[arg(long, value_name = "PCT", requires = "compare")]
    pub fail_on_regression: Option<f64>,
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
    if let Some(pct) = args.fail_on_regression {
        if !(pct.is_finite() && pct >= 0.0) {
            bail!("--fail-on-regression {pct}: give a percentage of 0 or more");
        }
    }
    let written = bench_report::write_report(
        &dir,
        &name,
        other.as_ref().map(|(n, d)| (n.as_str(), d.as_path())),
        args.fail_on_regression,
    )?;
    for f in &written.files {
        println!("{}", f.display());
    }
    if written.step_plots > 0 {
        println!(
            "{}/ ({} per-case step plots)",
            dir.join(bench_report::STEPS_DIR).display(),
            written.step_plots
        );
    }
    if let Some(pct) = args.fail_on_regression {
        if !written.regressions.is_empty() {
            eprintln!(
                "{} case(s) significantly slower than in {} by more than {pct}%:",
                written.regressions.len(),
                other.as_ref().map_or("", |(n, _)| n.as_str())
            );
            for r in &written.regressions {
                eprintln!("  {r}");
            }
            std::process::exit(1);
        }
        eprintln!("no case significantly slower by more than {pct}%");
    }
    Ok(())
}
