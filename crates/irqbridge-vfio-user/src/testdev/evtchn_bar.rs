// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Event channels of the test device: the [`EventChannels`](irqbridge_core::EventChannels)
//! model over the BAR4 page, with its upcalls fired as MSI-X vectors of the function.

use irqbridge_core::SendOutcome;

use super::{DeviceError, TestDevice};
use crate::pci::PciCore;

impl TestDevice {
    /// Device → guest event on `port`; fires the port's upcall vector when the protocol says
    /// so.
    pub(super) fn evtchn_send(
        &mut self,
        core: &mut PciCore,
        port: u32,
    ) -> Result<SendOutcome, DeviceError> {
        let outcome = self.evtchn.send(port)?;
        if let SendOutcome::Upcall { vector } = outcome {
            core.msix_fire(vector)?;
        }
        Ok(outcome)
    }

    /// Opens `port` and binds it to `vector`; raises the upcall if the port is pending and
    /// unmasked.
    pub(super) fn evtchn_bind(
        &mut self,
        core: &mut PciCore,
        port: u32,
        vector: u16,
    ) -> Result<(), DeviceError> {
        self.evtchn.bind(port, vector)?;
        if let Some(v) = self.evtchn.retrigger(port)? {
            core.msix_fire(v)?;
        }
        Ok(())
    }

    /// `EVTCHN_UNMASK`: clears the port's mask bit and raises its upcall if it is pending.
    pub(super) fn evtchn_unmask(
        &mut self,
        core: &mut PciCore,
        port: u32,
    ) -> Result<(), DeviceError> {
        if let Some(v) = self.evtchn.unmask(port)? {
            core.msix_fire(v)?;
        }
        Ok(())
    }
}
