// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! PCI MSI with per-vector masking (PCI Local Bus 3.0 §6.8.1, the 64-bit capability with mask
//! and pending bits).
//!
//! The function offers `N` vectors (Multiple Message Capable, N = 1, 2, 4, …, 32); the guest
//! enables `1 << MME` of them. An event on vector v is delivered when MSI is enabled, v is below
//! the enabled count and v's mask bit is clear. A masked vector latches the event in its pending
//! bit instead (§6.8.1.7: "the function must set the pending bit"); clearing the mask bit
//! with the pending bit set clears it and sends the message once. Events while MSI is disabled
//! or on a vector the guest did not enable are dropped and counted.
//!
//! As for [`Msix`](crate::Msix), the model sends no message itself: the VMM binds one notifier
//! (an eventfd, usually a KVM irqfd on the vector's MSI route) per vector.
//!
//! ```
//! use std::sync::Arc;
//! use irqbridge_core::{CountingNotifier, Msi, MsiDelivery};
//!
//! let mut msi = Msi::new(4)?;
//! let v1 = Arc::new(CountingNotifier::new());
//! msi.set_notifier(1, Some(v1.clone()))?;
//! msi.write_control(true, 2)?; // Enable, MME = 2: four vectors
//! msi.write_mask(0b10)?; // mask vector 1
//! assert_eq!(msi.fire(1)?, MsiDelivery::Pending);
//! msi.write_mask(0)?; // unmask: the pending event goes out once
//! assert_eq!(v1.count(), 1);
//! assert_eq!(msi.pending_bits(), 0);
//! # Ok::<(), irqbridge_core::Error>(())
//! ```

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::notifier::{Notifier, Notifiers};

/// Largest number of MSI vectors (Multiple Message Capable 5).
pub const MSI_MAX_VECTORS: u8 = 32;

/// What happened to an MSI event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiDelivery {
    /// The vector's notifier was written.
    Sent,
    /// The vector is masked: its pending bit is set.
    Pending,
    /// MSI is disabled (or another interrupt mode owns the function): dropped.
    Disabled,
    /// The vector is at or beyond the enabled count (`1 << MME`): dropped.
    NotEnabled,
    /// Deliverable, but no notifier is bound: dropped.
    NoNotifier,
}

/// Counters of an MSI function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiStats {
    /// Notifier writes (direct events and pending deliveries).
    pub triggers: u64,
    /// Events that hit a masked vector.
    pub pending_sets: u64,
    /// Events dropped because MSI was disabled.
    pub dropped_disabled: u64,
    /// Events dropped because the vector was not enabled (MME).
    pub dropped_mme: u64,
    /// Events dropped because the vector had no notifier.
    pub dropped_no_notifier: u64,
}

impl MsiStats {
    /// Every dropped event.
    pub fn dropped(&self) -> u64 {
        self.dropped_disabled
            .wrapping_add(self.dropped_mme)
            .wrapping_add(self.dropped_no_notifier)
    }
}

/// Serializable state of an [`Msi`] (everything except the notifiers).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiState {
    /// Number of vectors the function offers (N).
    pub vectors: u8,
    /// Message Control bit 0.
    pub enabled: bool,
    /// Multiple Message Enable (log2 of the enabled count).
    pub mme: u8,
    /// Message address (bits 1:0 are 0).
    pub address: u64,
    /// Message data.
    pub data: u16,
    /// Mask bits.
    pub mask: u32,
    /// Pending bits.
    pub pending: u32,
    /// Counters.
    pub stats: MsiStats,
}

/// An MSI function: Enable, MME, message, mask and pending bits, one notifier per vector.
#[derive(Debug)]
pub struct Msi {
    state: MsiState,
    notifiers: Notifiers,
}

fn log2_vectors(vectors: u8) -> Option<u8> {
    matches!(vectors, 1 | 2 | 4 | 8 | 16 | 32).then(|| vectors.trailing_zeros() as u8)
}

impl Msi {
    /// An MSI function with `vectors` vectors (1, 2, 4, 8, 16 or 32) in its reset state.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for any other count.
    pub fn new(vectors: u8) -> Result<Self> {
        if log2_vectors(vectors).is_none() {
            return Err(Error::InvalidConfig(format!(
                "MSI vector count {vectors} is not 1, 2, 4, 8, 16 or 32"
            )));
        }
        Ok(Msi {
            state: MsiState {
                vectors,
                ..MsiState::default()
            },
            notifiers: Notifiers::new(usize::from(vectors)),
        })
    }

    /// Number of vectors offered (N).
    pub fn num_vectors(&self) -> u8 {
        self.state.vectors
    }

    /// Multiple Message Capable: log2 N.
    pub fn mmc(&self) -> u8 {
        log2_vectors(self.state.vectors).unwrap_or(0)
    }

    /// Number of vectors the guest enabled: `1 << MME`.
    pub fn enabled_vectors(&self) -> u8 {
        1u8 << self.state.mme.min(5)
    }

    /// Message Control bit 0.
    pub fn enabled(&self) -> bool {
        self.state.enabled
    }

    /// Multiple Message Enable.
    pub fn mme(&self) -> u8 {
        self.state.mme
    }

    /// The message address.
    pub fn address(&self) -> u64 {
        self.state.address
    }

    /// The message data (vector v sends `data | v` in its low bits, PCI §6.8.1.6).
    pub fn data(&self) -> u16 {
        self.state.data
    }

    /// The mask bits.
    pub fn mask_bits(&self) -> u32 {
        self.state.mask
    }

    /// The pending bits.
    pub fn pending_bits(&self) -> u32 {
        self.state.pending
    }

    /// Bit mask of the vectors that exist.
    fn valid_bits(&self) -> u32 {
        if self.state.vectors >= 32 {
            u32::MAX
        } else {
            (1u32 << self.state.vectors) - 1
        }
    }

    /// Bind (`Some`) or unbind (`None`) the notifier of `vector`. Signals nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector >= N`.
    pub fn set_notifier(&mut self, vector: u8, n: Option<Arc<dyn Notifier>>) -> Result<()> {
        self.notifiers.set(u32::from(vector), n)
    }

    /// Unbind every notifier.
    pub fn clear_notifiers(&mut self) {
        self.notifiers.clear();
    }

    /// Whether any vector has a notifier.
    pub fn has_notifiers(&self) -> bool {
        self.notifiers.any()
    }

    /// Whether `vector` has a notifier (false if out of range).
    pub fn has_notifier(&self, vector: u8) -> bool {
        self.notifiers.get(usize::from(vector)).is_some()
    }

    /// Writes the notifier of `vector` if it has one, whatever the masks say (the loopback of
    /// `SET_IRQS(MSI, TRIGGER|DATA_NONE)`). Returns whether it was written.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector >= N`; [`Error::Notify`] if the write failed.
    pub fn loopback(&mut self, vector: u8) -> Result<bool> {
        let Some(n) = self.notifiers.bound(u32::from(vector))? else {
            return Ok(false);
        };
        n.notify().map_err(Error::Notify)?;
        self.state.stats.triggers = self.state.stats.triggers.wrapping_add(1);
        Ok(true)
    }

    /// An event on `vector`. `blocked` is true when another interrupt mode owns the function
    /// (MSI-X enabled): the event is then dropped as if MSI were disabled.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector >= N`; [`Error::Notify`] if the notifier write
    /// failed.
    pub fn fire_blocked(&mut self, vector: u8, blocked: bool) -> Result<MsiDelivery> {
        if vector >= self.state.vectors {
            return Err(Error::InvalidVector(u32::from(vector)));
        }
        let enabled_vectors = self.enabled_vectors();
        let s = &mut self.state.stats;
        if !self.state.enabled || blocked {
            s.dropped_disabled = s.dropped_disabled.wrapping_add(1);
            return Ok(MsiDelivery::Disabled);
        }
        if vector >= enabled_vectors {
            s.dropped_mme = s.dropped_mme.wrapping_add(1);
            return Ok(MsiDelivery::NotEnabled);
        }
        let bit = 1u32 << vector;
        if self.state.mask & bit != 0 {
            self.state.pending |= bit;
            s.pending_sets = s.pending_sets.wrapping_add(1);
            return Ok(MsiDelivery::Pending);
        }
        self.send(vector)
    }

    /// An event on `vector` (see [`fire_blocked`](Self::fire_blocked)).
    ///
    /// # Errors
    ///
    /// As [`fire_blocked`](Self::fire_blocked).
    pub fn fire(&mut self, vector: u8) -> Result<MsiDelivery> {
        self.fire_blocked(vector, false)
    }

    /// Message Control was written: Enable and MME (clamped to MMC, as Linux and QEMU do).
    /// Vectors that become deliverable with their pending bit set are signalled once.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] with the first failed delivery.
    pub fn write_control(&mut self, enabled: bool, mme: u8) -> Result<()> {
        self.state.enabled = enabled;
        self.state.mme = mme.min(self.mmc());
        self.deliver_pending()
    }

    /// Message Address (low and high) was written; bits 1:0 are forced to 0.
    pub fn write_address(&mut self, address: u64) {
        self.state.address = address & !3;
    }

    /// Message Data was written.
    pub fn write_data(&mut self, data: u16) {
        self.state.data = data;
    }

    /// Mask Bits were written (bits of vectors that do not exist are ignored). Every vector
    /// that became unmasked with its pending bit set is signalled once, in vector order.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] with the first failed delivery (the others are still delivered).
    pub fn write_mask(&mut self, mask: u32) -> Result<()> {
        self.state.mask = mask & self.valid_bits();
        self.deliver_pending()
    }

    /// Delivers every pending vector that is now deliverable (enabled, below the enabled
    /// count, unmasked). Vectors still masked or not enabled keep their pending bit.
    fn deliver_pending(&mut self) -> Result<()> {
        if !self.state.enabled {
            return Ok(());
        }
        let mut first_err = None;
        for v in 0..self.enabled_vectors().min(self.state.vectors) {
            let bit = 1u32 << v;
            if self.state.pending & bit != 0 && self.state.mask & bit == 0 {
                self.state.pending &= !bit;
                if let Err(e) = self.send(v) {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn send(&mut self, vector: u8) -> Result<MsiDelivery> {
        let s = &mut self.state.stats;
        match self.notifiers.get(usize::from(vector)) {
            Some(n) => {
                n.notify().map_err(Error::Notify)?;
                s.triggers = s.triggers.wrapping_add(1);
                Ok(MsiDelivery::Sent)
            }
            _ => {
                s.dropped_no_notifier = s.dropped_no_notifier.wrapping_add(1);
                Ok(MsiDelivery::NoNotifier)
            }
        }
    }

    /// Power-on state: Enable, MME, address, data, mask and pending bits 0. Notifiers and
    /// counters survive.
    pub fn reset(&mut self) {
        let stats = self.state.stats;
        let vectors = self.state.vectors;
        self.state = MsiState {
            vectors,
            stats,
            ..MsiState::default()
        };
    }

    /// Counters.
    pub fn stats(&self) -> MsiStats {
        self.state.stats
    }

    /// The whole state except the notifiers.
    pub fn snapshot(&self) -> MsiState {
        self.state.clone()
    }

    /// Restores a state taken with [`snapshot`](Self::snapshot) from a function with the same
    /// vector count. Notifiers are kept; nothing is signalled.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotMismatch`] if the vector counts differ (the model is unchanged).
    pub fn restore(&mut self, state: &MsiState) -> Result<()> {
        if state.vectors != self.state.vectors {
            return Err(Error::SnapshotMismatch(format!(
                "MSI snapshot has {} vectors, this function {}",
                state.vectors, self.state.vectors
            )));
        }
        let valid = self.valid_bits();
        self.state = MsiState {
            mme: state.mme.min(self.mmc()),
            address: state.address & !3,
            mask: state.mask & valid,
            pending: state.pending & valid,
            ..state.clone()
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notifier::CountingNotifier;
    use crate::notifier::test_util::FailingNotifier;

    fn bound(n: u8) -> (Msi, Vec<Arc<CountingNotifier>>) {
        let mut msi = Msi::new(n).unwrap();
        let fds: Vec<_> = (0..n).map(|_| Arc::new(CountingNotifier::new())).collect();
        for (v, f) in fds.iter().enumerate() {
            msi.set_notifier(v as u8, Some(f.clone())).unwrap();
        }
        (msi, fds)
    }

    fn counts(fds: &[Arc<CountingNotifier>]) -> Vec<u64> {
        fds.iter().map(|f| f.take()).collect()
    }

    #[test]
    fn sizes() {
        for n in [1u8, 2, 4, 8, 16, 32] {
            let m = Msi::new(n).unwrap();
            assert_eq!(1u8 << m.mmc(), n);
            assert_eq!(m.enabled_vectors(), 1);
        }
        for n in [0u8, 3, 5, 33, 64, 255] {
            assert!(Msi::new(n).is_err(), "{n}");
        }
    }

    #[test]
    fn disabled_and_beyond_mme_are_dropped_and_counted() {
        let (mut m, fds) = bound(4);
        assert_eq!(m.fire(0).unwrap(), MsiDelivery::Disabled);
        m.write_control(true, 0).unwrap();
        assert_eq!(m.fire(0).unwrap(), MsiDelivery::Sent);
        assert_eq!(m.fire(1).unwrap(), MsiDelivery::NotEnabled);
        assert_eq!(m.fire(3).unwrap(), MsiDelivery::NotEnabled);
        assert!(m.fire(4).is_err());
        // MME above MMC is clamped.
        m.write_control(true, 7).unwrap();
        assert_eq!(m.mme(), 2);
        for v in 0..4 {
            assert_eq!(m.fire(v).unwrap(), MsiDelivery::Sent);
        }
        assert_eq!(m.fire_blocked(2, true).unwrap(), MsiDelivery::Disabled);
        assert_eq!(counts(&fds), vec![2, 1, 1, 1]);
        let s = m.stats();
        assert_eq!(
            (
                s.triggers,
                s.dropped_disabled,
                s.dropped_mme,
                s.pending_sets
            ),
            (5, 2, 2, 0)
        );
        assert_eq!(s.dropped(), 4);
    }

    #[test]
    fn masked_pending_delivered_exactly_once_on_unmask() {
        let (mut m, fds) = bound(8);
        m.write_control(true, 3).unwrap();
        m.write_mask(0b1010_0101).unwrap();
        for v in 0..8 {
            m.fire(v).unwrap();
            m.fire(v).unwrap();
        }
        assert_eq!(m.pending_bits(), 0b1010_0101);
        assert_eq!(counts(&fds), vec![0, 2, 0, 2, 2, 0, 2, 0]);
        // Unmask vectors 0 and 2 only.
        m.write_mask(0b1010_0000).unwrap();
        assert_eq!(counts(&fds), vec![1, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(m.pending_bits(), 0b1010_0000);
        // A second unmask write delivers nothing more.
        m.write_mask(0b1010_0000).unwrap();
        assert_eq!(counts(&fds), vec![0; 8]);
        // Disable, unmask everything: pending kept until enabled again.
        m.write_control(false, 3).unwrap();
        m.write_mask(0).unwrap();
        assert_eq!(m.pending_bits(), 0b1010_0000);
        m.write_control(true, 3).unwrap();
        assert_eq!(counts(&fds), vec![0, 0, 0, 0, 0, 1, 0, 1]);
        assert_eq!(m.pending_bits(), 0);
        assert_eq!(m.stats().pending_sets, 8);
        assert_eq!(m.stats().triggers, 8 + 4);
        // Mask bits of vectors that do not exist are ignored.
        m.write_mask(u32::MAX).unwrap();
        assert_eq!(m.mask_bits(), 0xff);
    }

    #[test]
    fn pending_beyond_new_mme_waits() {
        let (mut m, fds) = bound(4);
        m.write_control(true, 2).unwrap();
        m.write_mask(0b1000).unwrap();
        m.fire(3).unwrap();
        m.write_control(true, 0).unwrap();
        m.write_mask(0).unwrap();
        assert_eq!(m.pending_bits(), 0b1000);
        m.write_control(true, 2).unwrap();
        assert_eq!(counts(&fds), vec![0, 0, 0, 1]);
    }

    #[test]
    fn loopback_ignores_masks_and_no_notifier_is_dropped() {
        let mut m = Msi::new(2).unwrap();
        let f = Arc::new(CountingNotifier::new());
        m.set_notifier(1, Some(f.clone())).unwrap();
        assert!(m.loopback(1).unwrap());
        assert!(!m.loopback(0).unwrap());
        assert!(m.loopback(2).is_err());
        assert_eq!(f.take(), 1);
        m.write_control(true, 1).unwrap();
        assert_eq!(m.fire(0).unwrap(), MsiDelivery::NoNotifier);
        assert_eq!(m.stats().dropped_no_notifier, 1);
        m.set_notifier(1, Some(Arc::new(FailingNotifier))).unwrap();
        assert!(m.fire(1).is_err());
        m.clear_notifiers();
        assert!(!m.has_notifiers());
    }

    #[test]
    fn reset_snapshot_restore() {
        let (mut m, _fds) = bound(4);
        m.write_control(true, 2).unwrap();
        m.write_address(0xfee0_1003);
        m.write_data(0x4041);
        m.write_mask(0b10).unwrap();
        m.fire(1).unwrap();
        let snap = m.snapshot();
        assert_eq!(snap.address, 0xfee0_1000);
        let json = serde_json::to_string(&snap).unwrap();
        let mut n = Msi::new(4).unwrap();
        n.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(n.snapshot(), snap);
        assert!(Msi::new(8).unwrap().restore(&snap).is_err());
        m.reset();
        assert_eq!(
            (m.enabled(), m.mme(), m.address(), m.data(), m.mask_bits()),
            (false, 0, 0, 0, 0)
        );
        assert_eq!(m.pending_bits(), 0);
        assert_eq!(m.stats().pending_sets, 1);
        assert!(m.has_notifier(3));
    }
}
