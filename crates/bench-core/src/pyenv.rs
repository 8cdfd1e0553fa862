//! The Python environment that Python-runner backends share: where the virtual environment lives,
//! which interpreter a case uses, what each backend requires of it, and the (cached) import probe.
//!
//! Each backend declares its own [`PythonRequirements`]; `cargo xtask python-env` installs the
//! union of the registered backends' ([`merge`]), and each backend probes only what it imports.
//! The runner side of the child protocol, shared by every Python runner, is
//! `crates/bench-core/python/flexbench_runner.py` ([`runner_module_dir`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use crate::backend::RunContext;

/// Environment variable overriding the virtual environment's location.
pub const VENV_ENV: &str = "FLEXBENCH_VENV";

/// One Python package a runner imports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Package {
    /// The name pip installs it by.
    pub pip: &'static str,
    /// The module the runner imports (and whose `__version__` the probe reads).
    pub import: &'static str,
    /// The release it was tested with; `None` takes any (another backend may pin it).
    pub pin: Option<&'static str>,
}

impl Package {
    pub const fn pinned(pip: &'static str, version: &'static str) -> Package {
        Package {
            pip,
            import: pip,
            pin: Some(version),
        }
    }
    pub const fn any(pip: &'static str) -> Package {
        Package {
            pip,
            import: pip,
            pin: None,
        }
    }
    /// `name==pin`, or the bare name.
    pub fn requirement(&self) -> String {
        match self.pin {
            Some(v) => format!("{}=={v}", self.pip),
            None => self.pip.to_string(),
        }
    }
}

/// A package pip must build from source against the environment's own packages
/// (`--no-build-isolation`, e.g. one whose setup imports torch), after its build dependencies.
#[derive(Debug, Clone, Copy)]
pub struct SourceBuild {
    pub package: Package,
    pub build_deps: &'static [&'static str],
}

/// What pip cannot install (a system library, a compiler), checked and named for the user.
#[derive(Debug, Clone, Copy)]
pub struct SystemPackage {
    /// The Debian package that provides it.
    pub apt: &'static str,
    /// What needs it, in words.
    pub why: &'static str,
    pub installed: fn() -> bool,
}

/// What a Python-runner backend needs in the environment.
#[derive(Debug, Clone, Copy)]
pub struct PythonRequirements {
    /// Installed first, from wheels.
    pub packages: &'static [Package],
    /// Installed after `packages`, each after its build dependencies.
    pub source_builds: &'static [SourceBuild],
    pub system: &'static [SystemPackage],
}

impl PythonRequirements {
    /// Every package the runner imports.
    pub fn imports(&self) -> Vec<Package> {
        self.packages
            .iter()
            .copied()
            .chain(self.source_builds.iter().map(|s| s.package))
            .collect()
    }
}

/// The union of several backends' requirements, as `cargo xtask python-env` installs it.
#[derive(Debug, Default)]
pub struct Merged {
    /// By pip name; a pin wins over "any".
    pub packages: Vec<Package>,
    pub source_builds: Vec<SourceBuild>,
    pub system: Vec<SystemPackage>,
}

impl Merged {
    /// Every package, wheels and source builds, for the probe.
    pub fn imports(&self) -> Vec<Package> {
        self.packages
            .iter()
            .copied()
            .chain(self.source_builds.iter().map(|s| s.package))
            .collect()
    }
}

/// Merges requirements; two different pins of one package are an error naming both.
pub fn merge<'a>(reqs: impl IntoIterator<Item = &'a PythonRequirements>) -> Result<Merged, String> {
    let mut out = Merged::default();
    let add = |list: &mut Vec<Package>, p: Package| -> Result<(), String> {
        match list.iter_mut().find(|q| q.pip == p.pip) {
            None => list.push(p),
            Some(q) => match (q.pin, p.pin) {
                (Some(a), Some(b)) if a != b => {
                    return Err(format!(
                        "backends pin {} at both {a} and {b}: make them agree",
                        p.pip
                    ))
                }
                (None, Some(_)) => *q = p,
                _ => {}
            },
        }
        Ok(())
    };
    for r in reqs {
        for p in r.packages {
            add(&mut out.packages, *p)?;
        }
        for s in r.source_builds {
            if !out
                .source_builds
                .iter()
                .any(|t| t.package.pip == s.package.pip)
            {
                out.source_builds.push(*s);
            }
        }
        for s in r.system {
            if !out.system.iter().any(|t| t.apt == s.apt) {
                out.system.push(*s);
            }
        }
    }
    // A package that is any-version in one list and built from source in another is the build.
    let built: Vec<&str> = out.source_builds.iter().map(|s| s.package.pip).collect();
    out.packages
        .retain(|p| !(p.pin.is_none() && built.contains(&p.pip)));
    Ok(out)
}

/// Where the virtual environment lives: `$FLEXBENCH_VENV`, else `venv/` in the shared cache.
pub fn venv_dir() -> PathBuf {
    if let Some(p) = std::env::var_os(VENV_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    crate::dirs::cache_dir().join("venv")
}

/// The interpreter inside a virtual environment.
pub fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

/// The interpreter a case uses: `--python` when given, else the flexbench venv's.
pub fn python_for(ctx: &RunContext) -> PathBuf {
    ctx.python
        .clone()
        .unwrap_or_else(|| venv_python(&venv_dir()))
}

/// The directory holding `flexbench_runner.py`, for the runners' `PYTHONPATH`.
pub fn runner_module_dir(project_root: &Path) -> PathBuf {
    project_root
        .join("crates")
        .join("bench-core")
        .join("python")
}

/// `PYTHONPATH` with the shared runner module first, keeping the caller's entries.
pub fn python_path(project_root: &Path) -> std::ffi::OsString {
    let mut dirs = vec![runner_module_dir(project_root)];
    if let Some(p) = std::env::var_os("PYTHONPATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

/// `2.15.0+cu132` and `2.15.0` are the same release.
pub fn same_release(found: &str, pinned: &str) -> bool {
    found.split('+').next() == Some(pinned)
}

/// Versions of the imported modules, as the probe found them.
pub type Versions = BTreeMap<String, String>;

const PROBE_MARK: &str = "FLEXBENCH_PROBE ";

/// Imports `packages` with `python` and returns their versions, or why not. The answer is cached
/// per process (a probe takes seconds: it imports torch, and deepspeed probes its accelerator).
/// `strict`: versions must equal the pins (the flexbench venv); otherwise any version is accepted
/// (a user's own interpreter given with `--python`) and the runner records what it used.
pub fn probe(python: &Path, packages: &[Package], strict: bool) -> Result<Versions, String> {
    type Key = (PathBuf, Vec<(String, Option<String>)>, bool);
    static CACHE: OnceLock<Mutex<HashMap<Key, Result<Versions, String>>>> = OnceLock::new();
    let key = (
        python.to_path_buf(),
        packages
            .iter()
            .map(|p| (p.import.to_string(), p.pin.map(String::from)))
            .collect(),
        strict,
    );
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().unwrap().get(&key) {
        return hit.clone();
    }
    let answer = probe_uncached(python, packages, strict);
    cache.lock().unwrap().insert(key, answer.clone());
    answer
}

/// [`probe`] without the cache, for callers that change the environment between two probes
/// (`cargo xtask python-env` probes, installs, then probes again).
pub fn probe_uncached(
    python: &Path,
    packages: &[Package],
    strict: bool,
) -> Result<Versions, String> {
    const FIX: &str =
        "run `cargo xtask python-env` (or pass --python with an interpreter that has them)";
    if !python.exists() {
        return Err(format!(
            "Python interpreter {} not found: {FIX}",
            python.display()
        ));
    }
    let modules: Vec<&str> = packages.iter().map(|p| p.import).collect();
    let script = format!(
        "import importlib, json, platform\nout = {{'python': platform.python_version()}}\nfor m in {mods:?}:\n    try:\n        out[m] = getattr(importlib.import_module(m), '__version__', 'unknown')\n    except Exception as e:\n        out[m] = 'ERROR ' + type(e).__name__ + ': ' + str(e).splitlines()[0] if str(e) else 'ERROR ' + type(e).__name__\nprint({mark:?} + json.dumps(out))\n",
        mods = modules,
        mark = PROBE_MARK
    );
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}: {FIX}", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(PROBE_MARK))
    else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(format!(
            "{} failed the import probe ({}): {}: {FIX}",
            python.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    };
    let versions: Versions =
        serde_json::from_str(line).map_err(|e| format!("unreadable probe answer {line:?}: {e}"))?;
    let mut problems = Vec::new();
    for p in packages {
        let v = versions
            .get(p.import)
            .map(String::as_str)
            .unwrap_or("ERROR not reported");
        if let Some(err) = v.strip_prefix("ERROR ") {
            problems.push(format!("cannot import {} ({err})", p.import));
        } else if let (true, Some(pin)) = (strict, p.pin) {
            if !same_release(v, pin) {
                problems.push(format!("{} {v} is not the pinned {pin}", p.import));
            }
        }
    }
    if problems.is_empty() {
        Ok(versions)
    } else {
        Err(format!(
            "{}: {}; {FIX}",
            python.display(),
            problems.join(", ")
        ))
    }
}

/// The probe a backend runs: what it imports, strict unless the user chose the interpreter.
pub fn probe_ctx(ctx: &RunContext, reqs: &PythonRequirements) -> Result<Versions, String> {
    probe(&python_for(ctx), &reqs.imports(), ctx.python.is_none())
}

/// `PATH` with the interpreter's own `bin` directory first: tools pip installed into the venv
/// (`ninja`, which torch uses to compile extensions) are found though the venv is not activated.
pub fn path_with_interpreter_bin(python: &Path) -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(bin) = python.parent().filter(|p| !p.as_os_str().is_empty()) {
        dirs.push(bin.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

/// Whether `program arg` runs and succeeds (e.g. `g++ --version`), for [`SystemPackage`] checks.
pub fn command_works(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: PythonRequirements = PythonRequirements {
        packages: &[Package::pinned("torch", "2.15.0"), Package::any("numpy")],
        source_builds: &[],
        system: &[],
    };

    #[test]
    fn release_comparison_ignores_local_suffix() {
        assert!(same_release("2.15.0+cu132", "2.15.0"));
        assert!(same_release("2.15.0", "2.15.0"));
        assert!(!same_release("2.15.1", "2.15.0"));
    }

    #[test]
    fn merge_keeps_pins_and_refuses_conflicts() {
        const B: PythonRequirements = PythonRequirements {
            packages: &[Package::any("torch"), Package::pinned("numpy", "2.0.0")],
            source_builds: &[SourceBuild {
                package: Package::pinned("fancy", "0.1"),
                build_deps: &["ninja"],
            }],
            system: &[],
        };
        let m = merge([&A, &B]).unwrap();
        let reqs: Vec<String> = m.packages.iter().map(|p| p.requirement()).collect();
        assert_eq!(reqs, ["torch==2.15.0", "numpy==2.0.0"]);
        assert_eq!(m.imports().len(), 3);
        const C: PythonRequirements = PythonRequirements {
            packages: &[Package::pinned("torch", "2.14.0")],
            source_builds: &[],
            system: &[],
        };
        let err = merge([&A, &C]).unwrap_err();
        assert!(err.contains("2.15.0") && err.contains("2.14.0"), "{err}");
    }

    #[test]
    fn missing_interpreter_says_what_to_do() {
        let err = probe(Path::new("/nonexistent/bin/python"), &A.imports(), true).unwrap_err();
        assert!(
            err.contains("not found") && err.contains("cargo xtask python-env"),
            "{err}"
        );
    }

    #[test]
    fn missing_module_is_named() {
        let Some(py) = ["/usr/bin/python3", "/usr/local/bin/python3"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
        else {
            eprintln!("no system python3: nothing to probe");
            return;
        };
        let pkgs = [
            Package::any("json"),
            Package::any("flexbench_no_such_module"),
        ];
        let err = probe(py, &pkgs, false).unwrap_err();
        assert!(
            err.contains("cannot import flexbench_no_such_module"),
            "{err}"
        );
        assert!(err.contains("cargo xtask python-env"), "{err}");
        let ok = probe(py, &pkgs[..1], false).unwrap();
        assert!(ok.contains_key("json"));
    }
}
