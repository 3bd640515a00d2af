// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The irqbridge PCI device driven directly through the `VfioUserDevice` trait (no socket).

mod device_util;

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use irqbridge_core::evtchn::{MASK_WORD, PENDING_WORD, guest_collect};
use irqbridge_vfio_user::device::{IrqAction, IrqData, VfioUserDevice};
use irqbridge_vfio_user::pci::regs::*;
use irqbridge_vfio_user::pci::{DeviceConfig, IrqbridgeDevice};

use device_util::*;

fn dev() -> IrqbridgeDevice {
    IrqbridgeDevice::new(DeviceConfig::default()).unwrap()
}

/// Binds a fresh eventfd to `index` sub-index `sub`; returns our end.
fn bind(d: &mut IrqbridgeDevice, index: u32, action: IrqAction, sub: u32) -> Efd {
    let (ours, theirs) = eventfd_pair();
    let raw = theirs.as_raw_fd();
    set(
        d,
        index,
        action,
        sub,
        1,
        IrqData::Eventfds(vec![Some(theirs)]),
    )
    .unwrap();
    Efd { fd: ours, raw }
}

fn token_of(d: &IrqbridgeDevice, raw: RawFd) -> Option<u64> {
    d.poll_fds()
        .iter()
        .find(|(b, _)| b.as_raw_fd() == raw)
        .map(|(_, t)| *t)
}

fn pba_word(d: &mut IrqbridgeDevice) -> u64 {
    let mut b = [0u8; 8];
    d.region_read(REGION_BAR2, msix_pba_offset(16), &mut b)
        .unwrap();
    u64::from_le_bytes(b)
}

fn enable_msix(d: &mut IrqbridgeDevice, function_mask: bool) {
    let v = MSIX_CONTROL_ENABLE
        | if function_mask {
            MSIX_CONTROL_FUNCTION_MASK
        } else {
            0
        };
    cfg_write(d, MSIX_CAP_OFFSET + MSIX_CAP_CONTROL, 2, u32::from(v));
}

#[test]
fn identity_info_and_regions() {
    let mut d = dev();
    assert_eq!(cfg_read(&mut d, PCI_VENDOR_ID, 2), u32::from(VENDOR_ID));
    assert_eq!(cfg_read(&mut d, PCI_DEVICE_ID, 2), u32::from(DEVICE_ID));
    assert_eq!(cfg_read(&mut d, 0, 4), 0x7162_6972);
    assert_eq!(cfg_read(&mut d, PCI_REVISION_ID, 4), 0xff00_0001);
    assert_eq!(cfg_read(&mut d, PCI_HEADER_TYPE, 1), 0);
    assert_eq!(cfg_read(&mut d, PCI_SUBSYSTEM_VENDOR_ID, 4), 0x0001_6972);
    assert_eq!(cfg_read(&mut d, PCI_INTERRUPT_PIN, 1), 1);
    assert_eq!(cfg_read(&mut d, PCI_COMMAND, 2), 0);
    assert_eq!(
        cfg_read(&mut d, PCI_STATUS, 2),
        u32::from(PCI_STATUS_CAP_LIST)
    );

    let info = d.device_info();
    assert_eq!((info.flags, info.num_regions, info.num_irqs), (3, 9, 5));

    let expect = [
        (0u32, 3u32, 4096u64),
        (1, 0, 0),
        (2, 3, 8192),
        (3, 0, 0),
        (4, 7, 4096),
        (5, 0, 0),
        (6, 0, 0),
        (7, 3, 4096),
        (8, 0, 0),
    ];
    for (i, flags, size) in expect {
        let r = d.region_info(i);
        assert_eq!((r.flags, r.size), (flags, size), "region {i}");
        assert_eq!(r.mmap_fd.is_some(), i == 4, "region {i}");
        assert_eq!(r.sparse_areas.len(), usize::from(i == 4), "region {i}");
    }
    let r = d.region_info(4);
    assert_eq!(
        (r.sparse_areas[0].offset, r.sparse_areas[0].size),
        (0, 4096)
    );

    let irqs: Vec<_> = (0..5).map(|i| d.irq_info(i)).collect();
    let got: Vec<_> = irqs.iter().map(|i| (i.flags, i.count)).collect();
    assert_eq!(got, vec![(7, 1), (9, 4), (3, 16), (1, 1), (1, 1)]);

    let io = d.region_io_fds(0);
    assert_eq!(io.len(), 1);
    assert_eq!((io[0].offset, io[0].size, io[0].datamatch), (0x40, 4, None));
    for i in 1..9 {
        assert!(d.region_io_fds(i).is_empty());
    }

    assert_eq!(bar0(&mut d, REG_MAGIC), MAGIC);
    assert_eq!(bar0(&mut d, REG_ABI_VERSION), 1);
    assert_eq!(bar0(&mut d, REG_FEATURES), 0xf);
    assert_eq!(bar0(&mut d, REG_MSIX_VECTORS), 16);
    assert_eq!(bar0(&mut d, REG_EVTCHN_PORTS), 1024);
}

#[test]
fn no_intx_and_other_sizes() {
    let cfg = DeviceConfig {
        msix_vectors: 2048,
        evtchn_ports: 4096,
        intx: false,
        msi_vectors: 0,
    };
    let mut d = IrqbridgeDevice::new(cfg).unwrap();
    assert_eq!(cfg_read(&mut d, PCI_INTERRUPT_PIN, 1), 0);
    assert_eq!(d.irq_info(IRQ_INTX).count, 0);
    assert_eq!(d.irq_info(IRQ_MSIX).count, 2048);
    assert_eq!(d.region_info(2).size, 65536);
    assert_eq!(bar0(&mut d, REG_FEATURES), FEATURE_MSIX | FEATURE_EVTCHN);
    assert_eq!(bar0(&mut d, REG_EVTCHN_PORTS), 4096);
    assert_eq!(
        cfg_read(&mut d, MSIX_CAP_OFFSET + MSIX_CAP_CONTROL, 2),
        0x07ff
    );
    assert_eq!(
        cfg_read(&mut d, MSIX_CAP_OFFSET + MSIX_CAP_PBA, 4),
        32768 | 2
    );
    // The guest cannot raise a line that does not exist.
    bar0_write(&mut d, REG_INTX_ASSERT, 1);
    assert_eq!(bar0(&mut d, REG_INTX_STATUS), 0);
    assert_eq!(d.counters().bad_accesses, 1);
    assert!(d.intx_set_level(1, true).is_err());

    for bad in [
        DeviceConfig {
            msix_vectors: 0,
            ..Default::default()
        },
        DeviceConfig {
            msix_vectors: 2049,
            ..Default::default()
        },
        DeviceConfig {
            evtchn_ports: 0,
            ..Default::default()
        },
        DeviceConfig {
            evtchn_ports: 4097,
            ..Default::default()
        },
    ] {
        assert!(IrqbridgeDevice::new(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn bar_sizing() {
    for (vectors, bar2) in [(16u16, 8192u32), (300, 16384), (2048, 65536)] {
        let mut d = IrqbridgeDevice::new(DeviceConfig {
            msix_vectors: vectors,
            ..Default::default()
        })
        .unwrap();
        let sizes = [4096u32, 0, bar2, 0, 4096, 0];
        for (i, size) in sizes.iter().enumerate() {
            let off = PCI_BAR0 + 4 * i as u64;
            assert_eq!(cfg_read(&mut d, off, 4), 0);
            cfg_write(&mut d, off, 4, 0xffff_ffff);
            let v = cfg_read(&mut d, off, 4);
            // 32-bit memory BARs: flags 0, size = !(v & !0xf) + 1.
            assert_eq!(v & 0xf, 0);
            let got = (!(v & !0xf)).wrapping_add(1);
            assert_eq!(if v == 0 { 0 } else { got }, *size, "BAR{i}");
            // An address is kept, aligned to the size.
            cfg_write(&mut d, off, 4, 0xfebf_1234);
            let expect = if *size == 0 {
                0
            } else {
                0xfebf_1234 & !(size - 1)
            };
            assert_eq!(cfg_read(&mut d, off, 4), expect, "BAR{i}");
        }
        cfg_write(&mut d, PCI_ROM_ADDRESS, 4, 0xffff_ffff);
        assert_eq!(cfg_read(&mut d, PCI_ROM_ADDRESS, 4), 0);
        assert_eq!(d.region_info(2).size, u64::from(bar2), "{vectors} vectors");
    }
}

#[test]
fn capability_walk() {
    let mut d = dev();
    assert_ne!(cfg_read(&mut d, PCI_STATUS, 2) & 0x10, 0);
    let mut ptr = cfg_read(&mut d, PCI_CAPABILITY_LIST, 1) as u64;
    let mut caps = Vec::new();
    while ptr != 0 && caps.len() < 48 {
        caps.push((ptr, cfg_read(&mut d, ptr, 1) as u8));
        ptr = cfg_read(&mut d, ptr + 1, 1) as u64 & !3;
    }
    assert_eq!(caps, vec![(0x40, PCI_CAP_ID_MSIX), (0x50, PCI_CAP_ID_MSI)]);
    assert_eq!(cfg_read(&mut d, 0x42, 2), 15);
    let table = cfg_read(&mut d, 0x44, 4);
    assert_eq!((table & 7, table & !7), (2, 0));
    let pba = cfg_read(&mut d, 0x48, 4);
    assert_eq!((pba & 7, pba & !7), (2, 0x1000));
    // Dword read of the header: ID, next, control.
    assert_eq!(cfg_read(&mut d, 0x40, 4), 0x000f_5011);
}

#[test]
fn config_space_byte_wise_and_read_only() {
    let mut d = dev();
    let mut before = vec![0u8; 4096];
    d.region_read(REGION_CONFIG, 0, &mut before).unwrap();
    // Every width at every offset reads the same bytes as the full read.
    for len in [1usize, 2, 4] {
        for off in 0..=(4096 - len) as u64 {
            let mut b = vec![0u8; len];
            d.region_read(REGION_CONFIG, off, &mut b).unwrap();
            assert_eq!(
                b,
                before[off as usize..off as usize + len],
                "{off:#x}/{len}"
            );
        }
    }
    // Write all-ones everywhere byte by byte, except MSI-X Message Control and the MSI
    // registers (tested elsewhere).
    for off in 0..4096u64 {
        if off == 0x42 || off == 0x43 || (0x52..0x68).contains(&off) {
            continue;
        }
        d.region_write(REGION_CONFIG, off, &[0xff]).unwrap();
    }
    let mut after = vec![0u8; 4096];
    d.region_read(REGION_CONFIG, 0, &mut after).unwrap();
    let mut changed: Vec<(usize, u8)> = (0..4096)
        .filter(|&i| after[i] != before[i])
        .map(|i| (i, after[i]))
        .collect();
    changed.sort();
    assert_eq!(
        changed,
        vec![
            (0x04, 0x07),
            (0x05, 0x04),
            (0x11, 0xf0),
            (0x12, 0xff),
            (0x13, 0xff),
            (0x19, 0xe0),
            (0x1a, 0xff),
            (0x1b, 0xff),
            (0x21, 0xf0),
            (0x22, 0xff),
            (0x23, 0xff),
            (0x3c, 0xff),
        ]
    );
    // Unaligned 4-byte write across COMMAND and STATUS.
    cfg_write(&mut d, 0x03, 4, 0);
    assert_eq!(cfg_read(&mut d, 0x04, 4), 0x0010_0000);
    // Odd lengths do not panic either.
    d.region_write(REGION_CONFIG, 0x3b, &[1, 2, 3]).unwrap();
    assert_eq!(cfg_read(&mut d, PCI_INTERRUPT_LINE, 1), 2);
    d.region_write(REGION_CONFIG, 4090, &[0; 6]).unwrap();
    let mut b = [0u8; 8];
    d.region_read(REGION_CONFIG, 4088, &mut b).unwrap();
    assert_eq!(b, [0; 8]);
}

#[test]
fn command_intx_disable_and_status_interrupt() {
    let mut d = dev();
    let trig = bind(&mut d, IRQ_INTX, IrqAction::Trigger, 0);
    bar0_write(&mut d, REG_INTX_ASSERT, 1);
    assert_eq!(take(&trig), 1);
    assert_eq!(cfg_read(&mut d, PCI_STATUS, 2), 0x18);
    assert_eq!(bar0(&mut d, REG_INTX_STATUS), 0b011);
    // COMMAND.10 set: masked, STATUS.3 still reports the level.
    cfg_write(&mut d, PCI_COMMAND, 2, 0x0406);
    assert_eq!(cfg_read(&mut d, PCI_COMMAND, 2), 0x0406);
    assert_eq!(cfg_read(&mut d, PCI_STATUS, 2), 0x18);
    assert_eq!(bar0(&mut d, REG_INTX_STATUS), 0b111);
    // Unmasks while disabled do nothing.
    set(&mut d, IRQ_INTX, IrqAction::Unmask, 0, 1, IrqData::None).unwrap();
    assert_eq!(take(&trig), 0);
    // Clearing COMMAND.10 unmasks: still asserted, so it fires again.
    cfg_write(&mut d, PCI_COMMAND + 1, 1, 0);
    assert_eq!(take(&trig), 1);
    assert_eq!(bar0(&mut d, REG_INTX_STATUS), 0b011);
    bar0_write(&mut d, REG_INTX_DEASSERT, 0);
    assert_eq!(cfg_read(&mut d, PCI_STATUS, 2), 0x10);
    set(&mut d, IRQ_INTX, IrqAction::Unmask, 0, 1, IrqData::None).unwrap();
    assert_eq!(bar0(&mut d, REG_INTX_STATUS), 0);
    assert_eq!(take(&trig), 0);
    assert_eq!(bar0(&mut d, REG_CNT_INTX_TRIGGERS), 2);
    assert_eq!(bar0(&mut d, REG_CNT_INTX_UNMASKS), 2);
}

#[test]
fn intx_trigger_and_unmask_eventfds() {
    let mut d = dev();
    let trig = bind(&mut d, IRQ_INTX, IrqAction::Trigger, 0);
    let unmask = bind(&mut d, IRQ_INTX, IrqAction::Unmask, 0);
    let tok = token_of(&d, unmask.raw).expect("unmask eventfd is polled");

    // Assert: fires once and auto-masks.
    bar0_write(&mut d, REG_INTX_ASSERT, 1);
    bar0_write(&mut d, REG_INTX_ASSERT, 1);
    assert_eq!(take(&trig), 1);
    assert_ne!(bar0(&mut d, REG_INTX_STATUS) & INTX_STATUS_MASKED, 0);

    // Resample while still asserted: re-fires, stays masked. Several writes = one unmask.
    unmask.write(3).unwrap();
    d.handle_fd_event(tok);
    assert_eq!(take(&trig), 1);
    assert_eq!(
        read_count(&unmask),
        0,
        "the device drained the unmask eventfd"
    );
    assert_ne!(bar0(&mut d, REG_INTX_STATUS) & INTX_STATUS_MASKED, 0);

    // Spurious event (nothing to read): nothing happens.
    d.handle_fd_event(tok);
    assert_eq!(take(&trig), 0);

    // Deassert + resample: quiet and unmasked.
    bar0_write(&mut d, REG_INTX_DEASSERT, 1);
    unmask.write(1).unwrap();
    d.handle_fd_event(tok);
    assert_eq!(take(&trig), 0);
    assert_eq!(bar0(&mut d, REG_INTX_STATUS), 0);

    // Next assert fires again; the control source shares the line.
    assert!(d.intx_set_level(INTX_SOURCE_CONTROL, true).unwrap());
    assert_eq!(take(&trig), 1);
    bar0_write(&mut d, REG_INTX_ASSERT, 1);
    d.intx_set_level(INTX_SOURCE_CONTROL, false).unwrap();
    unmask.write(1).unwrap();
    d.handle_fd_event(tok);
    assert_eq!(take(&trig), 1, "the guest source still holds the line");
    bar0_write(&mut d, REG_INTX_DEASSERT, 1);
    unmask.write(1).unwrap();
    d.handle_fd_event(tok);
    assert_eq!(take(&trig), 0);

    // MASK / UNMASK messages.
    set(&mut d, IRQ_INTX, IrqAction::Mask, 0, 1, IrqData::None).unwrap();
    bar0_write(&mut d, REG_INTX_ASSERT, 1);
    assert_eq!(take(&trig), 0);
    set(
        &mut d,
        IRQ_INTX,
        IrqAction::Unmask,
        0,
        1,
        IrqData::Bool(vec![false]),
    )
    .unwrap();
    assert_eq!(take(&trig), 0);
    set(
        &mut d,
        IRQ_INTX,
        IrqAction::Unmask,
        0,
        1,
        IrqData::Bool(vec![true]),
    )
    .unwrap();
    assert_eq!(take(&trig), 1);
    assert_eq!(
        set(
            &mut d,
            IRQ_INTX,
            IrqAction::Mask,
            0,
            1,
            IrqData::Eventfds(vec![None])
        ),
        Err(libc::ENOTTY)
    );

    // Loopback trigger: signals without touching the mask.
    set(&mut d, IRQ_INTX, IrqAction::Trigger, 0, 1, IrqData::None).unwrap();
    assert_eq!(take(&trig), 1);

    // Unbind the unmask eventfd: no longer polled.
    set(
        &mut d,
        IRQ_INTX,
        IrqAction::Unmask,
        0,
        1,
        IrqData::Eventfds(vec![]),
    )
    .unwrap();
    assert_eq!(token_of(&d, unmask.raw), None);

    // Unbind the trigger: events are dropped, index stays enabled.
    let unmask = bind(&mut d, IRQ_INTX, IrqAction::Unmask, 0);
    set(
        &mut d,
        IRQ_INTX,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfds(vec![None]),
    )
    .unwrap();
    set(&mut d, IRQ_INTX, IrqAction::Unmask, 0, 1, IrqData::None).unwrap();
    assert_eq!(take(&trig), 0);

    // Disable the index: the unmask eventfd goes too.
    set(&mut d, IRQ_INTX, IrqAction::Trigger, 0, 0, IrqData::None).unwrap();
    assert_eq!(token_of(&d, unmask.raw), None);
    // Re-enable with the line high: fires at bind.
    let trig2 = bind(&mut d, IRQ_INTX, IrqAction::Trigger, 0);
    assert_eq!(take(&trig2), 1);
    assert_eq!(d.counters().bad_accesses, 0);
}

#[test]
fn intx_suppressed_while_msix_enabled() {
    let mut d = dev();
    let trig = bind(&mut d, IRQ_INTX, IrqAction::Trigger, 0);
    let v0 = bind(&mut d, IRQ_MSIX, IrqAction::Trigger, 0);
    enable_msix(&mut d, false);
    bar0_write(&mut d, REG_INTX_ASSERT, 1);
    assert_eq!(take(&trig), 0);
    bar0_write(&mut d, REG_MSIX_FIRE, 0);
    assert_eq!(take(&v0), 1);
    cfg_write(&mut d, MSIX_CAP_OFFSET + MSIX_CAP_CONTROL + 1, 1, 0);
    assert_eq!(
        take(&trig),
        1,
        "leaving MSI-X with the line high fires INTx"
    );
}

#[test]
fn msix_fire_mask_pba_unmask() {
    let mut d = dev();
    let fds: Vec<_> = (0..4).map(|_| eventfd_pair()).collect();
    let (ours, theirs): (Vec<_>, Vec<_>) = fds.into_iter().unzip();
    set(
        &mut d,
        IRQ_MSIX,
        IrqAction::Trigger,
        0,
        4,
        IrqData::Eventfds(theirs.into_iter().map(Some).collect()),
    )
    .unwrap();
    // Not enabled yet: events become pending.
    bar0_write(&mut d, REG_MSIX_FIRE, 3);
    assert_eq!(take(&ours[3]), 0);
    assert_eq!(pba_word(&mut d), 1 << 3);
    // Enabling delivers the pending vector once.
    enable_msix(&mut d, false);
    assert_eq!(cfg_read(&mut d, 0x42, 2), 0x800f);
    assert_eq!(take(&ours[3]), 1);
    assert_eq!(pba_word(&mut d), 0);

    bar0_write(&mut d, REG_MSIX_FIRE, 2);
    assert_eq!(take(&ours[2]), 1);

    // Mask through the BAR0 alias: pending bit visible in the PBA through BAR2.
    bar0_write(&mut d, REG_MSIX_MASK, 2);
    bar0_write(&mut d, REG_MSIX_FIRE, 2);
    bar0_write(&mut d, REG_MSIX_FIRE, 2);
    assert_eq!(take(&ours[2]), 0);
    assert_eq!(pba_word(&mut d), 1 << 2);
    let mut ctrl = [0u8; 4];
    d.region_read(REGION_BAR2, 16 * 2 + 12, &mut ctrl).unwrap();
    assert_eq!(u32::from_le_bytes(ctrl), 1);
    bar0_write(&mut d, REG_MSIX_UNMASK, 2);
    assert_eq!(take(&ours[2]), 1, "exactly one delivery on unmask");
    assert_eq!(pba_word(&mut d), 0);
    bar0_write(&mut d, REG_MSIX_UNMASK, 2);
    assert_eq!(take(&ours[2]), 0);

    // Function mask through config space.
    enable_msix(&mut d, true);
    assert_eq!(cfg_read(&mut d, 0x42, 2), 0xc00f);
    bar0_write(&mut d, REG_MSIX_FIRE, 1);
    bar0_write(&mut d, REG_MSIX_FIRE, 0);
    assert_eq!(take(&ours[1]) + take(&ours[0]), 0);
    assert_eq!(pba_word(&mut d), 0b11);
    // Byte write of the high byte only: clear the function mask.
    cfg_write(&mut d, 0x43, 1, 0x80);
    assert_eq!((take(&ours[0]), take(&ours[1])), (1, 1));

    // Host masks (SET_IRQS MASK/UNMASK, DATA_BOOL).
    set(
        &mut d,
        IRQ_MSIX,
        IrqAction::Mask,
        0,
        2,
        IrqData::Bool(vec![false, true]),
    )
    .unwrap();
    bar0_write(&mut d, REG_MSIX_FIRE, 0);
    bar0_write(&mut d, REG_MSIX_FIRE, 1);
    assert_eq!((take(&ours[0]), take(&ours[1])), (1, 0));
    set(&mut d, IRQ_MSIX, IrqAction::Unmask, 1, 1, IrqData::None).unwrap();
    assert_eq!(take(&ours[1]), 1);

    // Loopback triggers.
    set(&mut d, IRQ_MSIX, IrqAction::Trigger, 2, 2, IrqData::None).unwrap();
    assert_eq!((take(&ours[2]), take(&ours[3])), (1, 1));

    // Swap vector 0's eventfd (QEMU masking style), then unbind it.
    let new0 = bind(&mut d, IRQ_MSIX, IrqAction::Trigger, 0);
    bar0_write(&mut d, REG_MSIX_FIRE, 0);
    assert_eq!((take(&ours[0]), take(&new0)), (0, 1));
    set(
        &mut d,
        IRQ_MSIX,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfds(vec![]),
    )
    .unwrap();
    bar0_write(&mut d, REG_MSIX_FIRE, 0);
    assert_eq!(take(&new0), 0);
    // Disable the index: every notifier goes.
    set(&mut d, IRQ_MSIX, IrqAction::Trigger, 0, 0, IrqData::None).unwrap();
    bar0_write(&mut d, REG_MSIX_FIRE, 3);
    assert_eq!(take(&ours[3]), 0);

    let c = d.counters();
    assert_eq!(c.msix_dropped, 2);
    assert_eq!(c.bad_accesses, 0);
    assert_eq!(
        u64::from(bar0(&mut d, REG_CNT_MSIX_TRIGGERS)),
        c.msix_triggers
    );
    assert_eq!(c.msix_triggers, 10);
    assert_eq!(c.msix_pending, 6);
    assert_eq!(bar0(&mut d, REG_CNT_MSIX_PENDING), 6);
}

#[test]
fn msix_table_through_bar2() {
    let mut d = dev();
    let w = |d: &mut IrqbridgeDevice, off: u64, data: &[u8]| {
        d.region_write(REGION_BAR2, off, data).unwrap()
    };
    w(&mut d, 16 * 5, &0xfee0_0003u32.to_le_bytes());
    w(&mut d, 16 * 5 + 8, &0x0000_0000_0000_0041u64.to_le_bytes());
    let mut e = [0u8; 16];
    for (i, chunk) in e.chunks_mut(4).enumerate() {
        d.region_read(REGION_BAR2, 16 * 5 + 4 * i as u64, chunk)
            .unwrap();
    }
    assert_eq!(
        e,
        [
            0x00, 0x00, 0xe0, 0xfe, 0, 0, 0, 0, 0x41, 0, 0, 0, 0, 0, 0, 0
        ]
    );
    assert_eq!(d.counters().bad_accesses, 0);
    // Bad widths, misaligned, between table and PBA, PBA writes: ignored and counted.
    let mut b2 = [0u8; 2];
    d.region_read(REGION_BAR2, 0, &mut b2).unwrap();
    let mut b4 = [0xffu8; 4];
    d.region_read(REGION_BAR2, 2, &mut b4).unwrap();
    assert_eq!(b4, [0; 4]);
    d.region_read(REGION_BAR2, 0x800, &mut b4).unwrap();
    w(&mut d, 0x1000, &[0xff; 8]);
    w(&mut d, 1, &[0xff; 4]);
    let mut b16 = [0u8; 16];
    d.region_read(REGION_BAR2, 0, &mut b16).unwrap();
    assert_eq!(d.counters().bad_accesses, 6);
    assert_eq!(pba_word(&mut d), 0);
}

#[test]
fn event_channels_through_bar0_and_mmapped_bar4() {
    let mut d = dev();
    let up1 = bind(&mut d, IRQ_MSIX, IrqAction::Trigger, 1);
    enable_msix(&mut d, false);

    // Map BAR4 through the region's mmap fd, as a client would.
    let info = d.region_info(REGION_BAR4);
    let fd = info.mmap_fd.unwrap().try_clone_to_owned().unwrap();
    let page = SharedMap::new(fd.as_fd(), info.offset, info.size as usize);
    let words = page.words();

    bar0_write(&mut d, REG_EVTCHN_QUERY, 5);
    assert_eq!(bar0(&mut d, REG_EVTCHN_STATUS), EVTCHN_STATUS_CLOSED);
    bar0_write(&mut d, REG_EVTCHN_BIND, 5 | 1 << 16);
    assert_eq!(
        bar0(&mut d, REG_EVTCHN_STATUS),
        EVTCHN_STATUS_BOUND | 1 << 16
    );
    bar0_write(&mut d, REG_EVTCHN_BIND, 70 | 1 << 16);

    bar0_write(&mut d, REG_EVTCHN_SEND, 5);
    assert_eq!(take(&up1), 1);
    assert_eq!(words[PENDING_WORD].load(Ordering::SeqCst), 1 << 5);
    bar0_write(&mut d, REG_EVTCHN_SEND, 70);
    assert_eq!(take(&up1), 0, "upcall already pending");
    assert_eq!(guest_collect(words, 1), vec![5, 70]);

    // The guest masks port 5 in its mapping: a send leaves it pending only.
    words[MASK_WORD].fetch_or(1 << 5, Ordering::SeqCst);
    bar0_write(&mut d, REG_EVTCHN_SEND, 5);
    assert_eq!(take(&up1), 0);
    assert_eq!(words[PENDING_WORD].load(Ordering::SeqCst), 1 << 5);
    // The trapped BAR4 view sees the same memory.
    let mut m = [0u8; 8];
    d.region_read(REGION_BAR4, 0x200, &mut m).unwrap();
    assert_eq!(u64::from_le_bytes(m), 1 << 5);
    // EVTCHN_UNMASK: clears the mask and raises the upcall.
    bar0_write(&mut d, REG_EVTCHN_UNMASK, 5);
    assert_eq!(take(&up1), 1);
    assert_eq!(words[MASK_WORD].load(Ordering::SeqCst), 0);
    assert_eq!(guest_collect(words, 1), vec![5]);

    // Unbind: pending only; close: dropped.
    bar0_write(&mut d, REG_EVTCHN_UNBIND, 5);
    assert_eq!(bar0(&mut d, REG_EVTCHN_STATUS), EVTCHN_STATUS_UNBOUND);
    bar0_write(&mut d, REG_EVTCHN_SEND, 5);
    assert_eq!(take(&up1), 0);
    bar0_write(&mut d, REG_EVTCHN_CLOSE, 5);
    words[PENDING_WORD].store(0, Ordering::SeqCst);
    bar0_write(&mut d, REG_EVTCHN_SEND, 5);
    assert_eq!(words[PENDING_WORD].load(Ordering::SeqCst), 0);
    // Rebinding a pending port raises it.
    bar0_write(&mut d, REG_EVTCHN_BIND, 6 | 1 << 16);
    words[PENDING_WORD].fetch_or(1 << 6, Ordering::SeqCst);
    bar0_write(&mut d, REG_EVTCHN_BIND, 6 | 1 << 16);
    assert_eq!(take(&up1), 1);

    // Host side API.
    assert_eq!(guest_collect(words, 1), vec![6]);
    d.evtchn_send(6).unwrap();
    assert_eq!(take(&up1), 1);

    let c = d.counters();
    assert_eq!(c.evtchn_sends, 6);
    assert_eq!(c.evtchn_dropped, 1);
    assert_eq!(c.evtchn_upcalls, 4);
    assert_eq!(bar0(&mut d, REG_CNT_EVTCHN_SENDS), 6);
    assert_eq!(bar0(&mut d, REG_CNT_EVTCHN_UPCALLS), 4);

    // Bad values: ignored and counted.
    bar0_write(&mut d, REG_EVTCHN_SEND, 1024);
    bar0_write(&mut d, REG_EVTCHN_BIND, 7 | 16 << 16);
    bar0_write(&mut d, REG_EVTCHN_QUERY, 5000);
    bar0_write(&mut d, REG_EVTCHN_UNMASK, u32::MAX);
    assert_eq!(d.counters().bad_accesses, 4);
    // The rejected query left port 5 (closed) selected.
    assert_eq!(bar0(&mut d, REG_EVTCHN_STATUS), EVTCHN_STATUS_CLOSED);
}

#[test]
fn doorbell_ioeventfd_counts() {
    let mut d = dev();
    let io = d.region_io_fds(REGION_BAR0);
    let bell = dup_eventfd(io[0].fd);
    let tok = token_of(&d, io[0].fd.as_raw_fd()).expect("doorbell is polled");
    drop(io);
    bell.write(1).unwrap();
    bell.write(2).unwrap();
    d.handle_fd_event(tok);
    assert_eq!(bar0(&mut d, REG_DOORBELL_COUNT), 3);
    // Spurious: nothing to read.
    d.handle_fd_event(tok);
    bar0_write(&mut d, REG_DOORBELL, 0xdead);
    assert_eq!(bar0(&mut d, REG_DOORBELL_COUNT), 4);
    assert_eq!(d.counters().doorbells, 4);
}

#[test]
fn reset_restores_power_on_state_and_keeps_bindings() {
    let mut d = dev();
    let trig = bind(&mut d, IRQ_INTX, IrqAction::Trigger, 0);
    let unmask = bind(&mut d, IRQ_INTX, IrqAction::Unmask, 0);
    let v1 = bind(&mut d, IRQ_MSIX, IrqAction::Trigger, 1);
    let mut power_on = vec![0u8; 4096];
    d.region_read(REGION_CONFIG, 0, &mut power_on).unwrap();

    cfg_write(&mut d, PCI_COMMAND, 2, 0x0407);
    cfg_write(&mut d, PCI_BAR0, 4, 0xfebf_0000);
    cfg_write(&mut d, PCI_INTERRUPT_LINE, 1, 11);
    enable_msix(&mut d, true);
    bar0_write(&mut d, REG_INTX_ASSERT, 1);
    bar0_write(&mut d, REG_EVTCHN_BIND, 3 | 1 << 16);
    bar0_write(&mut d, REG_EVTCHN_QUERY, 3);
    bar0_write(&mut d, REG_EVTCHN_SEND, 3);
    bar0_write(&mut d, REG_DOORBELL, 0);
    d.region_write(REGION_BAR4, 0x208, &[0xff; 8]).unwrap();
    let before = d.counters();

    d.reset().unwrap();
    let mut now = vec![0u8; 4096];
    d.region_read(REGION_CONFIG, 0, &mut now).unwrap();
    assert_eq!(now, power_on);
    assert_eq!(bar0(&mut d, REG_INTX_STATUS), 0);
    assert_eq!(bar0(&mut d, REG_EVTCHN_STATUS), EVTCHN_STATUS_CLOSED);
    assert!(
        d.evtchn_page()
            .words()
            .iter()
            .all(|w| w.load(Ordering::SeqCst) == 0)
    );
    // Every vector masked again, PBA clear.
    let mut ctrl = [0u8; 4];
    d.region_read(REGION_BAR2, 16 + 12, &mut ctrl).unwrap();
    assert_eq!(u32::from_le_bytes(ctrl), 1);
    assert_eq!(pba_word(&mut d), 0);
    assert_eq!(d.counters(), before, "counters survive a reset");

    // Bindings survive.
    assert!(token_of(&d, unmask.raw).is_some());
    take(&trig);
    bar0_write(&mut d, REG_INTX_ASSERT, 1);
    assert_eq!(take(&trig), 1);
    bar0_write(&mut d, REG_MSIX_UNMASK, 1);
    enable_msix(&mut d, false);
    take(&v1);
    bar0_write(&mut d, REG_MSIX_FIRE, 1);
    assert_eq!(take(&v1), 1);
}

#[test]
fn disconnect_drops_fds_and_keeps_state() {
    let mut d = dev();
    let trig = bind(&mut d, IRQ_INTX, IrqAction::Trigger, 0);
    let unmask = bind(&mut d, IRQ_INTX, IrqAction::Unmask, 0);
    let v1 = bind(&mut d, IRQ_MSIX, IrqAction::Trigger, 1);
    let _err = bind(&mut d, IRQ_ERR, IrqAction::Trigger, 0);
    let req = bind(&mut d, IRQ_REQ, IrqAction::Trigger, 0);
    set(&mut d, IRQ_REQ, IrqAction::Trigger, 0, 1, IrqData::None).unwrap();
    assert_eq!(take(&req), 1);
    cfg_write(&mut d, PCI_COMMAND, 2, 0x0006);
    bar0_write(&mut d, REG_INTX_ASSERT, 1);
    assert_eq!(take(&trig), 1);
    enable_msix(&mut d, false);
    bar0_write(&mut d, REG_EVTCHN_BIND, 9 | 1 << 16);
    let snap = d.snapshot();

    d.client_disconnected();
    assert_eq!(token_of(&d, unmask.raw), None);
    assert_eq!(d.poll_fds().len(), 1, "only the doorbell is left");
    bar0_write(&mut d, REG_MSIX_FIRE, 1);
    set(&mut d, IRQ_REQ, IrqAction::Trigger, 0, 1, IrqData::None).unwrap();
    assert_eq!((take(&v1), take(&req), take(&trig)), (0, 0, 0));
    assert_eq!(d.counters().msix_dropped, 1);
    // Guest-visible state is kept.
    assert_eq!(cfg_read(&mut d, PCI_COMMAND, 2), 0x0006);
    assert_eq!(cfg_read(&mut d, 0x42, 2), 0x800f);
    assert_eq!(cfg_read(&mut d, PCI_STATUS, 2), 0x18);
    bar0_write(&mut d, REG_EVTCHN_QUERY, 9);
    assert_eq!(
        bar0(&mut d, REG_EVTCHN_STATUS),
        EVTCHN_STATUS_BOUND | 1 << 16
    );
    assert_eq!(d.snapshot().msix.entries, snap.msix.entries);
    // A new client binds and gets the still-asserted line at once.
    let trig2 = bind(&mut d, IRQ_INTX, IrqAction::Trigger, 0);
    assert_eq!(take(&trig2), 0, "MSI-X is enabled: INTx suppressed");
    cfg_write(&mut d, 0x43, 1, 0);
    assert_eq!(take(&trig2), 1);
}

#[test]
fn bad_accesses_are_ignored_and_counted() {
    let mut d = dev();
    let mut b2 = [0xffu8; 2];
    d.region_read(REGION_BAR0, 0, &mut b2).unwrap();
    assert_eq!(b2, [0, 0]);
    let mut b8 = [0xffu8; 8];
    d.region_read(REGION_BAR0, 0, &mut b8).unwrap();
    assert_eq!(b8, [0; 8]);
    let mut b4 = [0xffu8; 4];
    d.region_read(REGION_BAR0, 2, &mut b4).unwrap();
    assert_eq!(b4, [0; 4]);
    d.region_read(REGION_BAR0, 0x5c, &mut b4).unwrap();
    d.region_read(REGION_BAR0, 0xffc, &mut b4).unwrap();
    assert_eq!(d.counters().bad_accesses, 5);
    // Write-only registers read 0 and are not bad.
    assert_eq!(bar0(&mut d, REG_MSIX_FIRE), 0);
    assert_eq!(d.counters().bad_accesses, 5);
    // Writes: bad width, misaligned, read-only, undefined, bad vector values.
    d.region_write(REGION_BAR0, REG_INTX_ASSERT, &[1]).unwrap();
    d.region_write(REGION_BAR0, REG_INTX_ASSERT + 1, &[1, 0, 0, 0])
        .unwrap();
    d.region_write(REGION_BAR0, REG_INTX_ASSERT, &[1; 8])
        .unwrap();
    bar0_write(&mut d, REG_MAGIC, 0);
    bar0_write(&mut d, REG_DOORBELL_COUNT, 0);
    bar0_write(&mut d, 0x800, 0);
    bar0_write(&mut d, REG_MSIX_FIRE, 16);
    bar0_write(&mut d, REG_MSIX_MASK, 0x1_0000);
    bar0_write(&mut d, REG_MSIX_UNMASK, u32::MAX);
    assert_eq!(bar0(&mut d, REG_CNT_BAD_ACCESSES), 14);
    assert_eq!(bar0(&mut d, REG_INTX_STATUS), 0);
    assert_eq!(bar0(&mut d, REG_MAGIC), MAGIC);
    // Absent regions and huge offsets: errors or zeros, never a panic.
    for r in [1u32, 3, 5, 6, 8, 9, u32::MAX] {
        assert_eq!(d.region_read(r, 0, &mut b4), Err(libc::EINVAL));
        assert_eq!(d.region_write(r, 0, &b4), Err(libc::EINVAL));
    }
    for r in [0u32, 2, 4, 7] {
        let _ = d.region_read(r, u64::MAX - 1, &mut b4);
        let _ = d.region_write(r, u64::MAX - 1, &b4);
        let _ = d.region_read(r, 1 << 40, &mut b8);
        let _ = d.region_write(r, 4095, &[]);
    }
    // MSI: no vectors; ERR/REQ: trigger only.
    assert!(set(&mut d, IRQ_MSI, IrqAction::Trigger, 0, 0, IrqData::None).is_ok());
    assert_eq!(
        set(&mut d, IRQ_ERR, IrqAction::Mask, 0, 1, IrqData::None),
        Err(libc::EINVAL)
    );
    assert_eq!(
        set(
            &mut d,
            IRQ_MSIX,
            IrqAction::Mask,
            0,
            1,
            IrqData::Eventfds(vec![None])
        ),
        Err(libc::ENOTTY)
    );
    // Unknown poll tokens are ignored.
    d.handle_fd_event(12345);
}

#[test]
fn snapshot_round_trip() {
    let mut d = dev();
    let _v1 = bind(&mut d, IRQ_MSIX, IrqAction::Trigger, 1);
    cfg_write(&mut d, PCI_COMMAND, 2, 0x0406);
    cfg_write(&mut d, PCI_BAR0 + 8, 4, 0xfe00_0000);
    enable_msix(&mut d, true);
    bar0_write(&mut d, REG_MSIX_FIRE, 1);
    bar0_write(&mut d, REG_INTX_ASSERT, 1);
    bar0_write(&mut d, REG_EVTCHN_BIND, 2 | 1 << 16);
    bar0_write(&mut d, REG_EVTCHN_SEND, 2);
    bar0_write(&mut d, REG_EVTCHN_QUERY, 2);
    bar0_write(&mut d, REG_DOORBELL, 1);
    let snap = d.snapshot();
    let json = serde_json::to_string(&snap).unwrap();

    let mut e = dev();
    e.restore(&serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(e.snapshot(), snap);
    let mut a = vec![0u8; 4096];
    let mut b = vec![0u8; 4096];
    d.region_read(REGION_CONFIG, 0, &mut a).unwrap();
    e.region_read(REGION_CONFIG, 0, &mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(
        bar0(&mut e, REG_EVTCHN_STATUS),
        EVTCHN_STATUS_BOUND | 1 << 16
    );
    assert_eq!(pba_word(&mut e), 1 << 1);
    assert_eq!(e.counters(), d.counters());

    let mut other = IrqbridgeDevice::new(DeviceConfig {
        msix_vectors: 8,
        ..Default::default()
    })
    .unwrap();
    let untouched = other.snapshot();
    assert!(other.restore(&snap).is_err());
    assert_eq!(other.snapshot(), untouched);
    let mut broken = snap.clone();
    broken.evtchn.page.pop();
    let mut f = dev();
    let untouched = f.snapshot();
    assert!(f.restore(&broken).is_err());
    assert_eq!(f.snapshot(), untouched);
}

#[test]
fn control_socket_commands() {
    use irqbridge_vfio_user::control::{ControlClient, ControlServer, MAX_REQUEST_LINE};
    use serde_json::{Value, json};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let dir = TempDir::new("ctl");
    let path = dir.join("control.sock");
    let mut d = dev();
    d.attach_control(ControlServer::bind(&path).unwrap());
    let up = bind(&mut d, IRQ_MSIX, IrqAction::Trigger, 1);
    let trig = bind(&mut d, IRQ_INTX, IrqAction::Trigger, 0);

    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let path2 = path.clone();
    let client = std::thread::spawn(move || {
        let mut c = ControlClient::connect(&path2).unwrap();
        let mut replies: Vec<Value> = Vec::new();
        for req in [
            json!({"cmd":"intx_assert"}),
            json!({"cmd":"intx_deassert"}),
            json!({"cmd":"msix_fire","vector":1}),
            json!({"cmd":"msix_fire","vector":16}),
            json!({"cmd":"evtchn_bind","port":4,"vector":1}),
            json!({"cmd":"evtchn_send","port":4}),
            json!({"cmd":"evtchn_send","port":4}),
            json!({"cmd":"evtchn_send","port":99999}),
            json!({"cmd":"bogus"}),
            json!({"cmd":"counters"}),
        ] {
            replies.push(c.request(&req).unwrap());
        }
        // Malformed JSON: an error reply, the connection stays usable.
        c.send_raw(b"{not json").unwrap();
        replies.push(c.read_reply().unwrap());
        // A second client at the same time.
        let mut c2 = ControlClient::connect(&path2).unwrap();
        replies.push(c2.request(&json!({"cmd":"snapshot"})).unwrap());
        replies.push(c.request(&json!({"cmd":"reset"})).unwrap());
        // Over-long line: error reply, then the server closes that client.
        let long = vec![b' '; MAX_REQUEST_LINE + 10];
        c2.send_raw(&long).unwrap();
        replies.push(c2.read_reply().unwrap());
        let closed = c2.read_reply();
        done2.store(true, Ordering::SeqCst);
        (replies, closed.is_err())
    });
    assert!(pump(&mut d, &|| done.load(Ordering::SeqCst)));
    let (r, closed) = client.join().unwrap();
    assert_eq!(r[0], json!({"ok": true, "fired": true}));
    assert_eq!(take(&trig), 1);
    assert_eq!(r[1], json!({"ok": true}));
    // MSI-X is not enabled: the event is pending.
    assert_eq!(r[2], json!({"ok": true, "delivery": "pending"}));
    assert_eq!(r[3]["ok"], false);
    assert!(r[3]["error"].as_str().unwrap().contains("16"), "{}", r[3]);
    assert_eq!(r[4], json!({"ok": true}));
    assert_eq!(r[5], json!({"ok": true, "outcome": "upcall", "vector": 1}));
    assert_eq!(r[6], json!({"ok": true, "outcome": "coalesced"}));
    assert_eq!(r[7]["ok"], false);
    assert_eq!(r[8]["ok"], false);
    assert!(r[8]["error"].as_str().unwrap().contains("bogus"));
    assert_eq!(r[9]["ok"], true);
    assert_eq!(r[9]["counters"]["evtchn_sends"], 2);
    assert_eq!(r[9]["counters"]["msix_pending"], 2);
    assert_eq!(r[9]["counters"]["intx_triggers"], 1);
    assert_eq!(r[10]["ok"], false);
    assert_eq!(r[11]["ok"], true);
    assert_eq!(r[11]["snapshot"]["config"]["msix_vectors"], 16);
    assert_eq!(r[12], json!({"ok": true}));
    assert_eq!(r[13]["ok"], false);
    assert!(closed, "the over-long client was disconnected");
    assert_eq!(take(&up), 0, "MSI-X never enabled");
    bar0_write(&mut d, REG_EVTCHN_QUERY, 4);
    assert_eq!(
        bar0(&mut d, REG_EVTCHN_STATUS),
        EVTCHN_STATUS_CLOSED,
        "reset"
    );
    assert_eq!(d.control().unwrap().path(), Some(path.as_path()));
    drop(d);
    assert!(!path.exists(), "the socket file is removed with the device");
}
