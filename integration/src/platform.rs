// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Facts about the KVM we run on that change what a guest can observe.
//!
//! [`level_ack_at_injection`]: on a stock KVM the in-kernel IOAPIC "acks" a level-triggered
//! interrupt when the guest EOIs it: KVM de-asserts the irqfd's line and signals the resample
//! eventfd *after* the guest's handler has run. The nested `kvm-pvm` of the development
//! machines (see `shared/reference/machine.md`) acks when it injects the interrupt instead
//! (its LAPIC does not hold the vector in service: the same vector is taken again without an
//! EOI). The resample then reaches the device server *before* the guest's handler can write
//! anything to the device, so a handler that de-asserts the line cannot prevent the re-fire
//! that the resample of its own interrupt triggers: the device sees exactly one more
//! interrupt than on a stock KVM. The INTx scenarios take the platform into account so that
//! their counts stay exact on both.

use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::error::{Error, Result};
use crate::{Action, GsiRoutes, Guest};

/// IOAPIC pin of the probe (IOAPIC only: GSIs 16-23 have no PIC route).
const PROBE_PIN: u8 = 20;
/// Guest vector of the probe.
const PROBE_VECTOR: u8 = 0x58;

/// Whether this KVM acks level-triggered IOAPIC interrupts (de-asserts the resample irqfd's
/// line and signals its resample eventfd) when it injects them rather than at the guest's EOI.
/// Probed once per process in a throwaway VM; see the [module documentation](self).
///
/// # Errors
///
/// The VM's errors; [`Error::Timeout`] if the probe interrupt is not delivered.
pub fn level_ack_at_injection() -> Result<bool> {
    static PROBED: OnceLock<bool> = OnceLock::new();
    if let Some(v) = PROBED.get() {
        return Ok(*v);
    }
    let v = probe()?;
    Ok(*PROBED.get_or_init(|| v))
}

fn probe() -> Result<bool> {
    let g = Guest::new()?;
    GsiRoutes::with_irqchip().apply(g.vm().vm_fd())?;
    g.ioapic_route(PROBE_PIN, PROBE_VECTOR, true)?;
    // No EOI: on a stock KVM the resample eventfd can then never be signalled.
    g.set_action(PROBE_VECTOR, Action::none())?;
    let trigger = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Io)?;
    let resample = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Io)?;
    g.vm()
        .vm_fd()
        .register_irqfd_with_resample(&trigger, &resample, u32::from(PROBE_PIN))
        .map_err(Error::kvm("KVM_IRQFD(RESAMPLE)"))?;
    trigger.write(1).map_err(Error::Io)?;
    g.wait_count(PROBE_VECTOR, 1, Duration::from_secs(5))?;
    // The handler has finished without an EOI. An ack at injection signalled the eventfd
    // before the handler ran; give a late one a moment anyway.
    let mut pfd = libc::pollfd {
        fd: resample.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 20) };
    let acked = n == 1;
    if let Err(e) = g
        .vm()
        .vm_fd()
        .unregister_irqfd(&trigger, u32::from(PROBE_PIN))
    {
        log::debug!("probe irqfd deassign: {e}");
    }
    log::debug!("KVM acks level interrupts at injection: {acked}");
    Ok(acked)
}
