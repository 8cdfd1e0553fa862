//! One Slurm submission on disk and what it asks for: `<suite dir>/slurm/<stamp>/` holds
//! `submission.json` (the cases, the run's settings, the job ids), one `array-<g>.sh` job script
//! per array, `records/` where tasks put their records, `merged/` where those go once they are in
//! results.jsonl, `out/<job>_<index>.out` (Slurm's output of each task) and `env/` (which node
//! has written its environment file).
//!
//! Cases that ask for the same resources (time limit, memory, GPUs) share one job array; a suite
//! of like cases is one `sbatch --array`. Array task `i` of array `g` runs `arrays[g].cases[i]`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::case::{Case, Device};
use crate::model;
use crate::run::execute;
use crate::run::{Rerun, RunOptions};
use crate::store;

/// What a task's time limit adds to the case's timeout, at least: the task also probes the
/// backends, captures the node's environment, prepares the case (a dummy checkpoint may be written
/// first) and writes its record, and the supervisor must get to kill the case at its own timeout
/// before Slurm kills the task.
pub const TIME_MARGIN: Duration = Duration::from_secs(300);
/// Host memory every task asks for beyond the case's tensors: the runner itself (a Python
/// framework with torch loaded is a few GiB), the task, page-cache slack.
const BASE_MEMORY: u64 = 4 << 30;
/// A timeout this long asks Slurm for no time limit of its own (the partition's applies).
const NO_TIME_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// What one task asks Slurm for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Request {
    /// `--time` in minutes; `None` leaves the partition's limit.
    pub time_limit_min: Option<u64>,
    /// `--mem` in MiB; `None` (a model flexbench does not know) leaves the cluster's default.
    pub mem_mib: Option<u64>,
    /// `--gres=gpu:N`; 0 asks for none.
    pub gpus: u32,
}

impl Request {
    /// The request for `case`: its timeout plus [`TIME_MARGIN`] (or a tenth, when that is more),
    /// the host memory its placement keeps there, and for cuda cases `gpus_per_task` GPUs (default:
    /// the case's `num_gpus_per_node`).
    pub fn for_case(case: &Case, opts: &RunOptions, gpus_per_task: Option<u32>) -> Request {
        let timeout = execute::timeout(opts, case);
        let time_limit_min = (timeout < NO_TIME_LIMIT).then(|| {
            let limit = timeout + TIME_MARGIN.max(timeout / 10);
            limit.as_secs().div_ceil(60)
        });
        Request {
            time_limit_min,
            mem_mib: host_memory(case).map(|b| round_up_memory(b) >> 20),
            gpus: match case.device {
                Device::Cuda => gpus_per_task.unwrap_or(case.num_gpus_per_node as u32),
                Device::Cpu => 0,
            },
        }
    }

    /// The sbatch options for this request.
    pub fn sbatch_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(m) = self.time_limit_min {
            args.push(format!("--time={m}"));
        }
        if let Some(m) = self.mem_mib {
            args.push(format!("--mem={m}M"));
        }
        if self.gpus > 0 {
            args.push(format!("--gres=gpu:{}", self.gpus));
        }
        args
    }
}

/// Host memory a case keeps in this machine's RAM: the shares of weights and KV cache its
/// placement puts on the CPU tier (and, on the cpu device, on the compute tier too, which is then
/// RAM as well), a hidden-state tensor, a quarter on top, and [`BASE_MEMORY`]. `None` for a
/// model not in the registry.
fn host_memory(case: &Case) -> Option<u64> {
    let cfg = model::lookup(&case.model)?;
    let policy = case.placement.policy();
    let host_share = |(gpu, cpu, _disk): (u8, u8, u8)| -> f64 {
        let on_host = match case.device {
            Device::Cpu => gpu as u32 + cpu as u32,
            Device::Cuda => cpu as u32,
        };
        on_host as f64 / 100.0
    };
    let seq = case.prompt_len + case.gen_len;
    let tensors = cfg.model_bytes() as f64 * host_share(policy.weights())
        + cfg.cache_bytes(case.batch_size(), seq) as f64 * host_share(policy.cache())
        + cfg.hidden_bytes(case.batch_size(), seq) as f64;
    Some((tensors * 1.25) as u64 + BASE_MEMORY)
}

/// Up to the next of 2, 3, 4, 6, 8, 12, ... GiB: cases of about the same size ask for the same
/// amount and share an array, and none asks for more than 1.5 times what it needs.
fn round_up_memory(bytes: u64) -> u64 {
    let mut step: u64 = 2 << 30;
    loop {
        if bytes <= step {
            return step;
        }
        if bytes <= step / 2 * 3 {
            return step / 2 * 3;
        }
        step *= 2;
    }
}

/// The run's settings a task needs on its node (what [`RunOptions`] says, with absolute paths).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub project_root: PathBuf,
    pub cache_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub python: Option<PathBuf>,
    pub timeout_override_s: Option<f64>,
    pub work_dir: Option<PathBuf>,
}

impl Settings {
    fn of(opts: &RunOptions) -> Result<Settings> {
        Ok(Settings {
            project_root: absolute(&opts.project_root)?,
            cache_dir: absolute(&opts.cache_dir)?,
            bin_dir: absolute(&opts.bin_dir)?,
            // A bare name (`python3`) is looked up on the node's PATH; a path is made absolute.
            python: match &opts.python {
                Some(p) if p.components().count() > 1 => Some(absolute(p)?),
                other => other.clone(),
            },
            timeout_override_s: opts.timeout_override.map(|d| d.as_secs_f64()),
            work_dir: opts.work_dir.as_deref().map(absolute).transpose()?,
        })
    }

    /// The options a task runs its case with; `dir` is the suite's results directory.
    pub fn run_options(&self, dir: &Path) -> RunOptions {
        RunOptions {
            out_dir: dir.parent().unwrap_or(dir).to_path_buf(),
            project_root: self.project_root.clone(),
            cache_dir: self.cache_dir.clone(),
            bin_dir: self.bin_dir.clone(),
            python: self.python.clone(),
            timeout_override: self.timeout_override_s.map(Duration::from_secs_f64),
            rerun: Rerun::Pending,
            progress: false,
            work_dir: self.work_dir.clone(),
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("making {} absolute", p.display()))
}

/// One `sbatch --array` of a submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Array {
    pub request: Request,
    /// Task `i` runs `cases[i]`.
    pub cases: Vec<Case>,
    /// Set once sbatch has accepted the array.
    pub job_id: Option<String>,
    /// The sbatch command line, for the curious and for reruns by hand.
    pub sbatch: Vec<String>,
}

/// `submission.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    pub suite: String,
    /// The directory name under `slurm/`, also the stem of the nodes' environment ids.
    pub stamp: String,
    pub submitted_at: String,
    pub settings: Settings,
    pub arrays: Vec<Array>,
}

impl Submission {
    /// The cases grouped into arrays by what they ask for, in suite order.
    pub fn new(
        suite: &str,
        stamp: String,
        submitted_at: String,
        cases: &[Case],
        opts: &RunOptions,
        gpus_per_task: Option<u32>,
    ) -> Result<Submission> {
        let mut arrays: Vec<Array> = Vec::new();
        for case in cases {
            let request = Request::for_case(case, opts, gpus_per_task);
            match arrays.iter_mut().find(|a| a.request == request) {
                Some(a) => a.cases.push(case.clone()),
                None => arrays.push(Array {
                    request,
                    cases: vec![case.clone()],
                    job_id: None,
                    sbatch: Vec::new(),
                }),
            }
        }
        Ok(Submission {
            suite: suite.to_string(),
            stamp,
            submitted_at,
            settings: Settings::of(opts)?,
            arrays,
        })
    }

    pub fn load(path: &Path) -> Result<Submission> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a flexbench Slurm submission (written by another version?)",
                path.display()
            )
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a submission always serializes");
        store::write_durably(path, (text + "\n").as_bytes())
    }

    /// Every case of every array.
    pub fn cases(&self) -> Vec<Case> {
        self.arrays.iter().flat_map(|a| a.cases.clone()).collect()
    }

    /// The environment id of the tasks that ran on `node`.
    pub fn env_id(&self, node: &str) -> String {
        let safe: String = node
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("env-{}-{safe}", self.stamp)
    }

    /// The job ids sbatch gave, comma-joined for messages and Slurm's commands.
    pub fn job_ids(&self) -> String {
        let ids: Vec<&str> = self
            .arrays
            .iter()
            .filter_map(|a| a.job_id.as_deref())
            .collect();
        ids.join(",")
    }
}

/// The paths of one submission directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
}

impl Paths {
    /// Where submissions into the suite directory `dir` live.
    pub fn parent(dir: &Path) -> PathBuf {
        dir.join("slurm")
    }

    pub fn new(dir: &Path, stamp: &str) -> Paths {
        Paths {
            root: Paths::parent(dir).join(stamp),
        }
    }

    /// The suite's results directory this submission belongs to.
    pub fn suite_dir(&self) -> PathBuf {
        self.root
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    pub fn submission(&self) -> PathBuf {
        self.root.join("submission.json")
    }
    pub fn script(&self, array: usize) -> PathBuf {
        self.root.join(format!("array-{array}.sh"))
    }
    pub fn records(&self) -> PathBuf {
        self.root.join("records")
    }
    pub fn merged(&self) -> PathBuf {
        self.root.join("merged")
    }
    pub fn out(&self) -> PathBuf {
        self.root.join("out")
    }
    /// Slurm's output file of one task, as the `--output` pattern names it.
    pub fn out_file(&self, job_id: &str, index: u32) -> PathBuf {
        self.out().join(format!("{job_id}_{index}.out"))
    }
    pub fn env_claims(&self) -> PathBuf {
        self.root.join("env")
    }
    /// Present once every task has a record in results.jsonl and none is queued or running.
    pub fn settled(&self) -> PathBuf {
        self.root.join("settled")
    }

    /// The record file a task writes: unique per job, index and restart.
    pub fn record_file(&self, job_id: &str, index: u32, restarts: u32) -> PathBuf {
        self.records()
            .join(format!("{job_id}_{index}.{restarts}.json"))
    }

    /// Creates the directories tasks write into.
    pub fn create(&self) -> Result<()> {
        for d in [self.records(), self.merged(), self.out(), self.env_claims()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }

    /// The submissions into `dir`, oldest first.
    pub fn all(dir: &Path) -> Result<Vec<Paths>> {
        let parent = Paths::parent(dir);
        let entries = match std::fs::read_dir(&parent) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", parent.display())),
        };
        let mut out: Vec<Paths> = entries
            .flatten()
            .map(|e| Paths { root: e.path() })
            .filter(|p| p.submission().is_file())
            .collect();
        out.sort_by(|a, b| a.root.cmp(&b.root));
        Ok(out)
    }
}

/// The job script of array `g`: only the command of a task, since every option goes on sbatch's
/// command line (no quoting of paths in `#SBATCH` lines, and `--sbatch-arg` comes last and wins).
pub fn script(sub: &Submission, paths: &Paths, g: usize, task_command: &[String]) -> String {
    let mut words: Vec<String> = task_command.iter().map(|w| shell_quote(w)).collect();
    words.push(shell_quote(&paths.submission().display().to_string()));
    words.push(g.to_string());
    format!(
        "#!/bin/bash\n\
         # flexbench suite {suite}, submission {stamp}, array {g}: {n} case(s), one per array task.\n\
         # Each task runs its case under flexbench's supervisor and writes its record into\n\
         # {records}; the orchestrator merges those into results.jsonl.\n\
         exec {cmd}\n",
        suite = sub.suite,
        stamp = sub.stamp,
        n = sub.arrays[g].cases.len(),
        records = paths.records().display(),
        cmd = words.join(" ")
    )
}

/// The sbatch arguments of array `g` (before the script), ours first and the user's last.
pub fn sbatch_args(
    sub: &Submission,
    paths: &Paths,
    g: usize,
    partition: Option<&str>,
    max_parallel: Option<u32>,
    user: &[String],
) -> Result<Vec<String>> {
    let array = &sub.arrays[g];
    if array.cases.is_empty() {
        bail!("array {g} of submission {} has no cases", sub.stamp);
    }
    let mut range = format!("0-{}", array.cases.len() - 1);
    if let Some(k) = max_parallel {
        range.push_str(&format!("%{k}"));
    }
    // `%` starts a Slurm file-name pattern; a literal one is `%%`.
    let out = paths.out().display().to_string().replace('%', "%%");
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name=flexbench-{}", sub.suite),
        format!("--array={range}"),
        format!("--output={out}/%A_%a.out"),
        // A requeued task appends to the output of its first attempt instead of truncating it.
        "--open-mode=append".to_string(),
        format!("--chdir={}", sub.settings.project_root.display()),
    ];
    args.extend(array.request.sbatch_args());
    if let Some(p) = partition {
        args.push(format!("--partition={p}"));
    }
    args.extend(user.iter().cloned());
    Ok(args)
}

/// `word` as one bash word.
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::Placement;

    fn opts() -> RunOptions {
        RunOptions {
            out_dir: "/r".into(),
            project_root: "/p".into(),
            cache_dir: "/c".into(),
            bin_dir: "/p/target/release".into(),
            python: None,
            timeout_override: None,
            rerun: Rerun::Pending,
            progress: false,
            work_dir: None,
        }
    }

    #[test]
    fn requests_follow_timeout_memory_and_device() {
        let mut c = Case::example("e");
        c.timeout_s = Some(120);
        let r = Request::for_case(&c, &opts(), None);
        // 120 s + the 5 minute margin, in whole minutes; opt-125m fits the smallest memory step;
        // a cpu case asks for no GPU.
        assert_eq!(r.time_limit_min, Some(7));
        assert_eq!(r.mem_mib, Some(6 << 10));
        assert_eq!(r.gpus, 0);
        assert_eq!(r.sbatch_args(), ["--time=7", "--mem=6144M"]);
        // Two hours get a tenth on top; --timeout replaces the case's own.
        c.timeout_s = Some(7200);
        assert_eq!(
            Request::for_case(&c, &opts(), None).time_limit_min,
            Some(132)
        );
        let mut o = opts();
        o.timeout_override = Some(Duration::from_secs(60));
        assert_eq!(Request::for_case(&c, &o, None).time_limit_min, Some(6));
        o.timeout_override = Some(Duration::from_secs(u64::MAX));
        assert_eq!(Request::for_case(&c, &o, None).time_limit_min, None);
        // A cuda case asks for its GPUs, or --gpus-per-task's; weights on the GPU are not host
        // memory, weights on the CPU tier are.
        c.model = "opt-30b".into();
        c.device = Device::Cuda;
        c.num_gpus_per_node = 2;
        let gpu = Request::for_case(&c, &opts(), None);
        assert_eq!(gpu.gpus, 2);
        assert_eq!(gpu.sbatch_args().last().unwrap(), "--gres=gpu:2");
        assert_eq!(Request::for_case(&c, &opts(), Some(1)).gpus, 1);
        assert_eq!(
            Request::for_case(&c, &opts(), Some(0)).sbatch_args().len(),
            2
        );
        c.placement = Placement::Cpu;
        let cpu = Request::for_case(&c, &opts(), None);
        // 60 GB of fp16 weights with a quarter on top and the base: the 96 GiB step.
        assert_eq!(cpu.mem_mib, Some(96 << 10));
        assert!(gpu.mem_mib.unwrap() < cpu.mem_mib.unwrap());
        c.model = "my-own-model".into();
        assert_eq!(Request::for_case(&c, &opts(), None).mem_mib, None);
    }

    #[test]
    fn memory_steps() {
        let gib = 1u64 << 30;
        assert_eq!(round_up_memory(1), 2 * gib);
        assert_eq!(round_up_memory(2 * gib + 1), 3 * gib);
        assert_eq!(round_up_memory(3 * gib + 1), 4 * gib);
        assert_eq!(round_up_memory(5 * gib), 6 * gib);
        assert_eq!(round_up_memory(100 * gib), 128 * gib);
    }

    #[test]
    fn like_cases_share_an_array_and_the_script_runs_the_task() {
        let mut a = Case::example("e");
        a.timeout_s = Some(60);
        let mut b = a.clone();
        b.prompt_len = 64;
        let mut slow = a.clone();
        slow.timeout_s = Some(7200);
        let sub = Submission::new(
            "s",
            "20260101T000000.000Z".into(),
            "t".into(),
            &[a.clone(), slow.clone(), b.clone()],
            &opts(),
            None,
        )
        .unwrap();
        assert_eq!(sub.arrays.len(), 2);
        assert_eq!(sub.arrays[0].cases, vec![a, b]);
        assert_eq!(sub.arrays[1].cases, vec![slow]);
        assert_eq!(sub.cases().len(), 3);

        let paths = Paths::new(Path::new("/r/s %x"), &sub.stamp);
        assert_eq!(paths.suite_dir(), Path::new("/r/s %x"));
        let args = sbatch_args(
            &sub,
            &paths,
            0,
            Some("gpu"),
            Some(3),
            &["--qos=long".into(), "--time=9".into()],
        )
        .unwrap();
        assert!(args.contains(&"--array=0-1%3".to_string()), "{args:?}");
        assert!(
            args.contains(&"--output=/r/s %%x/slurm/20260101T000000.000Z/out/%A_%a.out".into()),
            "{args:?}"
        );
        // The user's arguments come last, so their --time wins over ours.
        let ours = args.iter().position(|a| a == "--time=6").unwrap();
        let theirs = args.iter().position(|a| a == "--time=9").unwrap();
        assert!(ours < theirs);
        assert!(args.contains(&"--partition=gpu".to_string()));
        let text = script(
            &sub,
            &paths,
            1,
            &["/opt/it's here/xtask".into(), "slurm-task".into()],
        );
        assert!(
            text.ends_with(
                "exec '/opt/it'\\''s here/xtask' slurm-task '/r/s %x/slurm/20260101T000000.000Z/submission.json' 1\n"
            ),
            "{text}"
        );
        assert_eq!(sub.env_id("node 1/a"), "env-20260101T000000.000Z-node_1_a");
    }
}
