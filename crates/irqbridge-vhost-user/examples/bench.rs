// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Event delivery latency and throughput of the vhost-user event-channel backend, with eventfd
//! baselines measured in the same run.
//!
//! ```text
//! cargo run --release -p irqbridge-vhost-user --example bench
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    match irqbridge_vhost_user::bench::run() {
        Ok(report) => {
            report.print_table();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
