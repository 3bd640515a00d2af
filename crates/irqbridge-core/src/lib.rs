// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Protocol-free interrupt models: PCI INTx, MSI-X table and PBA, event channels.
//!
//! The models in this crate hold the state of the interrupt sources of the irqbridge test
//! device and decide when an interrupt leaves the device. They know nothing about sockets,
//! file descriptors or the vfio-user protocol: an interrupt leaves a model only through the
//! [`Notifier`] trait (an [`EventFd`](vmm_sys_util::eventfd::EventFd) in production, a
//! [`CountingNotifier`] in tests).
//!
//! - [`IntxLine`]: the level-triggered, auto-masked INTx line with the VFIO semantics of
//!   `vfio_pci_intrs.c` (mask, unmask with re-fire while asserted, COMMAND bit 10).
//! - [`Msi`]: PCI MSI with per-vector mask and pending bits.
//! - [`Msix`]: the PCI MSI-X table, the pending bit array and the per-vector masks.
//! - [`EventChannels`]: Xen-style 2-level event channels over a page shared with the guest.
//!
//! Every model has a serde snapshot of its whole state (`snapshot` / `restore`); notifier
//! bindings are not part of a snapshot.
//!
//! # Example
//!
//! The INTx cycle of a KVM client: the device raises the line, KVM injects it, the guest's EOI
//! signals the resample fd, which the transport turns into an unmask.
//!
//! ```
//! use std::sync::Arc;
//! use irqbridge_core::{CountingNotifier, IntxLine};
//!
//! let trigger = Arc::new(CountingNotifier::new());
//! let mut line = IntxLine::new();
//! line.set_trigger(Some(trigger.clone()))?;
//! assert!(line.assert(0)?); // fires and auto-masks
//! assert!(line.unmask()?); // EOI while still high: fires again
//! line.deassert(0)?;
//! assert!(!line.unmask()?); // EOI after the device lowered the line: quiet
//! assert_eq!(trigger.count(), 2);
//! # Ok::<(), irqbridge_core::Error>(())
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod error;
pub mod evtchn;
pub mod intx;
pub mod msi;
pub mod msix;
pub mod notifier;

pub use error::{Error, Result};
pub use evtchn::{EventChannels, EvtchnState, EvtchnStats, PortState, SendOutcome, SharedWords};
pub use intx::{IntxLine, IntxState, IntxStats};
pub use msi::{Msi, MsiDelivery, MsiState, MsiStats};
pub use msix::{Delivery, Msix, MsixEntry, MsixState, MsixStats};
pub use notifier::{CountingNotifier, Notifier, count_saturated_write, saturated_writes};
