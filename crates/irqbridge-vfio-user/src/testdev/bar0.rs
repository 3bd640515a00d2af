// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The BAR0 register file of the test device (docs/device-abi.md "BAR0 registers").
//!
//! 32-bit registers, naturally aligned; any other access, undefined offsets, writes to
//! read-only registers and writes of bad values are ignored, logged and counted in
//! `CNT_BAD_ACCESSES`.

use irqbridge_core::PortState;
use log::warn;

use super::regs::*;
use super::{DeviceError, TestDevice};
use crate::pci::{PciCore, error_chain};

fn le32(data: &[u8]) -> Option<u32> {
    let bytes: [u8; 4] = data.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

impl TestDevice {
    pub(super) fn bar0_read(&mut self, core: &mut PciCore, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 || offset % 4 != 0 {
            self.bad(format_args!(
                "BAR0 read of {} bytes at {offset:#x}",
                data.len()
            ));
            return;
        }
        let c = self.counters(core);
        let lo = |v: u64| v as u32;
        let intx = core.intx();
        let value = match offset {
            REG_MAGIC => MAGIC,
            REG_ABI_VERSION => ABI_VERSION,
            REG_FEATURES => {
                let mut f = FEATURE_MSIX | FEATURE_EVTCHN;
                if self.config.intx {
                    f |= FEATURE_INTX;
                }
                if self.config.msi_vectors != 0 {
                    f |= FEATURE_MSI;
                }
                f
            }
            REG_MSIX_VECTORS => u32::from(self.config.msix_vectors),
            REG_INTX_STATUS => {
                let mut v = 0;
                if intx.level() {
                    v |= INTX_STATUS_LEVEL;
                }
                if intx.masked() {
                    v |= INTX_STATUS_MASKED;
                }
                if intx.intx_disabled() {
                    v |= INTX_STATUS_DISABLED;
                }
                v
            }
            REG_DOORBELL_COUNT => lo(c.doorbells),
            REG_EVTCHN_PORTS => self.evtchn.num_ports(),
            REG_EVTCHN_STATUS => match self.evtchn.state(self.evtchn_query) {
                Ok(PortState::Closed) | Err(_) => EVTCHN_STATUS_CLOSED,
                Ok(PortState::Unbound) => EVTCHN_STATUS_UNBOUND,
                Ok(PortState::Bound { vector }) => EVTCHN_STATUS_BOUND | (u32::from(vector) << 16),
            },
            REG_CNT_INTX_TRIGGERS => lo(c.intx_triggers),
            REG_CNT_INTX_UNMASKS => lo(c.intx_unmasks),
            REG_CNT_MSIX_TRIGGERS => lo(c.msix_triggers),
            REG_CNT_MSIX_PENDING => lo(c.msix_pending),
            REG_CNT_EVTCHN_SENDS => lo(c.evtchn_sends),
            REG_CNT_EVTCHN_UPCALLS => lo(c.evtchn_upcalls),
            REG_CNT_BAD_ACCESSES => lo(c.bad_accesses),
            REG_CNT_MSI_TRIGGERS => lo(c.msi_triggers),
            REG_CNT_MSI_PENDING => lo(c.msi_pending),
            REG_CNT_MSI_DROPPED => lo(c.msi_dropped),
            // Write-only registers read 0.
            REG_INTX_ASSERT | REG_INTX_DEASSERT | REG_MSIX_FIRE | REG_MSIX_MASK
            | REG_MSIX_UNMASK | REG_MSI_FIRE | REG_EVTCHN_SEND | REG_EVTCHN_BIND
            | REG_EVTCHN_UNBIND | REG_EVTCHN_CLOSE | REG_DOORBELL | REG_EVTCHN_UNMASK
            | REG_EVTCHN_QUERY => 0,
            _ => {
                self.bad(format_args!("BAR0 read at undefined offset {offset:#x}"));
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub(super) fn bar0_write(&mut self, core: &mut PciCore, offset: u64, data: &[u8]) {
        let Some(value) = le32(data).filter(|_| offset % 4 == 0) else {
            self.bad(format_args!(
                "BAR0 write of {} bytes at {offset:#x}",
                data.len()
            ));
            return;
        };
        let bad_vector = || DeviceError::Model(irqbridge_core::Error::InvalidVector(value));
        let result = match offset {
            REG_INTX_ASSERT | REG_INTX_DEASSERT => {
                let level = offset == REG_INTX_ASSERT;
                self.intx_set_level(core, INTX_SOURCE_GUEST, level)
                    .map(|_| ())
            }
            REG_MSIX_FIRE | REG_MSIX_MASK | REG_MSIX_UNMASK => {
                match u16::try_from(value)
                    .ok()
                    .filter(|v| *v < self.config.msix_vectors)
                {
                    None => Err(bad_vector()),
                    Some(v) if offset == REG_MSIX_FIRE => {
                        core.msix_fire(v).map(|_| ()).map_err(Into::into)
                    }
                    Some(v) => core
                        .msix_set_entry_masked(v, offset == REG_MSIX_MASK)
                        .map_err(Into::into),
                }
            }
            REG_MSI_FIRE => self.msi_fire(core, value).map(|_| ()),
            REG_EVTCHN_SEND => self.evtchn_send(core, value).map(|_| ()),
            REG_EVTCHN_BIND => {
                let port = value & 0xffff;
                let vector = (value >> 16) as u16;
                self.evtchn_bind(core, port, vector)
            }
            REG_EVTCHN_UNBIND => self.evtchn.unbind(value).map_err(Into::into),
            REG_EVTCHN_CLOSE => self.evtchn.close(value).map_err(Into::into),
            REG_EVTCHN_UNMASK => self.evtchn_unmask(core, value),
            REG_EVTCHN_QUERY => {
                if value < self.evtchn.num_ports() {
                    self.evtchn_query = value;
                    Ok(())
                } else {
                    Err(DeviceError::Model(irqbridge_core::Error::InvalidPort(
                        value,
                    )))
                }
            }
            REG_DOORBELL => {
                self.doorbells = self.doorbells.wrapping_add(1);
                Ok(())
            }
            _ => {
                self.bad(format_args!(
                    "BAR0 write of {value:#x} to read-only or undefined offset {offset:#x}"
                ));
                return;
            }
        };
        match result {
            Ok(()) => {}
            // A failed eventfd write is the client's problem, not a bad guest access.
            Err(DeviceError::Model(irqbridge_core::Error::Notify(e))) => {
                warn!("irqbridge-pci: BAR0 write at {offset:#x}: interrupt delivery failed: {e}");
            }
            Err(e) => self.bad(format_args!(
                "BAR0 write of {value:#x} at {offset:#x}: {}",
                error_chain(&e)
            )),
        }
    }
}
