//! Token agreement between frameworks: the report's check that the frameworks computed the same
//! thing. Cases that differ only by framework (same model, shapes, batch, placement, weights,
//! device) all read the same prompts and, with dummy weights, the same shared checkpoint, so their
//! greedy tokens should match; where they do not, numerics differ (dtype, kernels, reduction order)
//! or a framework is wrong.

use std::collections::BTreeMap;

use bench_core::{Case, Outcome, Record};

/// How two token records agree, position by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Agreement {
    /// Positions holding the same token in both.
    pub agree: usize,
    /// Positions compared: for every sequence, the longer of the two (a missing token disagrees).
    pub total: usize,
    /// Sequences equal from first to last token.
    pub identical_sequences: usize,
    /// Sequences compared (the larger of the two counts).
    pub sequences: usize,
    /// The earliest difference, (sequence, step), by step then sequence: greedy decoding makes
    /// everything after it diverge, so this says more than the count.
    pub first_difference: Option<(usize, usize)>,
}

impl Agreement {
    /// Adds another comparison's counts (for totals over cases); keeps no first difference.
    fn add(&mut self, other: &Agreement) {
        self.agree += other.agree;
        self.total += other.total;
        self.identical_sequences += other.identical_sequences;
        self.sequences += other.sequences;
    }
}

/// Compares two frameworks' generated tokens (one list per sequence).
pub fn compare(a: &[Vec<u32>], b: &[Vec<u32>]) -> Agreement {
    let empty: Vec<u32> = Vec::new();
    let mut out = Agreement {
        sequences: a.len().max(b.len()),
        ..Default::default()
    };
    for seq in 0..out.sequences {
        let x = a.get(seq).unwrap_or(&empty);
        let y = b.get(seq).unwrap_or(&empty);
        let len = x.len().max(y.len());
        out.total += len;
        let mut first = None;
        for step in 0..len {
            match (x.get(step), y.get(step)) {
                (Some(p), Some(q)) if p == q => out.agree += 1,
                _ => {
                    first.get_or_insert(step);
                }
            }
        }
        match first {
            None => out.identical_sequences += 1,
            Some(step) => {
                let earlier = out
                    .first_difference
                    .is_none_or(|(s0, st0)| (step, seq) < (st0, s0));
                if earlier {
                    out.first_difference = Some((seq, step));
                }
            }
        }
    }
    out
}

/// Cases that differ only by framework.
pub struct Group<'a> {
    /// The shared case fields, e.g. `opt-125m, cpu, prompt 128, gen 32, batch 4x1, gpu`.
    pub label: String,
    /// One record per framework, in the order frameworks first appear in the results.
    pub members: Vec<&'a Record>,
}

impl Group<'_> {
    /// Every pair of members that both have tokens, compared.
    pub fn comparisons(&self) -> Vec<(&str, &str, Agreement)> {
        let mut out = Vec::new();
        for (i, a) in self.members.iter().enumerate() {
            for b in &self.members[i + 1..] {
                if let (Some(ta), Some(tb)) = (tokens(a), tokens(b)) {
                    out.push((
                        a.case.case.framework.as_str(),
                        b.case.case.framework.as_str(),
                        compare(ta, tb),
                    ));
                }
            }
        }
        out
    }

    /// Members without tokens and why: their outcome, or that an ok run recorded none.
    pub fn without_tokens(&self) -> Vec<(&str, String)> {
        self.members
            .iter()
            .filter(|r| tokens(r).is_none())
            .map(|r| {
                let why = if r.outcome == Outcome::Ok {
                    "ok, no tokens recorded".to_string()
                } else {
                    r.outcome.as_str().to_string()
                };
                (r.case.case.framework.as_str(), why)
            })
            .collect()
    }
}

/// The tokens of an ok record, if its runner reported them.
fn tokens(r: &Record) -> Option<&[Vec<u32>]> {
    if r.outcome != Outcome::Ok {
        return None;
    }
    r.raw.as_ref()?.tokens.as_deref()
}

/// The case without what does not change the generated tokens (framework, warmup, repetitions,
/// timeout): equal keys = cases that differ only by framework.
fn key(c: &Case) -> String {
    let mut norm = c.clone();
    norm.framework = String::new();
    norm.warmup = 0;
    norm.repetitions = 1;
    norm.timeout_s = None;
    norm.id()
}

fn label(c: &Case) -> String {
    let mut parts = vec![c.model.clone(), c.device.as_str().to_string()];
    parts.push(format!("prompt {}", c.prompt_len));
    parts.push(format!("gen {}", c.gen_len));
    if let Some(cut) = c.cut_gen_len {
        parts.push(format!("cut {cut}"));
    }
    parts.push(format!("batch {}x{}", c.gpu_batch_size, c.num_gpu_batches));
    parts.push(c.placement.label());
    if let bench_core::Weights::Checkpoint(p) = &c.weights {
        parts.push(p.display().to_string());
    }
    if c.num_nodes * c.num_gpus_per_node > 1 {
        parts.push(format!("{}x{} ranks", c.num_nodes, c.num_gpus_per_node));
    }
    parts.join(", ")
}

/// Groups of at least two frameworks, in the order their first case appears in `recs`.
pub fn groups(recs: &[Record]) -> Vec<Group<'_>> {
    let mut order: Vec<String> = Vec::new();
    let mut by_key: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for r in recs {
        let k = key(&r.case.case);
        let members = by_key.entry(k.clone()).or_default();
        if members.is_empty() {
            order.push(k);
        }
        // One record per framework: the first (the report passes each case's latest record, and
        // two cases of one framework differ only in warmup or repetitions).
        if !members
            .iter()
            .any(|m| m.case.case.framework == r.case.case.framework)
        {
            members.push(r);
        }
    }
    order
        .into_iter()
        .filter_map(|k| {
            let members = by_key.remove(&k)?;
            (members.len() >= 2).then(|| Group {
                label: label(&members[0].case.case),
                members,
            })
        })
        .collect()
}

/// Agreement summed per framework pair over all groups, with the number of cases compared.
pub fn totals<'a>(groups: &'a [Group<'a>]) -> Vec<((&'a str, &'a str), Agreement, usize)> {
    let mut out: Vec<((&str, &str), Agreement, usize)> = Vec::new();
    for g in groups {
        for (a, b, agreement) in g.comparisons() {
            match out.iter_mut().find(|(p, _, _)| *p == (a, b)) {
                Some((_, sum, n)) => {
                    sum.add(&agreement);
                    *n += 1;
                }
                None => {
                    let mut sum = Agreement::default();
                    sum.add(&agreement);
                    out.push(((a, b), sum, 1));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_positions_sequences_and_the_earliest_difference() {
        let a = vec![vec![5, 6, 7, 8], vec![1, 2, 3, 4], vec![9, 9, 9, 9]];
        let b = vec![vec![5, 6, 7, 8], vec![1, 2, 0, 0], vec![9, 0, 9, 9]];
        let x = compare(&a, &b);
        assert_eq!(x.agree, 4 + 2 + 3);
        assert_eq!(x.total, 12);
        assert_eq!(x.identical_sequences, 1);
        assert_eq!(x.sequences, 3);
        // sequence 2 differs at step 1, before sequence 1's step 2
        assert_eq!(x.first_difference, Some((2, 1)));
        assert_eq!(compare(&a, &a).first_difference, None);
        assert_eq!(compare(&a, &a).agree, 12);
    }

    #[test]
    fn missing_tokens_and_sequences_count_as_disagreement() {
        let a = vec![vec![1, 2, 3], vec![4, 5]];
        let b = vec![vec![1, 2]];
        let x = compare(&a, &b);
        assert_eq!((x.agree, x.total), (2, 5));
        assert_eq!((x.identical_sequences, x.sequences), (0, 2));
        assert_eq!(x.first_difference, Some((1, 0)));
        assert_eq!(compare(&[], &[]), Agreement::default());
    }
}
