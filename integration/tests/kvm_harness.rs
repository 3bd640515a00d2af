// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The test VMM and the guest agent on a real `/dev/kvm`, with plain KVM irqfds, resample fds
//! and ioeventfds (no device yet). Each test skips with `SKIPPED:` on stderr without KVM.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use irqbridge_integration::layout::{DEVICE_MMIO_GPA, FREE_RAM_GPA, STACK_TOP, evtchn};
use irqbridge_integration::{
    Action, Error, GsiRoutes, Guest, GuestMemory, MmapRegion, MmioHandler, MsiMessage, TestVm,
    VcpuStatus, VmOptions, kvm_unavailable_reason,
};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const WAIT: Duration = Duration::from_secs(5);

fn guest() -> Option<Guest> {
    if let Some(reason) = kvm_unavailable_reason() {
        eprintln!("SKIPPED: /dev/kvm not available ({reason})");
        return None;
    }
    match Guest::new() {
        Ok(g) => Some(g),
        Err(e) => panic!("cannot boot the guest agent: {e}"),
    }
}

/// Waits until `fd` is readable (poll(2) with a deadline) and reads its counter.
fn read_eventfd(fd: &EventFd, timeout: Duration) -> Option<u64> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n != 1 {
        return None;
    }
    fd.read().ok()
}

#[test]
fn boots_and_answers_commands() {
    let Some(mut g) = guest() else { return };
    g.nop().unwrap();
    g.enable_lapic().unwrap();
    // Reads and writes of guest RAM through the agent, checked from the host side.
    let gpa = FREE_RAM_GPA + 0x100;
    g.mmio_write64(gpa, 0x0123_4567_89ab_cdef).unwrap();
    assert_eq!(g.memory().load_u64(gpa).unwrap(), 0x0123_4567_89ab_cdef);
    assert_eq!(g.mmio_read32(gpa + 4).unwrap(), 0x0123_4567);
    g.memory().store_u64(gpa, 42).unwrap();
    assert_eq!(g.mmio_read64(gpa).unwrap(), 42);
    // Unknown commands are rejected, and the agent keeps serving.
    assert!(matches!(
        g.command(0x99, [0; 4]),
        Err(Error::Command {
            cmd: 0x99,
            status: 1
        })
    ));
    g.nop().unwrap();
    // Doorbells wake the agent; one that arrives while the previous one is still pending in
    // the LAPIC (the agent found the command before halting) coalesces with it.
    let doorbells = g.count(0xf0);
    assert!(
        (1..=8).contains(&doorbells),
        "doorbells counted: {doorbells}"
    );
    assert_eq!(g.stop(), VcpuStatus::Exited);
    assert!(matches!(g.nop(), Err(Error::VcpuStopped(_))));
}

#[test]
fn msi_irqfd_delivers_exactly_once_per_write() {
    let Some(g) = guest() else { return };
    let mut routes = GsiRoutes::with_irqchip();
    routes.add_msi(24, MsiMessage::fixed(0x40)).unwrap();
    routes.apply(g.vm().vm_fd()).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    g.vm().vm_fd().register_irqfd(&irq, 24).unwrap();

    const K: u64 = 200;
    for i in 1..=K {
        irq.write(1).unwrap();
        assert_eq!(g.wait_count(0x40, i, WAIT).unwrap(), i, "write {i}");
    }
    // A command round trip orders the check after anything still in flight.
    g.nop().unwrap();
    assert_eq!(g.count(0x40), K);
    assert_eq!(g.action_hits(0x40), K);
    assert_eq!(g.count(0x41), 0);
    g.vm().vm_fd().unregister_irqfd(&irq, 24).unwrap();
}

#[test]
fn intx_level_with_resample_fires_once_per_trigger() {
    let Some(g) = guest() else { return };
    // Re-installing the legacy routes must keep IOAPIC pin 5 working.
    GsiRoutes::with_irqchip().apply(g.vm().vm_fd()).unwrap();
    g.ioapic_route(5, 0x50, true).unwrap();
    let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    g.vm()
        .vm_fd()
        .register_irqfd_with_resample(&trigger, &resample, 5)
        .unwrap();

    const ROUNDS: u64 = 100;
    for round in 1..=ROUNDS {
        trigger.write(1).unwrap();
        assert_eq!(g.wait_count(0x50, round, WAIT).unwrap(), round);
        // The handler's EOI de-asserts the line and signals the resample fd once.
        assert_eq!(read_eventfd(&resample, WAIT), Some(1), "round {round}");
    }
    g.nop().unwrap();
    assert_eq!(g.count(0x50), ROUNDS);
    assert_eq!(resample.read().ok(), None, "no extra resample");
}

#[derive(Default)]
struct Recorder {
    writes: Mutex<Vec<(u64, Vec<u8>)>>,
    reads: Mutex<Vec<(u64, usize)>>,
}

impl MmioHandler for Recorder {
    fn read(&self, gpa: u64, data: &mut [u8]) {
        self.reads.lock().unwrap().push((gpa, data.len()));
        // Distinct bytes derived from the address: 0xa0 + low nibble of gpa + index.
        for (i, b) in data.iter_mut().enumerate() {
            *b = 0xa0 + ((gpa as u8) & 0xf) + i as u8;
        }
    }
    fn write(&self, gpa: u64, data: &[u8]) {
        self.writes.lock().unwrap().push((gpa, data.to_vec()));
    }
}

#[test]
fn intx_handler_writes_deassert_register_from_the_nth_interrupt() {
    let Some(g) = guest() else { return };
    let dev = Arc::new(Recorder::default());
    let bar = DEVICE_MMIO_GPA + 0x10_0000;
    g.vm().add_mmio(bar, 0x1000, dev.clone()).unwrap();
    g.set_action(
        0x51,
        Action::eoi().with_mmio_write_after(3, bar + 0x14, 0xd1),
    )
    .unwrap();
    g.ioapic_route(6, 0x51, true).unwrap();
    let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    g.vm()
        .vm_fd()
        .register_irqfd_with_resample(&trigger, &resample, 6)
        .unwrap();
    for round in 1..=4u64 {
        trigger.write(1).unwrap();
        g.wait_count(0x51, round, WAIT).unwrap();
        assert_eq!(read_eventfd(&resample, WAIT), Some(1));
        let expected = round.saturating_sub(2) as usize;
        assert_eq!(dev.writes.lock().unwrap().len(), expected, "round {round}");
    }
    let writes = dev.writes.lock().unwrap();
    assert!(
        writes
            .iter()
            .all(|w| *w == (bar + 0x14, 0xd1u32.to_le_bytes().to_vec()))
    );
}

#[test]
fn ioeventfd_counts_guest_writes_without_exits() {
    let Some(g) = guest() else { return };
    let doorbell = DEVICE_MMIO_GPA + 0x40;
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    g.vm()
        .vm_fd()
        .register_ioevent(&efd, &IoEventAddress::Mmio(doorbell), 1u32)
        .unwrap();
    let before = g.vm().exit_stats();
    g.mmio_write32_repeat(doorbell, 1, 1000).unwrap();
    assert_eq!(read_eventfd(&efd, WAIT), Some(1000));
    assert_eq!(g.vm().exit_stats().mmio_writes, before.mmio_writes);
    // A value that does not match the datamatch exits to the VMM (unhandled: dropped).
    g.mmio_write32(doorbell, 2).unwrap();
    let after = g.vm().exit_stats();
    assert_eq!(after.mmio_writes, before.mmio_writes + 1);
    assert_eq!(
        after.unhandled_mmio_writes,
        before.unhandled_mmio_writes + 1
    );
    assert_eq!(efd.read().ok(), None);
}

#[test]
fn mmio_exits_reach_the_registered_handler() {
    let Some(g) = guest() else { return };
    let dev = Arc::new(Recorder::default());
    let base = DEVICE_MMIO_GPA + 0x1000;
    g.vm().add_mmio(base, 0x1000, dev.clone()).unwrap();
    assert!(matches!(
        g.vm().add_mmio(base + 0xff0, 0x20, dev.clone()),
        Err(Error::MmioOverlap { .. })
    ));

    g.mmio_write32(base + 0x10, 0xcafe_f00d).unwrap();
    g.mmio_write64(base + 0x28, 0x1122_3344_5566_7788).unwrap();
    assert_eq!(g.mmio_read32(base + 0x34).unwrap(), 0xa7a6_a5a4);
    assert_eq!(g.mmio_read64(base + 0x8).unwrap(), 0xafae_adac_abaa_a9a8);
    assert_eq!(
        *dev.writes.lock().unwrap(),
        vec![
            (base + 0x10, 0xcafe_f00du32.to_le_bytes().to_vec()),
            (base + 0x28, 0x1122_3344_5566_7788u64.to_le_bytes().to_vec()),
        ]
    );
    assert_eq!(
        *dev.reads.lock().unwrap(),
        vec![(base + 0x34, 4), (base + 0x8, 8)]
    );

    // Outside every range: reads are all-ones, writes dropped, both counted.
    let before = g.vm().exit_stats();
    assert_eq!(g.mmio_read32(base + 0x1000).unwrap(), 0xffff_ffff);
    g.mmio_write32(base + 0x1000, 5).unwrap();
    let after = g.vm().exit_stats();
    assert_eq!(after.unhandled_mmio_reads, before.unhandled_mmio_reads + 1);
    assert_eq!(
        after.unhandled_mmio_writes,
        before.unhandled_mmio_writes + 1
    );
    assert_eq!(dev.writes.lock().unwrap().len(), 2);
}

#[test]
fn evtchn_collect_consumes_pending_ports() {
    let Some(g) = guest() else { return };
    let mem = g.memory();
    let page = FREE_RAM_GPA + 0x10_0000;
    let upcall: u8 = 3;
    let block = page + evtchn::UPCALL_OFFSET + u64::from(upcall) * evtchn::UPCALL_STRIDE;
    let pending = |w: u64| page + evtchn::PENDING_OFFSET + 8 * w;
    let mask = |w: u64| page + evtchn::MASK_OFFSET + 8 * w;

    // Host plays the device: the "send" of docs/device-abi.md for each port.
    let ports = [0u32, 1, 63, 64, 130, 4095];
    let masked_port = 200u32;
    mem.store_u64(mask(u64::from(masked_port / 64)), 1 << (masked_port % 64))
        .unwrap();
    for &p in ports.iter().chain([masked_port].iter()) {
        let (w, b) = (u64::from(p / 64), p % 64);
        mem.atomic_u64(pending(w))
            .unwrap()
            .fetch_or(1 << b, std::sync::atomic::Ordering::SeqCst);
        mem.atomic_u64(block + 8)
            .unwrap()
            .fetch_or(1 << w, std::sync::atomic::Ordering::SeqCst);
    }
    mem.store_u64(block, 1).unwrap();

    g.set_action(0x60, Action::eoi().with_evtchn(page, upcall))
        .unwrap();
    assert!(g.signal_msi(0x60).unwrap());
    assert_eq!(g.wait_count(0x60, 1, WAIT).unwrap(), 1);

    for p in 0..evtchn::MAX_PORTS {
        let expected = u32::from(ports.contains(&p));
        assert_eq!(g.port_count(p).unwrap(), expected, "port {p}");
    }
    assert_eq!(mem.load_u64(block).unwrap(), 0, "upcall_pending cleared");
    assert_eq!(mem.load_u64(block + 8).unwrap(), 0, "selector consumed");
    for w in 0..64 {
        let left = if w == u64::from(masked_port / 64) {
            1 << (masked_port % 64)
        } else {
            0
        };
        assert_eq!(mem.load_u64(pending(w)).unwrap(), left, "pending word {w}");
    }

    // A second upcall with nothing new collects nothing more.
    assert!(g.signal_msi(0x60).unwrap());
    g.wait_count(0x60, 2, WAIT).unwrap();
    assert_eq!(g.port_count(1).unwrap(), 1);
    assert_eq!(g.port_count(masked_port).unwrap(), 0);
    assert!(g.port_count(4096).is_err());
}

#[test]
fn memory_slot_maps_a_host_page_into_the_guest() {
    let Some(g) = guest() else { return };
    // A memfd page standing in for an mmap-able device BAR; `shadow` is the host's view.
    let bar = DEVICE_MMIO_GPA + 0x20_0000;
    let shadow = GuestMemory::new(bar, 0x1000).unwrap();
    let slot = g
        .vm()
        .add_mapped_region(bar, MmapRegion::map_fd(shadow.fd(), 0, 0x1000).unwrap())
        .unwrap();
    let before = g.vm().exit_stats();
    g.mmio_write32(bar + 0x10, 0x1234_5678).unwrap();
    assert_eq!(shadow.load_u32(bar + 0x10).unwrap(), 0x1234_5678);
    shadow.store_u64(bar + 0x18, 0xfeed).unwrap();
    assert_eq!(g.mmio_read64(bar + 0x18).unwrap(), 0xfeed);
    assert_eq!(g.vm().exit_stats().mmio_writes, before.mmio_writes);
    assert_eq!(g.vm().exit_stats().mmio_reads, before.mmio_reads);

    // Event-channel collection on that page works like on RAM.
    shadow
        .store_u64(bar + evtchn::PENDING_OFFSET + 8, 1 << 5)
        .unwrap(); // port 69
    shadow
        .store_u64(bar + evtchn::UPCALL_OFFSET + 8, 1 << 1)
        .unwrap();
    shadow.store_u64(bar + evtchn::UPCALL_OFFSET, 1).unwrap();
    g.set_action(0x61, Action::eoi().with_evtchn(bar, 0))
        .unwrap();
    g.signal_msi(0x61).unwrap();
    g.wait_count(0x61, 1, WAIT).unwrap();
    assert_eq!(g.port_count(69).unwrap(), 1);
    assert_eq!(
        shadow.load_u64(bar + evtchn::PENDING_OFFSET + 8).unwrap(),
        0
    );

    // Overlaps are refused; after removal the range is MMIO again.
    assert!(
        g.vm()
            .add_mapped_region(bar, MmapRegion::anonymous(0x1000).unwrap())
            .is_err()
    );
    assert!(
        g.vm()
            .add_mapped_region(0x1000, MmapRegion::anonymous(0x1000).unwrap())
            .is_err()
    );
    g.vm().remove_memory_slot(slot).unwrap();
    assert_eq!(g.mmio_read32(bar + 0x10).unwrap(), 0xffff_ffff);
    assert!(g.vm().remove_memory_slot(slot).is_err());
}

#[test]
fn irq_mode_off_holds_interrupts_until_reenabled() {
    let Some(g) = guest() else { return };
    g.set_interrupts_enabled(false).unwrap();
    assert!(g.signal_msi(0x70).unwrap());
    // Commands still run (the agent polls the mailbox with IF clear).
    g.nop().unwrap();
    g.nop().unwrap();
    assert_eq!(g.count(0x70), 0, "delivered while interrupts were disabled");
    g.set_interrupts_enabled(true).unwrap();
    assert_eq!(g.wait_count(0x70, 1, WAIT).unwrap(), 1);
}

#[test]
fn guest_exceptions_are_reported() {
    let Some(g) = guest() else { return };
    // Above the 4 GiB identity map: page fault with CR2 = the address.
    let err = g.mmio_read32(0x1_0000_0000).unwrap_err();
    match err {
        Error::GuestFault { vector, cr2, .. } => assert_eq!((vector, cr2), (14, 0x1_0000_0000)),
        other => panic!("expected a guest fault, got {other}"),
    }
    assert_eq!(g.vm().status(), VcpuStatus::Faulted);
    assert!(g.fault().is_some());
    assert!(matches!(g.nop(), Err(Error::GuestFault { vector: 14, .. })));
}

fn stop_spinning_vm(code: &[u8]) {
    if let Some(reason) = kvm_unavailable_reason() {
        eprintln!("SKIPPED: /dev/kvm not available ({reason})");
        return;
    }
    let mut vm = TestVm::new(&VmOptions::default()).unwrap();
    // movb $1, FREE_RAM_GPA + 0x100 (so the host knows the guest runs), then `code`.
    let flag = FREE_RAM_GPA + 0x100;
    let mut image = vec![0xc6, 0x04, 0x25];
    image.extend_from_slice(&(flag as u32).to_le_bytes());
    image.push(1);
    image.extend_from_slice(code);
    vm.memory().write_slice(FREE_RAM_GPA, &image).unwrap();
    vm.start(FREE_RAM_GPA, STACK_TOP).unwrap();
    assert!(matches!(
        vm.start(FREE_RAM_GPA, STACK_TOP),
        Err(Error::VcpuState(_))
    ));
    let deadline = Instant::now() + WAIT;
    while vm.memory().load_u32(flag).unwrap() != 1 {
        assert!(Instant::now() < deadline, "guest never ran");
        std::thread::yield_now();
    }
    assert_eq!(vm.status(), VcpuStatus::Running);
    let t = Instant::now();
    assert_eq!(vm.stop(), VcpuStatus::Stopped);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(vm.exit_stats().interrupted >= 1);
    drop(vm);
}

#[test]
fn stop_kicks_a_spinning_vcpu() {
    stop_spinning_vm(&[0xeb, 0xfe]); // jmp .
}

#[test]
fn stop_kicks_a_halted_vcpu() {
    stop_spinning_vm(&[0xfa, 0xf4, 0xeb, 0xfc]); // cli; hlt; jmp .-2
}
