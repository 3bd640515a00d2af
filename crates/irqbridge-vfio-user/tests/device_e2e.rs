// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The irqbridge PCI device end to end: a real `Server` on a unix socket, driven by a raw
//! client built on the crate's `proto` / `conn` modules and by the rust-vmm `vfio_user::Client`.
//!
//! Ordering argument used for "nothing happened" checks: the server polls the device's fds
//! (unmask eventfd, doorbell) before the client socket in each loop iteration, so after we
//! write such an eventfd, the reply to our next request proves the server has handled it.

mod device_util;

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;

use irqbridge_core::evtchn::{MASK_WORD, PENDING_WORD, guest_collect};
use irqbridge_vfio_user::control::ControlClient;
use irqbridge_vfio_user::error::Error;
use irqbridge_vfio_user::pci::DeviceConfig;
use irqbridge_vfio_user::pci::regs::*;
use irqbridge_vfio_user::proto::{
    RegionCap, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
};
use serde_json::json;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use device_util::*;

const TRIGGER_FD: u32 = VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD;
const UNMASK_FD: u32 = VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_DATA_EVENTFD;

/// Waits until the server has read `fd` (its counter is 0 again). The server handles the
/// device's fds on a thread of its own, in parallel with the client's messages; the device
/// reads an fd and acts on it under one lock, so a request sent after this sees the effect.
fn drained(fd: &EventFd) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        if unsafe { libc::poll(&mut p, 1, 0) } == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server never read the eventfd"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn efd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

fn msix_control(c: &mut RawClient, value: u16) {
    c.write(
        REGION_CONFIG,
        MSIX_CAP_OFFSET + MSIX_CAP_CONTROL,
        2,
        u64::from(value),
    );
}

#[test]
fn e2e_identity_regions_sizing_caps() {
    let run = Running::start(DeviceConfig::default(), false);
    let mut c = RawClient::connect(&run.path);
    let info = c.device_info();
    assert_eq!((info.flags, info.num_regions, info.num_irqs), (3, 9, 5));

    for i in 0..9u32 {
        let (r, fds) = c.region_info(i);
        let (flags, size) = match i {
            0 => (3, 4096),
            2 => (3, 8192),
            4 => (7, 4096),
            7 => (3, 4096),
            _ => (0, 0),
        };
        assert_eq!((r.flags & 7, r.size), (flags, size), "region {i}");
        assert_eq!(fds.len(), usize::from(i == 4), "region {i}");
        if i == 4 {
            assert_eq!(
                r.sparse_areas().map(|a| (a.len(), a[0].offset, a[0].size)),
                Some((1, 0, 4096))
            );
            assert!(r.caps.iter().any(|c| matches!(c, RegionCap::SparseMmap(_))));
        }
    }
    let irqs: Vec<_> = (0..5).map(|i| c.irq_info(i)).collect();
    assert_eq!(irqs, vec![(7, 1), (9, 4), (3, 16), (1, 1), (1, 1)]);

    assert_eq!(c.read(REGION_CONFIG, 0, 4), 0x7162_6972);
    assert_eq!(
        c.read(REGION_CONFIG, PCI_SUBSYSTEM_VENDOR_ID, 4),
        0x0001_6972
    );
    assert_eq!(c.read(REGION_CONFIG, PCI_REVISION_ID, 4), 0xff00_0001);
    assert_eq!(c.read(REGION_CONFIG, PCI_INTERRUPT_PIN, 1), 1);
    // Cloud Hypervisor's probe: STATUS, cap pointer, walk.
    assert_ne!(c.read(REGION_CONFIG, PCI_STATUS, 2) & 0x10, 0);
    let cap = c.read(REGION_CONFIG, PCI_CAPABILITY_LIST, 1);
    assert_eq!(cap, 0x40);
    assert_eq!(c.read(REGION_CONFIG, cap, 1), 0x11);
    assert_eq!(c.read(REGION_CONFIG, cap + 1, 1), 0x50);
    assert_eq!(c.read(REGION_CONFIG, 0x50, 2), 0x05);
    assert_eq!(c.read(REGION_CONFIG, 0x52, 2), 0x184);
    assert_eq!(c.read(REGION_CONFIG, cap + 2, 2), 15);
    assert_eq!(c.read(REGION_CONFIG, cap + 4, 4), 2);
    assert_eq!(c.read(REGION_CONFIG, cap + 8, 4), 0x1002);
    // BAR sizing, including the ROM.
    for (i, size) in [4096u64, 0, 8192, 0, 4096, 0].into_iter().enumerate() {
        let off = PCI_BAR0 + 4 * i as u64;
        c.write(REGION_CONFIG, off, 4, 0xffff_ffff);
        let v = c.read(REGION_CONFIG, off, 4);
        let got = if v == 0 {
            0
        } else {
            u64::from((!(v as u32 & !0xf)).wrapping_add(1))
        };
        assert_eq!(got, size, "BAR{i}");
    }
    c.write(REGION_CONFIG, PCI_ROM_ADDRESS, 4, 0xffff_ffff);
    assert_eq!(c.read(REGION_CONFIG, PCI_ROM_ADDRESS, 4), 0);
    // Posted (NO_REPLY) writes are applied in order.
    c.post_write(REGION_CONFIG, PCI_INTERRUPT_LINE, 1, 0x0b);
    c.post_write(REGION_BAR0, REG_DOORBELL, 4, 1);
    assert_eq!(c.read(REGION_CONFIG, PCI_INTERRUPT_LINE, 1), 0x0b);
    assert_eq!(c.read(REGION_BAR0, REG_DOORBELL_COUNT, 4), 1);
    assert_eq!(c.read(REGION_BAR0, REG_MAGIC, 4), u64::from(MAGIC));
}

#[test]
fn e2e_intx_trigger_unmask_and_command_bit_10() {
    let run = Running::start(DeviceConfig::default(), false);
    let mut c = RawClient::connect(&run.path);
    let trig = efd();
    let resample = efd();
    // QEMU's KVM wiring: trigger, MASK, unmask fd, UNMASK.
    c.set_irqs(IRQ_INTX, TRIGGER_FD, 0, 1, &[&trig]).unwrap();
    c.set_irqs(
        IRQ_INTX,
        VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_NONE,
        0,
        1,
        &[],
    )
    .unwrap();
    c.set_irqs(IRQ_INTX, UNMASK_FD, 0, 1, &[&resample]).unwrap();
    c.set_irqs(
        IRQ_INTX,
        VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_DATA_NONE,
        0,
        1,
        &[],
    )
    .unwrap();
    assert_eq!(take(&trig), 0);

    // Assert: one trigger, auto-masked.
    c.write(REGION_BAR0, REG_INTX_ASSERT, 4, 1);
    assert_eq!(wait_count(&trig), 1);
    assert_eq!(c.read(REGION_BAR0, REG_INTX_STATUS, 4), 0b011);
    assert_eq!(c.read(REGION_CONFIG, PCI_STATUS, 2), 0x18);

    // EOI while still asserted: KVM signals the resample fd, the device re-fires.
    resample.write(1).unwrap();
    assert_eq!(wait_count(&trig), 1);
    assert_eq!(c.read(REGION_BAR0, REG_INTX_STATUS, 4), 0b011);

    // Deassert, EOI: quiet and unmasked.
    c.write(REGION_BAR0, REG_INTX_DEASSERT, 4, 1);
    resample.write(1).unwrap();
    drained(&resample);
    assert_eq!(c.read(REGION_BAR0, REG_INTX_STATUS, 4), 0, "barrier");
    assert_eq!(take(&trig), 0);
    assert_eq!(take(&resample), 0, "the server drained the resample fd");

    // COMMAND.10: no interrupt while set; clearing it re-fires a pending line.
    c.write(REGION_CONFIG, PCI_COMMAND, 2, 0x0400);
    c.write(REGION_BAR0, REG_INTX_ASSERT, 4, 1);
    assert_eq!(c.read(REGION_BAR0, REG_INTX_STATUS, 4), 0b111);
    assert_eq!(take(&trig), 0);
    assert_eq!(
        c.read(REGION_CONFIG, PCI_STATUS, 2),
        0x18,
        "STATUS.3 ignores COMMAND.10"
    );
    c.write(REGION_CONFIG, PCI_COMMAND, 2, 0);
    assert_eq!(wait_count(&trig), 1);
    c.write(REGION_BAR0, REG_INTX_DEASSERT, 4, 1);
    resample.write(1).unwrap();
    drained(&resample);
    assert_eq!(c.read(REGION_BAR0, REG_CNT_INTX_TRIGGERS, 4), 3);
    assert_eq!(c.read(REGION_BAR0, REG_CNT_INTX_UNMASKS, 4), 5);
    // Disable the index.
    c.set_irqs(
        IRQ_INTX,
        VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_NONE,
        0,
        0,
        &[],
    )
    .unwrap();
    c.write(REGION_BAR0, REG_INTX_ASSERT, 4, 1);
    assert_eq!(c.read(REGION_BAR0, REG_INTX_STATUS, 4), 0b001);
    assert_eq!(take(&trig), 0);
    let dev = run.finish();
    assert_eq!(dev.counters().bad_accesses, 0);
}

#[test]
fn e2e_msix_mask_pba_unmask_and_function_mask() {
    let run = Running::start(DeviceConfig::default(), false);
    let mut c = RawClient::connect(&run.path);
    let v: Vec<EventFd> = (0..4).map(|_| efd()).collect();
    let refs: Vec<&EventFd> = v.iter().collect();
    c.set_irqs(IRQ_MSIX, TRIGGER_FD, 0, 4, &refs).unwrap();
    msix_control(&mut c, MSIX_CONTROL_ENABLE);
    assert_eq!(c.read(REGION_CONFIG, 0x42, 2), 0x800f);

    c.write(REGION_BAR0, REG_MSIX_FIRE, 4, 2);
    assert_eq!(wait_count(&v[2]), 1);

    // Mask through MSIX_MASK: the event sets the PBA bit, visible through BAR2.
    c.write(REGION_BAR0, REG_MSIX_MASK, 4, 2);
    c.write(REGION_BAR0, REG_MSIX_FIRE, 4, 2);
    assert_eq!(c.read(REGION_BAR2, msix_pba_offset(16), 8), 1 << 2);
    assert_eq!(c.read(REGION_BAR2, 2 * 16 + 12, 4), 1);
    assert_eq!(take(&v[2]), 0);
    c.write(REGION_BAR0, REG_MSIX_UNMASK, 4, 2);
    assert_eq!(c.read(REGION_BAR2, msix_pba_offset(16), 8), 0);
    assert_eq!(take(&v[2]), 1, "exactly one delivery on unmask");

    // Function mask via config.
    msix_control(&mut c, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    c.write(REGION_BAR0, REG_MSIX_FIRE, 4, 0);
    c.write(REGION_BAR0, REG_MSIX_FIRE, 4, 0);
    assert_eq!(c.read(REGION_BAR2, msix_pba_offset(16), 4), 1);
    assert_eq!(take(&v[0]), 0);
    msix_control(&mut c, MSIX_CONTROL_ENABLE);
    assert_eq!(take(&v[0]), 1);

    // VMM per-vector masks with DATA_BOOL, and a loopback trigger.
    c.set_irqs_bool(IRQ_MSIX, VFIO_IRQ_SET_ACTION_MASK, 1, &[true, false]);
    c.write(REGION_BAR0, REG_MSIX_FIRE, 4, 1);
    c.write(REGION_BAR0, REG_MSIX_FIRE, 4, 2);
    assert_eq!((take(&v[1]), take(&v[2])), (0, 1));
    c.set_irqs(
        IRQ_MSIX,
        VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_DATA_NONE,
        1,
        1,
        &[],
    )
    .unwrap();
    assert_eq!(take(&v[1]), 1);
    c.set_irqs(
        IRQ_MSIX,
        VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_NONE,
        3,
        1,
        &[],
    )
    .unwrap();
    assert_eq!(take(&v[3]), 1);

    // Table through BAR2.
    c.write(REGION_BAR2, 16 * 3, 8, 0x0000_0000_fee0_0000);
    c.write(REGION_BAR2, 16 * 3 + 8, 4, 0x4242);
    assert_eq!(c.read(REGION_BAR2, 16 * 3, 8), 0xfee0_0000);
    assert_eq!(c.read(REGION_BAR2, 16 * 3 + 8, 4), 0x4242);

    // Disable the MSI-X index: the notifiers are dropped, events are lost.
    c.set_irqs(
        IRQ_MSIX,
        VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_NONE,
        0,
        0,
        &[],
    )
    .unwrap();
    c.write(REGION_BAR0, REG_MSIX_FIRE, 4, 0);
    assert_eq!(take(&v[0]), 0);
    let dev = run.finish();
    let cnt = dev.counters();
    assert_eq!(
        (cnt.msix_triggers, cnt.msix_pending, cnt.msix_dropped),
        (6, 4, 1)
    );
}

#[test]
fn e2e_event_channels_through_mmapped_bar4() {
    let run = Running::start(DeviceConfig::default(), false);
    let mut c = RawClient::connect(&run.path);
    let up = efd();
    c.set_irqs(IRQ_MSIX, TRIGGER_FD, 0, 1, &[&up]).unwrap();
    msix_control(&mut c, MSIX_CONTROL_ENABLE);
    let (info, mut fds) = c.region_info(REGION_BAR4);
    let area = info.sparse_areas().unwrap()[0];
    let fd = fds.pop().unwrap();
    let map = SharedMap::new(fd.as_fd(), info.offset + area.offset, area.size as usize);
    let w = map.words();

    c.write(REGION_BAR0, REG_EVTCHN_BIND, 4, 130);
    c.write(REGION_BAR0, REG_EVTCHN_SEND, 4, 130);
    assert_eq!(wait_count(&up), 1);
    assert_eq!(w[PENDING_WORD + 2].load(Ordering::SeqCst), 1 << 2);
    assert_eq!(guest_collect(w, 0), vec![130]);

    // The guest masks the port in its mapping (no exit), the device only sets pending.
    w[MASK_WORD + 2].fetch_or(1 << 2, Ordering::SeqCst);
    c.write(REGION_BAR0, REG_EVTCHN_SEND, 4, 130);
    assert_eq!(take(&up), 0);
    assert_eq!(w[PENDING_WORD + 2].load(Ordering::SeqCst), 1 << 2);
    // EVTCHN_UNMASK register: clears the mask and raises the upcall once.
    c.write(REGION_BAR0, REG_EVTCHN_UNMASK, 4, 130);
    assert_eq!(take(&up), 1);
    assert_eq!(w[MASK_WORD + 2].load(Ordering::SeqCst), 0);
    assert_eq!(guest_collect(w, 0), vec![130]);
    // The trapped view of BAR4 is the same memory.
    w[MASK_WORD].store(0xabcd, Ordering::SeqCst);
    assert_eq!(c.read(REGION_BAR4, 0x200, 8), 0xabcd);
    c.write(REGION_BAR4, 0x200, 4, 0);
    assert_eq!(w[MASK_WORD].load(Ordering::SeqCst), 0);

    // Reset zeroes the page the guest sees.
    w[PENDING_WORD].store(u64::MAX, Ordering::SeqCst);
    c.reset();
    assert!(w.iter().all(|x| x.load(Ordering::SeqCst) == 0));
    c.write(REGION_BAR0, REG_EVTCHN_QUERY, 4, 130);
    assert_eq!(c.read(REGION_BAR0, REG_EVTCHN_STATUS, 4), 0);
}

#[test]
fn e2e_doorbell_ioeventfd() {
    let run = Running::start(DeviceConfig::default(), false);
    let mut c = RawClient::connect(&run.path);
    let (reply, mut fds) = c.io_fds(REGION_BAR0);
    assert_eq!(reply.entries.len(), 1);
    let e = reply.entries[0];
    assert_eq!((e.offset, e.size, e.kind, e.flags & 1), (0x40, 4, 0, 0));
    assert_eq!(fds.len(), 1);
    let bell = dup_eventfd(fds.remove(e.fd_index as usize).as_fd());
    for _ in 0..5 {
        bell.write(1).unwrap();
    }
    drained(&bell);
    assert_eq!(c.read(REGION_BAR0, REG_DOORBELL_COUNT, 4), 5);
    c.write(REGION_BAR0, REG_DOORBELL, 4, 0);
    assert_eq!(c.read(REGION_BAR0, REG_DOORBELL_COUNT, 4), 6);
    let (none, fds) = c.io_fds(REGION_BAR2);
    assert!(none.entries.is_empty() && fds.is_empty());
}

#[test]
fn e2e_reset_then_reconnect_keeps_state() {
    let run = Running::start(DeviceConfig::default(), false);
    let old = efd();
    let old_unmask = efd();
    {
        let mut c = RawClient::connect(&run.path);
        c.set_irqs(IRQ_MSIX, TRIGGER_FD, 5, 1, &[&old]).unwrap();
        c.set_irqs(IRQ_INTX, UNMASK_FD, 0, 1, &[&old_unmask])
            .unwrap();
        c.write(REGION_CONFIG, PCI_COMMAND, 2, 0x0406);
        msix_control(&mut c, MSIX_CONTROL_ENABLE);
        c.reset();
        assert_eq!(c.read(REGION_CONFIG, PCI_COMMAND, 2), 0);
        assert_eq!(c.read(REGION_CONFIG, 0x42, 2), 0x000f);
        // Bindings survive the reset.
        msix_control(&mut c, MSIX_CONTROL_ENABLE);
        c.write(REGION_BAR0, REG_MSIX_UNMASK, 4, 5);
        c.write(REGION_BAR0, REG_MSIX_FIRE, 4, 5);
        assert_eq!(wait_count(&old), 1);
        c.write(REGION_CONFIG, PCI_COMMAND, 2, 0x0006);
        c.write(REGION_BAR0, REG_EVTCHN_BIND, 4, 9);
    }
    // A new client: device state is still there, the old client's eventfds are gone.
    let mut c = RawClient::connect(&run.path);
    assert_eq!(c.read(REGION_CONFIG, PCI_COMMAND, 2), 6);
    assert_eq!(c.read(REGION_CONFIG, 0x42, 2), 0x800f);
    c.write(REGION_BAR0, REG_EVTCHN_QUERY, 4, 9);
    assert_eq!(c.read(REGION_BAR0, REG_EVTCHN_STATUS, 4), 2);
    c.write(REGION_BAR0, REG_MSIX_FIRE, 4, 5);
    old_unmask.write(1).unwrap();
    assert_eq!(c.read(REGION_BAR0, REG_MAGIC, 4), u64::from(MAGIC));
    assert_eq!(take(&old), 0);
    let dev = run.finish();
    assert_eq!(dev.counters().msix_dropped, 1);
}

#[test]
fn e2e_malformed_accesses_keep_the_session() {
    let run = Running::start(DeviceConfig::default(), false);
    let mut c = RawClient::connect(&run.path);
    // Odd widths and offsets: answered, ignored, counted.
    c.write(REGION_BAR0, REG_INTX_ASSERT, 2, 1);
    c.write(REGION_BAR0, REG_INTX_ASSERT + 1, 4, 1);
    assert_eq!(c.read(REGION_BAR0, REG_MAGIC + 2, 2), 0);
    assert_eq!(c.read(REGION_BAR0, 0x0ff0, 4), 0);
    c.write(REGION_BAR0, REG_MSIX_FIRE, 4, 0xffff);
    c.write(REGION_BAR2, 3, 4, 0xffff_ffff);
    c.write(REGION_BAR2, msix_pba_offset(16), 8, u64::MAX);
    c.write(REGION_CONFIG, 0xfff, 1, 0xff);
    c.write(REGION_CONFIG, 0x3e, 4, 0xffff_ffff);
    let _ = c.try_read(REGION_CONFIG, 0x0ffd, 3).unwrap();
    assert_eq!(c.read(REGION_BAR0, REG_CNT_BAD_ACCESSES, 4), 7);
    // Outside a region or in an absent one: an error reply from the server, session intact.
    for (region, off) in [(REGION_BAR0, 4096u64), (1, 0), (REGION_ROM, 0), (9, 0)] {
        match c.try_read(region, off, 4) {
            Err(Error::Peer { errno, .. }) => assert_ne!(errno, 0),
            other => panic!("region {region}: {other:?}"),
        }
    }
    assert!(c.try_write(REGION_CONFIG, 4094, &[0; 4]).is_err());
    assert_eq!(c.read(REGION_BAR0, REG_MAGIC, 4), u64::from(MAGIC));
    assert_eq!(c.read(REGION_BAR0, REG_INTX_STATUS, 4), 0);
}

#[test]
fn e2e_control_socket() {
    let run = Running::start(DeviceConfig::default(), true);
    let mut c = RawClient::connect(&run.path);
    let trig = efd();
    let v1 = efd();
    c.set_irqs(IRQ_INTX, TRIGGER_FD, 0, 1, &[&trig]).unwrap();
    c.set_irqs(IRQ_MSIX, TRIGGER_FD, 1, 1, &[&v1]).unwrap();

    let ctl_path = run.control_path.clone().unwrap();
    let mode = std::fs::metadata(&ctl_path).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let mut ctl = ControlClient::connect(&ctl_path).unwrap();
    assert_eq!(
        ctl.request(&json!({"cmd":"intx_assert"})).unwrap(),
        json!({"ok": true, "fired": true})
    );
    assert_eq!(take(&trig), 1);
    assert_eq!(c.read(REGION_BAR0, REG_INTX_STATUS, 4), 0b011);
    ctl.request(&json!({"cmd":"intx_deassert"})).unwrap();
    assert_eq!(c.read(REGION_BAR0, REG_INTX_STATUS, 4), 0b010);

    msix_control(&mut c, MSIX_CONTROL_ENABLE);
    assert_eq!(
        ctl.request(&json!({"cmd":"msix_fire","vector":1})).unwrap(),
        json!({"ok": true, "delivery": "sent"})
    );
    assert_eq!(take(&v1), 1);
    ctl.request(&json!({"cmd":"evtchn_bind","port":1000,"vector":1}))
        .unwrap();
    assert_eq!(
        ctl.request(&json!({"cmd":"evtchn_send","port":1000}))
            .unwrap(),
        json!({"ok": true, "outcome": "upcall", "vector": 1})
    );
    assert_eq!(take(&v1), 1);
    let counters = ctl.request(&json!({"cmd":"counters"})).unwrap();
    assert_eq!(counters["counters"]["msix_triggers"], 2);
    assert_eq!(counters["counters"]["evtchn_upcalls"], 1);
    let snap = ctl.request(&json!({"cmd":"snapshot"})).unwrap();
    assert_eq!(
        snap["snapshot"]["config_space"].as_array().unwrap().len(),
        4096
    );
    assert_eq!(snap["snapshot"]["msix"]["enabled"], true);
    // Bad input keeps the connection usable.
    ctl.send_raw(b"]]]").unwrap();
    assert_eq!(ctl.read_reply().unwrap()["ok"], false);
    assert_eq!(
        ctl.request(&json!({"cmd":"msix_fire","vector":70000}))
            .unwrap()["ok"],
        false
    );
    assert_eq!(
        ctl.request(&json!({"cmd":"reset"})).unwrap(),
        json!({"ok": true})
    );
    assert_eq!(c.read(REGION_CONFIG, 0x42, 2), 0x000f);
    drop(ctl);
    drop(c);
    let dev = run.finish();
    drop(dev);
    assert!(!ctl_path.exists());
}

#[test]
fn e2e_rust_vmm_vfio_user_client() {
    use vfio_bindings::bindings::vfio::{
        VFIO_IRQ_SET_ACTION_TRIGGER as TRIG, VFIO_IRQ_SET_DATA_EVENTFD as EFD,
    };
    let run = Running::start(DeviceConfig::default(), false);
    let path = run.path.clone();
    let (pba, fired, ev, page_ok) = with_timeout(move || {
        let mut client = vfio_user::Client::new(&path).unwrap();
        // Cloud Hypervisor maps BAR4 through the region's file offset.
        let r4 = client.region(4).unwrap();
        assert_eq!(r4.size, 4096);
        assert_eq!(r4.sparse_areas.len(), 1);
        let fo = r4.file_offset.as_ref().expect("BAR4 carries an mmap fd");
        let map = SharedMap::new(fo.file().as_fd(), fo.start(), 4096);
        let info = client.get_irq_info(2).unwrap();
        assert_eq!((info.flags, info.count), (3, 16));
        let mut b = [0u8; 4];
        client.region_read(7, 0, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x7162_6972);

        let v0 = efd();
        client
            .set_irqs(2, TRIG | EFD, 0, 1, &[v0.as_raw_fd()])
            .unwrap();
        client
            .region_write(7, 0x42, &MSIX_CONTROL_ENABLE.to_le_bytes())
            .unwrap();
        client
            .region_write(0, REG_EVTCHN_BIND, &7u32.to_le_bytes())
            .unwrap();
        client
            .region_write(0, REG_EVTCHN_SEND, &7u32.to_le_bytes())
            .unwrap();
        let fired = wait_count(&v0);
        let page_ok = map.words()[PENDING_WORD].load(Ordering::SeqCst) == 1 << 7;
        client
            .region_write(0, REG_MSIX_MASK, &0u32.to_le_bytes())
            .unwrap();
        client
            .region_write(0, REG_MSIX_FIRE, &0u32.to_le_bytes())
            .unwrap();
        let mut pba = [0u8; 8];
        client.region_read(2, 0x1000, &mut pba).unwrap();
        let mut ev = [0u8; 4];
        client
            .region_read(0, REG_CNT_EVTCHN_UPCALLS, &mut ev)
            .unwrap();
        client.shutdown().unwrap();
        (
            u64::from_le_bytes(pba),
            fired,
            u32::from_le_bytes(ev),
            page_ok,
        )
    });
    assert_eq!(fired, 1);
    assert!(page_ok);
    assert_eq!(pba, 1);
    assert_eq!(ev, 1);
}
