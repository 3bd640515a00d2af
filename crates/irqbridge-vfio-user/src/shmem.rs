// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The event-channel page: one 4 KiB memfd, mapped shared into the server (vm-memory's
//! `MmapRegion`) and handed to the client as the mmap file of BAR4.
//!
//! The server touches the page only through [`AtomicU64`] words
//! ([`SharedWords`]), because the guest writes the same memory
//! concurrently through its own mapping. The file is sealed against shrinking and growing, so
//! a client holding the fd cannot truncate it under the server's mapping (which would turn
//! the server's next access into SIGBUS).

#![deny(missing_docs)]

use std::ffi::CStr;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use irqbridge_core::SharedWords;
use vm_memory::{FileOffset, MmapRegion};

/// Size of the event-channel page in bytes.
pub const EVTCHN_PAGE_BYTES: usize = 4096;
const WORDS: usize = EVTCHN_PAGE_BYTES / std::mem::size_of::<AtomicU64>();
const MEMFD_NAME: &CStr = c"irqbridge-evtchn";

/// A 4 KiB shared-memory page backed by a sealed memfd, mapped `MAP_SHARED` with vm-memory's
/// [`MmapRegion`].
pub struct EventChannelPage {
    file: Arc<File>,
    region: MmapRegion<()>,
}

impl EventChannelPage {
    /// Creates the memfd (close-on-exec, sealable), sizes it to 4 KiB, seals its size and maps
    /// it shared. The page starts zeroed.
    ///
    /// # Errors
    ///
    /// The I/O error of `memfd_create`, `ftruncate`, `fcntl(F_ADD_SEALS)` or `mmap`.
    pub fn new() -> io::Result<Self> {
        // SAFETY: `MEMFD_NAME` is a valid NUL-terminated string; the flags are valid. The
        // returned fd is checked before use.
        let raw = unsafe {
            libc::memfd_create(
                MEMFD_NAME.as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = File::from(fd);
        file.set_len(EVTCHN_PAGE_BYTES as u64)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: `file` is a valid memfd created with MFD_ALLOW_SEALING; F_ADD_SEALS takes an
        // int argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let file = Arc::new(file);
        // The file is exactly one page long and can no longer shrink, so the mapping never
        // reaches past its end (no SIGBUS).
        let region = MmapRegion::from_file(
            FileOffset::from_arc(Arc::clone(&file), 0),
            EVTCHN_PAGE_BYTES,
        )
        .map_err(|e| io::Error::other(format!("mapping the event-channel page: {e}")))?;
        Ok(EventChannelPage { file, region })
    }

    /// The page as 512 atomic 64-bit words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the region is a live, page-aligned (so 8-byte aligned) shared mapping of
        // EVTCHN_PAGE_BYTES bytes owned by `self`, unmapped only when `self` is dropped, so it
        // outlives the returned borrow. The memory is initialised (memfd pages read as zero)
        // and is only accessed atomically, by us and by the guest, so shared references to
        // `AtomicU64` are sound.
        unsafe { std::slice::from_raw_parts(self.region.as_ptr().cast::<AtomicU64>(), WORDS) }
    }

    /// Reads `data.len()` bytes at byte `offset` (little endian, word by word atomically).
    /// Bytes outside the page read 0.
    pub fn read_bytes(&self, offset: u64, data: &mut [u8]) {
        let words = self.words();
        for (i, out) in data.iter_mut().enumerate() {
            let byte = offset.checked_add(i as u64).and_then(|b| {
                let w = usize::try_from(b / 8).ok()?;
                let v = words.get(w)?.load(std::sync::atomic::Ordering::SeqCst);
                Some(v.to_le_bytes()[(b % 8) as usize])
            });
            *out = byte.unwrap_or(0);
        }
    }

    /// Writes `data` at byte `offset`: each touched word is updated atomically with only the
    /// written bytes replaced. Bytes outside the page are ignored.
    pub fn write_bytes(&self, offset: u64, data: &[u8]) {
        let words = self.words();
        let mut i = 0usize;
        while i < data.len() {
            let Some(b) = offset.checked_add(i as u64) else {
                return;
            };
            let Some(word) = usize::try_from(b / 8).ok().and_then(|w| words.get(w)) else {
                return;
            };
            let first = (b % 8) as usize;
            let n = (8 - first).min(data.len() - i);
            let mut value = [0u8; 8];
            let mut mask = [0u8; 8];
            for k in 0..n {
                value[first + k] = data.get(i + k).copied().unwrap_or(0);
                mask[first + k] = 0xff;
            }
            let value = u64::from_le_bytes(value);
            let mask = u64::from_le_bytes(mask);
            let _ = word.fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |old| Some((old & !mask) | value),
            );
            i += n;
        }
    }
}

impl SharedWords for EventChannelPage {
    fn words(&self) -> &[AtomicU64] {
        EventChannelPage::words(self)
    }
}

impl AsFd for EventChannelPage {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl fmt::Debug for EventChannelPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventChannelPage")
            .field("fd", &self.file.as_raw_fd())
            .field("addr", &self.region.as_ptr())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn page_is_zeroed_and_shared_through_the_fd() {
        let page = EventChannelPage::new().unwrap();
        assert_eq!(page.words().len(), 512);
        assert!(page.words().iter().all(|w| w.load(Ordering::SeqCst) == 0));
        page.words()[3].store(0x1122_3344_5566_7788, Ordering::SeqCst);
        // Read through the file: the same memory.
        let mut buf = [0u8; 8];
        // SAFETY: valid fd and buffer of the given length.
        let n = unsafe { libc::pread(page.as_fd().as_raw_fd(), buf.as_mut_ptr().cast(), 8, 24) };
        assert_eq!(n, 8);
        assert_eq!(u64::from_le_bytes(buf), 0x1122_3344_5566_7788);
    }

    #[test]
    fn size_is_sealed() {
        let page = EventChannelPage::new().unwrap();
        // SAFETY: valid fd.
        let r = unsafe { libc::ftruncate(page.as_fd().as_raw_fd(), 0) };
        assert_eq!(r, -1);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn byte_access() {
        let page = EventChannelPage::new().unwrap();
        page.write_bytes(6, &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(
            page.words()[0].load(Ordering::SeqCst),
            0xbbaa_0000_0000_0000
        );
        assert_eq!(page.words()[1].load(Ordering::SeqCst), 0xddcc);
        let mut out = [0u8; 6];
        page.read_bytes(5, &mut out);
        assert_eq!(out, [0, 0xaa, 0xbb, 0xcc, 0xdd, 0]);
        // Outside the page: ignored / zero.
        page.write_bytes(4094, &[1, 2, 3, 4]);
        let mut out = [9u8; 4];
        page.read_bytes(4094, &mut out);
        assert_eq!(out, [1, 2, 0, 0]);
    }
}
