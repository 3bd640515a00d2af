// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! mmaps of device regions (BARs the server offers with `VFIO_REGION_INFO_FLAG_MMAP`).
//!
//! The server sends the region's file with DEVICE_GET_REGION_INFO; the client maps each sparse
//! area of it. The VMM then installs each mapping as a KVM memory slot at the BAR's guest
//! address, so guest accesses to those pages touch the device's memory directly (no exit, no
//! message). [`RegionMapping`] owns one such mmap (a vm-memory [`MmapRegion`], which unmaps
//! it on drop); [`MappedRegion`] is the plain description a VMM needs for
//! `KVM_SET_USER_MEMORY_REGION`.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicU64;

use kvm_bindings::kvm_userspace_memory_region;
use vm_memory::FileOffset;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder, MmapRegionError};

use crate::{Error, Result};

/// A device mapping as a VMM installs it: `size` bytes at guest physical `gpa`, backed by the
/// VMM's memory at `host_addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRegion {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Host virtual address of the first byte (in this process).
    pub host_addr: u64,
    /// Length in bytes (a multiple of the page size).
    pub size: u64,
}

impl MappedRegion {
    /// The `KVM_SET_USER_MEMORY_REGION` argument for memory slot `slot`.
    ///
    /// Installing it is `unsafe` (`VmFd::set_user_memory_region`): the mapping must outlive
    /// the slot, so keep the owning [`RegionMapping`] (or the attachment) alive and remove the
    /// slot (size 0) before dropping it.
    pub fn to_kvm_region(&self, slot: u32) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        }
    }
}

/// One mmap of a device region's file (a sparse area, or the whole region); unmapped on drop.
pub struct RegionMapping {
    region: u32,
    region_offset: u64,
    map: MmapRegion,
    gpa: Option<u64>,
}

impl fmt::Debug for RegionMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionMapping")
            .field("region", &self.region)
            .field("region_offset", &format_args!("{:#x}", self.region_offset))
            .field("host_addr", &format_args!("{:#x}", self.host_addr()))
            .field("size", &format_args!("{:#x}", self.size()))
            .field("gpa", &self.gpa.map(|g| format!("{g:#x}")))
            .finish()
    }
}

impl RegionMapping {
    /// Maps `size` bytes of `fd` at `file_offset` shared, readable and (if `writable`)
    /// writable. `region` and `region_offset` (where the area starts inside the region)
    /// only label the mapping.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a zero or unaligned size/offset, [`Error::Mmap`] if
    /// `mmap` fails.
    pub fn new(
        fd: BorrowedFd<'_>,
        region: u32,
        region_offset: u64,
        file_offset: u64,
        size: u64,
        writable: bool,
    ) -> Result<Self> {
        let page = page_size();
        if size == 0 || size % page != 0 || file_offset % page != 0 {
            return Err(Error::InvalidArgument(format!(
                "region {region}: mmap of {size:#x} bytes at file offset {file_offset:#x} is \
                 not page aligned"
            )));
        }
        let len = usize::try_from(size)
            .map_err(|_| Error::InvalidArgument(format!("region {region}: size {size:#x}")))?;
        if libc::off_t::try_from(file_offset).is_err() {
            return Err(Error::InvalidArgument(format!(
                "region {region}: offset {file_offset:#x}"
            )));
        }
        let mmap_err = |source| Error::Mmap { region, source };
        // The mapping keeps its own descriptor (vm-memory's FileOffset owns a File).
        let file = File::from(fd.try_clone_to_owned().map_err(mmap_err)?);
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let map = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(file, file_offset))
            .with_mmap_prot(prot)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|e| match e {
                MmapRegionError::Mmap(source) => mmap_err(source),
                other => mmap_err(io::Error::new(io::ErrorKind::InvalidInput, other)),
            })?;
        Ok(RegionMapping {
            region,
            region_offset,
            map,
            gpa: None,
        })
    }

    /// Region index this mapping belongs to.
    pub fn region(&self) -> u32 {
        self.region
    }

    /// Offset of the mapping inside its region (the sparse area's offset).
    pub fn region_offset(&self) -> u64 {
        self.region_offset
    }

    /// Host virtual address of the mapping.
    pub fn host_addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn size(&self) -> u64 {
        self.map.size() as u64
    }

    /// The guest physical address the VMM is to install it at, if known.
    pub fn gpa(&self) -> Option<u64> {
        self.gpa
    }

    /// Sets the guest physical address (the BAR's address plus [`Self::region_offset`]).
    pub fn set_gpa(&mut self, gpa: Option<u64>) {
        self.gpa = gpa;
    }

    /// The memory-slot description, once the guest address is known.
    pub fn mapped_region(&self) -> Option<MappedRegion> {
        self.gpa.map(|gpa| MappedRegion {
            gpa,
            host_addr: self.host_addr(),
            size: self.size(),
        })
    }

    /// The 64-bit word at `offset` as an atomic, shared with the device (and the guest once
    /// the slot is installed). `None` if `offset` is unaligned or out of range.
    pub fn atomic_u64(&self, offset: u64) -> Option<&AtomicU64> {
        let offset = usize::try_from(offset).ok()?;
        if offset % 8 != 0 || offset.checked_add(8)? > self.map.size() {
            return None;
        }
        // SAFETY: the address is inside our live mapping (checked above), 8-byte aligned (the
        // mapping is page aligned and offset is a multiple of 8), and the mapping lives as
        // long as `&self`. AtomicU64 has the layout of u64 and tolerates concurrent access by
        // other processes through the shared mapping.
        Some(unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU64) })
    }
}

/// The host page size.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).ok().filter(|v| *v > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::memfd;
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering;

    #[test]
    fn two_mappings_of_one_file_share_memory() {
        let fd = memfd(8192);
        let a = RegionMapping::new(fd.as_fd(), 4, 0, 4096, 4096, true).unwrap();
        let b = RegionMapping::new(fd.as_fd(), 4, 0, 4096, 4096, true).unwrap();
        a.atomic_u64(8)
            .unwrap()
            .store(0x1234_5678_9abc_def0, Ordering::SeqCst);
        assert_eq!(
            b.atomic_u64(8).unwrap().load(Ordering::SeqCst),
            0x1234_5678_9abc_def0
        );
        assert_ne!(a.host_addr(), b.host_addr());
        assert!(a.atomic_u64(4).is_none());
        assert!(a.atomic_u64(4096).is_none());
        assert!(a.atomic_u64(4088).is_some());
    }

    #[test]
    fn unaligned_or_empty_mappings_are_refused() {
        let fd = memfd(8192);
        assert!(matches!(
            RegionMapping::new(fd.as_fd(), 4, 0, 100, 4096, true),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            RegionMapping::new(fd.as_fd(), 4, 0, 0, 0, true),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            RegionMapping::new(fd.as_fd(), 4, 0, 0, 100, true),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn mapped_region_needs_a_gpa() {
        let fd = memfd(4096);
        let mut m = RegionMapping::new(fd.as_fd(), 4, 0, 0, 4096, false).unwrap();
        assert_eq!(m.mapped_region(), None);
        m.set_gpa(Some(0xd000_0000));
        let r = m.mapped_region().unwrap();
        assert_eq!(
            r,
            MappedRegion {
                gpa: 0xd000_0000,
                host_addr: m.host_addr(),
                size: 4096
            }
        );
        let k = r.to_kvm_region(3);
        assert_eq!(
            (k.slot, k.guest_phys_addr, k.memory_size, k.userspace_addr),
            (3, 0xd000_0000, 4096, m.host_addr())
        );
    }
}
