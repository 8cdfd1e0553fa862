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
    /// `auto` is planned by the release runner (`flexbench-native plan --case`): the search is
    /// fast there, and a profile it calibrates measures the engine that will run the case. It
    /// uses this machine's profile (calibrating it once), or the one `FLEXBENCH_MACHINE` names.
    fn resolve(&self, case: &Case, ctx: &RunContext) -> Result<Case, String> {
        if !case.unresolved() {
            return Ok(case.clone());
        }
        let bin = ctx.bin_dir.join(RUNNER_BIN);
        if !bin.is_file() {
            return Err(format!(
                "planning `auto` needs {}: run `cargo build --release -p backend-native`",
                bin.display()
            ));
        }
        let file = ctx.case_file.with_extension("unresolved.json");
        let write = || -> std::io::Result<()> {
            if let Some(d) = file.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(&file, serde_json::to_vec_pretty(case)?)
        };
        write().map_err(|e| format!("writing {}: {e}", file.display()))?;
        let offload = ctx
            .work_dir
            .ancestors()
            .find(|a| a.is_dir())
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf();
        let out = Command::new(&bin)
            .arg("plan")
            .arg("--case")
            .arg(&file)
            .arg("--offload-dir")
            .arg(&offload)
            .arg("--json")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("running {} plan: {e}", bin.display()))?;
        let _ = std::fs::remove_file(&file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let msg = stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.trim_start_matches("flexbench-native: error: "))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(format!("planning auto: {msg}"));
        }
        // the calibration notice, when there was one
        eprint!("{stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("the planner printed no plan ({e})"))?;
        serde_json::from_value(v["case"].clone())
            .map_err(|e| format!("the planner's case does not parse: {e}"))
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
