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
//! the spread is told three ways: the coefficient of variation (sample standard deviation / mean)
//! of the total throughput, the 95% confidence interval of each throughput's mean (Student's t
//! with n - 1 degrees of freedom), and the repetitions whose total throughput is an outlier
//! (modified z-score > 3.5). Per-token latency: time to first token is the prefill latency;
//! the decode steps of every repetition, pooled, give p50/p90/p99 and the maximum (linear
//! interpolation between ranks). The formulas are in [`crate::stats`].

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::case::Case;
use crate::model;
use crate::protocol::RawResult;
use crate::stats;

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
    /// Time to first token: the (median) prefill latency.
    #[serde(default)]
    pub ttft_s: Option<f64>,
    /// 95% confidence interval [low, high] of the mean over repetitions (Student's t); absent
    /// with one repetition.
    #[serde(default)]
    pub prefill_throughput_ci95: Option<[f64; 2]>,
    #[serde(default)]
    pub decode_throughput_ci95: Option<[f64; 2]>,
    #[serde(default)]
    pub total_throughput_ci95: Option<[f64; 2]>,
    /// Percentiles of the measured decode steps, all repetitions pooled; absent without decode.
    #[serde(default)]
    pub decode_step_p50_s: Option<f64>,
    #[serde(default)]
    pub decode_step_p90_s: Option<f64>,
    #[serde(default)]
    pub decode_step_p99_s: Option<f64>,
    #[serde(default)]
    pub decode_step_max_s: Option<f64>,
    /// Indexes of repetitions whose total throughput is an outlier (modified z-score > 3.5).
    #[serde(default)]
    pub outlier_repetitions: Vec<usize>,
    /// For a projection check: the decode latency projected from the first steps beside the
    /// measured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection: Option<ProjectionCheck>,
    /// fp16 model size over this machine's RAM: over 1, the weights cannot all be in memory.
    #[serde(default)]
    pub model_ram_ratio: Option<f64>,
    /// With adaptive repetitions: what ended them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetitions_stop: Option<String>,
    /// The cost model's predicted total throughput (the resolution of `auto`, else the
    /// runner's own prediction), and its error against the measured one:
    /// (predicted - measured) / measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_total_throughput: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_error: Option<f64>,
}

/// How wrong FlexLLMGen's projection was on one full-length run (medians over repetitions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionCheck {
    /// The measured steps the projection used (as `cut_gen_len`).
    pub cut_gen_len: usize,
    pub projected_decode_latency_s: f64,
    pub measured_decode_latency_s: f64,
    /// projected / measured - 1.
    pub error: f64,
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
    let of = |f: fn(&StepMetrics) -> f64| reps.iter().map(f).collect::<Vec<_>>();
    let med = |f: fn(&StepMetrics) -> f64| median(&of(f));
    let totals = of(|r| r.total_throughput);
    let cfg = model::lookup(&case.model);
    let seq = case.prompt_len + case.gen_len;
    let batch = case.batch_size();
    let decode_steps: Vec<f64> = raw
        .step_times_s
        .iter()
        .flat_map(|s| s.iter().skip(1).copied())
        .collect();
    let pct = |q: f64| stats::percentile(&decode_steps, q);
    let projection = match case.check_projection_at {
        Some(cut) => Some(projection_check(case, raw, cut)?),
        None => None,
    };
    let predicted = case
        .auto
        .as_ref()
        .and_then(|a| a.resolved.as_ref()?.predicted)
        .or(raw.predicted)
        .map(|p| p.total_throughput);
    let total = med(|r| r.total_throughput);
    Ok(Metrics {
        predicted_total_throughput: predicted,
        prediction_error: predicted
            .filter(|_| total > 0.0)
            .map(|p| (p - total) / total),
        ttft_s: Some(med(|r| r.prefill_latency_s)),
        prefill_throughput_ci95: stats::ci95_of_mean(&of(|r| r.prefill_throughput)),
        decode_throughput_ci95: stats::ci95_of_mean(&of(|r| r.decode_throughput)),
        total_throughput_ci95: stats::ci95_of_mean(&totals),
        decode_step_p50_s: pct(50.0),
        decode_step_p90_s: pct(90.0),
        decode_step_p99_s: pct(99.0),
        decode_step_max_s: pct(100.0),
        outlier_repetitions: stats::outliers(&totals),
        projection,
        repetitions_stop: None,
        model_ram_ratio: cfg
            .as_ref()
            .zip(crate::env::ram_bytes())
            .map(|(c, ram)| c.model_bytes() as f64 / ram as f64),
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

/// The projection check of a full-length run: each repetition's decode latency projected from
/// its first `cut` steps, as a case with `cut_gen_len: cut` would, beside the one measured.
fn projection_check(case: &Case, raw: &RawResult, cut: usize) -> Result<ProjectionCheck> {
    let as_cut = Case {
        cut_gen_len: Some(cut),
        check_projection_at: None,
        memory: None,
        auto: None,
        ..case.clone()
    };
    let (mut projected, mut measured) = (Vec::new(), Vec::new());
    for steps in &raw.step_times_s {
        if steps.len() != case.gen_len {
            bail!(
                "a projection check runs the full gen_len {}, got {} steps",
                case.gen_len,
                steps.len()
            );
        }
        projected.push(from_steps(&as_cut, &steps[..cut])?.0.decode_latency_s);
        measured.push(from_steps(case, steps)?.0.decode_latency_s);
    }
    let (p, m) = (median(&projected), median(&measured));
    Ok(ProjectionCheck {
        cut_gen_len: cut,
        projected_decode_latency_s: p,
        measured_decode_latency_s: m,
        error: if m > 0.0 { p / m - 1.0 } else { 0.0 },
    })
}

/// The median; the mean of the middle two for an even count. `values` must not be empty.
pub fn median(values: &[f64]) -> f64 {
    stats::median(values).expect("the median of no values")
}

/// Sample standard deviation over the mean; `None` for fewer than 2 values or a zero mean.
pub fn coefficient_of_variation(values: &[f64]) -> Option<f64> {
    let (mean, var) = (stats::mean(values)?, stats::variance(values)?);
    (mean != 0.0).then(|| var.sqrt() / mean)
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

    #[test]
    fn spread_percentiles_and_outliers_of_a_hand_computed_run() {
        // batch 1, gen 4: decode steps 0.1 / 0.2 / 0.3 in every repetition; prefills 1.0, 1.1,
        // 0.9 and 1.05 s, and 21 s in the last (an outlier).
        let c = case(4, None, 1, 1);
        let prefills = [1.0, 1.1, 0.9, 1.05, 21.0];
        let raw = RawResult {
            step_times_s: prefills.iter().map(|&p| vec![p, 0.1, 0.2, 0.3]).collect(),
            ..Default::default()
        };
        let m = compute(&c, &raw).unwrap();
        assert_eq!(m.ttft_s, Some(1.05));
        assert_eq!(m.outlier_repetitions, vec![4]);
        let totals: Vec<f64> = prefills.iter().map(|p| 4.0 / (p + 0.6)).collect();
        let mean = totals.iter().sum::<f64>() / 5.0;
        let sd = (totals.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / 4.0).sqrt();
        let half = 2.776_445_105 * sd / 5f64.sqrt(); // t(0.975, 4)
        let [lo, hi] = m.total_throughput_ci95.unwrap();
        close(lo, mean - half);
        close(hi, mean + half);
        // 15 decode steps: five each of 0.1, 0.2, 0.3
        close(m.decode_step_p50_s.unwrap(), 0.2);
        close(m.decode_step_p90_s.unwrap(), 0.3);
        close(m.decode_step_max_s.unwrap(), 0.3);
        // type 7: h = 14 x 0.3 = 4.2 between the 5th and 6th sorted values (0.1, 0.2)
        close(
            stats::percentile(
                &[
                    0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3,
                ],
                30.0,
            )
            .unwrap(),
            0.1 + 0.2 * 0.1,
        );
        // one repetition: no interval
        let one = RawResult {
            step_times_s: vec![vec![1.0, 0.1, 0.2, 0.3]],
            ..Default::default()
        };
        let m1 = compute(&c, &one).unwrap();
        assert_eq!(m1.total_throughput_ci95, None);
        assert!(m1.outlier_repetitions.is_empty());
    }

    #[test]
    fn a_projection_check_compares_projected_with_measured_decode() {
        // gen 8, projected from the first 5 steps: decode steps 0.4, 0.3 (warm), 0.2, 0.2 then
        // 0.5, 0.5, 0.5 that the projection does not see.
        // projected = 0.7 + mean(0.2, 0.2) x (8 - 1 - 2) = 1.7; measured = 2.6.
        let mut c = case(8, None, 1, 1);
        c.check_projection_at = Some(5);
        let raw = RawResult {
            step_times_s: vec![vec![1.0, 0.4, 0.3, 0.2, 0.2, 0.5, 0.5, 0.5]],
            ..Default::default()
        };
        let p = compute(&c, &raw).unwrap().projection.unwrap();
        assert_eq!(p.cut_gen_len, 5);
        close(p.projected_decode_latency_s, 1.7);
        close(p.measured_decode_latency_s, 2.6);
        close(p.error, 1.7 / 2.6 - 1.0);
        let short = RawResult {
            step_times_s: vec![vec![1.0, 0.4, 0.3, 0.2, 0.2]],
            ..Default::default()
        };
        assert!(compute(&c, &short).is_err());
    }
}
