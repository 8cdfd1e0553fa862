//! `cargo xtask report`: report.md, report.csv and SVG plots from a suite's results.jsonl.
//!
//! Every case appears (its latest record); failures show as OOM / TIMEOUT / ..., never dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bench_core::record::Outcome;
use bench_core::{store, Case, Record};

use crate::agreement;
use crate::plot::{self, Chart, Series};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    cargo xtask report smoke\n  \
    cargo xtask report results/hf_ds --compare results-old/hf_ds")]
pub struct Args {
    /// Suite name (results in <results-root>/<name>), suite file path, or a results directory
    /// holding results.jsonl. The report files are written into that results directory.
    pub target: String,
    /// Another suite name or results directory: adds a speedup table (this / other total
    /// throughput), matched by case id.
    #[arg(long, value_name = "OTHER")]
    pub compare: Option<String>,
    /// Where suite names are looked up [default: results/ in the repository].
    #[arg(long, value_name = "DIR")]
    pub results_root: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let root = args
        .results_root
        .clone()
        .unwrap_or_else(crate::default_results_dir);
    let (dir, name) = results_dir(&root, &args.target)?;
    let recs = load(&dir)?;
    let other = match &args.compare {
        Some(o) => {
            let (odir, oname) = results_dir(&root, o)?;
            // The same suite from two runs: name them by directory instead.
            let oname = if oname == name {
                odir.display().to_string()
            } else {
                oname
            };
            Some((oname, load(&odir)?))
        }
        None => None,
    };
    let envs = environments(&dir, &recs);

    let md = markdown(
        &name,
        &recs,
        &envs,
        other.as_ref().map(|(n, r)| (n.as_str(), r.as_slice())),
    );
    write(&dir.join("report.md"), &md)?;
    write(&dir.join("report.csv"), &csv(&recs))?;
    let (tp, lt) = plots(&recs);
    write(&dir.join("throughput_vs_batch.svg"), &tp)?;
    write(&dir.join("latency_vs_throughput.svg"), &lt)?;
    for f in [
        "report.md",
        "report.csv",
        "throughput_vs_batch.svg",
        "latency_vs_throughput.svg",
    ] {
        println!("{}", dir.join(f).display());
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The results directory for a target and the suite name to show.
fn results_dir(root: &Path, target: &str) -> Result<(PathBuf, String)> {
    let p = Path::new(target);
    let dir = if p.is_dir() {
        p.to_path_buf()
    } else {
        let stem = if target.ends_with(".ron") {
            p.file_stem().and_then(|s| s.to_str()).unwrap_or(target)
        } else {
            target
        };
        root.join(stem)
    };
    if !dir.join(store::RESULTS_FILE).is_file() {
        let name = dir.file_name().and_then(|s| s.to_str()).unwrap_or(target);
        bail!(
            "no {} in {}; run `cargo xtask bench {name}` first, or give the results directory",
            store::RESULTS_FILE,
            dir.display()
        );
    }
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().and_then(|s| s.to_str()).map(String::from))
        .unwrap_or_else(|| target.to_string());
    Ok((dir, name))
}

/// The latest record of every case, in the order cases first appeared.
fn load(dir: &Path) -> Result<Vec<Record>> {
    let read = store::read(&dir.join(store::RESULTS_FILE))?;
    for w in &read.warnings {
        eprintln!("warning: {w}");
    }
    let mut order: Vec<String> = Vec::new();
    let mut latest: BTreeMap<String, Record> = BTreeMap::new();
    for r in read.records {
        if !latest.contains_key(&r.case.id) {
            order.push(r.case.id.clone());
        }
        latest.insert(r.case.id.clone(), r);
    }
    Ok(order
        .into_iter()
        .filter_map(|id| latest.remove(&id))
        .collect())
}

/// One line per environment the records reference.
fn environments(dir: &Path, recs: &[Record]) -> Vec<String> {
    let ids: BTreeSet<&str> = recs.iter().map(|r| r.env_id.as_str()).collect();
    ids.into_iter()
        .map(|id| {
            let text = std::fs::read_to_string(dir.join(format!("{id}.json"))).unwrap_or_default();
            match serde_json::from_str::<bench_core::env::Environment>(&text) {
                Ok(e) => format!(
                    "{id}: {} ({} cores), {} GiB RAM, GPUs: {}, offload dir on {}, git {}{}",
                    e.cpu_model.unwrap_or_else(|| "unknown CPU".into()),
                    e.cpu_cores.map_or("?".into(), |n| n.to_string()),
                    e.ram_bytes.map_or("?".into(), |b| format!(
                        "{:.0}",
                        b as f64 / (1u64 << 30) as f64
                    )),
                    if e.gpus.is_empty() {
                        "none".into()
                    } else {
                        e.gpus.join("; ")
                    },
                    e.offload_fs.unwrap_or_else(|| "?".into()),
                    e.git_commit
                        .as_deref()
                        .map_or("?", |c| &c[..c.len().min(10)]),
                    if e.git_dirty == Some(true) {
                        " (dirty)"
                    } else {
                        ""
                    },
                ),
                Err(_) => format!("{id}: (environment file missing)"),
            }
        })
        .collect()
}

/// A case column of the tables: its header and value.
type Column = (&'static str, fn(&Case) -> String);

const CASE_COLUMNS: &[Column] = &[
    ("model", |c| c.model.clone()),
    ("framework", |c| c.framework.clone()),
    ("device", |c| c.device.as_str().into()),
    ("placement", |c| c.placement.label()),
    ("prompt", |c| c.prompt_len.to_string()),
    ("gen", |c| c.gen_len.to_string()),
    ("cut", |c| {
        c.cut_gen_len.map_or("none".into(), |x| x.to_string())
    }),
    ("batch", |c| {
        format!("{}x{}", c.gpu_batch_size, c.num_gpu_batches)
    }),
    ("weights", |c| match &c.weights {
        bench_core::Weights::Dummy => "dummy".into(),
        bench_core::Weights::Checkpoint(p) => p.display().to_string(),
    }),
    ("reps", |c| c.repetitions.to_string()),
];

/// Columns whose value differs between cases, and the `name value` of those that do not.
fn split_columns(cases: &[&Case]) -> (Vec<Column>, Vec<String>) {
    let mut varying = Vec::new();
    let mut common = Vec::new();
    for &(name, f) in CASE_COLUMNS {
        let values: BTreeSet<String> = cases.iter().map(|c| f(c)).collect();
        if values.len() > 1 {
            varying.push((name, f));
        } else if let Some(v) = values.into_iter().next() {
            common.push(format!("{name} {v}"));
        }
    }
    (varying, common)
}

fn num(v: f64) -> String {
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

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

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

fn markdown(
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
    let _ = writeln!(
        s,
        "{} cases (latest record of each): {}.\n",
        recs.len(),
        counts.join(", ")
    );
    for e in envs {
        let _ = writeln!(s, "- environment {e}");
    }
    let cases: Vec<&Case> = recs.iter().map(|r| &r.case.case).collect();
    let (varying, common) = split_columns(&cases);
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

    let _ = writeln!(s, "## All cases\n");
    let mut header: Vec<&str> = vec!["id"];
    header.extend(varying.iter().map(|c| c.0));
    header.extend([
        "outcome",
        "total tok/s",
        "prefill tok/s",
        "decode tok/s",
        "prefill s",
        "decode s",
        "total s",
        "cv",
        "detail",
    ]);
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
    for r in recs {
        let mut cells = vec![format!("`{}`", r.case.id)];
        cells.extend(varying.iter().map(|(_, f)| md_escape(&f(&r.case.case))));
        cells.push(r.outcome.as_str().to_string());
        match &r.metrics {
            Some(m) => {
                let p = if m.projected { "*" } else { "" };
                cells.extend([
                    format!("{}{p}", num(m.total_throughput)),
                    num(m.prefill_throughput),
                    format!("{}{p}", num(m.decode_throughput)),
                    num(m.prefill_latency_s),
                    format!("{}{p}", num(m.decode_latency_s)),
                    format!("{}{p}", num(m.total_latency_s)),
                    m.cv_total_throughput
                        .map_or("-".into(), |cv| format!("{:.1}%", cv * 100.0)),
                ]);
            }
            None => cells.extend(std::iter::repeat_n("-".to_string(), 7)),
        }
        let detail: String = r
            .detail
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(120)
            .collect();
        cells.push(md_escape(&detail));
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }

    if let Some((other_name, other)) = compare {
        let _ = writeln!(s, "\n## Speedup over {other_name}\n");
        let _ = writeln!(s, "Total throughput here / there, matched by case id.\n");
        let theirs: BTreeMap<&str, &Record> =
            other.iter().map(|r| (r.case.id.as_str(), r)).collect();
        let mut header: Vec<&str> = vec!["id"];
        header.extend(varying.iter().map(|c| c.0));
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
            cells.extend(varying.iter().map(|(_, f)| md_escape(&f(&r.case.case))));
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

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv(recs: &[Record]) -> String {
    let header = [
        "id",
        "model",
        "framework",
        "device",
        "placement",
        "tier",
        "prompt_len",
        "gen_len",
        "cut_gen_len",
        "gpu_batch_size",
        "num_gpu_batches",
        "batch_size",
        "weights",
        "repetitions",
        "outcome",
        "prefill_latency_s",
        "decode_latency_s",
        "total_latency_s",
        "prefill_throughput",
        "decode_throughput",
        "total_throughput",
        "projected",
        "cv_total_throughput",
        "model_bytes",
        "cache_bytes",
        "hidden_bytes",
        "exit_code",
        "signal",
        "started_at",
        "duration_s",
        "env_id",
        "detail",
    ];
    let mut s = header.join(",") + "\n";
    let opt = |v: Option<String>| v.unwrap_or_default();
    for r in recs {
        let c = &r.case.case;
        let m = r.metrics.as_ref();
        let row = [
            r.case.id.clone(),
            c.model.clone(),
            c.framework.clone(),
            c.device.as_str().into(),
            c.placement.label(),
            c.placement.lowest_tier().as_str().into(),
            c.prompt_len.to_string(),
            c.gen_len.to_string(),
            opt(c.cut_gen_len.map(|x| x.to_string())),
            c.gpu_batch_size.to_string(),
            c.num_gpu_batches.to_string(),
            c.batch_size().to_string(),
            CASE_COLUMNS[8].1(c),
            c.repetitions.to_string(),
            r.outcome.as_str().into(),
            opt(m.map(|m| m.prefill_latency_s.to_string())),
            opt(m.map(|m| m.decode_latency_s.to_string())),
            opt(m.map(|m| m.total_latency_s.to_string())),
            opt(m.map(|m| m.prefill_throughput.to_string())),
            opt(m.map(|m| m.decode_throughput.to_string())),
            opt(m.map(|m| m.total_throughput.to_string())),
            opt(m.map(|m| m.projected.to_string())),
            opt(m.and_then(|m| m.cv_total_throughput).map(|x| x.to_string())),
            opt(m.and_then(|m| m.model_bytes).map(|x| x.to_string())),
            opt(m.and_then(|m| m.cache_bytes).map(|x| x.to_string())),
            opt(m.and_then(|m| m.hidden_bytes).map(|x| x.to_string())),
            opt(r.exit_code.map(|x| x.to_string())),
            opt(r.signal.clone()),
            r.started_at.clone(),
            r.duration_s.to_string(),
            r.env_id.clone(),
            r.detail.clone(),
        ];
        let fields: Vec<String> = row.iter().map(|f| csv_field(f)).collect();
        s.push_str(&fields.join(","));
        s.push('\n');
    }
    s
}

/// (throughput vs batch size, latency vs throughput) SVGs of the ok cases.
fn plots(recs: &[Record]) -> (String, String) {
    let ok: Vec<&Record> = recs.iter().filter(|r| r.metrics.is_some()).collect();
    let cases: Vec<&Case> = ok.iter().map(|r| &r.case.case).collect();
    let (varying, _) = split_columns(&cases);
    // A series is one framework + placement; other varying shape columns split it further so
    // that a line never joins different models or prompt lengths.
    let series_key = |c: &Case| {
        let mut parts = vec![c.framework.clone(), c.placement.label()];
        for (name, f) in &varying {
            if ["model", "prompt", "gen", "device"].contains(name) {
                parts.push(f(c));
            }
        }
        parts.join(" ")
    };
    let mut tp: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut lt: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in &ok {
        let c = &r.case.case;
        let m = r.metrics.as_ref().expect("filtered to ok");
        tp.entry(series_key(c))
            .or_default()
            .push((c.batch_size() as f64, m.total_throughput));
        lt.entry(series_key(c))
            .or_default()
            .push((m.total_throughput, m.total_latency_s));
    }
    let to_series = |m: BTreeMap<String, Vec<(f64, f64)>>| -> Vec<Series> {
        m.into_iter()
            .map(|(name, points)| Series { name, points })
            .collect()
    };
    (
        plot::render(
            &Chart {
                title: "Total throughput vs batch size",
                x_label: "batch size (gpu_batch_size x num_gpu_batches)",
                y_label: "total throughput (token/s)",
                lines: true,
            },
            &to_series(tp),
        ),
        plot::render(
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

#[cfg(test)]
mod tests {
    use super::*;
    use bench_core::metrics;
    use bench_core::record::{IdentifiedCase, SCHEMA};
    use bench_core::{Device, Placement, RawResult, Weights};

    fn rec(
        model: &str,
        fw: &str,
        placement: Placement,
        bs: usize,
        outcome: Outcome,
        step: f64,
    ) -> Record {
        let case = Case {
            model: model.into(),
            framework: fw.into(),
            prompt_len: 512,
            gen_len: 8,
            cut_gen_len: None,
            gpu_batch_size: bs,
            num_gpu_batches: 1,
            placement,
            device: Device::Cuda,
            weights: Weights::Dummy,
            num_nodes: 1,
            num_gpus_per_node: 1,
            warmup: 1,
            repetitions: 1,
            timeout_s: None,
        };
        let raw = RawResult {
            step_times_s: vec![vec![step; 8]],
            ..Default::default()
        };
        let metrics = (outcome == Outcome::Ok).then(|| metrics::compute(&case, &raw).unwrap());
        Record {
            schema: SCHEMA,
            case: IdentifiedCase::new(case),
            outcome,
            detail: if outcome == Outcome::Ok {
                String::new()
            } else {
                "went wrong, badly".into()
            },
            metrics,
            raw: None,
            exit_code: None,
            signal: None,
            started_at: "t".into(),
            finished_at: "t".into(),
            duration_s: 1.0,
            log: None,
            env_id: "env-x".into(),
        }
    }

    /// An ok (or failed) record whose runner reported `tokens`.
    fn with_tokens(mut r: Record, tokens: Option<Vec<Vec<u32>>>) -> Record {
        r.raw = Some(RawResult {
            step_times_s: vec![vec![0.5; 8]],
            tokens,
            ..Default::default()
        });
        r
    }

    #[test]
    fn agreement_compares_cases_that_differ_only_by_framework() {
        let same: Vec<Vec<u32>> = vec![(10..18).collect(), (20..28).collect()];
        // native parts from the others in sequence 1 at step 5 (3 tokens differ)
        let mut other = same.clone();
        other[1][5..].copy_from_slice(&[0, 0, 0]);
        let ok = |fw: &str, p: Placement, t: &Vec<Vec<u32>>| {
            with_tokens(rec("opt-125m", fw, p, 2, Outcome::Ok, 0.5), Some(t.clone()))
        };
        let mut hf_more_reps = ok("hf", Placement::Disk, &same);
        hf_more_reps.case = IdentifiedCase::new(Case {
            repetitions: 3,
            ..hf_more_reps.case.case.clone()
        });
        let recs = vec![
            ok("native", Placement::Gpu, &other),
            ok("hf", Placement::Gpu, &same),
            ok("deepspeed", Placement::Gpu, &same),
            rec(
                "opt-125m",
                "native",
                Placement::Disk,
                2,
                Outcome::Unavailable,
                0.5,
            ),
            // repetitions do not change tokens: still the same case as deepspeed disk
            hf_more_reps,
            ok("deepspeed", Placement::Disk, &same),
            // an ok run without tokens, and a case no other framework ran (batch 4)
            with_tokens(
                rec("opt-125m", "hf", Placement::Cpu, 2, Outcome::Ok, 0.5),
                None,
            ),
            ok("deepspeed", Placement::Cpu, &same),
            with_tokens(
                rec("opt-125m", "hf", Placement::Gpu, 4, Outcome::Ok, 0.5),
                Some(vec![vec![1; 8]; 4]),
            ),
        ];
        let md = markdown("x", &recs, &[], None);
        let sec = md
            .split("## Token agreement")
            .nth(1)
            .and_then(|t| t.split("## All cases").next())
            .unwrap_or_else(|| panic!("no agreement section: {md}"));
        assert!(
            sec.contains(
                "- native vs hf: 13/16 tokens (81.2%), 1/2 sequences identical, over 1 case(s)"
            ),
            "{sec}"
        );
        assert!(
            sec.contains(
                "- hf vs deepspeed: 32/32 tokens (100.0%), 4/4 sequences identical, over 2 case(s)"
            ),
            "{sec}"
        );
        assert!(
            sec.contains("| opt-125m, cuda, prompt 512, gen 8, batch 2x1, gpu | native vs deepspeed | 13/16 (81.2%) | 1/2 | seq 1, step 5 |"),
            "{sec}"
        );
        assert!(
            sec.contains("| opt-125m, cuda, prompt 512, gen 8, batch 2x1, disk | hf vs deepspeed | 16/16 (100.0%) | 2/2 | - |"),
            "{sec}"
        );
        assert!(
            sec.contains("| opt-125m, cuda, prompt 512, gen 8, batch 2x1, disk | no tokens: native (unavailable) |"),
            "{sec}"
        );
        assert!(
            sec.contains("| no tokens: hf (ok, no tokens recorded) |"),
            "{sec}"
        );
        // batch 4 has no other framework: no group
        // 3 pair totals; table rows: 3 pairs in memory, 1 on disk, none on cpu
        assert_eq!(
            sec.lines().filter(|l| l.contains(" vs ")).count(),
            3 + 4,
            "{sec}"
        );
        assert!(!sec.contains("batch 4x1"), "{sec}");

        // no two cases differ only by framework: no section
        let md = markdown("x", &recs[..1], &[], None);
        assert!(!md.contains("Token agreement"), "{md}");
    }

    #[test]
    fn report_keeps_failures_and_only_varying_columns() {
        let recs = vec![
            rec("opt-6.7b", "hf", Placement::Gpu, 2, Outcome::Ok, 1.0),
            rec("opt-6.7b", "hf", Placement::Gpu, 4, Outcome::Ok, 0.5),
            rec("opt-30b", "hf", Placement::Cpu, 8, Outcome::Oom, 1.0),
            rec(
                "opt-30b",
                "deepspeed",
                Placement::Cpu,
                4,
                Outcome::Timeout,
                1.0,
            ),
        ];
        let md = markdown("x", &recs, &[], None);
        // bs 4 at 0.5 s/step: 4 x 8 / 4 s = 8 tok/s beats bs 2's 2 tok/s.
        assert!(md.contains("| hf gpu | 8.000 (bs 4, gpu) |  |"), "{md}");
        assert!(md.contains("| hf cpu |  | OOM (bs 8, cpu) |"), "{md}");
        assert!(
            md.contains("| deepspeed cpu |  | TIMEOUT (bs 4, cpu) |"),
            "{md}"
        );
        assert!(
            md.contains("Common to all cases: device cuda, prompt 512, gen 8"),
            "{md}"
        );
        let all = md.split("## All cases").nth(1).unwrap();
        assert!(
            all.contains("| id | model | framework | placement | batch | outcome"),
            "{md}"
        );
        assert_eq!(all.lines().filter(|l| l.starts_with("| `")).count(), 4);
        let csv = csv(&recs);
        assert_eq!(csv.lines().count(), 5);
        assert!(csv.contains("\"went wrong, badly\""));
        let cmp = markdown(
            "new",
            &recs[..2],
            &[],
            Some((
                "old",
                &[rec("opt-6.7b", "hf", Placement::Gpu, 2, Outcome::Ok, 2.0)],
            )),
        );
        assert!(cmp.contains("| 2.000 | 1.000 | 2.00x |"), "{cmp}");
        assert!(
            cmp.contains("1 cases matched; 1 only in new, 0 only in old"),
            "{cmp}"
        );
        let (tp, lt) = plots(&recs);
        assert_eq!(tp.matches("<polyline").count(), 1);
        assert!(lt.contains("hf gpu"));
    }
}
