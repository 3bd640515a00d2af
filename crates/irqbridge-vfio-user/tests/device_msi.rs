// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! MSI (IRQ index 1) on the irqbridge test device: the capability at 0x50, BAR0 MSI_FIRE,
//! the drop / pending rules and their counters, SET_IRQS index 1 with the kernel's rules,
//! directly on the device and over the vfio-user protocol, with exact eventfd counts.

mod device_util;

use irqbridge_core::MsiDelivery;
use irqbridge_vfio_user::control::ControlRequest;
use irqbridge_vfio_user::device::{IrqAction, IrqData, SetIrqs, VfioUserDevice};
use irqbridge_vfio_user::pci::regs::*;
use irqbridge_vfio_user::pci::{DeviceConfig, IrqbridgeDevice};
use irqbridge_vfio_user::proto::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
};
use vmm_sys_util::eventfd::EventFd;

use device_util::*;

const CTL: u64 = MSI_CAP_OFFSET + MSI_CAP_CONTROL;
const MASK: u64 = MSI_CAP_OFFSET + MSI_CAP_MASK;
const PENDING: u64 = MSI_CAP_OFFSET + MSI_CAP_PENDING;

fn dev(msi_vectors: u8) -> IrqbridgeDevice {
    IrqbridgeDevice::new(DeviceConfig {
        msi_vectors,
        ..Default::default()
    })
    .unwrap()
}

fn fire(d: &mut IrqbridgeDevice, v: u32) {
    bar0_write(d, REG_MSI_FIRE, v);
}

/// SET_IRQS on the MSI index.
fn set_msi(
    d: &mut IrqbridgeDevice,
    action: IrqAction,
    start: u32,
    count: u32,
    data: IrqData,
) -> Result<(), i32> {
    set(d, IRQ_MSI, action, start, count, data)
}

/// Binds `n` fresh eventfds to MSI vectors 0..n; returns our ends.
fn bind_all(d: &mut IrqbridgeDevice, n: u32) -> Vec<EventFd> {
    let (ours, theirs): (Vec<_>, Vec<_>) = (0..n).map(|_| eventfd_pair()).unzip();
    set_msi(
        d,
        IrqAction::Trigger,
        0,
        n,
        IrqData::Eventfds(theirs.into_iter().map(Some).collect()),
    )
    .unwrap();
    ours
}

fn counts(fds: &[EventFd]) -> Vec<u64> {
    fds.iter().map(take).collect()
}

#[test]
fn msi_capability_identity_and_info() {
    let mut d = dev(4);
    assert_eq!(bar0(&mut d, REG_FEATURES), 0xf);
    assert_eq!(d.irq_info(IRQ_MSI).count, 4);
    assert_eq!(d.irq_info(IRQ_MSI).flags, 1 | 8);
    assert_eq!(cfg_read(&mut d, MSIX_CAP_OFFSET + 1, 1), 0x50);
    assert_eq!(cfg_read(&mut d, MSI_CAP_OFFSET, 4), 0x0184_0005);
    for (n, mmc) in [(1u8, 0u32), (2, 1), (8, 3), (16, 4), (32, 5)] {
        let mut d = dev(n);
        assert_eq!(d.irq_info(IRQ_MSI).count, u32::from(n));
        assert_eq!(cfg_read(&mut d, CTL, 2), 0x180 | mmc << 1, "{n} vectors");
        // Mask bits exist for the offered vectors only.
        cfg_write(&mut d, MASK, 4, u32::MAX);
        let want = if n == 32 { u32::MAX } else { (1 << n) - 1 };
        assert_eq!(cfg_read(&mut d, MASK, 4), want);
    }
    // --msi-vectors 0: no capability, no feature bit, MSI_FIRE is a bad value.
    let mut d = dev(0);
    assert_eq!(bar0(&mut d, REG_FEATURES), 0x7);
    assert_eq!(d.irq_info(IRQ_MSI).count, 0);
    assert_eq!(cfg_read(&mut d, MSIX_CAP_OFFSET + 1, 1), 0);
    assert_eq!(cfg_read(&mut d, MSI_CAP_OFFSET, 4), 0);
    fire(&mut d, 0);
    assert_eq!(d.counters().bad_accesses, 1);
    for bad in [3u8, 5, 33, 64] {
        assert!(
            IrqbridgeDevice::new(DeviceConfig {
                msi_vectors: bad,
                ..Default::default()
            })
            .is_err()
        );
    }
}

#[test]
fn msi_fire_rules_with_exact_counts() {
    let mut d = dev(4);
    let fds = bind_all(&mut d, 4);
    // MSI disabled: dropped and counted.
    fire(&mut d, 0);
    fire(&mut d, 1);
    assert_eq!(counts(&fds), vec![0; 4]);
    // Enable with MME 1 (two vectors): 0 and 1 go out, 2 and 3 are dropped.
    cfg_write(&mut d, CTL, 2, 0x11);
    for v in 0..4 {
        fire(&mut d, v);
    }
    assert_eq!(counts(&fds), vec![1, 1, 0, 0]);
    // All four vectors; each fires exactly once on its own eventfd.
    cfg_write(&mut d, CTL, 2, 0x21);
    for v in 0..4 {
        fire(&mut d, v);
    }
    assert_eq!(counts(&fds), vec![1, 1, 1, 1]);
    // Vector ≥ N: a bad value.
    fire(&mut d, 4);
    fire(&mut d, 0x100);
    assert_eq!(d.counters().bad_accesses, 2);
    // Masked: pending, three fires give one delivery on unmask, exactly once.
    cfg_write(&mut d, MASK, 4, 0b1001);
    for _ in 0..3 {
        fire(&mut d, 3);
    }
    fire(&mut d, 0);
    assert_eq!(cfg_read(&mut d, PENDING, 4), 0b1001);
    assert_eq!(counts(&fds), vec![0; 4]);
    cfg_write(&mut d, MASK, 4, 0b0001);
    assert_eq!(counts(&fds), vec![0, 0, 0, 1]);
    cfg_write(&mut d, MASK, 1, 0);
    assert_eq!(counts(&fds), vec![1, 0, 0, 0]);
    cfg_write(&mut d, MASK, 4, 0);
    assert_eq!(counts(&fds), vec![0; 4]);
    assert_eq!(cfg_read(&mut d, PENDING, 4), 0);
    // MSI and MSI-X are never delivered at the same time.
    cfg_write(&mut d, MSIX_CAP_OFFSET + MSIX_CAP_CONTROL + 1, 1, 0x80);
    fire(&mut d, 2);
    assert_eq!(counts(&fds), vec![0; 4]);
    cfg_write(&mut d, MSIX_CAP_OFFSET + MSIX_CAP_CONTROL + 1, 1, 0);
    fire(&mut d, 2);
    assert_eq!(counts(&fds), vec![0, 0, 1, 0]);
    // Disable: dropped.
    cfg_write(&mut d, CTL, 2, 0x20);
    fire(&mut d, 2);
    assert_eq!(counts(&fds), vec![0; 4]);

    let c = d.counters();
    assert_eq!(c.msi_triggers, 2 + 4 + 2 + 1);
    assert_eq!(c.msi_pending, 4);
    assert_eq!(c.msi_dropped_disabled, 2 + 1 + 1);
    assert_eq!(c.msi_dropped_mme, 2);
    assert_eq!(c.msi_dropped, 6);
    assert_eq!(bar0(&mut d, REG_CNT_MSI_TRIGGERS), 9);
    assert_eq!(bar0(&mut d, REG_CNT_MSI_PENDING), 4);
    assert_eq!(bar0(&mut d, REG_CNT_MSI_DROPPED), 6);
    assert_eq!(c.bad_accesses, 2);
    // The control socket sees the same counters, and can fire too.
    let r = d.control_request(&ControlRequest::Counters);
    assert_eq!(r["counters"]["msi_triggers"], 9);
    assert_eq!(r["counters"]["msi_dropped_mme"], 2);
    let r = d.control_request(&ControlRequest::MsiFire { vector: 1 });
    assert_eq!(r["delivery"], "disabled");
    let r = d.control_request(&ControlRequest::MsiFire { vector: 9 });
    assert_eq!(r["ok"], false);
    cfg_write(&mut d, CTL, 2, 0x21);
    assert_eq!(d.msi_fire(1).unwrap(), MsiDelivery::Sent);
    assert_eq!(counts(&fds), vec![0, 1, 0, 0]);
}

#[test]
fn msi_suppresses_intx_and_reset_clears_it() {
    let mut d = dev(4);
    let (ours, theirs) = eventfd_pair();
    d.set_irqs(SetIrqs {
        index: IRQ_INTX,
        action: IrqAction::Trigger,
        start: 0,
        count: 1,
        data: IrqData::Eventfds(vec![Some(theirs)]),
    })
    .unwrap();
    cfg_write(&mut d, CTL, 2, 0x01);
    d.region_write(REGION_BAR0, REG_INTX_ASSERT, &1u32.to_le_bytes())
        .unwrap();
    assert_eq!(take(&ours), 0);
    // Disabling MSI with the line high fires INTx.
    cfg_write(&mut d, CTL, 2, 0);
    assert_eq!(take(&ours), 1);
    // Reset: MSI registers back to 0, bindings kept.
    let fds = bind_all(&mut d, 4);
    cfg_write(&mut d, MSI_CAP_OFFSET + MSI_CAP_ADDRESS_LO, 4, 0xfee0_0000);
    cfg_write(&mut d, MSI_CAP_OFFSET + MSI_CAP_DATA, 2, 0x41);
    cfg_write(&mut d, MASK, 4, 1);
    cfg_write(&mut d, CTL, 2, 0x21);
    fire(&mut d, 0);
    d.reset().unwrap();
    for off in [CTL, MSI_CAP_OFFSET + 4, MSI_CAP_OFFSET + 0xc, MASK, PENDING] {
        assert_eq!(cfg_read(&mut d, off, 2) & !0x1ff, 0, "{off:#x}");
    }
    assert_eq!(cfg_read(&mut d, CTL, 2), 0x184);
    cfg_write(&mut d, CTL, 2, 0x01);
    fire(&mut d, 0);
    assert_eq!(counts(&fds), vec![1, 0, 0, 0]);
    // A snapshot carries MSI; a device with another MSI size refuses it.
    let snap = d.snapshot();
    assert!(snap.msi.as_ref().is_some_and(|m| m.enabled));
    assert!(dev(8).restore(&snap).is_err());
    let mut e = dev(4);
    e.restore(&snap).unwrap();
    assert_eq!(e.snapshot(), snap);
}

#[test]
fn set_irqs_msi_rules() {
    let mut d = dev(4);
    // Idle index: loopback EINVAL; MASK / UNMASK ENOTTY; count 0 disable is fine.
    assert_eq!(
        set_msi(&mut d, IrqAction::Trigger, 0, 1, IrqData::None),
        Err(libc::EINVAL)
    );
    assert_eq!(
        set_msi(&mut d, IrqAction::Mask, 0, 1, IrqData::None),
        Err(libc::ENOTTY)
    );
    assert_eq!(
        set_msi(&mut d, IrqAction::Unmask, 0, 1, IrqData::Bool(vec![true])),
        Err(libc::ENOTTY)
    );
    assert!(set_msi(&mut d, IrqAction::Trigger, 0, 0, IrqData::None).is_ok());
    // Two vectors allocated; growing is EINVAL until a disable.
    let fds = bind_all(&mut d, 2);
    let (_, extra) = eventfd_pair();
    assert_eq!(
        set_msi(
            &mut d,
            IrqAction::Trigger,
            2,
            1,
            IrqData::Eventfds(vec![Some(extra)])
        ),
        Err(libc::EINVAL)
    );
    // Loopback (DATA_NONE / DATA_BOOL) writes the eventfds whatever the masks say.
    cfg_write(&mut d, MASK, 4, 0xf);
    set_msi(&mut d, IrqAction::Trigger, 0, 2, IrqData::None).unwrap();
    set_msi(&mut d, IrqAction::Trigger, 1, 1, IrqData::Bool(vec![true])).unwrap();
    set_msi(
        &mut d,
        IrqAction::Trigger,
        0,
        2,
        IrqData::Bool(vec![false, false]),
    )
    .unwrap();
    assert_eq!(counts(&fds), vec![1, 2]);
    assert_eq!(cfg_read(&mut d, PENDING, 4), 0);
    // Unbinding one vector (no fd) keeps the index enabled.
    set_msi(
        &mut d,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfds(vec![None]),
    )
    .unwrap();
    set_msi(&mut d, IrqAction::Trigger, 0, 2, IrqData::None).unwrap();
    assert_eq!(counts(&fds), vec![0, 1]);
    // Disable, then four.
    set_msi(&mut d, IrqAction::Trigger, 0, 0, IrqData::None).unwrap();
    assert_eq!(
        set_msi(&mut d, IrqAction::Trigger, 0, 1, IrqData::None),
        Err(libc::EINVAL)
    );
    let fds = bind_all(&mut d, 4);
    set_msi(&mut d, IrqAction::Trigger, 0, 4, IrqData::None).unwrap();
    assert_eq!(counts(&fds), vec![1, 1, 1, 1]);
    // A disconnect drops them.
    d.client_disconnected();
    assert_eq!(
        set_msi(&mut d, IrqAction::Trigger, 0, 4, IrqData::None),
        Err(libc::EINVAL)
    );
    assert_eq!(d.counters().msi_triggers, 3 + 1 + 4);
}

#[test]
fn msi_over_the_protocol() {
    let run = Running::start(DeviceConfig::default(), false);
    let mut c = RawClient::connect(&run.path);
    assert_eq!(c.irq_info(IRQ_MSI), (9, 4));
    let fds: Vec<EventFd> = (0..4).map(|_| eventfd_pair().0).collect();
    let refs: Vec<&EventFd> = fds.iter().collect();
    const TRIGGER_FD: u32 = VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD;
    const TRIGGER_NONE: u32 = VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_NONE;
    // QEMU's order: the guest's config writes are forwarded, then SET_IRQS with the fds.
    c.write(
        REGION_CONFIG,
        MSI_CAP_OFFSET + MSI_CAP_ADDRESS_LO,
        4,
        0xfee0_0000,
    );
    c.write(REGION_CONFIG, MSI_CAP_OFFSET + MSI_CAP_DATA, 2, 0x4040);
    c.write(REGION_CONFIG, CTL, 2, 0x21);
    c.set_irqs(IRQ_MSI, TRIGGER_FD, 0, 4, &refs).unwrap();
    for v in 0..4 {
        c.write(REGION_BAR0, REG_MSI_FIRE, 4, v);
    }
    assert_eq!(counts(&fds), vec![1, 1, 1, 1]);
    // Masked vector 2 → pending → exactly one on unmask.
    c.write(REGION_CONFIG, MASK, 4, 0b100);
    c.write(REGION_BAR0, REG_MSI_FIRE, 4, 2);
    c.write(REGION_BAR0, REG_MSI_FIRE, 4, 2);
    assert_eq!(c.read(REGION_CONFIG, PENDING, 4), 0b100);
    assert_eq!(counts(&fds), vec![0; 4]);
    c.write(REGION_CONFIG, MASK, 4, 0);
    assert_eq!(counts(&fds), vec![0, 0, 1, 0]);
    // Kernel rules over the wire.
    let err = c
        .set_irqs(
            IRQ_MSI,
            VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_NONE,
            0,
            1,
            &[],
        )
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOTTY);
    // Loopback.
    c.set_irqs(IRQ_MSI, TRIGGER_NONE, 1, 2, &[]).unwrap();
    assert_eq!(counts(&fds), vec![0, 1, 1, 0]);
    // MSI-X loopback (issue 8): TRIGGER|NONE writes the bound eventfd, even while masked.
    let x = eventfd_pair().0;
    c.set_irqs(IRQ_MSIX, TRIGGER_FD, 5, 1, &[&x]).unwrap();
    c.set_irqs(IRQ_MSIX, TRIGGER_NONE, 5, 1, &[]).unwrap();
    c.set_irqs_bool(IRQ_MSIX, VFIO_IRQ_SET_ACTION_TRIGGER, 4, &[false, true]);
    assert_eq!(take(&x), 2);
    // Disable the index: none after.
    c.set_irqs(IRQ_MSI, TRIGGER_NONE, 0, 0, &[]).unwrap();
    c.write(REGION_CONFIG, CTL, 2, 0x20);
    for v in 0..4 {
        c.write(REGION_BAR0, REG_MSI_FIRE, 4, v);
    }
    assert_eq!(c.read(REGION_BAR0, REG_CNT_MSI_TRIGGERS, 4), 4 + 1 + 2);
    assert_eq!(c.read(REGION_BAR0, REG_CNT_MSI_DROPPED, 4), 4);
    assert_eq!(counts(&fds), vec![0; 4]);
    drop(c);
    let d = run.finish();
    assert_eq!(d.counters().msix_triggers, 2);
    assert_eq!(d.counters().msi_pending, 2);
}

#[test]
fn device_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<IrqbridgeDevice>();
}
