// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Event-channel state of every connection and the links between their ports.
//!
//! One [`Router`] serves all sockets of a backend process, behind an `Arc<Mutex<Router>>`
//! shared by every vhost-user daemon. A *connection* ([`ConnId`]) is one listening socket; its
//! state (port states, links, counters) survives frontend reconnects on that socket. Each
//! connection owns one [`EventChannels`] model (the core's, not a copy): over the guest's
//! registered page while one is registered, otherwise over a private *latch page* that
//! collects events sent while no page is registered; they are replayed into the guest's page
//! when it is registered again.
//!
//! Ports are linked in pairs with [`Router::connect_interdomain`]: a doorbell or SEND on one
//! end is a send on the other end. Both ends may be on the same connection (loopback), even
//! the same port.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use irqbridge_core::evtchn::{EVTCHN_MAX_PORTS, UPCALL_WORD, zeroed_page};
use irqbridge_core::{
    EventChannels, EvtchnState, EvtchnStats, PortState, SendOutcome, SharedWords,
};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use crate::abi::{
    MAX_UPCALLS, Op, PORT_BOUND, PORT_CLOSED, PORT_F_LINKED, PORT_F_MASKED, PORT_F_PENDING,
    PORT_UNBOUND, PORT_UPCALL_SHIFT, Reply, Request, Status,
};
use crate::error::{Error, Result};

/// A connection: the index of a listening socket of the backend (inherited `--fd` first, then
/// the `--socket-path`s in order).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct ConnId(pub u32);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn {}", self.0)
    }
}

/// One end of a link: a port of a connection.
pub type Endpoint = (ConnId, u32);

/// Receives the upcalls of a connection that has a frontend attached: raise upcall `upcall`
/// (write an upcall record into its event queue and signal its call fd).
pub(crate) trait UpcallSink: Send + Sync + fmt::Debug {
    /// Deliver one upcall. Must not lock the router.
    fn raise(&self, upcall: u16);

    /// Deliver one upcall caused by another connection's frontend: by default as
    /// [`raise`](Self::raise); a session hands it to its own worker thread instead, so that no
    /// thread serving one frontend ever touches another frontend's descriptors.
    fn raise_remote(&self, upcall: u16) {
        self.raise(upcall);
    }
}

/// An upcall decided under the router lock, delivered after the lock is released: delivery
/// touches the frontend's vrings and call fd, and no lock shared between frontends is held
/// across a system call on a peer's descriptor.
pub(crate) type Raise = (Arc<dyn UpcallSink>, u16);

/// Deliver upcalls collected with the `*_deferred` methods. Call it without the router lock.
pub(crate) fn deliver(raises: Vec<Raise>) {
    for (sink, v) in raises {
        sink.raise(v);
    }
}

/// Counters of one connection, kept across reconnects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnCounters {
    /// Control requests executed (chains with a reply buffer).
    pub control_requests: u64,
    /// Control chains answered with an error status, or dropped for lack of a reply buffer.
    pub control_errors: u64,
    /// Port numbers taken from the doorbell queue.
    pub doorbells: u64,
    /// Malformed doorbell chains, and doorbells on invalid or unlinked ports.
    pub doorbell_errors: u64,
    /// Upcall records written into event-queue buffers.
    pub records: u64,
    /// Call-fd signals (upcall interrupts) sent, including failed writes.
    pub signals: u64,
    /// Records written without a signal because the driver suppressed it (NO_INTERRUPT or
    /// EVENT_IDX).
    pub suppressed: u64,
    /// Upcalls that found no buffer (or a stopped queue) and were delivered later.
    pub deferred: u64,
    /// Event-queue buffers shorter than a record, returned with length 0.
    pub bad_buffers: u64,
    /// Call-fd writes that failed.
    pub signal_errors: u64,
    /// Call-fd signals found the eventfd counter saturated (the frontend never reads it): the
    /// interrupt is already pending, nothing was written and nothing waited for.
    #[serde(default)]
    pub saturated: u64,
}

/// Atomic form of [`ConnCounters`], shared between the router and the connection's session.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) control_requests: AtomicU64,
    pub(crate) control_errors: AtomicU64,
    pub(crate) doorbells: AtomicU64,
    pub(crate) doorbell_errors: AtomicU64,
    pub(crate) records: AtomicU64,
    pub(crate) signals: AtomicU64,
    pub(crate) suppressed: AtomicU64,
    pub(crate) deferred: AtomicU64,
    pub(crate) bad_buffers: AtomicU64,
    pub(crate) signal_errors: AtomicU64,
    pub(crate) saturated: AtomicU64,
}

/// Add one to a counter.
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn load(&self) -> ConnCounters {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConnCounters {
            control_requests: l(&self.control_requests),
            control_errors: l(&self.control_errors),
            doorbells: l(&self.doorbells),
            doorbell_errors: l(&self.doorbell_errors),
            records: l(&self.records),
            signals: l(&self.signals),
            suppressed: l(&self.suppressed),
            deferred: l(&self.deferred),
            bad_buffers: l(&self.bad_buffers),
            signal_errors: l(&self.signal_errors),
            saturated: l(&self.saturated),
        }
    }

    fn store(&self, c: &ConnCounters) {
        let s = |a: &AtomicU64, v| a.store(v, Ordering::Relaxed);
        s(&self.control_requests, c.control_requests);
        s(&self.control_errors, c.control_errors);
        s(&self.doorbells, c.doorbells);
        s(&self.doorbell_errors, c.doorbell_errors);
        s(&self.records, c.records);
        s(&self.signals, c.signals);
        s(&self.suppressed, c.suppressed);
        s(&self.deferred, c.deferred);
        s(&self.bad_buffers, c.bad_buffers);
        s(&self.signal_errors, c.signal_errors);
        s(&self.saturated, c.saturated);
    }
}

/// Serializable state of one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnState {
    /// The connection.
    pub conn: ConnId,
    /// Guest address of the registered page, if one is registered (informational: after a
    /// restore the guest registers its page again).
    pub page_gpa: Option<u64>,
    /// Port states, the words of the current page (the guest's, or the latch page) and the
    /// event-channel counters accumulated over every page the connection used.
    pub evtchn: EvtchnState,
    /// Transport counters.
    pub counters: ConnCounters,
}

/// A link between two ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    /// One end.
    pub a: Endpoint,
    /// The other end (may equal `a`).
    pub b: Endpoint,
}

/// Serializable state of a [`Router`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterState {
    /// Ports per connection.
    pub ports: u32,
    /// Upcalls per connection.
    pub upcalls: u16,
    /// Every connection, in [`ConnId`] order.
    pub connections: Vec<ConnState>,
    /// Every link, once each.
    pub links: Vec<LinkState>,
}

/// Persistent state of one connection.
#[derive(Debug)]
struct Domain {
    evtchn: EventChannels,
    /// Guest address of the registered page; `None` while running over the latch page.
    page_gpa: Option<u64>,
    latch: Arc<dyn SharedWords>,
    /// Event-channel counters of models replaced by page switches.
    base: EvtchnStats,
    links: Vec<Option<Endpoint>>,
    sink: Option<Arc<dyn UpcallSink>>,
    /// Incremented by every attach; requests of an older session are ignored.
    generation: u64,
    counters: Arc<Counters>,
}

fn stats_add(a: EvtchnStats, b: EvtchnStats) -> EvtchnStats {
    EvtchnStats {
        sends: a.sends.wrapping_add(b.sends),
        upcalls: a.upcalls.wrapping_add(b.upcalls),
        dropped: a.dropped.wrapping_add(b.dropped),
    }
}

fn stats_sub(a: EvtchnStats, b: EvtchnStats) -> EvtchnStats {
    EvtchnStats {
        sends: a.sends.saturating_sub(b.sends),
        upcalls: a.upcalls.saturating_sub(b.upcalls),
        dropped: a.dropped.saturating_sub(b.dropped),
    }
}

fn zero(words: &dyn SharedWords) {
    for w in words.words() {
        w.store(0, Ordering::SeqCst);
    }
}

impl Domain {
    fn new(ports: u32, upcalls: u16) -> Result<Domain> {
        let latch = zeroed_page();
        Ok(Domain {
            evtchn: EventChannels::new(ports, upcalls, Arc::clone(&latch))?,
            page_gpa: None,
            latch,
            base: EvtchnStats::default(),
            links: vec![None; ports as usize],
            sink: None,
            generation: 0,
            counters: Arc::new(Counters::default()),
        })
    }

    fn stats(&self) -> EvtchnStats {
        stats_add(self.base, self.evtchn.stats())
    }

    /// Move the model onto `mem`, keeping every port state and the counters.
    fn rebuild(&mut self, mem: Arc<dyn SharedWords>) -> Result<()> {
        let mut next = EventChannels::new(self.evtchn.num_ports(), self.evtchn.num_upcalls(), mem)?;
        for port in 0..self.evtchn.num_ports() {
            match self.evtchn.state(port)? {
                PortState::Closed => {}
                PortState::Unbound => next.unbind(port)?,
                PortState::Bound { vector } => next.bind(port, vector)?,
            }
        }
        let old = std::mem::replace(&mut self.evtchn, next);
        self.base = stats_add(self.base, old.stats());
        Ok(())
    }

    /// Raise upcall `v` if a frontend is attached and the guest registered its page.
    fn raise(&self, v: u16, out: &mut Vec<Raise>) {
        if self.page_gpa.is_none() {
            return;
        }
        if let Some(sink) = &self.sink {
            out.push((Arc::clone(sink), v));
        }
    }

    fn send(&self, port: u32, out: &mut Vec<Raise>) -> Result<SendOutcome> {
        let outcome = self.evtchn.send(port)?;
        if let SendOutcome::Upcall { vector } = outcome {
            self.raise(vector, out);
        }
        Ok(outcome)
    }

    /// Switch to the guest's page at `gpa`. Coming from the latch page, every open port pending
    /// there is sent again on the new page (invisible in the counters); then every upcall whose
    /// `upcall_pending` is set on the new page is raised, so that nothing latched before or
    /// left over from a previous frontend is lost.
    fn register_page(
        &mut self,
        page: Arc<dyn SharedWords>,
        gpa: u64,
        out: &mut Vec<Raise>,
    ) -> Result<()> {
        let replay: Vec<u32> = if self.page_gpa.is_none() {
            (0..self.evtchn.num_ports())
                .filter(|&p| {
                    self.evtchn.state(p).is_ok_and(|s| s != PortState::Closed)
                        && self.evtchn.is_pending(p).unwrap_or(false)
                })
                .collect()
        } else {
            Vec::new()
        };
        self.rebuild(page)?;
        zero(self.latch.as_ref());
        self.page_gpa = Some(gpa);
        let before = self.evtchn.stats();
        for &port in &replay {
            self.evtchn.send(port)?;
        }
        let replayed = stats_sub(self.evtchn.stats(), before);
        self.base = stats_sub(self.base, replayed);
        for v in 0..self.evtchn.num_upcalls() {
            let word = UPCALL_WORD + 2 * usize::from(v);
            let pending = self
                .evtchn
                .memory()
                .words()
                .get(word)
                .is_some_and(|w| w.load(Ordering::SeqCst) != 0);
            if pending {
                self.raise(v, out);
            }
        }
        debug!(
            "vhost-user: page at {gpa:#x} registered, {} latched events replayed",
            replay.len()
        );
        Ok(())
    }

    /// Go back to the (zeroed) latch page.
    fn unregister_page(&mut self) -> Result<()> {
        if self.page_gpa.take().is_some() {
            zero(self.latch.as_ref());
            self.rebuild(Arc::clone(&self.latch))?;
        }
        Ok(())
    }

    fn status_word(&self, port: u32) -> Result<u32> {
        let mut word = match self.evtchn.state(port)? {
            PortState::Closed => PORT_CLOSED,
            PortState::Unbound => PORT_UNBOUND,
            PortState::Bound { vector } => PORT_BOUND | (u32::from(vector) << PORT_UPCALL_SHIFT),
        };
        if self.links.get(port as usize).is_some_and(Option::is_some) {
            word |= PORT_F_LINKED;
        }
        if self.evtchn.is_pending(port)? {
            word |= PORT_F_PENDING;
        }
        if self.evtchn.is_masked(port)? {
            word |= PORT_F_MASKED;
        }
        Ok(word)
    }
}

/// Event-channel state of every connection of a backend, and the links between their ports.
#[derive(Debug)]
pub struct Router {
    domains: Vec<Domain>,
    ports: u32,
    upcalls: u16,
}

impl Router {
    /// `connections` connections with `ports` ports (1..=4096) and `upcalls` upcalls (1..=62)
    /// each, every port closed and unlinked.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if a count is out of range.
    pub fn new(connections: u32, ports: u32, upcalls: u16) -> Result<Router> {
        if connections == 0 {
            return Err(Error::InvalidConfig("no connections".into()));
        }
        if ports == 0 || ports > EVTCHN_MAX_PORTS {
            return Err(Error::InvalidConfig(format!(
                "port count {ports} is not in 1..={EVTCHN_MAX_PORTS}"
            )));
        }
        if upcalls == 0 || upcalls > MAX_UPCALLS {
            return Err(Error::InvalidConfig(format!(
                "upcall count {upcalls} is not in 1..={MAX_UPCALLS}"
            )));
        }
        let domains = (0..connections)
            .map(|_| Domain::new(ports, upcalls))
            .collect::<Result<Vec<_>>>()?;
        Ok(Router {
            domains,
            ports,
            upcalls,
        })
    }

    /// Number of connections.
    pub fn num_connections(&self) -> u32 {
        // At most u32::MAX: built from a u32 count.
        self.domains.len() as u32
    }

    /// Ports per connection.
    pub fn num_ports(&self) -> u32 {
        self.ports
    }

    /// Upcalls per connection.
    pub fn num_upcalls(&self) -> u16 {
        self.upcalls
    }

    fn domain(&self, conn: ConnId) -> Result<&Domain> {
        self.domains
            .get(conn.0 as usize)
            .ok_or(Error::UnknownConnection(conn.0))
    }

    fn domain_mut(&mut self, conn: ConnId) -> Result<&mut Domain> {
        self.domains
            .get_mut(conn.0 as usize)
            .ok_or(Error::UnknownConnection(conn.0))
    }

    fn check_end(&self, (conn, port): Endpoint) -> Result<()> {
        self.domain(conn)?;
        if port >= self.ports {
            return Err(Error::Evtchn(irqbridge_core::Error::InvalidPort(port)));
        }
        Ok(())
    }

    /// Link port `a` with port `b`: a doorbell or SEND on either end is a send on the other.
    /// Both ends may belong to the same connection (loopback) and may be the same port. Links
    /// either end had before are removed first. Port states are not changed: the ports need
    /// not be open, a send to a closed port is dropped and counted as usual.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`] or [`Error::Evtchn`] (bad port); nothing changes then.
    pub fn connect_interdomain(&mut self, a: Endpoint, b: Endpoint) -> Result<()> {
        self.check_end(a)?;
        self.check_end(b)?;
        self.disconnect_port(a)?;
        self.disconnect_port(b)?;
        self.set_link(a, Some(b));
        self.set_link(b, Some(a));
        info!(
            "vhost-user: linked {} port {} with {} port {}",
            a.0, a.1, b.0, b.1
        );
        Ok(())
    }

    fn set_link(&mut self, (conn, port): Endpoint, to: Option<Endpoint>) {
        if let Some(slot) = self
            .domains
            .get_mut(conn.0 as usize)
            .and_then(|d| d.links.get_mut(port as usize))
        {
            *slot = to;
        }
    }

    /// Remove the link of `end`, if any, from both ends; returns the former peer.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`] or [`Error::Evtchn`] (bad port).
    pub fn disconnect_port(&mut self, end: Endpoint) -> Result<Option<Endpoint>> {
        let peer = self.peer(end)?;
        if let Some(p) = peer {
            self.set_link(end, None);
            self.set_link(p, None);
        }
        Ok(peer)
    }

    /// The other end of `end`'s link.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`] or [`Error::Evtchn`] (bad port).
    pub fn peer(&self, end: Endpoint) -> Result<Option<Endpoint>> {
        self.check_end(end)?;
        Ok(self
            .domain(end.0)?
            .links
            .get(end.1 as usize)
            .copied()
            .flatten())
    }

    /// Send an event to the guest on `port` of `conn` (what a device or another domain does):
    /// the core's send, plus the upcall if it returns one (written into the event queue and
    /// signalled on its call fd, or deferred). Works while no frontend is attached: the event
    /// is latched and delivered when the guest registers its page.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`] or [`Error::Evtchn`] (bad port).
    pub fn send(&self, conn: ConnId, port: u32) -> Result<SendOutcome> {
        let mut out = Vec::new();
        let r = self.send_deferred(conn, port, &mut out);
        deliver(out);
        r
    }

    /// [`send`](Self::send), with the upcall collected into `out` for [`deliver`].
    pub(crate) fn send_deferred(
        &self,
        conn: ConnId,
        port: u32,
        out: &mut Vec<Raise>,
    ) -> Result<SendOutcome> {
        self.domain(conn)?.send(port, out)
    }

    /// What a doorbell on `port` of `conn` does: send on the other end of its link.
    ///
    /// # Errors
    ///
    /// [`Error::NotConnected`] if the port has no link, or as [`send`](Self::send).
    pub fn send_to_peer(&self, conn: ConnId, port: u32) -> Result<SendOutcome> {
        let mut out = Vec::new();
        let r = self.send_to_peer_deferred(conn, port, &mut out);
        deliver(out);
        r
    }

    /// [`send_to_peer`](Self::send_to_peer), with the upcall collected into `out` for
    /// [`deliver`].
    pub(crate) fn send_to_peer_deferred(
        &self,
        conn: ConnId,
        port: u32,
        out: &mut Vec<Raise>,
    ) -> Result<SendOutcome> {
        let (pc, pp) = self
            .peer((conn, port))?
            .ok_or(Error::NotConnected { conn: conn.0, port })?;
        self.send_deferred(pc, pp, out)
    }

    /// State of `port` of `conn`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`] or [`Error::Evtchn`] (bad port).
    pub fn port_state(&self, conn: ConnId, port: u32) -> Result<PortState> {
        Ok(self.domain(conn)?.evtchn.state(port)?)
    }

    /// Whether `port`'s pending bit is set in the connection's current page.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`] or [`Error::Evtchn`] (bad port).
    pub fn is_pending(&self, conn: ConnId, port: u32) -> Result<bool> {
        Ok(self.domain(conn)?.evtchn.is_pending(port)?)
    }

    /// Whether `port`'s mask bit is set in the connection's current page.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`] or [`Error::Evtchn`] (bad port).
    pub fn is_masked(&self, conn: ConnId, port: u32) -> Result<bool> {
        Ok(self.domain(conn)?.evtchn.is_masked(port)?)
    }

    /// The STATUS word of `port` (docs/evtchn-virtio.md).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`] or [`Error::Evtchn`] (bad port).
    pub fn status_word(&self, conn: ConnId, port: u32) -> Result<u32> {
        self.domain(conn)?.status_word(port)
    }

    /// Event-channel counters of `conn`, accumulated over every page it used.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`].
    pub fn stats(&self, conn: ConnId) -> Result<EvtchnStats> {
        Ok(self.domain(conn)?.stats())
    }

    /// Transport counters of `conn`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`].
    pub fn counters(&self, conn: ConnId) -> Result<ConnCounters> {
        Ok(self.domain(conn)?.counters.load())
    }

    /// Guest address of `conn`'s registered page.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`].
    pub fn page_gpa(&self, conn: ConnId) -> Result<Option<u64>> {
        Ok(self.domain(conn)?.page_gpa)
    }

    /// Whether a frontend is connected on `conn`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`].
    pub fn is_attached(&self, conn: ConnId) -> Result<bool> {
        Ok(self.domain(conn)?.sink.is_some())
    }

    /// State of every connection and link.
    pub fn snapshot(&self) -> RouterState {
        let connections = self
            .domains
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut evtchn = d.evtchn.snapshot();
                evtchn.stats = d.stats();
                ConnState {
                    conn: ConnId(i as u32),
                    page_gpa: d.page_gpa,
                    evtchn,
                    counters: d.counters.load(),
                }
            })
            .collect();
        let mut seen = BTreeSet::new();
        let mut links = Vec::new();
        for (i, d) in self.domains.iter().enumerate() {
            for (port, peer) in d.links.iter().enumerate() {
                let a = (ConnId(i as u32), port as u32);
                if let Some(b) = *peer {
                    let key = if a <= b { (a, b) } else { (b, a) };
                    if seen.insert(key) {
                        links.push(LinkState { a: key.0, b: key.1 });
                    }
                }
            }
        }
        RouterState {
            ports: self.ports,
            upcalls: self.upcalls,
            connections,
            links,
        }
    }

    /// Restore port states, links and counters from `state`. Each connection goes back to its
    /// latch page holding the snapshot's page words: events pending there are delivered when
    /// the guest registers its page.
    ///
    /// # Errors
    ///
    /// [`Error::Snapshot`] if the sizes differ, a link is invalid, or a connection has a
    /// registered page (restore before the guests register); nothing changes then.
    pub fn restore(&mut self, state: &RouterState) -> Result<()> {
        if state.ports != self.ports
            || state.upcalls != self.upcalls
            || state.connections.len() != self.domains.len()
        {
            return Err(Error::Snapshot(format!(
                "it has {} connections of {} ports and {} upcalls; this backend has {} of {} and {}",
                state.connections.len(),
                state.ports,
                state.upcalls,
                self.domains.len(),
                self.ports,
                self.upcalls
            )));
        }
        if let Some((i, _)) = self
            .domains
            .iter()
            .enumerate()
            .find(|(_, d)| d.page_gpa.is_some())
        {
            return Err(Error::Snapshot(format!(
                "connection {i} has a registered page"
            )));
        }
        for l in &state.links {
            if self.check_end(l.a).is_err() || self.check_end(l.b).is_err() {
                return Err(Error::Snapshot(format!("invalid link {l:?}")));
            }
        }
        let mut models = Vec::with_capacity(self.domains.len());
        for (i, c) in state.connections.iter().enumerate() {
            if c.conn != ConnId(i as u32) {
                return Err(Error::Snapshot(format!(
                    "connection {i} is stored as {}",
                    c.conn
                )));
            }
            let latch = zeroed_page();
            let mut model = EventChannels::new(self.ports, self.upcalls, Arc::clone(&latch))?;
            model
                .restore(&c.evtchn)
                .map_err(|e| Error::Snapshot(e.to_string()))?;
            models.push((latch, model));
        }
        for ((d, c), (latch, model)) in self.domains.iter_mut().zip(&state.connections).zip(models)
        {
            d.latch = latch;
            d.evtchn = model;
            d.base = EvtchnStats::default();
            d.links.fill(None);
            d.counters.store(&c.counters);
        }
        for l in &state.links {
            self.set_link(l.a, Some(l.b));
            self.set_link(l.b, Some(l.a));
        }
        Ok(())
    }

    /// A frontend connected on `conn`: upcalls go to `sink` from now on. Returns the
    /// generation that the session passes back with its requests.
    pub(crate) fn attach(&mut self, conn: ConnId, sink: Arc<dyn UpcallSink>) -> Result<u64> {
        let d = self.domain_mut(conn)?;
        d.generation = d.generation.wrapping_add(1);
        d.sink = Some(sink);
        Ok(d.generation)
    }

    /// The shared counters of `conn`, for its sessions.
    pub(crate) fn counters_arc(&self, conn: ConnId) -> Result<Arc<Counters>> {
        Ok(Arc::clone(&self.domain(conn)?.counters))
    }

    /// The frontend of generation `generation` left `conn`: drop its sink and go back to the
    /// latch page (the guest registers its page again after a reconnect).
    pub(crate) fn detach(&mut self, conn: ConnId, generation: u64) -> Result<()> {
        let d = self.domain_mut(conn)?;
        if d.generation != generation {
            return Ok(());
        }
        d.sink = None;
        d.unregister_page()
    }

    /// The frontend replaced its memory table: resolve the registered page again with
    /// `resolve`, or fall back to the latch page if it is gone.
    pub(crate) fn remap(
        &mut self,
        conn: ConnId,
        generation: u64,
        resolve: impl FnOnce(u64) -> Result<Arc<dyn SharedWords>>,
    ) -> Result<()> {
        let d = self.domain_mut(conn)?;
        if d.generation != generation {
            return Ok(());
        }
        let Some(gpa) = d.page_gpa else {
            return Ok(());
        };
        match resolve(gpa) {
            Ok(page) => d.rebuild(page),
            Err(e) => {
                warn!("vhost-user: {conn}: event-channel page lost after a memory update: {e}");
                d.unregister_page()
            }
        }
    }

    /// Execute one guest control request of `conn`. `resolve` turns a REGISTER_PAGE address
    /// into the page. `None` if the request comes from a session that is no longer attached.
    /// Upcalls it causes are collected into `out` for [`deliver`].
    pub(crate) fn control(
        &mut self,
        conn: ConnId,
        generation: u64,
        req: &Request,
        resolve: impl FnOnce(u64) -> Result<Arc<dyn SharedWords>>,
        out: &mut Vec<Raise>,
    ) -> Option<Reply> {
        let ports = self.ports;
        let upcalls = self.upcalls;
        if self.domain(conn).ok()?.generation != generation {
            return None;
        }
        let Ok(op) = Op::try_from(req.op) else {
            return Some(Reply::new(Status::UnknownOp, 0));
        };
        let uses_port = !matches!(op, Op::RegisterPage | Op::Reset);
        let uses_arg = matches!(op, Op::RegisterPage | Op::Bind);
        if (!uses_port && req.port != 0) || (!uses_arg && req.arg != 0) {
            return Some(Reply::new(Status::BadRequest, 0));
        }
        if uses_port && req.port >= ports {
            return Some(Reply::new(Status::BadPort, 0));
        }
        let port = req.port;
        if op == Op::Send {
            return Some(match self.send_to_peer_deferred(conn, port, out) {
                Ok(_) => Reply::new(Status::Ok, 0),
                Err(Error::NotConnected { .. }) => Reply::new(Status::NotConnected, 0),
                Err(e) => {
                    warn!("vhost-user: {conn}: SEND failed: {e}");
                    Reply::new(Status::BadRequest, 0)
                }
            });
        }
        let d = self.domain_mut(conn).ok()?;
        let ok = Reply::new(Status::Ok, 0);
        // Errors below cannot happen (ranges checked above); report them as bad requests.
        let internal = |e: Error| {
            warn!("vhost-user: {conn}: control {op:?} failed: {e}");
            Reply::new(Status::BadRequest, 0)
        };
        let reply = match op {
            Op::RegisterPage => match resolve(req.arg) {
                Ok(page) => d
                    .register_page(page, req.arg, out)
                    .map_or_else(internal, |()| ok),
                Err(e) => {
                    debug!("vhost-user: {conn}: REGISTER_PAGE refused: {e}");
                    Reply::new(Status::BadAddress, 0)
                }
            },
            Op::Bind => match u16::try_from(req.arg) {
                Ok(v) if v < upcalls => {
                    let raised = d
                        .evtchn
                        .bind(port, v)
                        .and_then(|()| d.evtchn.retrigger(port));
                    match raised {
                        Ok(Some(v)) => {
                            d.raise(v, out);
                            ok
                        }
                        Ok(None) => ok,
                        Err(e) => internal(e.into()),
                    }
                }
                _ => Reply::new(Status::BadUpcall, 0),
            },
            Op::Unbind => d
                .evtchn
                .unbind(port)
                .map_or_else(|e| internal(e.into()), |()| ok),
            Op::Close => d
                .evtchn
                .close(port)
                .map_or_else(|e| internal(e.into()), |()| ok),
            Op::Unmask => {
                if d.page_gpa.is_none() {
                    Reply::new(Status::NoPage, 0)
                } else {
                    match d.evtchn.unmask(port) {
                        Ok(Some(v)) => {
                            d.raise(v, out);
                            ok
                        }
                        Ok(None) => ok,
                        Err(e) => internal(e.into()),
                    }
                }
            }
            Op::Status => d
                .status_word(port)
                .map_or_else(internal, |w| Reply::new(Status::Ok, w)),
            Op::Reset => {
                d.evtchn.reset();
                ok
            }
            // Handled above.
            Op::Send => ok,
        };
        Some(reply)
    }

    /// A doorbell of `conn` (generation `generation`) on `port`, its upcall collected into
    /// `out` for [`deliver`]. `false` if it did nothing (bad port, no link, stale session).
    pub(crate) fn doorbell(
        &self,
        conn: ConnId,
        generation: u64,
        port: u32,
        out: &mut Vec<Raise>,
    ) -> bool {
        match self.domain(conn) {
            Ok(d) if d.generation == generation => {
                self.send_to_peer_deferred(conn, port, out).is_ok()
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqbridge_core::evtchn::{MASK_WORD, guest_collect};
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<u16>>);

    impl UpcallSink for Recorder {
        fn raise(&self, upcall: u16) {
            self.0.lock().unwrap().push(upcall);
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<u16> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    const C0: ConnId = ConnId(0);
    const C1: ConnId = ConnId(1);

    fn req(op: Op, port: u32, arg: u64) -> Request {
        Request::new(op, port, arg)
    }

    /// Attach a recorder to `conn` and register `page` as its page at `gpa`.
    fn attach_with_page(
        r: &mut Router,
        conn: ConnId,
        page: &Arc<dyn SharedWords>,
        gpa: u64,
    ) -> (u64, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let generation = r.attach(conn, rec.clone()).unwrap();
        let p = Arc::clone(page);
        let mut out = Vec::new();
        let reply = r
            .control(
                conn,
                generation,
                &req(Op::RegisterPage, 0, gpa),
                |_| Ok(p),
                &mut out,
            )
            .unwrap();
        deliver(out);
        assert_eq!(reply.status(), Some(Status::Ok));
        (generation, rec)
    }

    fn ctl(r: &mut Router, conn: ConnId, generation: u64, q: Request) -> Reply {
        let mut out = Vec::new();
        let reply = r
            .control(
                conn,
                generation,
                &q,
                |gpa| {
                    Err(Error::BadPage {
                        gpa,
                        reason: "test",
                    })
                },
                &mut out,
            )
            .unwrap();
        deliver(out);
        reply
    }

    fn doorbell(r: &Router, conn: ConnId, generation: u64, port: u32) -> bool {
        let mut out = Vec::new();
        let done = r.doorbell(conn, generation, port, &mut out);
        deliver(out);
        done
    }

    #[test]
    fn config_limits() {
        assert!(Router::new(0, 1, 1).is_err());
        assert!(Router::new(1, 0, 1).is_err());
        assert!(Router::new(1, 4097, 1).is_err());
        assert!(Router::new(1, 1, 0).is_err());
        assert!(Router::new(1, 1, 63).is_err());
        let r = Router::new(2, 4096, 62).unwrap();
        assert_eq!(
            (r.num_connections(), r.num_ports(), r.num_upcalls()),
            (2, 4096, 62)
        );
    }

    #[test]
    fn control_ops_and_statuses() {
        let mut r = Router::new(1, 128, 2).unwrap();
        let page = zeroed_page();
        let (g, rec) = attach_with_page(&mut r, C0, &page, 0x1000);
        let st = |r: &mut Router, p| ctl(r, C0, g, req(Op::Status, p, 0));
        assert_eq!(st(&mut r, 5), Reply::new(Status::Ok, PORT_CLOSED));
        assert_eq!(
            ctl(&mut r, C0, g, req(Op::Bind, 5, 1)).status(),
            Some(Status::Ok)
        );
        assert_eq!(st(&mut r, 5).value, PORT_BOUND | (1 << 16));
        assert_eq!(r.send(C0, 5).unwrap(), SendOutcome::Upcall { vector: 1 });
        assert_eq!(rec.take(), [1]);
        assert_eq!(st(&mut r, 5).value, PORT_BOUND | (1 << 16) | PORT_F_PENDING);
        assert_eq!(guest_collect(page.words(), 1), [5]);

        // Masked: pending, no upcall; UNMASK raises once.
        page.words()[MASK_WORD].fetch_or(1 << 5, Ordering::SeqCst);
        assert_eq!(r.send(C0, 5).unwrap(), SendOutcome::Masked);
        assert!(rec.take().is_empty());
        assert_eq!(
            st(&mut r, 5).value,
            PORT_BOUND | (1 << 16) | PORT_F_PENDING | PORT_F_MASKED
        );
        assert_eq!(
            ctl(&mut r, C0, g, req(Op::Unmask, 5, 0)).status(),
            Some(Status::Ok)
        );
        assert_eq!(rec.take(), [1]);
        assert_eq!(
            ctl(&mut r, C0, g, req(Op::Unmask, 5, 0)).status(),
            Some(Status::Ok)
        );
        assert!(
            rec.take().is_empty(),
            "selector still set: no second upcall"
        );
        assert_eq!(guest_collect(page.words(), 1), [5]);

        // Unbind, close, errors.
        assert_eq!(
            ctl(&mut r, C0, g, req(Op::Unbind, 5, 0)).status(),
            Some(Status::Ok)
        );
        assert_eq!(st(&mut r, 5).value, PORT_UNBOUND);
        assert_eq!(
            ctl(&mut r, C0, g, req(Op::Close, 5, 0)).status(),
            Some(Status::Ok)
        );
        assert_eq!(st(&mut r, 5).value, PORT_CLOSED);
        let status = |r: &mut Router, q| ctl(r, C0, g, q).status();
        assert_eq!(status(&mut r, req(Op::Bind, 128, 0)), Some(Status::BadPort));
        assert_eq!(status(&mut r, req(Op::Bind, 1, 2)), Some(Status::BadUpcall));
        assert_eq!(
            status(&mut r, req(Op::Bind, 1, 1 << 16)),
            Some(Status::BadUpcall)
        );
        assert_eq!(
            status(&mut r, req(Op::Close, 1, 1)),
            Some(Status::BadRequest)
        );
        assert_eq!(
            status(&mut r, req(Op::Reset, 1, 0)),
            Some(Status::BadRequest)
        );
        assert_eq!(
            status(&mut r, req(Op::RegisterPage, 1, 0)),
            Some(Status::BadRequest)
        );
        assert_eq!(
            status(&mut r, req(Op::RegisterPage, 0, 8)),
            Some(Status::BadAddress)
        );
        assert_eq!(
            status(&mut r, req(Op::Send, 1, 0)),
            Some(Status::NotConnected)
        );
        assert_eq!(
            ctl(
                &mut r,
                C0,
                g,
                Request {
                    op: 0,
                    port: 0,
                    arg: 0
                }
            )
            .status(),
            Some(Status::UnknownOp)
        );
        assert_eq!(
            ctl(
                &mut r,
                C0,
                g,
                Request {
                    op: 99,
                    port: 0,
                    arg: 0
                }
            )
            .status(),
            Some(Status::UnknownOp)
        );
        // A stale generation gets no reply and changes nothing.
        assert_eq!(
            r.control(
                C0,
                g + 1,
                &req(Op::Bind, 1, 0),
                |_| unreachable!(),
                &mut Vec::new()
            ),
            None
        );
        assert_eq!(r.port_state(C0, 1).unwrap(), PortState::Closed);
        assert!(rec.take().is_empty());
    }

    #[test]
    fn bind_of_pending_port_raises_and_reset_closes() {
        let mut r = Router::new(1, 64, 1).unwrap();
        let page = zeroed_page();
        let (g, rec) = attach_with_page(&mut r, C0, &page, 0);
        ctl(&mut r, C0, g, req(Op::Unbind, 3, 0));
        assert_eq!(r.send(C0, 3).unwrap(), SendOutcome::NotBound);
        assert!(rec.take().is_empty());
        ctl(&mut r, C0, g, req(Op::Bind, 3, 0));
        assert_eq!(rec.take(), [0], "binding a pending port raises its upcall");
        assert_eq!(
            ctl(&mut r, C0, g, req(Op::Reset, 0, 0)).status(),
            Some(Status::Ok)
        );
        assert_eq!(r.port_state(C0, 3).unwrap(), PortState::Closed);
        assert!(page.words().iter().all(|w| w.load(Ordering::SeqCst) == 0));
    }

    #[test]
    fn links_route_sends_between_connections() {
        let mut r = Router::new(2, 64, 1).unwrap();
        let pa = zeroed_page();
        let pb = zeroed_page();
        let (ga, reca) = attach_with_page(&mut r, C0, &pa, 0);
        let (gb, recb) = attach_with_page(&mut r, C1, &pb, 0);
        ctl(&mut r, C0, ga, req(Op::Bind, 1, 0));
        ctl(&mut r, C1, gb, req(Op::Bind, 2, 0));
        r.connect_interdomain((C0, 1), (C1, 2)).unwrap();
        assert_eq!(r.peer((C0, 1)).unwrap(), Some((C1, 2)));
        assert_eq!(r.peer((C1, 2)).unwrap(), Some((C0, 1)));
        assert_ne!(
            ctl(&mut r, C0, ga, req(Op::Status, 1, 0)).value & PORT_F_LINKED,
            0
        );
        // Doorbell in A on port 1 → event on B's port 2, and back.
        assert!(doorbell(&r, C0, ga, 1));
        assert_eq!(recb.take(), [0]);
        assert!(reca.take().is_empty());
        assert_eq!(guest_collect(pb.words(), 0), [2]);
        assert_eq!(
            ctl(&mut r, C1, gb, req(Op::Send, 2, 0)).status(),
            Some(Status::Ok)
        );
        assert_eq!(reca.take(), [0]);
        assert_eq!(guest_collect(pa.words(), 0), [1]);
        // A stale generation's doorbell does nothing.
        assert!(!doorbell(&r, C0, ga + 7, 1));
        assert!(!doorbell(&r, C0, ga, 3), "no link");
        assert!(!doorbell(&r, C0, ga, 64), "bad port");
        // Relinking drops the old links at both ends.
        r.connect_interdomain((C0, 1), (C0, 4)).unwrap();
        assert_eq!(r.peer((C1, 2)).unwrap(), None);
        assert_eq!(r.peer((C0, 4)).unwrap(), Some((C0, 1)));
        // Self-loop.
        r.connect_interdomain((C1, 2), (C1, 2)).unwrap();
        assert!(doorbell(&r, C1, gb, 2));
        assert_eq!(recb.take(), [0]);
        assert_eq!(r.disconnect_port((C1, 2)).unwrap(), Some((C1, 2)));
        assert_eq!(r.peer((C1, 2)).unwrap(), None);
        assert!(matches!(
            r.connect_interdomain((C0, 1), (ConnId(2), 0)),
            Err(Error::UnknownConnection(2))
        ));
        assert!(r.connect_interdomain((C0, 64), (C1, 0)).is_err());
        assert_eq!(
            r.peer((C0, 1)).unwrap(),
            Some((C0, 4)),
            "failed relink changes nothing"
        );
        assert!(matches!(
            r.send_to_peer(C1, 2),
            Err(Error::NotConnected { conn: 1, port: 2 })
        ));
    }

    #[test]
    fn events_latched_while_detached_are_replayed_once() {
        let mut r = Router::new(1, 256, 2).unwrap();
        let page = zeroed_page();
        let (g, rec) = attach_with_page(&mut r, C0, &page, 0x2000);
        for p in [1, 70, 200] {
            ctl(&mut r, C0, g, req(Op::Bind, p, u64::from(p % 2)));
        }
        ctl(&mut r, C0, g, req(Op::Unbind, 150, 0));
        r.detach(C0, g).unwrap();
        assert!(!r.is_attached(C0).unwrap());
        assert_eq!(r.page_gpa(C0).unwrap(), None);
        for p in [1, 70, 200, 150, 10] {
            r.send(C0, p).unwrap();
        }
        assert!(rec.take().is_empty());
        assert!(r.is_pending(C0, 70).unwrap(), "latched");
        assert!(!r.is_pending(C0, 10).unwrap(), "closed port dropped");
        let before = r.stats(C0).unwrap();
        assert_eq!((before.sends, before.dropped), (5, 1));
        // Ports survive; a new frontend registers the page again.
        assert_eq!(
            r.port_state(C0, 70).unwrap(),
            PortState::Bound { vector: 0 }
        );
        let (_, rec2) = attach_with_page(&mut r, C0, &page, 0x2000);
        let mut raised = rec2.take();
        raised.sort_unstable();
        assert_eq!(raised, [0, 1]);
        assert_eq!(guest_collect(page.words(), 0), [70, 200]);
        assert_eq!(guest_collect(page.words(), 1), [1]);
        assert!(
            r.is_pending(C0, 150).unwrap(),
            "unbound port keeps its pending bit"
        );
        assert_eq!(r.stats(C0).unwrap().sends, 5, "replay is not counted");
    }

    #[test]
    fn snapshot_round_trip() {
        let mut r = Router::new(2, 64, 2).unwrap();
        let page = zeroed_page();
        let (g, _rec) = attach_with_page(&mut r, C0, &page, 0x3000);
        ctl(&mut r, C0, g, req(Op::Bind, 7, 1));
        r.connect_interdomain((C0, 7), (C1, 3)).unwrap();
        r.connect_interdomain((C1, 5), (C1, 5)).unwrap();
        r.send(C0, 7).unwrap();
        let snap = r.snapshot();
        assert_eq!(snap.connections[0].page_gpa, Some(0x3000));
        assert_eq!(snap.links.len(), 2);
        let json = serde_json::to_string(&snap).unwrap();
        let back: RouterState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);

        assert!(
            matches!(r.restore(&back), Err(Error::Snapshot(_))),
            "page registered"
        );
        let mut other = Router::new(2, 64, 1).unwrap();
        assert!(matches!(other.restore(&back), Err(Error::Snapshot(_))));

        let mut fresh = Router::new(2, 64, 2).unwrap();
        fresh.restore(&back).unwrap();
        assert_eq!(
            fresh.port_state(C0, 7).unwrap(),
            PortState::Bound { vector: 1 }
        );
        assert_eq!(fresh.peer((C1, 3)).unwrap(), Some((C0, 7)));
        assert_eq!(fresh.peer((C1, 5)).unwrap(), Some((C1, 5)));
        assert_eq!(fresh.stats(C0).unwrap(), r.stats(C0).unwrap());
        assert!(fresh.is_pending(C0, 7).unwrap());
        // The latched event is delivered when the guest registers.
        let page2 = zeroed_page();
        let (_, rec) = attach_with_page(&mut fresh, C0, &page2, 0x3000);
        assert_eq!(rec.take(), [1]);
        assert_eq!(guest_collect(page2.words(), 1), [7]);
        let again = fresh.snapshot();
        assert_eq!(again.links, snap.links);
    }

    #[test]
    fn remap_falls_back_to_latch_when_the_page_is_gone() {
        let mut r = Router::new(1, 64, 1).unwrap();
        let page = zeroed_page();
        let (g, rec) = attach_with_page(&mut r, C0, &page, 0x1000);
        ctl(&mut r, C0, g, req(Op::Bind, 1, 0));
        let moved = zeroed_page();
        let m = Arc::clone(&moved);
        r.remap(C0, g, |_| Ok(m)).unwrap();
        r.send(C0, 1).unwrap();
        assert_eq!(rec.take(), [0]);
        assert_eq!(guest_collect(moved.words(), 0), [1]);
        r.remap(C0, g, |gpa| {
            Err(Error::BadPage {
                gpa,
                reason: "gone",
            })
        })
        .unwrap();
        assert_eq!(r.page_gpa(C0).unwrap(), None);
        r.send(C0, 1).unwrap();
        assert!(rec.take().is_empty(), "latched, not raised");
        assert_eq!(r.port_state(C0, 1).unwrap(), PortState::Bound { vector: 0 });
    }
}
