//! The cost model section of report.md: every case with a prediction (the native planner's for
//! `auto` cases, the runner's own for the others when a machine profile was at hand) with its
//! predicted and measured total throughput and the error; the median absolute error; and each
//! `auto` case beside the best hand-placed case of the same model, shape and framework.

use std::fmt::Write as _;

use bench_core::Record;

use crate::fields::{md_escape, num};

/// The median |predicted - measured| / measured over `recs` with a prediction.
pub fn median_abs_error(recs: &[Record]) -> Option<f64> {
    let errors: Vec<f64> = recs
        .iter()
        .filter_map(|r| r.metrics.as_ref()?.prediction_error)
        .map(f64::abs)
        .collect();
    bench_core::stats::median(&errors)
}

fn is_auto(r: &Record) -> bool {
    r.case.case.auto.is_some()
}

pub fn section(recs: &[Record]) -> String {
    let with: Vec<&Record> = recs
        .iter()
        .filter(|r| {
            r.metrics
                .as_ref()
                .is_some_and(|m| m.predicted_total_throughput.is_some())
        })
        .collect();
    if with.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    let _ = writeln!(s, "## Cost model\n");
    let _ = writeln!(
        s,
        "Predicted total throughput (the native engine's cost model on the machine profile the \
         case ran with) beside the measured one; error = predicted / measured - 1.\n"
    );
    let _ = writeln!(
        s,
        "| model | placement | batch | predicted tok/s | measured tok/s | error |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for r in &with {
        let c = &r.case.case;
        let m = r.metrics.as_ref().expect("filtered");
        let _ = writeln!(
            s,
            "| {} | {} | {}x{} | {} | {} | {:+.1}% |",
            c.model,
            md_escape(&c.placement_label()),
            c.gpu_batch_size,
            c.num_gpu_batches,
            num(m.predicted_total_throughput.unwrap_or(0.0)),
            num(m.total_throughput),
            m.prediction_error.unwrap_or(0.0) * 100.0
        );
    }
    if let Some(e) = median_abs_error(recs) {
        let _ = writeln!(
            s,
            "\nMedian |error| over {} case(s): {:.1}%.",
            with.len(),
            e * 100.0
        );
    }
    // auto against the best hand policy of the same model, shape and framework
    for a in recs.iter().filter(|r| is_auto(r) && r.metrics.is_some()) {
        let ac = &a.case.case;
        let best = recs
            .iter()
            .filter(|r| !is_auto(r))
            .filter(|r| {
                let c = &r.case.case;
                c.model == ac.model
                    && c.framework == ac.framework
                    && c.prompt_len == ac.prompt_len
                    && c.gen_len == ac.gen_len
                    && c.device == ac.device
            })
            .filter_map(|r| Some((r, r.metrics.as_ref()?.total_throughput)))
            .max_by(|x, y| x.1.total_cmp(&y.1));
        let at = a.metrics.as_ref().expect("filtered").total_throughput;
        match best {
            Some((b, bt)) => {
                let _ = writeln!(
                    s,
                    "\n`auto` ({}, {}x{}) measured {} token/s, the best hand policy ({}, {}x{}) {}: ratio {:.3}.",
                    md_escape(&ac.placement_label()),
                    ac.gpu_batch_size,
                    ac.num_gpu_batches,
                    num(at),
                    md_escape(&b.case.case.placement_label()),
                    b.case.case.gpu_batch_size,
                    b.case.case.num_gpu_batches,
                    num(bt),
                    at / bt
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "\n`auto` ({}) measured {} token/s; no hand policy to compare.",
                    md_escape(&ac.placement_label()),
                    num(at)
                );
            }
        }
    }
    s.push('\n');
    s
}
