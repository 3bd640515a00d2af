// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Round-trip latencies of the test VMM on this host's KVM, printed (not asserted) so later
//! benchmarks have a baseline to compare ratios against.
//!
//! `cargo run --release -p irqbridge-integration --example latency [-- ROUNDS]`

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use irqbridge_integration::layout::DEVICE_MMIO_GPA;
use irqbridge_integration::{GsiRoutes, Guest, MmioHandler, MsiMessage, kvm_unavailable_reason};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

type BoxError = Box<dyn std::error::Error>;

const WAIT: Duration = Duration::from_secs(5);

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    println!(
        "{name:<44} n={:<6} p50={:>8.1?} p90={:>8.1?} p99={:>8.1?} max={:>8.1?}",
        samples.len(),
        pct(50),
        pct(90),
        pct(99),
        samples[samples.len() - 1]
    );
}

/// Spins on guest memory (no sleeping) until `count[vector]` reaches `n`.
fn spin_count(g: &Guest, vector: u8, n: u64) -> Result<(), BoxError> {
    let deadline = Instant::now() + WAIT;
    while g.count(vector) < n {
        if Instant::now() > deadline {
            // Falls back to the checked wait for a useful error.
            g.wait_count(vector, n, Duration::ZERO)?;
        }
        std::hint::spin_loop();
    }
    Ok(())
}

fn wait_readable(fd: &EventFd) -> Result<u64, BoxError> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    if n != 1 {
        return Err("resample eventfd not signalled within 5 s".into());
    }
    Ok(fd.read()?)
}

struct Echo;
impl MmioHandler for Echo {
    fn read(&self, _gpa: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write(&self, _gpa: u64, _data: &[u8]) {}
}

fn main() -> Result<(), BoxError> {
    if let Some(reason) = kvm_unavailable_reason() {
        eprintln!("SKIPPED: /dev/kvm not available ({reason})");
        return Ok(());
    }
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2000);
    let g = Guest::new()?;
    let vm = g.vm().vm_fd();

    // MSI through an irqfd on an MSI route.
    let mut routes = GsiRoutes::with_irqchip();
    routes.add_msi(24, MsiMessage::fixed(0x40))?;
    routes.apply(vm)?;
    let msi = EventFd::new(EFD_NONBLOCK)?;
    vm.register_irqfd(&msi, 24)?;
    let mut samples = Vec::with_capacity(rounds);
    for i in 1..=rounds as u64 {
        let t = Instant::now();
        msi.write(1)?;
        spin_count(&g, 0x40, i)?;
        samples.push(t.elapsed());
    }
    report("MSI irqfd write -> handler done (count)", samples);

    // KVM_SIGNAL_MSI.
    let mut samples = Vec::with_capacity(rounds);
    for i in 1..=rounds as u64 {
        let t = Instant::now();
        g.signal_msi(0x41)?;
        spin_count(&g, 0x41, i)?;
        samples.push(t.elapsed());
    }
    report("KVM_SIGNAL_MSI -> handler done (count)", samples);

    // INTx: level IOAPIC pin with a resample irqfd.
    g.ioapic_route(5, 0x50, true)?;
    let trigger = EventFd::new(EFD_NONBLOCK)?;
    let resample = EventFd::new(EFD_NONBLOCK)?;
    vm.register_irqfd_with_resample(&trigger, &resample, 5)?;
    let (mut to_count, mut to_resample) = (Vec::new(), Vec::new());
    for i in 1..=rounds as u64 {
        let t = Instant::now();
        trigger.write(1)?;
        spin_count(&g, 0x50, i)?;
        to_count.push(t.elapsed());
        wait_readable(&resample)?;
        to_resample.push(t.elapsed());
    }
    report("INTx trigger -> handler done (count)", to_count);
    report("INTx trigger -> EOI -> resamplefd readable", to_resample);

    // Mailbox command round trips.
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        g.nop()?;
        samples.push(t.elapsed());
    }
    report("agent command round trip (nop, back to back)", samples);

    // The same from a halted agent: leave it time to reach `hlt` between commands.
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let idle = Instant::now();
        while idle.elapsed() < Duration::from_micros(300) {
            std::hint::spin_loop();
        }
        let t = Instant::now();
        g.nop()?;
        samples.push(t.elapsed());
    }
    report("agent command round trip (nop, from hlt)", samples);

    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        g.mmio_read32(irqbridge_integration::layout::LAPIC_GPA + 0x30)?;
        samples.push(t.elapsed());
    }
    report("agent command with one LAPIC register read", samples);

    let bar = DEVICE_MMIO_GPA + 0x1000;
    g.vm().add_mmio(bar, 0x1000, Arc::new(Echo))?;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        g.mmio_read32(bar)?;
        samples.push(t.elapsed());
    }
    report("agent command with one MMIO read exit", samples);

    // ioeventfd: guest writes without exits vs trapped writes.
    let doorbell = DEVICE_MMIO_GPA + 0x40;
    let efd = EventFd::new(EFD_NONBLOCK)?;
    vm.register_ioevent(&efd, &IoEventAddress::Mmio(doorbell), 1u32)?;
    const WRITES: u64 = 10_000;
    let t = Instant::now();
    g.mmio_write32_repeat(doorbell, 1, WRITES)?;
    let per = t.elapsed() / WRITES as u32;
    println!(
        "{:<44} {per:>8.1?} per write ({} counted)",
        "guest MMIO write, ioeventfd",
        efd.read()?
    );
    let t = Instant::now();
    g.mmio_write32_repeat(bar, 1, WRITES)?;
    let per = t.elapsed() / WRITES as u32;
    println!(
        "{:<44} {per:>8.1?} per write",
        "guest MMIO write, exit to the VMM"
    );
    Ok(())
}
