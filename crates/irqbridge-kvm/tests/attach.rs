// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Attaching the real irqbridge server's PCI device to a KVM VM (no guest code runs: the
//! interrupts are observed in the IOAPIC and LAPIC state KVM reports).

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{ServerRig, ioapic_irr, irr_has, poll_until, vcpu_with_lapic, vm};
use irqbridge_kvm::attach::{AttachConfig, AttachedDevice, GuestRam};
use irqbridge_kvm::routing::{GsiRouter, IrqChip, Route, SharedGsiRouter};
use irqbridge_kvm::{ClientError, Error};
use irqbridge_vfio_user::pci::regs::*;
use irqbridge_vfio_user::pci::{DeviceConfig, IrqbridgeDevice};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const BAR_BASE: u64 = 0xd000_0000;
const MAGIC: u32 = 0x6972_6262;

/// The irqbridge server's PCI device, served in a thread.
fn start_rig(name: &str) -> ServerRig {
    ServerRig::start(&format!("attach-{name}"), || {
        IrqbridgeDevice::new(DeviceConfig::default()).expect("device")
    })
}

fn memfd(size: u64) -> OwnedFd {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on a valid descriptor.
    let ret = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(ret, 0);
    fd
}

fn read32(dev: &AttachedDevice, bar: u32, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.mmio_read(bar, offset, &mut b).expect("mmio read");
    u32::from_le_bytes(b)
}

fn write32(dev: &AttachedDevice, bar: u32, offset: u64, v: u32) {
    dev.mmio_write(bar, offset, &v.to_le_bytes())
        .expect("mmio write");
}

fn attach(
    vm: &Arc<VmFd>,
    router: &SharedGsiRouter,
    rig: &ServerRig,
    ram: &OwnedFd,
) -> AttachedDevice {
    use std::os::fd::AsFd;
    let config = AttachConfig {
        intx_gsi: Some(5),
        bar_base: Some(BAR_BASE),
        guest_ram: vec![GuestRam {
            gpa: 0,
            size: 2 << 20,
            fd: ram.as_fd(),
            file_offset: 0,
        }],
        ..AttachConfig::default()
    };
    AttachedDevice::attach(vm.clone(), router.clone(), rig.path(), config).expect("attach")
}

#[test]
fn attach_wires_everything_and_state_survives_reattach() {
    let Some(vm) = vm(IrqChip::Full) else { return };
    let vcpu = vcpu_with_lapic(&vm);
    let rig = start_rig("full");
    let router = GsiRouter::new_shared(vm.clone(), IrqChip::Full);
    let ram = memfd(2 << 20);
    let dev = attach(&vm, &router, &rig, &ram);

    // Enumeration and layout.
    assert!(dev.device_info().is_pci());
    assert_eq!(dev.region(0).unwrap().size, BAR0_SIZE);
    assert_eq!(dev.bar_gpa(0), Some(BAR_BASE));
    assert_eq!(dev.bar_gpa(1), None);
    let bar2 = dev.bar_gpa(2).unwrap();
    let bar4 = dev.bar_gpa(4).unwrap();
    assert!(bar2 >= BAR_BASE + BAR0_SIZE && bar4 >= bar2 + BAR2_MIN_SIZE);
    assert_eq!(dev.irq_info(2).unwrap().count, 16);

    // Trapped MMIO reaches the device.
    assert_eq!(read32(&dev, 0, REG_MAGIC), MAGIC);
    assert_eq!(read32(&dev, 0, REG_MSIX_VECTORS), 16);

    // INTx: the attach sequence masked and then unmasked the line once.
    assert_eq!(read32(&dev, 0, REG_CNT_INTX_UNMASKS), 1);
    assert_eq!(read32(&dev, 0, REG_CNT_INTX_TRIGGERS), 0);
    let intx = dev.intx().expect("INTx wired");
    assert_eq!(intx.gsi(), 5);
    assert!(intx.is_registered());
    // Device raises the line: trigger eventfd -> resample irqfd -> IOAPIC pin 5 asserted.
    write32(&dev, 0, REG_INTX_ASSERT, 1);
    assert_eq!(read32(&dev, 0, REG_CNT_INTX_TRIGGERS), 1);
    assert_eq!(
        read32(&dev, 0, REG_INTX_STATUS) & 3,
        3,
        "level high, auto-masked"
    );
    poll_until("IOAPIC IRR bit 5", || ioapic_irr(&vm) & (1 << 5) != 0);
    // What KVM does on the guest's EOI: signal the resample eventfd. Line still high: the
    // device re-triggers.
    let resample = intx.resample_notifier().unwrap();
    resample.write(1).unwrap();
    poll_until("INTx re-trigger", || {
        read32(&dev, 0, REG_CNT_INTX_TRIGGERS) == 2
    });
    // Source lowered, next EOI unmasks for good. (The posted write and the resample eventfd
    // are separate channels: the read makes sure the device saw the write first, otherwise
    // the device re-triggers once more, as QEMU's clients see too.)
    write32(&dev, 0, REG_INTX_DEASSERT, 1);
    assert_eq!(read32(&dev, 0, REG_INTX_STATUS) & 3, 2, "low, still masked");
    resample.write(1).unwrap();
    poll_until("INTx unmasked", || {
        read32(&dev, 0, REG_INTX_STATUS) & 3 == 0
    });
    assert_eq!(read32(&dev, 0, REG_CNT_INTX_TRIGGERS), 2);
    assert_eq!(read32(&dev, 0, REG_CNT_INTX_UNMASKS), 3);

    // MSI-X: every vector bound (binding cleared each vector-control mask bit).
    let layout = dev.msix_layout().expect("MSI-X wired");
    assert_eq!(
        (layout.vectors, layout.table_bar, layout.table_offset),
        (16, 2, 0)
    );
    let group = dev.msix().unwrap();
    for v in 0..16 {
        assert_eq!(
            read32(&dev, 2, u64::from(v) * 16 + 12),
            0,
            "vector {v} unmasked"
        );
        assert_eq!(group.is_registered(v), Some(true));
    }
    // The guest programs vector 3; the route follows the table write.
    let gsi3 = group.gsi(3).unwrap();
    write32(&dev, 2, 3 * 16, 0xfee0_0000);
    write32(&dev, 2, 3 * 16 + 4, 0);
    write32(&dev, 2, 3 * 16 + 8, 0x45);
    assert_eq!(
        router.lock().unwrap().routes(gsi3),
        &[Route::Msi {
            address: 0xfee0_0000,
            data: 0x45,
            devid: None
        }]
    );
    assert!(!router.lock().unwrap().is_dirty(), "route committed");
    assert_eq!(read32(&dev, 2, 3 * 16 + 8), 0x45, "forwarded to the device");
    // Enable MSI-X (Message Control bit 15), fire vector 3: device -> irqfd -> LAPIC.
    let ctl_off = layout.cap_offset + 2;
    let mut ctl = [0u8; 2];
    dev.config_read(ctl_off, &mut ctl).unwrap();
    let ctl = u16::from_le_bytes(ctl) | 0x8000;
    dev.config_write(ctl_off, &ctl.to_le_bytes()).unwrap();
    assert!(!irr_has(&vcpu, 0x45));
    write32(&dev, 0, REG_MSIX_FIRE, 3);
    assert_eq!(read32(&dev, 0, REG_CNT_MSIX_TRIGGERS), 1);
    poll_until("MSI 0x45 in the LAPIC IRR", || irr_has(&vcpu, 0x45));
    // Guest masks vector 3 in the table: the event waits in the device's PBA.
    write32(&dev, 2, 3 * 16 + 12, 1);
    write32(&dev, 0, REG_MSIX_FIRE, 3);
    assert_eq!(read32(&dev, 0, REG_CNT_MSIX_TRIGGERS), 1);
    assert_eq!(read32(&dev, 0, REG_CNT_MSIX_PENDING), 1);
    assert_eq!(read32(&dev, 2, layout.pba_offset), 1 << 3);
    // Unmask: delivered once by the device through the (still registered) irqfd.
    write32(&dev, 2, 3 * 16 + 12, 0);
    assert_eq!(read32(&dev, 0, REG_CNT_MSIX_TRIGGERS), 2);
    assert_eq!(read32(&dev, 2, layout.pba_offset), 0);

    // Doorbell ioeventfd at BAR0 + DOORBELL.
    let door = dev
        .ioevents()
        .into_iter()
        .find(|e| e.bar == 0 && e.offset == REG_DOORBELL)
        .expect("doorbell ioeventfd");
    assert_eq!(door.address, Some(BAR_BASE + REG_DOORBELL));
    assert!(!door.pio);
    // KVM has it: a second ioeventfd on the same address and length collides.
    let other = EventFd::new(EFD_NONBLOCK).unwrap();
    let err = vm
        .register_ioevent(
            &other,
            &IoEventAddress::Mmio(BAR_BASE + REG_DOORBELL),
            NoDatamatch,
        )
        .unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST);
    // A write to the eventfd (what KVM does on a guest write) is counted by the device.
    let fds = dev.with_client(|c| c.region_io_fds(0)).unwrap();
    let fd = fds.into_iter().next().unwrap().fd;
    // SAFETY: an owned eventfd received from the server, moved into the EventFd.
    let doorbell = unsafe { EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
    assert_eq!(read32(&dev, 0, REG_DOORBELL_COUNT), 0);
    doorbell.write(1).unwrap();
    poll_until("DOORBELL_COUNT 1", || {
        read32(&dev, 0, REG_DOORBELL_COUNT) == 1
    });

    // BAR4 mapped and shared with the device.
    let regions = dev.mapped_regions();
    assert_eq!(regions.len(), 1);
    assert_eq!((regions[0].gpa, regions[0].size), (bar4, BAR4_SIZE));
    let m = &dev.mappings()[0];
    m.atomic_u64(0x10)
        .unwrap()
        .store(0xabcd_ef01_2345_6789, std::sync::atomic::Ordering::SeqCst);
    let mut b = [0u8; 8];
    dev.mmio_read(4, 0x10, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0xabcd_ef01_2345_6789);
    // SAFETY: installing the mapping as a slot proves KVM accepts it; the mapping outlives
    // the slot, which is removed below before detach.
    unsafe {
        vm.set_user_memory_region(regions[0].to_kvm_region(1))
            .unwrap();
        let mut gone = regions[0].to_kvm_region(1);
        gone.memory_size = 0;
        vm.set_user_memory_region(gone).unwrap();
    }

    // Detach: KVM side undone, GSIs freed.
    dev.detach().unwrap();
    assert_eq!(router.lock().unwrap().route_count(), 39);
    vm.register_ioevent(
        &other,
        &IoEventAddress::Mmio(BAR_BASE + REG_DOORBELL),
        NoDatamatch,
    )
    .expect("doorbell address free again");
    vm.unregister_ioevent(
        &other,
        &IoEventAddress::Mmio(BAR_BASE + REG_DOORBELL),
        NoDatamatch,
    )
    .unwrap();

    // Reattach: the device kept its state, and the route of vector 3 comes back from it.
    let dev = attach(&vm, &router, &rig, &ram);
    assert_eq!(read32(&dev, 0, REG_DOORBELL_COUNT), 1);
    let gsi3 = dev.msix().unwrap().gsi(3).unwrap();
    assert_eq!(
        router.lock().unwrap().routes(gsi3),
        &[Route::Msi {
            address: 0xfee0_0000,
            data: 0x45,
            devid: None
        }]
    );
    dev.detach().unwrap();
}

#[test]
fn split_irqchip_intx_uses_eoi_messages() {
    let Some(vm) = vm(IrqChip::Split) else { return };
    let rig = start_rig("split");
    let router = GsiRouter::new_shared(vm.clone(), IrqChip::Split);
    let ram = memfd(2 << 20);
    let dev = attach(&vm, &router, &rig, &ram);
    let intx = dev.intx().unwrap();
    assert!(intx.is_registered());
    assert!(intx.resample_notifier().is_none());
    // No MASK/UNMASK dance without resample.
    assert_eq!(read32(&dev, 0, REG_CNT_INTX_UNMASKS), 0);
    write32(&dev, 0, REG_INTX_ASSERT, 1);
    assert_eq!(read32(&dev, 0, REG_CNT_INTX_TRIGGERS), 1);
    // The VMM's IOAPIC saw the EOI; the line is still high, so the device re-triggers.
    dev.eoi().unwrap();
    assert_eq!(read32(&dev, 0, REG_CNT_INTX_TRIGGERS), 2);
    write32(&dev, 0, REG_INTX_DEASSERT, 1);
    dev.eoi().unwrap();
    assert_eq!(read32(&dev, 0, REG_INTX_STATUS) & 3, 0);
    assert_eq!(read32(&dev, 0, REG_CNT_INTX_TRIGGERS), 2);
    dev.detach().unwrap();
}

#[test]
fn without_intx_gsi_or_msix_nothing_is_wired() {
    let Some(vm) = vm(IrqChip::Full) else { return };
    let rig = start_rig("bare");
    let router = GsiRouter::new_shared(vm.clone(), IrqChip::Full);
    let config = AttachConfig {
        msix: false,
        ioeventfds: false,
        mmap_bars: false,
        posted_writes: false,
        ..AttachConfig::default()
    };
    let dev = AttachedDevice::attach(vm.clone(), router.clone(), rig.path(), config).unwrap();
    assert!(dev.intx().is_none() && dev.msix().is_none());
    assert!(dev.ioevents().is_empty() && dev.mappings().is_empty());
    assert_eq!(dev.bar_gpa(0), None);
    assert_eq!(read32(&dev, 0, REG_MAGIC), MAGIC);
    assert!(matches!(dev.eoi(), Err(Error::Unsupported(_))));
    assert!(matches!(
        dev.mmio_read(1, 0, &mut [0u8; 4]),
        Err(Error::InvalidIndex { index: 1, .. })
    ));
    // Waited writes report the device's refusal (BAR1 is absent; region 8 is VGA, size 0).
    assert!(matches!(
        dev.with_client(|c| c.region_write(8, 0, &[0u8; 4]).map_err(Error::from)),
        Err(Error::Client(ClientError::Remote { .. }))
    ));
    assert_eq!(router.lock().unwrap().route_count(), 39);
    dev.detach().unwrap();
}

#[test]
fn attach_to_a_missing_socket_fails_after_the_deadline() {
    let Some(vm) = vm(IrqChip::Full) else { return };
    let router = GsiRouter::new_shared(vm.clone(), IrqChip::Full);
    let config = AttachConfig {
        connect_timeout: Duration::from_millis(20),
        ..AttachConfig::default()
    };
    let err = AttachedDevice::attach(vm, router, Path::new("/nonexistent/irqbridge.sock"), config)
        .unwrap_err();
    assert!(
        matches!(err, Error::Client(ClientError::Connect { .. })),
        "{err}"
    );
}
