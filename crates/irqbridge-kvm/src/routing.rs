// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The KVM GSI routing table, owned in one place.
//!
//! `KVM_SET_GSI_ROUTING` replaces the **whole** table, including the default IRQCHIP routes
//! that `KVM_CREATE_IRQCHIP` installed. A VMM that adds a single MSI route and forgets the
//! defaults silently disconnects every IOAPIC and PIC pin. [`GsiRouter`] therefore keeps the
//! complete table in userspace and always sends all of it:
//!
//! - with the full in-kernel irqchip ([`IrqChip::Full`]): IOAPIC pins 0-23 as GSIs 0-23, PIC
//!   master pins 0-7 (except the cascade pin 2) as GSIs 0-7, PIC slave pins 0-7 as GSIs 8-15;
//! - with a split irqchip ([`IrqChip::Split`]) KVM rejects IRQCHIP routes (the IOAPIC and PIC
//!   live in userspace), so there are no defaults and GSIs 0-23 are free for the VMM's own
//!   IOAPIC MSI routes;
//! - plus one MSI route per allocated GSI (allocated from [`FIRST_MSI_GSI`] up).
//!
//! Several interrupt groups (INTx, MSI-X, devices) share one router through
//! [`SharedGsiRouter`]; each change is staged with [`GsiRouter::set_msi`] /
//! [`GsiRouter::remove`] and becomes visible to the kernel with one [`GsiRouter::commit`].
//!
//! Ordering rule (see `MsiInterruptGroup`): commit a GSI's route *before* an irqfd on that GSI
//! starts firing; deassign an irqfd *before* committing a table that removes its route.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_IRQ_ROUTES, KVM_MSI_VALID_DEVID, KvmIrqRouting,
    kvm_irq_routing_entry, kvm_irq_routing_irqchip,
};
use kvm_ioctls::VmFd;

use crate::{Error, Result};

/// Number of IOAPIC pins KVM emulates (`KVM_IOAPIC_NUM_PINS`).
pub const IOAPIC_NUM_PINS: u32 = 24;

/// The first GSI handed out for MSI routes: GSIs below are the IOAPIC pins.
pub const FIRST_MSI_GSI: u32 = IOAPIC_NUM_PINS;

/// The number of routing entries and the bound on GSI numbers KVM accepts
/// (`KVM_MAX_IRQ_ROUTES`).
pub const MAX_ROUTES: u32 = KVM_MAX_IRQ_ROUTES as u32;

/// The PIC cascade pin on the master PIC; it has no route of its own.
const PIC_CASCADE_PIN: u32 = 2;

/// Which interrupt controller model the VM was created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IrqChip {
    /// `KVM_CREATE_IRQCHIP`: in-kernel PIC, IOAPIC and LAPICs. Level-triggered INTx can use
    /// resample irqfds.
    #[default]
    Full,
    /// `KVM_CAP_SPLIT_IRQCHIP`: in-kernel LAPICs only; the VMM emulates IOAPIC and PIC.
    /// Resample irqfds are refused by KVM (EINVAL) and IRQCHIP routes do not exist.
    Split,
}

/// One route of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `KVM_IRQ_ROUTING_IRQCHIP`: a pin of an in-kernel interrupt controller.
    Irqchip {
        /// `KVM_IRQCHIP_PIC_MASTER` 0, `KVM_IRQCHIP_PIC_SLAVE` 1 or `KVM_IRQCHIP_IOAPIC` 2.
        irqchip: u32,
        /// Pin of that controller.
        pin: u32,
    },
    /// `KVM_IRQ_ROUTING_MSI`: a message written to the LAPIC window.
    Msi {
        /// Full 64-bit MSI address (x86: `0xFEE00000 | dest << 12 | ...`).
        address: u64,
        /// MSI data (x86: vector in bits 7:0, delivery mode, trigger).
        data: u32,
        /// Requester ID for interrupt translation (`KVM_MSI_VALID_DEVID`); x86 needs none.
        devid: Option<u32>,
    },
}

impl Route {
    /// Converts the route into the kernel's entry for `gsi`.
    pub fn to_kvm_entry(&self, gsi: u32) -> kvm_irq_routing_entry {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            ..Default::default()
        };
        match *self {
            Route::Irqchip { irqchip, pin } => {
                entry.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                entry.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
            }
            Route::Msi {
                address,
                data,
                devid,
            } => {
                entry.type_ = KVM_IRQ_ROUTING_MSI;
                // Writing a union field is safe; only reads need unsafe.
                entry.u.msi.address_lo = address as u32;
                entry.u.msi.address_hi = (address >> 32) as u32;
                entry.u.msi.data = data;
                if let Some(devid) = devid {
                    entry.flags = KVM_MSI_VALID_DEVID;
                    entry.u.msi.__bindgen_anon_1.devid = devid;
                }
            }
        }
        entry
    }
}

/// Where a committed table goes: `KVM_SET_GSI_ROUTING` on a VM, or a recorder in tests.
pub trait RoutingSink: Send + Sync + fmt::Debug {
    /// Replaces the VM's whole GSI routing table with `table`.
    ///
    /// # Errors
    ///
    /// Whatever the kernel (or the fake) returns.
    fn set_gsi_routing(&self, table: &KvmIrqRouting) -> Result<()>;
}

impl RoutingSink for VmFd {
    fn set_gsi_routing(&self, table: &KvmIrqRouting) -> Result<()> {
        VmFd::set_gsi_routing(self, table).map_err(|source| Error::Kvm {
            op: "KVM_SET_GSI_ROUTING",
            source,
        })
    }
}

/// A [`GsiRouter`] shared between interrupt groups.
pub type SharedGsiRouter = Arc<Mutex<GsiRouter>>;

/// Owner of a VM's GSI routing table; see the [module documentation](self).
pub struct GsiRouter {
    sink: Arc<dyn RoutingSink>,
    chip: IrqChip,
    /// Routes per GSI; a GSI may have several (GSIs 0-15 reach both PIC and IOAPIC).
    routes: BTreeMap<u32, Vec<Route>>,
    /// GSIs handed out by [`GsiRouter::allocate`] and not yet freed.
    allocated: BTreeSet<u32>,
    /// Number of entries in `routes`.
    count: usize,
    /// No GSI at or above [`FIRST_MSI_GSI`] and below this one is free.
    free_hint: u32,
    /// Staged changes not yet committed.
    dirty: bool,
    commits: u64,
}

impl fmt::Debug for GsiRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GsiRouter")
            .field("chip", &self.chip)
            .field("routes", &self.route_count())
            .field("allocated", &self.allocated.len())
            .field("dirty", &self.dirty)
            .field("commits", &self.commits)
            .finish()
    }
}

impl GsiRouter {
    /// Creates a router holding the default routes of `chip` (none for [`IrqChip::Split`]).
    ///
    /// Nothing is sent to the kernel until [`GsiRouter::commit`]. `sink` is normally the
    /// `Arc<VmFd>` of the VM.
    pub fn new(sink: Arc<dyn RoutingSink>, chip: IrqChip) -> Self {
        let mut routes: BTreeMap<u32, Vec<Route>> = BTreeMap::new();
        if chip == IrqChip::Full {
            for pin in 0..IOAPIC_NUM_PINS {
                routes.entry(pin).or_default().push(Route::Irqchip {
                    irqchip: KVM_IRQCHIP_IOAPIC,
                    pin,
                });
            }
            for pin in 0..8 {
                if pin != PIC_CASCADE_PIN {
                    routes.entry(pin).or_default().push(Route::Irqchip {
                        irqchip: KVM_IRQCHIP_PIC_MASTER,
                        pin,
                    });
                }
                routes.entry(8 + pin).or_default().push(Route::Irqchip {
                    irqchip: KVM_IRQCHIP_PIC_SLAVE,
                    pin,
                });
            }
        }
        let count = routes.values().map(Vec::len).sum();
        GsiRouter {
            sink,
            chip,
            routes,
            count,
            free_hint: FIRST_MSI_GSI,
            allocated: BTreeSet::new(),
            dirty: true,
            commits: 0,
        }
    }

    /// Like [`GsiRouter::new`], wrapped for sharing.
    pub fn new_shared(sink: Arc<dyn RoutingSink>, chip: IrqChip) -> SharedGsiRouter {
        Arc::new(Mutex::new(Self::new(sink, chip)))
    }

    /// The irqchip model this router was built for.
    pub fn irqchip(&self) -> IrqChip {
        self.chip
    }

    /// Reserves the lowest free GSI at or above [`FIRST_MSI_GSI`]. It has no route until
    /// [`GsiRouter::set_msi`].
    ///
    /// # Errors
    ///
    /// [`Error::NoFreeGsi`] when every GSI below [`MAX_ROUTES`] is taken or the table is full.
    pub fn allocate(&mut self) -> Result<u32> {
        if self.route_count() >= MAX_ROUTES as usize {
            return Err(Error::NoFreeGsi);
        }
        let gsi = (self.free_hint..MAX_ROUTES)
            .find(|gsi| !self.allocated.contains(gsi) && !self.routes.contains_key(gsi))
            .ok_or(Error::NoFreeGsi)?;
        self.allocated.insert(gsi);
        self.free_hint = gsi + 1;
        Ok(gsi)
    }

    /// Releases a GSI from [`GsiRouter::allocate`] and stages removal of its route.
    ///
    /// Deassign every irqfd on `gsi` before committing.
    pub fn free(&mut self, gsi: u32) {
        if self.allocated.remove(&gsi) {
            self.free_hint = self.free_hint.min(gsi);
        }
        self.remove(gsi);
    }

    /// Stages an MSI route on `gsi`, replacing whatever route `gsi` had.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidGsi`] if `gsi` is not below [`MAX_ROUTES`], or is one of the default
    /// IRQCHIP GSIs of the full irqchip (those routes are fixed).
    pub fn set_msi(&mut self, gsi: u32, address: u64, data: u32) -> Result<()> {
        self.set_route(
            gsi,
            Route::Msi {
                address,
                data,
                devid: None,
            },
        )
    }

    /// Stages `route` as the only route of `gsi`.
    ///
    /// # Errors
    ///
    /// As [`GsiRouter::set_msi`]; also [`Error::InvalidGsi`] for an IRQCHIP route with a split
    /// irqchip, and [`Error::TooManyRoutes`] when the table is full.
    pub fn set_route(&mut self, gsi: u32, route: Route) -> Result<()> {
        self.check_gsi(gsi)?;
        if matches!(route, Route::Irqchip { .. }) && self.chip == IrqChip::Split {
            return Err(Error::InvalidGsi(gsi));
        }
        if !self.routes.contains_key(&gsi) && self.route_count() >= MAX_ROUTES as usize {
            return Err(Error::TooManyRoutes);
        }
        let slot = self.routes.entry(gsi).or_default();
        if slot.as_slice() != [route] {
            self.count = self.count - slot.len() + 1;
            slot.clear();
            slot.push(route);
            self.dirty = true;
        }
        Ok(())
    }

    /// Stages removal of `gsi`'s route; default IRQCHIP GSIs are left alone.
    ///
    /// Deassign irqfds on `gsi` before committing: an irqfd on a GSI without a route stays
    /// registered but injects nothing.
    pub fn remove(&mut self, gsi: u32) {
        if self.is_default_gsi(gsi) {
            return;
        }
        if let Some(old) = self.routes.remove(&gsi) {
            self.count -= old.len();
            self.free_hint = self.free_hint.min(gsi.max(FIRST_MSI_GSI));
            self.dirty = true;
        }
    }

    /// The routes of `gsi`, in table order.
    pub fn routes(&self, gsi: u32) -> &[Route] {
        self.routes.get(&gsi).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every `(gsi, route)` pair of the table as [`GsiRouter::commit`] will send it.
    pub fn entries(&self) -> Vec<(u32, Route)> {
        self.routes
            .iter()
            .flat_map(|(gsi, routes)| routes.iter().map(move |route| (*gsi, *route)))
            .collect()
    }

    /// Number of routing entries in the table.
    pub fn route_count(&self) -> usize {
        self.count
    }

    /// True when staged changes have not been committed yet.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Number of successful [`GsiRouter::commit`] calls.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Builds the kernel table.
    ///
    /// # Errors
    ///
    /// [`Error::TooManyRoutes`] if the table does not fit `KVM_MAX_IRQ_ROUTES`.
    pub fn to_kvm_routing(&self) -> Result<KvmIrqRouting> {
        let entries: Vec<kvm_irq_routing_entry> = self
            .entries()
            .iter()
            .map(|(gsi, route)| route.to_kvm_entry(*gsi))
            .collect();
        KvmIrqRouting::from_entries(&entries).map_err(|_| Error::TooManyRoutes)
    }

    /// Sends the whole table to KVM with one `KVM_SET_GSI_ROUTING`.
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] if the kernel refuses the table (it then keeps the previous one and the
    /// router stays dirty).
    pub fn commit(&mut self) -> Result<()> {
        let table = self.to_kvm_routing()?;
        self.sink.set_gsi_routing(&table)?;
        self.dirty = false;
        self.commits += 1;
        Ok(())
    }

    /// Commits only if something changed since the last commit.
    ///
    /// # Errors
    ///
    /// As [`GsiRouter::commit`].
    pub fn commit_if_dirty(&mut self) -> Result<()> {
        if self.dirty { self.commit() } else { Ok(()) }
    }

    fn is_default_gsi(&self, gsi: u32) -> bool {
        self.chip == IrqChip::Full && gsi < IOAPIC_NUM_PINS
    }

    fn check_gsi(&self, gsi: u32) -> Result<()> {
        if gsi >= MAX_ROUTES || self.is_default_gsi(gsi) {
            Err(Error::InvalidGsi(gsi))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records every table it is given.
    /// `(gsi, type, irqchip | address_lo, pin | address_hi, data)`.
    pub(crate) type Row = (u32, u32, u32, u32, u32);

    #[derive(Debug, Default)]
    pub(crate) struct RecordingSink {
        pub(crate) tables: Mutex<Vec<Vec<Row>>>,
        pub(crate) fail: std::sync::atomic::AtomicBool,
    }

    impl RoutingSink for RecordingSink {
        fn set_gsi_routing(&self, table: &KvmIrqRouting) -> Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::Kvm {
                    op: "KVM_SET_GSI_ROUTING",
                    source: vmm_sys_util::errno::Error::new(libc::EINVAL),
                });
            }
            let rows = table
                .as_slice()
                .iter()
                .map(|e| {
                    // SAFETY: reading the union as the variant `type_` says was written.
                    let (a, b, c) = unsafe {
                        if e.type_ == KVM_IRQ_ROUTING_MSI {
                            (e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data)
                        } else {
                            (e.u.irqchip.irqchip, e.u.irqchip.pin, 0)
                        }
                    };
                    (e.gsi, e.type_, a, b, c)
                })
                .collect();
            self.tables.lock().unwrap().push(rows);
            Ok(())
        }
    }

    fn router(chip: IrqChip) -> (Arc<RecordingSink>, GsiRouter) {
        let sink = Arc::new(RecordingSink::default());
        let r = GsiRouter::new(sink.clone(), chip);
        (sink, r)
    }

    #[test]
    fn default_table_has_ioapic_and_pic_routes() {
        let (_, r) = router(IrqChip::Full);
        let entries = r.entries();
        assert_eq!(entries.len(), 24 + 7 + 8);
        for pin in 0..24 {
            assert!(entries.contains(&(
                pin,
                Route::Irqchip {
                    irqchip: KVM_IRQCHIP_IOAPIC,
                    pin
                }
            )));
        }
        for pin in 0..8 {
            let master = (
                pin,
                Route::Irqchip {
                    irqchip: KVM_IRQCHIP_PIC_MASTER,
                    pin,
                },
            );
            assert_eq!(entries.contains(&master), pin != 2, "master pin {pin}");
            assert!(entries.contains(&(
                pin + 8,
                Route::Irqchip {
                    irqchip: KVM_IRQCHIP_PIC_SLAVE,
                    pin
                }
            )));
        }
        assert!(entries.iter().all(|(gsi, _)| *gsi < 24));
    }

    #[test]
    fn split_irqchip_has_no_defaults_and_allows_low_gsis() {
        let (_, mut r) = router(IrqChip::Split);
        assert!(r.entries().is_empty());
        r.set_msi(5, 0xfee0_0000, 0x8030).unwrap();
        assert_eq!(
            r.routes(5),
            &[Route::Msi {
                address: 0xfee0_0000,
                data: 0x8030,
                devid: None
            }]
        );
        assert!(matches!(
            r.set_route(
                7,
                Route::Irqchip {
                    irqchip: KVM_IRQCHIP_IOAPIC,
                    pin: 7
                }
            ),
            Err(Error::InvalidGsi(7))
        ));
    }

    #[test]
    fn allocation_starts_at_24_and_reuses_freed() {
        let (_, mut r) = router(IrqChip::Full);
        assert_eq!(r.allocate().unwrap(), 24);
        assert_eq!(r.allocate().unwrap(), 25);
        assert_eq!(r.allocate().unwrap(), 26);
        r.free(25);
        assert_eq!(r.allocate().unwrap(), 25);
        assert_eq!(r.allocate().unwrap(), 27);
    }

    #[test]
    fn msi_routes_join_defaults_and_commit_sends_everything_once() {
        let (sink, mut r) = router(IrqChip::Full);
        let a = r.allocate().unwrap();
        let b = r.allocate().unwrap();
        r.set_msi(a, 0x1_fee0_1000, 0x41).unwrap();
        r.set_msi(b, 0xfee0_0000, 0x42).unwrap();
        r.commit().unwrap();
        let tables = sink.tables.lock().unwrap();
        assert_eq!(tables.len(), 1);
        let t = &tables[0];
        assert_eq!(t.len(), 39 + 2);
        assert_eq!(
            t.iter().filter(|e| e.1 == KVM_IRQ_ROUTING_IRQCHIP).count(),
            39
        );
        assert!(t.contains(&(a, KVM_IRQ_ROUTING_MSI, 0xfee0_1000, 1, 0x41)));
        assert!(t.contains(&(b, KVM_IRQ_ROUTING_MSI, 0xfee0_0000, 0, 0x42)));
        assert!(t.contains(&(0, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQCHIP_IOAPIC, 0, 0)));
        assert!(!r.is_dirty());
        assert_eq!(r.commits(), 1);
    }

    #[test]
    fn set_msi_replaces_and_remove_drops_the_route() {
        let (sink, mut r) = router(IrqChip::Full);
        let g = r.allocate().unwrap();
        r.set_msi(g, 0xfee0_0000, 1).unwrap();
        r.set_msi(g, 0xfee0_0000, 2).unwrap();
        assert_eq!(r.routes(g).len(), 1);
        r.commit().unwrap();
        r.remove(g);
        assert!(r.is_dirty());
        r.commit().unwrap();
        let tables = sink.tables.lock().unwrap();
        assert!(tables[0].contains(&(g, KVM_IRQ_ROUTING_MSI, 0xfee0_0000, 0, 2)));
        assert!(!tables[0].iter().any(|e| e.0 == g && e.4 == 1));
        assert_eq!(tables[1].len(), 39);
        // The GSI stays allocated after remove(): the next allocation skips it.
        drop(tables);
        assert_eq!(r.allocate().unwrap(), g + 1);
    }

    #[test]
    fn default_gsis_are_protected_with_full_irqchip() {
        let (_, mut r) = router(IrqChip::Full);
        assert!(matches!(
            r.set_msi(3, 0xfee0_0000, 0),
            Err(Error::InvalidGsi(3))
        ));
        r.remove(3);
        assert_eq!(r.routes(3).len(), 2);
        assert!(matches!(
            r.set_msi(MAX_ROUTES, 0xfee0_0000, 0),
            Err(Error::InvalidGsi(_))
        ));
    }

    #[test]
    fn commit_if_dirty_skips_unchanged_tables() {
        let (sink, mut r) = router(IrqChip::Full);
        r.commit_if_dirty().unwrap();
        r.commit_if_dirty().unwrap();
        let g = r.allocate().unwrap();
        r.set_msi(g, 0xfee0_0000, 7).unwrap();
        r.commit_if_dirty().unwrap();
        // Same route again: nothing changed.
        r.set_msi(g, 0xfee0_0000, 7).unwrap();
        r.commit_if_dirty().unwrap();
        assert_eq!(sink.tables.lock().unwrap().len(), 2);
    }

    #[test]
    fn failed_commit_keeps_the_router_dirty() {
        let (sink, mut r) = router(IrqChip::Full);
        sink.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(r.commit(), Err(Error::Kvm { .. })));
        assert!(r.is_dirty());
        assert_eq!(r.commits(), 0);
    }

    #[test]
    fn devid_sets_the_valid_flag() {
        let e = Route::Msi {
            address: 0xfee0_0000,
            data: 3,
            devid: Some(0x18),
        }
        .to_kvm_entry(30);
        assert_eq!(e.flags, KVM_MSI_VALID_DEVID);
        // SAFETY: the entry was written as MSI.
        assert_eq!(unsafe { e.u.msi.__bindgen_anon_1.devid }, 0x18);
    }

    #[test]
    fn allocation_fails_when_the_table_is_full() {
        let (_, mut r) = router(IrqChip::Full);
        let free = MAX_ROUTES as usize - r.route_count();
        for _ in 0..free {
            let g = r.allocate().unwrap();
            r.set_msi(g, 0xfee0_0000, 0).unwrap();
        }
        assert_eq!(r.route_count(), MAX_ROUTES as usize);
        assert!(matches!(r.allocate(), Err(Error::NoFreeGsi)));
        r.to_kvm_routing().unwrap();
    }
}
