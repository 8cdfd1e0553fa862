//! `cargo xtask check-kernels`: compiles every `kernels/*.cu` with NVRTC for sm_80 and sm_90 and
//! fails on any error or warning, printing NVRTC's log and each kernel's registers and spills.
//!
//! It uses the machine's own libnvrtc when asked (`--system`), otherwise a CUDA 13 NVRTC and
//! headers unpacked from the PyPI wheels `nvidia-cuda-nvrtc` and `nvidia-cuda-runtime` into
//! `~/.cache/flexbench/nvrtc` on first use (pip, no CUDA install needed), reused afterwards.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use backend_native::device::cuda::{kernels, nvrtc};
use xshell::{cmd, Shell};

const ARCHS: &[&str] = &["sm_80", "sm_90"];
const WHEELS: &[&str] = &["nvidia-cuda-nvrtc>=13,<14", "nvidia-cuda-runtime>=13,<14"];

#[derive(clap::Args)]
pub struct Args {
    /// Use the libnvrtc.so.13 on the library search path and NVRTC's bundled headers instead of
    /// the wheel cache.
    #[arg(long)]
    system: bool,
    /// Directory for the NVRTC wheels (default: $FLEXBENCH_CACHE or ~/.cache/flexbench, + /nvrtc).
    #[arg(long)]
    nvrtc_dir: Option<PathBuf>,
    /// Also run every kernel on the CPU under kernels/emu (one OS thread per CUDA thread) against
    /// double-precision references, and the 4-bit kernels against the CPU device's own outputs:
    /// catches indexing, synchronisation and masking bugs without a GPU. Needs a C++20 compiler
    /// ($CXX, default c++).
    #[arg(long)]
    emulate: bool,
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let root = crate::project_root();
    let (nv, include) = if args.system {
        (nvrtc::Nvrtc::load(None)?, None)
    } else {
        let dir = args
            .nvrtc_dir
            .unwrap_or_else(|| bench_core::dirs::cache_dir().join("nvrtc"));
        let tk = ensure_wheels(&dir)?;
        (nvrtc::Nvrtc::load(Some(&tk.lib))?, Some(tk.include))
    };
    let (maj, min) = nv.version()?;
    println!("NVRTC {maj}.{min} from {}", nv.origin);

    let files = kernel_files(&root.join("kernels"))?;
    let header_path = root.join("kernels").join(kernels::COMMON_HEADER.0);
    let header = std::fs::read_to_string(&header_path)
        .with_context(|| format!("reading {}", header_path.display()))?;

    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let src =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for arch in ARCHS {
            let mut opts = kernels::compile_options(arch, include.as_deref());
            // Ask ptxas for its per-kernel resource report; it lands in the program log.
            opts.push("--ptxas-options=-v".into());
            // Every diagnostic NVRTC knows of, so that "no warning" means something.
            opts.push("--Wreorder".into());
            match nv.compile(&name, &src, &[(kernels::COMMON_HEADER.0, &header)], &opts) {
                Err(e) => failures.push(format!("kernels/{name} [{arch}]: {e:#}")),
                Ok(out) => {
                    let (warnings, usage) = split_log(&out.log);
                    if !warnings.is_empty() {
                        failures.push(format!(
                            "kernels/{name} [{arch}]: warnings:\n{}",
                            warnings.join("\n")
                        ));
                    }
                    for u in usage {
                        println!("  kernels/{name} [{arch}] {u}");
                    }
                }
            }
        }
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("{f}");
        }
        bail!("{} kernel compilation(s) failed or warned", failures.len());
    }
    println!(
        "ok: {} kernel files x {} architectures compiled with no warning in {:.1}s",
        files.len(),
        ARCHS.len(),
        started.elapsed().as_secs_f64()
    );
    if args.emulate {
        emulate(&root)?;
    }
    Ok(())
}

/// Builds kernels/emu/check.cpp (which includes every kernel source) for the host and runs it.
fn emulate(root: &Path) -> Result<()> {
    let started = Instant::now();
    let emu = root.join("kernels").join("emu");
    let exe = root.join("target").join("kernels-emu-check");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let sh = Shell::new()?;
    let check = emu.join("check.cpp");
    cmd!(
        sh,
        "{cxx} -std=c++20 -O2 -pthread -fno-strict-aliasing -Wall -Wno-unknown-pragmas -I {emu} -o {exe} {check}"
    )
    .run()
    .with_context(|| format!("compiling kernels/emu/check.cpp with {cxx} (set CXX to a C++20 compiler)"))?;
    // the 4-bit kernels are compared with the CPU device's own answers
    let reference = root.join("target").join("kernels-emu-reference.bin");
    let seed = std::env::var("FLEXBENCH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("CPU reference for the 4-bit kernels, seed {seed} (FLEXBENCH_TEST_SEED replays it)");
    crate::emu_reference::write(&reference, seed)?;
    cmd!(sh, "{exe} {reference}")
        .run()
        .context("the emulated kernel check failed; its output above names the kernel")?;
    println!(
        "ok: emulated kernel check in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `kernels/*.cu`, sorted; every one must also be embedded in the runtime (`SOURCES`), or the
/// engine would silently lack it.
fn kernel_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        if !kernels::SOURCES.iter().any(|(n, _)| *n == name) {
            bail!(
                "{} is not listed in crates/backend-native/src/device/cuda/kernels.rs SOURCES: add it there so the engine embeds it",
                f.display()
            );
        }
    }
    if files.is_empty() {
        bail!("no .cu files in {}", dir.display());
    }
    Ok(files)
}

/// Splits NVRTC's log into warning lines and one resource line per kernel (registers, spills,
/// shared memory), from ptxas's `-v` report.
fn split_log(log: &str) -> (Vec<String>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut usage: Vec<String> = Vec::new();
    let mut current_fn = String::new();
    let mut frame = String::new();
    for line in log.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let info = line
            .trim_start_matches("ptxas")
            .trim_start_matches([' ', '.', 'i', 'n', 'f', 'o', ':'])
            .trim();
        if line.to_ascii_lowercase().contains("warning") {
            warnings.push(line.to_string());
        } else if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current_fn = rest.split('\'').next().unwrap_or("").to_string();
        } else if line.contains("bytes stack frame") {
            frame = info.to_string();
        } else if info.starts_with("Used ") {
            usage.push(format!("{current_fn}: {info}; {frame}"));
            frame.clear();
        }
    }
    (warnings, usage)
}

/// The wheel toolkit in `dir`, installing it with pip first if it is not there yet. Installs into
/// a sibling temporary directory and renames it, so an interrupted install is never mistaken for a
/// complete one.
fn ensure_wheels(dir: &Path) -> Result<nvrtc::WheelToolkit> {
    if let Some(tk) = nvrtc::wheel_toolkit(dir) {
        return Ok(tk);
    }
    let parent = dir.parent().context("the NVRTC directory has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".nvrtc-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    println!(
        "installing CUDA 13 NVRTC and headers from PyPI into {} (first use only)",
        dir.display()
    );
    let sh = Shell::new()?;
    let wheels = WHEELS;
    let installed = cmd!(
        sh,
        "{python} -m pip install --quiet --no-deps --only-binary=:all: --target {tmp} {wheels...}"
    )
    .run();
    if let Err(e) = installed {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| {
            format!("pip install {WHEELS:?} failed; check network access to PyPI (PYTHON names the Python with pip)")
        });
    }
    if nvrtc::wheel_toolkit(&tmp).is_none() {
        bail!(
            "the wheels installed into {} lack nvidia/cu13/lib/libnvrtc.so.13 or nvidia/cu13/include/cuda_fp16.h: their layout changed",
            tmp.display()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))?;
    nvrtc::wheel_toolkit(dir).context("NVRTC wheel layout missing after install")
}

#[cfg(test)]
mod tests {
    use super::split_log;

    #[test]
    fn split_log_separates_warnings_from_resource_usage() {
        let log = "kernels/x.cu(3): warning #177-D: variable \"y\" was declared but never referenced\n\
                   ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'layernorm_f16' for 'sm_90'\n\
                   ptxas info    : Function properties for layernorm_f16\n\
                   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 18 registers, used 0 barriers, 128 bytes smem\n";
        let (w, u) = split_log(log);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("never referenced"));
        assert_eq!(
            u,
            vec![
                "layernorm_f16: Used 18 registers, used 0 barriers, 128 bytes smem; \
                  0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
                    .to_string()
            ]
        );
    }
}
