// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Xen-style 2-level event channels over a 4 KiB page shared with the guest
//! (docs/device-abi.md "Event channels", protocols.md §5.2).
//!
//! Page layout, in 64-bit words:
//!
//! | words | contents |
//! |---|---|
//! | [`PENDING_WORD`] .. +64 | `pending`: port p is bit p % 64 of word p / 64 |
//! | [`MASK_WORD`] .. +64 | `mask`: same indexing, written only by the guest |
//! | [`UPCALL_WORD`] + 2v | `upcall_pending` of upcall vector v |
//! | [`UPCALL_WORD`] + 2v + 1 | `selector` of upcall vector v: bit w = word w may have work |
//!
//! Every step on the page is an atomic read-modify-write with sequential consistency, so the
//! device may send from any thread while the guest runs its handler ([`guest_collect`]); a
//! send is never lost. Port state (closed / unbound / bound) is private to the device.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Most ports a page can hold (64 words × 64 bits).
pub const EVTCHN_MAX_PORTS: u32 = 4096;
/// Default number of ports.
pub const EVTCHN_DEFAULT_PORTS: u32 = 1024;
/// Most upcall vectors (upcall blocks on the page).
pub const EVTCHN_MAX_UPCALLS: u16 = 64;
/// Size of the shared page in bytes.
pub const EVTCHN_PAGE_SIZE: usize = 4096;
/// Number of 64-bit words in the shared page.
pub const EVTCHN_PAGE_WORDS: usize = EVTCHN_PAGE_SIZE / 8;
/// Word index of `pending[0]`.
pub const PENDING_WORD: usize = 0;
/// Word index of `mask[0]`.
pub const MASK_WORD: usize = 64;
/// Word index of the first upcall block; vector v uses words `UPCALL_WORD + 2v`
/// (`upcall_pending`) and `UPCALL_WORD + 2v + 1` (`selector`).
pub const UPCALL_WORD: usize = 128;

const ORD: Ordering = Ordering::SeqCst;

/// Backing store of the shared page: at least 512 `u64` words (4 KiB).
///
/// Implemented here for `Box<[AtomicU64]>` and `Vec<AtomicU64>`; the vfio-user crate
/// implements it over an mmap of a memfd that the guest also maps.
pub trait SharedWords: Send + Sync + std::fmt::Debug {
    /// The words of the page.
    fn words(&self) -> &[AtomicU64];
}

impl SharedWords for Box<[AtomicU64]> {
    fn words(&self) -> &[AtomicU64] {
        self
    }
}

impl SharedWords for Vec<AtomicU64> {
    fn words(&self) -> &[AtomicU64] {
        self
    }
}

/// A zeroed in-memory page of [`EVTCHN_PAGE_WORDS`] words, for tests and harnesses.
pub fn zeroed_page() -> Arc<dyn SharedWords> {
    let words: Box<[AtomicU64]> = (0..EVTCHN_PAGE_WORDS).map(|_| AtomicU64::new(0)).collect();
    Arc::new(words)
}

/// State of one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortState {
    /// Closed: sends are dropped and counted.
    Closed,
    /// Open without an upcall: sends set the pending bit only.
    Unbound,
    /// Open and bound to an upcall vector.
    Bound {
        /// The upcall (MSI-X) vector.
        vector: u16,
    },
}

/// What a [`EventChannels::send`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// `upcall_pending` went 0 → 1: the caller must fire MSI-X vector `vector`.
    Upcall {
        /// The upcall vector to fire.
        vector: u16,
    },
    /// The port was already pending.
    Coalesced,
    /// The port is masked by the guest: it stays pending, no upcall.
    Masked,
    /// The selector bit was already set: the guest will find the port.
    SelectorSet,
    /// `upcall_pending` was already set: an upcall is already on its way.
    UpcallPending,
    /// The port is closed (dropped) or unbound (pending bit set only).
    NotBound,
}

/// Counters of the event channels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvtchnStats {
    /// Sends to a valid port number (including dropped ones).
    pub sends: u64,
    /// Upcalls raised (sends and unmasks that returned a vector to fire).
    pub upcalls: u64,
    /// Sends to closed ports.
    pub dropped: u64,
}

/// Serializable state of [`EventChannels`]: port states, the page and the counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvtchnState {
    /// State of every port.
    pub ports: Vec<PortState>,
    /// The [`EVTCHN_PAGE_WORDS`] words of the shared page.
    pub page: Vec<u64>,
    /// Counters.
    pub stats: EvtchnStats,
}

/// The device side of the event channels.
#[derive(Debug)]
pub struct EventChannels {
    ports: Vec<PortState>,
    upcalls: u16,
    mem: Arc<dyn SharedWords>,
    sends: AtomicU64,
    upcall_count: AtomicU64,
    dropped: AtomicU64,
}

/// Word index and bit of port `port`'s pending (or, with `base` = [`MASK_WORD`], mask) bit.
fn port_word(base: usize, port: u32) -> (usize, u64) {
    (base + (port / 64) as usize, 1u64 << (port % 64))
}

fn upcall_pending_word(vector: u16) -> usize {
    UPCALL_WORD + 2 * usize::from(vector)
}

fn selector_word(vector: u16) -> usize {
    UPCALL_WORD + 2 * usize::from(vector) + 1
}

impl EventChannels {
    /// `ports` ports (1..=4096), all closed, whose upcalls go to vectors below `upcalls`
    /// (1..=64), over the page `mem` (at least 512 words). The page is not cleared: call
    /// [`reset`](Self::reset) for that.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if a count is out of range or the page is too small.
    pub fn new(ports: u32, upcalls: u16, mem: Arc<dyn SharedWords>) -> Result<Self> {
        if ports == 0 || ports > EVTCHN_MAX_PORTS {
            return Err(Error::InvalidConfig(format!(
                "event channel port count {ports} is not in 1..={EVTCHN_MAX_PORTS}"
            )));
        }
        if upcalls == 0 || upcalls > EVTCHN_MAX_UPCALLS {
            return Err(Error::InvalidConfig(format!(
                "event channel upcall count {upcalls} is not in 1..={EVTCHN_MAX_UPCALLS}"
            )));
        }
        let len = mem.words().len();
        if len < EVTCHN_PAGE_WORDS {
            return Err(Error::InvalidConfig(format!(
                "event channel page has {len} words, needs {EVTCHN_PAGE_WORDS}"
            )));
        }
        Ok(EventChannels {
            ports: vec![PortState::Closed; ports as usize],
            upcalls,
            mem,
            sends: AtomicU64::new(0),
            upcall_count: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// Number of ports.
    pub fn num_ports(&self) -> u32 {
        // At most EVTCHN_MAX_PORTS, checked in `new`.
        self.ports.len() as u32
    }

    /// Number of upcall vectors a port may bind to.
    pub fn num_upcalls(&self) -> u16 {
        self.upcalls
    }

    /// The shared page backing this model.
    pub fn memory(&self) -> &Arc<dyn SharedWords> {
        &self.mem
    }

    /// Open `port` (if closed) and bind it to upcall vector `vector`. Signals nothing; after
    /// rebinding a port that may be pending, call [`retrigger`](Self::retrigger).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPort`] or [`Error::InvalidVector`] (`vector >= upcalls`).
    pub fn bind(&mut self, port: u32, vector: u16) -> Result<()> {
        if vector >= self.upcalls {
            return Err(Error::InvalidVector(u32::from(vector)));
        }
        *self.port_mut(port)? = PortState::Bound { vector };
        Ok(())
    }

    /// Keep `port` open without an upcall ([`PortState::Unbound`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPort`].
    pub fn unbind(&mut self, port: u32) -> Result<()> {
        *self.port_mut(port)? = PortState::Unbound;
        Ok(())
    }

    /// Close `port` ([`PortState::Closed`]). Its page bits are left to the guest.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPort`].
    pub fn close(&mut self, port: u32) -> Result<()> {
        *self.port_mut(port)? = PortState::Closed;
        Ok(())
    }

    /// State of `port`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPort`].
    pub fn state(&self, port: u32) -> Result<PortState> {
        self.ports
            .get(port as usize)
            .copied()
            .ok_or(Error::InvalidPort(port))
    }

    /// Device → guest send on `port` (Xen `evtchn_2l_set_pending`).
    ///
    /// Closed port: counted as dropped, page untouched, [`SendOutcome::NotBound`]. Unbound:
    /// the pending bit is set, [`SendOutcome::NotBound`]. Bound to v: (1) set pending, stop if
    /// it was set; (2) stop if masked; (3) set v's selector bit p / 64, stop if it was set;
    /// (4) set v's `upcall_pending`; if it was 0, return [`SendOutcome::Upcall`]: the caller
    /// fires MSI-X vector v. Lock-free; may run concurrently with the guest's handler.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPort`].
    pub fn send(&self, port: u32) -> Result<SendOutcome> {
        let state = self.state(port)?;
        self.sends.fetch_add(1, ORD);
        let vector = match state {
            PortState::Closed => {
                self.dropped.fetch_add(1, ORD);
                return Ok(SendOutcome::NotBound);
            }
            PortState::Unbound => {
                let (w, bit) = port_word(PENDING_WORD, port);
                self.word(w)?.fetch_or(bit, ORD);
                return Ok(SendOutcome::NotBound);
            }
            PortState::Bound { vector } => vector,
        };
        let (pw, bit) = port_word(PENDING_WORD, port);
        if self.word(pw)?.fetch_or(bit, ORD) & bit != 0 {
            return Ok(SendOutcome::Coalesced);
        }
        let (mw, _) = port_word(MASK_WORD, port);
        if self.word(mw)?.load(ORD) & bit != 0 {
            return Ok(SendOutcome::Masked);
        }
        Ok(self
            .raise(port, vector)?
            .map_or(SendOutcome::SelectorSet, |up| {
                up.map_or(SendOutcome::UpcallPending, |vector| SendOutcome::Upcall {
                    vector,
                })
            }))
    }

    /// The guest's `EVTCHN_UNMASK` (`EVTCHNOP_unmask`): clear the mask bit of `port`; if the
    /// port is pending and bound, set its selector bit and, if that was newly set, its
    /// `upcall_pending`. Returns `Some(vector)` when `upcall_pending` went 0 → 1: the caller
    /// fires that MSI-X vector.
    ///
    /// Unlike Xen, the upcall is raised even if the mask bit was already clear (the guest may
    /// clear it itself before asking), as docs/device-abi.md specifies.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPort`].
    pub fn unmask(&self, port: u32) -> Result<Option<u16>> {
        let state = self.state(port)?;
        let (mw, bit) = port_word(MASK_WORD, port);
        self.word(mw)?.fetch_and(!bit, ORD);
        match state {
            PortState::Bound { vector } => self.raise_if_pending(port, vector),
            _ => Ok(None),
        }
    }

    /// QEMU's pseudo-unmask after rebinding: if `port` is bound, pending and not masked, set
    /// its selector bit and raise the upcall as in [`send`](Self::send). Returns `Some(vector)`
    /// when the caller must fire that MSI-X vector. The mask bit is not changed.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPort`].
    pub fn retrigger(&self, port: u32) -> Result<Option<u16>> {
        let PortState::Bound { vector } = self.state(port)? else {
            return Ok(None);
        };
        let (mw, bit) = port_word(MASK_WORD, port);
        if self.word(mw)?.load(ORD) & bit != 0 {
            return Ok(None);
        }
        self.raise_if_pending(port, vector)
    }

    /// Whether the pending bit of `port` is set.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPort`].
    pub fn is_pending(&self, port: u32) -> Result<bool> {
        self.test_bit(PENDING_WORD, port)
    }

    /// Whether the mask bit of `port` is set.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPort`].
    pub fn is_masked(&self, port: u32) -> Result<bool> {
        self.test_bit(MASK_WORD, port)
    }

    /// Set or clear the mask bit of `port` directly, as the guest does (no upcall).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPort`].
    pub fn set_masked(&self, port: u32, masked: bool) -> Result<()> {
        self.state(port)?;
        let (w, bit) = port_word(MASK_WORD, port);
        let word = self.word(w)?;
        if masked {
            word.fetch_or(bit, ORD);
        } else {
            word.fetch_and(!bit, ORD);
        }
        Ok(())
    }

    /// Close every port and zero the whole page. Counters survive.
    pub fn reset(&mut self) {
        self.ports.fill(PortState::Closed);
        for w in self.mem.words().iter().take(EVTCHN_PAGE_WORDS) {
            w.store(0, ORD);
        }
    }

    /// Counters.
    pub fn stats(&self) -> EvtchnStats {
        EvtchnStats {
            sends: self.sends.load(ORD),
            upcalls: self.upcall_count.load(ORD),
            dropped: self.dropped.load(ORD),
        }
    }

    /// Port states, the [`EVTCHN_PAGE_WORDS`] page words and the counters.
    pub fn snapshot(&self) -> EvtchnState {
        EvtchnState {
            ports: self.ports.clone(),
            page: self
                .mem
                .words()
                .iter()
                .take(EVTCHN_PAGE_WORDS)
                .map(|w| w.load(ORD))
                .collect(),
            stats: self.stats(),
        }
    }

    /// Restore a state taken with [`snapshot`](Self::snapshot): port states and counters, and
    /// the page words are written back. Signals nothing.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotMismatch`] if the port count or page size differ, or a port is bound
    /// to a vector this model does not have; the model is then unchanged.
    pub fn restore(&mut self, state: &EvtchnState) -> Result<()> {
        if state.ports.len() != self.ports.len() || state.page.len() != EVTCHN_PAGE_WORDS {
            return Err(Error::SnapshotMismatch(format!(
                "event channel snapshot has {} ports and {} page words; this model has {} ports and {EVTCHN_PAGE_WORDS} words",
                state.ports.len(),
                state.page.len(),
                self.ports.len()
            )));
        }
        if let Some((port, PortState::Bound { vector })) = state
            .ports
            .iter()
            .enumerate()
            .find(|(_, s)| matches!(s, PortState::Bound { vector } if *vector >= self.upcalls))
        {
            return Err(Error::SnapshotMismatch(format!(
                "port {port} is bound to upcall vector {vector}; this model has {} upcall vectors",
                self.upcalls
            )));
        }
        self.ports.copy_from_slice(&state.ports);
        for (w, v) in self.mem.words().iter().zip(&state.page) {
            w.store(*v, ORD);
        }
        self.sends.store(state.stats.sends, ORD);
        self.upcall_count.store(state.stats.upcalls, ORD);
        self.dropped.store(state.stats.dropped, ORD);
        Ok(())
    }

    fn port_mut(&mut self, port: u32) -> Result<&mut PortState> {
        self.ports
            .get_mut(port as usize)
            .ok_or(Error::InvalidPort(port))
    }

    fn word(&self, index: usize) -> Result<&AtomicU64> {
        // `new` checked the page size and every index used here is below 256.
        self.mem
            .words()
            .get(index)
            .ok_or_else(|| Error::InvalidConfig(format!("event channel page has no word {index}")))
    }

    fn test_bit(&self, base: usize, port: u32) -> Result<bool> {
        self.state(port)?;
        let (w, bit) = port_word(base, port);
        Ok(self.word(w)?.load(ORD) & bit != 0)
    }

    /// Steps 3 and 4 of a send. `None`: the selector bit was set already. `Some(None)`:
    /// `upcall_pending` was set already. `Some(Some(v))`: upcall raised (counted).
    fn raise(&self, port: u32, vector: u16) -> Result<Option<Option<u16>>> {
        let sel_bit = 1u64 << (port / 64);
        if self.word(selector_word(vector))?.fetch_or(sel_bit, ORD) & sel_bit != 0 {
            return Ok(None);
        }
        if self.word(upcall_pending_word(vector))?.fetch_or(1, ORD) != 0 {
            return Ok(Some(None));
        }
        self.upcall_count.fetch_add(1, ORD);
        Ok(Some(Some(vector)))
    }

    fn raise_if_pending(&self, port: u32, vector: u16) -> Result<Option<u16>> {
        let (pw, bit) = port_word(PENDING_WORD, port);
        if self.word(pw)?.load(ORD) & bit == 0 {
            return Ok(None);
        }
        Ok(self.raise(port, vector)?.flatten())
    }
}

/// The guest's upcall handler for upcall vector `vector` over the page `words`
/// (docs/device-abi.md): clear `upcall_pending`, exchange `selector` with 0, and for each
/// selected word (ascending) take `pending & !mask`, clearing each pending bit before
/// reporting its port. Returns the ports collected, in ascending order per word.
///
/// A vector of 64 or more, or a page that is too small, yields nothing.
pub fn guest_collect(words: &[AtomicU64], vector: u16) -> Vec<u32> {
    let mut ports = Vec::new();
    if vector >= EVTCHN_MAX_UPCALLS || words.len() < EVTCHN_PAGE_WORDS {
        return ports;
    }
    let (Some(upcall), Some(selector)) = (
        words.get(upcall_pending_word(vector)),
        words.get(selector_word(vector)),
    ) else {
        return ports;
    };
    upcall.store(0, ORD);
    let mut sel = selector.swap(0, ORD);
    while sel != 0 {
        let w = sel.trailing_zeros() as usize;
        sel &= sel - 1;
        let (Some(pending), Some(mask)) = (words.get(PENDING_WORD + w), words.get(MASK_WORD + w))
        else {
            continue;
        };
        let mut ready = pending.load(ORD) & !mask.load(ORD);
        while ready != 0 {
            let b = ready.trailing_zeros();
            let bit = 1u64 << b;
            ready &= !bit;
            // Another collector may have taken it meanwhile: report it only if we cleared it.
            if pending.fetch_and(!bit, ORD) & bit != 0 {
                ports.push(w as u32 * 64 + b);
            }
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::mpsc;

    use super::*;

    fn channels(ports: u32, upcalls: u16) -> EventChannels {
        EventChannels::new(ports, upcalls, zeroed_page()).unwrap()
    }

    fn word(ev: &EventChannels, i: usize) -> u64 {
        ev.memory().words()[i].load(ORD)
    }

    fn collect(ev: &EventChannels, vector: u16) -> Vec<u32> {
        guest_collect(ev.memory().words(), vector)
    }

    fn page_is_zero(ev: &EventChannels) -> bool {
        ev.snapshot().page.iter().all(|w| *w == 0)
    }

    #[test]
    fn config_limits() {
        assert!(matches!(
            EventChannels::new(0, 1, zeroed_page()),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            EventChannels::new(4097, 1, zeroed_page()),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            EventChannels::new(16, 0, zeroed_page()),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            EventChannels::new(16, 65, zeroed_page()),
            Err(Error::InvalidConfig(_))
        ));
        let small: Vec<AtomicU64> = (0..511).map(|_| AtomicU64::new(0)).collect();
        assert!(matches!(
            EventChannels::new(16, 1, Arc::new(small)),
            Err(Error::InvalidConfig(_))
        ));
        let ev = EventChannels::new(EVTCHN_MAX_PORTS, EVTCHN_MAX_UPCALLS, zeroed_page()).unwrap();
        assert_eq!(ev.num_ports(), 4096);
        assert_eq!(ev.num_upcalls(), 64);
        for p in 0..4096 {
            assert_eq!(ev.state(p).unwrap(), PortState::Closed);
        }
    }

    #[test]
    fn new_does_not_clear_the_page_reset_does() {
        let page = zeroed_page();
        page.words()[3].store(7, ORD);
        page.words()[511].store(9, ORD);
        let mut ev = EventChannels::new(16, 1, page.clone()).unwrap();
        assert_eq!(page.words()[3].load(ORD), 7);
        ev.bind(1, 0).unwrap();
        ev.send(1).unwrap();
        let stats = ev.stats();
        ev.reset();
        assert!(page.words().iter().all(|w| w.load(ORD) == 0));
        assert_eq!(ev.state(1).unwrap(), PortState::Closed);
        assert_eq!(ev.stats(), stats, "counters survive a reset");
    }

    #[test]
    fn port_states() {
        let mut ev = channels(8, 2);
        ev.bind(3, 1).unwrap();
        assert_eq!(ev.state(3).unwrap(), PortState::Bound { vector: 1 });
        ev.unbind(3).unwrap();
        assert_eq!(ev.state(3).unwrap(), PortState::Unbound);
        ev.close(3).unwrap();
        assert_eq!(ev.state(3).unwrap(), PortState::Closed);
        assert!(matches!(ev.bind(3, 2), Err(Error::InvalidVector(2))));
        assert!(matches!(ev.bind(8, 0), Err(Error::InvalidPort(8))));
        assert!(matches!(ev.unbind(8), Err(Error::InvalidPort(8))));
        assert!(matches!(ev.close(8), Err(Error::InvalidPort(8))));
        assert!(matches!(ev.state(8), Err(Error::InvalidPort(8))));
        assert!(matches!(ev.send(8), Err(Error::InvalidPort(8))));
        assert!(matches!(ev.unmask(8), Err(Error::InvalidPort(8))));
        assert!(matches!(ev.retrigger(8), Err(Error::InvalidPort(8))));
        assert!(matches!(ev.is_pending(8), Err(Error::InvalidPort(8))));
        assert!(matches!(ev.is_masked(8), Err(Error::InvalidPort(8))));
        assert!(matches!(ev.set_masked(8, true), Err(Error::InvalidPort(8))));
        assert_eq!(ev.stats(), EvtchnStats::default());
        assert!(page_is_zero(&ev));
    }

    #[test]
    fn send_raises_upcall_and_coalesces() {
        let mut ev = channels(1024, 4);
        ev.bind(70, 2).unwrap();
        assert_eq!(ev.send(70).unwrap(), SendOutcome::Upcall { vector: 2 });
        assert!(ev.is_pending(70).unwrap());
        assert_eq!(word(&ev, PENDING_WORD + 1), 1 << 6);
        assert_eq!(word(&ev, UPCALL_WORD + 4), 1, "upcall_pending of vector 2");
        assert_eq!(word(&ev, UPCALL_WORD + 5), 1 << 1, "selector of vector 2");
        assert_eq!(ev.send(70).unwrap(), SendOutcome::Coalesced);
        assert_eq!(
            ev.stats(),
            EvtchnStats {
                sends: 2,
                upcalls: 1,
                dropped: 0
            }
        );
        assert_eq!(collect(&ev, 2), [70]);
        assert!(page_is_zero(&ev));
        assert_eq!(ev.send(70).unwrap(), SendOutcome::Upcall { vector: 2 });
        assert_eq!(
            ev.stats(),
            EvtchnStats {
                sends: 3,
                upcalls: 2,
                dropped: 0
            }
        );
    }

    #[test]
    fn masked_send_stays_pending_and_unmask_raises_once() {
        let mut ev = channels(128, 1);
        ev.bind(5, 0).unwrap();
        ev.set_masked(5, true).unwrap();
        assert!(ev.is_masked(5).unwrap());
        assert_eq!(word(&ev, MASK_WORD), 1 << 5);
        assert_eq!(ev.send(5).unwrap(), SendOutcome::Masked);
        assert!(ev.is_pending(5).unwrap());
        assert_eq!(word(&ev, UPCALL_WORD), 0);
        assert_eq!(word(&ev, UPCALL_WORD + 1), 0);
        assert_eq!(ev.send(5).unwrap(), SendOutcome::Coalesced);
        assert_eq!(ev.unmask(5).unwrap(), Some(0));
        assert!(!ev.is_masked(5).unwrap());
        assert_eq!(ev.unmask(5).unwrap(), None, "selector already set");
        assert_eq!(
            ev.stats(),
            EvtchnStats {
                sends: 2,
                upcalls: 1,
                dropped: 0
            }
        );
        assert_eq!(collect(&ev, 0), [5]);
        // Unmask of a port that is not pending raises nothing.
        ev.set_masked(5, true).unwrap();
        assert_eq!(ev.unmask(5).unwrap(), None);
        assert!(page_is_zero(&ev));
    }

    #[test]
    fn unmask_of_pending_port_whose_mask_is_already_clear_raises() {
        let mut ev = channels(128, 1);
        ev.bind(9, 0).unwrap();
        ev.set_masked(9, true).unwrap();
        ev.send(9).unwrap();
        ev.set_masked(9, false).unwrap(); // the guest clears the mask itself first
        assert_eq!(ev.unmask(9).unwrap(), Some(0));
        assert_eq!(collect(&ev, 0), [9]);
    }

    #[test]
    fn selector_already_set_gives_no_second_upcall() {
        let mut ev = channels(128, 1);
        ev.bind(1, 0).unwrap();
        ev.bind(2, 0).unwrap();
        assert_eq!(ev.send(1).unwrap(), SendOutcome::Upcall { vector: 0 });
        assert_eq!(ev.send(2).unwrap(), SendOutcome::SelectorSet);
        // Masked pending port in the same word: unmask finds the selector set.
        ev.bind(3, 0).unwrap();
        ev.set_masked(3, true).unwrap();
        assert_eq!(ev.send(3).unwrap(), SendOutcome::Masked);
        assert_eq!(ev.unmask(3).unwrap(), None);
        assert_eq!(ev.stats().upcalls, 1);
        assert_eq!(collect(&ev, 0), [1, 2, 3]);
    }

    #[test]
    fn upcall_pending_already_set_gives_no_second_upcall() {
        let mut ev = channels(256, 2);
        ev.bind(1, 0).unwrap();
        ev.bind(64, 0).unwrap();
        ev.bind(200, 0).unwrap();
        ev.bind(65, 1).unwrap();
        assert_eq!(ev.send(1).unwrap(), SendOutcome::Upcall { vector: 0 });
        assert_eq!(ev.send(64).unwrap(), SendOutcome::UpcallPending);
        assert_eq!(ev.send(200).unwrap(), SendOutcome::UpcallPending);
        assert_eq!(word(&ev, UPCALL_WORD + 1), 0b1011);
        // Another vector has its own upcall block.
        assert_eq!(ev.send(65).unwrap(), SendOutcome::Upcall { vector: 1 });
        assert_eq!(ev.stats().upcalls, 2);
        // The guest handler scans whole words: port 65 (word 1, vector 1) is collected by
        // vector 0's handler, which scans word 1 for port 64. Vector 1 then finds nothing.
        assert_eq!(collect(&ev, 0), [1, 64, 65, 200]);
        assert_eq!(collect(&ev, 1), Vec::<u32>::new());
        assert!(page_is_zero(&ev));
    }

    #[test]
    fn guest_collect_semantics() {
        let mut ev = channels(512, 2);
        for p in [0, 63, 64, 130, 511] {
            ev.bind(p, 0).unwrap();
        }
        ev.set_masked(130, true).unwrap();
        for p in [511, 130, 64, 0, 63] {
            ev.send(p).unwrap();
        }
        // Only upcall_pending and the selector are consumed; masked ports stay pending.
        assert_eq!(collect(&ev, 0), [0, 63, 64, 511]);
        assert_eq!(word(&ev, UPCALL_WORD), 0);
        assert_eq!(word(&ev, UPCALL_WORD + 1), 0);
        assert!(ev.is_pending(130).unwrap());
        for p in [0, 63, 64, 511] {
            assert!(!ev.is_pending(p).unwrap());
        }
        assert_eq!(collect(&ev, 0), Vec::<u32>::new());
        // Unmasking the masked port raises the upcall again and it is collected.
        assert_eq!(ev.unmask(130).unwrap(), Some(0));
        assert_eq!(collect(&ev, 0), [130]);
        assert!(page_is_zero(&ev));
        // Out-of-range vector or short page: nothing, nothing touched.
        ev.send(0).unwrap();
        assert_eq!(guest_collect(ev.memory().words(), 64), Vec::<u32>::new());
        assert_eq!(
            guest_collect(&ev.memory().words()[..511], 0),
            Vec::<u32>::new()
        );
        assert!(ev.is_pending(0).unwrap());
        // A selector bit for a word with nothing ready is simply consumed.
        ev.memory().words()[UPCALL_WORD + 3].fetch_or(1 << 5, ORD);
        assert_eq!(collect(&ev, 1), Vec::<u32>::new());
        assert_eq!(word(&ev, UPCALL_WORD + 3), 0);
    }

    #[test]
    fn closed_and_unbound_ports() {
        let mut ev = channels(64, 1);
        assert_eq!(ev.send(4).unwrap(), SendOutcome::NotBound);
        assert!(page_is_zero(&ev), "a closed port leaves the page alone");
        assert_eq!(
            ev.stats(),
            EvtchnStats {
                sends: 1,
                upcalls: 0,
                dropped: 1
            }
        );
        ev.unbind(4).unwrap();
        assert_eq!(ev.send(4).unwrap(), SendOutcome::NotBound);
        assert!(ev.is_pending(4).unwrap());
        assert_eq!(word(&ev, UPCALL_WORD), 0);
        assert_eq!(word(&ev, UPCALL_WORD + 1), 0);
        assert_eq!(ev.unmask(4).unwrap(), None);
        assert_eq!(ev.retrigger(4).unwrap(), None);
        assert_eq!(
            ev.stats(),
            EvtchnStats {
                sends: 2,
                upcalls: 0,
                dropped: 1
            }
        );
        // Binding it later and retriggering delivers what was pending.
        ev.bind(4, 0).unwrap();
        assert_eq!(ev.send(4).unwrap(), SendOutcome::Coalesced);
        ev.set_masked(4, true).unwrap();
        assert_eq!(
            ev.retrigger(4).unwrap(),
            None,
            "masked: retrigger does nothing"
        );
        ev.set_masked(4, false).unwrap();
        assert_eq!(ev.retrigger(4).unwrap(), Some(0));
        assert_eq!(ev.retrigger(4).unwrap(), None);
        assert_eq!(collect(&ev, 0), [4]);
        assert_eq!(ev.retrigger(4).unwrap(), None, "not pending");
        // Closing again drops sends.
        ev.close(4).unwrap();
        assert_eq!(ev.send(4).unwrap(), SendOutcome::NotBound);
        assert!(!ev.is_pending(4).unwrap());
        assert_eq!(
            ev.stats(),
            EvtchnStats {
                sends: 4,
                upcalls: 1,
                dropped: 2
            }
        );
    }

    #[test]
    fn all_4096_ports_on_one_vector_collected_once() {
        let mut ev = channels(EVTCHN_MAX_PORTS, 1);
        for p in 0..EVTCHN_MAX_PORTS {
            ev.bind(p, 0).unwrap();
        }
        let mut outcomes: HashMap<String, u32> = HashMap::new();
        for p in 0..EVTCHN_MAX_PORTS {
            *outcomes
                .entry(format!("{:?}", ev.send(p).unwrap()))
                .or_default() += 1;
        }
        assert_eq!(outcomes["Upcall { vector: 0 }"], 1);
        assert_eq!(outcomes["UpcallPending"], 63);
        assert_eq!(outcomes["SelectorSet"], 4032);
        assert_eq!(outcomes.len(), 3);
        assert_eq!(word(&ev, UPCALL_WORD + 1), u64::MAX);
        let got = collect(&ev, 0);
        assert_eq!(got, (0..EVTCHN_MAX_PORTS).collect::<Vec<_>>());
        assert!(page_is_zero(&ev));
        assert_eq!(collect(&ev, 0), Vec::<u32>::new());
    }

    #[test]
    fn concurrent_senders_and_guest_lose_nothing() {
        const THREADS: u32 = 4;
        const ROUNDS: u32 = 200;
        const VECTORS: u16 = 3;
        let mut ev = channels(EVTCHN_DEFAULT_PORTS, VECTORS);
        for p in 0..EVTCHN_DEFAULT_PORTS {
            ev.bind(p, (p % u32::from(VECTORS)) as u16).unwrap();
        }
        let ev = &ev;
        let (tx, rx) = mpsc::channel::<u16>();
        let (sent_edges, collected, upcalls_seen) = std::thread::scope(|s| {
            let guest = s.spawn(move || {
                let mut collected = vec![0u64; EVTCHN_DEFAULT_PORTS as usize];
                let mut upcalls = 0u64;
                // Ends when every sender is done and every upcall was handled.
                while let Ok(v) = rx.recv() {
                    upcalls += 1;
                    for p in guest_collect(ev.memory().words(), v) {
                        collected[p as usize] += 1;
                    }
                }
                (collected, upcalls)
            });
            let senders: Vec<_> = (0..THREADS)
                .map(|t| {
                    let tx = tx.clone();
                    s.spawn(move || {
                        let mut edges = 0u64;
                        for r in 0..ROUNDS {
                            // Each thread owns ports ≡ t mod THREADS; send a varying subset.
                            for p in (t..EVTCHN_DEFAULT_PORTS).step_by(THREADS as usize) {
                                if (p + r) % 3 == 0 && r != 0 {
                                    continue;
                                }
                                match ev.send(p).unwrap() {
                                    SendOutcome::Coalesced => {}
                                    SendOutcome::Upcall { vector } => {
                                        edges += 1;
                                        tx.send(vector).unwrap();
                                    }
                                    SendOutcome::Masked | SendOutcome::NotBound => {
                                        panic!("port {p} is bound and unmasked")
                                    }
                                    _ => edges += 1,
                                }
                            }
                        }
                        edges
                    })
                })
                .collect();
            drop(tx);
            let edges: u64 = senders.into_iter().map(|h| h.join().unwrap()).sum();
            let (collected, upcalls) = guest.join().unwrap();
            (edges, collected, upcalls)
        });
        // Every 0 → 1 pending edge made by a sender is collected exactly once, and every port
        // was sent in round 0, so each was collected at least once.
        assert_eq!(collected.iter().sum::<u64>(), sent_edges);
        assert!(collected.iter().all(|c| *c >= 1 && *c <= u64::from(ROUNDS)));
        assert_eq!(upcalls_seen, ev.stats().upcalls);
        let expected_sends: u64 = (0..ROUNDS)
            .map(|r| {
                (0..EVTCHN_DEFAULT_PORTS)
                    .filter(|p| r == 0 || (p + r) % 3 != 0)
                    .count() as u64
            })
            .sum();
        assert_eq!(ev.stats().sends, expected_sends);
        assert!(page_is_zero(ev), "nothing left pending or selected");
    }

    #[test]
    fn snapshot_json_round_trip() {
        let mut a = channels(256, 4);
        for p in 0..40 {
            a.bind(p, (p % 4) as u16).unwrap();
        }
        a.unbind(100).unwrap();
        a.set_masked(7, true).unwrap();
        for p in [3, 7, 9, 100, 200, 66] {
            a.send(p).unwrap();
        }
        let snap = a.snapshot();
        assert_eq!(snap.page.len(), EVTCHN_PAGE_WORDS);
        let json = serde_json::to_string(&snap).unwrap();
        let back: EvtchnState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);

        // Mismatching snapshots are refused and change nothing.
        let mut other = channels(255, 4);
        assert!(matches!(
            other.restore(&back),
            Err(Error::SnapshotMismatch(_))
        ));
        let mut few_vectors = channels(256, 3);
        assert!(matches!(
            few_vectors.restore(&back),
            Err(Error::SnapshotMismatch(_))
        ));
        assert!(page_is_zero(&few_vectors));
        let mut short = back.clone();
        short.page.pop();
        assert!(matches!(
            channels(256, 4).restore(&short),
            Err(Error::SnapshotMismatch(_))
        ));

        let mut b = channels(256, 4);
        b.restore(&back).unwrap();
        assert_eq!(b.snapshot(), snap);
        for p in [3, 11, 7, 100, 39] {
            assert_eq!(a.send(p).unwrap(), b.send(p).unwrap(), "send {p}");
        }
        assert_eq!(a.unmask(7).unwrap(), b.unmask(7).unwrap());
        for v in 0..4 {
            assert_eq!(collect(&a, v), collect(&b, v), "collect {v}");
        }
        assert_eq!(a.snapshot(), b.snapshot());
        assert_eq!(b.stats().sends, 11);
    }
}
