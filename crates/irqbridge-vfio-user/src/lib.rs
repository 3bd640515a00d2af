//! vfio-user wire format, framing with fd passing, server loop and the irqbridge PCI test device.
//!
//! The protocol is written here rather than taken from the rust-vmm `vfio_user` crate: its
//! server replies to NO_REPLY messages (QEMU then reads an "unexpected reply" and loses step),
//! panics on a VERSION without JSON and sends errno 0 in error replies.
//!
//! Layers, bottom up:
//!
//! - [`proto`]: every message as a parse/encode pair over little-endian bytes, for both the
//!   server and a client (the `irqbridge-kvm` plugin uses it).
//! - [`conn`]: framing over an AF_UNIX stream with SCM_RIGHTS, size and fd limits.
//! - [`server`]: one client at a time, served in blocking I/O on the connection thread while
//!   a device thread polls the device's own fds; validates every request before a
//!   [`device::VfioUserDevice`] sees it; [`dma`] keeps the client's DMA mappings.
//! - [`pci`]: the irqbridge test device (docs/device-abi.md) on the `irqbridge-core` models,
//!   with its event-channel page in [`shmem`] and its external [`control`] socket.
//!
//! ```no_run
//! use irqbridge_vfio_user::pci::{DeviceConfig, IrqbridgeDevice};
//! use irqbridge_vfio_user::server::Server;
//!
//! let mut device = IrqbridgeDevice::new(DeviceConfig::default())?;
//! let mut server = Server::bind("/tmp/irqbridge.sock")?;
//! server.run(&mut device)?; // serves one client after another until stopped
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod conn;
pub mod control;
pub mod device;
pub mod dma;
pub mod error;
pub mod pci;
pub mod proto;
pub mod server;
pub mod shmem;
