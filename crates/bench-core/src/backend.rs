//! The `Backend` trait: the one place that knows a framework. The orchestrator, the suite loader
//! and the setup commands learn everything framework-specific through it: which names a suite may
//! use ([`Frameworks`]), whether a case may carry a full policy, what to build first, what the
//! Python environment must hold, and how to start the runner for one case.

use std::path::PathBuf;
use std::process::Command;

use crate::case::{Case, Placement};
use crate::pyenv::PythonRequirements;

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

/// Something to build before a backend's cases run, so a run never measures a stale binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildStep {
    /// What is built, in words (`the native runner`).
    pub what: &'static str,
    /// The arguments to `cargo` (`["build", "--release", "-p", "backend-native"]`).
    pub cargo_args: &'static [&'static str],
}

/// Bytes a case will write into a directory, and what they are, for the free-space check.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskNeed {
    pub dir: PathBuf,
    pub bytes: u64,
    pub what: String,
}

/// Whether the needs fit the free space of their filesystems; `Err` names each filesystem short
/// of space with the sum of what goes there, its parts, and what is free.
pub fn check_disk_needs(needs: &[DiskNeed]) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // Needs on one filesystem add up; the device number tells which filesystem holds a path.
    let mut by_fs: Vec<(u64, Vec<&DiskNeed>)> = Vec::new();
    for n in needs.iter().filter(|n| n.bytes > 0) {
        let Some(dev) = n
            .dir
            .ancestors()
            .find_map(|a| std::fs::metadata(a).ok())
            .map(|m| m.dev())
        else {
            continue;
        };
        match by_fs.iter_mut().find(|(d, _)| *d == dev) {
            Some((_, v)) => v.push(n),
            None => by_fs.push((dev, vec![n])),
        }
    }
    let gb = |b: u64| format!("{:.1} GB", b as f64 / 1e9);
    let mut short = Vec::new();
    for (_, group) in by_fs {
        let sum: u64 = group.iter().map(|n| n.bytes).sum();
        let Some(free) = crate::env::free_bytes(&group[0].dir) else {
            continue;
        };
        if free < sum {
            let parts: Vec<String> = group
                .iter()
                .map(|n| format!("{} {} in {}", n.what, gb(n.bytes), n.dir.display()))
                .collect();
            short.push(format!(
                "needs {} on one disk ({}), which has {} free",
                gb(sum),
                parts.join(" + "),
                gb(free)
            ));
        }
    }
    if short.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "not enough disk space: {}; free space, or give --out / --work-dir / FLEXBENCH_CACHE on a larger disk",
            short.join("; ")
        ))
    }
}

/// A framework wrapper. Adding a framework = one crate implementing this + one line in xtask's
/// registry.
pub trait Backend {
    /// Short name, e.g. the crate's framework name.
    fn name(&self) -> &'static str;
    /// The `framework` values of cases this backend runs.
    fn frameworks(&self) -> &'static [&'static str];
    /// Whether its cases may carry a full offloading policy (`placement: policy(...)`); backends
    /// that only know the tier presets (gpu, cpu, disk) say no, and suites are checked for it.
    fn takes_policy(&self) -> bool {
        false
    }
    /// What `bench` builds before running this backend's cases (skipped with `--no-build`).
    fn build_step(&self) -> Option<BuildStep> {
        None
    }
    /// What its runner needs in the shared Python environment (`cargo xtask python-env`).
    fn python_requirements(&self) -> Option<&'static PythonRequirements> {
        None
    }
    /// Whether the backend can run anything on this machine; `Err` says why not and what to do.
    fn probe(&self, ctx: &RunContext) -> Result<(), String>;
    /// Whether this particular case can run here (e.g. a cuda case without a GPU); `Err` says why.
    fn check_case(&self, _case: &Case, _ctx: &RunContext) -> Result<(), String> {
        Ok(())
    }
    /// Chooses what the case leaves to `auto` ([`Case::auto`]) before it runs, and returns it
    /// with concrete values and `auto.resolved` set (how, and what is predicted); a case with
    /// nothing to choose comes back unchanged. The default is the baselines' rule: the largest
    /// batch that fits the placement's tiers ([`crate::memory::resolve_preset`]); a backend
    /// with a planner overrides it. `Err` says why nothing fits and what would.
    fn resolve(&self, case: &Case, ctx: &RunContext) -> Result<Case, String> {
        crate::memory::resolve_preset(case, &ctx.work_dir)
    }
    /// What the case will write to disk before and while it runs (the shared checkpoint if it
    /// is not there yet, offload and swap files), checked against the free space before anything
    /// is written. Files in `ctx.work_dir` are removed when the case ends, whatever its outcome.
    fn disk_needs(&self, _case: &Case, _ctx: &RunContext) -> Vec<DiskNeed> {
        Vec::new()
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

/// The backend serving a framework, if one is registered.
pub fn backend_for<'a>(
    backends: &'a [Box<dyn Backend>],
    framework: &str,
) -> Option<&'a dyn Backend> {
    backends
        .iter()
        .find(|b| b.frameworks().contains(&framework))
        .map(|b| b.as_ref())
}

/// The frameworks suites may name: those of the registered backends, with what each accepts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frameworks {
    /// (framework, takes_policy), in registration order.
    known: Vec<(&'static str, bool)>,
}

impl Frameworks {
    /// The frameworks of `backends`.
    pub fn of(backends: &[Box<dyn Backend>]) -> Frameworks {
        let mut known = Vec::new();
        for b in backends {
            for f in b.frameworks() {
                known.push((*f, b.takes_policy()));
            }
        }
        Frameworks { known }
    }

    /// A catalog from (framework, takes_policy) pairs, for tools and tests without backends.
    pub fn new(known: &[(&'static str, bool)]) -> Frameworks {
        Frameworks {
            known: known.to_vec(),
        }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.known.iter().map(|(n, _)| *n).collect()
    }

    /// Whether `name` is a known framework; the error lists the known ones.
    pub fn check_name(&self, name: &str) -> Result<(), String> {
        if self.known.iter().any(|(n, _)| *n == name) {
            Ok(())
        } else {
            Err(format!(
                "unknown framework `{name}`; known: {}",
                if self.known.is_empty() {
                    "none (no backend is registered)".to_string()
                } else {
                    self.names().join(", ")
                }
            ))
        }
    }

    /// Whether the case's framework exists and accepts its placement.
    pub fn check(&self, case: &Case) -> Result<(), String> {
        self.check_name(&case.framework)?;
        let takes_policy = self.known.iter().any(|(n, p)| *n == case.framework && *p);
        if matches!(case.placement, Placement::Policy(_)) && !takes_policy {
            return Err(format!(
                "framework `{}` takes a preset placement (gpu, cpu or disk), not a policy",
                case.framework
            ));
        }
        if case.placement == Placement::Auto && !takes_policy {
            return Err(format!(
                "framework `{}` takes a preset placement (gpu, cpu or disk), not `auto` (only a \
                 backend that runs full policies plans one); `gpu_batch_size: auto` works for it",
                case.framework
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::Policy;

    #[test]
    fn frameworks_check_names_and_policies() {
        let fw = Frameworks::new(&[("engine", true), ("wrapper", false)]);
        let mut c = Case::example("engine");
        c.placement = Placement::Policy(Policy::new([100, 0, 100, 0, 100, 0]));
        assert!(fw.check(&c).is_ok());
        c.framework = "wrapper".into();
        assert!(fw.check(&c).unwrap_err().contains("preset placement"));
        c.placement = Placement::Disk;
        assert!(fw.check(&c).is_ok());
        c.framework = "other".into();
        let e = fw.check(&c).unwrap_err();
        assert!(
            e.contains("unknown framework `other`; known: engine, wrapper"),
            "{e}"
        );
        assert!(Frameworks::default()
            .check_name("x")
            .unwrap_err()
            .contains("no backend"));
    }

    #[test]
    fn disk_needs_on_one_filesystem_add_up() {
        let dir = std::env::temp_dir();
        let free = crate::env::free_bytes(&dir).unwrap();
        let half = |what: &str| DiskNeed {
            dir: dir.join("a").join(what),
            bytes: free / 2 + 1,
            what: what.into(),
        };
        assert!(check_disk_needs(&[half("x")]).is_ok());
        let e = check_disk_needs(&[half("x"), half("y")]).unwrap_err();
        assert!(
            e.contains("x ") && e.contains(" + y ") && e.contains("free"),
            "{e}"
        );
        assert!(check_disk_needs(&[]).is_ok());
    }
}
