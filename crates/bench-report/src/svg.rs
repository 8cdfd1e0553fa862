//! Small hand-written SVG charts for reports: points and optional lines per series, linear or
//! log axes. Written by hand because plotters' text layout needs system font libraries.

use std::fmt::Write;

const W: f64 = 760.0;
const H: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 220.0; // room for the legend
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (estimated rather than measured values).
    pub dashed: bool,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Join each series' points (sorted by x) with a line.
    pub lines: bool,
}

#[derive(Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    /// Log scale when all values are positive and span more than 50x.
    fn fit(values: impl Iterator<Item = f64> + Clone) -> Axis {
        let lo = values.clone().fold(f64::INFINITY, f64::min);
        let hi = values.fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() || !hi.is_finite() {
            return Axis {
                lo: 0.0,
                hi: 1.0,
                log: false,
            };
        }
        if lo > 0.0 && hi / lo > 50.0 {
            return Axis {
                lo: lo.log10().floor(),
                hi: hi.log10().ceil(),
                log: true,
            };
        }
        let lo = if lo >= 0.0 { 0.0 } else { lo * 1.1 };
        let hi = if hi <= lo { lo + 1.0 } else { hi * 1.1 };
        Axis { lo, hi, log: false }
    }

    /// Position of `v` in 0..=1.
    fn frac(&self, v: f64) -> f64 {
        let v = if self.log {
            v.max(f64::MIN_POSITIVE).log10()
        } else {
            v
        };
        if self.hi == self.lo {
            0.5
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn ticks(&self) -> Vec<(f64, String)> {
        if self.log {
            return (self.lo as i32..=self.hi as i32)
                .map(|e| (10f64.powi(e), fmt_num(10f64.powi(e))))
                .collect();
        }
        let span = self.hi - self.lo;
        let raw = span / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| span / s <= 6.0)
            .unwrap_or(10.0 * mag);
        let mut t = (self.lo / step).ceil() * step;
        let mut out = Vec::new();
        while t <= self.hi + step * 1e-9 {
            out.push((t, fmt_num(t)));
            t += step;
        }
        out
    }
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e4).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the chart; an empty chart says that there is nothing to plot.
pub fn render(chart: &Chart, series: &[Series]) -> String {
    let all = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let xa = Axis::fit(all().map(|p| p.0));
    let ya = Axis::fit(all().map(|p| p.1));
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let px = |x: f64| LEFT + xa.frac(x) * pw;
    let py = |y: f64| TOP + ph - ya.frac(y) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + pw / 2.0,
        esc(chart.title)
    );
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    if all().next().is_none() {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">no ok cases to plot</text>"#,
            LEFT + pw / 2.0,
            TOP + ph / 2.0
        );
    } else {
        for (v, label) in xa.ticks() {
            let x = px(v);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#ddd"/>"##,
                TOP + ph
            );
            let _ = writeln!(
                s,
                r#"<text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"#,
                TOP + ph + 16.0
            );
        }
        for (v, label) in ya.ticks() {
            let y = py(v);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/>"##,
                LEFT + pw
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{label}</text>"#,
                LEFT - 6.0,
                y + 4.0
            );
        }
    }
    let log = |a: Axis| if a.log { " (log)" } else { "" };
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}{}</text>"#,
        LEFT + pw / 2.0,
        H - 18.0,
        esc(chart.x_label),
        log(xa)
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(chart.y_label),
        log(ya)
    );
    for (i, ser) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts: Vec<(f64, f64)> = ser
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if chart.lines && pts.len() > 1 {
            let path: Vec<String> = pts
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{}/>"#,
                path.join(" "),
                if ser.dashed {
                    r#" stroke-dasharray="6 4""#
                } else {
                    ""
                }
            );
        }
        for &(x, y) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"><title>{}: {} , {}</title></circle>"#,
                px(x),
                py(y),
                esc(&ser.name),
                fmt_num(x),
                fmt_num(y)
            );
        }
        let ly = TOP + 10.0 + i as f64 * 18.0;
        let lx = W - RIGHT + 15.0;
        let _ = writeln!(s, r#"<circle cx="{lx}" cy="{ly}" r="4" fill="{color}"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 10.0,
            ly + 4.0,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_points_lines_and_log_axes() {
        let series = vec![
            Series {
                dashed: false,
                name: "a<b".into(),
                points: vec![(1.0, 0.01), (4.0, 10.0), (2.0, 5.0)],
            },
            Series {
                dashed: false,
                name: "c".into(),
                points: vec![(8.0, f64::NAN)],
            },
        ];
        let svg = render(
            &Chart {
                title: "t",
                x_label: "x",
                y_label: "y",
                lines: true,
            },
            &series,
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(
            svg.matches("<circle cx").count(),
            3 + 2,
            "3 points + 2 legend marks"
        );
        assert!(svg.contains("a&lt;b") && svg.contains("y (log)"));
        let empty = render(
            &Chart {
                title: "t",
                x_label: "x",
                y_label: "y",
                lines: false,
            },
            &[],
        );
        assert!(empty.contains("no ok cases"));
    }

    #[test]
    fn linear_ticks_are_round() {
        let a = Axis::fit([0.0, 23.0].into_iter());
        let t: Vec<String> = a.ticks().into_iter().map(|t| t.1).collect();
        assert_eq!(t, ["0", "5", "10", "15", "20", "25"]);
    }
}
