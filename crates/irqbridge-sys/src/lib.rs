// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Bounded writes to eventfds that a peer shares with the irqbridge servers.
//!
//! Both servers (vfio-user and vhost-user) receive eventfds from their peer (the VMM) and
//! write to them to raise interrupts. They make such an eventfd `O_NONBLOCK`, so that a write to
//! a counter at its maximum (`0xffff_ffff_ffff_fffe`) fails with `EAGAIN` instead of waiting
//! for the peer to read: a saturated counter means the interrupt is already pending.
//!
//! That flag belongs to the open file description, which the peer shares. A hostile peer can
//! clear it again on its own copy and saturate the counter; the server's next write would then
//! wait until the peer reads, i.e. for ever. Linux has no per-call non-blocking eventfd write
//! (`pwritev2(RWF_NOWAIT)` gives `EOPNOTSUPP`, and an eventfd cannot be reopened through
//! `/proc`), and nothing makes a flag check and the write one step. So [`signal`] also bounds
//! the write in time: it arms a per-thread one-shot POSIX timer ([`WRITE_DEADLINE`]) that sends
//! the writing thread `SIGURG`, whose handler does nothing and is installed without
//! `SA_RESTART`. A write that blocks anyway ends with `EINTR` at the deadline and counts as
//! saturated. The worst a peer can do is cost the writing thread [`WRITE_DEADLINE`] per
//! interrupt it raises on that peer's eventfd.
//!
//! `SIGURG` is otherwise unused by irqbridge (no socket has an owner for out-of-band data) and
//! its default action is to ignore it, so the handler changes nothing else. Threads that block
//! `SIGURG` would not be interrupted; irqbridge's threads only block SIGTERM and SIGINT.
//!
//! [`PeerEventFd`] wraps a received eventfd as an [`irqbridge_core::Notifier`] whose `notify`
//! is [`signal`].
#![deny(missing_docs)]

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// Longest an eventfd write of [`signal`] may block.
pub const WRITE_DEADLINE: Duration = Duration::from_millis(2);

/// The signal that interrupts a write past its deadline.
const INTERRUPT: libc::c_int = libc::SIGURG;

extern "C" fn on_interrupt(_sig: libc::c_int) {}

/// Install the do-nothing `SIGURG` handler (without `SA_RESTART`), once per process.
fn interrupt_installed() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction naming a handler of the right signature, an empty mask
        // and no flags (so no SA_RESTART); sigaction(2) copies it. See the crate
        // documentation for why SIGURG is free.
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
fn write_with_deadline(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    TIMER.with(|t| {
        let mut t = t.borrow_mut();
        if t.is_none() && !TIMER_TRIED.with(|tried| tried.replace(true)) {
            *t = ThreadTimer::new();
        }
        if let Some(timer) = t.as_ref() {
            timer.set(Some(WRITE_DEADLINE));
        }
        // SAFETY: write(2) from a live buffer of `buf.len()` bytes to a descriptor the caller
        // keeps open (it is borrowed for the call).
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        // Taken before the disarm, which may change errno.
        let r = usize::try_from(n).map_err(|_| io::Error::last_os_error());
        if let Some(timer) = t.as_ref() {
            timer.set(None);
        }
        r
    })
}

/// Set `O_NONBLOCK` on `fd` if it is not set. The flag is shared with the peer's copy of the
/// descriptor (see the crate documentation).
///
/// # Errors
///
/// The error of `fcntl(2)`.
pub fn ensure_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL on a borrowed, hence open, descriptor; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: F_SETFL on the same descriptor with an int argument.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The outcome of [`signal`].
#[derive(Debug)]
pub enum Signal {
    /// Written.
    Sent,
    /// The counter is saturated (or the write was cut off at [`WRITE_DEADLINE`]): the
    /// interrupt is already pending, nothing to add.
    Saturated,
    /// The write failed.
    Failed(io::Error),
}

/// Add 1 to the eventfd `fd` without waiting for the peer: `O_NONBLOCK` is set again if the
/// peer cleared it, and a write that blocks anyway is cut off at [`WRITE_DEADLINE`].
pub fn signal(fd: BorrowedFd<'_>) -> Signal {
    if let Err(e) = ensure_nonblocking(fd) {
        return Signal::Failed(e);
    }
    let one = 1u64.to_ne_bytes();
    let start = Instant::now();
    loop {
        match write_with_deadline(fd.as_raw_fd(), &one) {
            Ok(8) => return Signal::Sent,
            Ok(n) => return Signal::Failed(io::Error::other(format!("short write of {n} bytes"))),
            Err(e) => match e.kind() {
                // Cut off at the deadline: the peer made the descriptor blocking again and
                // saturated it. Any other interruption: try again.
                io::ErrorKind::Interrupted if start.elapsed() >= WRITE_DEADLINE => {
                    return Signal::Saturated;
                }
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Signal::Saturated,
                _ => return Signal::Failed(e),
            },
        }
    }
}

/// An eventfd received from a peer, signalled with [`signal`]: never waits for the peer.
#[derive(Debug)]
pub struct PeerEventFd(EventFd);

impl PeerEventFd {
    /// Wrap `fd`. Nothing is changed on it yet: each [`signal`] sets `O_NONBLOCK` (shared
    /// with the peer's copy) before it writes.
    pub fn new(fd: EventFd) -> PeerEventFd {
        PeerEventFd(fd)
    }

    /// The wrapped eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl AsRawFd for PeerEventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for PeerEventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the EventFd owns the descriptor and keeps it open at least as long as the
        // borrow of `self` the result is tied to.
        unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) }
    }
}

impl irqbridge_core::Notifier for PeerEventFd {
    /// Adds 1 to the counter with [`signal`]; a saturated counter (or a write cut off at the
    /// deadline) is counted in [`irqbridge_core::saturated_writes`] and reported as delivered.
    fn notify(&self) -> io::Result<()> {
        match signal(self.as_fd()) {
            Signal::Sent => Ok(()),
            Signal::Saturated => {
                irqbridge_core::count_saturated_write();
                Ok(())
            }
            Signal::Failed(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqbridge_core::Notifier;

    /// Clear `O_NONBLOCK` as a hostile peer would.
    fn make_blocking(fd: &EventFd) {
        // SAFETY: F_GETFL/F_SETFL on a live descriptor.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            assert!(flags >= 0);
            assert_eq!(
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK),
                0
            );
        }
    }

    #[test]
    fn a_blocking_write_is_cut_off_at_the_deadline() {
        let efd = EventFd::new(0).unwrap(); // blocking
        efd.write(0xffff_ffff_ffff_fffe).unwrap();
        let t = Instant::now();
        let e = write_with_deadline(efd.as_raw_fd(), &1u64.to_ne_bytes()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        assert!(t.elapsed() >= WRITE_DEADLINE);
        assert!(t.elapsed() < Duration::from_secs(1));
        // Not saturated: written at once.
        assert_eq!(efd.read().unwrap(), 0xffff_ffff_ffff_fffe);
        assert_eq!(
            write_with_deadline(efd.as_raw_fd(), &1u64.to_ne_bytes()).unwrap(),
            8
        );
        assert_eq!(efd.read().unwrap(), 1);
    }

    #[test]
    fn a_peer_eventfd_made_blocking_again_and_saturated_is_pending() {
        let efd = EventFd::new(0).unwrap();
        let peer = efd.try_clone().unwrap();
        let n = PeerEventFd::new(efd);
        n.notify().unwrap();
        assert_eq!(peer.read().unwrap(), 1);
        make_blocking(&peer);
        peer.write(0xffff_ffff_ffff_fffe).unwrap();
        let before = irqbridge_core::saturated_writes();
        let t = Instant::now();
        n.notify().unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(irqbridge_core::saturated_writes() > before);
        assert_eq!(peer.read().unwrap(), 0xffff_ffff_ffff_fffe);
    }

    #[test]
    fn a_bare_blocking_write_is_bounded_too() {
        // `signal` sets O_NONBLOCK again; a peer clearing it between that and the write is
        // covered by the timer (the test above).
        let efd = EventFd::new(0).unwrap();
        efd.write(0xffff_ffff_ffff_fffe).unwrap();
        // SAFETY: `efd` outlives the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(efd.as_raw_fd()) };
        assert!(matches!(signal(fd), Signal::Saturated));
    }
}
