// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The server side of a PCI INTx line with VFIO semantics (`vfio_pci_intrs.c`).
//!
//! The line is level triggered and *auto-masked*: when the level goes high while the line is
//! unmasked, the model masks the line and writes the trigger notifier once. The client (QEMU,
//! or KVM through its resample eventfd) unmasks the line after the guest's EOI; if the line is
//! still high at that point the model writes the trigger again and stays masked.
//!
//! State (protocols.md §2.4): `level` (the OR of up to 32 sources), `masked`, `disabled`
//! (the guest's COMMAND bit 10, virtualised), `suppressed` (MSI or MSI-X enabled), `enabled`
//! (the VFIO INTx index is enabled) and the trigger notifier. The unmask eventfd lives in the
//! transport: when it becomes readable the transport calls [`IntxLine::unmask`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::notifier::Notifier;

/// Number of sources that can share one line.
pub const INTX_MAX_SOURCES: u32 = 32;

/// Counters of an INTx line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntxStats {
    /// Trigger notifier writes.
    pub triggers: u64,
    /// Unmasks that found the line masked and acted on it (not disabled by COMMAND bit 10).
    pub unmasks: u64,
}

/// Serializable state of an [`IntxLine`] (everything except the trigger notifier).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntxState {
    /// Bit `s` set: source `s` drives the line high.
    pub sources: u32,
    /// The line is masked (auto-mask, MASK, or COMMAND bit 10).
    pub masked: bool,
    /// COMMAND bit 10 (INTx disable) as written by the guest.
    pub disabled: bool,
    /// The VFIO INTx index is enabled (a trigger was bound since the last index disable).
    pub enabled: bool,
    /// MSI or MSI-X is enabled, so INTx does not fire.
    pub suppressed: bool,
    /// Counters.
    pub stats: IntxStats,
}

/// One INTx line: level, masking and the trigger notifier.
#[derive(Debug, Default)]
pub struct IntxLine {
    state: IntxState,
    trigger: Option<Arc<dyn Notifier>>,
}

impl IntxLine {
    /// A line in its power-on state: no sources, unmasked, index disabled, no trigger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bind (`Some`) or unbind (`None`) the trigger notifier
    /// (`SET_IRQS(INTX, TRIGGER|EVENTFD)`).
    ///
    /// Binding enables the index; the first bind after the index was disabled starts with
    /// `masked = disabled`, like the kernel. Swapping the trigger of an enabled index keeps the
    /// mask. If the line is high, unmasked, not disabled and not suppressed when bound, it fires
    /// now (auto-mask). Unbinding keeps the index enabled; events are then dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] if the new trigger fired and could not be written.
    pub fn set_trigger(&mut self, trigger: Option<Arc<dyn Notifier>>) -> Result<()> {
        match trigger {
            Some(t) => {
                if !self.state.enabled {
                    self.state.enabled = true;
                    self.state.masked = self.state.disabled;
                }
                self.trigger = Some(t);
                self.try_fire()?;
            }
            None => self.trigger = None,
        }
        Ok(())
    }

    /// Whether a trigger notifier is bound.
    pub fn has_trigger(&self) -> bool {
        self.trigger.is_some()
    }

    /// `SET_IRQS(INTX, TRIGGER|DATA_NONE)` with count 0: disable the index.
    ///
    /// Drops the trigger and clears `masked`; the level sources are kept (they are the
    /// device's state) and so is COMMAND bit 10.
    pub fn disable_index(&mut self) {
        self.trigger = None;
        self.state.enabled = false;
        self.state.masked = false;
    }

    /// Whether the INTx index is enabled.
    pub fn is_enabled(&self) -> bool {
        self.state.enabled
    }

    /// Source `source` (0..32) raises the line; the line is the OR of all sources.
    ///
    /// Fires (masks the line and writes the trigger) iff the level is high and the line is
    /// unmasked, not disabled, not suppressed and has a trigger. Returns whether it fired.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if `source >= 32`; [`Error::Notify`] if the trigger write
    /// failed (the line stays masked).
    pub fn assert(&mut self, source: u32) -> Result<bool> {
        let bit = Self::source_bit(source)?;
        self.state.sources |= bit;
        self.try_fire()
    }

    /// Source `source` (0..32) lowers its input. Nothing is signalled: KVM drops the guest's
    /// line at the next EOI, when the resample unmask finds the line low.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if `source >= 32`.
    pub fn deassert(&mut self, source: u32) -> Result<()> {
        let bit = Self::source_bit(source)?;
        self.state.sources &= !bit;
        Ok(())
    }

    /// The line level (STATUS bit 3): whether any source is asserted.
    pub fn level(&self) -> bool {
        self.state.sources != 0
    }

    /// Whether the line is masked.
    pub fn masked(&self) -> bool {
        self.state.masked
    }

    /// COMMAND bit 10 (INTx disable) as last written.
    pub fn intx_disabled(&self) -> bool {
        self.state.disabled
    }

    /// Whether MSI or MSI-X currently suppresses the line.
    pub fn suppressed(&self) -> bool {
        self.state.suppressed
    }

    /// Bitmap of the asserted sources.
    pub fn sources(&self) -> u32 {
        self.state.sources
    }

    /// `SET_IRQS(INTX, MASK)`: mask the line.
    pub fn mask(&mut self) {
        self.state.masked = true;
    }

    /// `SET_IRQS(INTX, UNMASK)` or the unmask (resample) eventfd became readable.
    ///
    /// If the line is masked and not disabled: when the level is still high (and the line can
    /// fire: trigger bound, not suppressed) the trigger is written again and the line stays
    /// masked; otherwise the line is unmasked. Unmasking an unmasked line is a no-op (spurious
    /// unmasks are normal: every resample fd of a GSI fires on each EOI). Returns whether the
    /// trigger was written.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] if the trigger write failed.
    pub fn unmask(&mut self) -> Result<bool> {
        if !self.state.masked || self.state.disabled {
            return Ok(false);
        }
        self.state.stats.unmasks = self.state.stats.unmasks.wrapping_add(1);
        self.state.masked = false;
        self.try_fire()
    }

    /// The guest wrote COMMAND with bit 10 = `disable`.
    ///
    /// 0→1: disabled and masked. 1→0: not disabled, then [`unmask`](Self::unmask) (re-fires if
    /// the level is high). No change: nothing. Returns whether the trigger was written.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] if the trigger write failed.
    pub fn set_intx_disable(&mut self, disable: bool) -> Result<bool> {
        if disable == self.state.disabled {
            return Ok(false);
        }
        if disable {
            self.state.disabled = true;
            self.state.masked = true;
            Ok(false)
        } else {
            self.state.disabled = false;
            self.unmask()
        }
    }

    /// MSI or MSI-X enabled (`true`) or both disabled (`false`). While suppressed the line does
    /// not fire. Leaving suppression with the level high on an unmasked, not disabled line
    /// fires. Returns whether the trigger was written.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] if the trigger write failed.
    pub fn set_suppressed(&mut self, suppressed: bool) -> Result<bool> {
        if suppressed == self.state.suppressed {
            return Ok(false);
        }
        self.state.suppressed = suppressed;
        if suppressed {
            Ok(false)
        } else {
            self.try_fire()
        }
    }

    /// Power-on state: no sources; masked, disabled and suppressed cleared. The trigger
    /// binding and `enabled` survive (like `VFIO_DEVICE_RESET`); so do the counters.
    pub fn reset(&mut self) {
        self.state.sources = 0;
        self.state.masked = false;
        self.state.disabled = false;
        self.state.suppressed = false;
    }

    /// Counters.
    pub fn stats(&self) -> IntxStats {
        self.state.stats
    }

    /// The whole state except the trigger binding.
    pub fn snapshot(&self) -> IntxState {
        self.state.clone()
    }

    /// Restore a state taken with [`snapshot`](Self::snapshot). The trigger binding is not
    /// part of the snapshot and is kept as is. Restoring signals nothing.
    ///
    /// # Errors
    ///
    /// None today; the `Result` leaves room for validation.
    pub fn restore(&mut self, state: &IntxState) -> Result<()> {
        self.state = state.clone();
        Ok(())
    }

    fn source_bit(source: u32) -> Result<u32> {
        1u32.checked_shl(source)
            .filter(|_| source < INTX_MAX_SOURCES)
            .ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "INTx source {source} is out of range (at most {INTX_MAX_SOURCES} sources)"
                ))
            })
    }

    /// Fire if the line is high and nothing holds it back: auto-mask, then write the trigger.
    fn try_fire(&mut self) -> Result<bool> {
        let s = &mut self.state;
        if s.sources == 0 || s.masked || s.disabled || s.suppressed {
            return Ok(false);
        }
        let Some(trigger) = &self.trigger else {
            return Ok(false);
        };
        s.masked = true;
        trigger.notify().map_err(Error::Notify)?;
        s.stats.triggers = s.stats.triggers.wrapping_add(1);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notifier::CountingNotifier;
    use crate::notifier::test_util::FailingNotifier;

    fn bound() -> (IntxLine, Arc<CountingNotifier>) {
        let n = Arc::new(CountingNotifier::new());
        let mut line = IntxLine::new();
        line.set_trigger(Some(n.clone())).unwrap();
        (line, n)
    }

    #[test]
    fn power_on_state() {
        let line = IntxLine::new();
        assert!(!line.level());
        assert!(!line.masked());
        assert!(!line.intx_disabled());
        assert!(!line.suppressed());
        assert!(!line.is_enabled());
        assert!(!line.has_trigger());
        assert_eq!(line.stats(), IntxStats::default());
        assert_eq!(line.snapshot(), IntxState::default());
    }

    #[test]
    fn raise_fires_once_and_auto_masks() {
        let (mut line, n) = bound();
        assert!(line.is_enabled());
        assert!(line.assert(0).unwrap());
        assert!(line.level());
        assert!(line.masked());
        assert_eq!(n.count(), 1);
        // Raising again while masked signals nothing.
        assert!(!line.assert(0).unwrap());
        assert_eq!(n.count(), 1);
        assert_eq!(
            line.stats(),
            IntxStats {
                triggers: 1,
                unmasks: 0
            }
        );
    }

    #[test]
    fn lower_signals_nothing_and_unmask_then_unmasks() {
        let (mut line, n) = bound();
        line.assert(0).unwrap();
        line.deassert(0).unwrap();
        assert!(!line.level());
        assert!(line.masked(), "lowering does not unmask");
        assert_eq!(n.count(), 1);
        // EOI → resample → unmask: the line is low, so it just unmasks (quiet after deassert).
        assert!(!line.unmask().unwrap());
        assert!(!line.masked());
        assert_eq!(n.count(), 1);
        assert_eq!(
            line.stats(),
            IntxStats {
                triggers: 1,
                unmasks: 1
            }
        );
        // The next raise fires again.
        assert!(line.assert(0).unwrap());
        assert_eq!(n.count(), 2);
    }

    #[test]
    fn unmask_while_high_refires_and_stays_masked() {
        let (mut line, n) = bound();
        line.assert(0).unwrap();
        for i in 2..5 {
            assert!(line.unmask().unwrap());
            assert!(line.masked());
            assert_eq!(n.count(), i);
        }
        assert_eq!(
            line.stats(),
            IntxStats {
                triggers: 4,
                unmasks: 3
            }
        );
    }

    #[test]
    fn spurious_unmask_is_a_noop() {
        let (mut line, n) = bound();
        assert!(!line.unmask().unwrap());
        assert!(!line.unmask().unwrap());
        assert!(!line.masked());
        assert_eq!(n.count(), 0);
        assert_eq!(line.stats().unmasks, 0);
        // Also after a full cycle.
        line.assert(0).unwrap();
        line.deassert(0).unwrap();
        line.unmask().unwrap();
        assert!(!line.unmask().unwrap());
        assert_eq!(
            line.stats(),
            IntxStats {
                triggers: 1,
                unmasks: 1
            }
        );
    }

    #[test]
    fn mask_message_blocks_until_unmask() {
        let (mut line, n) = bound();
        line.mask();
        assert!(line.masked());
        assert!(!line.assert(0).unwrap());
        assert_eq!(n.count(), 0);
        assert!(line.unmask().unwrap(), "unmask while high fires");
        assert!(line.masked());
        assert_eq!(n.count(), 1);
        // MASK on a masked line keeps it masked.
        line.mask();
        assert!(line.masked());
    }

    #[test]
    fn command_bit10_set_then_cleared_while_high_refires() {
        let (mut line, n) = bound();
        assert!(!line.set_intx_disable(true).unwrap());
        assert!(line.intx_disabled());
        assert!(line.masked());
        assert!(!line.assert(0).unwrap());
        assert_eq!(n.count(), 0);
        // Unmask (e.g. a resample) while disabled does nothing.
        assert!(!line.unmask().unwrap());
        assert!(line.masked());
        assert_eq!(line.stats().unmasks, 0);
        // Writing the same value again changes nothing.
        assert!(!line.set_intx_disable(true).unwrap());
        // 1 → 0 with the level high: the pending interrupt fires.
        assert!(line.set_intx_disable(false).unwrap());
        assert!(!line.intx_disabled());
        assert!(line.masked());
        assert_eq!(n.count(), 1);
        assert_eq!(
            line.stats(),
            IntxStats {
                triggers: 1,
                unmasks: 1
            }
        );
        assert!(!line.set_intx_disable(false).unwrap());
        assert_eq!(n.count(), 1);
    }

    #[test]
    fn command_bit10_cleared_while_low_unmasks_quietly() {
        let (mut line, n) = bound();
        line.assert(0).unwrap();
        assert_eq!(n.count(), 1);
        line.set_intx_disable(true).unwrap();
        line.deassert(0).unwrap();
        assert!(!line.set_intx_disable(false).unwrap());
        assert!(!line.masked());
        assert_eq!(n.count(), 1);
        assert!(line.assert(0).unwrap());
        assert_eq!(n.count(), 2);
    }

    #[test]
    fn command_bit10_masks_an_unmasked_high_line_without_firing() {
        let mut line = IntxLine::new();
        line.assert(0).unwrap(); // no trigger yet: stays unmasked
        assert!(!line.masked());
        line.set_intx_disable(true).unwrap();
        let n = Arc::new(CountingNotifier::new());
        line.set_trigger(Some(n.clone())).unwrap();
        assert_eq!(n.count(), 0, "disabled line must not fire on bind");
        assert!(line.set_intx_disable(false).unwrap());
        assert_eq!(n.count(), 1);
    }

    #[test]
    fn disable_index_drops_trigger_keeps_level() {
        let (mut line, n) = bound();
        line.assert(3).unwrap();
        assert_eq!(n.count(), 1);
        line.disable_index();
        assert!(!line.is_enabled());
        assert!(!line.has_trigger());
        assert!(!line.masked());
        assert!(line.level(), "sources are device state");
        assert!(!line.unmask().unwrap());
        assert!(!line.assert(3).unwrap());
        assert_eq!(n.count(), 1);
        // Re-enabling with the line still high fires at once.
        let n2 = Arc::new(CountingNotifier::new());
        line.set_trigger(Some(n2.clone())).unwrap();
        assert!(line.is_enabled());
        assert!(line.masked());
        assert_eq!(n2.count(), 1);
        assert_eq!(n.count(), 1);
    }

    #[test]
    fn disable_index_then_enable_while_disabled_starts_masked() {
        let (mut line, _n) = bound();
        line.set_intx_disable(true).unwrap();
        line.disable_index();
        assert!(!line.masked());
        let n2 = Arc::new(CountingNotifier::new());
        line.set_trigger(Some(n2.clone())).unwrap();
        assert!(line.masked(), "initial masked = COMMAND.10");
        line.assert(0).unwrap();
        assert_eq!(n2.count(), 0);
    }

    #[test]
    fn suppression_blocks_and_release_fires() {
        let (mut line, n) = bound();
        assert!(!line.set_suppressed(true).unwrap());
        assert!(line.suppressed());
        assert!(!line.assert(0).unwrap());
        assert!(!line.masked());
        assert_eq!(n.count(), 0);
        assert!(line.set_suppressed(false).unwrap());
        assert!(line.masked());
        assert_eq!(n.count(), 1);
        // Leaving suppression again (no change) or while masked: nothing.
        assert!(!line.set_suppressed(false).unwrap());
        line.set_suppressed(true).unwrap();
        assert!(!line.set_suppressed(false).unwrap());
        assert_eq!(n.count(), 1);
    }

    #[test]
    fn suppression_release_while_disabled_or_low_is_quiet() {
        let (mut line, n) = bound();
        line.set_suppressed(true).unwrap();
        line.assert(0).unwrap();
        line.set_intx_disable(true).unwrap();
        assert!(!line.set_suppressed(false).unwrap());
        assert_eq!(n.count(), 0);
        line.set_intx_disable(false).unwrap(); // re-fires now
        assert_eq!(n.count(), 1);

        let (mut line, n) = bound();
        line.set_suppressed(true).unwrap();
        line.assert(0).unwrap();
        line.deassert(0).unwrap();
        assert!(!line.set_suppressed(false).unwrap());
        assert_eq!(n.count(), 0);
    }

    #[test]
    fn unmask_while_suppressed_unmasks_without_firing() {
        let (mut line, n) = bound();
        line.assert(0).unwrap();
        line.set_suppressed(true).unwrap();
        assert!(!line.unmask().unwrap());
        assert!(!line.masked());
        assert_eq!(n.count(), 1);
        assert!(line.set_suppressed(false).unwrap());
        assert_eq!(n.count(), 2);
    }

    #[test]
    fn several_sources_share_the_line() {
        let (mut line, n) = bound();
        assert!(line.assert(0).unwrap());
        assert!(!line.assert(31).unwrap());
        assert_eq!(line.sources(), 0x8000_0001);
        line.deassert(0).unwrap();
        assert!(line.level(), "source 31 still holds the line");
        assert!(line.unmask().unwrap());
        assert_eq!(n.count(), 2);
        line.deassert(31).unwrap();
        assert!(!line.level());
        assert!(!line.unmask().unwrap());
        assert!(!line.masked());
        // Deasserting a source that is not asserted changes nothing.
        line.deassert(5).unwrap();
        assert!(!line.level());
        assert_eq!(n.count(), 2);
    }

    #[test]
    fn bad_source_is_rejected() {
        let (mut line, n) = bound();
        assert!(matches!(line.assert(32), Err(Error::InvalidConfig(_))));
        assert!(matches!(
            line.deassert(u32::MAX),
            Err(Error::InvalidConfig(_))
        ));
        assert!(!line.level());
        assert_eq!(n.count(), 0);
    }

    #[test]
    fn set_trigger_while_high_fires_now() {
        let mut line = IntxLine::new();
        assert!(!line.assert(0).unwrap());
        assert!(!line.masked());
        let n = Arc::new(CountingNotifier::new());
        line.set_trigger(Some(n.clone())).unwrap();
        assert!(line.masked());
        assert_eq!(n.count(), 1);
        assert_eq!(line.stats().triggers, 1);
    }

    #[test]
    fn swap_and_unbind_trigger() {
        let (mut line, n) = bound();
        line.assert(0).unwrap();
        let n2 = Arc::new(CountingNotifier::new());
        line.set_trigger(Some(n2.clone())).unwrap();
        assert!(line.masked(), "swapping keeps the mask");
        assert_eq!(n2.count(), 0);
        assert!(line.unmask().unwrap());
        assert_eq!((n.count(), n2.count()), (1, 1));
        // Unbinding keeps the index enabled; events are dropped.
        line.set_trigger(None).unwrap();
        assert!(line.is_enabled());
        assert!(!line.has_trigger());
        line.deassert(0).unwrap();
        line.unmask().unwrap();
        assert!(!line.assert(0).unwrap());
        assert!(!line.masked());
        assert_eq!((n.count(), n2.count()), (1, 1));
    }

    #[test]
    fn reset_keeps_binding_and_stats() {
        let (mut line, n) = bound();
        line.assert(4).unwrap();
        line.set_intx_disable(true).unwrap();
        line.set_suppressed(true).unwrap();
        line.reset();
        assert_eq!(
            line.snapshot(),
            IntxState {
                sources: 0,
                masked: false,
                disabled: false,
                enabled: true,
                suppressed: false,
                stats: IntxStats {
                    triggers: 1,
                    unmasks: 0
                },
            }
        );
        assert!(line.has_trigger());
        assert!(line.assert(0).unwrap());
        assert_eq!(n.count(), 2);
    }

    #[test]
    fn failed_trigger_write_is_reported() {
        let mut line = IntxLine::new();
        line.set_trigger(Some(Arc::new(FailingNotifier))).unwrap();
        assert!(matches!(line.assert(0), Err(Error::Notify(_))));
        assert!(line.masked());
        assert_eq!(line.stats().triggers, 0);
        assert!(matches!(line.unmask(), Err(Error::Notify(_))));
    }

    /// Drive two lines with the same operations and compare every result.
    fn same_behaviour(
        a: &mut IntxLine,
        b: &mut IntxLine,
        na: &CountingNotifier,
        nb: &CountingNotifier,
    ) {
        type Op = fn(&mut IntxLine) -> Result<bool>;
        let ops: [Op; 10] = [
            |l| l.unmask(),
            |l| l.assert(1),
            |l| l.unmask(),
            |l| l.deassert(1).map(|()| false),
            |l| l.unmask(),
            |l| l.set_intx_disable(true),
            |l| l.assert(7),
            |l| l.set_intx_disable(false),
            |l| l.set_suppressed(false),
            |l| l.unmask(),
        ];
        for (i, op) in ops.iter().enumerate() {
            let ra = op(a).unwrap();
            let rb = op(b).unwrap();
            assert_eq!(ra, rb, "op {i}");
            assert_eq!(na.count(), nb.count(), "op {i}");
            assert_eq!(a.snapshot(), b.snapshot(), "op {i}");
        }
    }

    #[test]
    fn snapshot_json_round_trip() {
        let (mut a, na) = bound();
        a.assert(0).unwrap();
        a.assert(2).unwrap();
        a.deassert(0).unwrap();
        a.set_suppressed(true).unwrap();
        let snap = a.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: IntxState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);

        let nb = Arc::new(CountingNotifier::new());
        let mut b = IntxLine::new();
        b.set_trigger(Some(nb.clone())).unwrap();
        b.restore(&back).unwrap();
        assert!(b.has_trigger(), "restore keeps the binding");
        assert_eq!(b.snapshot(), snap);
        assert_eq!(nb.count(), 0, "restore signals nothing");
        nb.take();
        na.take();
        same_behaviour(&mut a, &mut b, &na, &nb);
        assert!(na.count() > 0);
    }
}
