// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory that disappears under the backend: a SIGBUS handler that keeps the process
//! alive and ends only the connection whose memory it was.
//!
//! A frontend's memory regions are `MAP_SHARED` mappings of its files (memfds). The backend
//! refuses a region larger than its file when it is set up (`Session::update_memory`), but
//! the frontend keeps the file and can shrink it at any time afterwards; the next access of
//! the backend to a page past the new end raises SIGBUS, whose default action kills the
//! process and with it every other VM's backend. Any thread may take that access: a
//! connection's own worker, or another connection's worker delivering an event into this
//! guest's event-channel page.
//!
//! The design (see also docs/reliability.md):
//!
//! - Every region of every memory table a session uses is *covered*: its host address range
//!   is entered, with the session's token, into `TABLE`, a fixed array of atomics that the
//!   signal handler can read without locks or allocation. A table is covered before the
//!   backend touches it (`MemCover::cover` runs in `update_memory` and before each use of
//!   the current table), and stays covered while anyone still holds it (old tables live on in
//!   event-channel pages and in-flight work): a table is uncovered only when the cover holds
//!   the last reference, so its regions cannot be unmapped while covered.
//! - The handler (`SA_SIGINFO`, installed once per process) looks the fault address up in the
//!   table. Inside a covered region, it maps anonymous zero pages over the whole region
//!   (`MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS`): the faulting access is restarted and
//!   succeeds, later accesses find zeros. It records the address in the slot and wakes the
//!   watcher thread through an eventfd (`write(2)` is async-signal-safe). Outside every covered
//!   region it is not a guest's doing: the handler restores the default action and returns, so
//!   the access faults again and the process dies as it would have without the handler.
//! - The watcher thread (ordinary code) finds the session of the slot and ends its connection
//!   through its `Breaker`. The zero pages go away with the region's mapping.
//!
//! One process per frontend would isolate frontends as well, but the backend links ports
//! between frontends (two VMs on one backend) through shared in-process state; the handler
//! keeps that design.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use log::{error, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::session::lock;
use crate::vring::Breaker;

/// Covered regions, at most this many at a time in the whole process.
const SLOTS: usize = 4096;
/// `Slot::token` of a free slot.
const FREE: u64 = 0;
/// `Slot::token` of a slot being filled.
const FILLING: u64 = 1;

/// One covered host address range.
struct Slot {
    /// Incremented before and after every change of `start`/`end` (odd while changing), so
    /// that the handler never acts on a range torn between two fills.
    seq: AtomicU64,
    token: AtomicU64,
    start: AtomicUsize,
    end: AtomicUsize,
    /// The last fault address in the range, 0 if none since the watcher looked.
    fault: AtomicUsize,
}

/// The covered ranges, read by the signal handler.
static TABLE: [Slot; SLOTS] = [const {
    Slot {
        seq: AtomicU64::new(0),
        token: AtomicU64::new(FREE),
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        fault: AtomicUsize::new(0),
    }
}; SLOTS];
/// The eventfd that wakes the watcher (written by the handler).
static NOTIFY_FD: AtomicI32 = AtomicI32::new(-1);
/// Faults handled since the process started.
static FAULTS: AtomicU64 = AtomicU64::new(0);
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(FILLING + 1);

/// Per-process state behind locks (never touched by the handler).
struct Registry {
    /// Token -> the connection to end when its memory faults.
    owners: HashMap<u64, Weak<Breaker>>,
    /// Covers of ended sessions whose tables are still referenced somewhere.
    retired: Vec<Arc<MemCover>>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| {
        Mutex::new(Registry {
            owners: HashMap::new(),
            retired: Vec::new(),
        })
    })
}

/// Number of guest-memory faults the handler absorbed in this process.
pub fn faults_handled() -> u64 {
    FAULTS.load(Ordering::SeqCst)
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; its location is valid for the life of the thread. It is
    // saved and restored so that the interrupted code does not see the handler's errors.
    let errno = unsafe { *libc::__errno_location() };
    let addr = if info.is_null() {
        0
    } else {
        // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; si_addr is
        // defined for SIGBUS.
        unsafe { (*info).si_addr() as usize }
    };
    let mut handled = false;
    for slot in &TABLE {
        let seq = slot.seq.load(Ordering::Acquire);
        if seq % 2 == 1 || slot.token.load(Ordering::Acquire) <= FILLING {
            continue;
        }
        let start = slot.start.load(Ordering::Acquire);
        let end = slot.end.load(Ordering::Acquire);
        if addr < start || addr >= end || slot.seq.load(Ordering::Acquire) != seq {
            continue;
        }
        // SAFETY: replaces the pages of a guest memory region that this process mapped and
        // still holds (a covered range is never unmapped while covered) with anonymous zero
        // pages; nothing else lives in that range. mmap(2) is a plain system call.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                end - start,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            break;
        }
        slot.fault.store(addr.max(1), Ordering::Release);
        FAULTS.fetch_add(1, Ordering::SeqCst);
        let fd = NOTIFY_FD.load(Ordering::Acquire);
        if fd >= 0 {
            let one = 1u64.to_ne_bytes();
            // SAFETY: write(2) (async-signal-safe) of a local 8-byte buffer to our eventfd.
            unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        }
        handled = true;
        break;
    }
    if !handled {
        // Not a guest's memory: let the fault take its default course when the access is
        // restarted.
        // SAFETY: sigaction(2) (async-signal-safe) with a zeroed struct naming SIG_DFL.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        }
    }
    // SAFETY: see above.
    unsafe { *libc::__errno_location() = errno };
}

/// Install the handler and start the watcher, once per process.
fn install() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| install_once().map_err(|e| e.to_string()))
        .clone()
        .map_err(io::Error::other)
}

fn install_once() -> io::Result<()> {
    // SAFETY: eventfd(2) with constant flags; the result is checked. The descriptor lives for
    // the rest of the process (the handler may write to it at any time).
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    NOTIFY_FD.store(fd, Ordering::Release);
    std::thread::Builder::new()
        .name("irqbridge-sigbus".into())
        .spawn(move || watch(fd))?;
    // SAFETY: a zeroed sigaction with an SA_SIGINFO handler of the right signature and an
    // empty mask; sigaction(2) copies it.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The watcher thread: ends the connections whose memory faulted.
fn watch(fd: libc::c_int) {
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd; a 1 s timeout so retired covers get pruned.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        let mut buf = [0u8; 8];
        // SAFETY: read(2) into a local 8-byte buffer from our non-blocking eventfd.
        unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        for slot in &TABLE {
            let addr = slot.fault.swap(0, Ordering::AcqRel);
            if addr == 0 {
                continue;
            }
            let token = slot.token.load(Ordering::Acquire);
            let owner = lock(registry()).owners.get(&token).and_then(Weak::upgrade);
            match owner {
                Some(b) => b.break_connection(&format!(
                    "its guest memory at host address {addr:#x} is gone (SIGBUS: the memory \
                     file was shrunk); zero pages mapped over the region"
                )),
                None => warn!(
                    "vhost-user: SIGBUS at {addr:#x} in the memory of an ended connection; \
                     zero pages mapped over the region"
                ),
            }
        }
        prune_retired();
    }
}

fn prune_retired() {
    let retired: Vec<Arc<MemCover>> = std::mem::take(&mut lock(registry()).retired);
    let mut keep = Vec::new();
    for c in retired {
        if !c.prune() {
            keep.push(c);
        }
    }
    lock(registry()).retired.extend(keep);
}

/// Tables a session covers and the slots of their regions.
#[derive(Default)]
struct Held {
    tables: Vec<Arc<GuestMemoryMmap>>,
    /// (start, end) -> (slot index, number of held tables with this region).
    ranges: HashMap<(usize, usize), (usize, usize)>,
}

/// The covered memory of one session (see the module documentation).
pub(crate) struct MemCover {
    token: u64,
    held: Mutex<Held>,
}

impl std::fmt::Debug for MemCover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemCover")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

fn ranges(table: &GuestMemoryMmap) -> Vec<(usize, usize)> {
    table
        .iter()
        .filter_map(|r| {
            let start = r.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
            let len = usize::try_from(r.len()).ok()?;
            Some((start, start.checked_add(len)?))
        })
        .collect()
}

impl MemCover {
    /// A cover whose faults end the connection of `breaker`. Installs the handler on first
    /// use, and prunes the covers of ended sessions.
    pub(crate) fn new(breaker: &Arc<Breaker>) -> io::Result<Arc<MemCover>> {
        install()?;
        prune_retired();
        let token = NEXT_TOKEN.fetch_add(1, Ordering::SeqCst);
        lock(registry())
            .owners
            .insert(token, Arc::downgrade(breaker));
        Ok(Arc::new(MemCover {
            token,
            held: Mutex::new(Held::default()),
        }))
    }

    /// Cover `table` (a no-op if it is the newest covered table). Tables nobody else holds
    /// any more are uncovered on the way. `false` if the process has no free slot: the
    /// caller must not touch the table then.
    pub(crate) fn cover(&self, table: &Arc<GuestMemoryMmap>) -> bool {
        let mut held = lock(&self.held);
        if held.tables.last().is_some_and(|t| Arc::ptr_eq(t, table)) {
            return true;
        }
        Self::prune_held(&mut held);
        if held.tables.iter().any(|t| Arc::ptr_eq(t, table)) {
            return true;
        }
        let mut added = Vec::new();
        for range in ranges(table) {
            if let Some(e) = held.ranges.get_mut(&range) {
                e.1 += 1;
                added.push(range);
                continue;
            }
            match self.take_slot(range) {
                Some(i) => {
                    held.ranges.insert(range, (i, 1));
                    added.push(range);
                }
                None => {
                    error!("vhost-user: no free slot to cover guest memory");
                    for r in added {
                        Self::release(&mut held, r);
                    }
                    return false;
                }
            }
        }
        held.tables.push(Arc::clone(table));
        true
    }

    fn take_slot(&self, (start, end): (usize, usize)) -> Option<usize> {
        for (i, slot) in TABLE.iter().enumerate() {
            if slot
                .token
                .compare_exchange(FREE, FILLING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.seq.fetch_add(1, Ordering::AcqRel);
                slot.start.store(start, Ordering::Release);
                slot.end.store(end, Ordering::Release);
                slot.fault.store(0, Ordering::Release);
                slot.seq.fetch_add(1, Ordering::AcqRel);
                slot.token.store(self.token, Ordering::Release);
                return Some(i);
            }
        }
        None
    }

    fn release(held: &mut Held, range: (usize, usize)) {
        if let Some(e) = held.ranges.get_mut(&range) {
            e.1 -= 1;
            if e.1 == 0 {
                let i = e.0;
                held.ranges.remove(&range);
                if let Some(slot) = TABLE.get(i) {
                    slot.seq.fetch_add(1, Ordering::AcqRel);
                    slot.start.store(0, Ordering::Release);
                    slot.end.store(0, Ordering::Release);
                    slot.seq.fetch_add(1, Ordering::AcqRel);
                    slot.token.store(FREE, Ordering::Release);
                }
            }
        }
    }

    /// Uncover the tables that only this cover still holds.
    fn prune_held(held: &mut Held) {
        let mut i = 0;
        while i < held.tables.len() {
            if Arc::strong_count(&held.tables[i]) == 1 {
                let t = held.tables.swap_remove(i);
                for r in ranges(&t) {
                    Self::release(held, r);
                }
                // `t` (and its mapping, if this was the last reference) goes only now,
                // after its ranges were uncovered.
                drop(t);
            } else {
                i += 1;
            }
        }
    }

    /// Prune; `true` if nothing is covered any more.
    fn prune(&self) -> bool {
        let mut held = lock(&self.held);
        Self::prune_held(&mut held);
        held.tables.is_empty()
    }

    /// The session ended: uncover what can be, and keep the rest covered until it is let go.
    pub(crate) fn retire(self: &Arc<Self>) {
        lock(registry()).owners.remove(&self.token);
        if !self.prune() {
            lock(registry()).retired.push(Arc::clone(self));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::ConnId;
    use std::os::fd::AsRawFd;
    use vm_memory::{FileOffset, GuestAddress};

    #[test]
    fn a_shrunk_file_faults_into_zero_pages_and_ends_the_connection() {
        // SAFETY: memfd_create with a valid name; checked.
        let fd = unsafe { libc::memfd_create(c"fault-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor owned by nothing else.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(0x4000).unwrap();
        let table = Arc::new(
            GuestMemoryMmap::from_ranges_with_files([(
                GuestAddress(0),
                0x4000,
                Some(FileOffset::new(file.try_clone().unwrap(), 0)),
            )])
            .unwrap(),
        );
        let breaker = Arc::new(Breaker::new(ConnId(7)));
        let cover = MemCover::new(&breaker).unwrap();
        assert!(cover.cover(&table));
        assert!(cover.cover(&table), "idempotent");
        let host = ranges(&table)[0].0 as *mut u64;
        // SAFETY: inside the mapping held by `table`.
        unsafe { host.add(0x1000 / 8).write_volatile(5) };
        // SAFETY: ftruncate on our own memfd.
        assert_eq!(unsafe { libc::ftruncate(file.as_raw_fd(), 0) }, 0);
        let before = faults_handled();
        // SAFETY: inside the mapping held by `table`; past the file's end now, so it faults
        // and the handler maps zero pages over it.
        let v = unsafe { host.add(0x1000 / 8).read_volatile() };
        assert_eq!(v, 0);
        assert_eq!(faults_handled(), before + 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !breaker.is_broken() {
            assert!(std::time::Instant::now() < deadline, "connection not ended");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        cover.retire();
        assert!(
            lock(&cover.held).tables.len() == 1,
            "still held by the test"
        );
        drop(table);
        assert!(cover.prune());
    }
}
