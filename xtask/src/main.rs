//! flexbench's command line: `cargo xtask <command>`. A thin dispatcher; each command lives in its
//! own module and the real work in the crates.

mod bench;
mod gpu_check;
mod kernels;
mod list;
mod python_env;
mod report;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "flexbench: benchmark LLM inference with offloading")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a suite: every case in its own process, results appended to <out>/<suite>/results.jsonl.
    Bench(bench::Args),
    /// Make report.md, report.csv and SVG plots from a suite's results.
    Report(report::Args),
    /// List suites and backends, and whether each backend is available here.
    List(list::Args),
    /// Create (or check) the Python virtual environment the hf and deepspeed backends use.
    PythonEnv(python_env::Args),
    /// Compile every CUDA kernel with NVRTC for sm_80 and sm_90; fail on any error or warning.
    CheckKernels(kernels::Args),
    /// On a GPU machine: test every kernel and the golden checkpoints on CUDA, run a short benchmark.
    GpuCheck(gpu_check::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Bench(a) => bench::run(a),
        Cmd::Report(a) => report::run(a),
        Cmd::List(a) => list::run(a),
        Cmd::PythonEnv(a) => python_env::run(a),
        Cmd::CheckKernels(a) => kernels::run(a),
        Cmd::GpuCheck(a) => gpu_check::run(a),
    }
}

/// The repository root (xtask's manifest is one level below it).
pub fn project_root() -> PathBuf {
    let dir = std::env::var("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.parent().expect("xtask lives in the repo root").to_path_buf()
}
