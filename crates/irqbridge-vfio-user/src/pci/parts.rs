// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pieces of a PCI function that [`PciFunction`](super::PciFunction) and the passthrough
//! device share: what is the same whether the function is emulated here or a host device
//! whose MSI, MSI-X and BARs are virtualized (docs/passthrough.md).

use std::sync::Arc;

use irqbridge_core::{Msi, Msix, Notifier};
use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use super::consts::*;
use super::layout::BarKind;
use crate::device::{DeviceInfo, Errno, IrqAction, IrqData, RegionInfo, SetIrqs};
use crate::proto::{VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET};

/// What DEVICE_GET_INFO reports for a PCI function: PCI, resettable, the VFIO PCI regions
/// and IRQ indexes.
pub(crate) fn pci_device_info() -> DeviceInfo {
    DeviceInfo {
        flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
        num_regions: NUM_REGIONS,
        num_irqs: NUM_IRQS,
    }
}

/// DEVICE_GET_REGION_INFO of a region the function does not have.
pub(crate) fn absent_region<'a>() -> RegionInfo<'a> {
    RegionInfo {
        flags: 0,
        size: 0,
        offset: 0,
        sparse_areas: Vec::new(),
        mmap_fd: None,
    }
}

/// The writable address bits of a BAR of `size` bytes (rounded up to a power of two, as the
/// BAR decodes it): the low dword without the read-only type bits, and the upper dword of a
/// 64-bit BAR (0 otherwise). Sizing with all-ones writes reads these back.
pub(crate) fn bar_address_masks(kind: BarKind, size: u64) -> (u32, u32) {
    let addr = !(size
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(0)
        .wrapping_sub(1));
    match kind {
        BarKind::Io => (addr as u32 & !0x3, 0),
        BarKind::Mem32 => (addr as u32 & !0xf, 0),
        BarKind::Mem64 => (addr as u32 & !0xf, (addr >> 32) as u32),
    }
}

/// Where a BAR access falls relative to an MSI-X table or PBA in that BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MsixHit {
    /// The access does not touch the structure.
    Outside,
    /// 4 or 8 bytes, naturally aligned, inside: the model serves it at this offset from the
    /// structure's start.
    Inside(u64),
    /// The access touches the structure in any other way.
    Partial,
}

/// Classifies an access of `len` bytes at `offset` of a BAR against a table or PBA of `size`
/// bytes at `base` of the same BAR.
pub(crate) fn msix_hit(base: u64, size: u64, offset: u64, len: usize) -> MsixHit {
    let len = len as u64;
    let end = offset.saturating_add(len);
    let s_end = base.saturating_add(size);
    if size == 0 || end <= base || offset >= s_end {
        return MsixHit::Outside;
    }
    let rel = offset.wrapping_sub(base);
    if offset >= base && end <= s_end && matches!(len, 4 | 8) && rel % len == 0 {
        MsixHit::Inside(rel)
    } else {
        MsixHit::Partial
    }
}

/// The register layout of an MSI capability (PCI Local Bus 3.0 §6.8.1): a 32- or 64-bit
/// message address, with or without per-vector Mask and Pending Bits. Offsets are from the
/// capability start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MsiShape {
    /// 64-bit message address (Message Upper Address present).
    pub is64: bool,
    /// Per-vector Mask and Pending Bits present.
    pub per_vector_mask: bool,
}

impl MsiShape {
    /// Message Data.
    pub fn data(self) -> u64 {
        if self.is64 {
            MSI_CAP_DATA
        } else {
            MSI_CAP_DATA - 4
        }
    }

    /// Mask Bits (with per-vector masking).
    pub fn mask(self) -> u64 {
        self.data() + 4
    }

    /// Pending Bits (with per-vector masking).
    pub fn pending(self) -> u64 {
        self.mask() + 4
    }

    /// Bytes of the capability.
    pub fn size(self) -> u64 {
        if self.per_vector_mask {
            self.pending() + 4
        } else {
            self.data() + 2
        }
    }
}

/// The MSI capability's registers as the guest reads them (bytes from the capability start,
/// header left 0), from the MSI model. Bytes past [`MsiShape::size`] are never read through
/// the capability.
pub(crate) fn msi_registers(m: &Msi, shape: MsiShape) -> [u8; MSI_CAP_SIZE as usize] {
    let mut r = [0u8; MSI_CAP_SIZE as usize];
    let mut control = (u16::from(m.mmc()) << MSI_CONTROL_MMC_SHIFT)
        | (u16::from(m.mme()) << MSI_CONTROL_MME_SHIFT);
    if shape.is64 {
        control |= MSI_CONTROL_64BIT;
    }
    if shape.per_vector_mask {
        control |= MSI_CONTROL_PER_VECTOR_MASK;
    }
    if m.enabled() {
        control |= MSI_CONTROL_ENABLE;
    }
    let mut put = |off: u64, bytes: &[u8]| {
        let off = off as usize;
        if let Some(dst) = r.get_mut(off..off + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(0, &[PCI_CAP_ID_MSI, 0]);
    put(MSI_CAP_CONTROL, &control.to_le_bytes());
    let address = m.address().to_le_bytes();
    put(
        MSI_CAP_ADDRESS_LO,
        &address[..if shape.is64 { 8 } else { 4 }],
    );
    put(shape.data(), &m.data().to_le_bytes());
    if shape.per_vector_mask {
        put(shape.mask(), &m.mask_bits().to_le_bytes());
        put(shape.pending(), &m.pending_bits().to_le_bytes());
    }
    r
}

/// The MSI registers a model serves in config space: bytes `from..` [`MsiShape::size`] of the
/// capability at `cap` (from 2, Message Control included, in a [`PciFunction`]; from 4 for a
/// passed-through device, whose Message Control is plain virtual bytes).
///
/// [`PciFunction`]: super::PciFunction
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MsiWindow {
    /// Config offset of the capability.
    pub cap: u64,
    /// First byte (from the capability start) the model serves.
    pub from: u64,
    /// The capability's register layout.
    pub shape: MsiShape,
}

impl MsiWindow {
    /// The index from the capability start of the byte at config `offset`, if the model
    /// serves it.
    pub fn register(&self, offset: u64) -> Option<u64> {
        let rel = offset.checked_sub(self.cap)?;
        (self.from..self.shape.size()).contains(&rel).then_some(rel)
    }

    /// Fills the bytes of a config read of `data` at `offset` that the model serves.
    pub fn read(&self, m: &Msi, offset: u64, data: &mut [u8]) {
        let regs = msi_registers(m, self.shape);
        for (i, b) in data.iter_mut().enumerate() {
            let r = offset.checked_add(i as u64).and_then(|o| self.register(o));
            if let Some(v) = r.and_then(|r| regs.get(r as usize)) {
                *b = *v;
            }
        }
    }

    /// The registers with the bytes of a config write of `data` at `offset` that the model
    /// serves put in, and which bytes those are (bit b = byte b), for [`apply_msi_write`];
    /// `None` if the write touches none of them.
    pub fn collect(&self, m: &Msi, offset: u64, data: &[u8]) -> Option<([u8; 24], u32)> {
        let mut regs = msi_registers(m, self.shape);
        let mut written = 0u32;
        for (i, v) in data.iter().enumerate() {
            let r = offset.checked_add(i as u64).and_then(|o| self.register(o));
            if let Some((r, x)) = r.and_then(|r| Some((r, regs.get_mut(r as usize)?))) {
                *x = *v;
                written |= 1 << r;
            }
        }
        (written != 0).then_some((regs, written))
    }
}

/// Hands the written bytes of the MSI capability (`regs` as [`msi_registers`] laid them out,
/// `written`: bit b = byte b) to the model: message first, then mask bits, then Enable / MME,
/// so an enabling write delivers with the final message. Pending Bits are read-only; Message
/// Address bits 1:0 read 0; mask bits of vectors that do not exist are ignored.
pub(crate) fn apply_msi_write(m: &mut Msi, shape: MsiShape, regs: &[u8], written: u32) {
    let span = |from: u64, len: u64| (from..from + len).any(|b| written & (1 << b) != 0);
    let dword = |off: u64| -> u32 {
        let o = off as usize;
        regs.get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    };
    let address_len = if shape.is64 { 8 } else { 4 };
    if span(MSI_CAP_ADDRESS_LO, address_len) {
        let high = if shape.is64 {
            u64::from(dword(MSI_CAP_ADDRESS_HI)) << 32
        } else {
            0
        };
        m.write_address(u64::from(dword(MSI_CAP_ADDRESS_LO)) | high);
    }
    if span(shape.data(), 2) {
        m.write_data(dword(shape.data()) as u16);
    }
    if shape.per_vector_mask && span(shape.mask(), 4) {
        if let Err(e) = m.write_mask(dword(shape.mask())) {
            warn!("pci: MSI mask write: {}", super::error_chain(&e));
        }
    }
    if span(MSI_CAP_CONTROL, 2) {
        let control = dword(MSI_CAP_CONTROL) as u16;
        let enable = control & MSI_CONTROL_ENABLE != 0;
        let mme = ((control >> MSI_CONTROL_MME_SHIFT) & 7) as u8;
        if enable != m.enabled() || mme != m.mme() {
            debug!("pci: MSI enable={enable} mme={mme}");
        }
        if let Err(e) = m.write_control(enable, mme) {
            warn!("pci: MSI Message Control write: {}", super::error_chain(&e));
        }
    }
}

/// Binds (`Some`) or unbinds MSI-X vector `v`'s notifier. The client that binds a vector owns
/// its masking (docs/device-abi.md, as with the kernel's VFIO): the entry's mask is cleared.
///
/// # Errors
/// The model's error for a vector out of range.
pub(crate) fn msix_bind(
    m: &mut Msix,
    v: u16,
    n: Option<Arc<dyn Notifier>>,
) -> Result<(), irqbridge_core::Error> {
    let bound = n.is_some();
    m.set_notifier(v, n)?;
    if bound {
        m.set_entry_masked(v, false)?;
    }
    Ok(())
}

/// A `DEVICE_SET_IRQS` request for one index, decoded by the rules all indexes share (after
/// the kernel's `vfio_pci_set_irqs_ioctl`); each index then accepts the operations it
/// supports.
#[derive(Debug)]
pub(crate) enum IrqOp {
    /// TRIGGER with DATA_NONE and count 0: disable the index and drop its eventfds.
    Disable,
    /// TRIGGER with DATA_EVENTFD: sub-indexes `start..` get these eventfds (`None`: unbind).
    Bind {
        /// First sub-index.
        start: u32,
        /// One entry per sub-index.
        fds: Vec<Option<EventFd>>,
    },
    /// TRIGGER with DATA_NONE or DATA_BOOL: signal the selected sub-indexes (loopback).
    Trigger(Vec<u32>),
    /// MASK (`masked`) or UNMASK with DATA_NONE or DATA_BOOL: the selected sub-indexes.
    Mask {
        /// MASK rather than UNMASK.
        masked: bool,
        /// The selected sub-indexes.
        vectors: Vec<u32>,
    },
    /// MASK with DATA_EVENTFD (the kernel implements it nowhere).
    MaskFd,
    /// UNMASK with DATA_EVENTFD: the eventfd whose signal unmasks (INTx's resample eventfd).
    UnmaskFd(Option<EventFd>),
}

impl IrqOp {
    /// Decodes `req` for an index with `vectors` sub-indexes. DATA_NONE selects every
    /// sub-index of the range, DATA_BOOL those whose flag is set.
    ///
    /// # Errors
    /// EINVAL when the range leaves `0..vectors` (the disable request has no range).
    pub fn decode(req: SetIrqs, vectors: u32) -> Result<IrqOp, Errno> {
        let SetIrqs {
            action,
            start,
            count,
            data,
            ..
        } = req;
        if action == IrqAction::Trigger && count == 0 && matches!(data, IrqData::None) {
            return Ok(IrqOp::Disable);
        }
        let end = start.checked_add(count).filter(|e| *e <= vectors);
        let Some(end) = end else {
            return Err(libc::EINVAL);
        };
        let selected = match &data {
            IrqData::Bool(flags) => (start..end)
                .zip(flags)
                .filter(|(_, on)| **on)
                .map(|(v, _)| v)
                .collect(),
            _ => (start..end).collect(),
        };
        Ok(match (action, data) {
            (IrqAction::Trigger, IrqData::Eventfds(mut fds)) => {
                // An empty request (no fds at all) unbinds the whole range.
                fds.resize_with(count as usize, || None);
                IrqOp::Bind { start, fds }
            }
            (IrqAction::Mask, IrqData::Eventfds(_)) => IrqOp::MaskFd,
            (IrqAction::Unmask, IrqData::Eventfds(fds)) => {
                IrqOp::UnmaskFd(fds.into_iter().next().flatten())
            }
            (IrqAction::Trigger, _) => IrqOp::Trigger(selected),
            (action, _) => IrqOp::Mask {
                masked: action == IrqAction::Mask,
                vectors: selected,
            },
        })
    }

    /// The request to an index the function does not have (no MSI or MSI-X capability):
    /// only the disable request is accepted.
    ///
    /// # Errors
    /// EINVAL for anything else.
    pub fn only_disable(req: SetIrqs) -> Result<(), Errno> {
        match IrqOp::decode(req, 0) {
            Ok(IrqOp::Disable) => Ok(()),
            _ => Err(libc::EINVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_masks_round_up_and_keep_type_bits() {
        assert_eq!(bar_address_masks(BarKind::Mem32, 4096), (0xffff_f000, 0));
        assert_eq!(bar_address_masks(BarKind::Mem32, 3000), (0xffff_f000, 0));
        assert_eq!(bar_address_masks(BarKind::Io, 32), (0xffff_ffe0, 0));
        assert_eq!(bar_address_masks(BarKind::Mem64, 1 << 33), (0, 0xffff_fffe));
        assert_eq!(
            bar_address_masks(BarKind::Mem64, 16),
            (0xffff_fff0, u32::MAX)
        );
    }

    #[test]
    fn msi_registers_of_a_32_bit_capability() {
        let shape = MsiShape {
            is64: false,
            per_vector_mask: true,
        };
        assert_eq!(
            (shape.data(), shape.mask(), shape.pending(), shape.size()),
            (8, 0xc, 0x10, 0x14)
        );
        let mut m = Msi::new(4).unwrap();
        let mut regs = msi_registers(&m, shape);
        regs[4..8].copy_from_slice(&0xfee0_0003u32.to_le_bytes());
        regs[8..12].copy_from_slice(&0xffff_0041u32.to_le_bytes());
        regs[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        regs[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        apply_msi_write(&mut m, shape, &regs, 0xffff0);
        assert_eq!(
            (m.address(), m.data(), m.mask_bits(), m.pending_bits()),
            (0xfee0_0000, 0x41, 0xf, 0)
        );
        let r = msi_registers(&m, shape);
        assert_eq!(
            u16::from_le_bytes([r[2], r[3]]),
            0x0104,
            "MMC 2, PVM, 32-bit"
        );
        assert_eq!(
            r[4..20],
            [0, 0, 0xe0, 0xfe, 0x41, 0, 0, 0, 0xf, 0, 0, 0, 0, 0, 0, 0]
        );
        // Without Mask Bits the capability ends after Message Data.
        let short = MsiShape {
            per_vector_mask: false,
            ..shape
        };
        assert_eq!(short.size(), 0x0a);
        apply_msi_write(&mut m, short, &[0; 24], 0xf000);
        assert_eq!(m.mask_bits(), 0xf, "no mask register to write");
    }

    fn req(action: IrqAction, start: u32, count: u32, data: IrqData) -> SetIrqs {
        SetIrqs {
            index: 2,
            action,
            start,
            count,
            data,
        }
    }

    #[test]
    fn set_irqs_decoding() {
        use IrqAction::*;
        let sel = |r| match IrqOp::decode(r, 8) {
            Ok(IrqOp::Trigger(v)) => v,
            Ok(IrqOp::Mask { vectors, .. }) => vectors,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            IrqOp::decode(req(Trigger, 5, 0, IrqData::None), 0),
            Ok(IrqOp::Disable)
        ));
        assert_eq!(sel(req(Trigger, 2, 3, IrqData::None)), vec![2, 3, 4]);
        assert_eq!(
            sel(req(Mask, 6, 2, IrqData::Bool(vec![false, true]))),
            vec![7]
        );
        assert_eq!(sel(req(Unmask, 0, 0, IrqData::None)), Vec::<u32>::new());
        assert!(matches!(
            IrqOp::decode(req(Trigger, 7, 2, IrqData::None), 8),
            Err(libc::EINVAL)
        ));
        assert!(matches!(
            IrqOp::decode(req(Mask, u32::MAX, 2, IrqData::None), 8),
            Err(libc::EINVAL)
        ));
        assert!(matches!(
            IrqOp::decode(req(Unmask, 1, 1, IrqData::None), 8),
            Ok(IrqOp::Mask { masked: false, .. })
        ));
        match IrqOp::decode(req(Trigger, 6, 2, IrqData::Eventfds(vec![])), 8) {
            Ok(IrqOp::Bind { start: 6, fds }) => assert!(fds.len() == 2 && fds[1].is_none()),
            other => panic!("{other:?}"),
        }
        let fd = EventFd::new(0).unwrap();
        match IrqOp::decode(
            req(Trigger, 3, 2, IrqData::Eventfds(vec![None, Some(fd)])),
            8,
        ) {
            Ok(IrqOp::Bind { start: 3, fds }) => assert!(fds[0].is_none() && fds[1].is_some()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            IrqOp::decode(req(Mask, 0, 1, IrqData::Eventfds(vec![None])), 8),
            Ok(IrqOp::MaskFd)
        ));
        assert!(matches!(
            IrqOp::decode(req(Unmask, 0, 1, IrqData::Eventfds(vec![None])), 1),
            Ok(IrqOp::UnmaskFd(None))
        ));
        assert_eq!(
            IrqOp::only_disable(req(Trigger, 0, 0, IrqData::None)),
            Ok(())
        );
        assert_eq!(
            IrqOp::only_disable(req(Trigger, 0, 0, IrqData::Eventfds(vec![]))),
            Err(libc::EINVAL)
        );
    }

    #[test]
    fn msi_window_serves_only_its_bytes() {
        let shape = MsiShape {
            is64: true,
            per_vector_mask: false,
        };
        let mut m = Msi::new(2).unwrap();
        m.write_data(0x4142);
        let whole = MsiWindow {
            cap: 0x50,
            from: 2,
            shape,
        };
        let message = MsiWindow { from: 4, ..whole };
        assert_eq!(
            (
                whole.register(0x52),
                message.register(0x52),
                message.register(0x5d)
            ),
            (Some(2), None, Some(0xd))
        );
        assert_eq!(
            whole.register(0x5e),
            None,
            "the capability ends after Message Data"
        );
        let mut data = [0xee; 16];
        message.read(&m, 0x50, &mut data);
        assert_eq!(data[..4], [0xee; 4]);
        assert_eq!(data[12..16], [0x42, 0x41, 0xee, 0xee]);
        // A write over Message Control and the address: only the served bytes are collected.
        let (regs, written) = message.collect(&m, 0x52, &[1, 0, 0xfc, 0xff]).unwrap();
        assert_eq!((written, regs[4], regs[5]), (0b11_0000, 0xfc, 0xff));
        assert!(message.collect(&m, 0x50, &[0; 4]).is_none());
        assert_eq!(whole.collect(&m, 0x52, &[1]).map(|(_, w)| w), Some(0b100));
    }

    #[test]
    fn msix_hits() {
        assert_eq!(msix_hit(0x1000, 32, 0xff8, 8), MsixHit::Outside);
        assert_eq!(msix_hit(0x1000, 32, 0x1000 + 32, 4), MsixHit::Outside);
        assert_eq!(msix_hit(0x1000, 32, 0x1008, 8), MsixHit::Inside(8));
        assert_eq!(msix_hit(0x1000, 32, 0x101c, 4), MsixHit::Inside(0x1c));
        assert_eq!(msix_hit(0x1000, 32, 0xffc, 8), MsixHit::Partial);
        assert_eq!(msix_hit(0x1000, 32, 0x1004, 8), MsixHit::Partial);
        assert_eq!(msix_hit(0x1000, 32, 0x1000, 2), MsixHit::Partial);
        assert_eq!(msix_hit(0x1000, 32, 0x101c, 8), MsixHit::Partial);
        assert_eq!(msix_hit(0x1000, 0, 0x1000, 4), MsixHit::Outside);
        assert_eq!(msix_hit(u64::MAX - 2, 8, u64::MAX - 3, 4), MsixHit::Partial);
    }
}
