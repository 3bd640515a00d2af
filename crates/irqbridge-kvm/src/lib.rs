//! VMM-side plugin: wires the interrupts and doorbells of an irqbridge device into KVM.
#![deny(missing_docs)]

pub mod attach;
pub mod client;
mod error;
pub mod interrupt;
pub mod mmap;
pub mod routing;
#[cfg(test)]
mod test_util;

pub use error::{Error, Result};

/// Borrows an [`EventFd`](vmm_sys_util::eventfd::EventFd) as a [`BorrowedFd`] (vmm-sys-util's
/// `EventFd` does not implement `AsFd`).
pub fn eventfd_as_fd(fd: &vmm_sys_util::eventfd::EventFd) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsRawFd;
    // SAFETY: the EventFd owns an open descriptor for at least as long as the returned borrow
    // (tied to `&fd`), which is all `borrow_raw` requires.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}
