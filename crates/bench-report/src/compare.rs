//! `report A --compare B`: each case of A against the same case (by id) of B. The ratio of
//! their mean total throughput over repetitions, with its 95% interval (delta method on the log
//! ratio, Welch's degrees of freedom), and a verdict by Welch's t-test at 5%; a regression gate
//! for CI on top. Before any verdict, what differs between the machines and software the two
//! ran on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use bench_core::env::Environment;
use bench_core::{stats, Record};

/// Significance level of the verdicts.
pub const ALPHA: f64 = 0.05;

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Faster,
    Slower,
    NoSignificantChange,
    /// Why no test was possible (a failed side, fewer than two repetitions, no spread).
    Undecided(String),
}

impl Verdict {
    pub fn label(&self) -> String {
        match self {
            Verdict::Faster => "faster".into(),
            Verdict::Slower => "slower".into(),
            Verdict::NoSignificantChange => "no significant change".into(),
            Verdict::Undecided(why) => why.clone(),
        }
    }
}

/// One matched case.
#[derive(Debug, Clone)]
pub struct Matched<'a> {
    pub ours: &'a Record,
    pub theirs: &'a Record,
    /// Mean total throughput here over there.
    pub ratio: Option<f64>,
    pub ci95: Option<[f64; 2]>,
    /// Welch's two-sided p-value.
    pub p: Option<f64>,
    pub verdict: Verdict,
}

impl Matched<'_> {
    /// How much slower this side is, in percent of the other's throughput (negative = faster).
    pub fn slower_by_pct(&self) -> Option<f64> {
        self.ratio.map(|r| (1.0 - r) * 100.0)
    }
}

fn totals(r: &Record) -> Option<Vec<f64>> {
    r.metrics
        .as_ref()
        .map(|m| m.repetitions.iter().map(|s| s.total_throughput).collect())
}

/// Every case of `ours` with a record in `theirs`, in `ours`' order.
pub fn matched<'a>(ours: &'a [Record], theirs: &'a [Record]) -> Vec<Matched<'a>> {
    let by_id: BTreeMap<&str, &Record> = theirs.iter().map(|r| (r.case.id.as_str(), r)).collect();
    ours.iter()
        .filter_map(|a| {
            let b = by_id.get(a.case.id.as_str())?;
            Some(judge(a, b))
        })
        .collect()
}

fn judge<'a>(a: &'a Record, b: &'a Record) -> Matched<'a> {
    let undecided = |why: String| Matched {
        ours: a,
        theirs: b,
        ratio: None,
        ci95: None,
        p: None,
        verdict: Verdict::Undecided(why),
    };
    let (Some(ta), Some(tb)) = (totals(a), totals(b)) else {
        return undecided(format!(
            "not comparable ({} here, {} there)",
            a.outcome, b.outcome
        ));
    };
    let ratio = match (stats::mean(&ta), stats::mean(&tb)) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    if ta.len() < 2 || tb.len() < 2 {
        return Matched {
            ratio,
            ..undecided(format!(
                "not enough repetitions ({} here, {} there; 2 each needed)",
                ta.len(),
                tb.len()
            ))
        };
    }
    let Some(w) = stats::welch(&ta, &tb) else {
        return Matched {
            ratio,
            ..undecided("no spread in either side's repetitions".into())
        };
    };
    let ci95 = stats::ratio_ci95(&ta, &tb).map(|(_, ci)| ci);
    let verdict = if w.p >= ALPHA {
        Verdict::NoSignificantChange
    } else if w.t > 0.0 {
        Verdict::Faster
    } else {
        Verdict::Slower
    };
    Matched {
        ours: a,
        theirs: b,
        ratio,
        ci95,
        p: Some(w.p),
        verdict,
    }
}

/// The matched cases that are significantly slower by more than `pct` percent.
pub fn regressions<'a>(matched: &'a [Matched<'a>], pct: f64) -> Vec<&'a Matched<'a>> {
    matched
        .iter()
        .filter(|m| m.verdict == Verdict::Slower && m.slower_by_pct().is_some_and(|s| s > pct))
        .collect()
}

/// The environments a run's records name, read from their files beside results.jsonl.
pub fn environments_of(dir: &Path, recs: &[Record]) -> Vec<Environment> {
    let ids: BTreeSet<&str> = recs.iter().map(|r| r.env_id.as_str()).collect();
    ids.into_iter()
        .filter_map(|id| {
            let text = std::fs::read_to_string(dir.join(format!("{id}.json"))).ok()?;
            serde_json::from_str(&text).ok()
        })
        .collect()
}

/// The environment fields that differ between two runs: `field: here vs there`. CPU, GPUs
/// (with their driver), kernel, commit, and every version either side recorded.
pub fn drift(ours: &[Environment], theirs: &[Environment]) -> Vec<String> {
    type Get = fn(&Environment) -> Vec<String>;
    let fields: [(&str, Get); 6] = [
        ("CPU", |e| e.cpu_model.clone().into_iter().collect()),
        ("GPUs and driver", |e| vec![e.gpus.join("; ")]),
        ("kernel", |e| e.kernel.clone().into_iter().collect()),
        ("git commit", |e| e.git_commit.clone().into_iter().collect()),
        ("uncommitted changes", |e| {
            e.git_dirty.map(|d| d.to_string()).into_iter().collect()
        }),
        ("rustc", |e| e.rustc.clone().into_iter().collect()),
    ];
    let values = |envs: &[Environment], get: Get| -> BTreeSet<String> {
        envs.iter().flat_map(get).collect()
    };
    let show = |s: &BTreeSet<String>| {
        if s.is_empty() {
            "unknown".to_string()
        } else {
            s.iter().cloned().collect::<Vec<_>>().join(" | ")
        }
    };
    let mut out = Vec::new();
    for (name, get) in fields {
        let (a, b) = (values(ours, get), values(theirs, get));
        if a != b {
            out.push(format!("{name}: {} vs {}", show(&a), show(&b)));
        }
    }
    let names: BTreeSet<&String> = ours
        .iter()
        .chain(theirs)
        .flat_map(|e| e.versions.keys())
        .collect();
    for n in names {
        let side = |envs: &[Environment]| -> BTreeSet<String> {
            envs.iter()
                .filter_map(|e| e.versions.get(n).cloned())
                .collect()
        };
        let (a, b) = (side(ours), side(theirs));
        if a != b {
            out.push(format!("{n}: {} vs {}", show(&a), show(&b)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_names_every_field_that_differs() {
        let env = |cpu: &str, commit: &str, torch: &str| Environment {
            cpu_model: Some(cpu.into()),
            git_commit: Some(commit.into()),
            gpus: vec!["NVIDIA H100, 81559 MiB, 580.1".into()],
            versions: [("torch".to_string(), torch.to_string())].into(),
            ..Default::default()
        };
        let a = [env("Xeon", "abc", "2.15.0")];
        assert!(drift(&a, &a).is_empty());
        let b = [env("EPYC", "abc", "2.16.0")];
        assert_eq!(
            drift(&a, &b),
            vec!["CPU: Xeon vs EPYC", "torch: 2.15.0 vs 2.16.0"]
        );
        let c = [Environment {
            gpus: vec![],
            ..env("Xeon", "def", "2.15.0")
        }];
        let d = drift(&a, &c);
        assert!(
            d.iter()
                .any(|l| l.starts_with("GPUs and driver: NVIDIA H100")),
            "{d:?}"
        );
        assert!(d.contains(&"git commit: abc vs def".to_string()), "{d:?}");
    }
}
