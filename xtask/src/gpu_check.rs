//! `cargo xtask gpu-check`: one prepared check of the CUDA device on a GPU machine.
//!
//! The GPU machine has CUDA 13, PyTorch and transformers but no Rust and no network, so the
//! check is split in two:
//!
//! 1. Here, on the development machine: `cargo xtask gpu-check --prepare` builds the release
//!    binaries (every backend-native test executable, `flexbench-native` (the runner, with the
//!    CUDA device), the `gpu_speed` and `cuda_generate` examples), strips them into `target/gpu-check/bin/` (git-ignored, under 64 MiB in all), writes
//!    the benchmark cases to `target/gpu-check/cases/`, and prints the device-tool call:
//!
//!    ```text
//!    run(command="bash scripts/gpu-check.sh", carry=["target/gpu-check"], timeout_s=540)
//!    ```
//!
//! 2. There: `scripts/gpu-check.sh` (committed; it travels with the working tree) runs
//!    nvidia-smi, every CUDA kernel against the CPU device, the other CUDA tests, the golden
//!    checkpoints on CUDA (resident and offloaded), the speed goals (`gpu_speed`), a short
//!    benchmark (`flexbench-native run-case`) and compute-sanitizer on the kernel tests, and writes
//!    `report.md` and logs under `$OUT`, within 8 minutes.
//!
//! Without `--prepare` it prepares and then runs the script here (for a developer machine that
//! has both Rust and a GPU).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bench_core::case::{Case, Placement, Policy};
use xshell::{cmd, Shell};

/// The device machine's limit for everything that travels (working tree + carried paths).
const CARRY_LIMIT: u64 = 64 << 20;
/// What the prepared folder may take of it, leaving room for the working tree itself.
const PREPARED_LIMIT: u64 = 48 << 20;

#[derive(clap::Args)]
#[command(after_help = "\
Steps (see scripts/gpu-check.sh):
  here:            cargo xtask gpu-check --prepare
  GPU machine:     run(command=\"bash scripts/gpu-check.sh\", carry=[\"target/gpu-check\"], timeout_s=540)
  results:         $OUT/report.md (tables), $OUT/gpu-check.log (everything), one log per step")]
pub struct Args {
    /// Only build and stage the binaries (for a GPU machine without Rust); do not run anything.
    #[arg(long)]
    prepare: bool,
    /// Where to stage the binaries and cases (default: target/gpu-check).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let root = crate::project_root();
    let dir = args
        .dir
        .unwrap_or_else(|| root.join("target").join("gpu-check"));
    prepare(&root, &dir)?;
    let rel = dir
        .strip_prefix(&root)
        .unwrap_or(&dir)
        .display()
        .to_string();
    if args.prepare {
        println!(
            "\nprepared {}. On the GPU machine run (device tool):",
            dir.display()
        );
        println!("  run(command=\"bash scripts/gpu-check.sh\", carry=[\"{rel}\"], timeout_s=540)");
        println!("results come back under $OUT: report.md, gpu-check.log and one log per step");
        return Ok(());
    }
    let sh = Shell::new()?;
    sh.change_dir(&root);
    cmd!(sh, "bash scripts/gpu-check.sh")
        .env("GPU_CHECK_DIR", &dir)
        .run()
        .context("scripts/gpu-check.sh failed; see its report above")
}

/// Builds and stages everything the script needs.
fn prepare(root: &Path, dir: &Path) -> Result<()> {
    let bin_dir = dir.join("bin");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;

    let mut staged: BTreeMap<String, PathBuf> = BTreeMap::new();
    // Test executables: every test target of backend-native, lib unit tests included.
    for (name, exe) in cargo_executables(
        root,
        &["test", "--release", "-p", "backend-native", "--no-run"],
        true,
    )? {
        staged.insert(format!("test-{name}"), exe);
    }
    // The runner binary and the speed example.
    for (name, exe) in cargo_executables(
        root,
        &[
            "build",
            "--release",
            "-p",
            "backend-native",
            "--bins",
            "--examples",
        ],
        false,
    )? {
        staged.insert(name, exe);
    }
    for required in [
        "test-cuda_kernels",
        "test-cuda_golden",
        "test-cuda_offload",
        "flexbench-native",
        "gpu_speed",
    ] {
        if !staged.contains_key(required) {
            bail!("cargo did not produce {required}; is crates/backend-native intact?");
        }
    }

    let mut total = 0u64;
    let mut manifest = String::new();
    for (name, src) in &staged {
        let dst = bin_dir.join(name);
        std::fs::copy(src, &dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        // Symbols are most of a release test binary; the script needs none of them.
        let sh = Shell::new()?;
        let stripped = cmd!(sh, "strip --strip-unneeded {dst}")
            .quiet()
            .ignore_stderr()
            .run();
        if stripped.is_err() {
            eprintln!(
                "note: could not strip {} (is binutils installed?); staging it as is",
                dst.display()
            );
        }
        let size = std::fs::metadata(&dst)?.len();
        total += size;
        manifest.push_str(&format!("{name}\t{size}\n"));
        println!(
            "staged {name:<28} {:>6.1} MiB",
            size as f64 / (1 << 20) as f64
        );
    }
    std::fs::write(dir.join("manifest.tsv"), &manifest)?;

    let cases_dir = dir.join("cases");
    std::fs::create_dir_all(&cases_dir)?;
    for (file, case) in bench_cases() {
        case.validate()
            .map_err(|e| anyhow::anyhow!("benchmark case {file}: {e}"))?;
        std::fs::write(cases_dir.join(&file), serde_json::to_string_pretty(&case)?)?;
    }
    println!(
        "staged {} benchmark cases; {:.1} MiB in all",
        bench_cases().len(),
        total as f64 / (1 << 20) as f64
    );
    if total > PREPARED_LIMIT {
        bail!(
            "the staged binaries take {:.1} MiB, over the {} MiB this check may use of the device machine's {} MiB carry limit; \
             build fewer test targets or shrink them",
            total as f64 / (1 << 20) as f64,
            PREPARED_LIMIT >> 20,
            CARRY_LIMIT >> 20
        );
    }
    Ok(())
}

/// The short benchmark: opt-1.3b and opt-6.7b with dummy weights, all on the GPU; weights in host
/// memory; KV cache in host memory with attention on the CPU; and for opt-1.3b the same with
/// 4-bit compression. Prompt 512, 8 measured of 32
/// generated tokens, batch 4 — enough for stable per-step times in well under a minute each.
fn bench_cases() -> Vec<(String, Case)> {
    let placements: [(&str, Placement); 3] = [
        ("all-gpu", Placement::Gpu),
        (
            "weights-cpu",
            Placement::Policy(Policy::new([0, 100, 100, 0, 100, 0])),
        ),
        (
            "cache-cpu-cpu-attn",
            Placement::Policy(Policy {
                cpu_attention: true,
                ..Policy::new([100, 0, 0, 100, 100, 0])
            }),
        ),
    ];
    let mut out = Vec::new();
    // 4-bit compression (issue 11): opt-1.3b with compressed weights and cache on the GPU (as
    // 6b7_1x1_comp), and compressed weights in host memory, where they move 0.28 of the bytes
    let compressed = |p: [u8; 6], cache: bool| {
        Placement::Policy(Policy {
            compress_weight: true,
            compress_cache: cache,
            ..Policy::new(p)
        })
    };
    let extra = [
        ("all-gpu-cw-cc", compressed([100, 0, 100, 0, 100, 0], true)),
        (
            "weights-cpu-cw",
            compressed([0, 100, 100, 0, 100, 0], false),
        ),
    ];
    for model in ["opt-1.3b", "opt-6.7b"] {
        let more = if model == "opt-1.3b" { &extra[..] } else { &[] };
        for (label, placement) in placements.iter().chain(more) {
            let case = Case {
                model: model.into(),
                prompt_len: 512,
                cut_gen_len: Some(8),
                placement: placement.clone(),
                device: bench_core::Device::Cuda,
                timeout_s: Some(90),
                ..Case::example("native")
            };
            out.push((format!("{model}_{label}.json"), case));
        }
    }
    out
}

/// Runs cargo with `--message-format=json` and returns (target name, executable) of the
/// artifacts: test executables when `tests`, else binaries and examples.
fn cargo_executables(root: &Path, args: &[&str], tests: bool) -> Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("$ cargo {}", args.join(" "));
    let sh = Shell::new()?;
    sh.change_dir(root);
    // Diagnostics go to the terminal (stderr); stdout is cargo's JSON messages.
    let stdout = cmd!(
        sh,
        "{cargo} {args...} --message-format=json-render-diagnostics"
    )
    .quiet()
    .read()
    .with_context(|| format!("cargo {} failed", args.join(" ")))?;
    let mut exes = Vec::new();
    for line in stdout.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let is_test = msg["profile"]["test"].as_bool().unwrap_or(false);
        if is_test != tests {
            continue;
        }
        let name = msg["target"]["name"]
            .as_str()
            .unwrap_or("unnamed")
            .to_string();
        exes.push((name, PathBuf::from(exe)));
    }
    Ok(exes)
}

#[cfg(test)]
mod tests {
    use super::bench_cases;

    #[test]
    fn bench_cases_are_valid_and_cover_the_placements_for_both_models() {
        let cases = bench_cases();
        assert_eq!(cases.len(), 8);
        for (file, case) in &cases {
            case.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(file.ends_with(".json"));
        }
        let labels: Vec<String> = cases.iter().map(|(_, c)| c.placement.label()).collect();
        assert!(labels.iter().any(|l| l.contains("+cpu_attn")), "{labels:?}");
        assert!(labels.iter().any(|l| l.contains("+cw+cc")), "{labels:?}");
    }
}
