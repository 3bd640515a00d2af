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
    pub fn spawn_waiter(self, on_signal: impl FnOnce(i32) + Send + 'static) {
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
                        eprintln!("irqbridge: second signal {sig}, exiting now");
                        std::process::exit(128 + sig);
                    }
                }
            }
        });
    }
}
