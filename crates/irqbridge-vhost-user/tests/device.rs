// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The event-channel device over real vhost-user connections: vhost's `Frontend` as the
//! client, memfd guest RAM in this process, split virtqueues built by hand in it.

mod common;

use std::sync::atomic::Ordering;

use common::{Env, PAGE, ok, setup, status, wait_until};
use irqbridge_core::evtchn::{MASK_WORD, PENDING_WORD, UPCALL_WORD, guest_collect};
use irqbridge_core::{PortState, SendOutcome};
use irqbridge_vhost_user::abi::{
    ABI_VERSION, CONFIG_SIZE, CONTROL_QUEUE, DEFAULT_VIRTIO_ID, DOORBELL_QUEUE, FEATURES, Op,
    PORT_BOUND, PORT_CLOSED, PORT_F_LINKED, PORT_F_MASKED, PORT_F_PENDING, PORT_UNBOUND,
    RECORD_F_DEFERRED, Request, Status, UpcallRecord, event_queue,
};
use irqbridge_vhost_user::driver::Buf;
use irqbridge_vhost_user::{ConnCounters, ConnId};
use vhost::VhostBackend;
use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vm_memory::{Bytes, GuestAddress};

const C0: ConnId = ConnId(0);
const C1: ConnId = ConnId(1);

fn record(upcall: u16, flags: u16, seq: u32) -> Option<(UpcallRecord, u32)> {
    Some((UpcallRecord { upcall, flags, seq }, 8))
}

#[test]
fn config_space_features_and_queues() {
    let env = Env::new("config", 1, 300, 3);
    let mut drv = env.connect(0, false);
    let c = drv.config();
    assert_eq!(
        (
            c.num_ports,
            c.num_upcalls,
            c.abi_version,
            c.features,
            c.virtio_id
        ),
        (300, 3, ABI_VERSION, FEATURES, DEFAULT_VIRTIO_ID)
    );
    assert_eq!(drv.features(), (1 << 32) | (1 << 30));
    let fe = drv.frontend();
    assert_eq!(fe.get_queue_num().unwrap(), 5);
    let offered = fe.get_features().unwrap();
    assert_eq!(offered, (1 << 32) | (1 << 30) | (1 << 29));
    let pf = fe.get_protocol_features().unwrap();
    assert_eq!(
        pf,
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    );
    // Reads past the defined fields are zero; writes are ignored (read-only).
    let (_, tail) = fe
        .get_config(16, 16, VhostUserConfigFlags::empty(), &[0; 16])
        .unwrap();
    let id = irqbridge_vhost_user::abi::DEFAULT_VIRTIO_ID.to_le_bytes();
    assert_eq!(
        &tail[..],
        &[id[0], id[1], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    fe.set_config(0, VhostUserConfigFlags::WRITABLE, &[1, 2, 3, 4])
        .unwrap();
    let (_, all) = fe
        .get_config(
            0,
            CONFIG_SIZE as u32,
            VhostUserConfigFlags::empty(),
            &[0; CONFIG_SIZE],
        )
        .unwrap();
    assert_eq!(u32::from_le_bytes([all[0], all[1], all[2], all[3]]), 300);
    // The connection still works after the ignored write.
    assert_eq!(ok(&mut drv, Request::new(Op::Status, 0, 0)), PORT_CLOSED);
}

#[test]
fn send_signals_call_fds_and_sets_pending_bits() {
    let env = Env::new("send", 1, 256, 2);
    let mut drv = env.connect(0, false);
    setup(&mut drv, &[(5, 0), (9, 0), (70, 1)]);
    drv.post_event_buffers(0, 4, 8).unwrap();
    drv.post_event_buffers(1, 4, 8).unwrap();
    let ram = drv.ram().clone();
    let words = ram.words(PAGE).unwrap();
    let b = &env.backend;
    let (eq0, eq1) = (event_queue(0), event_queue(1));

    assert_eq!(b.send(C0, 5).unwrap(), SendOutcome::Upcall { vector: 0 });
    // Delivery is synchronous: the signal is there when send returns.
    assert_eq!(drv.take_calls(eq0).unwrap(), 1);
    assert_eq!(drv.take_calls(eq1).unwrap(), 0);
    assert_eq!(words[PENDING_WORD].load(Ordering::SeqCst), 1 << 5);
    assert_eq!(words[UPCALL_WORD].load(Ordering::SeqCst), 1);
    assert_eq!(words[UPCALL_WORD + 1].load(Ordering::SeqCst), 1);
    assert_eq!(drv.pop_record(0).unwrap(), record(0, 0, 1));
    assert_eq!(drv.pop_record(0).unwrap(), None);

    // Same word, same upcall: no second upcall. Another upcall: its own signal.
    assert_eq!(b.send(C0, 9).unwrap(), SendOutcome::SelectorSet);
    assert_eq!(b.send(C0, 70).unwrap(), SendOutcome::Upcall { vector: 1 });
    assert_eq!(b.send(C0, 70).unwrap(), SendOutcome::Coalesced);
    assert_eq!(drv.take_calls(eq0).unwrap(), 0);
    assert_eq!(drv.take_calls(eq1).unwrap(), 1);
    assert_eq!(drv.pop_record(1).unwrap(), record(1, 0, 1));
    let st = ok(&mut drv, Request::new(Op::Status, 70, 0));
    assert_eq!(st, PORT_BOUND | PORT_F_PENDING | (1 << 16));

    assert_eq!(guest_collect(words, 0), [5, 9]);
    assert_eq!(guest_collect(words, 1), [70]);
    assert!(words.iter().all(|w| w.load(Ordering::SeqCst) == 0));

    // After the handler ran, the next send raises again.
    assert_eq!(b.send(C0, 5).unwrap(), SendOutcome::Upcall { vector: 0 });
    assert_eq!(drv.take_calls(eq0).unwrap(), 1);
    assert_eq!(drv.pop_record(0).unwrap(), record(0, 0, 2));
    assert_eq!(guest_collect(words, 0), [5]);

    // Closed ports drop; unbound ports only set the pending bit.
    assert_eq!(b.send(C0, 100).unwrap(), SendOutcome::NotBound);
    ok(&mut drv, Request::new(Op::Unbind, 101, 0));
    assert_eq!(b.send(C0, 101).unwrap(), SendOutcome::NotBound);
    assert_eq!(
        ok(&mut drv, Request::new(Op::Status, 101, 0)),
        PORT_UNBOUND | PORT_F_PENDING
    );
    assert_eq!(
        drv.take_calls(eq0).unwrap() + drv.take_calls(eq1).unwrap(),
        0
    );

    let stats = b.stats(C0).unwrap();
    assert_eq!((stats.sends, stats.upcalls, stats.dropped), (7, 3, 1));
    let c = b.counters(C0).unwrap();
    assert_eq!(
        (c.records, c.signals, c.suppressed, c.deferred),
        (3, 3, 0, 0)
    );
    assert_eq!(b.page_gpa(C0).unwrap(), Some(PAGE));
}

#[test]
fn masked_port_stays_pending_and_unmask_signals_once() {
    let env = Env::new("mask", 1, 128, 1);
    let mut drv = env.connect(0, false);
    setup(&mut drv, &[(3, 0)]);
    drv.post_event_buffers(0, 4, 8).unwrap();
    let ram = drv.ram().clone();
    let words = ram.words(PAGE).unwrap();
    let eq0 = event_queue(0);

    // The guest masks the port in its own memory.
    words[MASK_WORD].fetch_or(1 << 3, Ordering::SeqCst);
    assert_eq!(env.backend.send(C0, 3).unwrap(), SendOutcome::Masked);
    assert_eq!(drv.take_calls(eq0).unwrap(), 0);
    assert_eq!(drv.pop_record(0).unwrap(), None);
    assert_eq!(words[PENDING_WORD].load(Ordering::SeqCst), 1 << 3);
    assert_eq!(words[UPCALL_WORD].load(Ordering::SeqCst), 0);
    assert_eq!(
        ok(&mut drv, Request::new(Op::Status, 3, 0)),
        PORT_BOUND | PORT_F_PENDING | PORT_F_MASKED
    );

    ok(&mut drv, Request::new(Op::Unmask, 3, 0));
    assert_eq!(drv.take_calls(eq0).unwrap(), 1);
    assert_eq!(drv.pop_record(0).unwrap(), record(0, 0, 1));
    assert_eq!(words[MASK_WORD].load(Ordering::SeqCst), 0);
    // A second unmask finds the selector set: nothing more.
    ok(&mut drv, Request::new(Op::Unmask, 3, 0));
    assert_eq!(drv.take_calls(eq0).unwrap(), 0);
    assert_eq!(guest_collect(words, 0), [3]);
    // Unmask of a port that is not pending raises nothing.
    ok(&mut drv, Request::new(Op::Unmask, 3, 0));
    assert_eq!(drv.take_calls(eq0).unwrap(), 0);
    assert_eq!(env.backend.counters(C0).unwrap().records, 1);
}

#[test]
fn all_4096_ports_on_one_upcall_are_collected_once() {
    let env = Env::new("4096", 1, 4096, 1);
    let mut drv = env.connect(0, false);
    let binds: Vec<(u32, u16)> = (0..4096).map(|p| (p, 0)).collect();
    setup(&mut drv, &binds);
    drv.post_event_buffers(0, 8, 8).unwrap();
    let ram = drv.ram().clone();
    let words = ram.words(PAGE).unwrap();
    let mut upcalls = 0;
    {
        let router = env.backend.router().lock().unwrap();
        for p in 0..4096 {
            if let SendOutcome::Upcall { vector } = router.send(C0, p).unwrap() {
                assert_eq!(vector, 0);
                upcalls += 1;
            }
        }
    }
    assert_eq!(upcalls, 1);
    assert_eq!(drv.take_calls(event_queue(0)).unwrap(), 1);
    assert_eq!(drv.pop_record(0).unwrap(), record(0, 0, 1));
    assert_eq!(drv.pop_record(0).unwrap(), None);
    let got = guest_collect(words, 0);
    assert_eq!(got, (0..4096).collect::<Vec<u32>>());
    assert_eq!(guest_collect(words, 0), Vec::<u32>::new());
    assert_eq!(env.backend.stats(C0).unwrap().sends, 4096);
}

#[test]
fn no_interrupt_and_event_idx_suppress_the_signal_not_the_record() {
    let env = Env::new("suppress", 2, 64, 1);
    // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT.
    let mut drv = env.connect(0, false);
    setup(&mut drv, &[(1, 0)]);
    drv.post_event_buffers(0, 4, 8).unwrap();
    let ram = drv.ram().clone();
    let words = ram.words(PAGE).unwrap();
    let eq0 = event_queue(0);
    drv.queue(eq0).unwrap().set_avail_flags(&ram, 1).unwrap();
    assert_eq!(
        env.backend.send(C0, 1).unwrap(),
        SendOutcome::Upcall { vector: 0 }
    );
    assert_eq!(drv.take_calls(eq0).unwrap(), 0);
    assert_eq!(drv.pop_record(0).unwrap(), record(0, 0, 1));
    assert_eq!(guest_collect(words, 0), [1]);
    drv.queue(eq0).unwrap().set_avail_flags(&ram, 0).unwrap();
    env.backend.send(C0, 1).unwrap();
    assert_eq!(drv.take_calls(eq0).unwrap(), 1);
    assert_eq!(drv.pop_record(0).unwrap(), record(0, 0, 2));
    assert_eq!(guest_collect(words, 0), [1]);
    let c = env.backend.counters(C0).unwrap();
    assert_eq!((c.records, c.signals, c.suppressed), (2, 1, 1));

    // With EVENT_IDX: used_event. NO_INTERRUPT is ignored then.
    let mut drv = env.connect(1, true);
    assert_eq!(drv.features() & (1 << 29), 1 << 29);
    setup(&mut drv, &[(2, 0)]);
    drv.post_event_buffers(0, 4, 8).unwrap();
    let ram = drv.ram().clone();
    let words = ram.words(PAGE).unwrap();
    let q = drv.queue(eq0).unwrap();
    q.set_avail_flags(&ram, 1).unwrap();
    // Signal only once the used index passes 2: the first record is silent.
    q.set_used_event(&ram, 1).unwrap();
    env.backend.send(C1, 2).unwrap();
    assert_eq!(drv.take_calls(eq0).unwrap(), 0);
    assert_eq!(guest_collect(words, 0), [2]);
    env.backend.send(C1, 2).unwrap();
    assert_eq!(drv.take_calls(eq0).unwrap(), 1);
    assert_eq!(drv.pop_record(0).unwrap(), record(0, 0, 1));
    assert_eq!(drv.pop_record(0).unwrap(), record(0, 0, 2));
    assert_eq!(guest_collect(words, 0), [2]);
    // pop_used moved used_event to the next entry: the next record signals.
    env.backend.send(C1, 2).unwrap();
    assert_eq!(drv.take_calls(eq0).unwrap(), 1);
    let c = env.backend.counters(C1).unwrap();
    assert_eq!((c.records, c.signals, c.suppressed), (3, 2, 1));
}

#[test]
fn upcall_without_buffer_is_delivered_when_one_is_posted() {
    let env = Env::new("nobuf", 1, 64, 1);
    let mut drv = env.connect(0, false);
    setup(&mut drv, &[(7, 0)]);
    let ram = drv.ram().clone();
    let words = ram.words(PAGE).unwrap();
    let eq0 = event_queue(0);
    assert_eq!(
        env.backend.send(C0, 7).unwrap(),
        SendOutcome::Upcall { vector: 0 }
    );
    assert_eq!(drv.take_calls(eq0).unwrap(), 0);
    assert_eq!(env.backend.counters(C0).unwrap().deferred, 1);
    // The page says it all already; the interrupt waits for a buffer.
    assert_eq!(words[UPCALL_WORD].load(Ordering::SeqCst), 1);
    // A buffer too short for a record is returned empty; the next one gets the record.
    drv.post_event_buffers(0, 1, 4).unwrap();
    let calls = drv
        .queue(eq0)
        .unwrap()
        .wait_calls(common_timeout())
        .unwrap();
    assert_eq!(calls, 1, "the empty buffer is returned");
    assert_eq!(env.backend.counters(C0).unwrap().bad_buffers, 1);
    assert_eq!(drv.pop_record(0).unwrap().map(|(_, len)| len), Some(0));
    drv.post_event_buffers(0, 1, 8).unwrap();
    let calls = drv
        .queue(eq0)
        .unwrap()
        .wait_calls(common_timeout())
        .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(drv.pop_record(0).unwrap(), record(0, RECORD_F_DEFERRED, 1));
    assert_eq!(guest_collect(words, 0), [7]);
    let c = env.backend.counters(C0).unwrap();
    assert_eq!(
        (c.records, c.signals, c.deferred, c.bad_buffers),
        (1, 2, 1, 1)
    );
    // More sends while the queue is empty again: one owed record, not one per send.
    ok(&mut drv, Request::new(Op::Bind, 8, 0));
    env.backend.send(C0, 7).unwrap();
    assert_eq!(env.backend.send(C0, 8).unwrap(), SendOutcome::SelectorSet);
    assert_eq!(guest_collect(words, 0), [7, 8]);
    env.backend.send(C0, 8).unwrap();
    drv.post_event_buffers(0, 2, 8).unwrap();
    let calls = drv
        .queue(eq0)
        .unwrap()
        .wait_calls(common_timeout())
        .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(drv.pop_record(0).unwrap(), record(0, RECORD_F_DEFERRED, 2));
    assert_eq!(drv.pop_record(0).unwrap(), None);
    let c = env.backend.counters(C0).unwrap();
    assert_eq!((c.records, c.signals, c.deferred), (2, 3, 2));
}

#[test]
fn doorbell_in_one_connection_is_an_event_in_the_other() {
    let env = Env::new("doorbell", 2, 64, 1);
    let mut a = env.connect(0, false);
    let mut b = env.connect(1, false);
    setup(&mut a, &[(1, 0)]);
    setup(&mut b, &[(2, 0), (4, 0)]);
    b.post_event_buffers(0, 8, 8).unwrap();
    let ram_b = b.ram().clone();
    let words_b = ram_b.words(PAGE).unwrap();
    let eq0 = event_queue(0);
    env.backend.connect_interdomain((C0, 1), (C1, 2)).unwrap();
    assert_eq!(
        ok(&mut a, Request::new(Op::Status, 1, 0)),
        PORT_BOUND | PORT_F_LINKED
    );

    a.doorbell(&[1]).unwrap();
    let q = b.queue(eq0).unwrap();
    assert_eq!(q.wait_calls(common_timeout()).unwrap(), 1);
    assert_eq!(b.pop_record(0).unwrap(), record(0, 0, 1));
    assert_eq!(guest_collect(words_b, 0), [2]);

    // Three doorbells before B's guest runs: one pending event, one upcall.
    a.doorbell(&[1]).unwrap();
    a.doorbell(&[1, 1]).unwrap();
    // Every doorbell chain is returned once its sends are done.
    let ram_a = a.ram().clone();
    let dq = a.queue(DOORBELL_QUEUE).unwrap();
    wait_until("A's doorbells", || {
        while dq.pop_used(&ram_a).unwrap().is_some() {}
        dq.num_free() == usize::from(dq.size())
    });
    assert_eq!(env.backend.counters(C0).unwrap().doorbells, 4);
    // An upcall into another connection is raised by that connection's own worker: wait.
    assert_eq!(
        b.queue(eq0).unwrap().wait_calls(common_timeout()).unwrap(),
        1
    );
    assert_eq!(guest_collect(words_b, 0), [2]);
    assert_eq!(b.pop_record(0).unwrap(), record(0, 0, 2));
    assert_eq!(b.take_calls(event_queue(0)).unwrap(), 0);
    assert_eq!(a.take_calls(eq0).unwrap(), 0, "A's guest got nothing");

    // The other way: SEND from B's control queue raises A's port 1.
    a.post_event_buffers(0, 2, 8).unwrap();
    ok(&mut b, Request::new(Op::Send, 2, 0));
    assert_eq!(
        a.queue(eq0).unwrap().wait_calls(common_timeout()).unwrap(),
        1
    );
    assert_eq!(guest_collect(a.ram().words(PAGE).unwrap(), 0), [1]);

    // Loopback inside B, through B's own doorbell queue.
    env.backend.connect_interdomain((C1, 3), (C1, 4)).unwrap();
    b.doorbell(&[3]).unwrap();
    assert_eq!(
        b.queue(eq0).unwrap().wait_calls(common_timeout()).unwrap(),
        1
    );
    assert_eq!(guest_collect(words_b, 0), [4]);

    // Doorbells on unlinked or bad ports, and malformed chains, are counted and ignored.
    b.doorbell(&[5, 64]).unwrap();
    let scratch = b.scratch();
    b.ram()
        .memory()
        .write_slice(&[1, 0, 0], GuestAddress(scratch))
        .unwrap();
    b.post(
        DOORBELL_QUEUE,
        &[Buf {
            addr: scratch,
            len: 3,
            write: false,
        }],
    )
    .unwrap();
    wait_until("B's bad doorbells", || {
        env.backend.counters(C1).unwrap().doorbell_errors == 3
    });
    let c = env.backend.counters(C1).unwrap();
    assert_eq!((c.doorbells, c.doorbell_errors), (3, 3));
    assert_eq!(b.take_calls(eq0).unwrap(), 0);
    assert_eq!(env.backend.counters(C0).unwrap().doorbell_errors, 0);
}

fn common_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

#[test]
fn reconnect_keeps_ports_and_replays_latched_events() {
    let env = Env::new("reconnect", 1, 256, 2);
    let ram =
        std::sync::Arc::new(irqbridge_vhost_user::driver::GuestRam::new(common::RAM).unwrap());
    let mut drv = env.connect_ram(0, ram.clone(), false);
    setup(&mut drv, &[(10, 0), (80, 1), (200, 0)]);
    ok(&mut drv, Request::new(Op::Unbind, 12, 0));
    drv.post_event_buffers(0, 4, 8).unwrap();
    env.backend.send(C0, 10).unwrap();
    assert_eq!(drv.take_calls(event_queue(0)).unwrap(), 1);
    let words = ram.words(PAGE).unwrap();
    assert_eq!(guest_collect(words, 0), [10]);

    drop(drv);
    wait_until("the detach", || !env.backend.is_attached(C0).unwrap());
    assert_eq!(env.backend.page_gpa(C0).unwrap(), None);
    for p in [10, 80, 12, 13] {
        env.backend.send(C0, p).unwrap();
    }
    assert!(
        words.iter().all(|w| w.load(Ordering::SeqCst) == 0),
        "nothing reaches the old page"
    );
    assert_eq!(
        env.backend.port_state(C0, 80).unwrap(),
        PortState::Bound { vector: 1 }
    );

    // The same guest RAM comes back through a new frontend, with fresh rings.
    let mut drv = env.connect_ram(0, ram.clone(), false);
    wait_until("the attach", || env.backend.is_attached(C0).unwrap());
    assert_eq!(
        ok(&mut drv, Request::new(Op::Status, 80, 0)),
        PORT_BOUND | PORT_F_PENDING | (1 << 16),
        "port state kept, event latched"
    );
    assert_eq!(
        ok(&mut drv, Request::new(Op::Status, 12, 0)),
        PORT_UNBOUND | PORT_F_PENDING
    );
    assert_eq!(ok(&mut drv, Request::new(Op::Status, 13, 0)), PORT_CLOSED);
    assert_eq!(
        status(&mut drv, Request::new(Op::Unmask, 10, 0)),
        Some(Status::NoPage)
    );
    drv.post_event_buffers(0, 4, 8).unwrap();
    drv.post_event_buffers(1, 4, 8).unwrap();
    ok(&mut drv, Request::new(Op::RegisterPage, 0, PAGE));
    assert_eq!(drv.take_calls(event_queue(0)).unwrap(), 1);
    assert_eq!(drv.take_calls(event_queue(1)).unwrap(), 1);
    assert_eq!(drv.pop_record(0).unwrap(), record(0, 0, 1));
    assert_eq!(drv.pop_record(1).unwrap(), record(1, 0, 1));
    assert_eq!(guest_collect(words, 0), [10, 12]);
    assert_eq!(guest_collect(words, 1), [80]);
    assert!(words.iter().all(|w| w.load(Ordering::SeqCst) == 0));
    let stats = env.backend.stats(C0).unwrap();
    assert_eq!(
        (stats.sends, stats.dropped),
        (5, 1),
        "replays are not counted"
    );

    // The snapshot carries it all and restores into a fresh backend.
    env.backend.send(C0, 200).unwrap();
    let snap = env.backend.snapshot();
    let json = serde_json::to_string(&snap).unwrap();
    let back: irqbridge_vhost_user::BackendState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snap);
    assert!(env.backend.restore(&back).is_err(), "a page is registered");
    let fresh = irqbridge_vhost_user::Backend::new(&irqbridge_vhost_user::BackendConfig {
        sockets: vec!["/unused".into()],
        ports: 256,
        upcalls: 2,
        ..Default::default()
    })
    .unwrap();
    fresh.restore(&back).unwrap();
    assert_eq!(
        fresh.port_state(C0, 200).unwrap(),
        PortState::Bound { vector: 0 }
    );
    assert!(fresh.is_pending(C0, 200).unwrap());
    assert_eq!(fresh.stats(C0).unwrap(), env.backend.stats(C0).unwrap());
    let counters: ConnCounters = env.backend.counters(C0).unwrap();
    assert_eq!(fresh.counters(C0).unwrap(), counters);
}

#[test]
fn malformed_control_requests_get_an_error_status() {
    let env = Env::new("malformed", 1, 64, 2);
    let mut drv = env.connect(0, false);
    let ram = drv.ram().clone();
    let m = ram.memory();
    let scratch = drv.scratch();

    // Before any page: UNMASK has nothing to work on.
    assert_eq!(
        status(&mut drv, Request::new(Op::Unmask, 1, 0)),
        Some(Status::NoPage)
    );
    let bad = [
        (Request::new(Op::Bind, 64, 0), Status::BadPort),
        (Request::new(Op::Status, u32::MAX, 0), Status::BadPort),
        (Request::new(Op::Bind, 1, 2), Status::BadUpcall),
        (Request::new(Op::Bind, 1, 1 << 40), Status::BadUpcall),
        (Request::new(Op::Close, 1, 1), Status::BadRequest),
        (Request::new(Op::Reset, 0, 9), Status::BadRequest),
        (Request::new(Op::RegisterPage, 1, PAGE), Status::BadRequest),
        (
            Request::new(Op::RegisterPage, 0, PAGE + 4),
            Status::BadAddress,
        ),
        (
            Request::new(Op::RegisterPage, 0, common::RAM as u64 - 8),
            Status::BadAddress,
        ),
        (
            Request::new(Op::RegisterPage, 0, 1 << 40),
            Status::BadAddress,
        ),
        (Request::new(Op::Send, 1, 0), Status::NotConnected),
        (
            Request {
                op: 0x99,
                port: 0,
                arg: 0,
            },
            Status::UnknownOp,
        ),
        (
            Request {
                op: 0,
                port: 0,
                arg: 0,
            },
            Status::UnknownOp,
        ),
    ];
    let reqs: Vec<Request> = bad.iter().map(|(r, _)| *r).collect();
    let replies = drv.control_batch(&reqs).unwrap();
    for ((req, want), got) in bad.iter().zip(&replies) {
        assert_eq!(got.status(), Some(*want), "{req:?}");
        assert_eq!(got.value, 0);
    }

    // Hand-made chains.
    let req = Request::new(Op::Status, 1, 0).to_bytes();
    m.write_slice(&req, GuestAddress(scratch)).unwrap();
    let reply_at = scratch + 0x100;
    let rd = |addr, len| Buf {
        addr,
        len,
        write: false,
    };
    let wr = |addr, len| Buf {
        addr,
        len,
        write: true,
    };
    let read_reply = || {
        let mut b = [0u8; 8];
        m.read_slice(&mut b, GuestAddress(reply_at)).unwrap();
        irqbridge_vhost_user::abi::Reply::from_bytes(&b)
    };
    let cases: Vec<(Vec<Buf>, u32, Option<Status>)> = vec![
        // Short request.
        (
            vec![rd(scratch, 8), wr(reply_at, 8)],
            8,
            Some(Status::BadRequest),
        ),
        // A request split over two descriptors is fine.
        (
            vec![rd(scratch, 8), rd(scratch + 8, 8), wr(reply_at, 8)],
            8,
            Some(Status::Ok),
        ),
        // The reply may be split too.
        (
            vec![rd(scratch, 16), wr(reply_at, 4), wr(reply_at + 4, 4)],
            8,
            Some(Status::Ok),
        ),
        // No request at all.
        (vec![wr(reply_at, 8)], 8, Some(Status::BadRequest)),
        // Request outside guest memory.
        (
            vec![rd(1 << 40, 16), wr(reply_at, 8)],
            8,
            Some(Status::BadRequest),
        ),
        // No reply buffer, a short one, or one outside memory: not executed, length 0.
        (vec![rd(scratch, 16)], 0, None),
        (vec![rd(scratch, 16), wr(reply_at, 4)], 0, None),
        (vec![rd(scratch, 16), wr(1 << 40, 8)], 0, None),
    ];
    for (bufs, want_len, want) in &cases {
        m.write_slice(&[0xee; 8], GuestAddress(reply_at)).unwrap();
        let head = drv.post(CONTROL_QUEUE, bufs).unwrap();
        let (got_head, len) = drv.wait_used(CONTROL_QUEUE).unwrap();
        assert_eq!((got_head, len), (head, *want_len), "{bufs:?}");
        match want {
            Some(s) => assert_eq!(read_reply().status(), Some(*s), "{bufs:?}"),
            None => assert_eq!(read_reply().status, 0xeeee_eeee, "{bufs:?}: untouched"),
        }
    }
    // A chain whose descriptor table entry points past the queue is dropped by the queue
    // layer; the device keeps working.
    let c = env.backend.counters(C0).unwrap();
    // 1 NoPage + 13 bad + 4 bad hand-made + 3 without reply buffer.
    assert_eq!(c.control_errors, 1 + 13 + 3 + 3);
    assert_eq!(c.control_requests, 1 + 13 + 5);
    setup(&mut drv, &[(1, 1)]);
    assert_eq!(
        ok(&mut drv, Request::new(Op::Status, 1, 0)),
        PORT_BOUND | (1 << 16)
    );
    ok(&mut drv, Request::new(Op::Reset, 0, 0));
    assert_eq!(ok(&mut drv, Request::new(Op::Status, 1, 0)), PORT_CLOSED);
}
