// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `cargo run --release -p irqbridge-integration --example bench [-- [--json] [N] [ROW]]`: the
//! interrupt-path benchmarks against their same-run baselines (what `irqbridge bench` prints).
//! N is the number of samples per path (default 1000), ROW one of `msix`, `intx`,
//! `doorbell`, `region-read`. Exits 1 if a goal is missed, 2 if it
//! cannot run.

use irqbridge_integration::bench::{self, BenchOptions};

fn main() {
    let mut opts = BenchOptions::default();
    let mut json = false;
    for a in std::env::args().skip(1) {
        if a == "--json" {
            json = true;
        } else if let Ok(n) = a.parse() {
            opts.iterations = n;
        } else if let Some(p) = a.strip_prefix("--pin=") {
            let cpus: Vec<usize> = p.split(',').filter_map(|c| c.parse().ok()).collect();
            if let [vcpu, server] = cpus[..] {
                opts.rig_cpus = Some((vcpu, server));
            }
        } else if a == "--no-pin" {
            opts.pin_rigs = false;
        } else if let Some(row) = bench::Row::from_name(&a) {
            opts.only = Some(row);
        } else {
            eprintln!(
                "usage: bench [--json] [--pin=VCPU,SERVER | --no-pin] [SAMPLES] [msix|intx|doorbell|region-read]"
            );
            std::process::exit(2);
        }
    }
    match bench::run(&opts) {
        Ok(report) => {
            if json {
                println!("{:#}", report.to_json());
            } else {
                report.print_table();
            }
            if !report.all_met() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("irqbridge bench: {e}");
            std::process::exit(2);
        }
    }
}
