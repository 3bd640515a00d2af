//! Pieces of a PCI function that [`PciFunction`](super::PciFunction) and the passthrough
//! device share: what is the same whether the function is emulated here or a host device
//! whose MSI, MSI-X and BARs are virtualized (docs/passthrough.md).

use super::consts::{NUM_IRQS, NUM_REGIONS};
use super::layout::BarKind;
use crate::device::{DeviceInfo, RegionInfo};
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
