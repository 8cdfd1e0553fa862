//! TEST ONLY: a runner that misbehaves on purpose, for the orchestrator's tests. Not a benchmark.
//!
//! It speaks the child protocol (reads the case named by `FLEXBENCH_CASE`) and picks its behavior
//! from the case: with `weights: checkpoint("<behavior>")` the last path component is one of
//!   ok          print a valid result line for the case's step count, exit 0
//!   slow        sleep 300 ms, then as ok
//!   oom         print a CUDA out-of-memory message to stderr, exit 1
//!   oom3        exit 3 (the protocol's "runner detected OOM")
//!   hang        start a grandchild `sleep`, print its pid, sleep forever
//!   segv        die of SIGSEGV
//!   error       print a message to stderr, exit 1
//!   noresult    print log lines but no result line, exit 0
//!   badresult   print a result line with the wrong number of steps, exit 0
//!   unavailable print a reason to stderr, exit 4
//!   flood       print one 300 MB line to stdout, then as ok
//!   steady      as ok, with repetitions within 0.1% of each other
//!   until-MS    sleep until the wall clock reads MS milliseconds since the epoch, then as ok
//!               (cases that must end at the same moment)
//! and with dummy weights it behaves as `ok`.

use std::time::Duration;

use bench_core::protocol::{self, RawResult};
use bench_core::Weights;

fn main() {
    let case = match protocol::read_case_from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fake runner: {e:#}");
            std::process::exit(2);
        }
    };
    let behavior = match &case.weights {
        Weights::Checkpoint(p) => p
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("ok")
            .to_string(),
        Weights::Dummy => "ok".to_string(),
    };
    println!("fake runner: case {} behavior {behavior}", case.id());
    eprintln!("fake runner: loading (not really)");
    let steady = behavior == "steady";
    let ok = |steps: usize| {
        let reps = (0..case.repetitions)
            .map(|r| {
                // Prefill 40 ms, decode 10 ms per step; later repetitions a bit faster.
                let scale = if steady {
                    1.0 + 0.001 * (r % 2) as f64
                } else {
                    1.0 - 0.1 * r as f64
                };
                (0..steps)
                    .map(|i| if i == 0 { 0.04 * scale } else { 0.01 * scale })
                    .collect()
            })
            .collect();
        let raw = RawResult {
            step_times_s: reps,
            generated_tokens: (case.batch_size() * case.gen_len) as u64,
            versions: [(
                "fake-runner".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )]
            .into(),
            ..Default::default()
        };
        println!("{}", raw.to_line());
        println!("fake runner: done");
    };
    match behavior.as_str() {
        "ok" | "steady" => ok(case.measured_gen_len()),
        "slow" => {
            std::thread::sleep(Duration::from_millis(300));
            ok(case.measured_gen_len())
        }
        "oom" => {
            eprintln!("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB");
            std::process::exit(1);
        }
        "oom3" => {
            eprintln!("fake runner: pinned buffer too large for this host");
            std::process::exit(protocol::EXIT_OOM);
        }
        // Never waited for on purpose: the orchestrator must kill it with the group.
        #[allow(clippy::zombie_processes)]
        "hang" => {
            let child = std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("spawn sleep");
            println!("grandchild pid {}", child.id());
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        "segv" => {
            // Rust's own SIGSEGV handler would swallow a raised (not faulting) signal.
            // SAFETY: resetting a handler to default and raising a signal on ourselves.
            unsafe {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
            }
            unreachable!("SIGSEGV is fatal");
        }
        "error" => {
            eprintln!("fake runner: bad tensor shape [3, 5] for layer 7");
            std::process::exit(1);
        }
        "noresult" => println!("fake runner: forgot the result"),
        "badresult" => ok(2),
        until if until.starts_with("until-") => {
            let at: u64 = until["until-".len()..].parse().expect("until-<epoch ms>");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_millis() as u64;
            std::thread::sleep(Duration::from_millis(at.saturating_sub(now)));
            ok(case.measured_gen_len())
        }
        "flood" => {
            use std::io::Write;
            let chunk = vec![b'x'; 1 << 20];
            let mut out = std::io::stdout().lock();
            for _ in 0..300 {
                out.write_all(&chunk).expect("stdout");
            }
            out.write_all(b"\n").expect("stdout");
            drop(out);
            ok(case.measured_gen_len())
        }
        "unavailable" => {
            eprintln!("fake runner: the disk tier is not built yet");
            std::process::exit(protocol::EXIT_UNAVAILABLE);
        }
        other => {
            eprintln!("fake runner: unknown behavior `{other}`");
            std::process::exit(2);
        }
    }
}
