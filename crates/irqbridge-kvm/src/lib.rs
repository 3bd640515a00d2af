// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! VMM-side plugin: wires the interrupts and doorbells of an irqbridge (or any vfio-user PCI)
//! device into a KVM VM built on rust-vmm crates (`kvm-ioctls`, `vmm-sys-util`).
//!
//! The device runs out of process, behind a vfio-user socket. After [`AttachedDevice::attach`]
//! the hot paths never touch the VMM:
//!
//! | path | mechanism |
//! |---|---|
//! | INTx (level) | trigger eventfd = KVM irqfd with `KVM_IRQFD_FLAG_RESAMPLE`; KVM's resample eventfd is the device's INTx UNMASK eventfd |
//! | MSI-X | one eventfd per vector = KVM irqfd on an MSI-routed GSI; the device holds masked events in its PBA |
//! | MSI | one eventfd per vector = KVM irqfd on an MSI-routed GSI, following the guest's writes to the MSI capability; masked vectors are deassigned and their events held (one injection on unmask) |
//! | doorbells | the device's ioeventfds registered with `KVM_IOEVENTFD` at the BAR's address |
//! | shared pages (BAR4) | the region's fd mmapped and installed by the VMM as a memory slot |
//!
//! Only trapped BAR and config-space accesses go over the socket (REGION_READ/WRITE).
//!
//! # Modules
//!
//! - [`client`]: the vfio-user client (VERSION, region/IRQ info, SET_IRQS, REGION_READ/WRITE,
//!   DMA_MAP/UNMAP, RESET) with per-call timeouts and reply checking; it lives in
//!   `irqbridge-vfio-user` behind its `client` feature, the only part of that crate this one
//!   builds (no device models, no `irqbridge-core`, no serde);
//! - [`routing`]: [`GsiRouter`], the one owner of the VM's GSI routing table;
//! - [`interrupt`]: the [`InterruptSourceGroup`] trait (Cloud Hypervisor's `vm-device` shape)
//!   with [`MsiInterruptGroup`] and [`LegacyInterruptGroup`];
//! - [`mmap`]: owning mappings of device regions (vm-memory `MmapRegion`s) and the
//!   [`MappedRegion`] a VMM installs;
//! - [`msi`]: the MSI capability's shadow registers and the ordered steps a config write
//!   turns into;
//! - [`attach`]: [`AttachedDevice`], which puts it all together;
//! - [`vhost`]: [`VhostUserAttachment`], the vhost-user frontend path: a vhost-user device's
//!   virtqueues started with their kicks as ioeventfds and their calls as MSI irqfds.
//!
//! # Kernel ordering rules this crate follows
//!
//! - `KVM_SET_GSI_ROUTING` replaces the whole table: the router always re-sends the default
//!   IRQCHIP routes with the full irqchip.
//! - Routing before irqfd assign: a vector's route is committed before its irqfd is expected
//!   to deliver, and trapped MSI-X table writes update the route before the write reaches the
//!   device.
//! - Deassign before masking: an irqfd is deassigned before its route changes under a masked
//!   vector, and before its GSI is freed.
//! - Resample semantics: a resample irqfd's write *asserts* the GSI until the guest's EOI; KVM
//!   then de-asserts and signals the resample eventfd, and only the device re-asserts (by
//!   re-triggering) if it still needs service. Resample needs the full in-kernel irqchip.
//! - KVM reads the eventfd counter when it injects for a live irqfd, but not when an irqfd is
//!   registered on an already signalled eventfd: [`MsiInterruptGroup`] drains it itself.
//!
//! # Example: a VMM plugging a device in
//!
//! ```no_run
//! use std::os::fd::AsFd;
//! use std::path::Path;
//! use std::sync::Arc;
//!
//! use irqbridge_kvm::{AttachConfig, AttachedDevice, GsiRouter, GuestRam, IrqChip};
//! use kvm_ioctls::Kvm;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let kvm = Kvm::new()?;
//!     let vm = Arc::new(kvm.create_vm()?);
//!     vm.create_irq_chip()?; // full in-kernel irqchip: INTx can use resample irqfds
//!
//!     // Guest RAM lives in a shared file so that the server can map it (DMA_MAP).
//!     let ram = std::fs::OpenOptions::new()
//!         .read(true)
//!         .write(true)
//!         .create(true)
//!         .truncate(true)
//!         .open("/dev/shm/guest-ram")?;
//!     ram.set_len(256 << 20)?;
//!     // ... mmap it and install it as memory slot 0 at GPA 0 ...
//!
//!     // One router per VM, shared by every device and interrupt group.
//!     let router = GsiRouter::new_shared(vm.clone(), IrqChip::Full);
//!
//!     let dev = AttachedDevice::attach(
//!         vm.clone(),
//!         router.clone(),
//!         Path::new("/run/irqbridge.sock"),
//!         AttachConfig {
//!             intx_gsi: Some(5),                 // IOAPIC pin of the slot's INTA#
//!             bar_base: Some(0xd000_0000),       // BARs laid out from here
//!             guest_ram: vec![GuestRam {
//!                 gpa: 0,
//!                 size: 256 << 20,
//!                 fd: ram.as_fd(),
//!                 file_offset: 0,
//!             }],
//!             ..AttachConfig::default()
//!         },
//!     )?;
//!
//!     // Mappable BARs become memory slots (the device keeps the mappings alive).
//!     for (i, region) in dev.mapped_regions().iter().enumerate() {
//!         // SAFETY: `dev` owns the mapping and outlives the slot, which is removed before
//!         // `detach`.
//!         unsafe { vm.set_user_memory_region(region.to_kvm_region(1 + i as u32))? };
//!     }
//!
//!     // In the vCPU loop, trapped accesses inside a BAR go to the device:
//!     let bar0 = dev.bar_gpa(0).expect("BAR0 placed");
//!     let (addr, mut data) = (bar0, [0u8; 4]); // from VcpuExit::MmioRead(addr, data)
//!     dev.mmio_read(0, addr - bar0, &mut data)?;
//!     // ... and so do config-space accesses (BAR registers excepted: the VMM emulates them).
//!     dev.config_read(0x00, &mut data)?;
//!
//!     // Unplug: remove the BAR memory slots first, then detach. The server keeps the device
//!     // state for the next connection.
//!     dev.detach()?;
//!     Ok(())
//! }
//! ```
#![deny(missing_docs)]

pub mod attach;
/// The vfio-user client, now `irqbridge_vfio_user::client` (re-exported so existing users
/// keep compiling).
pub use irqbridge_vfio_user::client;
mod error;
pub mod interrupt;
pub mod mmap;
pub mod msi;
pub mod routing;
#[cfg(test)]
mod test_util;
pub mod vhost;

pub use attach::{AttachConfig, AttachedDevice, GuestRam};
pub use client::{Client, ClientConfig};
pub use error::{ClientError, Error, Result};
pub use interrupt::{
    InterruptIndex, InterruptSourceConfig, InterruptSourceGroup, LegacyInterruptGroup,
    LegacyIrqSourceConfig, MsiInterruptGroup, MsiIrqSourceConfig,
};
pub use mmap::{MappedRegion, RegionMapping};
pub use msi::{MsiLayout, MsiRegs};
pub use routing::{GsiRouter, IrqChip, Route, RoutingSink, SharedGsiRouter};
pub use vhost::{
    Datamatch, Error as VhostError, GuestRam as VhostGuestRam, KickConfig, Msi, QueueConfig,
    StoppedQueue, VhostAttachConfig, VhostUserAttachment,
};

/// Borrows an [`EventFd`](vmm_sys_util::eventfd::EventFd) as a [`BorrowedFd`](std::os::fd::BorrowedFd)
/// (vmm-sys-util's `EventFd` does not implement `AsFd`).
pub fn eventfd_as_fd(fd: &vmm_sys_util::eventfd::EventFd) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsRawFd;
    // SAFETY: the EventFd owns an open descriptor for at least as long as the returned borrow
    // (tied to `&fd`), which is all `borrow_raw` requires.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}
