//! Optional time-per-op accounting of the CPU device (`FLEXBENCH_PROFILE=1`): where a run's time
//! goes, printed to stderr by the runner. Off by default; when off it costs one relaxed load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

pub const OPS: [&str; 9] = [
    "linear",
    "layer_norm",
    "attention",
    "append_kv",
    "add",
    "embed",
    "last_rows",
    "sample",
    "relu+bias",
];

static TOTALS: [AtomicU64; 9] = [const { AtomicU64::new(0) }; 9];
static COUNTS: [AtomicU64; 9] = [const { AtomicU64::new(0) }; 9];
static ON: OnceLock<AtomicBool> = OnceLock::new();

fn on() -> bool {
    ON.get_or_init(|| {
        AtomicBool::new(std::env::var_os("FLEXBENCH_PROFILE").is_some_and(|v| v != "0"))
    })
    .load(Ordering::Relaxed)
}

/// Times the closure under op `i` of [`OPS`] when profiling is on.
#[inline]
pub fn timed<R>(i: usize, f: impl FnOnce() -> R) -> R {
    if !on() {
        return f();
    }
    let t = Instant::now();
    let r = f();
    TOTALS[i].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    COUNTS[i].fetch_add(1, Ordering::Relaxed);
    r
}

/// The accumulated table, one line per op with time, or None when profiling is off.
pub fn report() -> Option<String> {
    if !on() {
        return None;
    }
    let mut s = String::from("cpu device time per op:\n");
    for (i, name) in OPS.iter().enumerate() {
        let ns = TOTALS[i].load(Ordering::Relaxed);
        let n = COUNTS[i].load(Ordering::Relaxed);
        if n > 0 {
            s.push_str(&format!(
                "  {name:10} {:9.3} s  {n:7} calls\n",
                ns as f64 / 1e9
            ));
        }
    }
    Some(s)
}
