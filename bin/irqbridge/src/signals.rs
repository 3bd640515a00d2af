// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! SIGTERM / SIGINT handling without an async signal handler.
//!
//! The signals are blocked in the main thread before any other thread starts (so every thread
//! inherits the mask), and one dedicated thread takes them with `sigwait(3)`. The callback
//! therefore runs as ordinary code and may lock, allocate and log. A second signal while the
//! shutdown is still running exits the process at once.

use std::io;

/// SIGTERM and SIGINT, blocked in the calling thread.
#[derive(Debug)]
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGTERM and SIGINT in the calling thread (and so in threads it starts later).
    ///
    /// # Errors
    ///
    /// The error of `pthread_sigmask`.
    pub fn block() -> io::Result<Signals> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t for these calls; the signal numbers are valid.
        let r = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(Signals { set })
    }

    /// Starts the thread that waits for the signals; `on_signal` runs once, on the first one.
    ///
    /// The returned handle is for tests (the thread runs until the process exits).
    pub fn spawn_waiter(
        self,
        on_signal: impl FnOnce(i32) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let set = self.set;
        std::thread::spawn(move || {
            let mut on_signal = Some(on_signal);
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is an initialised sigset_t and `sig` is valid for a write.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                match on_signal.take() {
                    Some(f) => f(sig),
                    None => {
                        log::warn!("second signal ({sig}) during shutdown, exiting now");
                        std::process::exit(128 + sig);
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_blocked_signal_reaches_the_waiter() {
        // Runs on a test thread of its own: blocking here affects only this thread and the
        // waiter it starts, and the signal is sent to the waiter thread alone.
        let signals = Signals::block().unwrap();
        let (tx, rx) = mpsc::channel();
        let waiter = signals.spawn_waiter(move |sig| tx.send(sig).unwrap());
        // SAFETY: pthread_kill on a live thread of this process, with a signal it has blocked.
        let r = unsafe { libc::pthread_kill(waiter.as_pthread_t(), libc::SIGTERM) };
        assert_eq!(r, 0);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            libc::SIGTERM
        );
    }
}
