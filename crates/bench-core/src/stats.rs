//! The statistics behind the numbers: centre and spread, Student's t (its CDF from the
//! regularized incomplete beta function, its quantiles by bisection on the CDF), the 95%
//! confidence interval of a mean, outliers by the modified z-score, percentiles, and Welch's
//! t-test. One implementation, used by the metrics, the adaptive repetitions and the report's
//! comparison alike.

/// The arithmetic mean; `None` when empty.
pub fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The sample variance (n - 1); `None` for fewer than two values.
pub fn variance(v: &[f64]) -> Option<f64> {
    let m = mean(v)?;
    (v.len() >= 2).then(|| v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64)
}

/// The median; the mean of the middle two for an even count. `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// The `q`-th percentile (0..=100) with linear interpolation between closest ranks (the
/// "type 7" definition numpy and R use by default). `None` when empty.
pub fn percentile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let h = (s.len() - 1) as f64 * (q / 100.0).clamp(0.0, 1.0);
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    Some(s[lo] + (h - lo as f64) * (s[hi] - s[lo]))
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9; about 15 significant digits).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection keeps the series in its accurate range.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let a = G[1..]
        .iter()
        .enumerate()
        .fold(G[0], |a, (i, g)| a + g / (x + 1.0 + i as f64));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized incomplete beta function I_x(a, b), by its continued fraction (modified
/// Lentz), using the symmetry that keeps the fraction converging fast.
fn inc_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - inc_beta(1.0 - x, b, a);
    }
    const TINY: f64 = 1e-300;
    let (mut c, mut d) = (1.0, 1.0 - (a + b) * x / (a + 1.0));
    d = 1.0 / if d.abs() < TINY { TINY } else { d };
    let mut f = d;
    for m in 1..300 {
        let m = m as f64;
        for num in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + num * d;
            d = 1.0 / if d.abs() < TINY { TINY } else { d };
            c = 1.0 + num / c;
            if c.abs() < TINY {
                c = TINY;
            }
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-15 {
            break;
        }
    }
    ln_front.exp() * f / a
}

/// P(T <= t) for Student's t with `df` degrees of freedom (df may be fractional, as Welch's).
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * inc_beta(df / (df + t * t), df / 2.0, 0.5);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The `p`-quantile of Student's t (0 < p < 1), by bisection on [`t_cdf`].
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if p == 0.5 {
        return 0.0;
    }
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    let (mut lo, mut hi) = (0.0, 1.0);
    while t_cdf(hi, df) < p {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-12 * hi.max(1.0) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// The 95% confidence interval of the mean of `v` (Student's t with n - 1 degrees of freedom):
/// mean ± t(0.975, n-1) · s / √n. `None` for fewer than two values.
pub fn ci95_of_mean(v: &[f64]) -> Option<[f64; 2]> {
    let (m, var) = (mean(v)?, variance(v)?);
    let n = v.len() as f64;
    let half = t_quantile(0.975, n - 1.0) * (var / n).sqrt();
    Some([m - half, m + half])
}

/// Iglewicz and Hoaglin's cut-off for the modified z-score.
pub const OUTLIER_Z: f64 = 3.5;

/// Indexes of the values whose modified z-score, 0.6745 · |x - median| / MAD, exceeds
/// [`OUTLIER_Z`]. With a zero MAD (most values equal) nothing is flagged: no spread to judge by.
pub fn outliers(v: &[f64]) -> Vec<usize> {
    let (Some(med), true) = (median(v), v.len() >= 3) else {
        return Vec::new();
    };
    let dev: Vec<f64> = v.iter().map(|x| (x - med).abs()).collect();
    let mad = median(&dev).unwrap_or(0.0);
    if mad == 0.0 {
        return Vec::new();
    }
    dev.iter()
        .enumerate()
        .filter(|(_, d)| 0.6745 * **d / mad > OUTLIER_Z)
        .map(|(i, _)| i)
        .collect()
}

/// Welch's unequal-variance t-test of the means of `a` and `b`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Welch {
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value.
    pub p: f64,
}

/// `None` when either sample has fewer than two values, or neither varies.
pub fn welch(a: &[f64], b: &[f64]) -> Option<Welch> {
    let (ma, mb) = (mean(a)?, mean(b)?);
    let (va, vb) = (variance(a)? / a.len() as f64, variance(b)? / b.len() as f64);
    let se2 = va + vb;
    if se2 == 0.0 {
        return None;
    }
    let t = (ma - mb) / se2.sqrt();
    let df = se2 * se2 / (va * va / (a.len() - 1) as f64 + vb * vb / (b.len() - 1) as f64);
    let p = 2.0 * (1.0 - t_cdf(t.abs(), df));
    Some(Welch { t, df, p })
}

/// The ratio of the means of `a` over `b` with its 95% confidence interval by the delta method
/// on the log ratio (Welch's degrees of freedom). `None` as for [`welch`], or with a mean ≤ 0.
pub fn ratio_ci95(a: &[f64], b: &[f64]) -> Option<(f64, [f64; 2])> {
    let (ma, mb) = (mean(a)?, mean(b)?);
    if ma <= 0.0 || mb <= 0.0 {
        return None;
    }
    let w = welch(a, b)?;
    let la = variance(a)? / (a.len() as f64 * ma * ma);
    let lb = variance(b)? / (b.len() as f64 * mb * mb);
    let half = t_quantile(0.975, w.df) * (la + lb).sqrt();
    let r = ma / mb;
    Some((r, [r * (-half).exp(), r * half.exp()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} != {b} (±{tol})");
    }

    #[test]
    fn t_quantiles_match_the_tables() {
        // Two-sided 95% critical values from standard tables.
        for (df, t) in [
            (1.0, 12.706_204_736),
            (2.0, 4.302_652_730),
            (3.0, 3.182_446_305),
            (5.0, 2.570_581_836),
            (10.0, 2.228_138_852),
            (30.0, 2.042_272_456),
            (1e6, 1.959_966_0),
        ] {
            close(t_quantile(0.975, df), t, 1e-6 * t);
        }
        close(t_cdf(0.0, 7.0), 0.5, 1e-12);
        close(
            t_cdf(2.0, 1.0),
            0.5 + 2f64.atan() / std::f64::consts::PI,
            1e-10,
        );
        close(t_quantile(0.025, 4.0), -2.776_445_105, 1e-6);
    }

    #[test]
    fn hand_computed_samples() {
        let v = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        assert_eq!(mean(&v), Some(5.0));
        close(variance(&v).unwrap(), 32.0 / 7.0, 1e-12);
        assert_eq!(median(&v), Some(4.5));
        // type 7: h = 7 x 0.9 = 6.3 -> 7 + 0.3 x (9 - 7)
        close(percentile(&v, 90.0).unwrap(), 7.6, 1e-12);
        assert_eq!(percentile(&v, 100.0), Some(9.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        // mean 5, s = sqrt(32/7), n = 8, t(0.975, 7) = 2.364624252
        let [lo, hi] = ci95_of_mean(&v).unwrap();
        let half = 2.364_624_252 * (32.0f64 / 7.0 / 8.0).sqrt();
        close(lo, 5.0 - half, 1e-8);
        close(hi, 5.0 + half, 1e-8);
        assert_eq!(ci95_of_mean(&[1.0]), None);
    }

    #[test]
    fn outliers_by_the_modified_z_score() {
        // median 10, |dev| = 0, 0.1, 0.1, 0.2, 10 -> MAD 0.1; the 20 has z = 0.6745 x 10 / 0.1.
        assert_eq!(outliers(&[10.0, 10.1, 9.9, 10.2, 20.0]), vec![4]);
        assert!(outliers(&[10.0, 10.1, 9.9, 10.2, 10.4]).is_empty());
        assert!(outliers(&[1.0, 1.0, 1.0, 5.0]).is_empty(), "MAD 0");
        assert!(outliers(&[1.0, 100.0]).is_empty(), "too few to judge");
    }

    #[test]
    fn welch_against_a_worked_example() {
        // Worked by hand: means 20 and 15, variances 10 and 2.5 (n = 5 each):
        // se^2 = 2 + 0.5, t = 5 / sqrt(2.5) = 3.1623, df = 6.25 / (4/4 + 0.25/4) = 5.882.
        let a = [16.0, 18.0, 20.0, 22.0, 24.0];
        let b = [13.0, 14.0, 15.0, 16.0, 17.0];
        let w = welch(&a, &b).unwrap();
        close(w.t, 5.0 / 2.5f64.sqrt(), 1e-12);
        close(w.df, 6.25 / (1.0 + 0.0625), 1e-9);
        // two-sided p by numerical integration of the t density (Simpson, to t = 2000)
        close(w.p, 0.020_039, 2e-5);
        assert!(welch(&[1.0], &b).is_none());
        assert!(welch(&[1.0, 1.0], &[1.0, 1.0]).is_none());
        let (r, [lo, hi]) = ratio_ci95(&a, &b).unwrap();
        close(r, 20.0 / 15.0, 1e-12);
        assert!(lo < r && r < hi && lo > 1.0, "{lo} {r} {hi}");
    }
}
