// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One frontend connection: the `VhostUserBackend` implementation and the virtqueue work.
//!
//! A [`Session`] lives from a frontend's connect to its disconnect. It owns nothing that must
//! survive a reconnect: port states, links and counters are in the [`Router`]. Its
//! [`Delivery`] half is the connection's upcall sink: the router calls
//! [`UpcallSink::raise`] from whichever thread sent the event (a test, another connection's
//! doorbell, this connection's control queue), and the upcall is written into the event
//! queue right there, under that queue's lock.
//!
//! vhost-user-backend hands the vrings to the backend only inside `handle_event`; they are
//! captured there on the first call (which 0.24 makes as soon as a vring is enabled), before
//! any buffer can have been posted. An upcall raised earlier, or while its queue has no
//! buffer, is *owed* and written as soon as the driver posts a buffer and kicks.
//!
//! Lock order: control or doorbell vring → router → event-queue state → event vring.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use irqbridge_core::SharedWords;
use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::abi::{
    CONTROL_QUEUE, ConfigSpace, DOORBELL_ENTRY_SIZE, DOORBELL_QUEUE, FIRST_EVENT_QUEUE,
    MAX_DOORBELL_PORTS, RECORD_F_DEFERRED, RECORD_SIZE, REPLY_SIZE, REQUEST_SIZE, Reply, Request,
    Status, UpcallRecord, event_queue, parse_doorbell,
};
use crate::fault::MemCover;
use crate::page::GuestPage;
use crate::router::{ConnId, Counters, Raise, Router, UpcallSink, bump};
use crate::vring::{Breaker, Signal, signal};

/// Guest memory as vhost-user-backend shares it.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
pub(crate) use crate::vring::Vring;
type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;
type Chain = DescriptorChain<MemGuard>;

/// Virtio features offered: VERSION_1, EVENT_IDX and vhost-user protocol features.
pub(crate) const VIRTIO_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// vhost-user protocol features offered (vhost adds REPLY_ACK).
pub(crate) fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Per-upcall delivery state.
#[derive(Debug, Default)]
struct EventQueue {
    /// An upcall was raised and no record was written for it yet.
    owed: bool,
    /// The owed upcall already failed once (its record gets [`RECORD_F_DEFERRED`]).
    deferred: bool,
    /// Records written on this queue.
    seq: u32,
}

/// The upcall sink of one session: writes upcall records into the event queues.
pub(crate) struct Delivery {
    conn: ConnId,
    mem: Mem,
    vrings: Vec<OnceLock<Vring>>,
    events: Vec<Mutex<EventQueue>>,
    counters: Arc<Counters>,
    /// Cleared when the session detaches: upcalls decided under the router lock are delivered
    /// after it is released, and one that arrives after the detach must not write into the
    /// queues of a frontend that is gone (its RAM may be the next frontend's).
    active: AtomicBool,
    /// Upcalls raised by other connections' frontends, one bit each, for this session's
    /// worker thread (see [`UpcallSink::raise_remote`]).
    remote: AtomicU64,
    /// Wakes this session's worker for `remote` (our own non-blocking eventfd).
    wake: EventFd,
    /// `wake` is registered with the worker; until then remote upcalls are raised inline
    /// (no frontend is connected before that, so no descriptor of one can be touched).
    handoff: AtomicBool,
    /// Keeps the guest memory this session touches covered by the SIGBUS handler.
    cover: Arc<MemCover>,
    breaker: Arc<Breaker>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("conn", &self.conn)
            .field("queues", &self.vrings.len())
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

/// Whether the driver wants an interrupt for the used entries added since the last check:
/// EVENT_IDX (`used_event`) when negotiated, else the avail ring's NO_INTERRUPT flag (which
/// virtio-queue's `needs_notification` does not look at).
fn should_notify(st: &mut VringState<Mem>, mem: &GuestMemoryMmap) -> bool {
    let q = st.get_queue_mut();
    if q.event_idx_enabled() {
        return q.needs_notification(mem).unwrap_or(true);
    }
    // The used index must be visible before the flags are read (virtio 1.2 §2.7.7.2).
    fence(Ordering::SeqCst);
    match mem.load::<u16>(GuestAddress(q.avail_ring()), Ordering::Acquire) {
        Ok(flags) => u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

impl Delivery {
    /// The current memory table, covered by the SIGBUS handler; `None` (and the connection
    /// ended) if it cannot be covered.
    fn memory(&self) -> Option<MemGuard> {
        let mem = self.mem.memory();
        if self.cover.cover(&mem.clone().into_inner()) {
            Some(mem)
        } else {
            self.breaker
                .break_connection("its guest memory cannot be covered (too many regions)");
            None
        }
    }

    /// The event-channel page at `gpa` in the current table of `mem`, whose table is covered
    /// by the SIGBUS handler before anyone touches the page (other connections' workers do,
    /// when they send to this guest).
    fn resolve_page(&self, mem: &Mem, gpa: u64) -> crate::Result<Arc<dyn SharedWords>> {
        let page = GuestPage::resolve(mem, gpa)?;
        if !self.cover.cover(page.table()) {
            return Err(crate::Error::BadPage {
                gpa,
                reason: "its memory cannot be covered",
            });
        }
        Ok(Arc::new(page))
    }

    fn vring(&self, index: usize) -> Option<&Vring> {
        self.vrings.get(index).and_then(OnceLock::get)
    }

    fn defer(&self, ev: &mut EventQueue) {
        if !ev.deferred {
            ev.deferred = true;
            bump(&self.counters.deferred);
        }
    }

    /// Write the owed record of upcall `v`, if any and if a buffer is there.
    fn flush(&self, v: u16, ev: &mut EventQueue) {
        if !ev.owed {
            return;
        }
        let Some(vring) = self.vring(event_queue(v)) else {
            self.defer(ev);
            return;
        };
        let Some(mem) = self.memory() else {
            self.defer(ev);
            return;
        };
        let mut st = vring.get_mut();
        if !st.is_enabled() || !st.get_queue().ready() {
            self.defer(ev);
            return;
        }
        let mut budget = usize::from(st.get_queue().size()) + 1;
        let mut retried = false;
        let mut used = false;
        loop {
            let Some(chain) = st.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                // Ask for a kick when buffers come (EVENT_IDX: avail_event = next_avail); if
                // some arrived meanwhile, try once more.
                let more = st
                    .get_queue_mut()
                    .enable_notification(&*mem)
                    .unwrap_or(false);
                if more && !retried {
                    retried = true;
                    continue;
                }
                self.defer(ev);
                break;
            };
            let head = chain.head_index();
            let record = UpcallRecord {
                upcall: v,
                flags: if ev.deferred { RECORD_F_DEFERRED } else { 0 },
                seq: ev.seq.wrapping_add(1),
            };
            let written = match chain.writer(&*mem) {
                Ok(mut w) if w.available_bytes() >= RECORD_SIZE => {
                    w.write_all(&record.to_bytes()).is_ok()
                }
                _ => false,
            };
            let len = if written { RECORD_SIZE as u32 } else { 0 };
            if let Err(e) = st.get_queue_mut().add_used(&*mem, head, len) {
                warn!(
                    "vhost-user: {}: event queue {v}: add_used failed: {e}",
                    self.conn
                );
            }
            used = true;
            if written {
                ev.owed = false;
                ev.deferred = false;
                ev.seq = record.seq;
                bump(&self.counters.records);
                break;
            }
            bump(&self.counters.bad_buffers);
            budget -= 1;
            if budget == 0 {
                self.defer(ev);
                break;
            }
        }
        if !used {
            return;
        }
        if should_notify(&mut st, &mem) {
            // Counted first, so that whoever sees the signal also sees the count.
            bump(&self.counters.signals);
            notify(&st, &self.counters, self.conn, "event");
        } else {
            bump(&self.counters.suppressed);
        }
    }

    /// The driver kicked event queue `v` (buffers posted): write an owed record.
    fn refill(&self, v: u16) {
        if let Some(slot) = self.events.get(usize::from(v)) {
            self.flush(v, &mut lock(slot));
        }
    }

    /// The worker was woken for remote upcalls: raise them here, on this session's thread.
    fn take_remote(&self) {
        let _ = self.wake.read();
        let bits = self.remote.swap(0, Ordering::SeqCst);
        for v in 0..64u16 {
            if bits & (1 << v) != 0 {
                self.raise(v);
            }
        }
    }

    fn reset(&self) {
        for e in &self.events {
            *lock(e) = EventQueue::default();
        }
    }
}

/// Signal the call fd of `st` (never blocking: see [`crate::vring`]).
fn notify(st: &VringState<Mem>, counters: &Counters, conn: ConnId, what: &str) {
    match signal(st) {
        Signal::Sent | Signal::NoFd => {}
        Signal::Saturated => bump(&counters.saturated),
        Signal::Failed(e) => {
            bump(&counters.signal_errors);
            warn!("vhost-user: {conn}: {what} queue: call fd write failed: {e}");
        }
    }
}

impl UpcallSink for Delivery {
    fn raise(&self, upcall: u16) {
        let Some(slot) = self.events.get(usize::from(upcall)) else {
            return;
        };
        let mut ev = lock(slot);
        if !self.active.load(Ordering::SeqCst) {
            return;
        }
        // An upcall already owed covers this one: the guest scans the whole page anyway.
        if !ev.owed {
            ev.owed = true;
            self.flush(upcall, &mut ev);
        }
    }

    fn raise_remote(&self, upcall: u16) {
        if !self.handoff.load(Ordering::SeqCst) || upcall >= 64 {
            self.raise(upcall);
            return;
        }
        self.remote.fetch_or(1 << upcall, Ordering::SeqCst);
        // Our own eventfd, non-blocking: a full counter means a wake-up is already pending.
        let _ = self.wake.write(1);
    }
}

/// Static parameters of a session.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SessionParams {
    pub(crate) conn: ConnId,
    pub(crate) upcalls: u16,
    pub(crate) queue_size: u16,
    pub(crate) config: ConfigSpace,
}

/// The vhost-user backend of one frontend connection.
pub(crate) struct Session {
    params: SessionParams,
    router: Arc<Mutex<Router>>,
    delivery: Arc<Delivery>,
    generation: u64,
    /// Ends this session's connection (bad descriptors, guest memory faults).
    breaker: Arc<Breaker>,
    /// Exit-event consumer descriptors handed to vhost-user-backend, closed on drop (see
    /// `exit_event`).
    exit_consumers: Mutex<Vec<RawFd>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // vhost-user-backend 0.24 registers the exit-event consumer with the worker's epoll via
        // `into_raw_fd()` and never closes it: one leaked eventfd per connection. Every worker
        // holds a clone of this session, so when the session drops every worker thread has
        // ended and its epoll is gone; nothing else closes or uses these numbers.
        for fd in lock(&self.exit_consumers).drain(..) {
            // SAFETY: `fd` is the consumer created in `exit_event` and leaked (never closed)
            // by vhost-user-backend, whose users are all gone (see above).
            unsafe { libc::close(fd) };
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("params", &self.params)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Attach a new session for `params.conn` to the router.
    pub(crate) fn attach(
        params: SessionParams,
        router: Arc<Mutex<Router>>,
        mem: Mem,
        breaker: Arc<Breaker>,
    ) -> crate::Result<Session> {
        let queues = crate::abi::num_queues(params.upcalls);
        let mut r = lock(&router);
        let counters = r.counters_arc(params.conn)?;
        let delivery = Arc::new(Delivery {
            conn: params.conn,
            mem,
            vrings: (0..queues).map(|_| OnceLock::new()).collect(),
            events: (0..params.upcalls)
                .map(|_| Mutex::new(EventQueue::default()))
                .collect(),
            counters,
            active: AtomicBool::new(true),
            remote: AtomicU64::new(0),
            wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(crate::Error::Io)?,
            handoff: AtomicBool::new(false),
            cover: MemCover::new(&breaker).map_err(crate::Error::Io)?,
            breaker: Arc::clone(&breaker),
        });
        let generation = r.attach(params.conn, delivery.clone())?;
        drop(r);
        Ok(Session {
            params,
            router,
            delivery,
            generation,
            breaker,
            exit_consumers: Mutex::new(Vec::new()),
        })
    }

    /// Detach from the router (the frontend is gone).
    pub(crate) fn detach(&self) {
        if let Err(e) = lock(&self.router).detach(self.params.conn, self.generation) {
            warn!("vhost-user: {}: detach failed: {e}", self.params.conn);
        }
        self.delivery.active.store(false, Ordering::SeqCst);
        // Wait for deliveries already past the check (each holds its queue's lock).
        for e in &self.delivery.events {
            drop(lock(e));
        }
    }

    /// The descriptor and event id to register with the session's worker (see
    /// [`enable_handoff`](Self::enable_handoff)).
    pub(crate) fn wake_listener(&self) -> (RawFd, u64) {
        (
            self.delivery.wake.as_raw_fd(),
            crate::abi::num_queues(self.params.upcalls) as u64 + 1,
        )
    }

    /// The wake descriptor is registered with the worker: from now on upcalls caused by other
    /// connections are raised on this session's worker thread.
    pub(crate) fn enable_handoff(&self) {
        self.delivery.handoff.store(true, Ordering::SeqCst);
        let _ = self.delivery.wake.write(1);
    }

    /// Deliver upcalls that this session's frontend caused: its own inline (this is its
    /// worker thread), other connections' through their workers.
    fn deliver_from(&self, out: Vec<Raise>) {
        let me = Arc::as_ptr(&self.delivery).cast::<()>();
        for (sink, v) in out {
            if Arc::as_ptr(&sink).cast::<()>() == me {
                sink.raise(v);
            } else {
                sink.raise_remote(v);
            }
        }
    }

    /// The session ended: its memory stays covered only while something still holds it.
    pub(crate) fn retire_memory(&self) {
        self.delivery.cover.retire();
    }

    fn counters(&self) -> &Counters {
        &self.delivery.counters
    }

    /// Pop every available chain of queue `index` (none if it is not running).
    fn pop_all(&self, vring: &Vring, mem: &MemGuard) -> Vec<Chain> {
        let mut st = vring.get_mut();
        if !st.is_enabled() || !st.get_queue().ready() {
            return Vec::new();
        }
        let mut chains = Vec::new();
        let max = usize::from(st.get_queue().size());
        while chains.len() < max {
            match st.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                Some(c) => chains.push(c),
                None => break,
            }
        }
        chains
    }

    /// Return `used` chains (head, length) of `vring` and signal if the driver wants it.
    fn complete(&self, vring: &Vring, mem: &MemGuard, used: &[(u16, u32)], what: &str) {
        let mut st = vring.get_mut();
        for &(head, len) in used {
            if let Err(e) = st.get_queue_mut().add_used(&**mem, head, len) {
                warn!(
                    "vhost-user: {}: {what} queue: add_used failed: {e}",
                    self.params.conn
                );
            }
        }
        if should_notify(&mut st, mem) {
            notify(&st, self.counters(), self.params.conn, what);
        }
    }

    /// Re-arm notifications after draining; `true` if more chains arrived meanwhile.
    fn rearm(vring: &Vring, mem: &MemGuard) -> bool {
        vring
            .get_mut()
            .get_queue_mut()
            .enable_notification(&**mem)
            .unwrap_or(false)
    }

    /// Drain `queue` in batches with `work`, which returns the used length of each chain.
    fn drain(
        &self,
        queue: usize,
        what: &str,
        mut work: impl FnMut(&[Chain], &MemGuard) -> Vec<u32>,
    ) {
        let Some(vring) = self.delivery.vring(queue) else {
            return;
        };
        let Some(mem) = self.delivery.memory() else {
            return;
        };
        let mut idle_retry = false;
        loop {
            let chains = self.pop_all(vring, &mem);
            if chains.is_empty() {
                if !idle_retry && Self::rearm(vring, &mem) {
                    idle_retry = true;
                    continue;
                }
                break;
            }
            idle_retry = false;
            let lens = work(&chains, &mem);
            let used: Vec<(u16, u32)> = chains
                .iter()
                .map(DescriptorChain::head_index)
                .zip(lens)
                .collect();
            self.complete(vring, &mem, &used, what);
        }
    }

    fn process_control(&self) {
        self.drain(CONTROL_QUEUE, "control", |chains, mem| {
            chains
                .iter()
                .map(|c| self.execute(c.clone(), mem))
                .collect()
        });
    }

    /// Execute one control chain; returns the used length (the reply size, or 0).
    fn execute(&self, chain: Chain, mem: &MemGuard) -> u32 {
        let mut writer = match chain.clone().writer(&**mem) {
            Ok(w) if w.available_bytes() >= REPLY_SIZE => w,
            _ => {
                // Nowhere to put a status: not executed.
                bump(&self.counters().control_errors);
                debug!(
                    "vhost-user: {}: control chain without a reply buffer",
                    self.params.conn
                );
                return 0;
            }
        };
        let request = chain.reader(&**mem).ok().and_then(|mut r| {
            let mut buf = [0u8; REQUEST_SIZE];
            r.read_exact(&mut buf)
                .ok()
                .and_then(|()| Request::parse(&buf))
        });
        let reply = match request {
            Some(req) => {
                let resolve = |gpa| self.delivery.resolve_page(&self.delivery.mem, gpa);
                let mut out = Vec::new();
                let reply = lock(&self.router).control(
                    self.params.conn,
                    self.generation,
                    &req,
                    resolve,
                    &mut out,
                );
                self.deliver_from(out);
                match reply {
                    Some(r) => r,
                    None => return 0,
                }
            }
            None => Reply::new(Status::BadRequest, 0),
        };
        bump(&self.counters().control_requests);
        if reply.status != Status::Ok as u32 {
            bump(&self.counters().control_errors);
        }
        match writer.write_all(&reply.to_bytes()) {
            Ok(()) => REPLY_SIZE as u32,
            Err(_) => 0,
        }
    }

    fn process_doorbells(&self) {
        self.drain(DOORBELL_QUEUE, "doorbell", |chains, mem| {
            let ports: Vec<Option<Vec<u32>>> = chains
                .iter()
                .map(|c| Self::doorbell_ports(c.clone(), mem))
                .collect();
            let mut out = Vec::new();
            let router = lock(&self.router);
            for entry in &ports {
                match entry {
                    Some(list) => {
                        for &port in list {
                            bump(&self.counters().doorbells);
                            if !router.doorbell(self.params.conn, self.generation, port, &mut out) {
                                bump(&self.counters().doorbell_errors);
                            }
                        }
                    }
                    None => bump(&self.counters().doorbell_errors),
                }
            }
            drop(router);
            self.deliver_from(out);
            vec![0; chains.len()]
        });
    }

    /// The port numbers of a doorbell chain ([`crate::abi::parse_doorbell`] of its readable
    /// part).
    fn doorbell_ports(chain: Chain, mem: &MemGuard) -> Option<Vec<u32>> {
        let mut reader = chain.reader(&**mem).ok()?;
        let n = reader.available_bytes();
        if n == 0 || n > MAX_DOORBELL_PORTS * DOORBELL_ENTRY_SIZE {
            return None;
        }
        let mut bytes = vec![0u8; n];
        reader.read_exact(&mut bytes).ok()?;
        parse_doorbell(&bytes)
    }

    fn capture(&self, vrings: &[Vring]) {
        if self
            .delivery
            .vrings
            .last()
            .is_some_and(|s| s.get().is_some())
        {
            return;
        }
        for (slot, vring) in self.delivery.vrings.iter().zip(vrings) {
            let _ = slot.get_or_init(|| vring.clone());
        }
    }
}

/// Every file-backed region of `mem` must lie inside its file (`fstat` now; a file that
/// shrinks later is the SIGBUS handler's business, see [`crate::fault`]).
fn check_regions(mem: &GuestMemoryMmap) -> std::result::Result<(), String> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let gpa = region.start_addr().0;
        let size = fo
            .file()
            .metadata()
            .map_err(|e| format!("memory region at guest {gpa:#x}: fstat failed: {e}"))?
            .len();
        let end = fo.start().checked_add(region.len());
        if end.is_none_or(|end| end > size) {
            return Err(format!(
                "memory region at guest {gpa:#x}: {} bytes at file offset {:#x} is larger than its file ({size} bytes)",
                region.len(),
                fo.start()
            ));
        }
    }
    Ok(())
}

impl VhostUserBackend for Session {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        crate::abi::num_queues(self.params.upcalls)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.params.queue_size)
    }

    fn features(&self) -> u64 {
        VIRTIO_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn reset_device(&self) {
        self.delivery.reset();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend sets it on every vring; `should_notify` reads it from the queue.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.params.config.read(offset, size).unwrap_or_default()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The config space is read-only. Writes are ignored rather than refused: an error here
        // makes vhost-user-backend end the whole connection, and a guest writing its config
        // space must not be able to do that.
        debug!(
            "vhost-user: {}: ignored SET_CONFIG of {} bytes at {offset}",
            self.params.conn,
            buf.len()
        );
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        // vhost-user-backend maps each region without looking at the file's size; a region
        // that reaches past the end of its file raises SIGBUS when touched there. Refuse it:
        // the frontend gets the error (a NACK with REPLY_ACK) and loses its connection.
        let table = mem.memory().into_inner();
        if !self.delivery.cover.cover(&table) {
            let why = "its guest memory cannot be covered (too many regions)";
            self.breaker.break_connection(why);
            return Err(io::Error::other(why));
        }
        if let Err(why) = check_regions(&table) {
            self.breaker.break_connection(&why);
            return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
        }
        let resolve = |gpa| self.delivery.resolve_page(&mem, gpa);
        // Not an error for the frontend (that would end the connection): the page falls back
        // to the latch page and the guest sees it through its next REGISTER_PAGE.
        if let Err(e) = lock(&self.router).remap(self.params.conn, self.generation, resolve) {
            warn!("vhost-user: {}: memory update: {e}", self.params.conn);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread for every queue; `num_queues` is at most 64 (MAX_UPCALLS).
        let n = self.num_queues();
        vec![if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        lock(&self.exit_consumers).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Errors are never returned: that would end the worker thread for good.
        self.capture(vrings);
        if (u64::from(device_event)) == self.wake_listener().1 {
            self.delivery.take_remote();
            return Ok(());
        }
        match usize::from(device_event) {
            CONTROL_QUEUE => self.process_control(),
            DOORBELL_QUEUE => self.process_doorbells(),
            q => {
                if let Some(v) = q
                    .checked_sub(FIRST_EVENT_QUEUE)
                    .and_then(|v| u16::try_from(v).ok())
                {
                    self.delivery.refill(v);
                }
            }
        }
        Ok(())
    }
}
