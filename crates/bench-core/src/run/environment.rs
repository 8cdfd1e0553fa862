//! What a machine offers a run, found out once per machine: each needed backend's probe (can it
//! run here, and why not) and the [`Environment`] file that records it with the hardware. A local
//! run does this once; a Slurm submission once on every node its tasks land on.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use crate::backend::{backend_for, Backend, RunContext};
use crate::case::Case;
use crate::env::{self, Environment};

use super::RunOptions;

/// Each needed backend's probe by backend name: `Ok` or why it cannot run here.
pub type Probes = BTreeMap<&'static str, Result<(), String>>;

/// The context backends are probed in: the run's settings, no particular case.
pub fn probe_context(opts: &RunOptions, dir: &Path) -> RunContext {
    RunContext {
        project_root: opts.project_root.clone(),
        case_file: dir.join("cases"),
        work_dir: opts.work_root(dir),
        cache_dir: opts.cache_dir.clone(),
        bin_dir: opts.bin_dir.clone(),
        python: opts.python.clone(),
    }
}

/// Probes each backend that `cases` need, once.
pub fn probe(backends: &[Box<dyn Backend>], cases: &[Case], ctx: &RunContext) -> Probes {
    let mut probes = Probes::new();
    for c in cases {
        if let Some(b) = backend_for(backends, &c.framework) {
            probes.entry(b.name()).or_insert_with(|| b.probe(ctx));
        }
    }
    probes
}

/// This machine's environment as of `now`, saying which backends were available and the versions
/// of those that were. The work root must exist (its file system is recorded).
pub fn capture(
    backends: &[Box<dyn Backend>],
    probes: &Probes,
    ctx: &RunContext,
    now: SystemTime,
) -> Environment {
    let mut environment = env::capture(&ctx.project_root, &ctx.work_dir, now);
    environment
        .versions
        .insert("flexbench".into(), env!("CARGO_PKG_VERSION").into());
    for (name, p) in probes {
        let status = match p {
            Ok(()) => "available".to_string(),
            Err(why) => format!("unavailable: {why}"),
        };
        environment.backends.insert(name.to_string(), status);
        if p.is_ok() {
            if let Some(b) = backends.iter().find(|b| b.name() == *name) {
                environment.versions.extend(b.versions(ctx));
            }
        }
    }
    environment
}
