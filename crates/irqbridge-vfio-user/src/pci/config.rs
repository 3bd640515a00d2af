// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The config-space image of a [`PciFunction`](super::PciFunction): bytes plus per-byte write
//! masks, built from the function's layout.
//!
//! Each bit is described once. The image holds the static fields (identity, BAR flags,
//! capability headers) and the plain read-write registers (COMMAND, BARs, INTERRUPT_LINE,
//! writable vendor-capability bytes), each byte with an `rw` mask (writes replace the bits) and
//! an `rw1c` mask (writing 1 clears the bit). Bits that mirror an interrupt model (STATUS bit
//! 3, MSI-X Message Control, the MSI capability's registers) are not kept in the image: they
//! are overlaid from the model on reads and handed to the model on writes, see
//! [`ConfigSpace::owner`].

use super::consts::*;
use super::layout::{BarKind, Layout};
use super::parts::bar_address_masks;

/// A config-space register that belongs to an interrupt model rather than to the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Owner {
    /// MSI-X Message Control; the byte index inside the 16-bit register.
    MsixControl(u64),
    /// The MSI capability; the byte index from the capability start (2..size).
    Msi(u64),
}

/// Config-space bytes and write masks.
#[derive(Clone, Debug)]
pub(crate) struct ConfigSpace {
    bytes: Box<[u8]>,
    rw: Box<[u8]>,
    rw1c: Box<[u8]>,
    power_on: Box<[u8]>,
    msix_cap: Option<u64>,
    msi_cap: Option<(u64, u64)>,
}

fn put(buf: &mut [u8], offset: u64, value: &[u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    if let Some(dst) = start
        .checked_add(value.len())
        .and_then(|end| buf.get_mut(start..end))
    {
        dst.copy_from_slice(value);
    }
}

impl ConfigSpace {
    /// The power-on image for `layout` (already checked by the builder).
    pub fn new(layout: &Layout) -> Self {
        let size = usize::try_from(layout.config_size).unwrap_or(256);
        let mut b = vec![0u8; size].into_boxed_slice();
        let mut m = vec![0u8; size].into_boxed_slice();
        let mut c = vec![0u8; size].into_boxed_slice();
        let id = &layout.identity;
        put(&mut b, PCI_VENDOR_ID, &id.vendor_id.to_le_bytes());
        put(&mut b, PCI_DEVICE_ID, &id.device_id.to_le_bytes());
        put(&mut b, PCI_REVISION_ID, &[id.revision]);
        put(
            &mut b,
            PCI_REVISION_ID + 1,
            &id.class_code.to_le_bytes()[..3],
        );
        put(&mut b, PCI_HEADER_TYPE, &[0]);
        put(
            &mut b,
            PCI_SUBSYSTEM_VENDOR_ID,
            &id.subsystem_vendor_id.to_le_bytes(),
        );
        put(&mut b, PCI_SUBSYSTEM_ID, &id.subsystem_id.to_le_bytes());
        put(&mut b, PCI_INTERRUPT_PIN, &[u8::from(layout.intx)]);
        put(&mut m, PCI_COMMAND, &PCI_COMMAND_WRITABLE.to_le_bytes());
        put(&mut m, PCI_INTERRUPT_LINE, &[0xff]);
        put(&mut c, PCI_STATUS, &PCI_STATUS_RW1C.to_le_bytes());

        for (i, bar) in layout.bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let off = PCI_BAR0 + 4 * i as u64;
            let (low_mask, high_mask) = bar_address_masks(bar.kind, bar.size);
            let flags = match bar.kind {
                BarKind::Io => PCI_BAR_IO,
                BarKind::Mem32 => 0,
                BarKind::Mem64 => PCI_BAR_MEM64,
            };
            let flags = flags
                | if bar.prefetchable {
                    PCI_BAR_PREFETCH
                } else {
                    0
                };
            put(&mut b, off, &flags.to_le_bytes());
            put(&mut m, off, &low_mask.to_le_bytes());
            if bar.kind == BarKind::Mem64 {
                put(&mut m, off + 4, &high_mask.to_le_bytes());
            }
        }

        let mut msix_cap = None;
        let mut msi_cap = None;
        if let Some(first) = layout.caps.first() {
            put(&mut b, PCI_STATUS, &PCI_STATUS_CAP_LIST.to_le_bytes());
            put(&mut b, PCI_CAPABILITY_LIST, &[first.offset as u8]);
        }
        for (i, cap) in layout.caps.iter().enumerate() {
            let next = layout.caps.get(i + 1).map_or(0, |n| n.offset as u8);
            put(&mut b, cap.offset, &[cap.id, next]);
            match cap.id {
                PCI_CAP_ID_MSIX => {
                    msix_cap = Some(cap.offset);
                    if let Some(x) = &layout.msix {
                        let ts = (x.vectors - 1) & MSIX_CONTROL_TABLE_SIZE;
                        put(&mut b, cap.offset + MSIX_CAP_CONTROL, &ts.to_le_bytes());
                        let t = x.table_offset as u32 | u32::from(x.bar);
                        let p = x.pba_offset as u32 | u32::from(x.bar);
                        put(&mut b, cap.offset + MSIX_CAP_TABLE, &t.to_le_bytes());
                        put(&mut b, cap.offset + MSIX_CAP_PBA, &p.to_le_bytes());
                    }
                }
                PCI_CAP_ID_MSI => {
                    msi_cap = Some((cap.offset, cap.len));
                }
                _ => {
                    put(&mut b, cap.offset + 2, &cap.body);
                    put(&mut m, cap.offset + 2, &cap.rw);
                    put(&mut c, cap.offset + 2, &cap.rw1c);
                }
            }
        }
        ConfigSpace {
            power_on: b.clone(),
            bytes: b,
            rw: m,
            rw1c: c,
            msix_cap,
            msi_cap,
        }
    }

    /// An image of `size` zero bytes without write masks, filled byte by byte with
    /// [`set_power_on`](Self::set_power_on): the virtual bytes of a function that is not
    /// built from a [`Layout`] (a passed-through host device).
    pub fn blank(size: usize) -> Self {
        let zeros = vec![0u8; size].into_boxed_slice();
        ConfigSpace {
            bytes: zeros.clone(),
            rw: zeros.clone(),
            rw1c: zeros.clone(),
            power_on: zeros,
            msix_cap: None,
            msi_cap: None,
        }
    }

    /// Sets one byte's power-on (and current) value and its read-write mask; outside the
    /// image it is ignored.
    pub fn set_power_on(&mut self, offset: u64, value: u8, rw: u8) {
        let Ok(i) = usize::try_from(offset) else {
            return;
        };
        if let (Some(b), Some(p), Some(m)) = (
            self.bytes.get_mut(i),
            self.power_on.get_mut(i),
            self.rw.get_mut(i),
        ) {
            (*b, *p, *m) = (value, value, rw);
        }
    }

    /// Which interrupt model owns the byte at `offset`, if any.
    pub fn owner(&self, offset: u64) -> Option<Owner> {
        if let Some(cap) = self.msix_cap {
            let ctl = cap + MSIX_CAP_CONTROL;
            if (ctl..ctl + 2).contains(&offset) {
                return Some(Owner::MsixControl(offset - ctl));
            }
        }
        if let Some((cap, len)) = self.msi_cap {
            if (cap + 2..cap + len).contains(&offset) {
                return Some(Owner::Msi(offset - cap));
            }
        }
        None
    }

    /// Back to the power-on image.
    pub fn reset(&mut self) {
        self.bytes.copy_from_slice(&self.power_on);
    }

    /// The raw image (without overlays), for snapshots.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether `image` has this layout: same length and the same read-only bits.
    pub fn fits(&self, image: &[u8]) -> bool {
        image.len() == self.bytes.len()
            && image
                .iter()
                .zip(self.power_on.iter())
                .zip(self.rw.iter().zip(self.rw1c.iter()))
                .all(|((img, init), (rw, c))| (img ^ init) & !(rw | c) == 0)
    }

    /// Replaces the image; the caller checked [`fits`](Self::fits).
    pub fn restore(&mut self, image: &[u8]) {
        if self.fits(image) {
            self.bytes.copy_from_slice(image);
        }
    }

    /// One byte of the image; 0 outside it.
    pub fn byte(&self, offset: u64) -> u8 {
        usize::try_from(offset)
            .ok()
            .and_then(|o| self.bytes.get(o))
            .copied()
            .unwrap_or(0)
    }

    /// A little-endian 16-bit field of the image.
    pub fn word(&self, offset: u64) -> u16 {
        u16::from_le_bytes([self.byte(offset), self.byte(offset + 1)])
    }

    /// A little-endian 32-bit field of the image.
    pub fn dword(&self, offset: u64) -> u32 {
        u32::from(self.word(offset)) | u32::from(self.word(offset + 2)) << 16
    }

    /// Sets one byte ignoring the masks (device side); outside the image it is ignored.
    pub fn set_byte(&mut self, offset: u64, value: u8) {
        if let Some(b) = usize::try_from(offset)
            .ok()
            .and_then(|o| self.bytes.get_mut(o))
        {
            *b = value;
        }
    }

    /// Writes one byte through the masks; outside the image it is ignored.
    pub fn write_byte(&mut self, offset: u64, value: u8) {
        let Ok(idx) = usize::try_from(offset) else {
            return;
        };
        let (Some(byte), Some(&rw), Some(&c)) = (
            self.bytes.get_mut(idx),
            self.rw.get(idx),
            self.rw1c.get(idx),
        ) else {
            return;
        };
        *byte = (*byte & !rw & !(value & c)) | (value & rw);
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::{Bar, Identity, PciFunctionBuilder};
    use super::*;

    fn dword(c: &ConfigSpace, off: u64) -> u32 {
        u32::from_le_bytes([
            c.byte(off),
            c.byte(off + 1),
            c.byte(off + 2),
            c.byte(off + 3),
        ])
    }

    fn layout() -> Layout {
        PciFunctionBuilder::new(Identity::default())
            .bar(0, Bar::mem32(4096))
            .bar(2, Bar::mem64(1 << 20).prefetchable())
            .bar(5, Bar::io(32))
            .msix(16, 2, 0, 0x1000)
            .msi(4)
            .vendor_cap(&[6, 0xaa, 0xbb, 0xcc], &[0, 0xff, 0, 0])
            .layout()
            .unwrap()
    }

    #[test]
    fn bars_caps_and_masks() {
        let l = layout();
        let mut c = ConfigSpace::new(&l);
        assert_eq!(c.bytes().len(), 4096);
        for (bar, value) in [
            (0u64, 0xffff_f000u32),
            (1, 0),
            (2, 0xfff0_000c),
            (3, 0xffff_ffff),
            (4, 0),
            (5, 0xffff_ffe1),
        ] {
            for b in 0..4 {
                c.write_byte(PCI_BAR0 + 4 * bar + b, 0xff);
            }
            assert_eq!(dword(&c, PCI_BAR0 + 4 * bar), value, "BAR{bar}");
        }
        // MSI-X at 0x40 → MSI at 0x50 → vendor at 0x70.
        assert_eq!(c.byte(PCI_CAPABILITY_LIST), 0x40);
        assert_eq!(dword(&c, 0x40) & 0xffff, 0x5011);
        assert_eq!(dword(&c, 0x50) & 0xffff, 0x7005);
        assert_eq!(dword(&c, 0x70) & 0xff_ffff, 0x06_0009);
        assert_eq!(dword(&c, 0x48), 0x1002);
        assert_eq!(c.owner(0x42), Some(Owner::MsixControl(0)));
        assert_eq!(c.owner(0x43), Some(Owner::MsixControl(1)));
        assert_eq!(c.owner(0x44), None);
        assert_eq!(c.owner(0x52), Some(Owner::Msi(2)));
        assert_eq!(c.owner(0x67), Some(Owner::Msi(0x17)));
        assert_eq!(c.owner(0x68), None);
        assert_eq!(c.owner(0x70), None);
        // Vendor cap: only its second body byte is writable.
        for b in 0x72..0x76 {
            c.write_byte(b, 0x11);
        }
        assert_eq!(dword(&c, 0x72), 0xccbb_1106);
        // STATUS is read-only; COMMAND keeps only its writable bits.
        c.write_byte(PCI_STATUS, 0xff);
        c.write_byte(PCI_COMMAND, 0xff);
        c.write_byte(PCI_COMMAND + 1, 0xff);
        assert_eq!(c.word(PCI_STATUS), PCI_STATUS_CAP_LIST);
        assert_eq!(c.word(PCI_COMMAND), PCI_COMMAND_WRITABLE);
        // A snapshot image fits only with the same read-only bits.
        let img = c.bytes().to_vec();
        assert!(c.fits(&img));
        let mut bad = img.clone();
        bad[0] ^= 1;
        assert!(!c.fits(&bad));
        assert!(!c.fits(&img[..256]));
        c.reset();
        assert_eq!(c.word(PCI_COMMAND), 0);
        c.restore(&img);
        assert_eq!(c.word(PCI_COMMAND), PCI_COMMAND_WRITABLE);
    }
}
