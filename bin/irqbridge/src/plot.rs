// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Latency CDF plots as self-contained SVG, written by hand (no plotting dependency).
//!
//! One plot shows one benchmark row: the CDF of the measured path against the CDF of its
//! baseline, latency on a logarithmic x axis, the fraction of samples at or below it on the y
//! axis, p50 and p99 of each series in the legend.

use std::fmt::Write;

/// One curve: `[fraction, latency µs]` points with increasing fraction.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    /// Legend text.
    pub label: &'a str,
    /// The CDF points.
    pub cdf: &'a [[f64; 2]],
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 56.0;
const BOTTOM: f64 = 56.0;
const COLORS: [&str; 4] = ["#1f6fb4", "#e07b10", "#2a9d3f", "#b0304a"];
const DASHES: [&str; 4] = ["", "7 4", "2 3", "9 3 2 3"];

/// Escapes text for SVG content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The latency at `fraction` of a CDF (the first point at or above it).
pub fn at_fraction(cdf: &[[f64; 2]], fraction: f64) -> Option<f64> {
    cdf.iter()
        .find(|p| p[0] >= fraction - 1e-9)
        .map(|p| p[1])
        .filter(|v| v.is_finite())
}

/// Ticks of a logarithmic axis over `[lo, hi]`: 1, 2 and 5 times the powers of ten inside, or
/// every integer multiple when that gives fewer than five.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let ticks = ticks_with(lo, hi, &[1.0, 2.0, 5.0]);
    if ticks.len() < 5 {
        return ticks_with(lo, hi, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    }
    ticks
}

fn ticks_with(lo: f64, hi: f64, multiples: &[f64]) -> Vec<f64> {
    let mut ticks = Vec::new();
    if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
        return ticks;
    }
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for &m in multiples {
            let t = decade * m;
            if t >= lo * (1.0 - 1e-9) && t <= hi * (1.0 + 1e-9) {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

fn tick_label(us: f64) -> String {
    if us >= 1000.0 {
        format!("{} ms", us / 1000.0)
    } else if us >= 1.0 {
        format!("{us}")
    } else {
        format!("{us:.2}")
    }
}

/// The SVG document of one CDF plot. `title` is the row, `subtitle` a note (sample count,
/// host); series without finite positive points are left out of the axes and drawn as nothing.
pub fn cdf_svg(title: &str, subtitle: &str, series: &[Series<'_>]) -> String {
    let positive = |p: &&[f64; 2]| p[1].is_finite() && p[1] > 0.0 && p[0].is_finite();
    let values: Vec<f64> = series
        .iter()
        .flat_map(|s| s.cdf.iter().filter(positive).map(|p| p[1]))
        .collect();
    let (mut lo, mut hi) = values.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    if values.is_empty() {
        (lo, hi) = (1.0, 10.0);
    }
    // Whole 1-2-5 steps around the data, at least a factor of 4 wide.
    lo = nice_down(lo);
    hi = nice_up(hi);
    if hi / lo < 4.0 {
        lo = nice_down(lo / 2.0);
        hi = nice_up(hi * 2.0);
    }
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |us: f64| LEFT + (us.log10() - lo.log10()) / (hi.log10() - lo.log10()) * plot_w;
    let y = |f: f64| TOP + (1.0 - f) * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="40" fill="#555555">{}</text>"##,
        escape(subtitle)
    );
    // Grid and axes.
    for i in 0..=10 {
        let f = f64::from(i) / 10.0;
        let yy = y(f);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e4e4e4"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}%</text>"#,
            LEFT - 6.0,
            yy + 4.0,
            i * 10
        );
    }
    let ticks = log_ticks(lo, hi);
    let dense = ticks.len() > 7;
    for t in ticks {
        let xx = x(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#e4e4e4"/>"##,
            TOP + plot_h
        );
        // With every integer multiple gridded, label only 1, 2, 3 and 5 so labels do not touch.
        let mantissa = (t / 10f64.powf(t.log10().floor())).round();
        if dense && ![1.0, 2.0, 3.0, 5.0].contains(&mantissa) {
            continue;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + plot_h + 16.0,
            tick_label(t)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333333"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">latency (µs, log scale)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 14.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">samples at or below</text>"#,
        TOP + plot_h / 2.0
    );
    // Curves, then the legend in the lower right (where a CDF has no points: few samples are
    // slow) on a white box.
    let legend: Vec<String> = series
        .iter()
        .map(|s| {
            let stats = match (at_fraction(s.cdf, 0.5), at_fraction(s.cdf, 0.99)) {
                (Some(p50), Some(p99)) => format!(" (p50 {p50:.1} µs, p99 {p99:.1} µs)"),
                _ => " (no samples)".to_string(),
            };
            format!("{}{stats}", s.label)
        })
        .collect();
    let longest = legend.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let box_w = (40.0 + 6.6 * longest as f64).min(plot_w - 20.0);
    let box_h = 10.0 + 18.0 * series.len() as f64;
    let box_x = LEFT + plot_w - box_w - 10.0;
    let box_y = TOP + plot_h - box_h - 10.0;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = DASHES[i % DASHES.len()];
        let points: Vec<String> = s
            .cdf
            .iter()
            .filter(positive)
            .map(|p| format!("{:.1},{:.1}", x(p[1]), y(p[0].clamp(0.0, 1.0))))
            .collect();
        if !points.is_empty() {
            let dash_attr = if dash.is_empty() {
                String::new()
            } else {
                format!(r#" stroke-dasharray="{dash}""#)
            };
            let _ = writeln!(
                svg,
                r#"<polyline class="series" fill="none" stroke="{color}" stroke-width="2"{dash_attr} points="{}"/>"#,
                points.join(" ")
            );
        }
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{box_x:.1}" y="{box_y:.1}" width="{box_w:.1}" height="{box_h:.1}" fill="#ffffff" fill-opacity="0.9" stroke="#bbbbbb"/>"##
    );
    for (i, text) in legend.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = DASHES[i % DASHES.len()];
        let ly = box_y + 14.0 + 18.0 * i as f64;
        let lx = box_x + 8.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{color}" stroke-width="2"{}/>"#,
            lx + 26.0,
            if dash.is_empty() {
                String::new()
            } else {
                format!(r#" stroke-dasharray="{dash}""#)
            }
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 32.0,
            ly + 4.0,
            escape(text)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The largest 1-2-5 step at or below `v` (positive).
fn nice_down(v: f64) -> f64 {
    let d = 10f64.powf(v.log10().floor());
    [5.0, 2.0, 1.0]
        .into_iter()
        .map(|m| m * d)
        .find(|&t| t <= v * (1.0 + 1e-9))
        .unwrap_or(d)
}

/// The smallest 1-2-5 step at or above `v` (positive).
fn nice_up(v: f64) -> f64 {
    let d = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * d)
        .find(|&t| t >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdf(values: &[f64]) -> Vec<[f64; 2]> {
        let n = values.len() as f64;
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| [(i as f64 + 1.0) / n, v])
            .collect()
    }

    #[test]
    fn ticks_and_steps() {
        assert_eq!(
            log_ticks(1.0, 100.0),
            [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(
            log_ticks(3.0, 40.0),
            [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 20.0, 30.0, 40.0]
        );
        assert!(log_ticks(0.0, 1.0).is_empty());
        assert_eq!(nice_down(3.7), 2.0);
        assert_eq!(nice_up(3.7), 5.0);
        assert_eq!(nice_up(10.0), 10.0);
        assert_eq!(nice_down(0.07), 0.05);
    }

    #[test]
    fn svg_has_both_series_and_escaped_text() {
        let m = cdf(&[10.0, 11.0, 12.0, 30.0]);
        let b = cdf(&[8.0, 9.0, 9.5, 20.0]);
        let svg = cdf_svg(
            "MSI-X <server> & VMM",
            "4 samples",
            &[
                Series {
                    label: "server fires",
                    cdf: &m,
                },
                Series {
                    label: "VMM writes irqfd",
                    cdf: &b,
                },
            ],
        );
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("class=\"series\"").count(), 2);
        assert!(svg.contains("MSI-X &lt;server&gt; &amp; VMM"));
        assert!(svg.contains("p50 11.0 µs"), "{svg}");
        assert!(svg.contains("p99 30.0 µs"), "{svg}");
        // Every plotted coordinate is inside the drawing.
        for pts in svg.split("points=\"").skip(1) {
            for p in pts.split('"').next().unwrap().split(' ') {
                let (x, y) = p.split_once(',').unwrap();
                let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                assert!((LEFT..=WIDTH - RIGHT).contains(&x), "{x}");
                assert!((TOP..=HEIGHT - BOTTOM).contains(&y), "{y}");
            }
        }
    }

    #[test]
    fn degenerate_input_still_makes_a_document() {
        let nan = [[0.5, f64::NAN], [1.0, 0.0]];
        let same = cdf(&[5.0, 5.0]);
        let svg = cdf_svg(
            "t",
            "",
            &[
                Series {
                    label: "empty",
                    cdf: &[],
                },
                Series {
                    label: "nan",
                    cdf: &nan,
                },
                Series {
                    label: "one value",
                    cdf: &same,
                },
            ],
        );
        assert_eq!(svg.matches("class=\"series\"").count(), 1);
        assert!(svg.contains("(no samples)"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }
}
