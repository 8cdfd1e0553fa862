//! Where flexbench keeps what outlives a run: the one resolution of the shared cache directory
//! (dummy checkpoints, compiled kernels, NVRTC wheels, the Python environment).

use std::path::PathBuf;

/// Environment variable moving the shared cache.
pub const CACHE_ENV: &str = "FLEXBENCH_CACHE";

/// `$FLEXBENCH_CACHE` when set and not empty, else `~/.cache/flexbench` (the system temp dir's
/// `flexbench-cache` for a user without a home).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache").join("flexbench"),
        None => std::env::temp_dir().join("flexbench-cache"),
    }
}
