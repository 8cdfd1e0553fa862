//! `cargo xtask python-env`: the Python virtual environment the Python-runner backends share,
//! holding what every registered backend declares (`Backend::python_requirements`), at their pins.
//!
//! Idempotent: a complete environment (every module imports at its pinned version) is reused as
//! is; an incomplete one gets only what it lacks (pip leaves satisfied requirements alone, so an
//! installed torch is never downloaded again).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bench_core::pyenv::{self, Merged};
use xshell::{cmd, Shell};

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

/// What the registered backends need, merged.
pub fn requirements() -> Result<Merged> {
    let backends = crate::backends::registry();
    pyenv::merge(backends.iter().filter_map(|b| b.python_requirements())).map_err(|e| anyhow!(e))
}

pub fn run(args: Args) -> Result<()> {
    let reqs = requirements()?;
    let venv = pyenv::venv_dir();
    if args.check {
        let python = args
            .python
            .clone()
            .unwrap_or_else(|| pyenv::venv_python(&venv));
        let ok = report(&reqs, &python, args.python.is_none());
        system_packages(&reqs);
        if !ok {
            bail!("the Python environment is incomplete: run `cargo xtask python-env`");
        }
        return Ok(());
    }

    let python = pyenv::venv_python(&venv);
    if pyenv::probe_uncached(&python, &reqs.imports(), true).is_ok() {
        println!("{} is complete; reusing it", venv.display());
    } else {
        let sh = Shell::new()?;
        if !python.exists() {
            let base = args
                .python
                .clone()
                .unwrap_or_else(|| PathBuf::from("python3"));
            println!("creating {} with {}", venv.display(), base.display());
            std::fs::create_dir_all(venv.parent().unwrap_or(Path::new(".")))?;
            cmd!(sh, "{base} -m venv {venv}").run().with_context(|| {
                format!(
                    "creating the virtual environment: is {} a Python 3 with the venv module?",
                    base.display()
                )
            })?;
        } else {
            println!("completing {}", venv.display());
        }
        let wheels: Vec<String> = reqs.packages.iter().map(|p| p.requirement()).collect();
        pip(&sh, &python, &wheels, false)?;
        for build in &reqs.source_builds {
            let deps: Vec<String> = build.build_deps.iter().map(|d| d.to_string()).collect();
            pip(&sh, &python, &deps, false)?;
            // Its setup imports the environment's own packages (torch): no isolated build env.
            pip(&sh, &python, &[build.package.requirement()], true)?;
        }
    }
    let ok = report(&reqs, &python, true);
    system_packages(&reqs);
    if !ok {
        bail!(
            "{} is still incomplete after installing; see the messages above",
            venv.display()
        );
    }
    Ok(())
}

fn pip(sh: &Shell, python: &Path, packages: &[String], no_build_isolation: bool) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let isolation: &[&str] = if no_build_isolation {
        &["--no-build-isolation"]
    } else {
        &[]
    };
    cmd!(
        sh,
        "{python} -m pip install --disable-pip-version-check {isolation...} {packages...}"
    )
    .run()
    .with_context(|| format!("pip install {} failed", packages.join(" ")))
}

/// Prints what the interpreter imports; true when everything is there (at the pins when strict).
fn report(reqs: &Merged, python: &Path, strict: bool) -> bool {
    let imports = reqs.imports();
    match pyenv::probe_uncached(python, &imports, strict) {
        Ok(versions) => {
            println!("{}: ok", python.display());
            for (m, v) in &versions {
                let pin = imports
                    .iter()
                    .find(|p| p.import == m)
                    .and_then(|p| p.pin)
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

/// The system packages the backends need beyond pip's reach, and whether each is there.
fn system_packages(reqs: &Merged) {
    for s in &reqs.system {
        println!(
            "system package {} ({}): {}",
            s.apt,
            s.why,
            if (s.installed)() {
                "installed".to_string()
            } else {
                format!("NOT installed: apt-get install {}", s.apt)
            }
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_registered_backends_agree_on_their_pins() {
        let reqs = super::requirements().unwrap();
        assert!(reqs.imports().iter().any(|p| p.pin.is_some()));
    }
}
