//! Runs one case through the hf or deepspeed backend, the way the orchestrator would, and prints
//! the runner's result line: an ad-hoc check without `cargo xtask bench`.
//!
//! `cargo run --release -p backend-deepspeed --example run_case -- CASE.json [WORK_DIR]`
//! (the dummy checkpoint cache is `$FLEXBENCH_CACHE`, else ~/.cache/flexbench).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use backend_deepspeed::DeepSpeedBackend;
use backend_hf::{child, HfBackend};
use bench_core::{Backend, RunContext};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let case_path = PathBuf::from(
        args.next()
            .context("usage: run_case CASE.json [WORK_DIR]")?,
    );
    let case = bench_core::protocol::read_case(&case_path)?;
    case.validate()
        .map_err(anyhow::Error::msg)
        .context("invalid case")?;
    let work = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("flexbench-run-case"));
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cache = std::env::var_os("FLEXBENCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or(home.join(".cache/flexbench"));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()?;
    let ctx = RunContext {
        project_root: root.clone(),
        case_file: work.join("case.json"),
        work_dir: work.clone(),
        cache_dir: cache,
        bin_dir: root.join("target/release"),
        python: std::env::var_os("FLEXBENCH_PYTHON").map(PathBuf::from),
    };
    let backend: &dyn Backend = match case.framework.as_str() {
        "hf" => &HfBackend,
        "deepspeed" => &DeepSpeedBackend,
        other => bail!("run_case runs hf and deepspeed cases, not {other}"),
    };
    backend
        .probe(&ctx)
        .map_err(anyhow::Error::msg)
        .context("backend unavailable")?;
    backend
        .check_case(&case, &ctx)
        .map_err(anyhow::Error::msg)
        .context("case unavailable")?;
    let _ = std::fs::remove_dir_all(&work);
    let timeout = Duration::from_secs(case.timeout_s.unwrap_or(1800));
    let out = child::run_case(backend, &case, &ctx, timeout)?;
    eprintln!("--- stderr tail ---");
    for line in out
        .stderr
        .lines()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        eprintln!("{line}");
    }
    println!("exit: {:?}, wall {:.1} s", out.status, out.wall_s);
    let result = bench_core::protocol::find_result(&out.stdout)?.context("no result line")?;
    let steps: Vec<String> = result
        .step_times_s
        .iter()
        .map(|r| {
            format!(
                "{:?}",
                r.iter()
                    .map(|t| (t * 1e4).round() / 10.0)
                    .collect::<Vec<_>>()
            )
        })
        .collect();
    println!("step times (ms) per repetition:\n  {}", steps.join("\n  "));
    let saved = work.join("result.json");
    std::fs::write(&saved, serde_json::to_vec(&result)?)
        .with_context(|| format!("writing {}", saved.display()))?;
    println!("full result (with tokens) in {}", saved.display());
    let mut r = result.clone();
    r.tokens = None;
    r.step_times_s = vec![];
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
