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
