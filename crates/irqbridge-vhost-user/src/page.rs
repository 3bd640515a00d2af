// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest's event-channel page, seen through the frontend's memory table.
//!
//! [`GuestPage`] implements [`SharedWords`] over 4 KiB of guest RAM so that the core model
//! ([`irqbridge_core::EventChannels`]) works directly on the page the guest registered. It
//! keeps the memory snapshot it was resolved in alive, so its pointer stays valid even after
//! the frontend replaces the memory table; the backend re-resolves the page on every table
//! update ([`crate::Backend`] does that in `update_memory`).

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use irqbridge_core::SharedWords;
use irqbridge_core::evtchn::{EVTCHN_PAGE_SIZE, EVTCHN_PAGE_WORDS};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use crate::error::{Error, Result};

/// 4 KiB of guest memory holding the event-channel page, as atomic 64-bit words.
pub struct GuestPage {
    gpa: u64,
    words: NonNull<AtomicU64>,
    // Keeps the mapping behind `words` alive.
    _mem: Arc<GuestMemoryMmap>,
}

// SAFETY: `words` points into a shared mapping owned by `_mem`, which lives as long as this
// value; the words are only ever accessed through `AtomicU64`, which is Sync, so sharing or
// moving the pointer between threads is as safe as sharing `&[AtomicU64]`.
unsafe impl Send for GuestPage {}
// SAFETY: see `Send`: all access is through atomics.
unsafe impl Sync for GuestPage {}

impl GuestPage {
    /// Resolve the page at guest physical address `gpa` in the current memory table of `mem`.
    ///
    /// # Errors
    ///
    /// [`Error::BadPage`] if `gpa` is not 8-byte aligned, not mapped, or the 4 KiB do not lie
    /// inside one memory region (or the host address is not 8-byte aligned).
    pub fn resolve(mem: &GuestMemoryAtomic<GuestMemoryMmap>, gpa: u64) -> Result<GuestPage> {
        let bad = |reason| Error::BadPage { gpa, reason };
        if gpa % 8 != 0 {
            return Err(bad("not 8-byte aligned"));
        }
        let snapshot = mem.memory().into_inner();
        let (region, offset) = snapshot
            .to_region_addr(GuestAddress(gpa))
            .ok_or_else(|| bad("not in guest memory"))?;
        let end = offset
            .0
            .checked_add(EVTCHN_PAGE_SIZE as u64)
            .ok_or_else(|| bad("crosses the end of guest memory"))?;
        if end > region.len() {
            return Err(bad("crosses the end of its memory region"));
        }
        let host = region
            .get_host_address(offset)
            .map_err(|_| bad("has no host mapping"))?;
        if (host as usize) % std::mem::align_of::<AtomicU64>() != 0 {
            return Err(bad("maps to an unaligned host address"));
        }
        let words = NonNull::new(host.cast::<AtomicU64>()).ok_or_else(|| bad("maps to null"))?;
        Ok(GuestPage {
            gpa,
            words,
            _mem: snapshot,
        })
    }

    /// The guest physical address of the page.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// The memory table the page was resolved in (kept alive by the page).
    pub(crate) fn table(&self) -> &Arc<GuestMemoryMmap> {
        &self._mem
    }
}

impl SharedWords for GuestPage {
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `resolve` checked that the 4 KiB at `words` lie inside one mapped region of
        // `_mem` and are 8-byte aligned; `_mem` keeps that mapping alive for as long as `self`
        // (the returned slice borrows `self`). AtomicU64 has the size and alignment of u64, and
        // the page is only accessed through atomics here; the guest on the other side accesses
        // it concurrently through its own atomic instructions, which is what the event-channel
        // protocol expects.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), EVTCHN_PAGE_WORDS) }
    }
}

impl fmt::Debug for GuestPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestPage")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use vm_memory::Bytes;

    fn memory(ranges: &[(u64, usize)]) -> GuestMemoryAtomic<GuestMemoryMmap> {
        let ranges: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&ranges).unwrap())
    }

    #[test]
    fn resolves_and_shares_words_with_guest_memory() {
        let mem = memory(&[(0, 0x4000)]);
        let page = GuestPage::resolve(&mem, 0x1008).unwrap();
        assert_eq!(page.gpa(), 0x1008);
        assert_eq!(page.words().len(), EVTCHN_PAGE_WORDS);
        page.words()[3].store(0xabcd, Ordering::SeqCst);
        let v: u64 = mem.memory().read_obj(GuestAddress(0x1008 + 24)).unwrap();
        assert_eq!(v, 0xabcd);
        mem.memory()
            .write_obj(7u64, GuestAddress(0x1008 + 8 * 511))
            .unwrap();
        assert_eq!(page.words()[511].load(Ordering::SeqCst), 7);
    }

    #[test]
    fn rejects_bad_addresses() {
        let mem = memory(&[(0, 0x2000), (0x10000, 0x2000)]);
        let reason = |gpa| match GuestPage::resolve(&mem, gpa) {
            Err(Error::BadPage { reason, .. }) => reason,
            other => panic!("{gpa:#x}: {other:?}"),
        };
        assert_eq!(reason(0x1004), "not 8-byte aligned");
        assert_eq!(reason(0x5000), "not in guest memory");
        assert_eq!(reason(0x1008), "crosses the end of its memory region");
        assert_eq!(reason(0x11008), "crosses the end of its memory region");
        assert_eq!(reason(u64::MAX - 7), "not in guest memory");
        assert!(GuestPage::resolve(&mem, 0x1000).is_ok());
        assert!(GuestPage::resolve(&mem, 0x11000).is_ok());
    }

    #[test]
    fn page_outlives_memory_table_replacement() {
        let mem = memory(&[(0, 0x2000)]);
        let page = GuestPage::resolve(&mem, 0).unwrap();
        page.words()[0].store(1, Ordering::SeqCst);
        // Replace the table: the old mapping stays alive through the page.
        mem.lock()
            .unwrap()
            .replace(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap());
        assert_eq!(page.words()[0].load(Ordering::SeqCst), 1);
        let fresh = GuestPage::resolve(&mem, 0).unwrap();
        assert_eq!(fresh.words()[0].load(Ordering::SeqCst), 0);
    }
}
