//! The 4 KiB PCI config space image with per-byte write masks.
//!
//! The image holds every static field and the read-write registers (COMMAND, BARs,
//! INTERRUPT_LINE). Fields that mirror device state (STATUS bit 3, MSI-X Message Control) are
//! overlaid by the device on reads and applied to the models on writes; the image only keeps
//! their static part.

use super::regs::*;

const SIZE: usize = CONFIG_SPACE_SIZE as usize;

/// What a config write changed that the device must act on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ConfigWrite {
    /// COMMAND before and after the write, if the write touched it.
    pub command: Option<(u16, u16)>,
    /// Message Control bytes written: `(value, byte mask)` over the 16-bit register.
    pub msix_control: Option<(u16, u16)>,
}

/// Config space bytes and write masks.
#[derive(Clone, Debug)]
pub(crate) struct ConfigSpace {
    bytes: Box<[u8]>,
    wmask: Box<[u8]>,
    power_on: Box<[u8]>,
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
    /// The power-on image of the device.
    pub fn new(msix_vectors: u16, intx: bool) -> Self {
        let mut b = vec![0u8; SIZE].into_boxed_slice();
        let mut m = vec![0u8; SIZE].into_boxed_slice();
        put(&mut b, PCI_VENDOR_ID, &VENDOR_ID.to_le_bytes());
        put(&mut b, PCI_DEVICE_ID, &DEVICE_ID.to_le_bytes());
        put(&mut b, PCI_STATUS, &PCI_STATUS_CAP_LIST.to_le_bytes());
        put(&mut b, PCI_REVISION_ID, &[REVISION_ID]);
        put(&mut b, PCI_REVISION_ID + 1, &CLASS_CODE.to_le_bytes()[..3]);
        put(&mut b, PCI_HEADER_TYPE, &[0]);
        put(
            &mut b,
            PCI_SUBSYSTEM_VENDOR_ID,
            &SUBSYSTEM_VENDOR_ID.to_le_bytes(),
        );
        put(&mut b, PCI_SUBSYSTEM_ID, &SUBSYSTEM_ID.to_le_bytes());
        // Capability pointer: bits 1:0 are reserved and read 0.
        put(&mut b, PCI_CAPABILITY_LIST, &[MSIX_CAP_OFFSET as u8]);
        put(&mut b, PCI_INTERRUPT_PIN, &[u8::from(intx)]);

        // MSI-X capability: ID, next 0, Message Control (static part: table size), table and
        // PBA in BAR2.
        put(&mut b, MSIX_CAP_OFFSET, &[PCI_CAP_ID_MSIX, 0]);
        let table_size = (msix_vectors.saturating_sub(1)) & MSIX_CONTROL_TABLE_SIZE;
        put(
            &mut b,
            MSIX_CAP_OFFSET + MSIX_CAP_CONTROL,
            &table_size.to_le_bytes(),
        );
        put(
            &mut b,
            MSIX_CAP_OFFSET + MSIX_CAP_TABLE,
            &u32::from(MSIX_BAR).to_le_bytes(),
        );
        let pba = u32::try_from(msix_pba_offset(msix_vectors)).unwrap_or(0) | u32::from(MSIX_BAR);
        put(&mut b, MSIX_CAP_OFFSET + MSIX_CAP_PBA, &pba.to_le_bytes());

        // Write masks.
        put(&mut m, PCI_COMMAND, &PCI_COMMAND_WRITABLE.to_le_bytes());
        for (bar, size) in [
            (0u64, BAR0_SIZE),
            (2, bar2_size(msix_vectors)),
            (4, BAR4_SIZE),
        ] {
            // 32-bit memory BAR: bits 3:0 are flags (0: memory, 32-bit, not prefetchable) and
            // the address bits below the size are read-only 0, so an all-ones write reads back
            // as the size mask.
            let mask = u32::try_from(!(size - 1) & 0xffff_fff0).unwrap_or(0);
            put(&mut m, PCI_BAR0 + 4 * bar, &mask.to_le_bytes());
        }
        put(&mut m, PCI_INTERRUPT_LINE, &[0xff]);
        put(
            &mut m,
            MSIX_CAP_OFFSET + MSIX_CAP_CONTROL,
            &(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK).to_le_bytes(),
        );

        ConfigSpace {
            power_on: b.clone(),
            bytes: b,
            wmask: m,
        }
    }

    /// Back to the power-on image.
    pub fn reset(&mut self) {
        self.bytes.copy_from_slice(&self.power_on);
    }

    /// The raw image (without overlays), for snapshots.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Replace the image; `bytes` must be 4 KiB. Read-only bytes are taken from the power-on
    /// image, so a snapshot cannot change the identity of the device.
    pub fn restore(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() != SIZE {
            return false;
        }
        for ((dst, (src, mask)), init) in self
            .bytes
            .iter_mut()
            .zip(bytes.iter().zip(self.wmask.iter()))
            .zip(self.power_on.iter())
        {
            *dst = (init & !mask) | (src & mask);
        }
        true
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

    /// Write `data` at `offset` byte by byte through the write masks; bytes outside the image
    /// are ignored. Reports the changes the device must act on.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> ConfigWrite {
        let old_command = self.word(PCI_COMMAND);
        let mut touched_command = false;
        let mut msix_value = 0u16;
        let mut msix_mask = 0u16;
        let control = MSIX_CAP_OFFSET + MSIX_CAP_CONTROL;
        for (i, &value) in data.iter().enumerate() {
            let Some(off) = offset.checked_add(i as u64) else {
                break;
            };
            if off == control || off == control + 1 {
                // Message Control lives in the MSI-X model; only collect the bytes.
                let shift = 8 * (off - control);
                msix_value |= u16::from(value) << shift;
                msix_mask |= 0xff << shift;
                continue;
            }
            let Ok(idx) = usize::try_from(off) else {
                break;
            };
            let (Some(byte), Some(&mask)) = (self.bytes.get_mut(idx), self.wmask.get(idx)) else {
                break;
            };
            *byte = (*byte & !mask) | (value & mask);
            if off == PCI_COMMAND || off == PCI_COMMAND + 1 {
                touched_command = true;
            }
        }
        ConfigWrite {
            command: touched_command.then(|| (old_command, self.word(PCI_COMMAND))),
            msix_control: (msix_mask != 0).then_some((msix_value, msix_mask)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dword(c: &ConfigSpace, off: u64) -> u32 {
        u32::from_le_bytes([
            c.byte(off),
            c.byte(off + 1),
            c.byte(off + 2),
            c.byte(off + 3),
        ])
    }

    #[test]
    fn bar_sizing_through_masks() {
        let mut c = ConfigSpace::new(16, true);
        for (bar, size) in [
            (0u64, 4096u32),
            (1, 0),
            (2, 8192),
            (3, 0),
            (4, 4096),
            (5, 0),
        ] {
            c.write(PCI_BAR0 + 4 * bar, &[0xff; 4]);
            let expect = if size == 0 { 0 } else { !(size - 1) };
            assert_eq!(dword(&c, PCI_BAR0 + 4 * bar), expect, "BAR{bar}");
        }
        c.write(PCI_ROM_ADDRESS, &[0xff; 4]);
        assert_eq!(dword(&c, PCI_ROM_ADDRESS), 0);
        c.reset();
        assert_eq!(dword(&c, PCI_BAR0), 0);
    }

    #[test]
    fn command_write_reports_change_and_masks() {
        let mut c = ConfigSpace::new(16, true);
        let w = c.write(PCI_COMMAND, &[0xff, 0xff]);
        assert_eq!(w.command, Some((0, PCI_COMMAND_WRITABLE)));
        assert_eq!(w.msix_control, None);
        // A byte write to the high byte only.
        let w = c.write(PCI_COMMAND + 1, &[0]);
        assert_eq!(w.command, Some((0x0407, 0x0007)));
        // STATUS is read-only.
        c.write(PCI_STATUS, &[0xff, 0xff]);
        assert_eq!(c.word(PCI_STATUS), PCI_STATUS_CAP_LIST);
    }

    #[test]
    fn msix_control_bytes_are_collected() {
        let mut c = ConfigSpace::new(16, true);
        let w = c.write(MSIX_CAP_OFFSET, &[0xaa, 0xbb, 0x00, 0xc0]);
        assert_eq!(w.msix_control, Some((0xc000, 0xffff)));
        assert_eq!(c.byte(MSIX_CAP_OFFSET), PCI_CAP_ID_MSIX);
        assert_eq!(c.byte(MSIX_CAP_OFFSET + 1), 0);
        let w = c.write(MSIX_CAP_OFFSET + 3, &[0x80]);
        assert_eq!(w.msix_control, Some((0x8000, 0xff00)));
    }

    #[test]
    fn out_of_range_writes_are_ignored() {
        let mut c = ConfigSpace::new(16, false);
        let before = c.bytes().to_vec();
        c.write(4094, &[1, 2, 3, 4]);
        c.write(u64::MAX - 1, &[1, 2, 3, 4]);
        assert_eq!(c.bytes(), &before[..]);
        assert_eq!(c.byte(PCI_INTERRUPT_PIN), 0);
    }

    #[test]
    fn restore_keeps_read_only_bytes() {
        let mut c = ConfigSpace::new(16, true);
        let mut img = vec![0xffu8; SIZE];
        img[PCI_INTERRUPT_LINE as usize] = 11;
        assert!(c.restore(&img));
        assert_eq!(c.word(PCI_VENDOR_ID), VENDOR_ID);
        assert_eq!(c.byte(PCI_INTERRUPT_LINE), 11);
        assert_eq!(c.word(PCI_COMMAND), PCI_COMMAND_WRITABLE);
        assert!(!c.restore(&img[..10]));
    }
}
