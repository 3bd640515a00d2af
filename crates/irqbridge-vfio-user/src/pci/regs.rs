//! Guest-visible constants of the irqbridge test device (`docs/device-abi.md`, ABI version 1).
//!
//! Everything here is part of the contract with guest drivers and test harnesses: PCI
//! identity, config-space layout, BAR sizes and the BAR0 register map.

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

/// Config offset of the vendor ID (u16).
pub const PCI_VENDOR_ID: u64 = 0x00;
/// Config offset of the device ID (u16).
pub const PCI_DEVICE_ID: u64 = 0x02;
/// Config offset of COMMAND (u16).
pub const PCI_COMMAND: u64 = 0x04;
/// Config offset of STATUS (u16).
pub const PCI_STATUS: u64 = 0x06;
/// Config offset of the revision ID (u8); the class code follows in 0x09..0x0c.
pub const PCI_REVISION_ID: u64 = 0x08;
/// Config offset of the header type (u8).
pub const PCI_HEADER_TYPE: u64 = 0x0e;
/// Config offset of BAR0; BAR n is at `PCI_BAR0 + 4 n`.
pub const PCI_BAR0: u64 = 0x10;
/// Config offset of the subsystem vendor ID (u16).
pub const PCI_SUBSYSTEM_VENDOR_ID: u64 = 0x2c;
/// Config offset of the subsystem ID (u16).
pub const PCI_SUBSYSTEM_ID: u64 = 0x2e;
/// Config offset of the expansion ROM BAR (u32).
pub const PCI_ROM_ADDRESS: u64 = 0x30;
/// Config offset of the capability pointer (u8).
pub const PCI_CAPABILITY_LIST: u64 = 0x34;
/// Config offset of INTERRUPT_LINE (u8, read-write scratch).
pub const PCI_INTERRUPT_LINE: u64 = 0x3c;
/// Config offset of INTERRUPT_PIN (u8).
pub const PCI_INTERRUPT_PIN: u64 = 0x3d;

/// COMMAND bit 0: I/O space enable.
pub const PCI_COMMAND_IO: u16 = 0x0001;
/// COMMAND bit 1: memory space enable.
pub const PCI_COMMAND_MEMORY: u16 = 0x0002;
/// COMMAND bit 2: bus master enable.
pub const PCI_COMMAND_MASTER: u16 = 0x0004;
/// COMMAND bit 10: INTx disable.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 0x0400;
/// The COMMAND bits the device implements (all others read 0 and ignore writes).
pub const PCI_COMMAND_WRITABLE: u16 =
    PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;
/// STATUS bit 3: INTx level (read-only, whatever COMMAND bit 10 says).
pub const PCI_STATUS_INTERRUPT: u16 = 0x0008;
/// STATUS bit 4: capability list present.
pub const PCI_STATUS_CAP_LIST: u16 = 0x0010;

/// Config offset of the MSI-X capability (the only capability).
pub const MSIX_CAP_OFFSET: u64 = 0x40;
/// PCI capability ID of MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Offset of Message Control inside the MSI-X capability (u16).
pub const MSIX_CAP_CONTROL: u64 = 2;
/// Offset of Table Offset/BIR inside the MSI-X capability (u32).
pub const MSIX_CAP_TABLE: u64 = 4;
/// Offset of PBA Offset/BIR inside the MSI-X capability (u32).
pub const MSIX_CAP_PBA: u64 = 8;
/// Size of the MSI-X capability.
pub const MSIX_CAP_SIZE: u64 = 12;
/// BAR that holds the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 2;
/// Message Control bit 15: MSI-X Enable.
pub const MSIX_CONTROL_ENABLE: u16 = 0x8000;
/// Message Control bit 14: Function Mask.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 0x4000;
/// Message Control bits 10:0: Table Size − 1.
pub const MSIX_CONTROL_TABLE_SIZE: u16 = 0x07ff;

/// vfio-user region index of BAR0 (control registers).
pub const REGION_BAR0: u32 = 0;
/// vfio-user region index of BAR2 (MSI-X table and PBA).
pub const REGION_BAR2: u32 = 2;
/// vfio-user region index of BAR4 (event-channel page).
pub const REGION_BAR4: u32 = 4;
/// vfio-user region index of the expansion ROM (absent).
pub const REGION_ROM: u32 = 6;
/// vfio-user region index of the config space.
pub const REGION_CONFIG: u32 = 7;
/// vfio-user region index of VGA (absent).
pub const REGION_VGA: u32 = 8;
/// Number of vfio-user regions of a PCI device.
pub const NUM_REGIONS: u32 = 9;

/// vfio-user IRQ index of INTx.
pub const IRQ_INTX: u32 = 0;
/// vfio-user IRQ index of MSI (absent: count 0).
pub const IRQ_MSI: u32 = 1;
/// vfio-user IRQ index of MSI-X.
pub const IRQ_MSIX: u32 = 2;
/// vfio-user IRQ index of the error interrupt.
pub const IRQ_ERR: u32 = 3;
/// vfio-user IRQ index of the device request interrupt.
pub const IRQ_REQ: u32 = 4;
/// Number of vfio-user IRQ indexes of a PCI device.
pub const NUM_IRQS: u32 = 5;

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
/// BAR0 `FEATURES` (RO): [`FEATURE_INTX`], [`FEATURE_MSIX`], [`FEATURE_EVTCHN`].
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
