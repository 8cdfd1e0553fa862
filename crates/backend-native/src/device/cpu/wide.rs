//! f32 copies of fp16 weights for the f32 mode's GEMMs (prefill), made on first use and kept,
//! within a process-wide budget.
//!
//! Every prefill product otherwise converts its weight from fp16 again: at OPT-125m, batch 4,
//! prompt 128 that was about 35 ms of a 330 ms prefill. Decode keeps reading the fp16 weights
//! (the matrix-vector path streams half the bytes), so the copy costs memory only, like the
//! bf16 mode's packed copies (OPT-125m: 308 -> 620 MiB peak RSS for 20 ms less per prefill).
//! The budget (`FLEXBENCH_F32_WEIGHT_CACHE_MIB`; default 1 GiB or a quarter of the memory
//! available at first use, whichever is less) keeps large models from doubling their footprint:
//! weights past it are converted per product as before. The values are the same either way
//! (fp16 to f32 is exact).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use half::f16;

/// An f32 copy of one weight; its bytes return to the budget when the last holder drops it.
#[derive(Debug)]
pub struct WideCopy(Vec<f32>);

impl Drop for WideCopy {
    fn drop(&mut self) {
        USED.fetch_sub(self.0.len() * 4, Ordering::Relaxed);
    }
}

/// The cell a tensor keeps its copy in: `None` inside when the budget was full.
pub type WideCell = OnceLock<Option<Arc<WideCopy>>>;

static USED: AtomicUsize = AtomicUsize::new(0);

fn limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        if let Some(mib) = std::env::var("FLEXBENCH_F32_WEIGHT_CACHE_MIB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            return mib << 20;
        }
        available_bytes().map_or(0, |b| (b / 4).min(1 << 30))
    })
}

/// MemAvailable from /proc/meminfo.
fn available_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

fn reserve(bytes: usize) -> bool {
    USED.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
        (u + bytes <= limit()).then_some(u + bytes)
    })
    .is_ok()
}

/// `w` as f32 from `cell`, converted on first use; None when the budget is spent.
pub fn get<'a>(cell: &'a WideCell, w: &[f16]) -> Option<&'a [f32]> {
    cell.get_or_init(|| reserve(w.len() * 4).then(|| Arc::new(WideCopy(super::convert::to_f32(w)))))
        .as_deref()
        .map(|c| c.0.as_slice())
}
