// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! BAR0 register map of the irqbridge device (docs/device-abi.md) and access through any backend.

use crate::report::Result;

/// MAGIC (RO): `0x69726262`.
pub const MAGIC: u64 = 0x000;
/// ABI_VERSION (RO).
pub const ABI_VERSION: u64 = 0x004;
/// FEATURES (RO): bit 0 INTx, bit 1 MSI-X, bit 2 event channels, bit 3 MSI.
pub const FEATURES: u64 = 0x008;
/// MSIX_VECTORS (RO): MSI-X table size.
pub const MSIX_VECTORS: u64 = 0x00c;
/// INTX_ASSERT (WO): raise the line.
pub const INTX_ASSERT: u64 = 0x010;
/// INTX_DEASSERT (WO): lower the line.
pub const INTX_DEASSERT: u64 = 0x014;
/// INTX_STATUS (RO): bit 0 level, bit 1 masked, bit 2 COMMAND.10.
pub const INTX_STATUS: u64 = 0x018;
/// MSIX_FIRE (WO): value = vector.
pub const MSIX_FIRE: u64 = 0x020;
/// MSIX_MASK (WO): value = vector.
pub const MSIX_MASK: u64 = 0x024;
/// MSIX_UNMASK (WO): value = vector.
pub const MSIX_UNMASK: u64 = 0x028;
/// MSI_FIRE (WO): value = MSI vector.
pub const MSI_FIRE: u64 = 0x02c;
/// EVTCHN_SEND (WO): value = port.
pub const EVTCHN_SEND: u64 = 0x030;
/// EVTCHN_BIND (WO): value = `port | vector << 16`.
pub const EVTCHN_BIND: u64 = 0x034;
/// EVTCHN_UNBIND (WO): value = port.
pub const EVTCHN_UNBIND: u64 = 0x038;
/// EVTCHN_CLOSE (WO): value = port.
pub const EVTCHN_CLOSE: u64 = 0x03c;
/// DOORBELL (WO).
pub const DOORBELL: u64 = 0x040;
/// DOORBELL_COUNT (RO).
pub const DOORBELL_COUNT: u64 = 0x044;
/// EVTCHN_UNMASK (WO): value = port.
pub const EVTCHN_UNMASK: u64 = 0x048;
/// EVTCHN_PORTS (RO).
pub const EVTCHN_PORTS: u64 = 0x04c;
/// EVTCHN_QUERY (WO): value = port.
pub const EVTCHN_QUERY: u64 = 0x050;
/// EVTCHN_STATUS (RO): bits 1:0 state, bits 31:16 vector.
pub const EVTCHN_STATUS: u64 = 0x054;
/// CNT_INTX_TRIGGERS (RO).
pub const CNT_INTX_TRIGGERS: u64 = 0x100;
/// CNT_INTX_UNMASKS (RO).
pub const CNT_INTX_UNMASKS: u64 = 0x104;
/// CNT_MSIX_TRIGGERS (RO).
pub const CNT_MSIX_TRIGGERS: u64 = 0x108;
/// CNT_MSIX_PENDING (RO).
pub const CNT_MSIX_PENDING: u64 = 0x10c;
/// CNT_EVTCHN_SENDS (RO).
pub const CNT_EVTCHN_SENDS: u64 = 0x110;
/// CNT_EVTCHN_UPCALLS (RO).
pub const CNT_EVTCHN_UPCALLS: u64 = 0x114;
/// CNT_BAD_ACCESSES (RO).
pub const CNT_BAD_ACCESSES: u64 = 0x118;
/// CNT_MSI_TRIGGERS (RO).
pub const CNT_MSI_TRIGGERS: u64 = 0x11c;
/// CNT_MSI_PENDING (RO).
pub const CNT_MSI_PENDING: u64 = 0x120;
/// CNT_MSI_DROPPED (RO).
pub const CNT_MSI_DROPPED: u64 = 0x124;

/// FEATURES bit 3: MSI.
pub const FEATURE_MSI: u32 = 1 << 3;

/// Value of MAGIC.
pub const MAGIC_VALUE: u32 = 0x6972_6262;

/// INTX_STATUS bit 0: the line's level.
pub const INTX_LEVEL: u32 = 1 << 0;
/// INTX_STATUS bit 1: auto-masked.
pub const INTX_MASKED: u32 = 1 << 1;
/// INTX_STATUS bit 2: COMMAND.10 (INTx disable) is set.
pub const INTX_CMD_DISABLE: u32 = 1 << 2;

/// EVTCHN_STATUS state: closed.
pub const PORT_CLOSED: u32 = 0;
/// EVTCHN_STATUS state: open, no upcall.
pub const PORT_UNBOUND: u32 = 1;
/// EVTCHN_STATUS state: bound to a vector.
pub const PORT_BOUND: u32 = 2;

/// 32-bit access to a BAR, through an mmap or through a VFIO region.
pub trait Regs {
    /// Reads the 32-bit register at `off`.
    fn read32(&self, off: u64) -> Result<u32>;
    /// Writes the 32-bit register at `off`.
    fn write32(&self, off: u64, val: u32) -> Result<()>;
}
