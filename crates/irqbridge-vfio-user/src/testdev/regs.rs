// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-visible constants of the irqbridge test device (`docs/device-abi.md`, ABI version 1).
//!
//! Everything here is part of the contract with guest drivers and test harnesses: PCI
//! identity, config-space layout, BAR sizes and the BAR0 register map. The generic PCI
//! constants of [`crate::pci::consts`] are re-exported here.

pub use crate::pci::consts::*;

/// PCI vendor ID: ASCII "ir". Not a PCI-SIG assigned ID; a test device only.
pub const VENDOR_ID: u16 = 0x6972;
/// PCI device ID.
pub const DEVICE_ID: u16 = 0x7162;
/// PCI subsystem vendor ID.
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x6972;
/// PCI subsystem ID.
pub const SUBSYSTEM_ID: u16 = 0x0001;
/// PCI revision ID.
pub const REVISION_ID: u8 = 0x01;
/// PCI class code (class, subclass, programming interface): unassigned class.
pub const CLASS_CODE: u32 = 0xff_0000;

/// Size of the config space (region 7), PCI Express extended size.
pub const CONFIG_SPACE_SIZE: u64 = 4096;

/// Config offset of the MSI-X capability (the first capability).
pub const MSIX_CAP_OFFSET: u64 = 0x40;
/// BAR that holds the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 2;
/// Config offset of the MSI capability (when the device has MSI vectors).
pub const MSI_CAP_OFFSET: u64 = 0x50;
/// Default number of MSI vectors.
pub const DEFAULT_MSI_VECTORS: u8 = 4;

/// vfio-user region index of BAR2 (MSI-X table and PBA).
pub const REGION_BAR2: u32 = 2;
/// vfio-user region index of BAR4 (event-channel page).
pub const REGION_BAR4: u32 = 4;

/// Size of BAR0 (control registers).
pub const BAR0_SIZE: u64 = 4096;
/// Smallest size of BAR2 (MSI-X table and PBA).
pub const BAR2_MIN_SIZE: u64 = 8192;
/// Size of BAR4 (event-channel page).
pub const BAR4_SIZE: u64 = 4096;
/// Page size used to place the PBA after the table.
pub const PAGE_SIZE: u64 = 4096;

/// Size of an MSI-X table of `vectors` entries in bytes.
pub const fn msix_table_size(vectors: u16) -> u64 {
    16 * vectors as u64
}

/// Offset of the PBA inside BAR2: the page after the table.
pub const fn msix_pba_offset(vectors: u16) -> u64 {
    msix_table_size(vectors).div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Size of BAR2 for `vectors` MSI-X vectors: the smallest power of two that holds the table
/// and one page of PBA, at least [`BAR2_MIN_SIZE`].
pub const fn bar2_size(vectors: u16) -> u64 {
    let needed = msix_pba_offset(vectors) + PAGE_SIZE;
    let size = needed.next_power_of_two();
    if size < BAR2_MIN_SIZE {
        BAR2_MIN_SIZE
    } else {
        size
    }
}

/// BAR0 `MAGIC` (RO): `0x69726262`.
pub const REG_MAGIC: u64 = 0x000;
/// BAR0 `ABI_VERSION` (RO).
pub const REG_ABI_VERSION: u64 = 0x004;
/// BAR0 `FEATURES` (RO): [`FEATURE_INTX`], [`FEATURE_MSIX`], [`FEATURE_EVTCHN`], [`FEATURE_MSI`].
pub const REG_FEATURES: u64 = 0x008;
/// BAR0 `MSIX_VECTORS` (RO): MSI-X table size.
pub const REG_MSIX_VECTORS: u64 = 0x00c;
/// BAR0 `INTX_ASSERT` (WO): the guest source raises the line.
pub const REG_INTX_ASSERT: u64 = 0x010;
/// BAR0 `INTX_DEASSERT` (WO): the guest source lowers the line.
pub const REG_INTX_DEASSERT: u64 = 0x014;
/// BAR0 `INTX_STATUS` (RO): bit 0 level, bit 1 masked, bit 2 COMMAND.10.
pub const REG_INTX_STATUS: u64 = 0x018;
/// BAR0 `MSIX_FIRE` (WO): value = vector.
pub const REG_MSIX_FIRE: u64 = 0x020;
/// BAR0 `MSIX_MASK` (WO): value = vector; sets its vector-control mask bit.
pub const REG_MSIX_MASK: u64 = 0x024;
/// BAR0 `MSIX_UNMASK` (WO): value = vector; clears its vector-control mask bit.
pub const REG_MSIX_UNMASK: u64 = 0x028;
/// BAR0 `MSI_FIRE` (WO): value = MSI vector index.
pub const REG_MSI_FIRE: u64 = 0x02c;
/// BAR0 `EVTCHN_SEND` (WO): value = port.
pub const REG_EVTCHN_SEND: u64 = 0x030;
/// BAR0 `EVTCHN_BIND` (WO): value = `port | vector << 16`.
pub const REG_EVTCHN_BIND: u64 = 0x034;
/// BAR0 `EVTCHN_UNBIND` (WO): value = port.
pub const REG_EVTCHN_UNBIND: u64 = 0x038;
/// BAR0 `EVTCHN_CLOSE` (WO): value = port.
pub const REG_EVTCHN_CLOSE: u64 = 0x03c;
/// BAR0 `DOORBELL` (WO): offered to the VMM as an ioeventfd.
pub const REG_DOORBELL: u64 = 0x040;
/// BAR0 `DOORBELL_COUNT` (RO).
pub const REG_DOORBELL_COUNT: u64 = 0x044;
/// BAR0 `EVTCHN_UNMASK` (WO): value = port.
pub const REG_EVTCHN_UNMASK: u64 = 0x048;
/// BAR0 `EVTCHN_PORTS` (RO): number of ports.
pub const REG_EVTCHN_PORTS: u64 = 0x04c;
/// BAR0 `EVTCHN_QUERY` (WO): value = port that `EVTCHN_STATUS` reports.
pub const REG_EVTCHN_QUERY: u64 = 0x050;
/// BAR0 `EVTCHN_STATUS` (RO): bits 1:0 state (0 closed, 1 unbound, 2 bound), bits 31:16 vector.
pub const REG_EVTCHN_STATUS: u64 = 0x054;
/// BAR0 `CNT_INTX_TRIGGERS` (RO).
pub const REG_CNT_INTX_TRIGGERS: u64 = 0x100;
/// BAR0 `CNT_INTX_UNMASKS` (RO).
pub const REG_CNT_INTX_UNMASKS: u64 = 0x104;
/// BAR0 `CNT_MSIX_TRIGGERS` (RO).
pub const REG_CNT_MSIX_TRIGGERS: u64 = 0x108;
/// BAR0 `CNT_MSIX_PENDING` (RO).
pub const REG_CNT_MSIX_PENDING: u64 = 0x10c;
/// BAR0 `CNT_EVTCHN_SENDS` (RO).
pub const REG_CNT_EVTCHN_SENDS: u64 = 0x110;
/// BAR0 `CNT_EVTCHN_UPCALLS` (RO).
pub const REG_CNT_EVTCHN_UPCALLS: u64 = 0x114;
/// BAR0 `CNT_BAD_ACCESSES` (RO).
pub const REG_CNT_BAD_ACCESSES: u64 = 0x118;

/// BAR0 `CNT_MSI_TRIGGERS` (RO).
pub const REG_CNT_MSI_TRIGGERS: u64 = 0x11c;
/// BAR0 `CNT_MSI_PENDING` (RO).
pub const REG_CNT_MSI_PENDING: u64 = 0x120;
/// BAR0 `CNT_MSI_DROPPED` (RO): disabled, beyond the enabled count, or without an eventfd.
pub const REG_CNT_MSI_DROPPED: u64 = 0x124;

/// Value of `MAGIC`.
pub const MAGIC: u32 = 0x6972_6262;
/// Value of `ABI_VERSION`.
pub const ABI_VERSION: u32 = 1;
/// `FEATURES` bit 0: INTx.
pub const FEATURE_INTX: u32 = 1 << 0;
/// `FEATURES` bit 1: MSI-X.
pub const FEATURE_MSIX: u32 = 1 << 1;
/// `FEATURES` bit 2: event channels.
pub const FEATURE_EVTCHN: u32 = 1 << 2;
/// `FEATURES` bit 3: MSI (the device has an MSI capability).
pub const FEATURE_MSI: u32 = 1 << 3;
/// `INTX_STATUS` bit 0: line level (any source).
pub const INTX_STATUS_LEVEL: u32 = 1 << 0;
/// `INTX_STATUS` bit 1: line masked.
pub const INTX_STATUS_MASKED: u32 = 1 << 1;
/// `INTX_STATUS` bit 2: COMMAND bit 10.
pub const INTX_STATUS_DISABLED: u32 = 1 << 2;
/// `EVTCHN_STATUS` state: port closed.
pub const EVTCHN_STATUS_CLOSED: u32 = 0;
/// `EVTCHN_STATUS` state: port open without an upcall vector.
pub const EVTCHN_STATUS_UNBOUND: u32 = 1;
/// `EVTCHN_STATUS` state: port bound to the vector in bits 31:16.
pub const EVTCHN_STATUS_BOUND: u32 = 2;

/// INTx source number used by the guest (`INTX_ASSERT` / `INTX_DEASSERT`).
pub const INTX_SOURCE_GUEST: u32 = 0;
/// INTx source number used by the control socket.
pub const INTX_SOURCE_CONTROL: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar2_layout() {
        assert_eq!(msix_pba_offset(1), 4096);
        assert_eq!(msix_pba_offset(16), 4096);
        assert_eq!(msix_pba_offset(256), 4096);
        assert_eq!(msix_pba_offset(257), 8192);
        assert_eq!(msix_pba_offset(2048), 32768);
        assert_eq!(bar2_size(1), 8192);
        assert_eq!(bar2_size(256), 8192);
        assert_eq!(bar2_size(257), 16384);
        assert_eq!(bar2_size(768), 16384);
        assert_eq!(bar2_size(769), 32768);
        assert_eq!(bar2_size(2048), 65536);
    }
}
