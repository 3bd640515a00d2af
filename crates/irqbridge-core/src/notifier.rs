// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seam through which interrupts leave the models.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Writes that found their eventfd's counter saturated (see [`saturated_writes`]).
static SATURATED_WRITES: AtomicU64 = AtomicU64::new(0);

/// How many [`EventFd`] notifications, process-wide, found the counter saturated and were
/// counted as already pending instead of written.
pub fn saturated_writes() -> u64 {
    SATURATED_WRITES.load(Ordering::Relaxed)
}

/// Count one write that found its eventfd saturated (for [`saturated_writes`]); for
/// [`Notifier`] implementations outside this crate that write an eventfd themselves.
pub fn count_saturated_write() {
    SATURATED_WRITES.fetch_add(1, Ordering::Relaxed);
}

use vmm_sys_util::eventfd::EventFd;

/// Something that can be signalled when an interrupt fires.
///
/// In production this is an [`EventFd`] received from the VMM (a KVM irqfd, or an eventfd that
/// the VMM polls); in tests a [`CountingNotifier`].
pub trait Notifier: Send + Sync + std::fmt::Debug {
    /// Signal the interrupt once.
    ///
    /// # Errors
    ///
    /// Returns the I/O error of the underlying write.
    fn notify(&self) -> std::io::Result<()>;
}

impl Notifier for EventFd {
    /// Adds 1 to the eventfd counter.
    ///
    /// An eventfd taken from a peer is non-blocking (the vfio-user server sets `O_NONBLOCK`
    /// when it receives one), so a write to a counter at its maximum (`0xffff_ffff_ffff_fffe`)
    /// fails with `EAGAIN` instead of waiting for the peer to read. A saturated counter means
    /// the interrupt is already pending: the write is counted ([`saturated_writes`]) and
    /// reported as delivered.
    fn notify(&self) -> std::io::Result<()> {
        match self.write(1) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                SATURATED_WRITES.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            r => r,
        }
    }
}

/// Counts notifications; for tests and harnesses.
#[derive(Debug, Default)]
pub struct CountingNotifier {
    count: AtomicU64,
}

impl CountingNotifier {
    /// A notifier that has counted nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notifications counted since creation or the last [`take`](Self::take).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Returns the number of notifications counted so far and resets the count to 0.
    pub fn take(&self) -> u64 {
        self.count.swap(0, Ordering::SeqCst)
    }
}

impl Notifier for CountingNotifier {
    fn notify(&self) -> std::io::Result<()> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// One optional notifier per vector of an interrupt function (MSI, MSI-X).
#[derive(Debug)]
pub(crate) struct Notifiers(Vec<Option<Arc<dyn Notifier>>>);

impl Notifiers {
    /// `vectors` vectors, none bound.
    pub(crate) fn new(vectors: usize) -> Self {
        Notifiers(vec![None; vectors])
    }

    /// Bind (`Some`) or unbind (`None`) the notifier of `vector`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector` is out of range.
    pub(crate) fn set(&mut self, vector: u32, n: Option<Arc<dyn Notifier>>) -> Result<()> {
        let slot = usize::try_from(vector)
            .ok()
            .and_then(|v| self.0.get_mut(v))
            .ok_or(Error::InvalidVector(vector))?;
        *slot = n;
        Ok(())
    }

    /// Unbind every notifier.
    pub(crate) fn clear(&mut self) {
        self.0.iter_mut().for_each(|n| *n = None);
    }

    /// Whether any vector has a notifier.
    pub(crate) fn any(&self) -> bool {
        self.0.iter().any(Option::is_some)
    }

    /// The notifier of `vector` (`None` if unbound).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidVector`] if `vector` is out of range.
    pub(crate) fn bound(&self, vector: u32) -> Result<Option<&Arc<dyn Notifier>>> {
        usize::try_from(vector)
            .ok()
            .and_then(|v| self.0.get(v))
            .map(Option::as_ref)
            .ok_or(Error::InvalidVector(vector))
    }

    /// The notifier of vector `v` (`None` if unbound or out of range).
    pub(crate) fn get(&self, v: usize) -> Option<&Arc<dyn Notifier>> {
        self.0.get(v).and_then(Option::as_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counting_notifier_counts_and_takes() {
        let n = CountingNotifier::new();
        assert_eq!(n.count(), 0);
        n.notify().unwrap();
        n.notify().unwrap();
        assert_eq!(n.count(), 2);
        assert_eq!(n.take(), 2);
        assert_eq!(n.count(), 0);
        n.notify().unwrap();
        assert_eq!(n.take(), 1);
    }

    #[test]
    fn eventfd_notifier_writes_one() {
        let fd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let n: Arc<dyn Notifier> = Arc::new(fd.try_clone().unwrap());
        n.notify().unwrap();
        n.notify().unwrap();
        n.notify().unwrap();
        assert_eq!(fd.read().unwrap(), 3);
        assert!(fd.read().is_err(), "counter must be drained");
    }

    #[test]
    fn saturated_eventfd_counts_as_pending() {
        let fd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        fd.write(0xffff_ffff_ffff_fffe).unwrap();
        let before = saturated_writes();
        fd.notify().unwrap();
        fd.notify().unwrap();
        assert!(saturated_writes() >= before + 2);
        assert_eq!(fd.read().unwrap(), 0xffff_ffff_ffff_fffe);
        fd.notify().unwrap();
        assert_eq!(fd.read().unwrap(), 1);
    }
}

/// Notifiers shared by the unit tests of the models.
#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::{Arc, Mutex};

    use super::Notifier;

    /// A notifier whose writes always fail.
    #[derive(Debug, Default)]
    pub(crate) struct FailingNotifier;

    impl Notifier for FailingNotifier {
        fn notify(&self) -> std::io::Result<()> {
            Err(std::io::Error::other("notifier broken"))
        }
    }

    /// A notifier that appends its id to a shared log, to check the order of signals.
    #[derive(Debug)]
    pub(crate) struct RecordingNotifier {
        pub(crate) id: u32,
        pub(crate) log: Arc<Mutex<Vec<u32>>>,
    }

    impl Notifier for RecordingNotifier {
        fn notify(&self) -> std::io::Result<()> {
            self.log
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .push(self.id);
            Ok(())
        }
    }
}
