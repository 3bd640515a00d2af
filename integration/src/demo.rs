//! `irqbridge demo`: every end-to-end scenario on `/dev/kvm`, as a table ([`run`]).
//!
//! Each scenario ([`Scenario::ALL`]) gets a fresh device server, plugin attachment and guest
//! agent ([`crate::rig::Rig`]), runs its exact-count checks, and samples the latency of its
//! basic operation (see [`crate::scenarios`]).

use std::fmt;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::scenarios::{Scenario, ScenarioOptions};

/// Settings of [`run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoOptions {
    /// Scenario settings; `latency_samples` is the number of latency samples per scenario.
    pub scenarios: ScenarioOptions,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            scenarios: ScenarioOptions {
                latency_samples: 200,
                ..ScenarioOptions::default()
            },
        }
    }
}

/// One scenario's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemoRow {
    /// Scenario name.
    pub scenario: String,
    /// Whether every check passed.
    pub passed: bool,
    /// What was checked, or why it failed.
    pub detail: String,
    /// What the latency figures measure, if sampled.
    pub latency_of: Option<String>,
    /// Median latency in µs.
    pub p50_us: Option<f64>,
    /// 99th percentile latency in µs.
    pub p99_us: Option<f64>,
    /// Wall time of the scenario, rig set-up included, in ms.
    pub wall_ms: f64,
}

/// The result of [`run`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemoReport {
    /// One row per scenario.
    pub rows: Vec<DemoRow>,
}

impl DemoReport {
    /// Whether every scenario passed.
    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.passed)
    }

    /// Prints the table (the report's `Display`) to stdout.
    pub fn print_table(&self) {
        print!("{self}");
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<20} {:<6} {:>9} {:>9}  detail",
            "scenario", "result", "p50 µs", "p99 µs"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<20} {:<6} {:>9} {:>9}  {}",
                r.scenario,
                if r.passed { "PASS" } else { "FAIL" },
                opt(r.p50_us),
                opt(r.p99_us),
                r.detail
            )?;
            if let Some(what) = &r.latency_of {
                writeln!(
                    f,
                    "{:<20} {:<6} {:>9} {:>9}  latency: {what}",
                    "", "", "", ""
                )?;
            }
        }
        let passed = self.rows.iter().filter(|r| r.passed).count();
        writeln!(f, "{passed}/{} scenarios passed", self.rows.len())
    }
}

/// `e` and its sources, joined with ": ".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// Starts the device server and the test VMM with the bare-metal guest on `/dev/kvm` for each
/// scenario and runs them all; a failing scenario is a row with `passed: false`.
///
/// # Errors
///
/// [`Error::KvmUnavailable`] when `/dev/kvm` cannot be used.
pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    if let Some(reason) = crate::kvm_unavailable_reason() {
        return Err(Error::KvmUnavailable(reason));
    }
    let mut rows = Vec::new();
    for s in Scenario::ALL {
        let start = Instant::now();
        let r = s.run(&opts.scenarios);
        let wall_ms = start.elapsed().as_secs_f64() * 1e3;
        rows.push(match r {
            Ok(o) => DemoRow {
                scenario: s.name().into(),
                passed: true,
                detail: o.detail,
                latency_of: o.latency.as_ref().map(|(w, _)| w.clone()),
                p50_us: o.latency.as_ref().map(|(_, l)| l.p50_us),
                p99_us: o.latency.as_ref().map(|(_, l)| l.p99_us),
                wall_ms,
            },
            Err(e) => DemoRow {
                scenario: s.name().into(),
                passed: false,
                detail: error_chain(&e),
                latency_of: None,
                p50_us: None,
                p99_us: None,
                wall_ms,
            },
        });
    }
    Ok(DemoReport { rows })
}
