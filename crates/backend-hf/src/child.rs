//! Runs one case's child process the way the orchestrator does (own process group, case file in
//! the environment, timeout that kills the whole group), for the backends' own tests and ad-hoc
//! runs. The orchestrator in xtask has its own, richer version; this one stays minimal.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bench_core::protocol::CASE_ENV;
use bench_core::{Backend, Case, RunContext};

/// What a child did.
#[derive(Debug)]
pub struct ChildOutput {
    /// `None` when it ran past the timeout and its process group was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub wall_s: f64,
}

/// Writes the case file, prepares, builds the backend's command and runs it with a timeout.
pub fn run_case(
    backend: &dyn Backend,
    case: &Case,
    ctx: &RunContext,
    timeout: Duration,
) -> Result<ChildOutput> {
    std::fs::create_dir_all(&ctx.work_dir)
        .with_context(|| format!("creating {}", ctx.work_dir.display()))?;
    std::fs::write(&ctx.case_file, serde_json::to_vec(case)?)
        .with_context(|| format!("writing {}", ctx.case_file.display()))?;
    backend.prepare(case, ctx)?;
    let mut cmd = backend.command(case, ctx)?;
    cmd.env(CASE_ENV, &ctx.case_file);
    run(cmd, timeout)
}

/// Runs `cmd` in its own process group; on timeout kills the group (every process the child
/// started, e.g. the deepspeed launcher's ranks) with SIGKILL.
pub fn run(mut cmd: Command, timeout: Duration) -> Result<ChildOutput> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let pgid = child.id() as i32;
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if start.elapsed() > timeout {
            // SAFETY: plain syscall on a process group we created.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Grandchildren left in the group would keep the pipes open: end them before reading.
    // SAFETY: as above; ESRCH when the group is already gone is fine.
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
    Ok(ChildOutput {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
        wall_s: start.elapsed().as_secs_f64(),
    })
}
