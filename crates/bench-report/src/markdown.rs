//! report.md: the outcome counts and environments, the paper-style pivot (best throughput per
//! framework and placement x model), token agreement, every case with its measures, and the
//! speedup over another run. Columns come from [`crate::fields`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use bench_core::record::Outcome;
use bench_core::Record;

use crate::agreement;
use crate::compare::{self, Verdict};
use crate::fields::{md_escape, num, split_case_fields, Field, Role, FIELDS};

/// A cell of the pivot: the best ok case, else the failure of the first.
fn pivot_cell(cases: &[&Record]) -> String {
    let tag = |r: &Record| {
        format!(
            "bs {}, {}",
            r.case.case.batch_size(),
            r.case.case.placement.lowest_tier().as_str()
        )
    };
    let best = cases
        .iter()
        .filter_map(|r| r.metrics.as_ref().map(|m| (r, m)))
        .max_by(|a, b| a.1.total_throughput.total_cmp(&b.1.total_throughput));
    match best {
        Some((r, m)) => format!(
            "{}{} ({})",
            num(m.total_throughput),
            if m.projected { "*" } else { "" },
            tag(r)
        ),
        None => match cases.first() {
            Some(r) => format!("{} ({})", r.outcome.as_str().to_uppercase(), tag(r)),
            None => String::new(),
        },
    }
}

/// The run a report is compared with.
pub struct Other<'a> {
    pub name: &'a str,
    pub recs: &'a [Record],
    /// What differs between the two runs' environments ([`compare::drift`]).
    pub drift: Vec<String>,
}

pub fn markdown(name: &str, recs: &[Record], envs: &[String], compare: Option<&Other>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# flexbench report: {name}\n");
    let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
    for r in recs {
        *counts.entry(r.outcome).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(o, n)| format!("{n} {o}")).collect();
    if recs.is_empty() {
        let _ = writeln!(
            s,
            "No records yet: results.jsonl is empty. Run `cargo xtask bench {name}` first.\n"
        );
        return s;
    }
    let _ = writeln!(
        s,
        "{} cases (latest record of each): {}.\n",
        recs.len(),
        counts.join(", ")
    );
    for e in envs {
        let _ = writeln!(s, "- environment {e}");
    }
    let all: Vec<&Record> = recs.iter().collect();
    let (varying, common) = split_case_fields(&all);
    if !common.is_empty() {
        let _ = writeln!(s, "\nCommon to all cases: {}.", common.join(", "));
    }
    let _ = writeln!(
        s,
        "\nThroughput is FlexLLMGen's total throughput, batch x gen_len / (prefill + decode), in token/s; \
         `*` = decode latency projected from cut_gen_len steps. Cells: best ok case (batch size, lowest tier \
         holding weights or cache); a cell without an ok case shows its outcome.\n"
    );

    // The paper-style pivot, one table per (prompt, gen) shape.
    let mut shapes: BTreeMap<(usize, usize), Vec<&Record>> = BTreeMap::new();
    for r in recs {
        shapes
            .entry((r.case.case.prompt_len, r.case.case.gen_len))
            .or_default()
            .push(r);
    }
    for ((prompt, gen), group) in &shapes {
        let _ = writeln!(s, "## Throughput, prompt {prompt}, gen {gen}\n");
        let mut models: Vec<String> = Vec::new();
        let mut rows: Vec<String> = Vec::new();
        for r in group {
            let c = &r.case.case;
            if !models.contains(&c.model) {
                models.push(c.model.clone());
            }
            let row = format!("{} {}", c.framework, c.placement_label());
            if !rows.contains(&row) {
                rows.push(row);
            }
        }
        let _ = writeln!(s, "| framework, placement | {} |", models.join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(models.len()));
        for row in &rows {
            let cells: Vec<String> = models
                .iter()
                .map(|m| {
                    let in_cell: Vec<&Record> = group
                        .iter()
                        .copied()
                        .filter(|r| {
                            let c = &r.case.case;
                            &c.model == m
                                && format!("{} {}", c.framework, c.placement_label()) == *row
                        })
                        .collect();
                    pivot_cell(&in_cell)
                })
                .collect();
            let _ = writeln!(s, "| {} | {} |", md_escape(row), cells.join(" | "));
        }
        s.push('\n');
    }

    s.push_str(&agreement_section(recs));
    s.push_str(&crate::compression::section(recs));

    let _ = writeln!(s, "## All cases\n");
    let _ = writeln!(
        s,
        "Throughputs and latencies are medians over repetitions (`runs`). cv: standard deviation / \
         mean of the total throughput; total 95% CI: Student's t interval of its mean (none with one \
         repetition); outliers: repetitions whose total throughput has a modified z-score (MAD) over \
         3.5; ttft: time to first token (the prefill); step p50 / p99: decode step latencies of all \
         repetitions pooled (linear interpolation). report.csv has every field, p90 and max too.\n"
    );
    let measures: Vec<&Field> = FIELDS
        .iter()
        .filter(|f| f.role == Role::Measure && f.md.is_some())
        .collect();
    let mut header: Vec<&str> = vec!["id"];
    header.extend(varying.iter().chain(&measures).filter_map(|f| f.md));
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
    for r in recs {
        let mut cells = vec![format!("`{}`", r.case.id)];
        cells.extend(varying.iter().chain(&measures).map(|f| f.md_value(r)));
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }

    s.push_str(&projection_section(recs));
    s.push_str(&crate::prediction::section(recs));
    if let Some(other) = compare {
        s.push_str(&comparison_section(name, recs, &varying, other));
    }
    s
}

/// Projection checks: the decode latency FlexLLMGen's projection gives from a run's first
/// steps beside the one the same run measured over all of them, per placement.
fn projection_section(recs: &[Record]) -> String {
    let checks: Vec<(&Record, &bench_core::metrics::ProjectionCheck)> = recs
        .iter()
        .filter_map(|r| Some((r, r.metrics.as_ref()?.projection.as_ref()?)))
        .collect();
    if checks.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Projection error
"
    );
    let _ = writeln!(
        s,
        "Full-length runs that also project their decode latency from their first `cut` steps (the \
         sum of 2 warm steps + their mean x the rest, as for `cut_gen_len`); error = projected / \
         measured - 1, from the same run.\n"
    );
    let _ = writeln!(
        s,
        "| framework | device | placement | model | batch | prompt | gen | cut | projected decode s | measured decode s | error |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for (r, p) in checks {
        let c = &r.case.case;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:+.1}% |",
            c.framework,
            c.device.as_str(),
            md_escape(&c.placement_label()),
            c.model,
            c.batch_size(),
            c.prompt_len,
            c.gen_len,
            p.cut_gen_len,
            num(p.projected_decode_latency_s),
            num(p.measured_decode_latency_s),
            p.error * 100.0
        );
    }
    s.push('\n');
    s
}

fn comparison_section(name: &str, recs: &[Record], varying: &[&Field], other: &Other) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n## Compared with {}\n", other.name);
    if other.drift.is_empty() {
        let _ = writeln!(s, "Both ran on the same recorded machine and software.\n");
    } else {
        let _ = writeln!(
            s,
            "The two runs' environments differ, so part of any difference may be theirs:\n"
        );
        for d in &other.drift {
            let _ = writeln!(s, "- {}", md_escape(d));
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "Mean total throughput over repetitions, here / there, matched by case id; 95% CI of the \
         ratio by the delta method on its log (Welch's degrees of freedom); verdict by Welch's \
         t-test at {}%.\n",
        compare::ALPHA * 100.0
    );
    let mut header: Vec<&str> = vec!["id"];
    header.extend(varying.iter().filter_map(|f| f.md));
    header.extend([name, other.name, "speedup", "95% CI", "p", "verdict"]);
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
    let show = |r: &Record| match &r.metrics {
        Some(m) => num(bench_core::stats::mean(
            &m.repetitions
                .iter()
                .map(|x| x.total_throughput)
                .collect::<Vec<_>>(),
        )
        .unwrap_or(m.total_throughput)),
        None => r.outcome.as_str().to_uppercase(),
    };
    let matched = compare::matched(recs, other.recs);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in &matched {
        let mut cells = vec![format!("`{}`", m.ours.case.id)];
        cells.extend(varying.iter().map(|f| f.md_value(m.ours)));
        cells.extend([
            show(m.ours),
            show(m.theirs),
            m.ratio.map_or("-".into(), |r| format!("{r:.2}x")),
            m.ci95
                .map_or("-".into(), |[lo, hi]| format!("{lo:.2}x..{hi:.2}x")),
            m.p.map_or("-".into(), |p| format!("{p:.3}")),
            md_escape(&m.verdict.label()),
        ]);
        let _ = writeln!(s, "| {} |", cells.join(" | "));
        let key = match &m.verdict {
            Verdict::Undecided(_) => "undecided".to_string(),
            v => v.label(),
        };
        *counts.entry(key).or_default() += 1;
    }
    let ours: BTreeSet<&str> = recs.iter().map(|r| r.case.id.as_str()).collect();
    let counts: Vec<String> = counts.iter().map(|(v, n)| format!("{n} {v}")).collect();
    let _ = writeln!(
        s,
        "\n{} cases matched ({}); {} only in {name}, {} only in {}.",
        matched.len(),
        if counts.is_empty() {
            "none".to_string()
        } else {
            counts.join(", ")
        },
        recs.len() - matched.len(),
        other
            .recs
            .iter()
            .filter(|r| !ours.contains(r.case.id.as_str()))
            .count(),
        other.name
    );
    s
}

fn percent(n: usize, of: usize) -> String {
    if of == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * n as f64 / of as f64)
    }
}

/// The token-agreement section: for cases that differ only by framework, how often their greedy
/// tokens agree. Empty when no two cases differ only by framework.
fn agreement_section(recs: &[Record]) -> String {
    let groups = agreement::groups(recs);
    if groups.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    let _ = writeln!(s, "## Token agreement\n");
    let _ = writeln!(
        s,
        "Generated tokens (last repetition) of cases that differ only by framework, compared position by \
         position. Decoding is greedy, so after a first difference the rest of that sequence diverges: \
         `first difference` (sequence, step; step 0 = the prefill's token) says where the frameworks part.\n"
    );
    let totals = agreement::totals(&groups);
    for ((a, b), sum, cases) in &totals {
        let _ = writeln!(
            s,
            "- {a} vs {b}: {}/{} tokens ({}), {}/{} sequences identical, over {cases} case(s)",
            sum.agree,
            sum.total,
            percent(sum.agree, sum.total),
            sum.identical_sequences,
            sum.sequences
        );
    }
    if totals.is_empty() {
        let _ = writeln!(s, "- no two frameworks have tokens for the same case");
    }
    let _ = writeln!(
        s,
        "\n| case | pair | tokens agreeing | identical sequences | first difference |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for g in &groups {
        let label = md_escape(&g.label);
        for (a, b, x) in g.comparisons() {
            let first = x
                .first_difference
                .map_or("-".into(), |(seq, step)| format!("seq {seq}, step {step}"));
            let _ = writeln!(
                s,
                "| {label} | {a} vs {b} | {}/{} ({}) | {}/{} | {first} |",
                x.agree,
                x.total,
                percent(x.agree, x.total),
                x.identical_sequences,
                x.sequences
            );
        }
        let missing: Vec<String> = g
            .without_tokens()
            .into_iter()
            .map(|(fw, why)| format!("{fw} ({why})"))
            .collect();
        if !missing.is_empty() {
            let _ = writeln!(
                s,
                "| {label} | no tokens: {} | - | - | - |",
                md_escape(&missing.join(", "))
            );
        }
    }
    s.push('\n');
    s
}
