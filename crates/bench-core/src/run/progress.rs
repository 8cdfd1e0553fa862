//! What a run prints: a line per case with its outcome and the ETA of the rest, and the summary
//! with the exit code at the end.

use anyhow::Result;

use super::{Interrupted, Summary};
use crate::case::Case;
use crate::record::{Outcome, Record};

/// The columns of a progress line after the id.
pub fn describe(c: &Case) -> String {
    format!(
        "{} {} {} p{} g{} bs{}x{} {}",
        c.model,
        c.framework,
        c.device.as_str(),
        c.prompt_len,
        c.gen_len,
        c.gpu_batch_size,
        c.num_gpu_batches,
        c.placement_label()
    )
}

/// A progress line without the ETA: `[3/8] <id> <case>  ok 213.51 tok/s  1.9s`, and where a
/// scheduler ran it, `  (job 12_3 on n07)`.
pub fn line(done: usize, total: usize, r: &Record) -> String {
    let job = r
        .job
        .as_ref()
        .map(|j| {
            format!(
                "  (job {}_{}{})",
                j.job_id,
                j.array_index,
                j.node
                    .as_deref()
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default()
            )
        })
        .unwrap_or_default();
    format!(
        "[{done}/{total}] {} {}  {}{}  {}{job}",
        r.case.id,
        describe(&r.case.case),
        r.outcome,
        short_detail(r),
        human(r.duration_s)
    )
}

pub fn short_detail(r: &Record) -> String {
    match (&r.metrics, r.outcome) {
        (Some(m), _) => format!(
            " {:.2} tok/s{}",
            m.total_throughput,
            if m.projected { " (projected)" } else { "" }
        ),
        (None, Outcome::Ok) => String::new(),
        (None, _) => {
            let first = r.detail.lines().next().unwrap_or("");
            let cut: String = first.chars().take(100).collect();
            if cut.is_empty() {
                String::new()
            } else {
                format!(" ({cut})")
            }
        }
    }
}

/// `42.0s`, `3m05s`, `2h10m`.
pub fn human(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{}h{:02}m", (s / 3600.0) as u64, (s % 3600.0 / 60.0) as u64)
    }
}

/// Prints the end of a run to stderr and gives the process exit code: 0 when nothing failed (or
/// the cases were submitted to run without us), 1 when a case failed ([`Outcome::is_failure`]),
/// 130 when interrupted, 2 when the run itself could not proceed.
pub fn finish(result: Result<Summary>) -> i32 {
    match result {
        Ok(s) => {
            let counts: Vec<String> = s.counts.iter().map(|(o, n)| format!("{n} {o}")).collect();
            let ran = if counts.is_empty() && s.detached.is_some() {
                "submitted, none ended yet".to_string()
            } else if counts.is_empty() {
                "nothing run".to_string()
            } else {
                counts.join(", ")
            };
            eprintln!(
                "{} case(s): {ran}; {} skipped. Results: {} (environment {})",
                s.total,
                s.skipped,
                s.results_path.display(),
                s.env_id
            );
            if let Some(note) = &s.detached {
                eprintln!("{note}");
            }
            if s.failed() > 0 {
                eprintln!(
                    "{} case(s) failed; see `detail` in results.jsonl and the logs beside it",
                    s.failed()
                );
                1
            } else {
                0
            }
        }
        Err(e) if e.is::<Interrupted>() => {
            eprintln!("{e}");
            130
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(42.04), "42.0s");
        assert_eq!(human(185.0), "3m05s");
        assert_eq!(human(7800.0), "2h10m");
    }
}
