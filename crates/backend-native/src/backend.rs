//! The `Backend` impl that lets the orchestrator run native cases through `flexbench-native run-case`.

use std::process::Command;

use bench_core::{Backend, BuildStep, Case, RunContext};

/// Name of the runner binary (built by `cargo build --release -p backend-native`).
pub const RUNNER_BIN: &str = "flexbench-native";

pub struct NativeBackend;

impl Backend for NativeBackend {
    fn name(&self) -> &'static str {
        "native"
    }
    fn frameworks(&self) -> &'static [&'static str] {
        &["native"]
    }
    /// The engine runs FlexLLMGen's full policies: six percents, cpu attention, compression.
    fn takes_policy(&self) -> bool {
        true
    }
    fn build_step(&self) -> Option<BuildStep> {
        Some(BuildStep {
            what: "the native runner",
            cargo_args: &["build", "--release", "-p", "backend-native"],
        })
    }
    fn probe(&self, ctx: &RunContext) -> Result<(), String> {
        let bin = ctx.bin_dir.join(RUNNER_BIN);
        if bin.is_file() {
            Ok(())
        } else {
            Err(format!(
                "{} not found: run `cargo build --release -p backend-native`",
                bin.display()
            ))
        }
    }
    /// A cuda case is answered by the CUDA probe (driver, then cuBLAS; dlopen checks, cached per
    /// process), so on a machine without a usable GPU it is `unavailable` with the probe's reason
    /// before any child starts.
    fn check_case(&self, case: &Case, _ctx: &RunContext) -> Result<(), String> {
        crate::runner::check_runnable(case).map_err(|u| u.0)
    }
    /// The offload files: weights placed on disk and the disk share of the KV cache.
    fn disk_needs(&self, case: &Case, ctx: &RunContext) -> Vec<bench_core::DiskNeed> {
        crate::runner::offload_disk_bytes(case)
            .map(|bytes| bench_core::DiskNeed {
                dir: ctx.work_dir.clone(),
                bytes,
                what: "the native engine's offload files".into(),
            })
            .into_iter()
            .collect()
    }
    /// A checkpoint named as a registry model must be that model, or its record would carry
    /// the registry's sizes: refused here, before the runner starts (the runner checks too).
    fn prepare(&self, case: &Case, _ctx: &RunContext) -> anyhow::Result<()> {
        bench_core::inputs::check_checkpoint_matches(case)
    }
    fn command(&self, _case: &Case, ctx: &RunContext) -> anyhow::Result<Command> {
        let mut cmd = Command::new(ctx.bin_dir.join(RUNNER_BIN));
        cmd.arg("run-case")
            .arg("--case")
            .arg(&ctx.case_file)
            .arg("--offload-dir")
            .arg(&ctx.work_dir);
        Ok(cmd)
    }
}
