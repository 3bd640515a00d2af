// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Routing and irqfd wiring against the real /dev/kvm (no guest code runs).

mod common;

use std::io::ErrorKind;
use std::sync::Arc;

use common::{ioapic_irr, irr_has, poll_until, vcpu_with_lapic, vm};
use irqbridge_kvm::Error;
use irqbridge_kvm::interrupt::{
    InterruptSourceConfig, InterruptSourceGroup, LegacyInterruptGroup, MsiInterruptGroup,
    MsiIrqSourceConfig,
};
use irqbridge_kvm::routing::{GsiRouter, IrqChip, Route, SharedGsiRouter};
use kvm_bindings::KVM_IRQCHIP_IOAPIC;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

fn router(vm: &Arc<VmFd>, chip: IrqChip) -> SharedGsiRouter {
    GsiRouter::new_shared(vm.clone(), chip)
}

/// Reads a non-blocking eventfd: `None` when its counter is 0.
fn read_count(fd: &EventFd) -> Option<u64> {
    match fd.read() {
        Ok(n) => Some(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("eventfd read: {e}"),
    }
}

fn msi(vector: u8) -> MsiIrqSourceConfig {
    MsiIrqSourceConfig {
        high_addr: 0,
        low_addr: 0xfee0_0000,
        data: u32::from(vector),
        devid: 0,
    }
}

#[test]
fn default_and_msi_routes_are_accepted_by_kvm() {
    let Some(vm) = vm(IrqChip::Full) else { return };
    let router = router(&vm, IrqChip::Full);
    let mut r = router.lock().unwrap();
    r.commit().expect("default table");
    let gsis: Vec<u32> = (0..8).map(|_| r.allocate().unwrap()).collect();
    assert_eq!(gsis, (24..32).collect::<Vec<_>>());
    for (i, gsi) in gsis.iter().enumerate() {
        r.set_msi(*gsi, 0xfee0_0000, 0x40 + i as u32).unwrap();
    }
    r.commit().expect("defaults + 8 MSI routes");
    assert_eq!(r.route_count(), 39 + 8);
    assert_eq!(r.commits(), 2);
}

#[test]
fn irqchip_routes_are_refused_with_a_split_irqchip() {
    let Some(vm) = vm(IrqChip::Split) else { return };
    // What GsiRouter avoids: a full-irqchip default table on a split-irqchip VM.
    let wrong = GsiRouter::new(vm.clone(), IrqChip::Full);
    let table = wrong.to_kvm_routing().unwrap();
    assert!(vm.set_gsi_routing(&table).is_err());
    let mut r = GsiRouter::new(vm.clone(), IrqChip::Split);
    r.set_msi(5, 0xfee0_0000, 0x8030).unwrap();
    r.commit()
        .expect("split table with an IOAPIC-pin MSI route");
}

#[test]
fn msi_masked_events_are_held_and_injected_once_on_unmask() {
    let Some(vm) = vm(IrqChip::Full) else { return };
    let vcpu = vcpu_with_lapic(&vm);
    let router = router(&vm, IrqChip::Full);
    let group = MsiInterruptGroup::new(vm.clone(), router.clone(), 2).unwrap();
    assert_eq!(group.len(), 2);
    assert_eq!(group.gsi(0), Some(24));
    assert_eq!(group.gsi(1), Some(25));
    // The device's view of vector 0: a duplicate of its eventfd.
    let device_fd = group.notifier(0).unwrap();

    // Route first, then unmask (routing before irqfd assign).
    group
        .update(0, InterruptSourceConfig::MsiIrq(msi(0x51)), true, true)
        .unwrap();
    assert_eq!(group.is_registered(0), Some(false));
    assert_eq!(
        router.lock().unwrap().routes(24),
        &[Route::Msi {
            address: 0xfee0_0000,
            data: 0x51,
            devid: None
        }]
    );

    // Masked: two device events, nothing delivered, both drained into one pending flag.
    device_fd.write(1).unwrap();
    device_fd.write(1).unwrap();
    assert!(!irr_has(&vcpu, 0x51));
    assert!(group.is_pending(0).unwrap());
    assert_eq!(read_count(&device_fd), None, "pending drained the counter");
    assert!(group.is_pending(0).unwrap(), "pending is remembered");

    // Unmask: registered, then one write through the live irqfd, delivered. (KVM's wakeup
    // handler reads the counter of a live irqfd, so nothing is left in it; the IRR bit cannot
    // count injections: guest-side counts are the integration tests' job.)
    group.set_masked(0, false).unwrap();
    assert_eq!(group.is_registered(0), Some(true));
    poll_until("MSI 0x51 in IRR", || irr_has(&vcpu, 0x51));
    assert_eq!(read_count(&device_fd), None, "KVM consumed the live write");
    assert!(!group.is_pending(0).unwrap());

    // Live events are delivered by KVM, not counted as pending on the next mask.
    device_fd.write(1).unwrap();
    group.set_masked(0, true).unwrap();
    assert_eq!(group.is_registered(0), Some(false));
    assert!(!group.is_pending(0).unwrap());
    assert_eq!(read_count(&device_fd), None);

    // Unmask with nothing pending: registered, no write.
    group.set_masked(0, false).unwrap();
    assert_eq!(read_count(&device_fd), None);
    assert!(!irr_has(&vcpu, 0x52));

    // Vector 1 is untouched by all of this.
    assert_eq!(group.is_registered(1), Some(false));
    assert_eq!(group.is_masked(1), Some(true));
}

#[test]
fn msi_disable_detaches_all_and_enable_restores_unmasked_ones() {
    let Some(vm) = vm(IrqChip::Full) else { return };
    let vcpu = vcpu_with_lapic(&vm);
    let router = router(&vm, IrqChip::Full);
    let group = MsiInterruptGroup::new(vm.clone(), router, 3).unwrap();
    for i in 0..3u32 {
        group
            .update(
                i,
                InterruptSourceConfig::MsiIrq(msi(0x60 + i as u8)),
                i == 2,
                false,
            )
            .unwrap();
    }
    group.set_gsi().unwrap();
    assert_eq!(group.is_registered(0), Some(true));
    assert_eq!(group.is_registered(2), Some(false));

    group.disable().unwrap();
    assert!(!group.is_enabled());
    assert!((0..3).all(|i| group.is_registered(i) == Some(false)));
    group.trigger(1).unwrap();
    assert!(!irr_has(&vcpu, 0x61));

    group.enable().unwrap();
    assert_eq!(group.is_registered(0), Some(true));
    assert_eq!(group.is_registered(1), Some(true));
    assert_eq!(group.is_registered(2), Some(false), "still masked");
    poll_until("MSI 0x61 in IRR", || irr_has(&vcpu, 0x61));
    assert!(!irr_has(&vcpu, 0x60));
    assert!(matches!(
        group.trigger(3),
        Err(Error::InvalidIndex { index: 3, .. })
    ));
    assert!(group.notifier(3).is_none());
}

#[test]
fn dropping_a_group_frees_its_gsis() {
    let Some(vm) = vm(IrqChip::Full) else { return };
    let router = router(&vm, IrqChip::Full);
    {
        let group = MsiInterruptGroup::new(vm.clone(), router.clone(), 4).unwrap();
        for i in 0..4 {
            group
                .update(i, InterruptSourceConfig::MsiIrq(msi(0x70)), false, false)
                .unwrap();
        }
        group.set_gsi().unwrap();
        assert_eq!(router.lock().unwrap().route_count(), 39 + 4);
    }
    let mut r = router.lock().unwrap();
    assert_eq!(r.route_count(), 39);
    assert!(!r.is_dirty(), "the drop committed the smaller table");
    assert_eq!(r.allocate().unwrap(), 24);
}

#[test]
fn legacy_group_registers_with_resample_and_holds_the_line() {
    let Some(vm) = vm(IrqChip::Full) else { return };
    let router = router(&vm, IrqChip::Full);
    router.lock().unwrap().commit().unwrap();
    let intx = LegacyInterruptGroup::new(vm.clone(), router, 5).unwrap();
    assert!(intx.resample_notifier().is_some());
    intx.enable().unwrap();
    assert!(intx.is_registered());
    intx.enable().unwrap(); // idempotent: a second KVM_IRQFD would be EBUSY

    // A resample irqfd *asserts* the pin and keeps it asserted until EOI. (A plain irqfd
    // raises and lowers it in one work item, so IRR, which follows the level of a masked
    // pin, would never be seen set.)
    intx.trigger(0).unwrap();
    poll_until("IOAPIC IRR bit 5", || ioapic_irr(&vm) & (1 << 5) != 0);

    // Deassigning the last resample irqfd of a GSI de-asserts the line.
    intx.disable().unwrap();
    assert!(!intx.is_registered());
    assert_eq!(ioapic_irr(&vm) & (1 << 5), 0);

    // The GSI's fixed IOAPIC route is accepted as its LegacyIrq config, others are not.
    let ok = InterruptSourceConfig::LegacyIrq(irqbridge_kvm::interrupt::LegacyIrqSourceConfig {
        irqchip: KVM_IRQCHIP_IOAPIC,
        pin: 5,
    });
    intx.update(0, ok, false, true).unwrap();
    assert!(intx.is_registered());
    let bad = InterruptSourceConfig::LegacyIrq(irqbridge_kvm::interrupt::LegacyIrqSourceConfig {
        irqchip: KVM_IRQCHIP_IOAPIC,
        pin: 6,
    });
    assert!(matches!(
        intx.update(0, bad, false, false),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn legacy_group_uses_a_plain_irqfd_with_a_split_irqchip() {
    let Some(vm) = vm(IrqChip::Split) else { return };
    // The trap LegacyInterruptGroup avoids: resample needs the full in-kernel irqchip.
    let (a, b) = (
        EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
        EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
    );
    assert_eq!(
        vm.register_irqfd_with_resample(&a, &b, 5)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );

    let router = router(&vm, IrqChip::Split);
    let intx = LegacyInterruptGroup::new(vm.clone(), router.clone(), 5).unwrap();
    assert!(intx.resample_notifier().is_none());
    // The VMM's userspace IOAPIC gives pin 5 an MSI route (level-triggered vector 0x30).
    let route = MsiIrqSourceConfig {
        data: 0x8030,
        ..msi(0)
    };
    intx.update(0, InterruptSourceConfig::MsiIrq(route), false, true)
        .unwrap();
    assert!(intx.is_registered());
    assert_eq!(router.lock().unwrap().commits(), 1);
    intx.update(0, InterruptSourceConfig::MsiIrq(route), true, false)
        .unwrap();
    assert!(!intx.is_registered());
}
