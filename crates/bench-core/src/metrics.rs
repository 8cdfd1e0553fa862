//! Metrics from raw per-step times, with FlexLLMGen's definitions. The only place they are computed:
//! every backend reports raw step times and gets the same arithmetic.
//!
//! - prefill latency = step 0; decode latency = the sum of the other steps;
//! - batch = gpu_batch_size x num_gpu_batches;
//! - prefill throughput = batch x prompt_len / prefill; decode throughput = batch x (gen_len - 1) / decode;
//! - total throughput = batch x gen_len / (prefill + decode), the headline figure;
//! - projection when fewer steps than gen_len were measured (`cut_gen_len`): decode = the sum of the
//!   first 2 decode steps + mean(the remaining measured decode steps) x (gen_len - 1 - 2); it needs
//!   at least 4 measured steps.
//!
//! With several repetitions each gets its own metrics; the headline values are their medians, and
//! the coefficient of variation (sample standard deviation / mean) of the total throughput says how
//! much they agreed.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::case::Case;
use crate::model;
use crate::protocol::RawResult;

/// Decode steps FlexLLMGen always counts as measured before averaging the rest.
const WARM_DECODE_STEPS: usize = 2;
/// Fewest measured steps (prefill included) the projection accepts.
pub const MIN_MEASURED_STEPS: usize = WARM_DECODE_STEPS + 2;

/// Metrics of one repetition.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub prefill_latency_s: f64,
    pub decode_latency_s: f64,
    pub total_latency_s: f64,
    /// Tokens per second over the prompt.
    pub prefill_throughput: f64,
    /// Generated tokens per second after the first.
    pub decode_throughput: f64,
    /// Generated tokens per second, prefill included.
    pub total_throughput: f64,
}

/// Metrics of a case: the median over repetitions plus sizes and spread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub prefill_latency_s: f64,
    pub decode_latency_s: f64,
    pub total_latency_s: f64,
    pub prefill_throughput: f64,
    pub decode_throughput: f64,
    pub total_throughput: f64,
    /// Decode latency was projected from fewer steps than gen_len.
    pub projected: bool,
    /// fp16 weights, KV cache and hidden state for batch x (prompt_len + gen_len) tokens, as
    /// FlexLLMGen logs them; absent for models the registry does not know.
    pub model_bytes: Option<u64>,
    pub cache_bytes: Option<u64>,
    pub hidden_bytes: Option<u64>,
    /// Coefficient of variation of the total throughput over repetitions; absent with one.
    pub cv_total_throughput: Option<f64>,
    /// Each repetition's metrics, in the order run.
    pub repetitions: Vec<StepMetrics>,
}

/// Metrics of one repetition's step times. Returns them and whether decode was projected.
pub fn from_steps(case: &Case, steps: &[f64]) -> Result<(StepMetrics, bool)> {
    let gen_len = case.gen_len;
    let n = steps.len();
    if n == 0 {
        bail!("no step times");
    }
    if let Some(bad) = steps.iter().find(|t| !t.is_finite() || **t < 0.0) {
        bail!("step time {bad} is not a finite non-negative number of seconds");
    }
    if n > gen_len {
        bail!("{n} step times for gen_len {gen_len}");
    }
    let measured = case.measured_gen_len();
    if n != measured && n != gen_len {
        bail!("{n} step times, but the case runs {measured} steps (gen_len {gen_len}, cut_gen_len {:?})", case.cut_gen_len);
    }
    let prefill = steps[0];
    let decode_steps = &steps[1..];
    let projected = n < gen_len;
    let decode = if projected {
        if n < MIN_MEASURED_STEPS {
            bail!(
                "projecting decode latency needs at least {MIN_MEASURED_STEPS} measured steps, got {n}"
            );
        }
        let (warm, rest) = decode_steps.split_at(WARM_DECODE_STEPS);
        let mean_rest = rest.iter().sum::<f64>() / rest.len() as f64;
        warm.iter().sum::<f64>() + mean_rest * (gen_len - 1 - WARM_DECODE_STEPS) as f64
    } else {
        decode_steps.iter().sum()
    };
    let batch = case.batch_size() as f64;
    let total = prefill + decode;
    Ok((
        StepMetrics {
            prefill_latency_s: prefill,
            decode_latency_s: decode,
            total_latency_s: total,
            prefill_throughput: rate(batch * case.prompt_len as f64, prefill),
            decode_throughput: rate(batch * (gen_len - 1) as f64, decode),
            total_throughput: rate(batch * gen_len as f64, total),
        },
        projected,
    ))
}

/// Tokens per second; zero when nothing was timed (gen_len 1 has no decode), never NaN or infinity.
fn rate(tokens: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens / seconds
    } else {
        0.0
    }
}

/// Metrics of a case from its runner's raw result.
pub fn compute(case: &Case, raw: &RawResult) -> Result<Metrics> {
    if raw.step_times_s.is_empty() {
        bail!("the result has no repetitions (step_times_s is empty)");
    }
    let mut reps = Vec::new();
    let mut projected = false;
    for (i, steps) in raw.step_times_s.iter().enumerate() {
        let (m, p) = from_steps(case, steps).map_err(|e| anyhow::anyhow!("repetition {i}: {e}"))?;
        projected |= p;
        reps.push(m);
    }
    let med = |f: fn(&StepMetrics) -> f64| median(&reps.iter().map(f).collect::<Vec<_>>());
    let totals: Vec<f64> = reps.iter().map(|r| r.total_throughput).collect();
    let cfg = model::lookup(&case.model);
    let seq = case.prompt_len + case.gen_len;
    let batch = case.batch_size();
    Ok(Metrics {
        prefill_latency_s: med(|r| r.prefill_latency_s),
        decode_latency_s: med(|r| r.decode_latency_s),
        total_latency_s: med(|r| r.total_latency_s),
        prefill_throughput: med(|r| r.prefill_throughput),
        decode_throughput: med(|r| r.decode_throughput),
        total_throughput: med(|r| r.total_throughput),
        projected,
        model_bytes: cfg.as_ref().map(|c| c.model_bytes()),
        cache_bytes: cfg.as_ref().map(|c| c.cache_bytes(batch, seq)),
        hidden_bytes: cfg.as_ref().map(|c| c.hidden_bytes(batch, seq)),
        cv_total_throughput: coefficient_of_variation(&totals),
        repetitions: reps,
    })
}

/// The median; the mean of the middle two for an even count. `values` must not be empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Sample standard deviation over the mean; `None` for fewer than 2 values or a zero mean.
pub fn coefficient_of_variation(values: &[f64]) -> Option<f64> {
    let n = values.len();
    if n < 2 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if mean == 0.0 {
        return None;
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some(var.sqrt() / mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(gen_len: usize, cut: Option<usize>, gbs: usize, ngb: usize) -> Case {
        Case {
            model: "opt-tiny".into(),
            prompt_len: 100,
            gen_len,
            cut_gen_len: cut,
            gpu_batch_size: gbs,
            num_gpu_batches: ngb,
            ..Case::example("example")
        }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{a} != {b}");
    }

    #[test]
    fn full_length_formulas() {
        // batch 2 x 2 = 4, prompt 100, gen 5: prefill 2 s, decode 0.5 + 0.5 + 0.5 + 0.5 = 2 s.
        let c = case(5, None, 2, 2);
        let (m, projected) = from_steps(&c, &[2.0, 0.5, 0.5, 0.5, 0.5]).unwrap();
        assert!(!projected);
        close(m.prefill_latency_s, 2.0);
        close(m.decode_latency_s, 2.0);
        close(m.total_latency_s, 4.0);
        close(m.prefill_throughput, 4.0 * 100.0 / 2.0); // 200
        close(m.decode_throughput, 4.0 * 4.0 / 2.0); // 8
        close(m.total_throughput, 4.0 * 5.0 / 4.0); // 5
    }

    #[test]
    fn projection_formula() {
        // gen 32, cut 5: decode steps 0.4, 0.3 (warm), then 0.2, 0.1 measured, mean 0.15,
        // projected decode = 0.7 + 0.15 x (32 - 1 - 2) = 0.7 + 4.35 = 5.05.
        let c = case(32, Some(5), 8, 1);
        let (m, projected) = from_steps(&c, &[1.0, 0.4, 0.3, 0.2, 0.1]).unwrap();
        assert!(projected);
        close(m.decode_latency_s, 5.05);
        close(m.total_latency_s, 6.05);
        close(m.decode_throughput, 8.0 * 31.0 / 5.05);
        close(m.total_throughput, 8.0 * 32.0 / 6.05);
        close(m.prefill_throughput, 800.0);
    }

    #[test]
    fn projection_needs_four_steps() {
        let mut c = case(32, Some(5), 1, 1);
        // Three measured steps are refused even if the case (wrongly) asked for them.
        c.cut_gen_len = Some(3);
        let err = from_steps(&c, &[1.0, 0.1, 0.1]).unwrap_err().to_string();
        assert!(err.contains("at least 4"), "{err}");
        // A count that matches neither cut_gen_len nor gen_len is a runner bug.
        c.cut_gen_len = Some(5);
        let err = from_steps(&c, &[1.0, 0.1, 0.1, 0.1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("runs 5 steps"), "{err}");
        assert!(from_steps(&c, &[1.0; 33]).is_err());
        assert!(from_steps(&c, &[1.0, f64::NAN, 0.1, 0.1, 0.1]).is_err());
    }

    #[test]
    fn gen_len_one_has_no_decode() {
        let c = case(1, None, 3, 1);
        let (m, _) = from_steps(&c, &[0.5]).unwrap();
        close(m.decode_latency_s, 0.0);
        close(m.decode_throughput, 0.0);
        close(m.total_throughput, 3.0 / 0.5);
    }

    #[test]
    fn repetitions_median_and_cv() {
        // Three repetitions of gen 4, batch 1: totals 4/2 = 2, 4/4 = 1, 4/1 = 4 tok/s.
        let c = case(4, None, 1, 1);
        let raw = RawResult {
            step_times_s: vec![
                vec![0.5, 0.5, 0.5, 0.5],
                vec![1.0, 1.0, 1.0, 1.0],
                vec![0.25, 0.25, 0.25, 0.25],
            ],
            ..Default::default()
        };
        let m = compute(&c, &raw).unwrap();
        close(m.total_throughput, 2.0);
        close(m.total_latency_s, 2.0);
        close(m.prefill_latency_s, 0.5);
        assert_eq!(m.repetitions.len(), 3);
        // mean 7/3, sample variance ((2-7/3)^2 + (1-7/3)^2 + (4-7/3)^2) / 2 = (1/9 + 16/9 + 25/9) / 2 = 7/3
        let cv = m.cv_total_throughput.unwrap();
        close(cv, (7.0f64 / 3.0).sqrt() / (7.0 / 3.0));
        // sizes: opt-tiny h=64, L=2, batch 1, 104 tokens
        assert_eq!(m.cache_bytes, Some(2 * 104 * 2 * 64 * 2));
        assert_eq!(m.hidden_bytes, Some(104 * 64 * 2));
        assert!(!m.projected);
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
        assert_eq!(coefficient_of_variation(&[5.0]), None);
    }

    #[test]
    fn empty_result_is_an_error() {
        let c = case(4, None, 1, 1);
        assert!(compute(&c, &RawResult::default()).is_err());
        let raw = RawResult {
            step_times_s: vec![vec![]],
            ..Default::default()
        };
        assert!(compute(&c, &raw)
            .unwrap_err()
            .to_string()
            .contains("repetition 0"));
    }
}
