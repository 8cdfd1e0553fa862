//! The child-process supervisor: one way to run a runner, for the orchestrator and for the
//! backends' own tests alike.
//!
//! The child gets its own process group, so a launcher's workers (deepspeed's ranks) are reached
//! by one kill. Its output is read by two pump threads in bounded pieces and handed, in arrival
//! order, to the caller on the calling thread, so a runner printing one huge line never makes the
//! supervisor hold more than a few pieces. At the timeout, on an interrupt, and after a normal
//! exit (to end whatever the runner left behind holding the pipes) the whole group is killed.
//!
//! The group also dies with the supervisor when that is killed outright (`kill -9`, the OOM
//! killer): the runner asks the kernel for SIGKILL when its parent dies (`PR_SET_PDEATHSIG`,
//! checked right after it is set, for a parent that died first), and a small forked guard,
//! which has the same arrangement with a signal it can catch, kills the rest of the group
//! (a launcher's workers do not inherit the runner's death signal).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Longest piece of output handed over at once; a longer line arrives as several pieces.
pub const MAX_PIECE: usize = 8 << 20;
/// How long to wait for the output pipes to close after the child's group was killed.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the supervisor looks at the child when it prints nothing.
const POLL: Duration = Duration::from_millis(20);

/// Which pipe a piece came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A piece of output: a whole line with its newline, or (for lines over [`MAX_PIECE`], and the
/// last line of a stream without one) a part of it.
#[derive(Debug)]
pub struct Piece {
    pub stream: Stream,
    pub bytes: Vec<u8>,
}

impl Piece {
    /// The text without its line ending (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes)
            .trim_end_matches(['\n', '\r'])
            .to_string()
    }
}

/// How a supervised process ended.
#[derive(Debug)]
pub struct Ended {
    /// `None` when it was killed at the timeout or on an interrupt.
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub interrupted: bool,
    /// The kernel's OOM-kill counter of our cgroup went up while it ran; `None` if unreadable.
    pub oom_killed: Option<bool>,
    /// False when a process that left the group still held the pipes after the kill.
    pub drained: bool,
    pub wall: Duration,
}

/// The runner could not be started (missing binary, no permission): the case's problem, not the
/// run's, so callers can tell it from a failure of the supervisor itself.
#[derive(Debug)]
pub struct CannotStart(pub String);

impl std::fmt::Display for CannotStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for CannotStart {}

/// Starts `cmd` in its own process group with stdin closed and hands its output to `on_piece`
/// until it exits, `timeout` passes, or `stop()` says to stop (then the group is killed and the
/// result says `interrupted`). A command that cannot start is a [`CannotStart`] error.
pub fn supervise(
    cmd: &mut Command,
    timeout: Duration,
    stop: &dyn Fn() -> bool,
    mut on_piece: impl FnMut(Piece),
) -> Result<Ended> {
    let started = Instant::now();
    let oom_before = oom_kill_count();
    // SAFETY: getpid has no preconditions.
    let supervisor = unsafe { libc::getpid() };
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The supervisor may have died before the death signal was armed.
            if libc::getppid() != supervisor {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| CannotStart(format!("cannot start {:?}: {e}", cmd.get_program())))?;
    let pgid = child.id() as i32;
    let guard = GroupGuard::start(pgid, supervisor);
    super::interrupt::set_running_group(pgid);
    // Bounded: a child printing faster than we write waits for us instead of filling memory.
    let (tx, rx) = mpsc::sync_channel::<Piece>(4);
    let pumps = [
        pump(
            child.stdout.take().expect("stdout is piped"),
            Stream::Stdout,
            tx.clone(),
        ),
        pump(
            child.stderr.take().expect("stderr is piped"),
            Stream::Stderr,
            tx,
        ),
    ];

    // None: a timeout too long to represent is no timeout.
    let deadline = started.checked_add(timeout);
    let (mut timed_out, mut interrupted) = (false, false);
    loop {
        if let Ok(p) = rx.recv_timeout(POLL) {
            on_piece(p);
        }
        if exited_unreaped(pgid).context("waiting for the runner")? {
            break;
        }
        if stop() {
            interrupted = true;
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            break;
        }
    }
    // At the timeout this kills the runner; otherwise whatever it left behind in its group
    // (launcher workers, ...), which would keep the pipes open. The runner is not reaped yet,
    // so its pid, and with it the group id, cannot have been reused.
    kill_group(pgid);
    let status = child.wait().context("waiting for the runner");
    super::interrupt::set_running_group(0);
    drop(guard);
    let status = status?;
    let drain_until = Instant::now() + PIPE_DRAIN_TIMEOUT;
    let drained = loop {
        let left = drain_until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(p) => on_piece(p),
            Err(mpsc::RecvTimeoutError::Disconnected) => break true,
            Err(mpsc::RecvTimeoutError::Timeout) => break false,
        }
    };
    if drained {
        for p in pumps {
            let _ = p.join();
        }
    }
    let oom_after = oom_kill_count();
    Ok(Ended {
        status: (!timed_out && !interrupted).then_some(status),
        timed_out,
        interrupted,
        oom_killed: oom_before.zip(oom_after).map(|(a, b)| b > a),
        drained,
        wall: started.elapsed(),
    })
}

/// What [`capture`] collected.
#[derive(Debug)]
pub struct Captured {
    /// `None` when it ran past the timeout and its process group was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub wall_s: f64,
}

/// Runs `cmd` like the orchestrator does and keeps all of its output: for tests and ad-hoc runs
/// of one runner.
pub fn capture(mut cmd: Command, timeout: Duration) -> Result<Captured> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let ended = supervise(&mut cmd, timeout, &|| false, |p| match p.stream {
        Stream::Stdout => stdout.extend_from_slice(&p.bytes),
        Stream::Stderr => stderr.extend_from_slice(&p.bytes),
    })?;
    Ok(Captured {
        status: ended.status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        wall_s: ended.wall.as_secs_f64(),
    })
}

fn pump(
    pipe: impl Read + Send + 'static,
    stream: Stream,
    tx: mpsc::SyncSender<Piece>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::with_capacity(64 << 10, pipe);
        loop {
            let mut bytes = Vec::new();
            match (&mut reader)
                .take(MAX_PIECE as u64)
                .read_until(b'\n', &mut bytes)
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(Piece { stream, bytes }).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// Kills the process groups of live processes whose environment has `key=value`, and waits (a
/// few seconds at most) for them to go; returns their pids. The orchestrator names each case's
/// file in its runner's environment, so this finds a runner a killed orchestrator left behind
/// before a rerun reuses its work directory.
pub fn end_processes_with_env(key: &str, value: &str) -> Vec<i32> {
    let needle = format!("{key}={value}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) && alive(pid) {
            found.push(pid);
        }
    }
    for &pid in &found {
        // SAFETY: plain syscalls; a process gone in between gives ESRCH, which is fine.
        unsafe {
            let group = libc::getpgid(pid);
            if group > 0 {
                libc::killpg(group, libc::SIGKILL);
            }
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let until = Instant::now() + Duration::from_secs(5);
    while found.iter().any(|&p| alive(p)) && Instant::now() < until {
        std::thread::sleep(POLL);
    }
    found
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with(['Z', 'X'])
        })
        .unwrap_or(false)
}

/// A forked process that kills the runner's group if the supervisor dies first: the runner's
/// own death signal reaches only the runner, not the workers it started.
struct GroupGuard(Option<libc::pid_t>);

/// The signal the kernel sends the guard when the supervisor dies.
const GUARD_SIGNAL: libc::c_int = libc::SIGUSR1;

impl GroupGuard {
    fn start(pgid: i32, supervisor: libc::pid_t) -> GroupGuard {
        // SAFETY: after fork the child runs only async-signal-safe calls (signal masks, prctl,
        // getppid, sigwaitinfo, killpg, _exit) and never returns into Rust code.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, GUARD_SIGNAL);
            match libc::fork() {
                0 => {
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                    libc::prctl(libc::PR_SET_PDEATHSIG, GUARD_SIGNAL);
                    if libc::getppid() == supervisor {
                        // Returns on the death signal; the supervisor ends a guard with SIGKILL.
                        while libc::sigwaitinfo(&set, std::ptr::null_mut()) < 0 {}
                    }
                    libc::killpg(pgid, libc::SIGKILL);
                    libc::_exit(0);
                }
                -1 => GroupGuard(None), // no guard: the runner's own death signal still holds
                pid => GroupGuard(Some(pid)),
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: ending and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// Whether the child has exited, leaving it a zombie (WNOWAIT) so its pid stays reserved.
fn exited_unreaped(pid: i32) -> std::io::Result<bool> {
    // SAFETY: `info` is a zeroed out-parameter of the right type; waitid with WNOHANG | WNOWAIT
    // neither blocks nor reaps.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(info.si_pid() != 0)
    }
}

fn kill_group(pgid: i32) {
    // SAFETY: killpg has no memory-safety preconditions; ESRCH (group already gone) is fine.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

/// The kernel's count of OOM kills in this process's memory cgroup (v2 `memory.events` or v1
/// `memory.oom_control`), to tell an OOM kill from another SIGKILL.
fn oom_kill_count() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut candidates = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(
                std::path::Path::new("/sys/fs/cgroup")
                    .join(path)
                    .join("memory.events"),
            );
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(
                std::path::Path::new("/sys/fs/cgroup/memory")
                    .join(path)
                    .join("memory.oom_control"),
            );
        }
    }
    candidates.iter().find_map(|p| {
        let text = std::fs::read_to_string(p).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn captures_both_streams_and_the_exit_code() {
        let out = capture(
            sh("echo one; echo two >&2; printf tail; exit 3"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.status.unwrap().code(), Some(3));
        assert_eq!(out.stdout, "one\ntail");
        assert_eq!(out.stderr, "two\n");
    }

    #[test]
    fn timeout_kills_the_group_and_a_huge_timeout_is_no_timeout() {
        let out = capture(sh("sleep 30 & wait"), Duration::from_millis(200)).unwrap();
        assert!(out.status.is_none());
        assert!(out.wall_s < 10.0, "{}", out.wall_s);
        let out = capture(sh("exit 0"), Duration::from_secs(u64::MAX)).unwrap();
        assert!(out.status.unwrap().success());
    }

    #[test]
    fn long_lines_arrive_in_bounded_pieces() {
        let mut sizes = Vec::new();
        let n = MAX_PIECE * 2 + 10;
        let ended = supervise(
            &mut sh(&format!("head -c {n} /dev/zero | tr '\\0' x; echo")),
            Duration::from_secs(30),
            &|| false,
            |p| sizes.push(p.bytes.len()),
        )
        .unwrap();
        assert!(ended.status.unwrap().success());
        assert_eq!(sizes.iter().sum::<usize>(), n + 1);
        assert!(sizes.iter().all(|&s| s <= MAX_PIECE), "{sizes:?}");
    }

    #[test]
    fn a_missing_program_is_an_error_naming_it() {
        let e = capture(Command::new("/nonexistent/runner"), Duration::from_secs(1)).unwrap_err();
        assert!(e.is::<CannotStart>());
        assert!(format!("{e:#}").contains("/nonexistent/runner"), "{e:#}");
    }

    #[test]
    fn a_runner_left_behind_is_found_by_its_case_file_and_ended() {
        let marker = format!("/tmp/flexbench-stale-{}.json", std::process::id());
        let mut stale = Command::new("sh")
            .arg("-c")
            .arg("sleep 60 & wait")
            .env("FLEXBENCH_CASE", &marker)
            .process_group(0)
            .spawn()
            .unwrap();
        let needle = format!("FLEXBENCH_CASE={marker}");
        let with_marker = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter(|e| {
                    std::fs::read(e.path().join("environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
                })
                .count()
        };
        let until = Instant::now() + Duration::from_secs(10);
        while with_marker() < 2 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let ended = end_processes_with_env("FLEXBENCH_CASE", &marker);
        assert!(ended.contains(&(stale.id() as i32)), "{ended:?}");
        assert!(ended.len() >= 2, "the shell and its sleep: {ended:?}");
        let _ = stale.wait();
        assert!(end_processes_with_env("FLEXBENCH_CASE", &marker).is_empty());
    }
}
