// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The irqbridge event-channel device as a vhost-user backend.
//!
//! The device (docs/evtchn-virtio.md) gives a guest Xen-style 2-level event channels over
//! virtio: the guest registers a 4 KiB page of its memory holding the pending and mask bitmaps
//! and the upcall blocks (the same layout as the vfio-user device's BAR4), binds ports to
//! upcalls through a control queue, receives one upcall record plus a call-fd signal (the
//! VMM's irqfd) per upcall on that upcall's event queue, and rings doorbells through a
//! doorbell queue whose kick fd is the VMM's ioeventfd. The event-channel logic is the core's
//! [`irqbridge_core::EventChannels`], run directly on the guest's page.
//!
//! Lifecycle:
//!
//! 1. Build a [`BackendConfig`] (sockets, port and upcall counts) and [`Server::start`] it, or
//!    call [`serve`]. Each socket is a *connection* ([`ConnId`]) with its own ports.
//! 2. A frontend (QEMU's `vhost-user-test-device`, or [`driver::Driver`] in tests) connects;
//!    a fresh `VhostUserDaemon` serves it. Its guest registers its page, binds ports.
//! 3. Events arrive from [`Backend::send`] (a device or harness), from the guest's own SEND
//!    requests and doorbells through links made with [`Router::connect_interdomain`], within
//!    a connection or between two connections of the same process.
//! 4. When the frontend disconnects, the connection keeps its ports, links and counters;
//!    events sent meanwhile are latched and delivered when the next frontend's guest registers
//!    its page. [`Backend::snapshot`] captures all of it (serde).
//! 5. [`StopHandle::stop`] ends the server.
//!
//! [`driver`] is a minimal driver-side virtio implementation over the vhost `Frontend`
//! (hand-built split virtqueues in memfd-backed guest RAM), used by the tests and by
//! [`bench::run`].

#![deny(missing_docs)]

pub mod abi;
pub mod bench;
pub mod driver;
pub mod error;
pub mod fault;
pub mod harness;
pub mod page;
pub mod router;
pub mod server;
mod session;
mod socket;
mod vring;

pub use error::{Error, Result};
pub use fault::faults_handled;
pub use page::GuestPage;
pub use router::{ConnCounters, ConnId, ConnState, Endpoint, LinkState, Router, RouterState};
pub use server::{
    BACKEND_TYPE, Backend, BackendConfig, BackendState, DEFAULT_QUEUE_SIZE, DEFAULT_UPCALLS,
    Server, StopHandle, print_capabilities, serve,
};
