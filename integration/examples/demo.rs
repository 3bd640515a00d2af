// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `cargo run --release -p irqbridge-integration --example demo [-- --json]`: every end-to-end
//! scenario on /dev/kvm as a table (what `irqbridge demo` prints). Exits 1 if one fails, 2 if
//! it cannot run.

use irqbridge_integration::demo::{self, DemoOptions};

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    match demo::run(&DemoOptions::default()) {
        Ok(report) => {
            if json {
                println!("{:#}", report.to_json());
            } else {
                report.print_table();
            }
            if !report.passed() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("irqbridge demo: {e}");
            std::process::exit(2);
        }
    }
}
