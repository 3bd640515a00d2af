// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end scenarios: the irqbridge device server (in a thread), the irqbridge-kvm plugin
//! and the bare-metal guest agent on /dev/kvm. Every count is exact; see
//! `irqbridge_integration::scenarios` for what each scenario checks.

use irqbridge_integration::kvm_unavailable_reason;
use irqbridge_integration::scenarios::{Scenario, ScenarioOptions};

fn run(s: Scenario) {
    if let Some(reason) = kvm_unavailable_reason() {
        eprintln!("SKIPPED: /dev/kvm not available ({reason})");
        return;
    }
    let opts = ScenarioOptions {
        latency_samples: 20,
        ..ScenarioOptions::default()
    };
    match s.run(&opts) {
        Ok(outcome) => eprintln!("{}: {}", s.name(), outcome.detail),
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(cause) = src {
                msg.push_str(&format!(": {cause}"));
                src = cause.source();
            }
            panic!("{}: {msg}", s.name());
        }
    }
}

#[test]
fn intx_refires_until_the_handler_deasserts() {
    run(Scenario::Intx);
}

#[test]
fn intx_disable_holds_the_line_and_delivers_once() {
    run(Scenario::IntxDisable);
}

#[test]
fn msix_vectors_masks_and_pba() {
    run(Scenario::Msix);
}

#[test]
fn msi_vectors_masks_pending_bits_and_disable() {
    run(Scenario::Msi);
}

#[test]
fn event_channels_mask_unmask_and_4096_ports() {
    run(Scenario::EventChannels);
}

#[test]
fn doorbells_bypass_the_vmm_and_the_socket() {
    run(Scenario::Doorbells);
}
