//! `cargo xtask python-env`: the Python virtual environment the hf and deepspeed backends run in,
//! with pinned torch / transformers / accelerate / deepspeed (`backend_hf::pyenv::PINNED`).
//!
//! Idempotent: a complete environment (every module imports at its pinned version) is reused as
//! is; an incomplete one gets only what it lacks (pip leaves satisfied requirements alone, so an
//! installed torch is never downloaded again).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use backend_hf::pyenv;

#[derive(clap::Args)]
pub struct Args {
    /// Base interpreter the environment is created with (default: python3). With --check: the
    /// interpreter to check instead of the environment's.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Only check the environment (imports and pinned versions); install nothing. Fails when
    /// something is missing.
    #[arg(long)]
    check: bool,
}

/// What DeepSpeed needs to build from its sdist without build isolation (it imports torch at
/// build time), and what its ops need at run time.
const DEEPSPEED_BUILD_DEPS: &[&str] = &[
    "ninja",
    "py-cpuinfo",
    "hjson",
    "msgpack",
    "einops",
    "packaging",
    "psutil",
    "pydantic",
    "tqdm",
];

pub fn run(args: Args) -> Result<()> {
    let venv = pyenv::venv_dir();
    if args.check {
        let python = args
            .python
            .clone()
            .unwrap_or_else(|| pyenv::venv_python(&venv));
        let ok = report(&python, args.python.is_none());
        system_packages();
        if !ok {
            bail!("the Python environment is incomplete: run `cargo xtask python-env`");
        }
        return Ok(());
    }

    let python = pyenv::venv_python(&venv);
    if pyenv::probe_uncached(&python, pyenv::DS_MODULES, true).is_ok() {
        println!("{} is complete; reusing it", venv.display());
    } else {
        if !python.exists() {
            let base = args
                .python
                .clone()
                .unwrap_or_else(|| PathBuf::from("python3"));
            println!("creating {} with {}", venv.display(), base.display());
            std::fs::create_dir_all(venv.parent().unwrap_or(Path::new(".")))?;
            run_step(
                Command::new(&base).arg("-m").arg("venv").arg(&venv),
                "creating the virtual environment",
            )
            .with_context(|| format!("is {} a Python 3 with the venv module?", base.display()))?;
        } else {
            println!("completing {}", venv.display());
        }
        let pin = |m: &str| format!("{m}=={}", pyenv::pinned(m).expect("pinned"));
        let mut core: Vec<String> = ["torch", "transformers", "accelerate"]
            .iter()
            .map(|m| pin(m))
            .collect();
        core.extend(pyenv::UNPINNED.iter().map(|m| m.to_string()));
        pip(&python, &core, false)?;
        pip(
            &python,
            &DEEPSPEED_BUILD_DEPS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
            false,
        )?;
        pip(&python, &[pin("deepspeed")], true)?;
    }
    let ok = report(&python, true);
    system_packages();
    if !ok {
        bail!(
            "{} is still incomplete after installing; see the messages above",
            venv.display()
        );
    }
    Ok(())
}

fn pip(python: &Path, packages: &[String], no_build_isolation: bool) -> Result<()> {
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "install", "--disable-pip-version-check"]);
    if no_build_isolation {
        // DeepSpeed's setup.py imports torch: it must see the environment's torch.
        cmd.arg("--no-build-isolation");
    }
    cmd.args(packages);
    run_step(&mut cmd, &format!("pip install {}", packages.join(" ")))
}

fn run_step(cmd: &mut Command, what: &str) -> Result<()> {
    println!("$ {what}");
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Prints what the interpreter imports; true when everything is there (at the pins when strict).
fn report(python: &Path, strict: bool) -> bool {
    match pyenv::probe_uncached(python, pyenv::DS_MODULES, strict) {
        Ok(versions) => {
            println!("{}: ok", python.display());
            for (m, v) in &versions {
                let pin = pyenv::pinned(m)
                    .map(|p| format!(" (pinned {p})"))
                    .unwrap_or_default();
                println!("  {m:<13} {v}{pin}");
            }
            true
        }
        Err(e) => {
            println!("{}: NOT ready: {e}", python.display());
            false
        }
    }
}

/// System packages the Python backends need beyond pip's reach.
fn system_packages() {
    let libaio = backend_deepspeed::libaio_installed();
    println!(
        "system package libaio-dev (DeepSpeed NVMe offload, deepspeed cases with placement disk): {}",
        if libaio { "installed" } else { "NOT installed: apt-get install libaio-dev" }
    );
    let gxx = Command::new("g++")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    println!(
        "g++ (DeepSpeed compiles its ops at first use): {}",
        if gxx {
            "installed"
        } else {
            "NOT installed: apt-get install g++"
        }
    );
}
