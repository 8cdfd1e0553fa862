//! bench-report: what `cargo xtask report` writes from a suite's results.jsonl: report.md
//! ([`markdown`]), report.csv ([`csv`]) and SVG plots ([`plots`], drawn by [`svg`]), all reading
//! one table of fields ([`fields`]), plus the token agreement between frameworks ([`agreement`]),
//! the comparison with another run ([`compare`]: ratios, their intervals, verdicts, the
//! regression gate, environment drift), compressed cases beside uncompressed ones
//! ([`compression`]), and the cost model's predictions beside the measurements ([`prediction`]).
//!
//! Every case appears (its latest record); failures show as OOM / TIMEOUT / ..., never dropped.

pub mod agreement;
pub mod compare;
pub mod compression;
pub mod csv;
pub mod fields;
pub mod markdown;
pub mod plots;
pub mod prediction;
pub mod svg;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bench_core::{store, Record};

/// The files [`write_report`] writes into the results directory, besides one step plot per
/// ok case in [`STEPS_DIR`].
pub const OUTPUTS: [&str; 4] = [
    "report.md",
    "report.csv",
    "throughput_vs_batch.svg",
    "latency_vs_throughput.svg",
];
/// Where the per-case step plots go (`steps/<id>.svg`).
pub const STEPS_DIR: &str = "steps";

/// What [`write_report`] did.
#[derive(Debug)]
pub struct Written {
    pub files: Vec<PathBuf>,
    pub step_plots: usize,
    /// With a comparison and a gate: the cases significantly slower than the gate allows, as
    /// `id: speedup` lines.
    pub regressions: Vec<String>,
}

/// Writes every output for the results in `dir` (shown as `name`), with a comparison with
/// `compare` (a name and its results directory) when given; `gate_pct` lists the cases
/// significantly slower than the other run by more than that many percent.
pub fn write_report(
    dir: &Path,
    name: &str,
    compare: Option<(&str, &Path)>,
    gate_pct: Option<f64>,
) -> Result<Written> {
    let recs = load(dir)?;
    let other_recs = match compare {
        Some((_, odir)) => Some(load(odir)?),
        None => None,
    };
    let other = match (compare, &other_recs) {
        (Some((oname, odir)), Some(orecs)) => Some(markdown::Other {
            name: oname,
            recs: orecs,
            drift: compare::drift(
                &compare::environments_of(dir, &recs),
                &compare::environments_of(odir, orecs),
            ),
        }),
        _ => None,
    };
    let regressions = match (&other, gate_pct) {
        (Some(o), Some(pct)) => compare::regressions(&compare::matched(&recs, o.recs), pct)
            .iter()
            .map(|m| {
                format!(
                    "{} ({} {} {}): {:.2}x, {:.1}% slower (p = {:.3})",
                    m.ours.case.id,
                    m.ours.case.case.model,
                    m.ours.case.case.framework,
                    m.ours.case.case.placement.label(),
                    m.ratio.unwrap_or(f64::NAN),
                    m.slower_by_pct().unwrap_or(f64::NAN),
                    m.p.unwrap_or(f64::NAN)
                )
            })
            .collect(),
        _ => Vec::new(),
    };
    let envs = environments(dir, &recs);
    let md = markdown::markdown(name, &recs, &envs, other.as_ref());
    let (tp, lt) = plots::plots(&recs);
    let texts = [md, csv::csv(&recs), tp, lt];
    let mut files = Vec::new();
    for (file, text) in OUTPUTS.iter().zip(texts) {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        files.push(path);
    }
    let steps = dir.join(STEPS_DIR);
    let mut step_plots = 0;
    for r in &recs {
        if let Some(svg) = plots::step_plot(r) {
            std::fs::create_dir_all(&steps)
                .with_context(|| format!("creating {}", steps.display()))?;
            let path = steps.join(format!("{}.svg", r.case.id));
            std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
            step_plots += 1;
        }
    }
    Ok(Written {
        files,
        step_plots,
        regressions,
    })
}

/// The results directory for a target and the suite name to show.
pub fn results_dir(root: &Path, target: &str) -> Result<(PathBuf, String)> {
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
pub fn load(dir: &Path) -> Result<Vec<Record>> {
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
pub fn environments(dir: &Path, recs: &[Record]) -> Vec<String> {
    // A record Slurm's account wrote for a task that never ran anywhere names no environment.
    let ids: BTreeSet<&str> = recs
        .iter()
        .map(|r| r.env_id.as_str())
        .filter(|id| !id.is_empty())
        .collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csv::csv;
    use crate::markdown::markdown;
    use crate::plots::plots;
    use bench_core::metrics;
    use bench_core::record::{IdentifiedCase, Outcome, SCHEMA};
    use bench_core::{Case, Device, Placement, RawResult};

    #[test]
    fn the_cost_model_section_sets_predictions_beside_measurements() {
        use bench_core::auto::{Auto, Prediction, Resolution};
        let pol = |p: [u8; 6]| Placement::Policy(bench_core::Policy::new(p));
        let with_prediction = |mut r: Record, predicted: f64| {
            let m = r.metrics.as_mut().unwrap();
            m.predicted_total_throughput = Some(predicted);
            m.prediction_error = Some((predicted - m.total_throughput) / m.total_throughput);
            r
        };
        let hand = rec(
            "opt-1.3b",
            "native",
            pol([0, 0, 100, 0, 100, 0]),
            4,
            Outcome::Ok,
            0.5,
        );
        let t = hand.metrics.as_ref().unwrap().total_throughput;
        let hand = with_prediction(hand, t * 1.2);
        let mut auto = rec(
            "opt-1.3b",
            "native",
            pol([20, 0, 100, 0, 100, 0]),
            4,
            Outcome::Ok,
            0.4,
        );
        auto.case.case.auto = Some(Auto {
            placement: true,
            gpu_batch_size: false,
            resolved: Some(Resolution {
                by: "test".into(),
                profile: None,
                limits: Default::default(),
                planned_peak: None,
                predicted: Some(Prediction {
                    prefill_latency_s: 0.0,
                    decode_latency_s: 0.0,
                    total_throughput: 0.0,
                }),
            }),
        });
        let ta = auto.metrics.as_ref().unwrap().total_throughput;
        let auto = with_prediction(auto, ta * 0.9);
        let recs = vec![hand, auto];
        // |+20%| and |-10%|: the median of two is their mean
        let e = crate::prediction::median_abs_error(&recs).unwrap();
        assert!((e - 0.15).abs() < 1e-9, "{e}");
        let md = crate::prediction::section(&recs);
        assert!(md.contains("| auto: 20/0/100/0/100/0 | 4x1 |"), "{md}");
        assert!(md.contains("+20.0%") && md.contains("-10.0%"), "{md}");
        assert!(md.contains("Median |error| over 2 case(s): 15.0%"), "{md}");
        // auto ran faster steps than the hand policy: its ratio is over 1
        assert!(md.contains(&format!("ratio {:.3}", ta / t)), "{md}");
        assert!(crate::prediction::section(&recs[..0]).is_empty());
    }

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
            prompt_len: 512,
            gen_len: 8,
            gpu_batch_size: bs,
            placement,
            device: Device::Cuda,
            ..Case::example(fw)
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
            log_error: None,
            job: None,
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
    fn scheduler_outcomes_and_tasks_reach_the_counts_and_the_csv() {
        let mut lost = rec("opt-6.7b", "hf", Placement::Gpu, 2, Outcome::Lost, 1.0);
        lost.job = Some(bench_core::record::JobTask {
            scheduler: "slurm".into(),
            job_id: "77".into(),
            array_index: 3,
            restarts: 0,
            node: Some("gpu-n07".into()),
            state: Some("FAILED".into()),
            written_by: bench_core::record::WrittenBy::Scheduler,
            stopped_by_scheduler: false,
        });
        lost.env_id = String::new();
        let recs = vec![
            rec("opt-6.7b", "hf", Placement::Gpu, 4, Outcome::Ok, 0.5),
            rec("opt-30b", "hf", Placement::Cpu, 8, Outcome::NodeFail, 1.0),
            lost,
        ];
        let md = markdown("x", &recs, &[], None);
        assert!(
            md.contains("3 cases (latest record of each): 1 ok, 1 node_fail, 1 lost."),
            "{md}"
        );
        assert!(md.contains("| hf cpu |  | NODE_FAIL (bs 8, cpu) |"), "{md}");
        assert!(md.contains("| lost | - |"), "{md}");
        let csv = csv(&recs);
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let last: Vec<&str> = csv.lines().nth(3).unwrap().split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        assert_eq!(last[col("outcome")], "lost");
        assert_eq!(last[col("job")], "slurm 77_3");
        assert_eq!(last[col("node")], "gpu-n07");
        assert_eq!(environments(Path::new("/nonexistent"), &recs).len(), 1);
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
        let old = [rec("opt-6.7b", "hf", Placement::Gpu, 2, Outcome::Ok, 2.0)];
        let cmp = markdown(
            "new",
            &recs[..2],
            &[],
            Some(&markdown::Other {
                name: "old",
                recs: &old,
                drift: vec![],
            }),
        );
        assert!(cmp.contains("| 2.000 | 1.000 | 2.00x |"), "{cmp}");
        assert!(
            cmp.contains("1 cases matched (1 undecided); 1 only in new, 0 only in old"),
            "{cmp}"
        );
        assert!(
            cmp.contains("not enough repetitions (1 here, 1 there"),
            "{cmp}"
        );
        let (tp, lt) = plots(&recs);
        assert_eq!(tp.matches("<polyline").count(), 1);
        assert!(lt.contains("hf gpu"));
    }

    #[test]
    fn compressed_cases_sit_beside_their_twins() {
        use bench_core::Policy;
        let pol = |f: fn(&mut Policy)| {
            let mut p = Policy::new([0, 0, 100, 0, 100, 0]);
            f(&mut p);
            Placement::Policy(p)
        };
        let with_reads = |mut r: Record, read: u64| {
            let mut raw = RawResult {
                step_times_s: vec![vec![0.5; 8]],
                generated_tokens: 16,
                ..Default::default()
            };
            raw.bytes_moved.insert("disk_read".into(), read << 20);
            raw.peak_memory_bytes.insert("disk".into(), read << 20);
            r.raw = Some(raw);
            r
        };
        let recs = vec![
            with_reads(
                rec("opt-1.3b", "native", pol(|_| ()), 2, Outcome::Ok, 1.0),
                1600,
            ),
            with_reads(
                rec(
                    "opt-1.3b",
                    "native",
                    pol(|p| p.compress_weight = true),
                    2,
                    Outcome::Ok,
                    0.25,
                ),
                448,
            ),
            // a sparse case whose twin failed, and a variant without a twin
            rec(
                "opt-1.3b",
                "native",
                pol(|p| p.attn_sparsity = 0.5),
                4,
                Outcome::Ok,
                0.5,
            ),
            rec("opt-1.3b", "native", pol(|_| ()), 4, Outcome::Oom, 0.5),
            rec(
                "opt-6.7b",
                "native",
                pol(|p| p.compress_cache = true),
                2,
                Outcome::Ok,
                0.5,
            ),
        ];
        let md = markdown("x", &recs, &[], None);
        let sec = md
            .split("## Compression")
            .nth(1)
            .and_then(|t| t.split("## All cases").next())
            .unwrap_or_else(|| panic!("no compression section: {md}"));
        let row = |v: &str, model: &str| {
            sec.lines()
                .find(|l| l.contains(&format!("| {v} |")) && l.contains(model))
                .unwrap_or_else(|| panic!("no {v} row: {sec}"))
                .to_string()
        };
        let cw = row("+cw", "opt-1.3b");
        assert!(cw.contains("0/0/100/0/100/0 | +cw"), "{cw}");
        // 4x the decode rate, 0.28x the disk reads per token
        assert!(
            cw.contains("| 4.00x |")
                && cw.contains("100.00 → 28.00 MiB (0.28x)")
                && cw.contains("- / - / 1600 → - / - / 448"),
            "{cw}"
        );
        let sparse = row("+sparse0.5", "opt-1.3b");
        assert!(sparse.contains("OOM →"), "{sparse}");
        let cc = row("+cc", "opt-6.7b");
        assert!(cc.contains("- →") && cc.contains("| - |"), "{cc}");
        // no compression, no section
        assert!(!markdown("x", &recs[..1], &[], None).contains("## Compression"));
    }
}
