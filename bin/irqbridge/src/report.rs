// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Benchmark reports on disk: the JSON report and, next to it, one latency CDF plot (SVG) per
//! row that has latency samples: `DIR/STEM.json` gets `DIR/STEM-ROW.svg`.

use std::io;
use std::path::{Path, PathBuf};

use crate::plot::{Series, cdf_svg};

/// One plot to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    /// File name part: `msix`, `latency-64`, …
    pub slug: String,
    /// Plot title.
    pub title: String,
    /// Plot subtitle.
    pub subtitle: String,
    /// `(legend, CDF)` per curve, measured path first.
    pub series: Vec<(String, Vec<[f64; 2]>)>,
}

impl Plot {
    /// The SVG document.
    pub fn svg(&self) -> String {
        let series: Vec<Series<'_>> = self
            .series
            .iter()
            .map(|(label, cdf)| Series { label, cdf })
            .collect();
        cdf_svg(&self.title, &self.subtitle, &series)
    }
}

/// The plots of `irqbridge bench`: each row against its baseline.
pub fn integration_plots(report: &irqbridge_integration::bench::BenchReport) -> Vec<Plot> {
    report
        .rows
        .iter()
        .filter(|r| !r.measured_cdf.is_empty() || !r.baseline_cdf.is_empty())
        .map(|r| Plot {
            slug: r.row.name().to_string(),
            title: r.path.clone(),
            subtitle: format!(
                "{} samples per path; goal {} on p50: {:.2}x, {}",
                report.iterations,
                r.goal,
                r.ratio,
                if r.met { "met" } else { "NOT met" }
            ),
            series: vec![
                (r.path.clone(), r.measured_cdf.clone()),
                (format!("baseline: {}", r.baseline), r.baseline_cdf.clone()),
            ],
        })
        .collect()
}

/// A file-name slug for a vhost-user row: its first word and first number
/// (`latency, 64 port(s) per burst, median` → `latency-64`).
pub fn slug(test: &str) -> String {
    let words: Vec<String> = test
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    let first = words.first().cloned().unwrap_or_else(|| "row".into());
    match words.iter().find(|w| w.bytes().all(|b| b.is_ascii_digit())) {
        Some(n) => format!("{first}-{n}"),
        None => first,
    }
}

/// The plots of `irqbridge bench --vhost-user`: each latency row against its eventfd baseline.
pub fn vhost_user_plots(report: &irqbridge_vhost_user::bench::BenchReport) -> Vec<Plot> {
    report
        .rows
        .iter()
        .filter(|r| !r.value_cdf.is_empty() || !r.baseline_cdf.is_empty())
        .map(|r| Plot {
            slug: slug(&r.test),
            title: format!("vhost-user event channel: {}", r.test),
            subtitle: format!(
                "round trips between the same two threads, same run; median ratio {:.2}",
                r.ratio()
            ),
            series: vec![
                ("event channel".to_string(), r.value_cdf.clone()),
                ("eventfd baseline".to_string(), r.baseline_cdf.clone()),
            ],
        })
        .collect()
}

/// Where the plot `slug` of the report `json` goes: same directory, `STEM-SLUG.svg`.
pub fn plot_path(json: &Path, slug: &str) -> PathBuf {
    let stem = json
        .file_stem()
        .map_or_else(|| "bench".into(), |s| s.to_string_lossy().into_owned());
    json.with_file_name(format!("{stem}-{slug}.svg"))
}

/// Writes `report` (plus a `"plots"` list of the SVG file names) to `json` and every plot next
/// to it, creating the directory. Returns the plot paths.
///
/// # Errors
///
/// The path that could not be written, with the error.
pub fn write(
    json: &Path,
    mut report: serde_json::Value,
    plots: &[Plot],
) -> Result<Vec<PathBuf>, (PathBuf, io::Error)> {
    if let Some(dir) = json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| (dir.to_path_buf(), e))?;
    }
    let paths: Vec<PathBuf> = plots.iter().map(|p| plot_path(json, &p.slug)).collect();
    if let Some(obj) = report.as_object_mut() {
        let names = paths
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| serde_json::Value::from(n.to_string_lossy().into_owned()))
            .collect();
        obj.insert("plots".into(), serde_json::Value::Array(names));
    }
    std::fs::write(json, format!("{report:#}\n")).map_err(|e| (json.to_path_buf(), e))?;
    for (plot, path) in plots.iter().zip(&paths) {
        std::fs::write(path, plot.svg()).map_err(|e| (path.clone(), e))?;
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_and_paths() {
        assert_eq!(slug("latency, 64 port(s) per burst, median"), "latency-64");
        assert_eq!(slug("doorbell A -> B round trip, median"), "doorbell");
        assert_eq!(slug(""), "row");
        assert_eq!(
            plot_path(Path::new("target/irqbridge-bench.json"), "msix"),
            Path::new("target/irqbridge-bench-msix.svg")
        );
        assert_eq!(plot_path(Path::new("r.json"), "x"), Path::new("r-x.svg"));
    }

    #[test]
    fn writes_json_and_plots_side_by_side() {
        let dir = std::env::temp_dir().join(format!("irqbridge-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let json = dir.join("sub/report.json");
        let plot = Plot {
            slug: "msix".into(),
            title: "t".into(),
            subtitle: "s".into(),
            series: vec![("a".into(), vec![[0.5, 1.0], [1.0, 2.0]])],
        };
        let paths = write(&json, serde_json::json!({"rows": []}), &[plot]).unwrap();
        assert_eq!(paths, [dir.join("sub/report-msix.svg")]);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["plots"], serde_json::json!(["report-msix.svg"]));
        assert!(
            std::fs::read_to_string(&paths[0])
                .unwrap()
                .starts_with("<svg")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
