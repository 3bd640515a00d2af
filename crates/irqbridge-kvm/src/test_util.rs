// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the unit tests.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// An anonymous memory file of `size` bytes.
pub(crate) fn memfd(size: u64) -> OwnedFd {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(c"irqbridge-kvm-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0, "memfd_create failed");
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = libc::off_t::try_from(size).expect("memfd size");
    // SAFETY: ftruncate on a valid descriptor has no memory-safety preconditions.
    let ret = unsafe { libc::ftruncate(fd.as_raw_fd(), len) };
    assert_eq!(ret, 0, "ftruncate failed");
    fd
}
