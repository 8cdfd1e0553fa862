//! TEST ONLY: the orchestrator as a process, with a backend that starts `flexbench-fake-runner`,
//! so tests can kill it, interrupt it and run two at once. `cargo xtask bench` is the real thing.
//!
//! Usage: flexbench-test-driver SUITE.ron OUT_DIR [--force | --rerun-failed] [--timeout SECS]
//!
//! The fake backend serves framework `fake` (policies included) and refuses cuda cases in
//! `check_case`; suites may also name `unserved`, a framework no backend serves (as when a
//! backend is not built), whose cases are `unavailable`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bench_core::run::{self, Rerun, RunOptions};
use bench_core::{Backend, Case, Device, Frameworks, RunContext, Suite};

struct FakeBackend {
    runner: PathBuf,
}

impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn frameworks(&self) -> &'static [&'static str] {
        &["fake"]
    }
    fn takes_policy(&self) -> bool {
        true
    }
    fn probe(&self, _ctx: &RunContext) -> Result<(), String> {
        if self.runner.is_file() {
            Ok(())
        } else {
            Err(format!("{} not found", self.runner.display()))
        }
    }
    fn check_case(&self, case: &Case, _ctx: &RunContext) -> Result<(), String> {
        match case.device {
            Device::Cpu => Ok(()),
            Device::Cuda => Err("the fake backend has no GPU".into()),
        }
    }
    fn command(&self, _case: &Case, _ctx: &RunContext) -> anyhow::Result<Command> {
        Ok(Command::new(&self.runner))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut rerun, mut timeout) = (Rerun::Pending, None);
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--force" => rerun = Rerun::All,
            "--rerun-failed" => rerun = Rerun::Failed,
            "--timeout" => {
                let secs: f64 = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--timeout SECS");
                timeout = Some(Duration::from_secs_f64(secs));
            }
            _ => positional.push(a.clone()),
        }
    }
    let [suite_path, out] = positional.as_slice() else {
        eprintln!("usage: flexbench-test-driver SUITE.ron OUT_DIR [--force | --rerun-failed] [--timeout SECS]");
        std::process::exit(2);
    };
    let frameworks = Frameworks::new(&[("fake", true), ("unserved", false)]);
    let result = Suite::load(suite_path.as_ref(), &frameworks).and_then(|suite| {
        let exe = std::env::current_exe()?;
        let bin_dir = exe.parent().expect("an exe has a directory").to_path_buf();
        let backends: Vec<Box<dyn Backend>> = vec![Box::new(FakeBackend {
            runner: bin_dir.join("flexbench-fake-runner"),
        })];
        let opts = RunOptions {
            out_dir: out.into(),
            project_root: std::env::current_dir()?,
            cache_dir: std::env::temp_dir(),
            bin_dir,
            python: None,
            timeout_override: timeout,
            rerun,
            progress: true,
        };
        run::run_suite(&suite.name, &suite.expand(), &backends, &opts)
    });
    std::process::exit(run::finish(result));
}
