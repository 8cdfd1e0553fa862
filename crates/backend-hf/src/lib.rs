//! backend-hf: runs HuggingFace Accelerate (transformers + accelerate device maps) in a Python child
//! process, and holds what the Python backends share:
//!
//! - [`pyenv`]: the pinned Python environment, the interpreter to use and the cached import probe;
//! - [`inputs`]: the shared dummy checkpoint and the prompts file each runner reads;
//! - [`child`]: runs one case's process like the orchestrator (for tests and ad-hoc runs);
//! - [`gpu`]: a cheap "is there an NVIDIA GPU" check that does not import torch.
//!
//! The Python side lives in `python/`: `flexbench_runner.py` (protocol, measured generation loop,
//! memory, exit codes) is shared by `run_hf.py` here and by backend-deepspeed's `run_deepspeed.py`,
//! which finds it through `PYTHONPATH` (see [`python_dir`]).

pub mod backend;
pub mod child;
pub mod gpu;
pub mod inputs;
pub mod pyenv;

use std::path::{Path, PathBuf};

pub use backend::HfBackend;

/// The directory holding the shared Python runner module (`flexbench_runner.py`).
pub fn python_dir(project_root: &Path) -> PathBuf {
    project_root
        .join("crates")
        .join("backend-hf")
        .join("python")
}
