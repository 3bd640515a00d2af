// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vfio-user wire format and framing with fd passing, and both ends of the socket: the server
//! loop with the irqbridge PCI test device, and a client.
//!
//! The protocol is written here rather than taken from the rust-vmm `vfio_user` crate: its
//! server replies to NO_REPLY messages (QEMU then reads an "unexpected reply" and loses step),
//! panics on a VERSION without JSON and sends errno 0 in error replies.
//!
//! # Roles are cargo features
//!
//! | feature | modules | extra dependencies |
//! |---|---|---|
//! | (always) | [`proto`], [`conn`], [`error`] | `libc`, `vfio-bindings`, `vmm-sys-util` |
//! | `server` (default) | `server`, `device`, `dma`, `pci`, `testdev`, `shmem`, `control` | `irqbridge-core`, `serde`, `serde_json` |
//! | `client` (default) | `client` | none |
//!
//! A VMM-side user (the `irqbridge-kvm` plugin) takes
//! `default-features = false, features = ["client"]` and so builds neither the device models
//! nor serde (the VERSION capabilities JSON has its own small codec in [`proto`]).
//!
//! Layers, bottom up:
//!
//! - [`proto`]: every message as a parse/encode pair over little-endian bytes, for both the
//!   server and the client.
//! - [`conn`]: framing over an AF_UNIX stream with SCM_RIGHTS, size and fd limits.
//! - `server` (feature `server`): one client at a time, served in blocking I/O on the
//!   connection thread (one recvmsg and one sendmsg per request) while a device thread polls
//!   the device's own fds; validates every request before a `device::VfioUserDevice` sees it;
//!   `dma` keeps the client's DMA mappings.
//! - `pci` (feature `server`): a reusable PCI function (`pci::PciFunction`): config space,
//!   BARs, the capability list and the `irqbridge-core` interrupt models (INTx, MSI, MSI-X)
//!   around a device that implements the small `pci::PciDevice` trait; see "Writing a device"
//!   there.
//! - `testdev` (feature `server`): the irqbridge test device (docs/device-abi.md) built on it,
//!   with its event-channel page in `shmem` and its external `control` socket (also reachable
//!   as `pci::{IrqbridgeDevice, DeviceConfig, regs, ...}`).
//! - `passthrough` (feature `server`): a host PCI device bound to vfio-pci served over
//!   vfio-user, its interrupts signalled by the host kernel into the client's eventfds.
//! - `client` (feature `client`): the VMM end: typed calls with per-call timeouts and reply
//!   checking.
//!
//! ```no_run
//! # #[cfg(feature = "server")]
//! # {
//! use irqbridge_vfio_user::pci::{DeviceConfig, IrqbridgeDevice};
//! use irqbridge_vfio_user::server::Server;
//!
//! let mut device = IrqbridgeDevice::new(DeviceConfig::default())?;
//! let mut server = Server::bind("/tmp/irqbridge.sock")?;
//! server.run(&mut device)?; // serves one client after another until stopped
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

// Both roles.
pub mod conn;
pub mod error;
pub mod json;
pub mod proto;

// The server role: every module that needs `irqbridge-core` or serde goes here.
#[cfg(feature = "server")]
pub mod control;
#[cfg(feature = "server")]
pub mod device;
#[cfg(feature = "server")]
pub mod dma;
#[cfg(feature = "server")]
pub mod passthrough;
#[cfg(feature = "server")]
pub mod pci;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod shmem;
#[cfg(feature = "server")]
pub mod testdev;

// The client role.
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub use client::{Client, ClientConfig};
