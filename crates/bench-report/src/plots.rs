//! The report's SVG plots of the ok cases: total throughput against batch size, and latency
//! against throughput, one series per framework and placement. Their values are fields of
//! [`crate::fields`].

use std::collections::BTreeMap;

use bench_core::Record;

use crate::fields::{field, split_case_fields};
use crate::svg::{self, Chart, Series};

/// Case fields that split a series further, so a line never joins different models or shapes.
const SERIES_SPLITS: &[&str] = &["model", "prompt", "gen", "device"];

/// (throughput vs batch size, latency vs throughput) SVGs of the ok cases.
pub fn plots(recs: &[Record]) -> (String, String) {
    let ok: Vec<&Record> = recs.iter().filter(|r| r.metrics.is_some()).collect();
    let (varying, _) = split_case_fields(&ok);
    let series_key = |r: &Record| {
        let mut parts = vec![
            field("framework").md_value(r),
            field("placement").md_value(r),
        ];
        for f in &varying {
            if f.md.is_some_and(|h| SERIES_SPLITS.contains(&h)) {
                parts.push(f.md_value(r));
            }
        }
        parts.join(" ")
    };
    let point = |r: &Record, x: &str, y: &str| field(x).num(r).zip(field(y).num(r));
    let mut tp: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut lt: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in &ok {
        if let Some(p) = point(r, "batch_size", "total_throughput") {
            tp.entry(series_key(r)).or_default().push(p);
        }
        if let Some(p) = point(r, "total_throughput", "total_latency_s") {
            lt.entry(series_key(r)).or_default().push(p);
        }
    }
    let to_series = |m: BTreeMap<String, Vec<(f64, f64)>>| -> Vec<Series> {
        m.into_iter()
            .map(|(name, points)| Series {
                name,
                points,
                dashed: false,
            })
            .collect()
    };
    (
        svg::render(
            &Chart {
                title: "Total throughput vs batch size",
                x_label: "batch size (gpu_batch_size x num_gpu_batches)",
                y_label: "total throughput (token/s)",
                lines: true,
            },
            &to_series(tp),
        ),
        svg::render(
            &Chart {
                title: "Latency vs throughput",
                x_label: "total throughput (token/s)",
                y_label: "total latency (s)",
                lines: false,
            },
            &to_series(lt),
        ),
    )
}

/// The per-step latencies of one ok case: each step's median over repetitions (step 0 is the
/// prefill), and where decode was projected the steps the projection assumes, dashed at the
/// mean it uses. `None` without step times.
pub fn step_plot(r: &Record) -> Option<String> {
    let steps = &r.raw.as_ref()?.step_times_s;
    r.metrics.as_ref()?;
    let len = steps.iter().map(Vec::len).min()?;
    if len == 0 {
        return None;
    }
    let median_of = |i: usize| {
        bench_core::stats::median(&steps.iter().map(|s| s[i]).collect::<Vec<_>>())
            .unwrap_or(f64::NAN)
    };
    let measured: Vec<(f64, f64)> = (0..len).map(|i| (i as f64, median_of(i))).collect();
    let c = &r.case.case;
    let mut series = vec![Series {
        name: format!("measured (median of {} repetitions)", steps.len()),
        points: measured.clone(),
        dashed: false,
    }];
    // The projection's mean: decode steps after the two warm ones (metrics::from_steps).
    if len < c.gen_len && len > 3 {
        let mean = measured[3..].iter().map(|p| p.1).sum::<f64>() / (len - 3) as f64;
        series.push(Series {
            name: format!("projected to step {}", c.gen_len - 1),
            points: vec![((len - 1) as f64, mean), ((c.gen_len - 1) as f64, mean)],
            dashed: true,
        });
    }
    let title = format!(
        "Per-step latency: {} {} {} p{} g{} bs{}",
        c.model,
        c.framework,
        c.placement.label(),
        c.prompt_len,
        c.gen_len,
        c.batch_size()
    );
    Some(svg::render(
        &Chart {
            title: &title,
            x_label: "step (0 = prefill)",
            y_label: "latency (s)",
            lines: true,
        },
        &series,
    ))
}
