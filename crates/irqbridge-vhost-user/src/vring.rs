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
//!   ([`WRITE_DEADLINE`]) that interrupts a write that blocks anyway (`SIGURG`, a handler that
//!   does nothing and no `SA_RESTART`): such a write ends with `EINTR` and counts as
//!   saturated. Together with the hand-off of upcalls to the target connection's own worker
//!   (`Session::deliver_from`), the worst a frontend can do is delay its own worker by the
//!   deadline per upcall.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

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
    // SAFETY: F_GETFL on a descriptor the caller keeps open; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: F_SETFL on the same descriptor with an int argument.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Longest a call-fd write may block (see the module documentation).
pub(crate) const WRITE_DEADLINE: Duration = Duration::from_millis(2);

/// The signal that interrupts a call-fd write past its deadline.
const INTERRUPT: libc::c_int = libc::SIGURG;

extern "C" fn on_interrupt(_sig: libc::c_int) {}

/// Install the do-nothing `SIGURG` handler (without `SA_RESTART`), once per process.
fn interrupt_installed() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction naming a handler of the right signature, an empty mask
        // and no flags; sigaction(2) copies it. SIGURG is otherwise unused here (no socket
        // has an owner for out-of-band data), and its default action is to ignore it.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(INTERRUPT, &sa, std::ptr::null_mut()) == 0
        }
    })
}

/// A POSIX timer that sends [`INTERRUPT`] to the thread that created it.
struct ThreadTimer(libc::timer_t);

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: deletes the timer this value created; it is not used afterwards.
        unsafe { libc::timer_delete(self.0) };
    }
}

impl ThreadTimer {
    fn new() -> Option<ThreadTimer> {
        if !interrupt_installed() {
            return None;
        }
        // SAFETY: sigevent is plain data; all zeroes is valid before the fields are set.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = INTERRUPT;
        // SAFETY: gettid(2) has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `sev` and `id` are valid for the call; the kernel writes the timer id.
        let r = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) };
        (r == 0).then_some(ThreadTimer(id))
    }

    /// Arm (`Some`) or disarm (`None`) the one-shot timer.
    fn set(&self, after: Option<Duration>) {
        let d = after.unwrap_or(Duration::ZERO);
        let its = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `its` is valid for the call; the timer belongs to this thread.
        unsafe { libc::timer_settime(self.0, 0, &its, std::ptr::null_mut()) };
    }
}

thread_local! {
    /// This thread's write-deadline timer, created on first use, deleted with the thread.
    static TIMER: RefCell<Option<ThreadTimer>> = const { RefCell::new(None) };
    static TIMER_TRIED: Cell<bool> = const { Cell::new(false) };
}

/// `write(2)` of `buf` to `fd`, interrupted after [`WRITE_DEADLINE`] if it blocks.
fn write_with_deadline(fd: RawFd, buf: &[u8]) -> isize {
    TIMER.with(|t| {
        let mut t = t.borrow_mut();
        if t.is_none() && !TIMER_TRIED.with(|tried| tried.replace(true)) {
            *t = ThreadTimer::new();
        }
        if let Some(timer) = t.as_ref() {
            timer.set(Some(WRITE_DEADLINE));
        }
        // SAFETY: write(2) from a live buffer of `buf.len()` bytes to a descriptor the caller
        // keeps open.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        let errno = io::Error::last_os_error();
        if let Some(timer) = t.as_ref() {
            timer.set(None);
        }
        if n < 0 {
            // Keep the write's errno for the caller (the disarm may have changed it).
            if let Some(e) = errno.raw_os_error() {
                // SAFETY: errno is thread-local and its location valid for the thread.
                unsafe { *libc::__errno_location() = e };
            }
        }
        n
    })
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

/// Signal the call fd of `st` without ever blocking: the descriptor is `O_NONBLOCK` since
/// [`Vring::set_call`]; the frontend could clear the shared flag again, so it is checked (and
/// set) before each write, and a write that blocks anyway is cut off at [`WRITE_DEADLINE`].
pub(crate) fn signal(st: &VringState<Mem>) -> Signal {
    let Some(call) = st.get_call() else {
        return Signal::NoFd;
    };
    let fd = call.as_raw_fd();
    if let Err(e) = ensure_nonblocking(fd) {
        return Signal::Failed(e);
    }
    let one = 1u64.to_ne_bytes();
    let start = Instant::now();
    loop {
        // The descriptor is owned by the vring, which the caller's guard keeps alive.
        let n = write_with_deadline(fd, &one);
        if n == 8 {
            return Signal::Sent;
        }
        if n >= 0 {
            return Signal::Failed(io::Error::other(format!("short write of {n} bytes")));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            // Cut off at the deadline: the frontend made the descriptor blocking again and
            // saturated it. Any other interruption: try again.
            io::ErrorKind::Interrupted if start.elapsed() >= WRITE_DEADLINE => {
                return Signal::Saturated;
            }
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Signal::Saturated,
            _ => return Signal::Failed(e),
        }
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
    fn a_blocking_write_is_cut_off_at_the_deadline() {
        let efd = EventFd::new(0).unwrap(); // blocking
        efd.write(0xffff_ffff_ffff_fffe).unwrap();
        let t = Instant::now();
        let n = write_with_deadline(efd.as_raw_fd(), &1u64.to_ne_bytes());
        let e = io::Error::last_os_error();
        assert_eq!(n, -1);
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        assert!(t.elapsed() >= WRITE_DEADLINE);
        assert!(t.elapsed() < Duration::from_secs(1));
        // Not saturated: written at once.
        assert_eq!(efd.read().unwrap(), 0xffff_ffff_ffff_fffe);
        assert_eq!(write_with_deadline(efd.as_raw_fd(), &1u64.to_ne_bytes()), 8);
        assert_eq!(efd.read().unwrap(), 1);
    }

    #[test]
    fn kinds() {
        let efd = EventFd::new(0).unwrap();
        assert!(is_eventfd(efd.as_raw_fd()));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!is_eventfd(a.as_raw_fd()));
        assert!(fd_kind(a.as_raw_fd()).starts_with("socket:"));
    }
}
