// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest-facing request path without virtqueues: raw control-request bytes and doorbell
//! buffers go through the same decoding ([`crate::abi`]) and the same [`Router`] code as in
//! the backend, with a guest attached to every connection. For fuzzing
//! (`crates/irqbridge-vhost-user/fuzz`) and tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use irqbridge_core::SharedWords;
use irqbridge_core::evtchn::{EVTCHN_PAGE_SIZE, zeroed_page};

use crate::abi::{Reply, Request, Status, parse_doorbell};
use crate::error::{Error, Result};
use crate::router::{ConnId, Endpoint, Raise, Router, UpcallSink, deliver};

/// Guest pages a harness guest can register: `REGISTER_PAGE` of `k * 4096` for `k` below this
/// resolves to page `k` of its connection; any other address is refused as the backend
/// refuses an address outside guest memory.
pub const HARNESS_PAGES: u64 = 4;

/// Counts the upcalls of one connection.
#[derive(Debug, Default)]
struct Counter(AtomicU64);

impl UpcallSink for Counter {
    fn raise(&self, _upcall: u16) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A [`Router`] with an attached guest on every connection (see the module documentation).
#[derive(Debug)]
pub struct ControlHarness {
    router: Router,
    generations: Vec<u64>,
    sinks: Vec<Arc<Counter>>,
    pages: HashMap<(u32, u64), Arc<dyn SharedWords>>,
}

impl ControlHarness {
    /// `connections` connections of `ports` ports and `upcalls` upcalls, each with a guest
    /// attached.
    ///
    /// # Errors
    ///
    /// As [`Router::new`].
    pub fn new(connections: u32, ports: u32, upcalls: u16) -> Result<ControlHarness> {
        let mut router = Router::new(connections, ports, upcalls)?;
        let mut generations = Vec::new();
        let mut sinks = Vec::new();
        for c in 0..connections {
            let sink = Arc::new(Counter::default());
            generations.push(router.attach(ConnId(c), sink.clone())?);
            sinks.push(sink);
        }
        Ok(ControlHarness {
            router,
            generations,
            sinks,
            pages: HashMap::new(),
        })
    }

    fn generation(&self, conn: ConnId) -> Result<u64> {
        self.generations
            .get(conn.0 as usize)
            .copied()
            .ok_or(Error::UnknownConnection(conn.0))
    }

    /// Execute the control request in `bytes` (the readable part of a control chain) for the
    /// guest of `conn`, as the backend does, and return the reply it would write.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`].
    pub fn control(&mut self, conn: ConnId, bytes: &[u8]) -> Result<Reply> {
        let generation = self.generation(conn)?;
        let Some(req) = Request::parse(bytes) else {
            return Ok(Reply::new(Status::BadRequest, 0));
        };
        let pages = &mut self.pages;
        let resolve = |gpa: u64| {
            let k = gpa / EVTCHN_PAGE_SIZE as u64;
            if gpa % EVTCHN_PAGE_SIZE as u64 != 0 || k >= HARNESS_PAGES {
                return Err(Error::BadPage {
                    gpa,
                    reason: "not a harness page",
                });
            }
            Ok(Arc::clone(
                pages.entry((conn.0, k)).or_insert_with(zeroed_page),
            ))
        };
        let mut out: Vec<Raise> = Vec::new();
        let reply = self
            .router
            .control(conn, generation, &req, resolve, &mut out)
            .unwrap_or(Reply::new(Status::BadRequest, 0));
        deliver(out);
        Ok(reply)
    }

    /// A doorbell buffer `bytes` of `conn`: every port in it rung, as the backend does.
    /// Returns the number of ports that did something, or `None` for a malformed buffer.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownConnection`].
    pub fn doorbell(&mut self, conn: ConnId, bytes: &[u8]) -> Result<Option<usize>> {
        let generation = self.generation(conn)?;
        let Some(ports) = parse_doorbell(bytes) else {
            return Ok(None);
        };
        let mut out = Vec::new();
        let n = ports
            .iter()
            .filter(|&&p| self.router.doorbell(conn, generation, p, &mut out))
            .count();
        deliver(out);
        Ok(Some(n))
    }

    /// Link two ports (see [`Router::connect_interdomain`]).
    ///
    /// # Errors
    ///
    /// As [`Router::connect_interdomain`].
    pub fn link(&mut self, a: Endpoint, b: Endpoint) -> Result<()> {
        self.router.connect_interdomain(a, b)
    }

    /// The guest of `conn` stores `value` into word `word` (0..512) of its page `page`
    /// (0..[`HARNESS_PAGES`]), as a guest may at any time (mask and pending bits, upcall
    /// blocks). Out-of-range indexes do nothing.
    pub fn guest_write(&mut self, conn: ConnId, page: u64, word: usize, value: u64) {
        if page >= HARNESS_PAGES || conn.0 >= self.router.num_connections() {
            return;
        }
        let p = self.pages.entry((conn.0, page)).or_insert_with(zeroed_page);
        if let Some(w) = p.words().get(word) {
            w.store(value, Ordering::SeqCst);
        }
    }

    /// Upcalls raised to the guest of `conn` so far.
    pub fn upcalls(&self, conn: ConnId) -> u64 {
        self.sinks
            .get(conn.0 as usize)
            .map_or(0, |s| s.0.load(Ordering::Relaxed))
    }

    /// The router, for inspection.
    pub fn router(&self) -> &Router {
        &self.router
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{Op, PORT_BOUND, PORT_F_PENDING};

    #[test]
    fn requests_doorbells_and_garbage() {
        let mut h = ControlHarness::new(2, 16, 2).unwrap();
        let c0 = ConnId(0);
        let c1 = ConnId(1);
        let rq = |op, port, arg| Request::new(op, port, arg).to_bytes();
        assert_eq!(
            h.control(c0, &[1, 2, 3]).unwrap().status(),
            Some(Status::BadRequest)
        );
        assert_eq!(
            h.control(c1, &rq(Op::RegisterPage, 0, 0x1000))
                .unwrap()
                .status(),
            Some(Status::Ok)
        );
        assert_eq!(
            h.control(c1, &rq(Op::RegisterPage, 0, 0x1008))
                .unwrap()
                .status(),
            Some(Status::BadAddress)
        );
        assert_eq!(
            h.control(c1, &rq(Op::Bind, 4, 1)).unwrap().status(),
            Some(Status::Ok)
        );
        h.link((c0, 3), (c1, 4)).unwrap();
        let mut bell = 3u32.to_le_bytes().to_vec();
        bell.extend(99u32.to_le_bytes());
        assert_eq!(h.doorbell(c0, &bell).unwrap(), Some(1));
        assert_eq!(h.doorbell(c0, &[1, 2, 3]).unwrap(), None);
        assert_eq!(h.upcalls(c1), 1);
        assert_eq!(
            h.control(c1, &rq(Op::Status, 4, 0)).unwrap().value,
            PORT_BOUND | (1 << 16) | PORT_F_PENDING | crate::abi::PORT_F_LINKED
        );
        assert!(h.control(ConnId(2), &[]).is_err());
    }
}
