//! `cargo xtask bench`: load a suite, select cases, and either show them (`--dry-run`) or run them
//! through bench-core's orchestrator, here or as Slurm job arrays (`--executor slurm`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bench_core::backend::backend_for;
use bench_core::filter::{self, Filter};
use bench_core::run::slurm::{Slurm, SlurmOptions};
use bench_core::run::{self, Executor, Local, Rerun, RunOptions};
use bench_core::suite::{RepetitionsSpec, SuiteCase};
use bench_core::{suite, Backend, BuildStep, Case, Frameworks, IdentifiedCase, Suite};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    cargo xtask bench smoke\n  \
    cargo xtask bench hf_ds --dry-run\n  \
    cargo xtask bench hf_ds --filter framework=hf --filter prompt_len=512\n  \
    cargo xtask bench suites/smoke.ron --filter placement=gpu --timeout 60 --out /tmp/results\n  \
    cargo xtask bench hf_ds --executor slurm --partition gpu --max-parallel 8 --wait\n  \
    cargo xtask bench smoke --executor slurm --sbatch-arg=--exclusive --sbatch-arg=--qos=short\n\n\
With --executor slurm, each case runs as one task of an `sbatch --array` job: the results directory,\n\
the repository (target/release) and the cache must be on a file system every node shares; see\n\
README.md, \"Running a suite on a Slurm cluster\". Without --wait the command returns after the\n\
submission; `cargo xtask status <suite>` follows it.")]
pub struct Args {
    /// Suite name (a file in suites/, e.g. `smoke`) or path to a .ron suite file.
    pub suite: String,
    /// Print the expanded cases instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: print a JSON array of cases (the same objects as the records' `case`).
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// Run only cases whose field KEY equals VALUE. KEY is a field of the --dry-run --json objects
    /// (model, framework, prompt_len, gen_len, cut_gen_len, gpu_batch_size, num_gpu_batches,
    /// placement, device, id, ...), `batch_size`, `tier`, or a dotted path into the placement
    /// policy (placement.cpu_attention). `placement` compares the label (gpu, cpu, disk, or
    /// e.g. 20/80/0/100/0/100+cpu_attn); `none` matches an unset value. A comma list matches any
    /// of its values; repeated filters must all match.
    #[arg(long = "filter", value_name = "KEY=VALUE")]
    pub filters: Vec<String>,
    /// Rerun every selected case, even those with an `ok` record.
    #[arg(long, conflicts_with = "rerun_failed")]
    pub force: bool,
    /// Rerun only the cases whose latest record failed (oom, timeout, crashed, error).
    #[arg(long)]
    pub rerun_failed: bool,
    /// Per-case timeout in seconds, replacing the suite's (default 3600 when the suite sets none).
    /// At the timeout the case's whole process group is killed.
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=bench_core::case::MAX_TIMEOUT_S))]
    pub timeout: Option<u64>,
    /// Results root; the suite's results go to <OUT>/<suite>/ [default: results/ in the repository].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Do not build the backends' runners first (the native engine's `cargo build --release -p
    /// backend-native`): run with what is in --bin-dir.
    #[arg(long)]
    pub no_build: bool,
    /// Where the runner binaries are [default: target/release].
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Repetitions of every selected case, replacing the suite's (and so the cases' ids): a
    /// count, `auto` (3 to 10 until the 95% interval of the total throughput is within ±5% of
    /// its median), or `auto(min: 3, max: 10, target_ci: 0.05)`.
    #[arg(long, value_name = "N|auto", value_parser = RepetitionsSpec::parse)]
    pub repetitions: Option<RepetitionsSpec>,
    /// Also run, per framework and placement, its smallest projected case (cut_gen_len) once at
    /// the full gen_len, so the report can show projected against measured decode latency.
    #[arg(long)]
    pub check_projection: bool,
    /// Python interpreter for the hf and deepspeed runners.
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Where each case's scratch directory (offloaded tensors) goes, as <DIR>/<suite>/<id>
    /// [default: <OUT>/<suite>/work]. On a cluster, a node-local disk.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Where the cases run: `local` (one after another on this machine) or `slurm` (one task
    /// of an `sbatch --array` job per case, on the cluster's nodes).
    #[arg(long, value_enum, default_value_t = ExecutorName::Local, value_name = "NAME")]
    pub executor: ExecutorName,
    /// Slurm: the partition to submit to [default: the cluster's default partition].
    #[arg(long, value_name = "P", help_heading = "Slurm (--executor slurm)")]
    pub partition: Option<String>,
    /// Slurm: GPUs each cuda case's task asks for (`--gres=gpu:N`; 0 asks for none)
    /// [default: the case's num_gpus_per_node]. Cpu cases ask for none.
    #[arg(long, value_name = "N", help_heading = "Slurm (--executor slurm)")]
    pub gpus_per_task: Option<u32>,
    /// Slurm: at most K tasks of the job array at once (`--array=...%K`). Cases asking for
    /// different resources go to separate arrays, each throttled to K.
    #[arg(long, value_name = "K", help_heading = "Slurm (--executor slurm)")]
    pub max_parallel: Option<u32>,
    /// Slurm: one more argument for sbatch, after flexbench's own (so it wins over them: e.g.
    /// `--sbatch-arg=--mem=64G`, `--sbatch-arg=--exclusive`, `--sbatch-arg=--account=A`).
    /// Repeat for several.
    #[arg(
        long = "sbatch-arg",
        value_name = "ARG",
        allow_hyphen_values = true,
        help_heading = "Slurm (--executor slurm)"
    )]
    pub sbatch_args: Vec<String>,
    /// Slurm: follow the job to its end with the same progress lines, summary and exit code as
    /// a local run (Ctrl-C cancels the job). Without it the command returns after submitting.
    #[arg(long, help_heading = "Slurm (--executor slurm)")]
    pub wait: bool,
}

/// The executors `--executor` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorName {
    Local,
    Slurm,
}

pub fn run(args: Args) -> Result<()> {
    let backends = crate::backends::registry();
    let path = suite::resolve(&crate::suites_dir(), &args.suite)?;
    let suite = Suite::load(&path, &Frameworks::of(&backends))?;
    let mut cases = select(&suite, &args.filters)?;
    if let Some(spec) = args.repetitions {
        for c in &mut cases {
            spec.apply(&mut c.case);
        }
    }
    if args.check_projection {
        let checks = suite::projection_checks(&cases);
        if checks.is_empty() {
            eprintln!("--check-projection: no selected case projects (none has cut_gen_len)");
        }
        cases.extend(checks);
    }

    if args.dry_run {
        resolve_for_preview(&args, &suite, &backends, &mut cases)?;
        if args.json {
            let list: Vec<serde_json::Value> = cases
                .iter()
                .map(|c| IdentifiedCase::new(c.case.clone()).to_json())
                .collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
        } else {
            print_table(&suite, &cases);
        }
        return Ok(());
    }

    // Before the build: a cluster that cannot take the submission says so at once.
    let mut executor = executor(&args)?;
    let bin_dir = args.bin_dir.clone().unwrap_or_else(crate::release_bin_dir);
    if !args.no_build {
        for step in build_steps(&backends, cases.iter().map(|c| &c.case)) {
            build(&step)?;
        }
    }
    let opts = RunOptions {
        out_dir: args.out.clone().unwrap_or_else(crate::default_results_dir),
        project_root: crate::project_root(),
        cache_dir: bench_core::dirs::cache_dir(),
        bin_dir,
        python: args.python.clone(),
        timeout_override: args.timeout.map(Duration::from_secs),
        rerun: if args.force {
            Rerun::All
        } else if args.rerun_failed {
            Rerun::Failed
        } else {
            Rerun::Pending
        },
        progress: true,
        work_dir: args.work_dir.clone(),
    };
    let cases: Vec<Case> = cases.into_iter().map(|c| c.case).collect();
    let code = run::finish(run::run_suite(
        &suite.name,
        &cases,
        &backends,
        &opts,
        executor.as_mut(),
    ));
    std::process::exit(code);
}

/// `--dry-run` shows what `auto` resolves to: each unresolved case through its backend's
/// `resolve`, as the run will (the runners built first, unless `--no-build`). A case nothing
/// fits is an error here, before anything runs.
fn resolve_for_preview(
    args: &Args,
    suite: &Suite,
    backends: &[Box<dyn Backend>],
    cases: &mut [SuiteCase],
) -> Result<()> {
    let unresolved: Vec<usize> = (0..cases.len())
        .filter(|&i| cases[i].case.unresolved())
        .collect();
    if unresolved.is_empty() {
        return Ok(());
    }
    if !args.no_build {
        for step in build_steps(backends, unresolved.iter().map(|&i| &cases[i].case)) {
            build(&step)?;
        }
    }
    let out = args.out.clone().unwrap_or_else(crate::default_results_dir);
    let dir = out.join(&suite.name);
    let scratch = std::env::temp_dir().join(format!("flexbench-dry-run-{}", std::process::id()));
    let mut failed = Vec::new();
    for i in unresolved {
        let sc = &mut cases[i];
        let id = sc.case.id();
        let Some(backend) = backend_for(backends, &sc.case.framework) else {
            continue;
        };
        let work_root = match &args.work_dir {
            Some(w) => w.join(&suite.name),
            None => dir.join("work"),
        };
        let ctx = bench_core::RunContext {
            project_root: crate::project_root(),
            case_file: scratch.join(format!("{id}.json")),
            work_dir: work_root.join(&id),
            cache_dir: bench_core::dirs::cache_dir(),
            bin_dir: args.bin_dir.clone().unwrap_or_else(crate::release_bin_dir),
            python: args.python.clone(),
        };
        match backend.resolve(&sc.case, &ctx) {
            Ok(c) => sc.case = c,
            Err(e) => failed.push(format!("{}: {e}", sc.origin)),
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if !failed.is_empty() {
        bail!(
            "{} case(s) of {} cannot be resolved:\n  {}",
            failed.len(),
            suite.name,
            failed.join("\n  ")
        );
    }
    Ok(())
}

/// The executor `--executor` names, checked as far as it can be before anything runs.
fn executor(args: &Args) -> Result<Box<dyn Executor>> {
    let slurm_flags = [
        ("--partition", args.partition.is_some()),
        ("--gpus-per-task", args.gpus_per_task.is_some()),
        ("--max-parallel", args.max_parallel.is_some()),
        ("--sbatch-arg", !args.sbatch_args.is_empty()),
        ("--wait", args.wait),
    ];
    match args.executor {
        ExecutorName::Local => {
            let given: Vec<&str> = slurm_flags
                .iter()
                .filter(|(_, set)| *set)
                .map(|(f, _)| *f)
                .collect();
            if !given.is_empty() {
                bail!(
                    "{} only mean something with --executor slurm",
                    given.join(", ")
                );
            }
            Ok(Box::new(Local::default()))
        }
        ExecutorName::Slurm => {
            let program = bench_core::run::slurm::this_program()?;
            let opts = SlurmOptions {
                partition: args.partition.clone(),
                gpus_per_task: args.gpus_per_task,
                max_parallel: args.max_parallel,
                sbatch_args: args.sbatch_args.clone(),
                wait: args.wait,
                task_command: vec![
                    program.display().to_string(),
                    crate::slurm_task::SUBCOMMAND.to_string(),
                ],
            };
            Ok(Box::new(Slurm::new(opts, true)?))
        }
    }
}

/// The suite's cases that pass every filter, with their origins.
fn select(suite: &Suite, filter_args: &[String]) -> Result<Vec<SuiteCase>> {
    let filters = filter_args
        .iter()
        .map(|f| Filter::parse(f))
        .collect::<Result<Vec<_>>>()?;
    let cases: Vec<SuiteCase> = suite
        .cases()
        .iter()
        .filter(|c| filter::matches_all(&filters, &c.case))
        .cloned()
        .collect();
    if cases.is_empty() {
        if filters.is_empty() {
            bail!("suite {} has no cases", suite.path.display());
        }
        bail!(
            "no case of suite {} matches {}; see them all with `cargo xtask bench {} --dry-run`",
            suite.name,
            filter_args.join(" and "),
            suite.name
        );
    }
    Ok(cases)
}

fn print_table(suite: &Suite, cases: &[SuiteCase]) {
    let header = [
        "id",
        "model",
        "framework",
        "device",
        "prompt",
        "gen",
        "cut",
        "batch",
        "placement",
        "reps",
        "predicted",
        "origin",
    ];
    let rows: Vec<Vec<String>> = cases
        .iter()
        .map(|SuiteCase { case: c, origin }| {
            vec![
                c.id(),
                c.model.clone(),
                c.framework.clone(),
                c.device.as_str().to_string(),
                c.prompt_len.to_string(),
                c.gen_len.to_string(),
                match (c.cut_gen_len, c.check_projection_at) {
                    (Some(x), _) => x.to_string(),
                    (None, Some(at)) => format!("check@{at}"),
                    (None, None) => "-".into(),
                },
                match &c.auto {
                    Some(a) if a.gpu_batch_size && a.resolved.is_none() => "auto".into(),
                    Some(a) if a.gpu_batch_size => {
                        format!("auto: {}x{}", c.gpu_batch_size, c.num_gpu_batches)
                    }
                    _ => format!("{}x{}", c.gpu_batch_size, c.num_gpu_batches),
                },
                c.placement_label(),
                match &c.adaptive_repetitions {
                    Some(a) => format!("auto {}..{} ±{}%", a.min, a.max, a.target_ci * 100.0),
                    None => c.repetitions.to_string(),
                },
                c.auto
                    .as_ref()
                    .and_then(|a| a.resolved.as_ref()?.predicted)
                    .map_or("-".into(), |p| format!("{:.2} tok/s", p.total_throughput)),
                origin.clone(),
            ]
        })
        .collect();
    print!("{}", bench_core::table::render(&header, &rows));
    println!("{} case(s) from {}", rows.len(), suite.path.display());
}

/// The build steps of the backends that serve `cases`, each once, in registry order.
fn build_steps<'a>(
    backends: &[Box<dyn Backend>],
    cases: impl Iterator<Item = &'a Case>,
) -> Vec<BuildStep> {
    let mut steps: Vec<BuildStep> = Vec::new();
    for c in cases {
        if let Some(step) = backend_for(backends, &c.framework).and_then(|b| b.build_step()) {
            if !steps.contains(&step) {
                steps.push(step);
            }
        }
    }
    steps
}

/// Runs one build step, so a run never measures a stale binary.
fn build(step: &BuildStep) -> Result<()> {
    let sh = xshell::Shell::new()?;
    sh.change_dir(crate::project_root());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let args = step.cargo_args;
    eprintln!("building {}: cargo {}", step.what, args.join(" "));
    xshell::cmd!(sh, "{cargo} {args...}")
        .quiet()
        .run()
        .with_context(|| {
            format!(
                "building {} failed; fix the build, or pass --no-build to run with what is in target/release",
                step.what
            )
        })
}
