// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Passthrough: a host VFIO PCI device served over vfio-user, its interrupts going from the
//! host kernel straight into the client's eventfds (docs/passthrough.md).
//!
//! - [`vfio`]: the host side (container, group, device; the ioctls in one module) behind the
//!   [`vfio::VfioBackend`] seam.
//! - [`config`]: config-space virtualization (BARs, ROM, capability pointers, MSI and MSI-X
//!   virtual; the rest passed to the host).
//! - [`device`]: [`PassthroughDevice`], the [`crate::device::VfioUserDevice`] the server runs.
//!
//! The virtual parts of the function come from the [`pci`](crate::pci) model's code: the
//! config bytes and write masks, BAR sizing, the MSI registers (`irqbridge-core`'s `Msi`), the
//! MSI-X table and PBA (`Msix`) and `SET_IRQS` decoding; what stays here is the host's config
//! space and BARs, the kernel's eventfd switching on mask and unmask, DMA into the container
//! and host reset (docs/passthrough.md says why it is not a `PciFunction`). It is `Send`.
//!
//! ```no_run
//! use irqbridge_vfio_user::passthrough::{self, PassthroughOptions};
//! use irqbridge_vfio_user::server::Server;
//!
//! let mut device = passthrough::open("0000:00:04.0", PassthroughOptions::default())?;
//! let mut server = Server::bind("/tmp/passthrough.sock")?;
//! server.run(&mut device)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod config;
pub mod device;
pub mod vfio;

pub use device::{PassthroughDevice, PassthroughOptions, PassthroughStats};
pub use vfio::{Bdf, HostPaths, OpenError, VfioBackend, VfioDevice};

/// Errors of [`open`].
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    /// The device could not be opened through VFIO.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The device was opened but its config space could not be read.
    #[error("Cannot set up the passed-through device.")]
    Setup(#[source] std::io::Error),
}

/// Opens the host PCI device `bdf` (`DDDD:BB:SS.F`) through VFIO and wraps it for serving.
///
/// # Errors
/// [`PassthroughError::Open`] when the address is malformed, the device does not exist, is not
/// bound to vfio-pci, its group is not viable or /dev/vfio cannot be opened (each says what to
/// fix); [`PassthroughError::Setup`] when its config space cannot be read.
pub fn open(
    bdf: &str,
    opts: PassthroughOptions,
) -> Result<PassthroughDevice<VfioDevice>, PassthroughError> {
    let bdf = Bdf::parse(bdf)?;
    let dev = VfioDevice::open(&bdf, &HostPaths::default())?;
    PassthroughDevice::new(dev, opts).map_err(PassthroughError::Setup)
}
