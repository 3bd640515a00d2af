// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The benchmark runs end to end with tiny sizes (no timing is asserted).

use irqbridge_vhost_user::bench::{BenchOptions, run_with};

#[test]
fn bench_runs_and_reports_every_row() {
    let report = run_with(&BenchOptions {
        latency_rounds: 20,
        throughput_events: 200,
        doorbell_rounds: 20,
        warm_up_rounds: 10,
    })
    .unwrap();
    let names: Vec<&str> = report.rows.iter().map(|r| r.test.as_str()).collect();
    assert_eq!(
        names,
        [
            "latency, 1 port(s) per burst, median",
            "throughput, 1 port(s) per burst",
            "latency, 64 port(s) per burst, median",
            "throughput, 64 port(s) per burst",
            "latency, 4096 port(s) per burst, median",
            "throughput, 4096 port(s) per burst",
            "doorbell A -> B round trip, median",
        ]
    );
    for r in &report.rows {
        assert!(r.value > 0.0 && r.value.is_finite(), "{r:?}");
        assert!(r.baseline > 0.0 && r.baseline.is_finite(), "{r:?}");
    }
    let table = report.to_string();
    assert_eq!(table.lines().count(), 1 + 7 + report.notes.len());
    assert!(
        report.notes[0].contains("0 deferred"),
        "{}",
        report.notes[0]
    );
}
