//! Helpers shared by the device tests (also built as an empty test target of its own).

#![allow(dead_code)]

use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Our end of an eventfd handed to the device, plus the fd number the device holds.
#[derive(Debug)]
pub struct Efd {
    /// Our end.
    pub fd: EventFd,
    /// The fd number of the device's copy.
    pub raw: RawFd,
}

impl Deref for Efd {
    type Target = EventFd;
    fn deref(&self) -> &EventFd {
        &self.fd
    }
}

/// A non-blocking eventfd and a dup of it (same counter) for the device.
pub fn eventfd_pair() -> (EventFd, EventFd) {
    let ours = EventFd::new(EFD_NONBLOCK).unwrap();
    let theirs = ours.try_clone().unwrap();
    (ours, theirs)
}

/// Reads (and so resets) an eventfd counter; 0 if nothing was written.
pub fn take(fd: &EventFd) -> u64 {
    match fd.read() {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("eventfd read failed: {e}"),
    }
}

/// Same as [`take`].
pub fn read_count(fd: &EventFd) -> u64 {
    take(fd)
}

/// Reads an eventfd, waiting up to 5 s for a count to appear; 0 on timeout.
pub fn wait_count(fd: &EventFd) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = take(fd);
        if n != 0 || Instant::now() >= deadline {
            return n;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; bounded timeout.
        unsafe { libc::poll(&mut pfd, 1, 50) };
    }
}

/// A new `EventFd` on a dup of `fd`.
pub fn dup_eventfd(fd: BorrowedFd<'_>) -> EventFd {
    let owned = fd.try_clone_to_owned().unwrap();
    // SAFETY: `owned` is a valid eventfd that we own; ownership moves into the EventFd.
    unsafe { EventFd::from_raw_fd(owned.into_raw_fd()) }
}

/// A shared mapping of a region's mmap fd, unmapped on drop.
#[derive(Debug)]
pub struct SharedMap {
    ptr: *mut libc::c_void,
    len: usize,
}

impl SharedMap {
    /// Maps `len` bytes of `fd` at `offset`, read-write, shared.
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Self {
        // SAFETY: a fresh shared mapping of a file we hold; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap failed: {}",
            io::Error::last_os_error()
        );
        SharedMap { ptr, len }
    }

    /// The mapping as atomic words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: page-aligned live mapping of `len` bytes that outlives the borrow; the
        // memory is shared with the device and only accessed atomically.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<AtomicU64>(), self.len / 8) }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no borrows left.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("irqbridge-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the device's fd handlers (what the server loop does for `poll_fds`) until `done`
/// returns true or 10 s pass; returns whether `done` became true.
pub fn pump(d: &mut irqbridge_vfio_user::pci::IrqbridgeDevice, done: &dyn Fn() -> bool) -> bool {
    use irqbridge_vfio_user::device::VfioUserDevice;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        let fds = d.poll_fds();
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|(fd, _)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let tokens: Vec<u64> = fds.iter().map(|(_, t)| *t).collect();
        drop(fds);
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds; bounded timeout.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 20) };
        if n <= 0 {
            continue;
        }
        for (p, t) in pfds.iter().zip(tokens) {
            if p.revents != 0 {
                d.handle_fd_event(t);
            }
        }
    }
    true
}
