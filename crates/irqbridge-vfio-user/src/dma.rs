// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The DMA table of one client: the regions announced with DMA_MAP, keyed by DMA address.
//!
//! A region that comes with a file descriptor is checked with `fstat` (a regular file, memfd
//! included, and the region inside it: EINVAL otherwise) and mmapped `MAP_SHARED` with the
//! protection its flags ask for; the mapping and the descriptor live until DMA_UNMAP, an
//! unmap-all, or the end of the client's session ([`DmaTable`] unmaps everything when
//! dropped). Ranges may not overlap (EEXIST) and an unmap must name a mapping exactly (ENOENT /
//! EINVAL), as in libvfio-user and the kernel's type1 IOMMU.
//!
//! # Guest memory the client can shrink
//!
//! The client keeps its own copy of the file and may truncate it after DMA_MAP; touching a
//! mapped page past the new end raises SIGBUS, which would kill the whole server. The server
//! therefore never reads or writes DMA memory: no code in this crate dereferences a mapping
//! (the irqbridge test device does no DMA), and the mapping only exists for a device that
//! would. Such a device must not touch it with plain loads and stores; see
//! docs/reliability.md.
//!
//! The wrapper is written here rather than taken from vm-memory's `MmapRegion`: that one owns
//! its file (`FileOffset` holds an `Arc<File>`) while the device seam lends the client's
//! descriptor as `&OwnedFd`, so it would cost a second descriptor per mapping.

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::{Error, Result};
use crate::proto::{DmaMapRequest, VFIO_USER_F_DMA_REGION_READ, VFIO_USER_F_DMA_REGION_WRITE};

/// Default limit on the number of mappings of one client.
pub const DEFAULT_MAX_DMA_MAPS: usize = 1024;

/// One DMA_MAP region.
#[derive(Debug)]
pub struct DmaMapping {
    iova: u64,
    size: u64,
    flags: u32,
    file_offset: u64,
    fd: Option<OwnedFd>,
    /// Host address of the mmap (0 when there is no fd); unmapped on drop.
    host: usize,
}

impl DmaMapping {
    /// DMA address of the region.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// DMA_MAP flags (READ 1, WRITE 2).
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Offset of the region in its file.
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    /// The region's file, if the client sent one.
    pub fn fd(&self) -> Option<&OwnedFd> {
        self.fd.as_ref()
    }

    /// True if the region is mmapped in this process.
    pub fn is_mapped(&self) -> bool {
        self.host != 0
    }
}

impl Drop for DmaMapping {
    fn drop(&mut self) {
        if self.host != 0 {
            if let Ok(len) = usize::try_from(self.size) {
                // SAFETY: `host`/`len` are exactly what a successful mmap returned for this
                // mapping, and no reference into the mapping outlives the DmaMapping.
                let r = unsafe { libc::munmap(self.host as *mut libc::c_void, len) };
                if r != 0 {
                    log::warn!(
                        "vfio-user: munmap of DMA region {:#x} failed: {}",
                        self.iova,
                        io::Error::last_os_error()
                    );
                }
            }
        }
    }
}

/// The DMA regions of one client.
#[derive(Debug)]
pub struct DmaTable {
    maps: BTreeMap<u64, DmaMapping>,
    max_maps: usize,
}

impl DmaTable {
    /// An empty table accepting at most `max_maps` regions.
    pub fn new(max_maps: usize) -> Self {
        DmaTable {
            maps: BTreeMap::new(),
            max_maps,
        }
    }

    /// The limit on the number of regions.
    pub fn max_maps(&self) -> usize {
        self.max_maps
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// True if there is no region.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// The region starting at `iova`.
    pub fn get(&self, iova: u64) -> Option<&DmaMapping> {
        self.maps.get(&iova)
    }

    /// The region containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&DmaMapping> {
        let (_, m) = self.maps.range(..=addr).next_back()?;
        (addr - m.iova < m.size).then_some(m)
    }

    /// The regions in address order.
    pub fn iter(&self) -> impl Iterator<Item = &DmaMapping> {
        self.maps.values()
    }

    /// Adds a region (DMA_MAP), mmapping `fd` if given.
    ///
    /// # Errors
    /// [`Error::InvalidField`] for unknown flags, a zero size, a range that wraps, or an
    /// offset/size the host cannot map; [`Error::DmaOverlap`] (EEXIST);
    /// [`Error::DmaTableFull`] (ENOSPC); [`Error::DmaMmap`] if mmap fails.
    pub fn map(&mut self, req: &DmaMapRequest, fd: Option<OwnedFd>) -> Result<()> {
        let known = VFIO_USER_F_DMA_REGION_READ | VFIO_USER_F_DMA_REGION_WRITE;
        if req.flags & !known != 0 {
            return Err(Error::InvalidField {
                what: "DMA_MAP flags",
                value: req.flags.into(),
            });
        }
        if req.size == 0 {
            return Err(Error::InvalidField {
                what: "DMA_MAP size",
                value: 0,
            });
        }
        let end = req
            .address
            .checked_add(req.size)
            .ok_or(Error::InvalidField {
                what: "DMA_MAP address + size",
                value: req.address,
            })?;
        if let Some((_, prev)) = self.maps.range(..=req.address).next_back() {
            if req.address - prev.iova < prev.size {
                return Err(Error::DmaOverlap {
                    iova: req.address,
                    size: req.size,
                });
            }
        }
        if let Some((&next, _)) = self.maps.range(req.address..).next() {
            if next < end {
                return Err(Error::DmaOverlap {
                    iova: req.address,
                    size: req.size,
                });
            }
        }
        if self.maps.len() >= self.max_maps {
            return Err(Error::DmaTableFull { max: self.max_maps });
        }
        let host = match &fd {
            Some(fd) => {
                check_file(fd, req)?;
                mmap_region(fd, req)?
            }
            None => 0,
        };
        self.maps.insert(
            req.address,
            DmaMapping {
                iova: req.address,
                size: req.size,
                flags: req.flags,
                file_offset: req.offset,
                fd,
                host,
            },
        );
        Ok(())
    }

    /// Removes the region that starts at `iova` and has exactly `size` bytes (DMA_UNMAP).
    /// Dropping the returned mapping unmaps it and closes its fd.
    ///
    /// # Errors
    /// [`Error::DmaNotFound`] (ENOENT) if no region starts at `iova`,
    /// [`Error::DmaSizeMismatch`] (EINVAL) if its size differs.
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<DmaMapping> {
        let m = self.maps.get(&iova).ok_or(Error::DmaNotFound { iova })?;
        if m.size != size {
            return Err(Error::DmaSizeMismatch {
                iova,
                size,
                mapped: m.size,
            });
        }
        self.maps.remove(&iova).ok_or(Error::DmaNotFound { iova })
    }

    /// Removes every region; returns them in address order (drop them to unmap).
    pub fn unmap_all(&mut self) -> Vec<DmaMapping> {
        std::mem::take(&mut self.maps).into_values().collect()
    }
}

/// The region must lie inside a regular file (a memfd is one).
fn check_file(fd: &OwnedFd, req: &DmaMapRequest) -> Result<()> {
    // SAFETY: `stat` is plain data; fstat fills it for a live descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer; `fd` is open.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(Error::DmaMmap(io::Error::last_os_error()));
    }
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG {
        return Err(Error::DmaNotAFile { mode: kind });
    }
    let file_size = u64::try_from(st.st_size).unwrap_or(0);
    let outside = Error::DmaOutsideFile {
        offset: req.offset,
        size: req.size,
        file_size,
    };
    match req.offset.checked_add(req.size) {
        Some(end) if end <= file_size => Ok(()),
        _ => Err(outside),
    }
}

fn mmap_region(fd: &OwnedFd, req: &DmaMapRequest) -> Result<usize> {
    let len = usize::try_from(req.size).map_err(|_| Error::InvalidField {
        what: "DMA_MAP size",
        value: req.size,
    })?;
    let offset = libc::off_t::try_from(req.offset).map_err(|_| Error::InvalidField {
        what: "DMA_MAP offset",
        value: req.offset,
    })?;
    let mut prot = libc::PROT_NONE;
    if req.flags & VFIO_USER_F_DMA_REGION_READ != 0 {
        prot |= libc::PROT_READ;
    }
    if req.flags & VFIO_USER_F_DMA_REGION_WRITE != 0 {
        prot |= libc::PROT_WRITE;
    }
    // SAFETY: a fresh shared mapping at an address the kernel chooses; it aliases no Rust
    // object. `fd` is a live descriptor; the kernel validates length, offset and file type.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::DmaMmap(io::Error::last_os_error()));
    }
    Ok(p as usize)
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    fn memfd(size: u64) -> OwnedFd {
        // SAFETY: the name is a NUL-terminated literal.
        let fd = unsafe { libc::memfd_create(c"dma-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on a live memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
        fd
    }

    fn req(address: u64, size: u64) -> DmaMapRequest {
        DmaMapRequest::new(3, 0, address, size)
    }

    #[test]
    fn map_find_unmap() {
        let mut t = DmaTable::new(8);
        t.map(&req(0x1000, 0x1000), Some(memfd(0x1000))).unwrap();
        t.map(&req(0x3000, 0x2000), None).unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.get(0x1000).unwrap().is_mapped());
        assert!(!t.get(0x3000).unwrap().is_mapped());
        assert_eq!(t.find(0x1fff).unwrap().iova(), 0x1000);
        assert!(t.find(0x2000).is_none());
        assert_eq!(t.find(0x4fff).unwrap().iova(), 0x3000);
        assert!(t.find(0x5000).is_none());
        assert!(matches!(
            t.unmap(0x3000, 0x1000),
            Err(Error::DmaSizeMismatch { .. })
        ));
        assert!(matches!(
            t.unmap(0x3800, 0x800),
            Err(Error::DmaNotFound { iova: 0x3800 })
        ));
        let m = t.unmap(0x3000, 0x2000).unwrap();
        assert_eq!(m.size(), 0x2000);
        assert_eq!(t.len(), 1);
        assert_eq!(t.unmap_all().len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn overlaps_are_refused() {
        let mut t = DmaTable::new(8);
        t.map(&req(0x10000, 0x10000), None).unwrap();
        for (a, s) in [
            (0x10000, 0x1000),
            (0xf000, 0x2000),
            (0x1f000, 0x1000),
            (0x8000, 0x100000),
        ] {
            assert!(
                matches!(t.map(&req(a, s), None), Err(Error::DmaOverlap { .. })),
                "{a:#x}+{s:#x}"
            );
        }
        t.map(&req(0xf000, 0x1000), None).unwrap();
        t.map(&req(0x20000, 0x1000), None).unwrap();
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn bad_requests() {
        let mut t = DmaTable::new(1);
        assert!(matches!(
            t.map(&DmaMapRequest::new(4, 0, 0, 0x1000), None),
            Err(Error::InvalidField { .. })
        ));
        assert!(matches!(
            t.map(&req(0, 0), None),
            Err(Error::InvalidField { .. })
        ));
        assert!(matches!(
            t.map(&req(u64::MAX - 10, 0x1000), None),
            Err(Error::InvalidField { .. })
        ));
        // Unaligned file offset: mmap refuses with EINVAL.
        let e = t
            .map(&DmaMapRequest::new(3, 1, 0, 0x1000), Some(memfd(0x2000)))
            .unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        t.map(&req(0, 0x1000), None).unwrap();
        assert!(matches!(
            t.map(&req(0x1000, 0x1000), None),
            Err(Error::DmaTableFull { max: 1 })
        ));
    }

    #[test]
    fn regions_must_lie_inside_a_regular_file() {
        let mut t = DmaTable::new(8);
        assert!(matches!(
            t.map(&req(0, 0x2000), Some(memfd(0x1000))),
            Err(Error::DmaOutsideFile {
                file_size: 0x1000,
                ..
            })
        ));
        assert!(matches!(
            t.map(
                &DmaMapRequest::new(3, 0x1000, 0, 0x1000),
                Some(memfd(0x1000))
            ),
            Err(Error::DmaOutsideFile { .. })
        ));
        assert!(matches!(
            t.map(
                &DmaMapRequest::new(3, u64::MAX, 0, 0x1000),
                Some(memfd(0x1000))
            ),
            Err(Error::DmaOutsideFile { .. })
        ));
        let e = EventFdLike::new();
        let e = t.map(&req(0, 0x1000), Some(e)).unwrap_err();
        assert!(matches!(e, Error::DmaNotAFile { .. }), "{e:?}");
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(t.is_empty());
        t.map(
            &DmaMapRequest::new(3, 0x1000, 0, 0x1000),
            Some(memfd(0x2000)),
        )
        .unwrap();
    }

    /// A descriptor that is not a regular file.
    struct EventFdLike;

    impl EventFdLike {
        #[allow(clippy::new_ret_no_self)]
        fn new() -> OwnedFd {
            // SAFETY: plain eventfd creation; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: just created, owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(fd) }
        }
    }

    #[test]
    fn mapping_shares_memory_with_the_file() {
        let fd = memfd(0x1000);
        // SAFETY: pwrite from a live buffer into a live memfd.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), b"abcd".as_ptr().cast(), 4, 0x10) };
        assert_eq!(n, 4);
        let mut t = DmaTable::new(4);
        t.map(&req(0x1000, 0x1000), Some(fd)).unwrap();
        let m = t.get(0x1000).unwrap();
        let mut got = [0u8; 4];
        // SAFETY: the mapping is 0x1000 bytes long and readable; reading 4 bytes at 0x10.
        unsafe { std::ptr::copy_nonoverlapping((m.host + 0x10) as *const u8, got.as_mut_ptr(), 4) };
        assert_eq!(&got, b"abcd");
    }
}
