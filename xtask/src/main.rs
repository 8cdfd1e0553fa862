//! flexbench's command line: `cargo xtask <command>`. A thin dispatcher; each command lives in its
//! own module of the xtask library and the real work in the crates.

use clap::{Parser, Subcommand};
use xtask::{bench, gpu_check, kernels, list, python_env, report, slurm_task, status};

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
    /// Where each case of a suite stands: pending or running on Slurm, or its latest outcome.
    Status(status::Args),
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
    /// Runs one array task of a Slurm submission (what `bench --executor slurm` submits).
    #[command(hide = true, name = "slurm-task")]
    SlurmTask(slurm_task::Args),
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
        Cmd::Status(a) => status::run(a),
        Cmd::SlurmTask(a) => slurm_task::run(a),
    };
    if let Err(e) = result {
        // The message and its context chain; a backtrace would bury the fix.
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
