//! flexbench's commands, one module per command (`cargo xtask <command>`); `main.rs` only parses
//! the command line and dispatches. The commands are thin: the work is in the crates, and
//! subprocesses go through xshell.
//!
//! [`backends`] is the registry: the one list of framework backends this build knows.

pub mod backends;
pub mod bench;
pub mod emu_reference;
pub mod gpu_check;
pub mod kernels;
pub mod list;
pub mod python_env;
pub mod report;
pub mod slurm_task;
pub mod status;

use std::path::PathBuf;

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

/// Where the workspace's release binaries (the runners) are.
pub fn release_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
        .join("release")
}
