// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! PCI MSI-X: the vector table, the pending bit array (PBA) and per-vector masking
//! (protocols.md §6, PCI Local Bus 3.0 §6.8.2).
//!
//! A vector is masked when MSI-X is not enabled, when Function Mask is set, when the mask bit
//! of its vector control word is set, or when the VMM masked it with
//! `SET_IRQS(MSIX, MASK)` ("host mask"). An event on a masked vector sets its PBA bit and
//! signals nothing; when a vector with its PBA bit set becomes unmasked, the bit is cleared and
//! the vector's notifier is written once (without a notifier the event is dropped and counted).
//! Hence an unmasked vector never has its PBA bit set.
//!
//! The model does not send MSI messages itself: the VMM bound an eventfd (usually a KVM irqfd
//! on an MSI route built from the table entry) to each vector it uses.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::notifier::{Notifier, Notifiers};

/// Largest MSI-X table (Message Control Table Size is 11 bits, N − 1).
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Size of one table entry in bytes.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: the vector is masked.
pub const MSIX_CTRL_MASK: u32 = 1;
/// Message Control bit 14: Function Mask.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 0x4000;
/// Message Control bit 15: MSI-X Enable.
pub const MSIX_CONTROL_ENABLE: u16 = 0x8000;

/// One MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    /// Message address, low 32 bits (bits 1:0 read as 0).
    pub addr_lo: u32,
    /// Message address, high 32 bits.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control: bit 0 is the mask bit, bits 31:1 are reserved (read as 0).
    pub ctrl: u32,
}

impl MsixEntry {
    /// The entry after a reset: zero, masked.
    pub const RESET: MsixEntry = MsixEntry {
        addr_lo: 0,
        addr_hi: 0,
        data: 0,
        ctrl: MSIX_CTRL_MASK,
    };

    /// Whether the vector control mask bit is set.
    pub fn masked(&self) -> bool {
        self.ctrl & MSIX_CTRL_MASK != 0
    }

    /// The 64-bit message address.
    pub fn address(&self) -> u64 {
        (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo)
    }

    /// Dword `field` (0 address low, 1 address high, 2 data, 3 vector control) as read.
    fn read_dword(&self, field: u64) -> u32 {
        match field {
            0 => self.addr_lo & !3,
            1 => self.addr_hi,
            2 => self.data,
            3 => self.ctrl & MSIX_CTRL_MASK,
            _ => 0,
        }
    }

    /// The entry with reserved bits cleared.
    fn sanitized(self) -> MsixEntry {
        MsixEntry {
            addr_lo: self.addr_lo & !3,
            ctrl: self.ctrl & MSIX_CTRL_MASK,
            ..self
        }
    }
}

/// What happened to an event on a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The vector was unmasked and its notifier was written.
    Sent,
    /// The vector was masked: its PBA bit is set.
    Pending,
    /// The vector was unmasked but has no notifier: the event was dropped.
    NoNotifier,
}

/// Counters of an MSI-X function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixStats {
    /// Notifier writes (direct events and pending deliveries on unmask).
    pub triggers: u64,
    /// Events that hit a masked vector (each sets, or keeps set, the PBA bit).
    pub pending_sets: u64,
    /// Events dropped because the unmasked vector had no notifier.
    pub dropped: u64,
}

/// Serializable state of an [`Msix`] (everything except the notifiers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The table, one entry per vector.
    pub entries: Vec<MsixEntry>,
    /// The PBA, ⌈N/64⌉ quad words; vector n is bit n % 64 of word n / 64.
    pub pba: Vec<u64>,
    /// Per-vector masks set by the VMM (`SET_IRQS(MSIX, MASK)`).
    pub host_masked: Vec<bool>,
    /// Message Control bit 15.
    pub enabled: bool,
    /// Message Control bit 14.
    pub function_mask: bool,
    /// Counters.
    pub stats: MsixStats,
}

/// An MSI-X function: table, PBA, masks and one optional notifier per vector.
#[derive(Debug)]
pub struct Msix {
    entries: Vec<MsixEntry>,
    pba: Vec<u64>,
    host_masked: Vec<bool>,
    notifiers: Notifiers,
    enabled: bool,
    function_mask: bool,
    stats: MsixStats,
}

fn pba_words(vectors: u16) -> usize {
    usize::from(vectors).div_ceil(64)
}

impl Msix {
    /// An MSI-X function with `vectors` vectors (1..=2048) in its reset state.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if `vectors` is 0 or above [`MSIX_MAX_VECTORS`].
    pub fn new(vectors: u16) -> Result<Self> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(Error::InvalidConfig(format!(
                "MSI-X table size {vectors} is not in 1..={MSIX_MAX_VECTORS}"
            )));
        }
        let n = usize::from(vectors);
        Ok(Msix {
            entries: vec![MsixEntry::RESET; n],
            pba: vec![0; pba_words(vectors)],
            host_masked: vec![false; n],
            notifiers: Notifiers::new(n),
            enabled: false,
            function_mask: false,
            stats: MsixStats::default(),
        })
    }

    /// Number of vectors (the table size).
    pub fn num_vectors(&self) -> u16 {
        // The constructor and `restore` keep the length in 1..=2048.
        u16::try_from(self.entries.len()).unwrap_or(MSIX_MAX_VECTORS)
    }

    /// Size of the table in bytes: 16 per vector.
    pub fn table_size_bytes(&self) -> u64 {
        MSIX_ENTRY_SIZE * u64::from(self.num_vectors())
    }

    /// Size of the PBA in bytes: ⌈N/64⌉ quad words.
    pub fn pba_size_bytes(&self) -> u64 {
        8 * pba_words(self.num_vectors()) as u64
    }

    /// Message Control value for this function: Table Size (N − 1) plus Enable and
    /// Function Mask.
    pub fn message_control(&self) -> u16 {
        let mut v = self.num_vectors().saturating_sub(1) & 0x07ff;
        if self.enabled {
            v |= MSIX_CONTROL_ENABLE;
        }
        if self.function_mask {
            v |= MSIX_CONTROL_FUNCTION_MASK;
        }
        v
    }

    /// Bind (`Some`) or unbind (`None`) the notifier of `vector`. Signals nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector` is out of range.
    pub fn set_notifier(&mut self, vector: u16, n: Option<Arc<dyn Notifier>>) -> Result<()> {
        self.notifiers.set(u32::from(vector), n)
    }

    /// Unbind every notifier.
    pub fn clear_notifiers(&mut self) {
        self.notifiers.clear();
    }

    /// Whether `vector` has a notifier (false if out of range).
    pub fn has_notifier(&self, vector: u16) -> bool {
        self.notifiers.get(usize::from(vector)).is_some()
    }

    /// Whether `vector` is masked: not enabled, Function Mask, its vector control mask bit, or
    /// its host mask.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector` is out of range.
    pub fn is_masked(&self, vector: u16) -> Result<bool> {
        let v = self.index(vector)?;
        Ok(self.masked_at(v))
    }

    /// An event on `vector`.
    ///
    /// Masked: set the PBA bit ([`Delivery::Pending`], `pending_sets` + 1). Unmasked with a
    /// notifier: write it ([`Delivery::Sent`], `triggers` + 1). Unmasked without a notifier:
    /// [`Delivery::NoNotifier`] (`dropped` + 1), the PBA is not touched.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector` is out of range; [`Error::Notify`] if the
    /// notifier write failed.
    pub fn fire(&mut self, vector: u16) -> Result<Delivery> {
        let v = self.index(vector)?;
        if self.masked_at(v) {
            self.set_pba(v, true);
            self.stats.pending_sets = self.stats.pending_sets.wrapping_add(1);
            return Ok(Delivery::Pending);
        }
        self.send(v)
    }

    /// Writes the notifier of `vector` if it has one, whatever the masks and the PBA say (the
    /// loopback of `SET_IRQS(MSIX, TRIGGER|DATA_NONE)`, as vfio-pci's `eventfd_signal`).
    /// Counted in `triggers`. Returns whether it was written.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector` is out of range; [`Error::Notify`] if the write
    /// failed.
    pub fn loopback(&mut self, vector: u16) -> Result<bool> {
        let v = self.index(vector)?;
        let Some(n) = self.notifiers.get(v) else {
            return Ok(false);
        };
        n.notify().map_err(Error::Notify)?;
        self.stats.triggers = self.stats.triggers.wrapping_add(1);
        Ok(true)
    }

    /// Whether any vector has a notifier.
    pub fn has_notifiers(&self) -> bool {
        self.notifiers.any()
    }

    /// `SET_IRQS(MSIX, MASK / UNMASK)` from the VMM for one vector. An unmask that leaves the
    /// vector unmasked with its PBA bit set clears the bit and signals once (or, without a
    /// notifier, counts the event as dropped).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector` is out of range; [`Error::Notify`] if the
    /// pending delivery failed.
    pub fn set_host_mask(&mut self, vector: u16, masked: bool) -> Result<()> {
        let v = self.index(vector)?;
        if let Some(m) = self.host_masked.get_mut(v) {
            *m = masked;
        }
        self.deliver_pending(v).map(|_| ())
    }

    /// Set or clear the vector control mask bit of `vector` (device-side alias registers,
    /// binding policy). Clearing it follows the same deliver-pending rule as
    /// [`set_host_mask`](Self::set_host_mask).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector` is out of range; [`Error::Notify`] if the
    /// pending delivery failed.
    pub fn set_entry_masked(&mut self, vector: u16, masked: bool) -> Result<()> {
        let v = self.index(vector)?;
        if let Some(e) = self.entries.get_mut(v) {
            if masked {
                e.ctrl |= MSIX_CTRL_MASK;
            } else {
                e.ctrl &= !MSIX_CTRL_MASK;
            }
        }
        self.deliver_pending(v).map(|_| ())
    }

    /// Message Control was written: Enable (bit 15) and Function Mask (bit 14). Every vector
    /// that ends up unmasked with its PBA bit set has the bit cleared and is signalled once, in
    /// vector order.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] with the first failed delivery (the other vectors are still
    /// delivered).
    pub fn write_control(&mut self, enabled: bool, function_mask: bool) -> Result<()> {
        self.enabled = enabled;
        self.function_mask = function_mask;
        if !enabled || function_mask {
            return Ok(());
        }
        let mut first_err = None;
        for v in 0..self.entries.len() {
            if let Err(e) = self.deliver_pending(v) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Message Control Enable (bit 15).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Message Control Function Mask (bit 14).
    pub fn function_masked(&self) -> bool {
        self.function_mask
    }

    /// Whether a table access of `len` bytes at byte `offset` is one the model honours:
    /// 4 or 8 bytes, naturally aligned, inside the table.
    pub fn table_access_ok(&self, offset: u64, len: usize) -> bool {
        access_ok(offset, len, self.table_size_bytes())
    }

    /// Whether a PBA read of `len` bytes at byte `offset` is one the model honours:
    /// 4 or 8 bytes, naturally aligned, inside the PBA.
    pub fn pba_access_ok(&self, offset: u64, len: usize) -> bool {
        access_ok(offset, len, self.pba_size_bytes())
    }

    /// Read the table at byte `offset` from its start into `data` (little endian).
    ///
    /// Only naturally aligned 4- or 8-byte reads inside the table are honoured; any other
    /// read fills `data` with zeros. Reserved vector control bits and address bits 1:0 read
    /// as 0.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !self.table_access_ok(offset, data.len()) {
            log::debug!(
                "msix: ignored table read of {} bytes at {offset:#x}",
                data.len()
            );
            return;
        }
        for (i, chunk) in data.chunks_exact_mut(4).enumerate() {
            let dw = offset / 4 + i as u64;
            let value = self
                .entries
                .get(usize::try_from(dw / 4).unwrap_or(usize::MAX))
                .map_or(0, |e| e.read_dword(dw % 4));
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Write the table at byte `offset` from its start (little endian).
    ///
    /// Only naturally aligned 4- or 8-byte writes inside the table are honoured; others are
    /// ignored (logged at debug level). An 8-byte write covers two dwords, the low one first.
    /// Reserved vector control bits are ignored. Clearing a vector control mask bit follows
    /// the deliver-pending rule.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] if a pending delivery failed (the write itself took effect).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.table_access_ok(offset, data.len()) {
            log::debug!(
                "msix: ignored table write of {} bytes at {offset:#x}",
                data.len()
            );
            return Ok(());
        }
        let mut result = Ok(());
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(chunk);
            let value = u32::from_le_bytes(bytes);
            let dw = offset / 4 + i as u64;
            let Ok(v) = usize::try_from(dw / 4) else {
                continue;
            };
            let Some(e) = self.entries.get_mut(v) else {
                continue;
            };
            match dw % 4 {
                0 => e.addr_lo = value & !3,
                1 => e.addr_hi = value,
                2 => e.data = value,
                _ => {
                    e.ctrl = value & MSIX_CTRL_MASK;
                    if let Err(err) = self.deliver_pending(v) {
                        if result.is_ok() {
                            result = Err(err);
                        }
                    }
                }
            }
        }
        result
    }

    /// Read the PBA at byte `offset` from its start into `data` (little endian).
    ///
    /// Only naturally aligned 4- or 8-byte reads inside the PBA are honoured; any other read
    /// fills `data` with zeros. The PBA is read-only: writes are ignored by the caller.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !self.pba_access_ok(offset, data.len()) {
            log::debug!(
                "msix: ignored PBA read of {} bytes at {offset:#x}",
                data.len()
            );
            return;
        }
        for (i, chunk) in data.chunks_exact_mut(4).enumerate() {
            let dw = offset / 4 + i as u64;
            let word = self
                .pba
                .get(usize::try_from(dw / 2).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(0);
            let value = if dw % 2 == 0 { word } else { word >> 32 };
            chunk.copy_from_slice(&(value as u32).to_le_bytes());
        }
    }

    /// Whether the PBA bit of `vector` is set.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector` is out of range.
    pub fn pending(&self, vector: u16) -> Result<bool> {
        let v = self.index(vector)?;
        Ok(self.pba_at(v))
    }

    /// The table entry of `vector` (reserved bits cleared).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector` is out of range.
    pub fn entry(&self, vector: u16) -> Result<MsixEntry> {
        self.entries
            .get(usize::from(vector))
            .map(|e| e.sanitized())
            .ok_or(Error::InvalidVector(u32::from(vector)))
    }

    /// Power-on state (QEMU `msix_reset`): Enable and Function Mask cleared, table zeroed with
    /// every vector control mask bit set, PBA clear, host masks clear. Notifiers and counters
    /// survive.
    pub fn reset(&mut self) {
        self.enabled = false;
        self.function_mask = false;
        self.entries.fill(MsixEntry::RESET);
        self.pba.fill(0);
        self.host_masked.fill(false);
    }

    /// Counters.
    pub fn stats(&self) -> MsixStats {
        self.stats
    }

    /// The whole state except the notifiers.
    pub fn snapshot(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pba: self.pba.clone(),
            host_masked: self.host_masked.clone(),
            enabled: self.enabled,
            function_mask: self.function_mask,
            stats: self.stats,
        }
    }

    /// Restore a state taken with [`snapshot`](Self::snapshot) from a function of the same
    /// size. Notifiers are kept; nothing is signalled. Reserved bits (entry bits, PBA bits
    /// beyond the table size) are cleared.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotMismatch`] if the table, PBA or host-mask sizes differ from this
    /// function's; the model is then unchanged.
    pub fn restore(&mut self, state: &MsixState) -> Result<()> {
        let n = self.entries.len();
        if state.entries.len() != n
            || state.host_masked.len() != n
            || state.pba.len() != self.pba.len()
        {
            return Err(Error::SnapshotMismatch(format!(
                "MSI-X snapshot has {} entries, {} PBA words and {} host masks; this function has {n} vectors",
                state.entries.len(),
                state.pba.len(),
                state.host_masked.len()
            )));
        }
        for (dst, src) in self.entries.iter_mut().zip(&state.entries) {
            *dst = src.sanitized();
        }
        for (i, (dst, src)) in self.pba.iter_mut().zip(&state.pba).enumerate() {
            let valid = n.saturating_sub(i * 64);
            let keep = if valid >= 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            *dst = src & keep;
        }
        self.host_masked.copy_from_slice(&state.host_masked);
        self.enabled = state.enabled;
        self.function_mask = state.function_mask;
        self.stats = state.stats;
        Ok(())
    }

    fn index(&self, vector: u16) -> Result<usize> {
        let v = usize::from(vector);
        if v < self.entries.len() {
            Ok(v)
        } else {
            Err(Error::InvalidVector(u32::from(vector)))
        }
    }

    fn masked_at(&self, v: usize) -> bool {
        !self.enabled
            || self.function_mask
            || self.entries.get(v).is_none_or(MsixEntry::masked)
            || self.host_masked.get(v).copied().unwrap_or(true)
    }

    fn pba_at(&self, v: usize) -> bool {
        self.pba
            .get(v / 64)
            .is_some_and(|w| w & (1u64 << (v % 64)) != 0)
    }

    fn set_pba(&mut self, v: usize, set: bool) {
        if let Some(w) = self.pba.get_mut(v / 64) {
            let bit = 1u64 << (v % 64);
            if set {
                *w |= bit;
            } else {
                *w &= !bit;
            }
        }
    }

    /// Write the notifier of unmasked vector `v`, or count a drop.
    fn send(&mut self, v: usize) -> Result<Delivery> {
        match self.notifiers.get(v) {
            Some(n) => {
                n.notify().map_err(Error::Notify)?;
                self.stats.triggers = self.stats.triggers.wrapping_add(1);
                Ok(Delivery::Sent)
            }
            None => {
                self.stats.dropped = self.stats.dropped.wrapping_add(1);
                Ok(Delivery::NoNotifier)
            }
        }
    }

    /// If vector `v` is unmasked and pending: clear the PBA bit and send once.
    fn deliver_pending(&mut self, v: usize) -> Result<Option<Delivery>> {
        if self.masked_at(v) || !self.pba_at(v) {
            return Ok(None);
        }
        self.set_pba(v, false);
        self.send(v).map(Some)
    }
}

fn access_ok(offset: u64, len: usize, size: u64) -> bool {
    (len == 4 || len == 8)
        && offset % len as u64 == 0
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::notifier::CountingNotifier;
    use crate::notifier::test_util::{FailingNotifier, RecordingNotifier};

    /// `vectors` vectors, each with its own counter, enabled, every entry unmasked.
    fn live(vectors: u16) -> (Msix, Vec<Arc<CountingNotifier>>) {
        let mut m = Msix::new(vectors).unwrap();
        let ns: Vec<_> = (0..vectors)
            .map(|v| {
                let n = Arc::new(CountingNotifier::new());
                m.set_notifier(v, Some(n.clone())).unwrap();
                m.set_entry_masked(v, false).unwrap();
                n
            })
            .collect();
        m.write_control(true, false).unwrap();
        (m, ns)
    }

    fn counts(ns: &[Arc<CountingNotifier>]) -> Vec<u64> {
        ns.iter().map(|n| n.count()).collect()
    }

    fn read_table(m: &Msix, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; len];
        m.table_read(offset, &mut buf);
        buf
    }

    fn read_pba(m: &Msix, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; len];
        m.pba_read(offset, &mut buf);
        buf
    }

    fn u32_at(m: &Msix, offset: u64) -> u32 {
        let b = read_table(m, offset, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn sizes_and_limits() {
        assert!(matches!(Msix::new(0), Err(Error::InvalidConfig(_))));
        assert!(matches!(Msix::new(2049), Err(Error::InvalidConfig(_))));
        for (n, table, pba) in [
            (1u16, 16u64, 8u64),
            (64, 1024, 8),
            (65, 1040, 16),
            (2048, 32768, 256),
        ] {
            let m = Msix::new(n).unwrap();
            assert_eq!(m.num_vectors(), n);
            assert_eq!(m.table_size_bytes(), table);
            assert_eq!(m.pba_size_bytes(), pba);
            assert_eq!(m.message_control(), n - 1);
        }
    }

    #[test]
    fn power_on_state_masks_everything() {
        let mut m = Msix::new(4).unwrap();
        let n = Arc::new(CountingNotifier::new());
        m.set_notifier(2, Some(n.clone())).unwrap();
        assert!(!m.enabled());
        assert!(!m.function_masked());
        for v in 0..4 {
            assert_eq!(m.entry(v).unwrap(), MsixEntry::RESET);
            assert!(m.is_masked(v).unwrap());
            assert!(!m.pending(v).unwrap());
        }
        assert_eq!(m.fire(2).unwrap(), Delivery::Pending);
        assert_eq!(n.count(), 0);
    }

    #[test]
    fn unmasked_event_is_sent() {
        let (mut m, ns) = live(3);
        assert_eq!(m.fire(1).unwrap(), Delivery::Sent);
        assert_eq!(m.fire(1).unwrap(), Delivery::Sent);
        assert_eq!(counts(&ns), [0, 2, 0]);
        assert!(!m.pending(1).unwrap());
        assert_eq!(
            m.stats(),
            MsixStats {
                triggers: 2,
                pending_sets: 0,
                dropped: 0
            }
        );
    }

    #[test]
    fn entry_mask_sets_pending_and_unmask_delivers_once() {
        let (mut m, ns) = live(3);
        m.set_entry_masked(1, true).unwrap();
        assert!(m.is_masked(1).unwrap());
        assert!(!m.is_masked(0).unwrap());
        assert_eq!(m.fire(1).unwrap(), Delivery::Pending);
        assert_eq!(m.fire(1).unwrap(), Delivery::Pending);
        assert!(m.pending(1).unwrap());
        assert_eq!(counts(&ns), [0, 0, 0]);
        m.set_entry_masked(1, false).unwrap();
        assert!(!m.pending(1).unwrap());
        assert_eq!(counts(&ns), [0, 1, 0]);
        // Unmasking again, or masking/unmasking with nothing pending: no more signals.
        m.set_entry_masked(1, false).unwrap();
        m.set_entry_masked(1, true).unwrap();
        m.set_entry_masked(1, false).unwrap();
        assert_eq!(counts(&ns), [0, 1, 0]);
        assert_eq!(
            m.stats(),
            MsixStats {
                triggers: 1,
                pending_sets: 2,
                dropped: 0
            }
        );
    }

    #[test]
    fn function_mask_delivers_pending_in_vector_order() {
        let mut m = Msix::new(70).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        for v in 0..70 {
            let n = RecordingNotifier {
                id: u32::from(v),
                log: log.clone(),
            };
            m.set_notifier(v, Some(Arc::new(n))).unwrap();
            m.set_entry_masked(v, false).unwrap();
        }
        m.write_control(true, true).unwrap();
        assert_eq!(m.message_control(), 69 | 0xC000);
        for v in [69, 3, 64, 0, 3] {
            assert_eq!(m.fire(v).unwrap(), Delivery::Pending);
        }
        // Unmasking one vector's entry while Function Mask is set delivers nothing.
        m.set_entry_masked(3, true).unwrap();
        m.set_entry_masked(3, false).unwrap();
        assert!(log.lock().unwrap().is_empty());
        m.write_control(true, false).unwrap();
        assert_eq!(*log.lock().unwrap(), [0, 3, 64, 69]);
        for v in 0..70 {
            assert!(!m.pending(v).unwrap());
        }
        m.write_control(true, false).unwrap();
        assert_eq!(log.lock().unwrap().len(), 4);
        assert_eq!(
            m.stats(),
            MsixStats {
                triggers: 4,
                pending_sets: 5,
                dropped: 0
            }
        );
    }

    #[test]
    fn enable_bit_gates_delivery() {
        let (mut m, ns) = live(2);
        m.write_control(false, false).unwrap();
        assert!(m.is_masked(0).unwrap());
        assert_eq!(m.fire(0).unwrap(), Delivery::Pending);
        // Enabling with Function Mask set keeps it pending.
        m.write_control(true, true).unwrap();
        assert_eq!(counts(&ns), [0, 0]);
        m.write_control(true, false).unwrap();
        assert_eq!(counts(&ns), [1, 0]);
        assert!(!m.pending(0).unwrap());
    }

    #[test]
    fn host_mask_sets_pending_and_unmask_delivers_once() {
        let (mut m, ns) = live(2);
        m.set_host_mask(0, true).unwrap();
        assert!(m.is_masked(0).unwrap());
        assert_eq!(m.fire(0).unwrap(), Delivery::Pending);
        // Entry mask set too: clearing the host mask alone delivers nothing.
        m.set_entry_masked(0, true).unwrap();
        m.set_host_mask(0, false).unwrap();
        assert_eq!(counts(&ns), [0, 0]);
        assert!(m.pending(0).unwrap());
        m.set_entry_masked(0, false).unwrap();
        assert_eq!(counts(&ns), [1, 0]);
        m.set_host_mask(0, false).unwrap();
        assert_eq!(counts(&ns), [1, 0]);
    }

    #[test]
    fn no_notifier_drops_without_pending() {
        let (mut m, ns) = live(2);
        m.set_notifier(1, None).unwrap();
        assert!(!m.has_notifier(1));
        assert!(m.has_notifier(0));
        assert_eq!(m.fire(1).unwrap(), Delivery::NoNotifier);
        assert!(!m.pending(1).unwrap());
        // A pending event delivered on unmask without a notifier is dropped too.
        m.set_entry_masked(1, true).unwrap();
        assert_eq!(m.fire(1).unwrap(), Delivery::Pending);
        m.set_entry_masked(1, false).unwrap();
        assert!(!m.pending(1).unwrap());
        assert_eq!(counts(&ns), [0, 0]);
        assert_eq!(
            m.stats(),
            MsixStats {
                triggers: 0,
                pending_sets: 1,
                dropped: 2
            }
        );
        m.clear_notifiers();
        assert!(!m.has_notifier(0));
        assert!(!m.has_notifier(99));
    }

    #[test]
    fn pba_bit_layout() {
        let mut m = Msix::new(2048).unwrap();
        for v in [0, 63, 64, 2047] {
            assert_eq!(m.fire(v).unwrap(), Delivery::Pending);
        }
        assert_eq!(read_pba(&m, 0, 8), (1u64 | 1 << 63).to_le_bytes());
        assert_eq!(read_pba(&m, 0, 4), 1u32.to_le_bytes());
        assert_eq!(read_pba(&m, 4, 4), 0x8000_0000u32.to_le_bytes());
        assert_eq!(read_pba(&m, 8, 8), 1u64.to_le_bytes());
        assert_eq!(read_pba(&m, 16, 8), [0; 8]);
        assert_eq!(read_pba(&m, 248, 8), (1u64 << 63).to_le_bytes());
        assert_eq!(read_pba(&m, 252, 4), 0x8000_0000u32.to_le_bytes());
        assert_eq!(read_pba(&m, 256, 8), [0; 8], "past the PBA");
        // Byte n/8, bit n%8.
        assert_eq!(m.pba_size_bytes(), 256);
        let all: Vec<u8> = (0..32).flat_map(|q| read_pba(&m, q * 8, 8)).collect();
        for (i, b) in all.iter().enumerate() {
            let want = match i {
                0 => 0x01,
                7 => 0x80,
                8 => 0x01,
                255 => 0x80,
                _ => 0,
            };
            assert_eq!(*b, want, "PBA byte {i}");
        }
        for v in [0, 63, 64, 2047] {
            assert!(m.pending(v).unwrap());
        }
        assert!(!m.pending(1).unwrap());
        assert!(!m.pending(2046).unwrap());
    }

    #[test]
    fn pba_bad_reads_return_zeros() {
        let mut m = Msix::new(64).unwrap();
        m.fire(0).unwrap();
        m.fire(63).unwrap();
        assert_ne!(read_pba(&m, 0, 8), [0; 8]);
        for (off, len) in [
            (0, 1),
            (0, 2),
            (0, 3),
            (2, 4),
            (4, 8),
            (8, 4),
            (8, 8),
            (0, 16),
            (u64::MAX - 3, 4),
        ] {
            assert_eq!(
                read_pba(&m, off, len),
                vec![0; len],
                "offset {off} len {len}"
            );
            assert!(!m.pba_access_ok(off, len));
        }
    }

    #[test]
    fn table_dword_accesses() {
        let mut m = Msix::new(4).unwrap();
        let base = 3 * 16;
        m.table_write(base, &0xFEE0_1003u32.to_le_bytes()).unwrap();
        m.table_write(base + 4, &0x1234_5678u32.to_le_bytes())
            .unwrap();
        m.table_write(base + 8, &0x0000_4041u32.to_le_bytes())
            .unwrap();
        m.table_write(base + 12, &0xFFFF_FFFFu32.to_le_bytes())
            .unwrap();
        assert_eq!(u32_at(&m, base), 0xFEE0_1000, "address bits 1:0 read as 0");
        assert_eq!(u32_at(&m, base + 4), 0x1234_5678);
        assert_eq!(u32_at(&m, base + 8), 0x4041);
        assert_eq!(u32_at(&m, base + 12), 1, "reserved control bits read as 0");
        assert_eq!(
            m.entry(3).unwrap(),
            MsixEntry {
                addr_lo: 0xFEE0_1000,
                addr_hi: 0x1234_5678,
                data: 0x4041,
                ctrl: 1
            }
        );
        assert_eq!(m.entry(3).unwrap().address(), 0x1234_5678_FEE0_1000);
        // Writing reserved bits with the mask bit clear unmasks.
        m.table_write(base + 12, &0xFFFF_FFFEu32.to_le_bytes())
            .unwrap();
        assert_eq!(u32_at(&m, base + 12), 0);
        assert!(!m.entry(3).unwrap().masked());
        // Other entries untouched.
        assert_eq!(m.entry(2).unwrap(), MsixEntry::RESET);
        assert_eq!(u32_at(&m, 2 * 16 + 12), 1);
    }

    #[test]
    fn table_qword_accesses() {
        let mut m = Msix::new(2).unwrap();
        m.table_write(16, &0x0000_0001_FEE0_0004u64.to_le_bytes())
            .unwrap();
        m.table_write(24, &0xFFFF_FFFF_0000_0031u64.to_le_bytes())
            .unwrap();
        assert_eq!(
            m.entry(1).unwrap(),
            MsixEntry {
                addr_lo: 0xFEE0_0004,
                addr_hi: 1,
                data: 0x31,
                ctrl: 1
            }
        );
        assert_eq!(
            read_table(&m, 16, 8),
            0x0000_0001_FEE0_0004u64.to_le_bytes()
        );
        assert_eq!(
            read_table(&m, 24, 8),
            0x0000_0001_0000_0031u64.to_le_bytes()
        );
        assert_eq!(read_table(&m, 0, 8), 0u64.to_le_bytes());
        assert_eq!(read_table(&m, 8, 8), (1u64 << 32).to_le_bytes());
    }

    #[test]
    fn table_bad_accesses_are_ignored() {
        let mut m = Msix::new(2).unwrap();
        let before = m.snapshot();
        for (off, len) in [
            (0, 1),
            (0, 2),
            (0, 3),
            (2, 4),
            (1, 4),
            (4, 8),
            (12, 8),
            (32, 4),
            (28, 8),
            (0, 16),
            (u64::MAX - 3, 4),
        ] {
            m.table_write(off, &vec![0x55; len]).unwrap();
            assert_eq!(m.snapshot(), before, "write offset {off} len {len}");
            assert_eq!(
                read_table(&m, off, len),
                vec![0; len],
                "read offset {off} len {len}"
            );
            assert!(!m.table_access_ok(off, len));
        }
        assert!(m.table_access_ok(28, 4));
        assert!(m.table_access_ok(24, 8));
    }

    #[test]
    fn table_ctrl_write_delivers_pending_once() {
        let mut m = Msix::new(2).unwrap();
        let n = Arc::new(CountingNotifier::new());
        m.set_notifier(1, Some(n.clone())).unwrap();
        m.write_control(true, false).unwrap();
        assert_eq!(m.fire(1).unwrap(), Delivery::Pending);
        assert_eq!(read_pba(&m, 0, 8), 2u64.to_le_bytes());
        // 8-byte write of data + control: data first, then the unmask delivers.
        m.table_write(24, &0x0000_0000_0000_0042u64.to_le_bytes())
            .unwrap();
        assert_eq!(n.count(), 1);
        assert_eq!(m.entry(1).unwrap().data, 0x42);
        assert_eq!(read_pba(&m, 0, 8), [0; 8]);
        m.table_write(28, &0u32.to_le_bytes()).unwrap();
        assert_eq!(n.count(), 1);
        m.table_write(28, &1u32.to_le_bytes()).unwrap();
        assert!(m.is_masked(1).unwrap());
        assert_eq!(m.fire(1).unwrap(), Delivery::Pending);
        m.table_write(28, &0u32.to_le_bytes()).unwrap();
        assert_eq!(n.count(), 2);
    }

    #[test]
    fn reset_restores_power_on_state_keeps_notifiers_and_stats() {
        let (mut m, ns) = live(3);
        m.table_write(0, &0xFEE0_0000u32.to_le_bytes()).unwrap();
        m.fire(0).unwrap();
        m.set_host_mask(2, true).unwrap();
        m.fire(2).unwrap();
        let stats = m.stats();
        m.reset();
        assert!(!m.enabled());
        assert!(!m.function_masked());
        for v in 0..3 {
            assert_eq!(m.entry(v).unwrap(), MsixEntry::RESET);
            assert!(!m.pending(v).unwrap());
            assert!(m.has_notifier(v));
        }
        assert_eq!(m.snapshot().host_masked, [false; 3]);
        assert_eq!(m.stats(), stats);
        m.write_control(true, false).unwrap();
        assert_eq!(counts(&ns), [1, 0, 0], "nothing pending survives a reset");
        assert_eq!(
            m.fire(2).unwrap(),
            Delivery::Pending,
            "entries are masked after reset"
        );
        m.set_entry_masked(2, false).unwrap();
        assert_eq!(counts(&ns), [1, 0, 1]);
    }

    #[test]
    fn bad_vectors_are_rejected() {
        let mut m = Msix::new(8).unwrap();
        assert!(matches!(m.fire(8), Err(Error::InvalidVector(8))));
        assert!(matches!(
            m.set_host_mask(8, true),
            Err(Error::InvalidVector(8))
        ));
        assert!(matches!(
            m.set_entry_masked(100, false),
            Err(Error::InvalidVector(100))
        ));
        assert!(matches!(m.is_masked(8), Err(Error::InvalidVector(8))));
        assert!(matches!(m.pending(8), Err(Error::InvalidVector(8))));
        assert!(matches!(
            m.entry(u16::MAX),
            Err(Error::InvalidVector(65535))
        ));
        assert!(matches!(
            m.set_notifier(8, None),
            Err(Error::InvalidVector(8))
        ));
        assert_eq!(m.stats(), MsixStats::default());
    }

    #[test]
    fn failed_notifier_write_is_reported() {
        let (mut m, ns) = live(3);
        m.set_notifier(1, Some(Arc::new(FailingNotifier))).unwrap();
        assert!(matches!(m.fire(1), Err(Error::Notify(_))));
        m.write_control(true, true).unwrap();
        for v in 0..3 {
            m.fire(v).unwrap();
        }
        // The failing vector 1 is reported, vectors 0 and 2 are still delivered.
        assert!(matches!(
            m.write_control(true, false),
            Err(Error::Notify(_))
        ));
        assert_eq!(counts(&ns), [1, 0, 1]);
        assert_eq!(m.stats().triggers, 2);
    }

    #[test]
    fn snapshot_json_round_trip() {
        let (mut a, na) = live(70);
        a.table_write(5 * 16, &0xFEE0_0000u32.to_le_bytes())
            .unwrap();
        a.table_write(5 * 16 + 8, &0x25u32.to_le_bytes()).unwrap();
        a.set_entry_masked(5, true).unwrap();
        a.set_host_mask(66, true).unwrap();
        a.fire(5).unwrap();
        a.fire(66).unwrap();
        a.fire(7).unwrap();
        let snap = a.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: MsixState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);

        // Restoring into a function of another size fails and changes nothing.
        let mut small = Msix::new(69).unwrap();
        let small_before = small.snapshot();
        assert!(matches!(
            small.restore(&back),
            Err(Error::SnapshotMismatch(_))
        ));
        assert_eq!(small.snapshot(), small_before);
        let mut bad = back.clone();
        bad.pba.push(0);
        assert!(matches!(
            Msix::new(70).unwrap().restore(&bad),
            Err(Error::SnapshotMismatch(_))
        ));

        let (mut b, nb) = live(70);
        b.restore(&back).unwrap();
        assert_eq!(b.snapshot(), snap);
        assert!(b.has_notifier(5), "notifiers are kept");
        na.iter().for_each(|n| {
            n.take();
        });
        nb.iter().for_each(|n| {
            n.take();
        });
        type Op = fn(&mut Msix) -> Result<()>;
        let ops: [Op; 7] = [
            |m| m.fire(5).map(|_| ()),
            |m| m.set_entry_masked(5, false),
            |m| m.set_host_mask(66, false),
            |m| m.write_control(true, true),
            |m| m.fire(9).map(|_| ()),
            |m| m.write_control(true, false),
            |m| m.fire(66).map(|_| ()),
        ];
        for (i, op) in ops.iter().enumerate() {
            op(&mut a).unwrap();
            op(&mut b).unwrap();
            assert_eq!(counts(&na), counts(&nb), "op {i}");
            assert_eq!(a.snapshot(), b.snapshot(), "op {i}");
        }
        assert_eq!(counts(&na)[5], 1);
        assert_eq!(counts(&na)[66], 2);
        assert_eq!(counts(&na)[9], 1);
        let mut table = [0u8; 16];
        b.table_read(5 * 16, &mut table[..8]);
        assert_eq!(table[..4], 0xFEE0_0000u32.to_le_bytes());
    }

    #[test]
    fn restore_clears_reserved_bits() {
        let mut m = Msix::new(3).unwrap();
        let mut s = m.snapshot();
        s.entries[0] = MsixEntry {
            addr_lo: 0xFFFF_FFFF,
            addr_hi: 0,
            data: 0,
            ctrl: 0xFFFF_FFFE,
        };
        s.pba[0] = u64::MAX;
        m.restore(&s).unwrap();
        assert_eq!(m.snapshot().pba, [0b111]);
        assert_eq!(
            m.entry(0).unwrap(),
            MsixEntry {
                addr_lo: 0xFFFF_FFFC,
                addr_hi: 0,
                data: 0,
                ctrl: 0
            }
        );
    }

    #[test]
    fn loopback_signals_the_bound_fd_only() {
        let mut m = Msix::new(4).unwrap();
        let n = Arc::new(crate::notifier::CountingNotifier::new());
        m.set_notifier(2, Some(n.clone())).unwrap();
        // Disabled and masked: the loopback still writes the fd and leaves the PBA alone.
        assert!(m.loopback(2).unwrap());
        assert!(!m.loopback(1).unwrap());
        assert!(m.loopback(4).is_err());
        assert_eq!(n.take(), 1);
        assert!(!m.pending(2).unwrap());
        assert_eq!(m.stats().triggers, 1);
        assert!(m.has_notifiers());
    }
}
