// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Listening sockets handed over by the parent instead of bound by the daemon.
//!
//! Two ways exist, and both end in [`adopt_listener`], which checks that the descriptor is an
//! open, listening unix socket before taking ownership and setting close-on-exec:
//!
//! - `--fd N`: any parent (a VMM, a test) passes descriptor `N`.
//! - systemd socket activation (`sd_listen_fds(3)`): `LISTEN_PID` holds the daemon's own
//!   process ID and `LISTEN_FDS` the number of descriptors passed, numbered from
//!   [`SD_LISTEN_FDS_START`] (3). A `LISTEN_PID` naming another process means the variables
//!   were inherited by accident and are ignored, as systemd's own library does.
//!
//! The variables are left in the environment: the daemon starts no children, and every adopted
//! descriptor is close-on-exec.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use crate::Error;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START` in `sd-daemon.h`).
pub const SD_LISTEN_FDS_START: RawFd = 3;

/// Adopts an inherited descriptor after checking that it is an open, listening unix socket.
///
/// # Errors
///
/// [`Error::BadFd`] if `fd` is negative, closed, not a unix socket or not listening. The
/// descriptor is then left alone (not closed).
pub fn adopt_listener(fd: RawFd) -> Result<UnixListener, Error> {
    if fd < 0 {
        return Err(Error::BadFd(fd));
    }
    // SAFETY: F_GETFD only inspects the descriptor table entry; no memory is involved.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::BadFd(fd));
    }
    let domain = sockopt(fd, libc::SO_DOMAIN);
    let accepting = sockopt(fd, libc::SO_ACCEPTCONN);
    if domain != Some(libc::AF_UNIX) || accepting.unwrap_or(0) == 0 {
        return Err(Error::BadFd(fd));
    }
    // SAFETY: the descriptor is open (checked above) and was handed to this process for the
    // server to own; nothing else in the process uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Keep it from leaking into children.
    // SAFETY: F_SETFD on an open descriptor we own; no memory is involved.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(UnixListener::from(owned))
}

/// One integer `SOL_SOCKET` option of `fd`, or `None` if the call fails.
fn sockopt(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).ok()?;
    // SAFETY: `value` and `len` are valid for writes of one c_int / socklen_t, and `len` says
    // how much room `value` has.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    (r == 0).then_some(value)
}

/// The descriptors systemd passed to process `pid`, from the values of `LISTEN_PID` and
/// `LISTEN_FDS`: `first..first + count`, or an empty range if the process was not activated.
///
/// # Errors
///
/// [`Error::SocketActivation`] if `LISTEN_PID` names this process but `LISTEN_FDS` is missing
/// or not a number of descriptors.
pub fn activation_range(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> Result<std::ops::Range<RawFd>, Error> {
    let none = SD_LISTEN_FDS_START..SD_LISTEN_FDS_START;
    let Some(listen_pid) = listen_pid else {
        return Ok(none);
    };
    match listen_pid.trim().parse::<u32>() {
        Ok(p) if p == pid => {}
        Ok(_) => return Ok(none),
        Err(_) => {
            return Err(Error::SocketActivation(format!(
                "LISTEN_PID={listen_pid:?} is not a process ID"
            )));
        }
    }
    let count = listen_fds
        .and_then(|n| n.trim().parse::<RawFd>().ok())
        .filter(|n| (0..=i32::MAX - SD_LISTEN_FDS_START).contains(n))
        .ok_or_else(|| {
            Error::SocketActivation(format!(
                "LISTEN_FDS={:?} is not a number of descriptors",
                listen_fds.unwrap_or("")
            ))
        })?;
    Ok(SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + count)
}

/// The descriptors systemd passed to this process (see [`activation_range`]), read from the
/// environment. Empty when the process was not socket-activated.
///
/// # Errors
///
/// As [`activation_range`].
pub fn activation_fds() -> Result<std::ops::Range<RawFd>, Error> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    activation_range(pid.as_deref(), fds.as_deref(), std::process::id())
}

/// The one listening socket of a socket-activated process: `Ok(None)` when not activated.
///
/// # Errors
///
/// [`Error::SocketActivation`] if the variables are malformed or more than one descriptor was
/// passed (irqbridge serves one activated socket per process).
pub fn activated_fd() -> Result<Option<RawFd>, Error> {
    let range = activation_fds()?;
    match range.len() {
        0 => Ok(None),
        1 => Ok(Some(range.start)),
        n => Err(Error::SocketActivation(format!(
            "LISTEN_FDS={n}, but irqbridge serves one activated socket per process \
             (one ListenStream= in the .socket unit)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn activation_variables() {
        let r = |p, n| activation_range(p, n, 42);
        assert_eq!(r(None, None).unwrap().len(), 0);
        assert_eq!(r(None, Some("2")).unwrap().len(), 0, "no LISTEN_PID");
        assert_eq!(r(Some("41"), Some("2")).unwrap().len(), 0, "someone else's");
        assert_eq!(r(Some("42"), Some("1")).unwrap(), 3..4);
        assert_eq!(r(Some("42"), Some("3")).unwrap(), 3..6);
        assert_eq!(r(Some("42"), Some("0")).unwrap().len(), 0);
        for bad in [None, Some(""), Some("x"), Some("-1"), Some("2147483647")] {
            let e = r(Some("42"), bad).unwrap_err();
            assert!(e.to_string().contains("LISTEN_FDS"), "{e}");
        }
        assert!(r(Some("pid"), Some("1")).is_err());
    }

    #[test]
    fn adopt_listener_checks_the_fd() {
        assert!(matches!(adopt_listener(-1), Err(Error::BadFd(-1))));
        // A pipe is not a socket.
        let mut p = [0; 2];
        // SAFETY: `p` has room for two fds.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        assert!(matches!(adopt_listener(p[0]), Err(Error::BadFd(_))));
        // SAFETY: closing the pipe we created (adopt_listener did not take it).
        unsafe {
            libc::close(p[0]);
            libc::close(p[1]);
        }
        // A unix socket that does not listen.
        let (a, _b) = UnixDatagram::pair().unwrap();
        assert!(matches!(
            adopt_listener(a.as_raw_fd()),
            Err(Error::BadFd(_))
        ));
    }

    #[test]
    fn adopt_listener_takes_a_listening_socket() {
        let dir = std::env::temp_dir().join(format!("irqbridge-listen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let fd = UnixListener::bind(&path).unwrap().into_raw_fd();
        let listener = adopt_listener(fd).unwrap();
        // SAFETY: F_GETFD on the descriptor the listener owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
