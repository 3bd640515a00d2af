// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Config-space virtualization of a passed-through device.
//!
//! Every byte of config space is either **virtual** (served from a copy in the server, written
//! through a per-byte write mask, never reaching the host) or **host** (read from and written
//! to the VFIO config region, where the kernel's vfio-pci applies its own permission masks:
//! COMMAND I/O, memory, bus master and INTx disable reach it, read-only fields stay as they
//! are). Virtual, like a VFIO user such as QEMU makes them:
//!
//! - the six BARs and the expansion ROM BAR: the host's type bits and sizes (from the region
//!   info), address bits writable, so sizing with all-ones writes is answered from the copy;
//! - the capability pointer and every capability's ID and next pointer (read-only);
//! - the whole MSI capability: Message Control here (Enable and Multiple Message Enable
//!   writable, the rest as the host has it; enabling MSI on the host is done with `SET_IRQS`,
//!   not with config writes), address, data, mask and pending bits in the MSI model of
//!   `irqbridge-core`, laid out and written by the same code as the
//!   [`PciFunction`](crate::pci::PciFunction) model (`MsiCap::window`);
//! - the whole MSI-X capability (Enable and Function Mask writable, table and PBA location
//!   read-only).

use crate::pci::BarKind;
use crate::pci::config::ConfigSpace;
use crate::pci::parts::{MsiShape, MsiWindow, bar_address_masks};

use crate::pci::consts::{
    CONFIG_SPACE_SIZE_CONVENTIONAL, CONFIG_SPACE_SIZE_EXTENDED, PCI_BAR0, PCI_CAPABILITY_LIST,
    PCI_ROM_ADDRESS, PCI_STATUS, PCI_STATUS_CAP_LIST,
};
pub use crate::pci::consts::{PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX};

/// PCI config space size of a conventional device.
pub const PCI_CONFIG_SIZE: usize = CONFIG_SPACE_SIZE_CONVENTIONAL as usize;
/// PCIe config space size.
pub const PCIE_CONFIG_SIZE: usize = CONFIG_SPACE_SIZE_EXTENDED as usize;
/// Config offsets as indexes of the image.
const BAR0: usize = PCI_BAR0 as usize;
const ROM: usize = PCI_ROM_ADDRESS as usize;
const CAP_PTR: usize = PCI_CAPABILITY_LIST as usize;

/// The MSI capability of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiCap {
    /// Offset in config space.
    pub offset: usize,
    /// 64-bit address.
    pub is64: bool,
    /// Per-vector masking.
    pub pvm: bool,
    /// Multiple Message Capable: log2 of the vectors the device supports.
    pub mmc: u8,
}

impl MsiCap {
    pub(crate) fn shape(&self) -> MsiShape {
        MsiShape {
            is64: self.is64,
            per_vector_mask: self.pvm,
        }
    }
    /// The registers the MSI model serves: address, data, mask and pending bits (Message
    /// Control is virtual bytes here).
    pub(crate) fn window(&self) -> MsiWindow {
        MsiWindow {
            cap: self.offset as u64,
            from: 4,
            shape: self.shape(),
        }
    }
    /// Message Control.
    pub fn control_off(&self) -> usize {
        self.offset + 2
    }
    /// Message Data.
    pub fn data_off(&self) -> usize {
        self.offset + self.shape().data() as usize
    }
    /// Mask Bits (PVM only).
    pub fn mask_off(&self) -> usize {
        self.offset + self.shape().mask() as usize
    }
    /// Pending Bits (PVM only).
    pub fn pending_off(&self) -> usize {
        self.offset + self.shape().pending() as usize
    }
    /// Bytes of the capability.
    pub fn size(&self) -> usize {
        self.shape().size() as usize
    }
    /// Vectors the device supports.
    pub fn vectors(&self) -> u32 {
        1 << self.mmc.min(5)
    }
}

/// The MSI-X capability of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    /// Offset in config space.
    pub offset: usize,
    /// Table size (vectors).
    pub vectors: u16,
    /// BAR of the table.
    pub table_bar: u8,
    /// Offset of the table in its BAR.
    pub table_offset: u64,
    /// BAR of the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR.
    pub pba_offset: u64,
}

impl MsixCap {
    /// Bytes of the table.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * 16
    }
    /// Bytes of the PBA.
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// What a virtual config write changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigChange {
    /// MSI Message Control was written.
    pub msi: bool,
    /// MSI-X Message Control was written.
    pub msix_control: bool,
}

/// One BAR as the host reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostBar {
    /// Region size (0: no BAR).
    pub size: u64,
}

/// The virtual part of config space and the map of which bytes are virtual.
#[derive(Clone, Debug)]
pub struct VirtConfig {
    size: usize,
    virt: Vec<bool>,
    /// The virtual bytes and their write masks (the pci model's config image).
    space: ConfigSpace,
    msi: Option<MsiCap>,
    msix: Option<MsixCap>,
}

fn get_u16(b: &[u8], off: usize) -> u16 {
    let lo = b.get(off).copied().unwrap_or(0);
    let hi = b.get(off + 1).copied().unwrap_or(0);
    u16::from_le_bytes([lo, hi])
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from(get_u16(b, off)) | (u32::from(get_u16(b, off + 2)) << 16)
}

impl VirtConfig {
    /// Builds the virtual copy from the host's config bytes (`host.len()` is the config
    /// region size, 256 or 4096; longer is cut to 4096), the BAR sizes (regions 0-5) and the
    /// ROM size (region 6).
    pub fn new(host: &[u8], bars: [HostBar; 6], rom_size: u64) -> VirtConfig {
        let size = host.len().clamp(PCI_CONFIG_SIZE, PCIE_CONFIG_SIZE);
        let mut c = VirtConfig {
            size,
            virt: vec![false; size],
            space: ConfigSpace::blank(size),
            msi: None,
            msix: None,
        };
        let host_byte = |off: usize| host.get(off).copied().unwrap_or(0);

        // BARs.
        let mut i = 0;
        while i < 6 {
            let off = BAR0 + 4 * i;
            let raw = get_u32(host, off);
            let sz = bars[i].size;
            if sz == 0 {
                c.set_virtual(off, 0, 0, 4);
                i += 1;
                continue;
            }
            // The host's type bits, the address bits the size leaves writable.
            let (kind, flags) = match raw & 1 {
                1 => (BarKind::Io, raw & 1),
                _ if (raw >> 1) & 3 == 2 && i < 5 => (BarKind::Mem64, raw & 0xf),
                _ => (BarKind::Mem32, raw & 0xf),
            };
            let (lo_mask, hi_mask) = bar_address_masks(kind, sz);
            c.set_virtual(off, (raw & lo_mask) | flags, lo_mask, 4);
            if kind == BarKind::Mem64 {
                let hi_off = off + 4;
                c.set_virtual(hi_off, get_u32(host, hi_off) & hi_mask, hi_mask, 4);
                i += 2;
            } else {
                i += 1;
            }
        }
        // Expansion ROM.
        if rom_size > 0 {
            let mask = (!(rom_size.next_power_of_two().saturating_sub(1)) as u32) & 0xffff_f800;
            let raw = get_u32(host, ROM);
            c.set_virtual(ROM, raw & (mask | 1), mask | 1, 4);
        } else {
            c.set_virtual(ROM, 0, 0, 4);
        }

        // Capability list.
        if u16::from(host_byte(PCI_STATUS as usize)) & PCI_STATUS_CAP_LIST != 0 {
            c.set_virtual(CAP_PTR, u32::from(host_byte(CAP_PTR)), 0, 1);
            let mut ptr = usize::from(host_byte(CAP_PTR) & 0xfc);
            let mut seen = 0;
            while ptr >= 0x40 && ptr + 2 <= PCI_CONFIG_SIZE && seen < 48 {
                seen += 1;
                let id = host_byte(ptr);
                let next = host_byte(ptr + 1);
                c.set_virtual(ptr, u32::from(id), 0, 1);
                c.set_virtual(ptr + 1, u32::from(next), 0, 1);
                match id {
                    PCI_CAP_ID_MSI if c.msi.is_none() => c.add_msi(host, ptr),
                    PCI_CAP_ID_MSIX if c.msix.is_none() => c.add_msix(host, ptr),
                    _ => {}
                }
                ptr = usize::from(next & 0xfc);
            }
        }
        c
    }

    fn add_msi(&mut self, host: &[u8], ptr: usize) {
        let ctrl = get_u16(host, ptr + 2);
        let cap = MsiCap {
            offset: ptr,
            is64: ctrl & 0x80 != 0,
            pvm: ctrl & 0x100 != 0,
            mmc: ((ctrl >> 1) & 7) as u8,
        };
        if cap.offset + cap.size() > PCI_CONFIG_SIZE {
            return;
        }
        // Enable (bit 0) and Multiple Message Enable (bits 6:4) writable; the rest as the
        // device has it, with Enable and MME cleared.
        self.set_virtual(cap.control_off(), u32::from(ctrl & !0x71), 0x71, 2);
        // The registers after Message Control: virtual, served by the MSI model (the
        // bytes here stay 0 and read-only).
        for o in (ptr + 4..ptr + cap.size()).step_by(4) {
            self.set_virtual(o, 0, 0, (ptr + cap.size() - o).min(4));
        }
        self.msi = Some(cap);
    }

    fn add_msix(&mut self, host: &[u8], ptr: usize) {
        if ptr + 12 > PCI_CONFIG_SIZE {
            return;
        }
        let ctrl = get_u16(host, ptr + 2);
        let table = get_u32(host, ptr + 4);
        let pba = get_u32(host, ptr + 8);
        // Enable (15) and Function Mask (14) writable, both clear at first.
        self.set_virtual(ptr + 2, u32::from(ctrl & 0x07ff), 0xc000, 2);
        self.set_virtual(ptr + 4, table, 0, 4);
        self.set_virtual(ptr + 8, pba, 0, 4);
        self.msix = Some(MsixCap {
            offset: ptr,
            vectors: (ctrl & 0x07ff) + 1,
            table_bar: (table & 7) as u8,
            table_offset: u64::from(table & !7),
            pba_bar: (pba & 7) as u8,
            pba_offset: u64::from(pba & !7),
        });
    }

    fn set_virtual(&mut self, off: usize, value: u32, wmask: u32, len: usize) {
        for i in 0..len.min(4) {
            let o = off + i;
            if let Some(v) = self.virt.get_mut(o) {
                *v = true;
                let (value, wmask) = ((value >> (8 * i)) as u8, (wmask >> (8 * i)) as u8);
                self.space.set_power_on(o as u64, value, wmask);
            }
        }
    }

    /// Config space size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The MSI capability, if the device has one.
    pub fn msi(&self) -> Option<MsiCap> {
        self.msi
    }

    /// The MSI-X capability, if the device has one.
    pub fn msix(&self) -> Option<MsixCap> {
        self.msix
    }

    /// Splits an access of `len` bytes at `offset` into runs of virtual (`true`) and host
    /// (`false`) bytes: `(offset, len, virtual)`. Bytes past the config size are host bytes
    /// (the caller checks bounds first).
    pub fn runs(&self, offset: usize, len: usize) -> Vec<(usize, usize, bool)> {
        let mut out: Vec<(usize, usize, bool)> = Vec::new();
        for o in offset..offset.saturating_add(len) {
            let v = self.virt.get(o).copied().unwrap_or(false);
            match out.last_mut() {
                Some((_, l, lv)) if *lv == v => *l += 1,
                _ => out.push((o, 1, v)),
            }
        }
        out
    }

    /// Reads virtual bytes at `offset`.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.space.byte((offset + i) as u64);
        }
    }

    /// Writes virtual bytes at `offset` through the write mask and reports what changed.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> ConfigChange {
        let mut ch = ConfigChange::default();
        for (i, v) in data.iter().enumerate() {
            let o = offset + i;
            self.space.write_byte(o as u64, *v);
            if self
                .msi
                .is_some_and(|m| (m.control_off()..m.control_off() + 2).contains(&o))
            {
                ch.msi = true;
            }
            if let Some(x) = self.msix {
                if o == x.offset + 2 || o == x.offset + 3 {
                    ch.msix_control = true;
                }
            }
        }
        ch
    }

    /// A 32-bit virtual value (for the device's own use).
    pub fn get32(&self, offset: usize) -> u32 {
        self.space.dword(offset as u64)
    }

    /// A 16-bit virtual value (for the device's own use).
    pub fn get16(&self, offset: usize) -> u16 {
        self.space.word(offset as u64)
    }

    /// MSI Enable.
    pub fn msi_enabled(&self) -> bool {
        self.msi
            .is_some_and(|m| self.get16(m.control_off()) & 1 != 0)
    }

    /// MSI-X Enable and Function Mask as written.
    pub fn msix_control(&self) -> (bool, bool) {
        match self.msix {
            Some(x) => {
                let c = self.get16(x.offset + 2);
                (c & 0x8000 != 0, c & 0x4000 != 0)
            }
            None => (false, false),
        }
    }

    /// Back to the state at open: BAR addresses and ROM as the host had them, MSI and MSI-X
    /// disabled and unmasked, pending bits clear.
    pub fn reset(&mut self) {
        self.space.reset();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A config image: 64-bit prefetchable 16 KiB BAR0/1, I/O BAR2 (32 bytes), 32-bit 1 MiB
    /// BAR3, MSI at 0x50 (64-bit, PVM, 4 vectors), MSI-X at 0x70 (5 vectors, table in BAR3
    /// at 0, PBA at 0x2000), a PM cap at 0x40.
    pub(crate) fn image() -> (Vec<u8>, [HostBar; 6]) {
        let mut c = vec![0u8; 256];
        c[0..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
        c[6] = PCI_STATUS_CAP_LIST as u8;
        c[0x10..0x14].copy_from_slice(&(0xfe00_0000u32 | 0xc).to_le_bytes());
        c[0x14..0x18].copy_from_slice(&0x1u32.to_le_bytes());
        c[0x18..0x1c].copy_from_slice(&0xc001u32.to_le_bytes());
        c[0x1c..0x20].copy_from_slice(&0xfd00_0000u32.to_le_bytes());
        c[CAP_PTR] = 0x40;
        c[0x40] = 0x01;
        c[0x41] = 0x50;
        c[0x42] = 0x03;
        c[0x50] = PCI_CAP_ID_MSI;
        c[0x51] = 0x70;
        // 64-bit, PVM, MMC = 2 (4 vectors).
        c[0x52..0x54].copy_from_slice(&(0x80u16 | 0x100 | (2 << 1)).to_le_bytes());
        c[0x70] = PCI_CAP_ID_MSIX;
        c[0x71] = 0;
        c[0x72..0x74].copy_from_slice(&4u16.to_le_bytes());
        c[0x74..0x78].copy_from_slice(&3u32.to_le_bytes());
        c[0x78..0x7c].copy_from_slice(&(0x2000u32 | 3).to_le_bytes());
        let bars = [
            HostBar { size: 0x4000 },
            HostBar { size: 0 },
            HostBar { size: 32 },
            HostBar { size: 0x10_0000 },
            HostBar { size: 0 },
            HostBar { size: 0 },
        ];
        (c, bars)
    }

    fn w32(c: &mut VirtConfig, off: usize, v: u32) -> ConfigChange {
        c.write(off, &v.to_le_bytes())
    }

    #[test]
    fn bars_are_sized_from_the_virtual_copy() {
        let (img, bars) = image();
        let mut c = VirtConfig::new(&img, bars, 0);
        assert_eq!(c.get32(0x10), 0xfe00_000c);
        assert_eq!(
            c.get32(0x14),
            1,
            "upper half of the 64-bit BAR keeps its address"
        );
        for off in [0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x30] {
            w32(&mut c, off, 0xffff_ffff);
        }
        assert_eq!(c.get32(0x10), 0xffff_c00c, "16 KiB, 64-bit prefetchable");
        assert_eq!(c.get32(0x14), 0xffff_ffff);
        assert_eq!(c.get32(0x18), 0xffff_ffe1, "32-byte I/O BAR");
        assert_eq!(c.get32(0x1c), 0xfff0_0000, "1 MiB memory BAR");
        assert_eq!(c.get32(0x20), 0, "absent BAR");
        assert_eq!(c.get32(0x24), 0);
        assert_eq!(c.get32(0x30), 0, "no ROM");
        w32(&mut c, 0x1c, 0xd012_3456);
        assert_eq!(c.get32(0x1c), 0xd010_0000);
        c.reset();
        assert_eq!(c.get32(0x1c), 0xfd00_0000);
    }

    #[test]
    fn rom_sizing_and_enable_bit() {
        let (mut img, bars) = image();
        img[0x30..0x34].copy_from_slice(&0xfeb0_0000u32.to_le_bytes());
        let mut c = VirtConfig::new(&img, bars, 0x10000);
        w32(&mut c, 0x30, 0xffff_ffff);
        assert_eq!(c.get32(0x30), 0xffff_0001);
    }

    #[test]
    fn which_bytes_are_virtual() {
        let (img, bars) = image();
        let c = VirtConfig::new(&img, bars, 0);
        // IDs, COMMAND, STATUS: host. BARs: virtual.
        assert_eq!(c.runs(0, 8), vec![(0, 8, false)]);
        assert_eq!(c.runs(0x0c, 8), vec![(0x0c, 4, false), (0x10, 4, true)]);
        // PM cap: header virtual, PMC/PMCSR host.
        assert_eq!(c.runs(0x40, 8), vec![(0x40, 2, true), (0x42, 6, false)]);
        // MSI (64-bit + PVM): 0x50..0x68 virtual.
        assert_eq!(
            c.runs(0x4c, 0x20),
            vec![(0x4c, 4, false), (0x50, 0x18, true), (0x68, 4, false)]
        );
        // MSI-X: 12 bytes.
        assert_eq!(c.runs(0x70, 16), vec![(0x70, 12, true), (0x7c, 4, false)]);
        assert_eq!(c.runs(0x3c, 2), vec![(0x3c, 2, false)]);
    }

    #[test]
    fn msi_and_msix_caps_are_parsed_and_virtual() {
        let (img, bars) = image();
        let mut c = VirtConfig::new(&img, bars, 0);
        let msi = c.msi().unwrap();
        assert_eq!(
            (msi.offset, msi.is64, msi.pvm, msi.vectors()),
            (0x50, true, true, 4)
        );
        assert_eq!((msi.mask_off(), msi.pending_off()), (0x60, 0x64));
        let x = c.msix().unwrap();
        assert_eq!(
            (
                x.vectors,
                x.table_bar,
                x.table_offset,
                x.pba_bar,
                x.pba_offset
            ),
            (5, 3, 0, 3, 0x2000)
        );
        // MSI enable + MME.
        let ch = c.write(0x52, &[0x71, 0xff]);
        assert!(ch.msi && !ch.msix_control);
        assert!(c.msi_enabled());
        assert_eq!(c.get16(0x52), 0x180 | (2 << 1) | 0x71);
        // Address, data, mask and pending bits belong to the MSI model (their write masks are
        // tested in device/tests.rs); here they stay 0.
        assert_eq!(
            (
                msi.window().register(0x53),
                msi.window().register(0x54),
                msi.window().register(0x67)
            ),
            (None, Some(4), Some(0x17))
        );
        assert_eq!(msi.window().register(0x68), None);
        let ch = w32(&mut c, 0x60, 0xffff_ffff);
        assert_eq!(ch, ConfigChange::default());
        assert_eq!(c.get32(0x60), 0);
        // MSI-X: Enable and Function Mask writable, table size and location not.
        let ch = c.write(0x72, &[0xff, 0xff]);
        assert!(ch.msix_control);
        assert_eq!(c.get16(0x72), 0xc004);
        assert_eq!(c.msix_control(), (true, true));
        w32(&mut c, 0x74, 0);
        assert_eq!(c.get32(0x74), 3);
        // Capability pointers are read-only.
        c.write(CAP_PTR, &[0x80]);
        assert_eq!(c.get16(CAP_PTR) & 0xff, 0x40);
        c.write(0x51, &[0]);
        assert_eq!(c.get16(0x50), 0x7005);
        c.reset();
        assert!(!c.msi_enabled());
        assert_eq!(c.msix_control(), (false, false));
    }

    #[test]
    fn a_looping_cap_list_ends() {
        let (mut img, bars) = image();
        img[0x71] = 0x40;
        let c = VirtConfig::new(&img, bars, 0);
        assert!(c.msix().is_some());
        // Garbage pointers below 0x40 stop the walk.
        let (mut img, bars) = image();
        img[CAP_PTR] = 0x10;
        let c = VirtConfig::new(&img, bars, 0);
        assert!(c.msi().is_none() && c.msix().is_none());
    }
}
