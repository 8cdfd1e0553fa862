//! flexbench's command line: `cargo xtask <command>`. A thin dispatcher; each command lives in its
//! own module and the real work in the crates.

mod agreement;
mod backends;
mod bench;
mod gpu_check;
mod kernels;
mod list;
mod plot;
mod python_env;
mod report;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "flexbench: benchmark LLM inference with offloading"
)]
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

fn main() {
    // Printing into a closed pipe (`cargo xtask bench x --dry-run | head`) should end the
    // program quietly, as for any Unix tool, not panic.
    // SAFETY: restoring the default disposition of a signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let result = match Cli::parse().cmd {
        Cmd::Bench(a) => bench::run(a),
        Cmd::Report(a) => report::run(a),
        Cmd::List(a) => list::run(a),
        Cmd::PythonEnv(a) => python_env::run(a),
        Cmd::CheckKernels(a) => kernels::run(a),
        Cmd::GpuCheck(a) => gpu_check::run(a),
    };
    if let Err(e) = result {
        // The message and its context chain; a backtrace would bury the fix.
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

/// The repository root (xtask's manifest is one level below it).
pub fn project_root() -> PathBuf {
    let dir = std::env::var("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.parent()
        .expect("xtask lives in the repo root")
        .to_path_buf()
}

/// Where suite files live.
pub fn suites_dir() -> PathBuf {
    project_root().join("suites")
}

/// The default results root.
pub fn default_results_dir() -> PathBuf {
    project_root().join("results")
}

/// Cache shared by runs (dummy checkpoints, compiled kernels): `$FLEXBENCH_CACHE`, else
/// `~/.cache/flexbench`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLEXBENCH_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("flexbench")
}

/// Where the workspace's release binaries (the runners) are.
pub fn release_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
        .join("release")
}
