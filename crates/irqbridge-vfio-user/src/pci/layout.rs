// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a PCI function looks like: identity, BARs, capabilities. Built and checked once by
//! [`PciFunctionBuilder`]; fixed for the life of the function (snapshots hold values only and
//! must match it).

use irqbridge_core::msix::MSIX_MAX_VECTORS;

use super::consts::*;
use super::{Error, PciDevice, PciFunction};
use crate::device::SparseArea;

/// PCI identity registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// Vendor ID (0x00).
    pub vendor_id: u16,
    /// Device ID (0x02).
    pub device_id: u16,
    /// Subsystem vendor ID (0x2c).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (0x2e).
    pub subsystem_id: u16,
    /// Class code: class, subclass, programming interface (0x09..0x0c).
    pub class_code: u32,
    /// Revision ID (0x08).
    pub revision: u8,
}

/// The kind of a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR (takes the next BAR slot as its upper half).
    Mem64,
    /// I/O space BAR.
    Io,
}

/// One ioeventfd area of a BAR: the function creates the eventfd, offers it with
/// DEVICE_GET_REGION_IO_FDS and calls [`PciDevice::ioeventfd`] with the count it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoEventArea {
    /// Offset inside the BAR.
    pub offset: u64,
    /// Access size that the ioeventfd matches (1, 2, 4 or 8).
    pub size: u64,
    /// Only writes of this value signal the eventfd.
    pub datamatch: Option<u64>,
}

/// One BAR: size, kind and how the client reaches it.
///
/// Every BAR is trapped (REGION_READ / REGION_WRITE reach [`PciDevice::bar_read`] /
/// [`PciDevice::bar_write`]); sparse-mmap areas are offered with the file of
/// [`PciDevice::bar_mmap_fd`], ioeventfd areas as eventfds the function polls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Size in bytes, a power of two (memory ≥ 16, I/O ≥ 4).
    pub size: u64,
    /// Kind.
    pub kind: BarKind,
    /// Prefetchable (memory BARs only).
    pub prefetchable: bool,
    /// Areas the client may mmap.
    pub mmap_areas: Vec<SparseArea>,
    /// ioeventfd areas.
    pub ioeventfds: Vec<IoEventArea>,
}

impl Bar {
    fn new(size: u64, kind: BarKind) -> Self {
        Bar {
            size,
            kind,
            prefetchable: false,
            mmap_areas: Vec::new(),
            ioeventfds: Vec::new(),
        }
    }

    /// A 32-bit memory BAR of `size` bytes.
    pub fn mem32(size: u64) -> Self {
        Self::new(size, BarKind::Mem32)
    }

    /// A 64-bit memory BAR of `size` bytes.
    pub fn mem64(size: u64) -> Self {
        Self::new(size, BarKind::Mem64)
    }

    /// An I/O BAR of `size` bytes.
    pub fn io(size: u64) -> Self {
        Self::new(size, BarKind::Io)
    }

    /// Marks a memory BAR prefetchable.
    pub fn prefetchable(mut self) -> Self {
        self.prefetchable = true;
        self
    }

    /// Adds an mmap-able area (the device supplies the file with [`PciDevice::bar_mmap_fd`]).
    pub fn mmap(mut self, offset: u64, size: u64) -> Self {
        self.mmap_areas.push(SparseArea { offset, size });
        self
    }

    /// Adds an ioeventfd area.
    pub fn ioeventfd(mut self, offset: u64, size: u64, datamatch: Option<u64>) -> Self {
        self.ioeventfds.push(IoEventArea {
            offset,
            size,
            datamatch,
        });
        self
    }
}

/// Where the MSI-X table and PBA live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    /// Table size (1..=2048).
    pub vectors: u16,
    /// BAR index (BIR) holding table and PBA.
    pub bar: u8,
    /// Table offset in the BAR (8-byte aligned).
    pub table_offset: u64,
    /// PBA offset in the BAR (8-byte aligned).
    pub pba_offset: u64,
}

impl MsixLayout {
    /// Table size in bytes.
    pub fn table_size(&self) -> u64 {
        16 * u64::from(self.vectors)
    }

    /// PBA size in bytes.
    pub fn pba_size(&self) -> u64 {
        8 * u64::from(self.vectors).div_ceil(64)
    }
}

/// One capability in the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CapEntry {
    pub id: u8,
    pub offset: u64,
    pub len: u64,
    /// Vendor capabilities: bytes after the 2-byte header, and their write masks.
    pub body: Vec<u8>,
    pub rw: Vec<u8>,
    pub rw1c: Vec<u8>,
}

/// The checked layout of a function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub(crate) identity: Identity,
    pub(crate) config_size: u64,
    pub(crate) intx: bool,
    pub(crate) bars: [Option<Bar>; 6],
    pub(crate) msix: Option<MsixLayout>,
    pub(crate) msi_vectors: u8,
    pub(crate) msi_mask: bool,
    pub(crate) caps: Vec<CapEntry>,
}

impl Layout {
    /// The identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// BAR `index` (0..6), if present.
    pub fn bar(&self, index: u32) -> Option<&Bar> {
        self.bars.get(usize::try_from(index).ok()?)?.as_ref()
    }

    /// The MSI-X layout, if the function has MSI-X.
    pub fn msix(&self) -> Option<&MsixLayout> {
        self.msix.as_ref()
    }

    /// Number of MSI vectors (0: no MSI capability).
    pub fn msi_vectors(&self) -> u8 {
        self.msi_vectors
    }

    /// Whether the MSI capability has per-vector Mask and Pending Bits.
    pub fn msi_per_vector_mask(&self) -> bool {
        self.msi_mask
    }

    /// Config offset of the capability with `id` (the first one), if present.
    pub fn cap_offset(&self, id: u8) -> Option<u64> {
        self.caps.iter().find(|c| c.id == id).map(|c| c.offset)
    }

    /// Whether the function has an INTx pin.
    pub fn intx(&self) -> bool {
        self.intx
    }

    /// Config space size (256 or 4096).
    pub fn config_size(&self) -> u64 {
        self.config_size
    }
}

#[derive(Clone, Debug)]
enum CapSpec {
    Msix,
    Msi,
    Vendor(Vec<u8>, Vec<u8>, Vec<u8>),
}

/// Capabilities start on this boundary (so MSI-X at 0x40 is followed by MSI at 0x50).
const CAP_ALIGN: u64 = 16;

/// Builds a [`PciFunction`]: identity, BARs, capabilities (placed from 0x40 in the order they
/// are added, each on a 16-byte boundary), INTx pin and config space size. [`build`](Self::build) checks sizes and
/// overlaps.
#[derive(Clone, Debug)]
pub struct PciFunctionBuilder {
    identity: Identity,
    config_size: u64,
    intx: bool,
    bars: [Option<Bar>; 6],
    msix: Option<MsixLayout>,
    msi_vectors: u8,
    msi_mask: bool,
    caps: Vec<CapSpec>,
    /// A BAR index above 5 given to [`bar`](Self::bar), reported by `layout()`.
    bad_bar: Option<u8>,
}

impl PciFunctionBuilder {
    /// A function with `identity`, an INTx pin, a 4 KiB config space and nothing else.
    pub fn new(identity: Identity) -> Self {
        PciFunctionBuilder {
            identity,
            config_size: CONFIG_SPACE_SIZE_EXTENDED,
            intx: true,
            bars: Default::default(),
            msix: None,
            msi_vectors: 0,
            msi_mask: true,
            caps: Vec::new(),
            bad_bar: None,
        }
    }

    /// Config space size: 256 (conventional) or 4096 (extended, the default).
    pub fn config_size(mut self, size: u64) -> Self {
        self.config_size = size;
        self
    }

    /// Whether the function has an INTx pin (INTERRUPT_PIN 1, INTx IRQ count 1).
    pub fn intx(mut self, intx: bool) -> Self {
        self.intx = intx;
        self
    }

    /// Sets BAR `index` (0..6). A 64-bit BAR also takes `index + 1`.
    pub fn bar(mut self, index: u8, bar: Bar) -> Self {
        match self.bars.get_mut(usize::from(index)) {
            Some(slot) => *slot = Some(bar),
            None => self.bad_bar = Some(index),
        }
        self
    }

    /// Adds an MSI-X capability with `vectors` vectors, table and PBA in BAR `bar` at the
    /// given offsets. The function serves table and PBA accesses itself.
    pub fn msix(mut self, vectors: u16, bar: u8, table_offset: u64, pba_offset: u64) -> Self {
        self.msix = Some(MsixLayout {
            vectors,
            bar,
            table_offset,
            pba_offset,
        });
        self.caps.push(CapSpec::Msix);
        self
    }

    /// Adds a 64-bit MSI capability with per-vector masking and `vectors` vectors (1, 2, 4,
    /// 8, 16 or 32). `0` adds nothing.
    pub fn msi(self, vectors: u8) -> Self {
        self.msi_with(vectors, true)
    }

    /// Adds a 64-bit MSI capability with `vectors` vectors, with or without per-vector Mask
    /// and Pending Bits (24 or 14 bytes). `0` adds nothing.
    pub fn msi_with(mut self, vectors: u8, per_vector_mask: bool) -> Self {
        if vectors != 0 {
            self.msi_vectors = vectors;
            self.msi_mask = per_vector_mask;
            self.caps.push(CapSpec::Msi);
        }
        self
    }

    /// Adds a vendor-specific capability (ID 0x09). `body` is what follows the ID and next
    /// pointer (by convention it starts with the capability length); `rw` holds the write mask
    /// of each body byte (shorter masks leave the rest read-only).
    pub fn vendor_cap(self, body: &[u8], rw: &[u8]) -> Self {
        self.vendor_cap_rw1c(body, rw, &[])
    }

    /// [`vendor_cap`](Self::vendor_cap) with write-1-to-clear bits as well: a guest write of 1
    /// to a bit in `rw1c` clears it (the device sets such bits with
    /// [`PciCore::set_config_bytes`](super::PciCore::set_config_bytes)).
    pub fn vendor_cap_rw1c(mut self, body: &[u8], rw: &[u8], rw1c: &[u8]) -> Self {
        let mut mask = rw.to_vec();
        mask.resize(body.len(), 0);
        let mut c = rw1c.to_vec();
        c.resize(body.len(), 0);
        self.caps.push(CapSpec::Vendor(body.to_vec(), mask, c));
        self
    }

    /// Checks and returns the layout.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidLayout`] naming the first problem.
    pub fn layout(self) -> Result<Layout, Error> {
        let bad = |s: String| Err(Error::InvalidLayout(s));
        if let Some(i) = self.bad_bar {
            return bad(format!("BAR index {i} is above 5"));
        }
        if !matches!(
            self.config_size,
            CONFIG_SPACE_SIZE_CONVENTIONAL | CONFIG_SPACE_SIZE_EXTENDED
        ) {
            return bad(format!(
                "config space size {} is not 256 or 4096",
                self.config_size
            ));
        }
        for (i, bar) in self.bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let min = if bar.kind == BarKind::Io { 4 } else { 16 };
            let max = match bar.kind {
                BarKind::Io => 1 << 16,
                BarKind::Mem32 => 1 << 31,
                BarKind::Mem64 => 1 << 62,
            };
            if !bar.size.is_power_of_two() || bar.size < min || bar.size > max {
                return bad(format!("BAR{i} size {:#x} is not valid", bar.size));
            }
            if bar.kind == BarKind::Mem64
                && (i == 5 || self.bars.get(i + 1).is_some_and(Option::is_some))
            {
                return bad(format!("64-bit BAR{i} needs BAR{} free", i + 1));
            }
            if bar.kind == BarKind::Io && (bar.prefetchable || !bar.mmap_areas.is_empty()) {
                return bad(format!("I/O BAR{i} cannot be prefetchable or mmapped"));
            }
            let inside = |o: u64, s: u64| o.checked_add(s).is_some_and(|e| e <= bar.size);
            for a in &bar.mmap_areas {
                if a.size == 0 || !inside(a.offset, a.size) || a.offset % 4096 != 0 {
                    return bad(format!("BAR{i} mmap area {a:?} is not valid"));
                }
            }
            for e in &bar.ioeventfds {
                if !matches!(e.size, 1 | 2 | 4 | 8) || !inside(e.offset, e.size) {
                    return bad(format!("BAR{i} ioeventfd area {e:?} is not valid"));
                }
            }
        }
        if let Some(x) = &self.msix {
            if x.vectors == 0 || x.vectors > MSIX_MAX_VECTORS {
                return bad(format!("MSI-X table size {} is not in 1..=2048", x.vectors));
            }
            let Some(Some(bar)) = self.bars.get(usize::from(x.bar)) else {
                return bad(format!("MSI-X BAR{} is not defined", x.bar));
            };
            if bar.kind == BarKind::Io {
                return bad("the MSI-X BAR must be a memory BAR".into());
            }
            let (t, p) = (
                (x.table_offset, x.table_size()),
                (x.pba_offset, x.pba_size()),
            );
            let overlaps = |a: (u64, u64), b: (u64, u64)| a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
            if t.0 % 8 != 0 || p.0 % 8 != 0 || t.0 + t.1 > bar.size || p.0 + p.1 > bar.size {
                return bad("MSI-X table or PBA is misaligned or outside its BAR".into());
            }
            if overlaps(t, p) {
                return bad("MSI-X table and PBA overlap".into());
            }
            if bar
                .mmap_areas
                .iter()
                .any(|a| overlaps((a.offset, a.size), t) || overlaps((a.offset, a.size), p))
            {
                return bad("an mmap area covers the MSI-X table or PBA".into());
            }
        }
        if self.msi_vectors != 0 && irqbridge_core::Msi::new(self.msi_vectors).is_err() {
            return bad(format!(
                "MSI vector count {} is not 1, 2, 4, 8, 16 or 32",
                self.msi_vectors
            ));
        }
        let mut caps = Vec::new();
        let mut offset = PCI_CAP_START;
        for spec in self.caps {
            let (id, len, body, rw, rw1c) = match spec {
                CapSpec::Msix => (PCI_CAP_ID_MSIX, MSIX_CAP_SIZE, vec![], vec![], vec![]),
                CapSpec::Msi => {
                    let shape = super::parts::MsiShape {
                        is64: true,
                        per_vector_mask: self.msi_mask,
                    };
                    (PCI_CAP_ID_MSI, shape.size(), vec![], vec![], vec![])
                }
                CapSpec::Vendor(body, rw, c) => {
                    (PCI_CAP_ID_VNDR, 2 + body.len() as u64, body, rw, c)
                }
            };
            if caps
                .iter()
                .any(|c: &CapEntry| c.id == id && id != PCI_CAP_ID_VNDR)
            {
                return bad(format!("capability {id:#x} added twice"));
            }
            if offset + len > CONFIG_SPACE_SIZE_CONVENTIONAL {
                return bad("the capabilities do not fit below 0x100".into());
            }
            caps.push(CapEntry {
                id,
                offset,
                len,
                body,
                rw,
                rw1c,
            });
            offset = (offset + len).next_multiple_of(CAP_ALIGN);
        }
        Ok(Layout {
            identity: self.identity,
            config_size: self.config_size,
            intx: self.intx,
            bars: self.bars,
            msix: self.msix,
            msi_vectors: self.msi_vectors,
            msi_mask: self.msi_mask,
            caps,
        })
    }

    /// Checks the layout and builds the function around `device`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidLayout`] for a bad layout, [`Error::Io`] if an ioeventfd cannot be
    /// created.
    pub fn build<D: PciDevice>(self, device: D) -> Result<PciFunction<D>, Error> {
        PciFunction::from_layout(self.layout()?, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> PciFunctionBuilder {
        PciFunctionBuilder::new(Identity::default())
    }

    #[test]
    fn bad_layouts_are_rejected() {
        let cases = [
            b().config_size(512),
            b().bar(6, Bar::mem32(4096)),
            b().bar(0, Bar::mem32(3000)),
            b().bar(0, Bar::mem32(8)),
            b().bar(5, Bar::mem64(4096)),
            b().bar(0, Bar::mem64(4096)).bar(1, Bar::mem32(4096)),
            b().bar(0, Bar::io(16).prefetchable()),
            b().bar(0, Bar::mem32(4096).mmap(0, 8192)),
            b().bar(0, Bar::mem32(4096).ioeventfd(4094, 4, None)),
            b().msix(4, 1, 0, 0x800),
            b().bar(1, Bar::mem32(4096)).msix(0, 1, 0, 0x800),
            b().bar(1, Bar::mem32(4096)).msix(4, 1, 0, 0x20),
            b().bar(1, Bar::mem32(4096)).msix(4, 1, 0, 0x1000),
            b().bar(1, Bar::mem32(8192).mmap(0, 4096))
                .msix(4, 1, 0, 0x800),
            b().msi(3),
            b().msi(64),
            b().vendor_cap(&[200; 200], &[]),
            b().msi(1).msi(2),
        ];
        for (i, c) in cases.into_iter().enumerate() {
            assert!(c.layout().is_err(), "case {i}");
        }
    }

    #[test]
    fn caps_are_placed_in_order_and_aligned() {
        let l = b()
            .bar(2, Bar::mem32(8192))
            .vendor_cap(&[5, 1, 2], &[])
            .msix(16, 2, 0, 0x1000)
            .msi(32)
            .layout()
            .unwrap();
        let offs: Vec<_> = l.caps.iter().map(|c| (c.id, c.offset)).collect();
        assert_eq!(offs, vec![(0x09, 0x40), (0x11, 0x50), (0x05, 0x60)]);
        assert_eq!(l.cap_offset(PCI_CAP_ID_MSI), Some(0x60));
        assert_eq!(l.msi_vectors(), 32);
        assert_eq!(l.msix().unwrap().pba_size(), 8);
        let l = b()
            .msi_with(2, false)
            .vendor_cap(&[3], &[])
            .layout()
            .unwrap();
        let offs: Vec<_> = l.caps.iter().map(|c| (c.id, c.offset, c.len)).collect();
        assert_eq!(offs, vec![(0x05, 0x40, 0x0e), (0x09, 0x50, 3)]);
        assert!(!l.msi_per_vector_mask());
    }
}
