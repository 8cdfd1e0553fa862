//! The one table of fields every output reads: report.csv's columns, the markdown tables'
//! columns, and the values the plots draw. A field says where it shows and how its value reads;
//! adding a column to the reports is one line here.

use bench_core::{Case, Record, Weights};

/// A field's value in one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Num(f64),
    /// A figure that is projected when the flag is set (`*` in markdown).
    Projected(f64, bool),
    /// A share (CSV: the fraction; markdown: a percentage).
    Share(f64),
    /// No value (failed case, optional field unset).
    Empty,
}

/// Which part of a record a field describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// What the case is; markdown shows such a column only where cases differ.
    Case,
    /// What was measured; markdown's all-cases table always shows it.
    Measure,
    /// Bookkeeping of the run (times, exit codes); CSV only.
    Run,
}

pub struct Field {
    /// The report.csv column; `None` = not in the CSV.
    pub csv: Option<&'static str>,
    /// The markdown header; `None` = not in markdown tables.
    pub md: Option<&'static str>,
    pub role: Role,
    /// What markdown shows for [`Cell::Empty`].
    pub md_empty: &'static str,
    pub get: fn(&Record) -> Cell,
}

const fn case(
    csv: Option<&'static str>,
    md: Option<&'static str>,
    get: fn(&Record) -> Cell,
) -> Field {
    Field {
        csv,
        md,
        role: Role::Case,
        md_empty: "-",
        get,
    }
}

const fn measure(
    csv: Option<&'static str>,
    md: Option<&'static str>,
    get: fn(&Record) -> Cell,
) -> Field {
    Field {
        csv,
        md,
        role: Role::Measure,
        md_empty: "-",
        get,
    }
}

const fn run(csv: &'static str, get: fn(&Record) -> Cell) -> Field {
    Field {
        csv: Some(csv),
        md: None,
        role: Role::Run,
        md_empty: "-",
        get,
    }
}

fn text(s: impl Into<String>) -> Cell {
    Cell::Text(s.into())
}

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Cell) -> Cell {
    v.map_or(Cell::Empty, f)
}

fn c(r: &Record) -> &Case {
    &r.case.case
}

/// One bound of a 95% interval.
fn ci(r: &Record, which: fn(&bench_core::metrics::Metrics) -> Option<[f64; 2]>, i: usize) -> Cell {
    opt(r.metrics.as_ref().and_then(which), |b| Cell::Num(b[i]))
}

/// How the weights are named in tables: `dummy` or the checkpoint directory.
pub fn weights_label(c: &Case) -> String {
    match &c.weights {
        Weights::Dummy => "dummy".into(),
        Weights::Checkpoint(p) => p.display().to_string(),
    }
}

/// Every field, in CSV column order (markdown keeps this order too).
pub const FIELDS: &[Field] = &[
    case(Some("id"), None, |r| text(r.case.id.clone())),
    case(Some("model"), Some("model"), |r| text(c(r).model.clone())),
    case(Some("framework"), Some("framework"), |r| {
        text(c(r).framework.clone())
    }),
    case(Some("device"), Some("device"), |r| {
        text(c(r).device.as_str())
    }),
    case(Some("placement"), Some("placement"), |r| {
        text(c(r).placement_label())
    }),
    case(Some("tier"), None, |r| {
        text(c(r).placement.lowest_tier().as_str())
    }),
    case(Some("prompt_len"), Some("prompt"), |r| {
        Cell::Num(c(r).prompt_len as f64)
    }),
    case(Some("gen_len"), Some("gen"), |r| {
        Cell::Num(c(r).gen_len as f64)
    }),
    Field {
        md_empty: "none",
        ..case(Some("cut_gen_len"), Some("cut"), |r| {
            opt(c(r).cut_gen_len, |x| Cell::Num(x as f64))
        })
    },
    case(Some("gpu_batch_size"), None, |r| {
        Cell::Num(c(r).gpu_batch_size as f64)
    }),
    case(Some("num_gpu_batches"), None, |r| {
        Cell::Num(c(r).num_gpu_batches as f64)
    }),
    case(None, Some("batch"), |r| {
        text(format!("{}x{}", c(r).gpu_batch_size, c(r).num_gpu_batches))
    }),
    case(Some("batch_size"), None, |r| {
        Cell::Num(c(r).batch_size() as f64)
    }),
    case(Some("weights"), Some("weights"), |r| {
        text(weights_label(c(r)))
    }),
    case(Some("repetitions"), Some("reps"), |r| {
        Cell::Num(c(r).repetitions as f64)
    }),
    measure(Some("outcome"), Some("outcome"), |r| {
        text(r.outcome.as_str())
    }),
    measure(Some("total_throughput"), Some("total tok/s"), |r| {
        opt(r.metrics.as_ref(), |m| {
            Cell::Projected(m.total_throughput, m.projected)
        })
    }),
    measure(Some("prefill_throughput"), Some("prefill tok/s"), |r| {
        opt(r.metrics.as_ref(), |m| Cell::Num(m.prefill_throughput))
    }),
    measure(Some("decode_throughput"), Some("decode tok/s"), |r| {
        opt(r.metrics.as_ref(), |m| {
            Cell::Projected(m.decode_throughput, m.projected)
        })
    }),
    measure(Some("prefill_latency_s"), Some("prefill s"), |r| {
        opt(r.metrics.as_ref(), |m| Cell::Num(m.prefill_latency_s))
    }),
    measure(Some("decode_latency_s"), Some("decode s"), |r| {
        opt(r.metrics.as_ref(), |m| {
            Cell::Projected(m.decode_latency_s, m.projected)
        })
    }),
    measure(Some("total_latency_s"), Some("total s"), |r| {
        opt(r.metrics.as_ref(), |m| {
            Cell::Projected(m.total_latency_s, m.projected)
        })
    }),
    measure(Some("projected"), None, |r| {
        opt(r.metrics.as_ref(), |m| text(m.projected.to_string()))
    }),
    measure(Some("cv_total_throughput"), Some("cv"), |r| {
        opt(
            r.metrics.as_ref().and_then(|m| m.cv_total_throughput),
            Cell::Share,
        )
    }),
    measure(None, Some("total 95% CI"), |r| {
        opt(
            r.metrics.as_ref().and_then(|m| m.total_throughput_ci95),
            |[lo, hi]| text(format!("{}..{}", num(lo), num(hi))),
        )
    }),
    measure(Some("total_throughput_ci95_low"), None, |r| {
        ci(r, |m| m.total_throughput_ci95, 0)
    }),
    measure(Some("total_throughput_ci95_high"), None, |r| {
        ci(r, |m| m.total_throughput_ci95, 1)
    }),
    measure(Some("prefill_throughput_ci95_low"), None, |r| {
        ci(r, |m| m.prefill_throughput_ci95, 0)
    }),
    measure(Some("prefill_throughput_ci95_high"), None, |r| {
        ci(r, |m| m.prefill_throughput_ci95, 1)
    }),
    measure(Some("decode_throughput_ci95_low"), None, |r| {
        ci(r, |m| m.decode_throughput_ci95, 0)
    }),
    measure(Some("decode_throughput_ci95_high"), None, |r| {
        ci(r, |m| m.decode_throughput_ci95, 1)
    }),
    measure(Some("repetitions_run"), Some("runs"), |r| {
        opt(
            r.metrics.as_ref(),
            |m| Cell::Num(m.repetitions.len() as f64),
        )
    }),
    measure(Some("outlier_repetitions"), Some("outliers"), |r| {
        opt(
            r.metrics
                .as_ref()
                .filter(|m| !m.outlier_repetitions.is_empty()),
            |m| {
                text(
                    m.outlier_repetitions
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                )
            },
        )
    }),
    measure(Some("repetitions_stop"), None, |r| {
        opt(
            r.metrics.as_ref().and_then(|m| m.repetitions_stop.clone()),
            text,
        )
    }),
    measure(
        Some("predicted_total_throughput"),
        Some("predicted tok/s"),
        |r| {
            opt(
                r.metrics
                    .as_ref()
                    .and_then(|m| m.predicted_total_throughput),
                Cell::Num,
            )
        },
    ),
    measure(Some("prediction_error"), Some("pred. error"), |r| {
        opt(
            r.metrics.as_ref().and_then(|m| m.prediction_error),
            Cell::Share,
        )
    }),
    measure(Some("ttft_s"), Some("ttft s"), |r| {
        opt(r.metrics.as_ref().and_then(|m| m.ttft_s), Cell::Num)
    }),
    measure(Some("decode_step_p50_s"), Some("step p50 s"), |r| {
        opt(
            r.metrics.as_ref().and_then(|m| m.decode_step_p50_s),
            Cell::Num,
        )
    }),
    measure(Some("decode_step_p90_s"), None, |r| {
        opt(
            r.metrics.as_ref().and_then(|m| m.decode_step_p90_s),
            Cell::Num,
        )
    }),
    measure(Some("decode_step_p99_s"), Some("step p99 s"), |r| {
        opt(
            r.metrics.as_ref().and_then(|m| m.decode_step_p99_s),
            Cell::Num,
        )
    }),
    measure(Some("decode_step_max_s"), None, |r| {
        opt(
            r.metrics.as_ref().and_then(|m| m.decode_step_max_s),
            Cell::Num,
        )
    }),
    measure(Some("peak_host_rss_gib"), Some("peak RSS GiB"), |r| {
        opt(
            r.raw
                .as_ref()
                .and_then(|raw| raw.peak_memory_bytes.get("host_rss")),
            |b| Cell::Num(*b as f64 / (1u64 << 30) as f64),
        )
    }),
    measure(Some("disk_read_mb_per_token"), Some("disk MB/token"), |r| {
        opt(
            r.raw.as_ref().and_then(|raw| {
                let read = *raw.bytes_moved.get("disk_read")?;
                (raw.generated_tokens > 0).then(|| read as f64 / raw.generated_tokens as f64)
            }),
            |b| Cell::Num(b / 1e6),
        )
    }),
    measure(Some("model_ram_ratio"), None, |r| {
        opt(
            r.metrics.as_ref().and_then(|m| m.model_ram_ratio),
            Cell::Num,
        )
    }),
    measure(Some("projection_error"), None, |r| {
        opt(
            r.metrics.as_ref().and_then(|m| m.projection.as_ref()),
            |p| Cell::Num(p.error),
        )
    }),
    measure(Some("model_bytes"), None, |r| {
        opt(r.metrics.as_ref().and_then(|m| m.model_bytes), |x| {
            Cell::Num(x as f64)
        })
    }),
    measure(Some("cache_bytes"), None, |r| {
        opt(r.metrics.as_ref().and_then(|m| m.cache_bytes), |x| {
            Cell::Num(x as f64)
        })
    }),
    measure(Some("hidden_bytes"), None, |r| {
        opt(r.metrics.as_ref().and_then(|m| m.hidden_bytes), |x| {
            Cell::Num(x as f64)
        })
    }),
    run("exit_code", |r| opt(r.exit_code, |x| Cell::Num(x as f64))),
    run("signal", |r| opt(r.signal.clone(), text)),
    run("started_at", |r| text(r.started_at.clone())),
    run("duration_s", |r| Cell::Num(r.duration_s)),
    run("env_id", |r| text(r.env_id.clone())),
    run("job", |r| {
        opt(r.job.as_ref(), |j| {
            text(format!("{} {}_{}", j.scheduler, j.job_id, j.array_index))
        })
    }),
    run("node", |r| {
        opt(r.job.as_ref().and_then(|j| j.node.clone()), text)
    }),
    Field {
        md_empty: "",
        ..measure(Some("detail"), Some("detail"), |r| {
            // One line of it in tables; report.csv keeps it whole.
            text(r.detail.clone())
        })
    },
];

/// The field with this CSV name.
pub fn field(csv: &str) -> &'static Field {
    FIELDS
        .iter()
        .find(|f| f.csv == Some(csv))
        .unwrap_or_else(|| panic!("no field `{csv}` in FIELDS"))
}

impl Field {
    /// The value as a number, for plots (`None` when empty or text).
    pub fn num(&self, r: &Record) -> Option<f64> {
        match (self.get)(r) {
            Cell::Num(v) | Cell::Projected(v, _) | Cell::Share(v) => Some(v),
            Cell::Text(_) | Cell::Empty => None,
        }
    }

    /// The value as report.csv writes it (numbers in full precision).
    pub fn csv_value(&self, r: &Record) -> String {
        match (self.get)(r) {
            Cell::Text(s) => s,
            Cell::Num(v) | Cell::Projected(v, _) | Cell::Share(v) => v.to_string(),
            Cell::Empty => String::new(),
        }
    }

    /// The value as markdown tables show it: rounded numbers, `*` on projected figures,
    /// percentages, the first line of long text (at most 120 characters), `|` escaped.
    pub fn md_value(&self, r: &Record) -> String {
        let s = match (self.get)(r) {
            Cell::Text(s) if self.role == Role::Measure => {
                s.lines().next().unwrap_or("").chars().take(120).collect()
            }
            Cell::Text(s) => s,
            Cell::Num(v) if self.role == Role::Case => v.to_string(),
            Cell::Num(v) => num(v),
            Cell::Projected(v, p) => format!("{}{}", num(v), if p { "*" } else { "" }),
            Cell::Share(v) => format!("{:.1}%", v * 100.0),
            Cell::Empty => self.md_empty.to_string(),
        };
        md_escape(&s)
    }
}

/// A number rounded for reading: one decimal from 100, three digits below, scientific below 0.1.
pub fn num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 0.1 {
        format!("{v:.3}")
    } else {
        format!("{v:.3e}")
    }
}

pub fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The markdown case fields whose value differs between records, and `header value` of those
/// that do not.
pub fn split_case_fields(recs: &[&Record]) -> (Vec<&'static Field>, Vec<String>) {
    let mut varying = Vec::new();
    let mut common = Vec::new();
    for f in FIELDS.iter().filter(|f| f.role == Role::Case) {
        let Some(header) = f.md else { continue };
        let values: std::collections::BTreeSet<String> =
            recs.iter().map(|r| f.md_value(r)).collect();
        if values.len() > 1 {
            varying.push(f);
        } else if let Some(v) = values.into_iter().next() {
            common.push(format!("{header} {v}"));
        }
    }
    (varying, common)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_shows_somewhere_and_csv_names_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for f in FIELDS {
            assert!(f.csv.is_some() || f.md.is_some());
            if let Some(n) = f.csv {
                assert!(seen.insert(n), "{n} twice");
            }
        }
        assert_eq!(field("batch_size").csv, Some("batch_size"));
    }
}
