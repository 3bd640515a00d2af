// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user end to end: the irqbridge vhost-user backend (in process), two bare-metal guests
//! in two KVM VMs of this process, each attached with `irqbridge_kvm::vhost`. The guests drive
//! the virtqueues with plain stores and notify writes that KVM turns into kick eventfd
//! signals (no exit); upcalls come back as MSIs from the call irqfds, and the agent's
//! event-channel handler counts the ports it collects. Every count is exact.

use irqbridge_core::SendOutcome;
use irqbridge_integration::vhost_rig::{
    CONTROL_VECTOR, VhostGuest, VhostRig, VhostRigOptions, event_vector,
};
use irqbridge_integration::{Error, ExitStats, kvm_unavailable_reason};
use irqbridge_vhost_user::abi::{PORT_BOUND, PORT_F_LINKED, PORT_UPCALL_SHIFT, Status};
use irqbridge_vhost_user::{ConnCounters, ConnId};

/// Doorbells VM A rings for VM B.
const K: u32 = 24;

fn explain(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        msg.push_str(&format!(": {cause}"));
        src = cause.source();
    }
    msg
}

fn ok(what: &str, r: Result<irqbridge_vhost_user::abi::Reply, Error>) -> u32 {
    let reply = r.unwrap_or_else(|e| panic!("{what}: {}", explain(&e)));
    assert_eq!(reply.status(), Some(Status::Ok), "{what}: {reply:?}");
    reply.value
}

fn check<T>(what: &str, r: Result<T, Error>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {}", explain(&e)))
}

/// A guest round trip: an upcall in flight when it returns has had the time of one command to
/// arrive (used before "nothing more came" checks, together with the backend's counters).
fn settle(vm: &VhostGuest) {
    check("nop", vm.guest().nop());
}

fn mmio_exits(s: &ExitStats) -> (u64, u64) {
    (s.mmio_reads, s.mmio_writes)
}

#[test]
fn two_guests_drive_the_vhost_user_device_without_exits() {
    if let Some(reason) = kvm_unavailable_reason() {
        eprintln!("SKIPPED: /dev/kvm not available ({reason})");
        return;
    }
    let rig = check(
        "building the vhost rig",
        VhostRig::new(VhostRigOptions::default()),
    );
    let be = rig.backend();
    let (a, b) = (check("VM A", rig.vm(0)), check("VM B", rig.vm(1)));
    let (ca, cb) = (a.conn(), b.conn());
    assert_eq!((ca, cb), (ConnId(0), ConnId(1)));
    for vm in [a, b] {
        assert_eq!(
            mmio_exits(&vm.exit_stats()),
            (0, 0),
            "boot makes no MMIO exits"
        );
        let info = vm.attachment().queue_infos();
        assert_eq!(info.len(), 4, "control, doorbell, 2 event queues");
        assert!(info.iter().all(|q| q.ioeventfd && q.started));
    }

    // Set-up by the guests: REGISTER_PAGE, BIND.
    const PA: u32 = 3; // A, upcall 0, linked to B's PB below
    const PX: u32 = 7; // A, upcall 1, events from the backend API
    const PB: u32 = 9; // B, upcall 1
    ok("A REGISTER_PAGE", a.register_page());
    ok("B REGISTER_PAGE", b.register_page());
    ok("A BIND PA", a.bind(PA, 0));
    ok("A BIND PX", a.bind(PX, 1));
    ok("B BIND PB", b.bind(PB, 1));
    assert_eq!(
        ok("A STATUS PX", a.status(PX)),
        PORT_BOUND | 1 << PORT_UPCALL_SHIFT
    );
    let mut a_requests = 4;
    let b_requests = 2;
    assert_eq!(a.control_interrupts(), a_requests);
    assert_eq!(b.control_interrupts(), b_requests);
    assert_eq!(check("page", be.page_gpa(ca).map_err(io)), Some(a_page()));

    // 1. An event from the backend API: exactly one upcall, port_count 1.
    assert_eq!(
        check("send", be.send(ca, PX).map_err(io)),
        SendOutcome::Upcall { vector: 1 }
    );
    assert_eq!(check("A upcall 1", a.wait_upcalls(1, 1)), 1);
    settle(a);
    assert_eq!(a.upcalls(1), 1);
    assert_eq!(a.upcalls(0), 0);
    assert_eq!(check("port count", a.port_count(PX)), 1);
    let c = counters(&rig, ca);
    assert_eq!((c.records, c.signals, c.deferred), (1, 1, 0));

    // 2. The guest masks PX in its page (plain stores): a send stays pending, no upcall.
    let before = a.exit_stats();
    check("mask PX", a.set_port_masked(PX, true));
    assert_eq!(
        mmio_exits(&a.exit_stats()),
        mmio_exits(&before),
        "masking is memory"
    );
    assert_eq!(
        check("send masked", be.send(ca, PX).map_err(io)),
        SendOutcome::Masked
    );
    assert!(check("pending", be.is_pending(ca, PX).map_err(io)));
    settle(a);
    assert_eq!(a.upcalls(1), 1, "no upcall while masked");
    assert_eq!(check("port count", a.port_count(PX)), 1);
    assert_eq!(counters(&rig, ca).signals, 1);

    // 3. UNMASK control request: exactly one upcall, the event is collected.
    ok("A UNMASK PX", a.unmask(PX));
    a_requests += 1;
    assert_eq!(check("A upcall 1", a.wait_upcalls(1, 2)), 2);
    settle(a);
    assert_eq!(a.upcalls(1), 2);
    assert_eq!(check("port count", a.port_count(PX)), 2);
    assert!(!check("mask bit", a.port_masked(PX)), "UNMASK cleared it");
    assert!(!check("pending", be.is_pending(ca, PX).map_err(io)));
    let c = counters(&rig, ca);
    assert_eq!((c.records, c.signals), (2, 2));

    // 4. Interdomain: A's doorbells on PA are events on B's PB, one at a time.
    check(
        "link",
        be.connect_interdomain((ca, PA), (cb, PB)).map_err(io),
    );
    assert_ne!(ok("A STATUS PA", a.status(PA)) & PORT_F_LINKED, 0);
    a_requests += 1;
    let a_exits = a.exit_stats();
    let b_exits = b.exit_stats();
    for i in 1..=K {
        check("doorbell", a.doorbell(PA));
        let seen = check("B upcall", b.wait_upcalls(1, u64::from(i)));
        assert_eq!(seen, u64::from(i), "one upcall per doorbell");
    }
    settle(b);
    assert_eq!(check("B port count", b.port_count(PB)), K);
    assert_eq!(b.upcalls(1), u64::from(K));
    assert_eq!(b.upcalls(0), 0);
    assert_eq!(a.upcalls(0), 0, "A's end of the link got nothing");
    let c = counters(&rig, ca);
    assert_eq!((c.doorbells, c.doorbell_errors), (u64::from(K), 0));
    let c = counters(&rig, cb);
    assert_eq!(
        (c.records, c.signals, c.deferred),
        (u64::from(K), u64::from(K), 0)
    );
    // The doorbell queue asks for no interrupt: its call eventfd (not an irqfd) stayed quiet.
    let door_call = a.attachment().call_notifier(1).expect("doorbell call fd");
    assert!(door_call.read().is_err(), "no doorbell completion signal");

    // And back: B's doorbell on PB is one upcall on A's PA.
    check("B doorbell", b.doorbell(PB));
    assert_eq!(check("A upcall 0", a.wait_upcalls(0, 1)), 1);
    settle(a);
    assert_eq!(check("A port count PA", a.port_count(PA)), 1);
    assert_eq!(a.upcalls(1), 2);

    // 5. No exits: every notify write (control, doorbells) hit an ioeventfd, every interrupt
    // came from an irqfd, the page was plain memory.
    assert_eq!(mmio_exits(&a.exit_stats()), mmio_exits(&a_exits));
    assert_eq!(mmio_exits(&b.exit_stats()), mmio_exits(&b_exits));
    for vm in [a, b] {
        let s = vm.exit_stats();
        assert_eq!(
            (s.mmio_reads, s.mmio_writes, s.unhandled_mmio_writes),
            (0, 0, 0),
            "{:?}: no MMIO exit at all",
            vm.conn()
        );
        assert_eq!(s.pio_writes, 0);
    }
    assert_eq!(
        a.control_interrupts(),
        a_requests,
        "one MSI per control request"
    );
    assert_eq!(b.control_interrupts(), b_requests);
    assert_eq!(counters(&rig, ca).control_requests, a_requests);
    assert_eq!(counters(&rig, cb).control_requests, b_requests);
    assert_eq!(counters(&rig, cb).doorbells, 1);
    // Vectors nobody should have seen.
    for vm in [a, b] {
        for v in 0x20..=0xefu8 {
            if v != CONTROL_VECTOR && v != event_vector(0) && v != event_vector(1) {
                assert_eq!(vm.guest().count(v), 0, "vector {v:#x}");
            }
        }
    }
}

fn a_page() -> u64 {
    irqbridge_integration::vhost_rig::PAGE_GPA
}

fn io(e: irqbridge_vhost_user::Error) -> Error {
    Error::Io(std::io::Error::other(e))
}

fn counters(rig: &VhostRig, conn: ConnId) -> ConnCounters {
    check("counters", rig.backend().counters(conn).map_err(io))
}
