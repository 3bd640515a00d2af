// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A reusable PCI function served over vfio-user, and (re-exported for compatibility) the
//! irqbridge test device built on it.
//!
//! A device is its registers and behaviour only. It implements the small [`PciDevice`] trait
//! (BAR access by index, reset, optional mmap file, ioeventfds, extra fds to poll and a
//! snapshot) and is wrapped in a [`PciFunction`], which owns everything standard:
//!
//! - the config space ([`Identity`], BARs with sizing, the capability list, write masks),
//! - the interrupt models of `irqbridge-core` in [`PciCore`]: INTx (auto-mask, COMMAND bit 10,
//!   STATUS bit 3, suppression while MSI or MSI-X is enabled), MSI with per-vector masking,
//!   MSI-X with its table and PBA in a BAR, and the ERR / REQ eventfds,
//! - `DEVICE_SET_IRQS` with the kernel's rules, region info, ioeventfds, reset and
//!   disconnect, and snapshots of the values.
//!
//! [`VfioUserDevice`](crate::device::VfioUserDevice) is implemented once, for every
//! `PciFunction<D>`. The device raises interrupts through the [`PciCore`] it is handed:
//! [`PciCore::intx_set_level`], [`PciCore::msi_fire`], [`PciCore::msix_fire`].
//!
//! # Writing a device
//!
//! ```
//! use irqbridge_vfio_user::pci::{Bar, BarIndex, Identity, PciCore, PciDevice, PciFunctionBuilder};
//!
//! /// One register at BAR0 offset 0: writing a value fires that MSI-X vector.
//! #[derive(Debug, Default)]
//! struct Doorbell {
//!     fired: u64,
//! }
//!
//! impl PciDevice for Doorbell {
//!     fn bar_read(&mut self, _bar: BarIndex, _offset: u64, data: &mut [u8], _pci: &mut PciCore) {
//!         data.fill(0);
//!     }
//!     fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8], pci: &mut PciCore) {
//!         if let (0, 0, Ok(v)) = (bar, offset, <[u8; 4]>::try_from(data)) {
//!             if let Ok(vector) = u16::try_from(u32::from_le_bytes(v)) {
//!                 if pci.msix_fire(vector).is_ok() {
//!                     self.fired += 1;
//!                 }
//!             }
//!         }
//!     }
//! }
//!
//! let mut function = PciFunctionBuilder::new(Identity {
//!     vendor_id: 0x1234,
//!     device_id: 0x0001,
//!     class_code: 0xff_0000,
//!     ..Identity::default()
//! })
//! .bar(0, Bar::mem32(4096))
//! .bar(2, Bar::mem32(8192))
//! .msix(4, 2, 0, 0x1000)
//! .build(Doorbell::default())?;
//!
//! // What a client sees (normally through `irqbridge_vfio_user::server::Server`):
//! use irqbridge_vfio_user::device::VfioUserDevice;
//! let mut id = [0u8; 4];
//! function.region_read(7, 0, &mut id).map_err(std::io::Error::from_raw_os_error)?;
//! assert_eq!(u32::from_le_bytes(id), 0x0001_1234);
//! assert_eq!(function.irq_info(2).count, 4);
//! function.region_write(0, 0, &3u32.to_le_bytes()).map_err(std::io::Error::from_raw_os_error)?;
//! // MSI-X is disabled, so vector 3 is now pending in the PBA.
//! assert!(function.core().msix().unwrap().pending(3)?);
//! assert_eq!(function.device().fired, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub(crate) mod config;
pub mod consts;
mod function;
mod irq;
mod layout;
pub(crate) mod parts;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vmm_sys_util::eventfd::EventFd;

pub use function::{PciFunction, PciState};
pub use irq::PciCore;
pub use layout::{Bar, BarKind, Identity, IoEventArea, Layout, MsixLayout, PciFunctionBuilder};

// The test device used to live here; its paths stay valid.
pub use crate::testdev::{
    Counters, DEFAULT_EVTCHN_PORTS, DEFAULT_MSIX_VECTORS, DeviceConfig, DeviceError,
    DeviceSnapshot, IrqbridgeDevice, MAX_EVTCHN_PORTS, MAX_MSIX_VECTORS, TestDevice, regs,
};

/// A BAR index, 0..6.
pub type BarIndex = u32;

/// Errors of the PCI function model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The builder was given a layout that cannot work.
    #[error("Invalid PCI function layout: {0}.")]
    InvalidLayout(String),
    /// An interrupt model rejected an operation (bad vector, failed notifier write).
    #[error("Interrupt model operation failed.")]
    Model(#[from] irqbridge_core::Error),
    /// The function has no INTx pin.
    #[error("The function has no INTx pin.")]
    NoIntx,
    /// The function has no MSI capability.
    #[error("The function has no MSI capability.")]
    NoMsi,
    /// The function has no MSI-X capability.
    #[error("The function has no MSI-X capability.")]
    NoMsix,
    /// A snapshot does not fit this function.
    #[error("Snapshot does not fit this function: {0}.")]
    SnapshotMismatch(String),
    /// The device does not support snapshots.
    #[error("The device does not support snapshots.")]
    SnapshotUnsupported,
    /// A kernel object (an ioeventfd) could not be created.
    #[error("Failed to create an eventfd.")]
    Io(#[source] io::Error),
}

/// What a guest config-space write changed, reported to [`PciDevice::config_written`] after
/// the function applied it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigEffect {
    /// COMMAND changed (INTx disable is already applied to the INTx model).
    Command {
        /// Before the write.
        old: u16,
        /// After the write.
        new: u16,
    },
    /// A BAR was written (sizing writes included); `address` is what it now decodes.
    Bar {
        /// BAR index (the lower one of a 64-bit BAR).
        index: BarIndex,
        /// The BAR's address bits.
        address: u64,
    },
    /// The MSI capability was written (already applied to the MSI model).
    Msi,
    /// MSI-X Message Control was written (already applied to the MSI-X model).
    Msix,
    /// Other bytes of the image were written through their masks (INTERRUPT_LINE, vendor
    /// capabilities...).
    Write {
        /// First byte of the write.
        offset: u64,
        /// Length of the write.
        len: usize,
    },
}

/// The registers and behaviour of a device inside a [`PciFunction`].
///
/// Every callback gets the function's [`PciCore`] to raise interrupts or read the config
/// space. Calls run on the server thread, one at a time. Accesses reach the device already
/// checked to lie inside a BAR that exists; accesses to the MSI-X table and PBA that the model
/// honours (4 or 8 bytes, aligned) never reach it.
pub trait PciDevice: Send {
    /// A trapped read of BAR `bar` at `offset`; fill `data`.
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8], pci: &mut PciCore);
    /// A trapped write of BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8], pci: &mut PciCore);
    /// DEVICE_RESET (or a reset the device asked for), after the function reset its config
    /// space and interrupt models.
    fn reset(&mut self, _pci: &mut PciCore) {}
    /// The file behind the mmap areas of BAR `bar` (sent with DEVICE_GET_REGION_INFO).
    fn bar_mmap_fd(&self, _bar: BarIndex) -> Option<BorrowedFd<'_>> {
        None
    }
    /// The ioeventfd of area `area` (index into [`Bar::ioeventfds`]) of BAR `bar` was signalled
    /// `count` times.
    fn ioeventfd(&mut self, _bar: BarIndex, _area: usize, _count: u64, _pci: &mut PciCore) {}
    /// Extra fds to poll for readability, with tokens below [`DEVICE_TOKEN_LIMIT`]. The set
    /// must not change in a BAR access (the server asks again only after other messages and
    /// events, see [`VfioUserDevice::poll_fds`](crate::device::VfioUserDevice::poll_fds)):
    /// create the fds up front, as `examples/timer.rs` does with its ticker.
    fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
        Vec::new()
    }
    /// One of [`poll_fds`](Self::poll_fds) is readable (or hung up).
    fn handle_fd_event(&mut self, _token: u64, _pci: &mut PciCore) {}
    /// A guest config write took effect (called once per [`ConfigEffect`]).
    fn config_written(&mut self, _effect: ConfigEffect, _pci: &mut PciCore) {}
    /// The client went away (its eventfds are already dropped).
    fn client_disconnected(&mut self, _pci: &mut PciCore) {}
    /// The device's own state for a snapshot.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotUnsupported`] unless the device implements it.
    fn save(&self) -> Result<serde_json::Value, Error> {
        Err(Error::SnapshotUnsupported)
    }
    /// Loads what [`save`](Self::save) returned.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotUnsupported`] unless the device implements it;
    /// [`Error::SnapshotMismatch`] if the state does not fit (the device is then unchanged).
    fn load(&mut self, _state: &serde_json::Value) -> Result<(), Error> {
        Err(Error::SnapshotUnsupported)
    }
}

/// Poll tokens of [`PciDevice::poll_fds`] must be below this value; the function uses the
/// tokens above it.
pub const DEVICE_TOKEN_LIMIT: u64 = 1 << 62;

/// Polls one fd without blocking and returns its `revents`.
pub(crate) fn poll_now(fd: BorrowedFd<'_>) -> io::Result<i16> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, initialised pollfd for the duration of the call; timeout 0
    // never blocks.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd.revents)
}

/// Borrows the fd of an [`EventFd`] (vmm-sys-util's `EventFd` has no `AsFd`).
pub(crate) fn eventfd_fd(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the raw fd belongs to `fd`, which stays open for the lifetime of the returned
    // borrow because the borrow is tied to `&EventFd`.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

/// `e` and its sources, joined with ": ".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(if s.ends_with('.') { " " } else { ": " });
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}
