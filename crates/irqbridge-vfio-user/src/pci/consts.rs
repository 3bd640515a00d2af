// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! PCI config-space offsets, register bits and capability IDs (PCI Local Bus 3.0, Linux
//! `pci_regs.h` names), plus the vfio-user region and IRQ indexes of a PCI device.

/// Size of a conventional config space.
pub const CONFIG_SPACE_SIZE_CONVENTIONAL: u64 = 256;
/// Size of a PCI Express (extended) config space.
pub const CONFIG_SPACE_SIZE_EXTENDED: u64 = 4096;

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
/// First config offset available to capabilities.
pub const PCI_CAP_START: u64 = 0x40;

/// COMMAND bit 0: I/O space enable.
pub const PCI_COMMAND_IO: u16 = 0x0001;
/// COMMAND bit 1: memory space enable.
pub const PCI_COMMAND_MEMORY: u16 = 0x0002;
/// COMMAND bit 2: bus master enable.
pub const PCI_COMMAND_MASTER: u16 = 0x0004;
/// COMMAND bit 10: INTx disable.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 0x0400;
/// The COMMAND bits a [`PciFunction`](super::PciFunction) implements (all others read 0 and
/// ignore writes).
pub const PCI_COMMAND_WRITABLE: u16 =
    PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;
/// STATUS bit 3: INTx level (read-only, whatever COMMAND bit 10 says).
pub const PCI_STATUS_INTERRUPT: u16 = 0x0008;
/// STATUS bit 4: capability list present.
pub const PCI_STATUS_CAP_LIST: u16 = 0x0010;
/// STATUS error bits, write-1-to-clear: master data parity error (8), signaled target abort
/// (11), received target abort (12), received master abort (13), signaled system error (14),
/// detected parity error (15).
pub const PCI_STATUS_RW1C: u16 = 0xf900;

/// BAR bit 0: I/O space BAR.
pub const PCI_BAR_IO: u32 = 0x1;
/// BAR bits 2:1 = 2: 64-bit memory BAR.
pub const PCI_BAR_MEM64: u32 = 0x4;
/// BAR bit 3: prefetchable memory.
pub const PCI_BAR_PREFETCH: u32 = 0x8;

/// PCI capability ID of MSI.
pub const PCI_CAP_ID_MSI: u8 = 0x05;
/// PCI capability ID of a vendor-specific capability.
pub const PCI_CAP_ID_VNDR: u8 = 0x09;
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
/// Message Control bit 15: MSI-X Enable.
pub const MSIX_CONTROL_ENABLE: u16 = 0x8000;
/// Message Control bit 14: Function Mask.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 0x4000;
/// Message Control bits 10:0: Table Size − 1.
pub const MSIX_CONTROL_TABLE_SIZE: u16 = 0x07ff;

/// Offset of Message Control inside the MSI capability (u16).
pub const MSI_CAP_CONTROL: u64 = 2;
/// Offset of Message Address (low) inside the 64-bit MSI capability (u32).
pub const MSI_CAP_ADDRESS_LO: u64 = 4;
/// Offset of Message Upper Address inside the 64-bit MSI capability (u32).
pub const MSI_CAP_ADDRESS_HI: u64 = 8;
/// Offset of Message Data inside the 64-bit MSI capability (u16).
pub const MSI_CAP_DATA: u64 = 0x0c;
/// Offset of Mask Bits inside the 64-bit MSI capability with per-vector masking (u32).
pub const MSI_CAP_MASK: u64 = 0x10;
/// Offset of Pending Bits inside the 64-bit MSI capability with per-vector masking (u32).
pub const MSI_CAP_PENDING: u64 = 0x14;
/// Size of the 64-bit MSI capability with per-vector masking.
pub const MSI_CAP_SIZE: u64 = 0x18;
/// Size of the 64-bit MSI capability without per-vector masking.
pub const MSI_CAP_SIZE_NO_MASK: u64 = 0x0e;
/// MSI Message Control bit 0: Enable.
pub const MSI_CONTROL_ENABLE: u16 = 0x0001;
/// MSI Message Control bits 3:1: Multiple Message Capable (log2).
pub const MSI_CONTROL_MMC_SHIFT: u16 = 1;
/// MSI Message Control bits 6:4: Multiple Message Enable (log2).
pub const MSI_CONTROL_MME_SHIFT: u16 = 4;
/// MSI Message Control bit 7: 64-bit address capable.
pub const MSI_CONTROL_64BIT: u16 = 0x0080;
/// MSI Message Control bit 8: per-vector masking capable.
pub const MSI_CONTROL_PER_VECTOR_MASK: u16 = 0x0100;

/// vfio-user region index of BAR0; BAR n is region n.
pub const REGION_BAR0: u32 = 0;
/// vfio-user region index of the expansion ROM.
pub const REGION_ROM: u32 = 6;
/// vfio-user region index of the config space.
pub const REGION_CONFIG: u32 = 7;
/// vfio-user region index of VGA.
pub const REGION_VGA: u32 = 8;
/// Number of vfio-user regions of a PCI device.
pub const NUM_REGIONS: u32 = 9;

/// vfio-user IRQ index of INTx.
pub const IRQ_INTX: u32 = 0;
/// vfio-user IRQ index of MSI.
pub const IRQ_MSI: u32 = 1;
/// vfio-user IRQ index of MSI-X.
pub const IRQ_MSIX: u32 = 2;
/// vfio-user IRQ index of the error interrupt.
pub const IRQ_ERR: u32 = 3;
/// vfio-user IRQ index of the device request interrupt.
pub const IRQ_REQ: u32 = 4;
/// Number of vfio-user IRQ indexes of a PCI device.
pub const NUM_IRQS: u32 = 5;
