// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
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
use crate::stats::LatencyStats;
use crate::vhost_rig::{VhostRig, VhostRigOptions};

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
    let start = Instant::now();
    let vhost = vhost_interdomain(opts);
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    rows.push(match vhost {
        Ok((detail, latency)) => DemoRow {
            scenario: VHOST_SCENARIO.into(),
            passed: true,
            detail,
            latency_of: latency.as_ref().map(|(w, _)| w.clone()),
            p50_us: latency.as_ref().map(|(_, l)| l.p50_us),
            p99_us: latency.as_ref().map(|(_, l)| l.p99_us),
            wall_ms,
        },
        Err(e) => DemoRow {
            scenario: VHOST_SCENARIO.into(),
            passed: false,
            detail: error_chain(&e),
            latency_of: None,
            p50_us: None,
            p99_us: None,
            wall_ms,
        },
    });
    Ok(DemoReport { rows })
}

/// Name of the vhost-user row.
const VHOST_SCENARIO: &str = "vhost-user A->B";

/// A failed check of the vhost-user row.
fn vhost_check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(what()))
    }
}

/// The second transport: two VMs on one vhost-user event-channel backend
/// ([`crate::vhost_rig`]). VM A's guest rings doorbells on a port linked to a port of VM B;
/// each must be exactly one upcall in B, with no MMIO exit in either VM.
fn vhost_interdomain(opts: &DemoOptions) -> Result<(String, Option<(String, LatencyStats)>)> {
    use irqbridge_vhost_user::abi::Status;

    const PA: u32 = 3;
    const PB: u32 = 9;
    let io = |e: irqbridge_vhost_user::Error| Error::Io(std::io::Error::other(e));
    let rig = VhostRig::new(VhostRigOptions::default())?;
    let (a, b) = (rig.vm(0)?, rig.vm(1)?);
    for (vm, port) in [(a, PA), (b, PB)] {
        for reply in [vm.register_page()?, vm.bind(port, 0)?] {
            vhost_check(reply.status() == Some(Status::Ok), || {
                format!("control request refused: {reply:?}")
            })?;
        }
    }
    rig.backend()
        .connect_interdomain((a.conn(), PA), (b.conn(), PB))
        .map_err(io)?;
    let rounds = opts.scenarios.latency_samples.clamp(16, 1000);
    let mut samples = Vec::with_capacity(rounds);
    for i in 1..=rounds as u64 {
        let t = Instant::now();
        a.doorbell(PA)?;
        let seen = b.wait_upcalls(0, i)?;
        samples.push(t.elapsed());
        vhost_check(seen == i, || {
            format!("{seen} upcalls in B after {i} doorbells")
        })?;
        if i % 32 == 0 {
            b.refill_events(0)?;
        }
    }
    b.guest().nop()?;
    let collected = b.port_count(PB)?;
    let (upcalls_a, upcalls_b) = (a.upcalls(0), b.upcalls(0));
    vhost_check(
        collected as usize == rounds && upcalls_b == rounds as u64,
        || {
            format!(
                "B collected port {PB} {collected} times in {upcalls_b} upcalls, expected {rounds}"
            )
        },
    )?;
    vhost_check(upcalls_a == 0, || {
        format!("A saw {upcalls_a} upcalls, expected 0")
    })?;
    let (sa, sb) = (a.exit_stats(), b.exit_stats());
    let exits = sa.mmio_reads + sa.mmio_writes + sb.mmio_reads + sb.mmio_writes;
    vhost_check(exits == 0, || format!("{exits} MMIO exits, expected 0"))?;
    Ok((
        format!(
            "{rounds} doorbells in VM A on port {PA} linked to port {PB} of VM B: {upcalls_b} upcalls and {collected} collections in B, 0 in A, 0 MMIO exits (kicks are ioeventfds, upcalls irqfds)"
        ),
        LatencyStats::from_durations(&samples).map(|l| {
            (
                "guest A doorbell -> guest B upcall seen by the host".to_string(),
                l,
            )
        }),
    ))
}
