//! The Python environment the hf and deepspeed backends run in: pinned versions, where the virtual
//! environment lives, which interpreter a case uses, and the (cached) import probe.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use bench_core::RunContext;

/// Environment variable overriding the virtual environment's location.
pub const VENV_ENV: &str = "FLEXBENCH_VENV";

/// The pinned framework versions `cargo xtask python-env` installs.
pub const PINNED: &[(&str, &str)] = &[
    ("torch", "2.15.0"),
    ("transformers", "5.23.0"),
    ("accelerate", "1.15.0"),
    ("deepspeed", "0.19.8"),
];

/// Unpinned packages the runners import (any version).
pub const UNPINNED: &[&str] = &["safetensors", "numpy"];

/// What the hf runner imports.
pub const HF_MODULES: &[&str] = &[
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "numpy",
];
/// What the deepspeed runner imports.
pub const DS_MODULES: &[&str] = &[
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "numpy",
    "deepspeed",
];

/// Where the virtual environment lives: `$FLEXBENCH_VENV`, else `~/.cache/flexbench/venv`.
pub fn venv_dir() -> PathBuf {
    if let Some(p) = std::env::var_os(VENV_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("flexbench").join("venv")
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

/// The pinned version of a package, if it has one.
pub fn pinned(module: &str) -> Option<&'static str> {
    PINNED.iter().find(|(m, _)| *m == module).map(|(_, v)| *v)
}

/// `2.15.0+cu132` and `2.15.0` are the same release.
pub fn same_release(found: &str, pinned: &str) -> bool {
    found.split('+').next() == Some(pinned)
}

/// Versions of the imported modules, as the probe found them.
pub type Versions = BTreeMap<String, String>;

const PROBE_MARK: &str = "FLEXBENCH_PROBE ";

/// Imports `modules` with `python` and returns their versions, or why not. The answer is cached
/// per process (a probe takes seconds: it imports torch, and deepspeed probes its accelerator).
/// `strict`: versions must equal the pins (the flexbench venv); otherwise any version is accepted
/// (a user's own interpreter given with `--python`) and the runner records what it used.
pub fn probe(python: &Path, modules: &[&str], strict: bool) -> Result<Versions, String> {
    type Key = (PathBuf, Vec<String>, bool);
    static CACHE: OnceLock<Mutex<HashMap<Key, Result<Versions, String>>>> = OnceLock::new();
    let key = (
        python.to_path_buf(),
        modules.iter().map(|m| m.to_string()).collect(),
        strict,
    );
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().unwrap().get(&key) {
        return hit.clone();
    }
    let answer = probe_uncached(python, modules, strict);
    cache.lock().unwrap().insert(key, answer.clone());
    answer
}

/// [`probe`] without the cache, for callers that change the environment between two probes
/// (`cargo xtask python-env` probes, installs, then probes again).
pub fn probe_uncached(python: &Path, modules: &[&str], strict: bool) -> Result<Versions, String> {
    const FIX: &str =
        "run `cargo xtask python-env` (or pass --python with an interpreter that has them)";
    if !python.exists() {
        return Err(format!(
            "Python interpreter {} not found: {FIX}",
            python.display()
        ));
    }
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
    for m in modules {
        let v = versions
            .get(*m)
            .map(String::as_str)
            .unwrap_or("ERROR not reported");
        if let Some(err) = v.strip_prefix("ERROR ") {
            problems.push(format!("cannot import {m} ({err})"));
        } else if let (true, Some(pin)) = (strict, pinned(m)) {
            if !same_release(v, pin) {
                problems.push(format!("{m} {v} is not the pinned {pin}"));
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

/// The probe a backend runs: its modules, strict unless the user chose the interpreter.
pub fn probe_ctx(ctx: &RunContext, modules: &[&str]) -> Result<Versions, String> {
    probe(&python_for(ctx), modules, ctx.python.is_none())
}

/// `PATH` with the interpreter's own `bin` directory first: torch finds `ninja` (installed into
/// the venv by pip) on `PATH` when DeepSpeed compiles its ops, and the venv is not activated.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_comparison_ignores_local_suffix() {
        assert!(same_release("2.15.0+cu132", "2.15.0"));
        assert!(same_release("2.15.0", "2.15.0"));
        assert!(!same_release("2.15.1", "2.15.0"));
        assert_eq!(pinned("deepspeed"), Some("0.19.8"));
        assert_eq!(pinned("numpy"), None);
    }

    #[test]
    fn missing_interpreter_says_what_to_do() {
        let err = probe(Path::new("/nonexistent/bin/python"), HF_MODULES, true).unwrap_err();
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
        let err = probe(py, &["json", "flexbench_no_such_module"], false).unwrap_err();
        assert!(
            err.contains("cannot import flexbench_no_such_module"),
            "{err}"
        );
        assert!(err.contains("cargo xtask python-env"), "{err}");
        let ok = probe(py, &["json"], false).unwrap();
        assert!(ok.contains_key("json"));
    }
}
