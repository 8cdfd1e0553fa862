//! report.md: the outcome counts and environments, the paper-style pivot (best throughput per
//! framework and placement x model), token agreement, every case with its measures, and the
//! speedup over another run. Columns come from [`crate::fields`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use bench_core::record::Outcome;
use bench_core::Record;

use crate::agreement;
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

pub fn markdown(
    name: &str,
    recs: &[Record],
    envs: &[String],
    compare: Option<(&str, &[Record])>,
) -> String {
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
            let row = format!("{} {}", c.framework, c.placement.label());
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
                                && format!("{} {}", c.framework, c.placement.label()) == *row
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

    if let Some((other_name, other)) = compare {
        let _ = writeln!(s, "\n## Speedup over {other_name}\n");
        let _ = writeln!(s, "Total throughput here / there, matched by case id.\n");
        let theirs: BTreeMap<&str, &Record> =
            other.iter().map(|r| (r.case.id.as_str(), r)).collect();
        let mut header: Vec<&str> = vec!["id"];
        header.extend(varying.iter().filter_map(|f| f.md));
        header.extend([name, other_name, "speedup"]);
        let _ = writeln!(s, "| {} |", header.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
        let show = |r: &Record| match &r.metrics {
            Some(m) => num(m.total_throughput),
            None => r.outcome.as_str().to_uppercase(),
        };
        let mut matched = 0;
        for r in recs {
            let Some(o) = theirs.get(r.case.id.as_str()) else {
                continue;
            };
            matched += 1;
            let speedup = match (&r.metrics, &o.metrics) {
                (Some(a), Some(b)) if b.total_throughput > 0.0 => {
                    format!("{:.2}x", a.total_throughput / b.total_throughput)
                }
                _ => "-".into(),
            };
            let mut cells = vec![format!("`{}`", r.case.id)];
            cells.extend(varying.iter().map(|f| f.md_value(r)));
            cells.extend([show(r), show(o), speedup]);
            let _ = writeln!(s, "| {} |", cells.join(" | "));
        }
        let ours: BTreeSet<&str> = recs.iter().map(|r| r.case.id.as_str()).collect();
        let _ = writeln!(
            s,
            "\n{matched} cases matched; {} only in {name}, {} only in {other_name}.",
            recs.len() - matched,
            other
                .iter()
                .filter(|r| !ours.contains(r.case.id.as_str()))
                .count()
        );
    }
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
