// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device-visible memory for a userspace driver: locked anonymous pages, their guest physical
//! addresses from /proc/self/pagemap, and a VFIO DMA mapping at IOVA == GPA.
//!
//! Why IOVA == GPA: a virtio device without `iommu_platform=on` bypasses the (v)IOMMU and reads
//! rings and buffers at guest *physical* addresses; the addresses the driver writes into the
//! rings must therefore be GPAs. The same pages are also mapped through the VFIO container at
//! IOVA == GPA, so that the addresses stay right for a device that does translate through the
//! IOMMU. Each allocation is one 4 KiB page: a page is always physically contiguous.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::bail;
use crate::report::{Context, Result};
use crate::sys::Mapping;
use crate::vfio::VfioDevice;

/// Page size of every allocation.
pub const PAGE_SIZE: usize = 4096;

/// The x86 MSI address window: never a DMA target.
const MSI_WINDOW: std::ops::RangeInclusive<u64> = 0xfee0_0000..=0xfeef_ffff;

/// pagemap entry: bit 63 = page present, bits 0-54 = page frame number.
const PM_PRESENT: u64 = 1 << 63;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// The guest physical address of the page at virtual address `vaddr` of this process, from
/// /proc/self/pagemap (the PFN is only shown to CAP_SYS_ADMIN: run as root).
pub fn physical_address(vaddr: u64) -> Result<u64> {
    let f = File::open("/proc/self/pagemap").ctx("opening /proc/self/pagemap")?;
    let mut b = [0u8; 8];
    let page = vaddr / PAGE_SIZE as u64;
    f.read_exact_at(&mut b, page * 8)
        .ctx(format_args!("reading the pagemap entry of {vaddr:#x}"))?;
    pfn_to_address(u64::from_le_bytes(b), vaddr)
}

/// Decodes a pagemap entry into the physical address of the page.
fn pfn_to_address(entry: u64, vaddr: u64) -> Result<u64> {
    if entry & PM_PRESENT == 0 {
        bail!("the page at {vaddr:#x} is not present (pagemap entry {entry:#x})");
    }
    let pfn = entry & PM_PFN_MASK;
    if pfn == 0 {
        bail!(
            "pagemap shows PFN 0 for {vaddr:#x}: physical addresses need CAP_SYS_ADMIN (run as root)"
        );
    }
    Ok(pfn * PAGE_SIZE as u64)
}

/// One locked page of memory that the device may read and write, mapped at IOVA == its GPA.
#[derive(Debug)]
pub struct DmaPage {
    map: Mapping,
    gpa: u64,
}

impl DmaPage {
    /// Allocates a zeroed, locked page and maps it for DMA through `dev`'s container.
    ///
    /// The pagemap is read again after VFIO_IOMMU_MAP_DMA has pinned the page: pinning may
    /// migrate a page first (long-term pins move pages out of movable memory), so the address
    /// is only final once the page is pinned. If it moved, the stale mapping is removed and the
    /// page mapped again at its new address.
    pub fn new(dev: &VfioDevice) -> Result<Self> {
        let map = Mapping::anonymous_locked(PAGE_SIZE).ctx("allocating a locked page")?;
        map.write_bytes(0, &[0u8; PAGE_SIZE])
            .ctx("zeroing a DMA page")?;
        let vaddr = map.addr();
        let mut gpa = physical_address(vaddr)?;
        for _ in 0..4 {
            if MSI_WINDOW.contains(&gpa) {
                bail!("page {vaddr:#x} is at GPA {gpa:#x}, inside the MSI window");
            }
            dev.map_dma(vaddr, gpa, PAGE_SIZE as u64)?;
            let pinned = physical_address(vaddr)?;
            if pinned == gpa {
                return Ok(Self { map, gpa });
            }
            dev.unmap_dma(gpa, PAGE_SIZE as u64)?;
            gpa = pinned;
        }
        bail!("page {vaddr:#x} kept moving while it was pinned for DMA")
    }

    /// The mapping and the GPA, for a user that keeps the page for good (the VFIO mapping
    /// ends with the container).
    pub fn into_parts(self) -> (Mapping, u64) {
        (self.map, self.gpa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_entries_decode() {
        assert_eq!(
            pfn_to_address(PM_PRESENT | 0x1234, 0).ok(),
            Some(0x123_4000)
        );
        // Soft-dirty and exclusive bits (55, 56) are not part of the PFN.
        assert_eq!(
            pfn_to_address(PM_PRESENT | (1 << 55) | (1 << 56) | 7, 0).ok(),
            Some(0x7000)
        );
        assert!(pfn_to_address(0x1234, 0).is_err(), "not present");
        assert!(pfn_to_address(PM_PRESENT, 0).is_err(), "PFN hidden");
    }
}
