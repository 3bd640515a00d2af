// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vring type of the backend: vhost-user-backend's `VringMutex`, with every descriptor the
//! frontend hands over (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR) checked before it is
//! stored, and never waited for afterwards.
//!
//! vhost-user-backend stores the kick, call and err files in the vring before the backend sees
//! them, and its worker reads 8 bytes from the kick file with a blocking `read_exact` while it
//! holds the vring lock. A pipe holding one byte there blocks that worker for good, and with it
//! every thread that takes the vring lock to deliver an upcall. `VringT::set_kick` and friends
//! are the first code that sees the file, so that is where [`Vring`] checks it:
//!
//! - A file that is not an eventfd (`/proc/self/fd/N` does not read `anon_inode:[eventfd]`) is
//!   closed, not stored, and the connection is ended through its [`Breaker`]: the frontend gets
//!   a NACK (with REPLY_ACK) or a closed socket; nothing was ever read from or written to it.
//! - An eventfd is made `O_NONBLOCK`. The flag belongs to the open file description, which the
//!   frontend shares: its own reads and writes of the eventfd become non-blocking too. That is
//!   harmless for eventfds (a VMM registers them with KVM, which ignores the flag, or polls
//!   them before reading), and it is the only way to get a non-blocking write on a descriptor we
//!   did not open. A kick read that finds the counter at 0 (the frontend consumed it first) is a
//!   spurious wake-up, not an error; a call write that finds the counter saturated means the
//!   interrupt is already pending ([`signal`]).
//! - The flag is shared, so a hostile frontend can clear it again, and nothing makes the check
//!   and the write one step. [`signal`] therefore also arms a per-thread one-shot timer
//!   ([`irqbridge_sys::WRITE_DEADLINE`], shared with the vfio-user server) that interrupts a write that blocks anyway (`SIGURG`, a handler that
//!   does nothing and no `SA_RESTART`): such a write ends with `EINTR` and counts as
//!   saturated. Together with the hand-off of upcalls to the target connection's own worker
//!   (`Session::deliver_from`), the worst a frontend can do is delay its own worker by the
//!   deadline per upcall.

use std::cell::RefCell;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::warn;
use vhost_user_backend::{
    ShutdownHandle, VringMutex, VringState, VringStateGuard, VringStateMutGuard, VringT,
};
use virtio_queue::Error as VirtQueError;

use crate::router::ConnId;
use crate::session::{Mem, lock};

/// Ends one frontend connection from any thread: from a vring that was handed a bad
/// descriptor, from the SIGBUS handler's watcher, from a memory-table check.
pub(crate) struct Breaker {
    conn: ConnId,
    broken: AtomicBool,
    handle: Mutex<Option<ShutdownHandle>>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("conn", &self.conn)
            .field("broken", &self.is_broken())
            .finish_non_exhaustive()
    }
}

impl Breaker {
    pub(crate) fn new(conn: ConnId) -> Breaker {
        Breaker {
            conn,
            broken: AtomicBool::new(false),
            handle: Mutex::new(None),
        }
    }

    /// End the connection (once; later calls only log at debug level).
    pub(crate) fn break_connection(&self, why: &str) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            warn!(
                "vhost-user: {}: ending the frontend connection: {why}",
                self.conn
            );
        } else {
            log::debug!("vhost-user: {}: also: {why}", self.conn);
        }
        if let Some(h) = lock(&self.handle).as_ref() {
            h.shutdown();
        }
    }

    /// Whether [`break_connection`](Self::break_connection) was called.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// The daemon's handle, once it runs (a break that came earlier takes effect now).
    pub(crate) fn set_handle(&self, handle: Option<ShutdownHandle>) {
        let mut h = lock(&self.handle);
        *h = handle;
        if self.is_broken()
            && let Some(h) = h.as_ref()
        {
            h.shutdown();
        }
    }
}

thread_local! {
    /// The breaker handed to vrings created on this thread: `VringT::new` takes no context, and
    /// vhost-user-backend creates every vring inside `VhostUserDaemon::new`, on the calling
    /// thread ([`with_breaker`]).
    static NEW_VRING_BREAKER: RefCell<Option<Arc<Breaker>>> = const { RefCell::new(None) };
}

/// Run `f` (which creates a `VhostUserDaemon`) so that its vrings report to `breaker`.
pub(crate) fn with_breaker<R>(breaker: &Arc<Breaker>, f: impl FnOnce() -> R) -> R {
    NEW_VRING_BREAKER.with(|b| *b.borrow_mut() = Some(Arc::clone(breaker)));
    let r = f();
    NEW_VRING_BREAKER.with(|b| *b.borrow_mut() = None);
    r
}

/// What `/proc/self/fd/N` links to: `anon_inode:[eventfd]`, `pipe:[123]`, `/memfd:x`, ...
pub(crate) fn fd_kind(fd: RawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

/// Whether `fd` is an eventfd.
pub(crate) fn is_eventfd(fd: RawFd) -> bool {
    fd_kind(fd) == "anon_inode:[eventfd]"
}

/// Set `O_NONBLOCK` on `fd` if it is not set (see the module documentation for why this is
/// done on a descriptor the peer shares).
fn ensure_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: the caller keeps `fd` open for the duration of the call.
    irqbridge_sys::ensure_nonblocking(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// The outcome of a call-fd signal.
#[derive(Debug)]
pub(crate) enum Signal {
    /// Written.
    Sent,
    /// The counter is saturated: the interrupt is already pending, nothing to add.
    Saturated,
    /// The queue has no call fd.
    NoFd,
    /// The write failed.
    Failed(io::Error),
}

/// Signal the call fd of `st` without ever blocking, with [`irqbridge_sys::signal`]: the
/// descriptor is `O_NONBLOCK` since [`Vring::set_call`]; the frontend could clear the shared
/// flag again, so it is checked (and set) before each write, and a write that blocks anyway is
/// cut off at [`irqbridge_sys::WRITE_DEADLINE`].
pub(crate) fn signal(st: &VringState<Mem>) -> Signal {
    let Some(call) = st.get_call() else {
        return Signal::NoFd;
    };
    // SAFETY: the descriptor is owned by the vring, which the caller's guard keeps alive
    // for the duration of the call.
    let fd = unsafe { BorrowedFd::borrow_raw(call.as_raw_fd()) };
    match irqbridge_sys::signal(fd) {
        irqbridge_sys::Signal::Sent => Signal::Sent,
        irqbridge_sys::Signal::Saturated => Signal::Saturated,
        irqbridge_sys::Signal::Failed(e) => Signal::Failed(e),
    }
}

/// A vring whose kick, call and err descriptors are checked (see the module documentation).
#[derive(Clone)]
pub(crate) struct Vring {
    inner: VringMutex<Mem>,
    breaker: Option<Arc<Breaker>>,
}

impl fmt::Debug for Vring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vring")
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl Vring {
    /// `file` if it is an eventfd, made non-blocking; otherwise `None` and the connection is
    /// ended.
    fn checked(&self, what: &str, file: Option<File>) -> Option<File> {
        let file = file?;
        let fd = file.as_raw_fd();
        let problem = if !is_eventfd(fd) {
            Some(format!("{what} fd is {}, not an eventfd", fd_kind(fd)))
        } else {
            ensure_nonblocking(fd)
                .err()
                .map(|e| format!("{what} fd cannot be made non-blocking: {e}"))
        };
        match problem {
            None => Some(file),
            Some(why) => {
                match &self.breaker {
                    Some(b) => b.break_connection(&why),
                    None => warn!("vhost-user: {why}; ignored"),
                }
                None
            }
        }
    }
}

impl<'a> VringStateGuard<'a, Mem> for Vring {
    type G = MutexGuard<'a, VringState<Mem>>;
}

impl<'a> VringStateMutGuard<'a, Mem> for Vring {
    type G = MutexGuard<'a, VringState<Mem>>;
}

impl VringT<Mem> for Vring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(Vring {
            inner: VringMutex::new(mem, max_queue_size)?,
            breaker: NEW_VRING_BREAKER.with(|b| b.borrow().clone()),
        })
    }

    fn get_ref(&self) -> MutexGuard<'_, VringState<Mem>> {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> MutexGuard<'_, VringState<Mem>> {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        match signal(&self.get_ref()) {
            Signal::Failed(e) => Err(e),
            _ => Ok(()),
        }
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        let file = self.checked("SET_VRING_KICK", file);
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        match self.inner.read_kick() {
            Ok(enabled) => Ok(enabled),
            // The frontend read its own kick eventfd first: a spurious wake-up. Processing
            // the queue anyway is harmless.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(self.get_ref().is_enabled()),
            Err(e) => {
                // An error here would end the worker thread and leave the connection up but
                // dead; end the connection instead.
                if let Some(b) = &self.breaker {
                    b.break_connection(&format!("kick fd read failed: {e}"));
                }
                Ok(false)
            }
        }
    }

    fn set_call(&self, file: Option<File>) {
        let file = self.checked("SET_VRING_CALL", file);
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        let file = self.checked("SET_VRING_ERR", file);
        self.inner.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn kinds() {
        let efd = EventFd::new(0).unwrap();
        assert!(is_eventfd(efd.as_raw_fd()));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!is_eventfd(a.as_raw_fd()));
        assert!(fd_kind(a.as_raw_fd()).starts_with("socket:"));
    }
}
