//! The `Backend` trait: how the orchestrator starts a framework's runner for one case.

use std::path::PathBuf;
use std::process::Command;

use crate::case::Case;

/// Everything a backend may need to build the command for a case.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// The repository root.
    pub project_root: PathBuf,
    /// The JSON file holding the case (also passed to the child through `protocol::CASE_ENV`).
    pub case_file: PathBuf,
    /// Scratch directory for this case (offload files, framework temp files); removed afterwards.
    pub work_dir: PathBuf,
    /// Cache shared by runs (dummy checkpoints written once, compiled kernels).
    pub cache_dir: PathBuf,
    /// Where the workspace's release binaries are (`target/release`).
    pub bin_dir: PathBuf,
    /// The Python interpreter for process-wrapper frameworks (`--python`), if the user gave one.
    pub python: Option<PathBuf>,
}

/// A framework wrapper. Adding a framework = one crate implementing this + one line in xtask.
pub trait Backend {
    /// Short name, e.g. `native`.
    fn name(&self) -> &'static str;
    /// The `framework` values of cases this backend runs.
    fn frameworks(&self) -> &'static [&'static str];
    /// Whether the backend can run anything on this machine; `Err` says why not and what to do.
    fn probe(&self, ctx: &RunContext) -> Result<(), String>;
    /// Whether this particular case can run here (e.g. a cuda case without a GPU); `Err` says why.
    fn check_case(&self, _case: &Case, _ctx: &RunContext) -> Result<(), String> {
        Ok(())
    }
    /// Work done once before a case's process starts, in the orchestrator (e.g. writing the shared
    /// dummy checkpoint into `ctx.cache_dir`). Its error becomes the case's `error` outcome.
    fn prepare(&self, _case: &Case, _ctx: &RunContext) -> anyhow::Result<()> {
        Ok(())
    }
    /// Versions of the framework and its libraries as installed here (e.g. `torch`), for the
    /// run's environment file. Runners also report the versions they used in each result.
    fn versions(&self, _ctx: &RunContext) -> std::collections::BTreeMap<String, String> {
        Default::default()
    }
    /// The child process for one case. The orchestrator adds the case file to its environment,
    /// its own process group, pipes and the timeout.
    fn command(&self, case: &Case, ctx: &RunContext) -> anyhow::Result<Command>;
}
