// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! KVM GSI routing tables and MSI messages.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, including the default routes that
//! `KVM_CREATE_IRQCHIP` installs. [`GsiRoutes::with_irqchip`] starts from those routes (IOAPIC
//! pins 0-23 as GSIs 0-23, PIC master pins 0-7 except the cascade pin 2 as GSIs 0-7, PIC slave
//! pins 0-7 as GSIs 8-15) so that adding MSI routes never drops the legacy lines.

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_msi,
};
use kvm_ioctls::VmFd;

use crate::error::{Error, Result};
use crate::layout::LAPIC_GPA;

/// Number of IOAPIC pins of KVM's in-kernel IOAPIC (GSIs 0-23).
pub const IOAPIC_PINS: u32 = 24;
/// First GSI free for MSI routes.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;

/// An x86 MSI message: the address/data pair a device writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (0xfee00000 | destination APIC ID << 12 | ...).
    pub address: u64,
    /// Message data (vector in bits 7:0, delivery mode in 10:8, ...).
    pub data: u32,
}

impl MsiMessage {
    /// Fixed delivery, edge, physical destination APIC ID 0, the given vector.
    pub const fn fixed(vector: u8) -> MsiMessage {
        MsiMessage {
            address: LAPIC_GPA,
            data: vector as u32,
        }
    }

    /// The vector this message carries.
    pub const fn vector(&self) -> u8 {
        (self.data & 0xff) as u8
    }

    /// As a `KVM_SIGNAL_MSI` argument.
    pub fn to_kvm_msi(&self) -> kvm_msi {
        kvm_msi {
            address_lo: self.address as u32,
            address_hi: (self.address >> 32) as u32,
            data: self.data,
            ..Default::default()
        }
    }
}

/// An IRQCHIP routing entry: `gsi` → pin `pin` of `irqchip`
/// (`KVM_IRQCHIP_PIC_MASTER`, `KVM_IRQCHIP_PIC_SLAVE` or `KVM_IRQCHIP_IOAPIC`).
pub fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
    e
}

/// An MSI routing entry: `gsi` → `msg`.
pub fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// The routes `KVM_CREATE_IRQCHIP` would install, minus the PIC cascade pin 2.
pub fn irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::with_capacity(IOAPIC_PINS as usize + 15);
    for pin in 0..IOAPIC_PINS {
        routes.push(irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin));
    }
    for pin in (0..8).filter(|&p| p != 2) {
        routes.push(irqchip_route(pin, KVM_IRQCHIP_PIC_MASTER, pin));
    }
    for pin in 0..8 {
        routes.push(irqchip_route(8 + pin, KVM_IRQCHIP_PIC_SLAVE, pin));
    }
    routes
}

/// A GSI routing table under construction.
#[derive(Debug, Clone, Default)]
pub struct GsiRoutes {
    entries: Vec<kvm_irq_routing_entry>,
}

impl GsiRoutes {
    /// An empty table (no legacy routes: the IOAPIC and PIC become unreachable).
    pub fn new() -> GsiRoutes {
        GsiRoutes::default()
    }

    /// A table with the legacy IRQCHIP routes of [`irqchip_routes`].
    pub fn with_irqchip() -> GsiRoutes {
        GsiRoutes {
            entries: irqchip_routes(),
        }
    }

    /// Routes `gsi` to `msg`, replacing an earlier MSI route of the same GSI.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `gsi` is below [`FIRST_MSI_GSI`] (those are the IOAPIC
    /// pins).
    pub fn add_msi(&mut self, gsi: u32, msg: MsiMessage) -> Result<&mut GsiRoutes> {
        if gsi < FIRST_MSI_GSI {
            return Err(Error::InvalidArgument(format!(
                "GSI {gsi} is an IOAPIC pin; MSI routes start at {FIRST_MSI_GSI}"
            )));
        }
        self.remove(gsi);
        self.entries.push(msi_route(gsi, msg));
        Ok(self)
    }

    /// Removes every route of `gsi`.
    pub fn remove(&mut self, gsi: u32) -> &mut GsiRoutes {
        self.entries.retain(|e| e.gsi != gsi);
        self
    }

    /// The entries, in insertion order.
    pub fn entries(&self) -> &[kvm_irq_routing_entry] {
        &self.entries
    }

    /// As the `KVM_SET_GSI_ROUTING` argument.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the table exceeds KVM's 4096 entries.
    pub fn to_kvm(&self) -> Result<KvmIrqRouting> {
        KvmIrqRouting::from_entries(&self.entries).map_err(|e| {
            Error::InvalidArgument(format!("routing table of {} entries: {e:?}", self.len()))
        })
    }

    /// Installs the table with `KVM_SET_GSI_ROUTING`.
    ///
    /// # Errors
    ///
    /// As [`GsiRoutes::to_kvm`], or [`Error::Kvm`] when the ioctl fails.
    pub fn apply(&self, vm: &VmFd) -> Result<()> {
        vm.set_gsi_routing(&self.to_kvm()?)
            .map_err(Error::kvm("KVM_SET_GSI_ROUTING"))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irqchip_routes_cover_ioapic_and_pic_without_cascade() {
        let routes = irqchip_routes();
        assert_eq!(routes.len(), 24 + 7 + 8);
        let count = |chip, gsi| {
            routes
                .iter()
                .filter(|e| e.gsi == gsi && e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
                .filter(|e| irqchip_of(e) == chip)
                .count()
        };
        for gsi in 0..24 {
            assert_eq!(count(KVM_IRQCHIP_IOAPIC, gsi), 1, "ioapic gsi {gsi}");
        }
        assert_eq!(count(KVM_IRQCHIP_PIC_MASTER, 2), 0);
        assert_eq!(count(KVM_IRQCHIP_PIC_MASTER, 7), 1);
        assert_eq!(count(KVM_IRQCHIP_PIC_SLAVE, 8), 1);
        assert_eq!(count(KVM_IRQCHIP_PIC_SLAVE, 15), 1);
        assert_eq!(count(KVM_IRQCHIP_PIC_SLAVE, 16), 0);
    }

    fn irqchip_of(e: &kvm_irq_routing_entry) -> u32 {
        // SAFETY: the caller only passes IRQCHIP entries, whose active union member is
        // `irqchip`; both members are plain integers.
        unsafe { e.u.irqchip.irqchip }
    }

    #[test]
    fn msi_routes_replace_and_reject_ioapic_gsis() {
        let mut t = GsiRoutes::with_irqchip();
        let base = t.len();
        t.add_msi(24, MsiMessage::fixed(0x40)).unwrap();
        t.add_msi(24, MsiMessage::fixed(0x41)).unwrap();
        t.add_msi(25, MsiMessage::fixed(0x42)).unwrap();
        assert_eq!(t.len(), base + 2);
        let e = t.entries().iter().find(|e| e.gsi == 24).unwrap();
        assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: MSI entry, `msi` is the active member.
        let (lo, data) = unsafe { (e.u.msi.address_lo, e.u.msi.data) };
        assert_eq!((lo, data), (0xfee0_0000, 0x41));
        assert!(t.add_msi(23, MsiMessage::fixed(0x40)).is_err());
        assert_eq!(t.to_kvm().unwrap().as_slice().len(), base + 2);
        t.remove(25);
        assert_eq!(t.len(), base + 1);
    }

    #[test]
    fn msi_message_helpers() {
        let m = MsiMessage::fixed(0xf0);
        assert_eq!(m.vector(), 0xf0);
        let k = m.to_kvm_msi();
        assert_eq!((k.address_lo, k.address_hi, k.data), (0xfee0_0000, 0, 0xf0));
    }
}
