// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The unsafe edge: mmap, eventfd, poll and ioctl. Everything above this module is safe code.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

/// A shared, read-write memory mapping of a file (a PCI BAR through sysfs or a VFIO region).
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset`, shared and read-write.
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Self> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large"))?;
        // SAFETY: a fresh mapping at an address of the kernel's choosing (no hint) cannot alias
        // any Rust object; the fd is valid for the duration of the call and the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Self { ptr, len })
    }

    /// Maps `len` bytes of fresh anonymous memory, private, read-write, populated and locked
    /// (`MAP_POPULATE | MAP_LOCKED`): every page is resident and stays where it is, so its
    /// physical address can be given to a device.
    pub fn anonymous_locked(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing (no hint)
        // cannot alias any Rust object; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Self { ptr, len })
    }

    /// The virtual address of the mapping's first byte.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn checked(&self, off: usize, width: usize) -> io::Result<*mut u8> {
        if off % width != 0 || off.checked_add(width).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "access of {width} bytes at {off:#x} is outside the {:#x}-byte mapping or unaligned",
                    self.len
                ),
            ));
        }
        // SAFETY: off + width <= len, so the result stays inside the mapping.
        Ok(unsafe { self.ptr.as_ptr().add(off) })
    }

    /// Reads an aligned 32-bit register with a single volatile load.
    pub fn read32(&self, off: usize) -> io::Result<u32> {
        let p = self.checked(off, 4)?;
        // SAFETY: `p` is inside the live mapping and 4-byte aligned (checked above); a volatile
        // load is the one access an MMIO register must see.
        Ok(unsafe { p.cast::<u32>().read_volatile() })
    }

    /// Writes an aligned 32-bit register with a single volatile store.
    pub fn write32(&self, off: usize, val: u32) -> io::Result<()> {
        let p = self.checked(off, 4)?;
        // SAFETY: as in read32; the mapping is writable (PROT_WRITE).
        unsafe { p.cast::<u32>().write_volatile(val) };
        Ok(())
    }

    /// An atomic view of the aligned 64-bit word at `off` (memory shared with the device).
    pub fn atomic64(&self, off: usize) -> io::Result<&AtomicU64> {
        let p = self.checked(off, 8)?;
        // SAFETY: `p` is inside the mapping, 8-byte aligned, and lives as long as `&self`; the
        // memory is only ever accessed atomically from this program (the device writes it from
        // another process, which is what atomics are for).
        Ok(unsafe { AtomicU64::from_ptr(p.cast::<u64>()) })
    }
}

impl Mapping {
    fn checked_range(&self, off: usize, len: usize) -> io::Result<*mut u8> {
        if off.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {off:#x} do not fit in the {:#x}-byte mapping",
                    self.len
                ),
            ));
        }
        // SAFETY: off + len <= len of the mapping, so the result stays inside it.
        Ok(unsafe { self.ptr.as_ptr().add(off) })
    }

    /// An atomic view of the aligned 16-bit word at `off` (memory shared with a device).
    pub fn atomic16(&self, off: usize) -> io::Result<&AtomicU16> {
        let p = self.checked(off, 2)?;
        // SAFETY: as in atomic64, for a 2-byte aligned word inside the mapping.
        Ok(unsafe { AtomicU16::from_ptr(p.cast::<u16>()) })
    }

    /// An atomic view of the aligned 32-bit word at `off` (memory shared with a device).
    pub fn atomic32(&self, off: usize) -> io::Result<&AtomicU32> {
        let p = self.checked(off, 4)?;
        // SAFETY: as in atomic64, for a 4-byte aligned word inside the mapping.
        Ok(unsafe { AtomicU32::from_ptr(p.cast::<u32>()) })
    }

    /// Copies `data` into the mapping at `off`, byte by byte with volatile stores (the device
    /// reads this memory from another process).
    pub fn write_bytes(&self, off: usize, data: &[u8]) -> io::Result<()> {
        let p = self.checked_range(off, data.len())?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: p + i is inside the mapping (checked_range covered off..off+len) and
            // writable; a byte store needs no alignment.
            unsafe { p.add(i).write_volatile(*b) };
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at `off` out of the mapping with volatile loads.
    pub fn read_bytes(&self, off: usize, buf: &mut [u8]) -> io::Result<()> {
        let p = self.checked_range(off, buf.len())?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: as in write_bytes, for loads.
            *b = unsafe { p.add(i).read_volatile() };
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping created by `new` and never unmapped before.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Waits until `fd` is readable or `timeout` passes; returns whether it became readable.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1, the fd is borrowed for the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r > 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// A non-blocking eventfd, as VFIO signals interrupts through.
#[derive(Debug)]
pub struct EventFd(File);

impl EventFd {
    /// Creates a non-blocking, close-on-exec eventfd with counter 0.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall, result checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Self(File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Reads and resets the counter; 0 when nothing was signalled.
    pub fn take(&self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        match (&self.0).read(&mut b) {
            Ok(8) => Ok(u64::from_ne_bytes(b)),
            Ok(n) => Err(io::Error::other(format!("short eventfd read of {n} bytes"))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` for a signal, then reads and resets the counter (0 on timeout).
    pub fn wait(&self, timeout: Duration) -> io::Result<u64> {
        if poll_readable(self.0.as_fd(), timeout)? {
            self.take()
        } else {
            Ok(0)
        }
    }

    /// The raw descriptor, to pass to VFIO_DEVICE_SET_IRQS.
    pub fn raw(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

/// `ioctl(fd, req, arg)` for requests whose argument is a plain integer (not a pointer).
///
/// Only for the VFIO requests that take a value (`GET_API_VERSION`, `CHECK_EXTENSION`,
/// `SET_IOMMU`): the kernel never dereferences the argument of those.
pub fn ioctl_value(fd: BorrowedFd<'_>, req: u64, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the argument is an integer the kernel does not dereference for these requests.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `ioctl(fd, req, buf)` where the kernel reads and may write back at most `buf.len()` bytes.
///
/// The VFIO structures start with `argsz`, which the kernel honours as the buffer's size: callers
/// set `argsz` to at most `buf.len()`. Plain bytes: any value the kernel writes is valid, and the
/// kernel's user copies need no alignment.
pub fn ioctl_buf(fd: BorrowedFd<'_>, req: u64, buf: &mut [u8]) -> io::Result<libc::c_int> {
    // SAFETY: `buf` is a live, writable byte buffer; the VFIO requests used with this function
    // access at most `argsz` bytes, which callers keep within `buf.len()`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, buf.as_mut_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `ioctl(fd, req, s)` for a request that reads a NUL-terminated string and returns a new file
/// descriptor (VFIO_GROUP_GET_DEVICE_FD), which the returned `File` owns.
pub fn ioctl_cstr_new_fd(fd: BorrowedFd<'_>, req: u64, s: &std::ffi::CStr) -> io::Result<File> {
    // SAFETY: `s` is a valid NUL-terminated string that outlives the call; the kernel only reads it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, s.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success this request returns a descriptor the kernel has just created for this
    // process and that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(r) }))
}
