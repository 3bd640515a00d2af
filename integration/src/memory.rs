// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest RAM (a shared memfd mapping) and host mappings that can back extra memory slots.
//!
//! The guest writes its RAM concurrently with the host, so the host never forms ordinary Rust
//! references to guest bytes: it uses atomics for naturally aligned words and volatile accesses
//! for byte copies.

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::error::{Error, Result};

/// A shared read/write host mapping, unmapped on drop.
#[derive(Debug)]
pub struct MmapRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain shared memory owned by this value; every access goes through raw
// pointers with atomic or volatile operations, so it may be used from any thread.
unsafe impl Send for MmapRegion {}
// SAFETY: as above; `&MmapRegion` only hands out raw pointers and atomics.
unsafe impl Sync for MmapRegion {}

impl MmapRegion {
    /// Maps `len` bytes of `fd` at `offset`, shared and read/write (for example a device BAR
    /// offered as an mmap-able region).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a zero or oversized length, [`Error::Mmap`] when `mmap`
    /// fails.
    pub fn map_fd(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<MmapRegion> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| Error::InvalidArgument(format!("mmap offset {offset:#x} is too large")))?;
        Self::map(len, libc::MAP_SHARED, fd.as_raw_fd(), offset)
    }

    /// Creates an anonymous shared mapping of `len` zero bytes.
    ///
    /// # Errors
    ///
    /// As [`MmapRegion::map_fd`].
    pub fn anonymous(len: u64) -> Result<MmapRegion> {
        Self::map(len, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
    }

    fn map(len: u64, flags: libc::c_int, fd: libc::c_int, offset: libc::off_t) -> Result<Self> {
        let size = usize::try_from(len)
            .ok()
            .filter(|&s| s > 0)
            .ok_or_else(|| Error::InvalidArgument(format!("bad mapping length {len:#x}")))?;
        // SAFETY: a fresh mapping at an address chosen by the kernel does not alias any Rust
        // object; the arguments are checked by the kernel and the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_NORESERVE,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Mmap {
                len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| Error::Mmap {
            len,
            source: io::Error::other("mmap returned a null pointer"),
        })?;
        Ok(MmapRegion { ptr, len: size })
    }

    /// Host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the mapping is empty (never: mappings have a non-zero length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pointer to `len` bytes at `offset` with the given alignment, after bounds checks.
    fn ptr_at(&self, base_gpa: u64, offset: u64, len: u64, align: u64) -> Result<*mut u8> {
        let gpa = base_gpa.wrapping_add(offset);
        if offset % align != 0 {
            return Err(Error::Unaligned { gpa, align });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len as u64 => {}
            _ => return Err(Error::OutOfRange { gpa, len }),
        }
        let offset = usize::try_from(offset).map_err(|_| Error::OutOfRange { gpa, len })?;
        // SAFETY: offset + len <= self.len was checked above, so the result stays inside the
        // mapping.
        Ok(unsafe { self.ptr.as_ptr().add(offset) })
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping created by `map` and owned by this value; nothing
        // can use it after drop.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len) };
        if rc != 0 {
            log::warn!("munmap failed: {}", io::Error::last_os_error());
        }
    }
}

/// Guest RAM: a memfd (`MFD_CLOEXEC`) mapped shared into this process.
///
/// The fd, size and guest physical address are exposed so that the same memory can be handed to
/// an out-of-process device for DMA (vfio-user `DMA_MAP`, vhost-user `SET_MEM_TABLE`).
#[derive(Debug)]
pub struct GuestMemory {
    // Field order: the mapping is dropped before the fd (either order would be sound).
    map: MmapRegion,
    file: File,
    gpa: u64,
}

impl GuestMemory {
    /// Creates `size` bytes of zeroed guest RAM at guest physical address `gpa`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `size` is zero or not a multiple of 4 KiB, [`Error::Memfd`]
    /// or [`Error::Mmap`] when the kernel refuses.
    pub fn new(gpa: u64, size: u64) -> Result<GuestMemory> {
        if size == 0 || size % 4096 != 0 || gpa % 4096 != 0 {
            return Err(Error::InvalidArgument(format!(
                "guest RAM {gpa:#x}+{size:#x} must be non-empty and 4 KiB aligned"
            )));
        }
        // SAFETY: the name is a valid NUL-terminated string and the flags are valid; the
        // result is checked below.
        let fd = unsafe { libc::memfd_create(c"irqbridge-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size).map_err(Error::Memfd)?;
        let map = MmapRegion::map_fd(file.as_fd(), 0, size)?;
        Ok(GuestMemory { map, file, gpa })
    }

    /// The memfd backing guest RAM (file offset 0 = [`GuestMemory::gpa`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Guest physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.map.len()
    }

    /// Host address of the mapping (for `KVM_SET_USER_MEMORY_REGION` and vhost-user tables).
    pub fn host_addr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    fn ptr(&self, gpa: u64, len: u64, align: u64) -> Result<*mut u8> {
        let offset = gpa
            .checked_sub(self.gpa)
            .ok_or(Error::OutOfRange { gpa, len })?;
        self.map.ptr_at(self.gpa, offset, len, align)
    }

    /// The naturally aligned u64 at `gpa`, as an atomic shared with the guest.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] or [`Error::Unaligned`].
    pub fn atomic_u64(&self, gpa: u64) -> Result<&AtomicU64> {
        let ptr = self.ptr(gpa, 8, 8)?;
        // SAFETY: ptr is 8-byte aligned and in bounds of a mapping that lives as long as
        // `self`; AtomicU64 has no invalid bit patterns and the guest only accesses it with
        // aligned (atomic) instructions too.
        Ok(unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) })
    }

    /// The naturally aligned u32 at `gpa`, as an atomic shared with the guest.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] or [`Error::Unaligned`].
    pub fn atomic_u32(&self, gpa: u64) -> Result<&AtomicU32> {
        let ptr = self.ptr(gpa, 4, 4)?;
        // SAFETY: as in `atomic_u64`, with 4-byte alignment.
        Ok(unsafe { AtomicU32::from_ptr(ptr.cast::<u32>()) })
    }

    /// Loads the u64 at `gpa` (acquire).
    ///
    /// # Errors
    ///
    /// As [`GuestMemory::atomic_u64`].
    pub fn load_u64(&self, gpa: u64) -> Result<u64> {
        Ok(self.atomic_u64(gpa)?.load(Ordering::Acquire))
    }

    /// Stores the u64 at `gpa` (release).
    ///
    /// # Errors
    ///
    /// As [`GuestMemory::atomic_u64`].
    pub fn store_u64(&self, gpa: u64, value: u64) -> Result<()> {
        self.atomic_u64(gpa)?.store(value, Ordering::Release);
        Ok(())
    }

    /// Loads the u32 at `gpa` (acquire).
    ///
    /// # Errors
    ///
    /// As [`GuestMemory::atomic_u32`].
    pub fn load_u32(&self, gpa: u64) -> Result<u32> {
        Ok(self.atomic_u32(gpa)?.load(Ordering::Acquire))
    }

    /// Stores the u32 at `gpa` (release).
    ///
    /// # Errors
    ///
    /// As [`GuestMemory::atomic_u32`].
    pub fn store_u32(&self, gpa: u64, value: u32) -> Result<()> {
        self.atomic_u32(gpa)?.store(value, Ordering::Release);
        Ok(())
    }

    /// Copies guest bytes at `gpa` into `buf` (volatile, byte by byte).
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`].
    pub fn read_slice(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let ptr = self.ptr(gpa, buf.len() as u64, 1)?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: ptr..ptr+buf.len() is inside the mapping (checked by `ptr`); a volatile
            // read of a byte that the guest may change concurrently yields some byte value.
            *b = unsafe { ptr.add(i).read_volatile() };
        }
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa` (volatile, byte by byte).
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`].
    pub fn write_slice(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let ptr = self.ptr(gpa, data.len() as u64, 1)?;
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: in bounds (checked by `ptr`); guest memory is plain shared memory that no
            // Rust reference points into.
            unsafe { ptr.add(i).write_volatile(b) };
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `gpa`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`].
    pub fn zero(&self, gpa: u64, len: u64) -> Result<()> {
        let ptr = self.ptr(gpa, len, 1)?;
        let len = usize::try_from(len).map_err(|_| Error::OutOfRange { gpa, len })?;
        for i in 0..len {
            // SAFETY: in bounds (checked by `ptr`), as in `write_slice`.
            unsafe { ptr.add(i).write_volatile(0) };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memory_round_trips_and_checks_bounds() {
        let mem = GuestMemory::new(0x10_0000, 0x2000).unwrap();
        assert_eq!(mem.size(), 0x2000);
        assert_eq!(mem.gpa(), 0x10_0000);
        mem.store_u64(0x10_0008, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(mem.load_u32(0x10_000c).unwrap(), 0x1122_3344);
        let mut buf = [0u8; 3];
        mem.read_slice(0x10_0008, &mut buf).unwrap();
        assert_eq!(buf, [0x88, 0x77, 0x66]);
        mem.write_slice(0x10_1ffe, &[1, 2]).unwrap();
        assert_eq!(mem.load_u32(0x10_1ffc).unwrap(), 0x0201_0000);
        mem.zero(0x10_1ffc, 4).unwrap();
        assert_eq!(mem.load_u32(0x10_1ffc).unwrap(), 0);

        assert!(matches!(
            mem.load_u64(0x10_0004),
            Err(Error::Unaligned { align: 8, .. })
        ));
        assert!(matches!(
            mem.load_u64(0x10_2000),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            mem.load_u64(0xf_fff8),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            mem.write_slice(0x10_1fff, &[1, 2]),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            mem.read_slice(u64::MAX, &mut buf),
            Err(Error::OutOfRange { .. })
        ));
        assert!(GuestMemory::new(0, 100).is_err());
    }

    #[test]
    fn memfd_is_cloexec_and_shares_the_bytes() {
        let mem = GuestMemory::new(0, 0x1000).unwrap();
        // SAFETY: F_GETFD on a valid fd has no memory effects.
        let flags = unsafe { libc::fcntl(mem.fd().as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        mem.store_u32(0x40, 0xdead_beef).unwrap();
        let other = MmapRegion::map_fd(mem.fd(), 0, 0x1000).unwrap();
        let word = other.ptr_at(0, 0x40, 4, 4).unwrap();
        // SAFETY: in bounds and aligned (checked by ptr_at); no concurrent writers here.
        assert_eq!(unsafe { word.cast::<u32>().read_volatile() }, 0xdead_beef);
    }

    #[test]
    fn anonymous_region_is_zeroed() {
        let r = MmapRegion::anonymous(0x1000).unwrap();
        assert_eq!(r.len(), 0x1000);
        assert!(!r.is_empty());
        let p = r.ptr_at(0, 0xff8, 8, 8).unwrap();
        // SAFETY: in bounds and aligned.
        assert_eq!(unsafe { p.cast::<u64>().read_volatile() }, 0);
        assert!(r.ptr_at(0, 0xffc, 8, 4).is_err());
        assert!(MmapRegion::anonymous(0).is_err());
    }
}
