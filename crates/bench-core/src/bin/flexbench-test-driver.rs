//! TEST ONLY: the orchestrator as a process, with a backend that starts `flexbench-fake-runner`,
//! so tests can kill it, interrupt it and run two at once, locally or through Slurm.
//! `cargo xtask bench` is the real thing.
//!
//! Usage:
//!   flexbench-test-driver SUITE.ron OUT_DIR [--force | --rerun-failed] [--timeout SECS]
//!       [--executor local|slurm] [--wait] [--partition P] [--max-parallel K]
//!       [--gpus-per-task N] [--sbatch-arg ARG]...
//!   flexbench-test-driver status SUITE.ron OUT_DIR
//!   flexbench-test-driver slurm-task SUBMISSION.json ARRAY   (what the Slurm tasks run)
//!
//! The fake backend serves framework `fake` (policies included) and refuses cuda cases in
//! `check_case`; suites may also name `unserved`, a framework no backend serves (as when a
//! backend is not built), whose cases are `unavailable`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bench_core::run::slurm::{Slurm, SlurmOptions};
use bench_core::run::{self, Executor, Local, Rerun, RunOptions};
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
    /// A case whose weights are `checkpoint("hugedisk")` would write an exabyte: more than any
    /// disk holds, so its free-space check refuses it.
    fn disk_needs(&self, case: &Case, ctx: &RunContext) -> Vec<bench_core::DiskNeed> {
        match &case.weights {
            bench_core::Weights::Checkpoint(p) if p.ends_with("hugedisk") => {
                vec![bench_core::DiskNeed {
                    dir: ctx.work_dir.clone(),
                    bytes: 1 << 60,
                    what: "the fake offload files".into(),
                }]
            }
            _ => Vec::new(),
        }
    }
    fn command(&self, _case: &Case, _ctx: &RunContext) -> anyhow::Result<Command> {
        Ok(Command::new(&self.runner))
    }
}

fn backends() -> Vec<Box<dyn Backend>> {
    let exe = std::env::current_exe().expect("the driver knows its path");
    let bin_dir = exe.parent().expect("an exe has a directory").to_path_buf();
    vec![Box::new(FakeBackend {
        runner: bin_dir.join("flexbench-fake-runner"),
    })]
}

fn frameworks() -> Frameworks {
    Frameworks::new(&[("fake", true), ("unserved", false)])
}

fn usage() -> ! {
    eprintln!(
        "usage: flexbench-test-driver SUITE.ron OUT_DIR [--force | --rerun-failed] [--timeout SECS] \
         [--executor local|slurm] [--wait] [--partition P] [--max-parallel K] [--gpus-per-task N] \
         [--sbatch-arg ARG]...\n       flexbench-test-driver status SUITE.ron OUT_DIR\n       \
         flexbench-test-driver slurm-task SUBMISSION.json ARRAY"
    );
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("slurm-task") => {
            let [_, submission, array] = args.as_slice() else {
                usage()
            };
            let array: usize = array.parse().unwrap_or_else(|_| usage());
            let result = run::slurm::task::Identity::from_env()
                .and_then(|me| run::slurm::task::run(&backends(), submission.as_ref(), array, &me));
            if let Err(e) = result {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        }
        Some("status") => {
            let [_, suite_path, out] = args.as_slice() else {
                usage()
            };
            let result = Suite::load(suite_path.as_ref(), &frameworks()).and_then(|suite| {
                let cases = suite.expand();
                let dir = run::suite_dir(out.as_ref(), &suite.name)?;
                let (statuses, settled) = run::status::status(&dir, &cases)?;
                run::status::print(&cases, &statuses, &settled);
                Ok(())
            });
            if let Err(e) = result {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        }
        _ => bench(&args),
    }
}

fn bench(args: &[String]) {
    let (mut rerun, mut timeout) = (Rerun::Pending, None);
    let mut executor = "local".to_string();
    let mut slurm = SlurmOptions::default();
    let mut positional = Vec::new();
    let mut it = args.iter();
    let value = |it: &mut std::slice::Iter<String>| it.next().cloned().unwrap_or_else(|| usage());
    while let Some(a) = it.next() {
        match a.as_str() {
            "--force" => rerun = Rerun::All,
            "--rerun-failed" => rerun = Rerun::Failed,
            "--timeout" => {
                let secs: f64 = value(&mut it).parse().unwrap_or_else(|_| usage());
                timeout = Some(Duration::from_secs_f64(secs));
            }
            "--executor" => executor = value(&mut it),
            "--wait" => slurm.wait = true,
            "--partition" => slurm.partition = Some(value(&mut it)),
            "--max-parallel" => {
                slurm.max_parallel = Some(value(&mut it).parse().unwrap_or_else(|_| usage()))
            }
            "--gpus-per-task" => {
                slurm.gpus_per_task = Some(value(&mut it).parse().unwrap_or_else(|_| usage()))
            }
            "--sbatch-arg" => slurm.sbatch_args.push(value(&mut it)),
            _ => positional.push(a.clone()),
        }
    }
    let [suite_path, out] = positional.as_slice() else {
        usage()
    };
    let result = (|| {
        let suite = Suite::load(suite_path.as_ref(), &frameworks())?;
        let exe = std::env::current_exe()?;
        let bin_dir = exe.parent().expect("an exe has a directory").to_path_buf();
        let mut exec: Box<dyn Executor> = match executor.as_str() {
            "local" => Box::new(Local::default()),
            "slurm" => {
                slurm.task_command = vec![exe.display().to_string(), "slurm-task".into()];
                Box::new(Slurm::new(slurm, true)?)
            }
            other => anyhow::bail!("unknown executor `{other}`; known: local, slurm"),
        };
        let opts = RunOptions {
            out_dir: out.into(),
            project_root: std::env::current_dir()?,
            cache_dir: std::env::temp_dir(),
            bin_dir,
            python: None,
            timeout_override: timeout,
            rerun,
            progress: true,
            work_dir: None,
        };
        run::run_suite(
            &suite.name,
            &suite.expand(),
            &backends(),
            &opts,
            exec.as_mut(),
        )
    })();
    std::process::exit(run::finish(result));
}
