//! How a runner's end becomes an outcome: exit codes, signals, the timeout, out-of-memory signs
//! and the result line, in that order of precedence ([`classify`]).

use std::time::Duration;

use crate::case::Case;
use crate::metrics::{self, Metrics};
use crate::protocol::{self, RawResult};
use crate::record::Outcome;

/// How a child process ended, as far as classification cares.
#[derive(Debug, Default)]
pub struct ProcessEnd {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// We killed it at the timeout.
    pub timed_out: bool,
    /// The kernel's OOM-kill counter of our cgroup went up while it ran; `None` if unreadable.
    pub oom_killed: Option<bool>,
    /// Some stderr line mentioned running out of memory.
    pub stderr_oom: bool,
    /// The first stderr line that said so (which allocation, how big), for the detail.
    pub oom_line: String,
    pub stderr_tail: String,
    /// The `FLEXBENCH_RESULT` lines it printed, joined.
    pub result_lines: String,
}

/// Decides the outcome of a finished process. Returns (outcome, detail, metrics, raw).
pub fn classify(
    case: &Case,
    end: &ProcessEnd,
    timeout: Duration,
) -> (Outcome, String, Option<Metrics>, Option<RawResult>) {
    let tail = if end.stderr_tail.is_empty() {
        String::new()
    } else {
        format!("\nstderr tail:\n{}", end.stderr_tail)
    };
    let parsed = protocol::find_result(&end.result_lines);
    let raw = parsed.as_ref().ok().cloned().flatten();
    if end.timed_out {
        return (
            Outcome::Timeout,
            format!(
                "still running after {}s; its process group was killed{tail}",
                timeout.as_secs()
            ),
            None,
            raw,
        );
    }
    if end.exit_code == Some(0) {
        return match parsed {
            Ok(Some(raw)) => match metrics::compute(case, &raw) {
                Ok(m) => (Outcome::Ok, String::new(), Some(m), Some(raw)),
                Err(e) => (
                    Outcome::Error,
                    format!("the result line is unusable: {e:#}"),
                    None,
                    Some(raw),
                ),
            },
            Ok(None) => (
                Outcome::Error,
                format!(
                    "exited 0 without a {} line{tail}",
                    protocol::RESULT_PREFIX.trim()
                ),
                None,
                None,
            ),
            Err(e) => (Outcome::Error, format!("{e:#}{tail}"), None, None),
        };
    }
    if end.exit_code == Some(protocol::EXIT_OOM) {
        return (
            Outcome::Oom,
            format!("the runner reported out of memory (exit 3){tail}"),
            None,
            raw,
        );
    }
    if end.exit_code == Some(protocol::EXIT_UNAVAILABLE) {
        let reason = end.stderr_tail.lines().last().unwrap_or("").trim();
        let reason = if reason.is_empty() {
            "no reason given".to_string()
        } else {
            reason.to_string()
        };
        return (
            Outcome::Unavailable,
            format!("the runner cannot run this case here (exit 4): {reason}"),
            None,
            raw,
        );
    }
    if end.stderr_oom {
        let how = match (end.exit_code, end.signal) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => signal_name(s),
            _ => "unknown status".into(),
        };
        return (
            Outcome::Oom,
            if end.oom_line.is_empty() {
                format!("out of memory ({how}; stderr says so){tail}")
            } else {
                format!("out of memory ({how}): {}{tail}", end.oom_line.trim())
            },
            None,
            raw,
        );
    }
    if let Some(sig) = end.signal {
        if sig == libc::SIGKILL {
            match end.oom_killed {
                Some(true) => {
                    return (Outcome::Oom, format!("killed by the kernel's OOM killer (SIGKILL){tail}"), None, raw)
                }
                None => {
                    return (
                        Outcome::Oom,
                        format!("killed by SIGKILL from outside, most likely the kernel's OOM killer (its counter is not readable here){tail}"),
                        None,
                        raw,
                    )
                }
                Some(false) => {}
            }
        }
        return (
            Outcome::Crashed,
            format!("killed by {} (signal {sig}){tail}", signal_name(sig)),
            None,
            raw,
        );
    }
    let code = end
        .exit_code
        .map_or("unknown".to_string(), |c| c.to_string());
    (Outcome::Error, format!("exit code {code}{tail}"), None, raw)
}

/// Does this stderr line say the process ran out of memory (host or GPU, any framework)?
pub fn mentions_oom(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    l.contains("out of memory")
        || l.contains("outofmemoryerror")
        || l.contains("memory allocation failed")
        || l.contains("memory allocation of") // Rust's "memory allocation of N bytes failed"
        || l.contains("cannot allocate memory")
}

/// `SIGSEGV` for 11, etc.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case() -> Case {
        Case {
            model: "opt-tiny".into(),
            prompt_len: 4,
            gen_len: 4,
            gpu_batch_size: 1,
            ..Case::example("example")
        }
    }

    fn outcome(end: ProcessEnd) -> (Outcome, String) {
        let (o, d, _, _) = classify(&case(), &end, Duration::from_secs(7));
        (o, d)
    }

    // The kernel's OOM killer cannot be provoked in a test; these cover how its SIGKILL is read.
    #[test]
    fn sigkill_is_oom_only_when_the_kernel_says_so() {
        let killed = |oom_killed| ProcessEnd {
            signal: Some(libc::SIGKILL),
            oom_killed,
            ..Default::default()
        };
        let (o, d) = outcome(killed(Some(true)));
        assert_eq!(o, Outcome::Oom);
        assert!(d.contains("OOM killer"), "{d}");
        let (o, d) = outcome(killed(Some(false)));
        assert_eq!(o, Outcome::Crashed);
        assert!(d.contains("SIGKILL"), "{d}");
        let (o, d) = outcome(killed(None));
        assert_eq!(o, Outcome::Oom);
        assert!(d.contains("most likely"), "{d}");
    }

    #[test]
    fn precedence_of_the_signs() {
        // A timeout wins over whatever the killed process printed.
        let (o, d) = outcome(ProcessEnd {
            timed_out: true,
            signal: Some(libc::SIGKILL),
            stderr_oom: true,
            ..Default::default()
        });
        assert_eq!(o, Outcome::Timeout);
        assert!(d.contains("7s"), "{d}");
        // An abort after an out-of-memory message is an OOM, not a crash.
        let (o, _) = outcome(ProcessEnd {
            signal: Some(libc::SIGABRT),
            stderr_oom: true,
            ..Default::default()
        });
        assert_eq!(o, Outcome::Oom);
        // The line that said so leads the detail: which allocation, how big.
        let line = "RuntimeError: unable to mmap 25707023560 bytes from file </c/model.safetensors>: Cannot allocate memory (12)";
        let (o, d) = outcome(ProcessEnd {
            exit_code: Some(1),
            stderr_oom: true,
            oom_line: line.into(),
            ..Default::default()
        });
        assert_eq!(o, Outcome::Oom);
        assert_eq!(
            d.lines().next().unwrap(),
            format!("out of memory (exit 1): {line}")
        );
        let (o, d) = outcome(ProcessEnd {
            exit_code: Some(4),
            stderr_tail: "loading\nno CUDA device".into(),
            ..Default::default()
        });
        assert_eq!(o, Outcome::Unavailable);
        assert!(d.ends_with("no CUDA device"), "{d}");
        let raw = RawResult {
            step_times_s: vec![vec![1.0, 0.5, 0.5, 0.5]],
            ..Default::default()
        };
        let (o, _, m, _) = classify(
            &case(),
            &ProcessEnd {
                exit_code: Some(0),
                result_lines: raw.to_line(),
                ..Default::default()
            },
            Duration::from_secs(1),
        );
        assert_eq!(o, Outcome::Ok);
        assert_eq!(m.unwrap().total_throughput, 4.0 / 2.5);
        let (o, d) = outcome(ProcessEnd {
            exit_code: Some(0),
            result_lines: format!("{}\n{}", raw.to_line(), raw.to_line()),
            ..Default::default()
        });
        assert_eq!(o, Outcome::Error);
        assert!(d.contains("more than one"), "{d}");
    }

    #[test]
    fn oom_messages_of_the_frameworks() {
        for line in [
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB",
            "RuntimeError: [enforce fail at alloc_cpu.cpp:83] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes. Error code 12 (Cannot allocate memory)",
            "memory allocation of 1048576 bytes failed",
            "CUDA_ERROR_OUT_OF_MEMORY: out of memory",
        ] {
            assert!(mentions_oom(line), "{line}");
        }
        assert!(!mentions_oom("loaded 32 layers"));
        assert_eq!(signal_name(libc::SIGSEGV), "SIGSEGV");
        assert_eq!(signal_name(64), "signal 64");
    }
}
