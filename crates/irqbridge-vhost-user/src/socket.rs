// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Listening socket files: never take over a live socket, remove only our own at exit.
//!
//! The rules are those of the vfio-user server (`irqbridge_vfio_user::server::Server::bind`):
//! a path where a backend answers `connect(2)` is refused, a stale socket file (nobody
//! listening: `ECONNREFUSED`) is replaced, anything that is not a socket is refused; the socket
//! is created with mode 0600 from the start; at exit the file is removed only if it is still
//! the inode this process bound (another backend may have replaced it meanwhile). The vfio-user
//! crate keeps that logic private to its server and this crate does not depend on it, so it is
//! written again here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::error::{Error, Result};

/// A socket file this process created; removed on drop if it is still the same inode.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(md) if md.dev() == self.dev && md.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("vhost-user: cannot remove {}: {e}", self.path.display());
                }
            }
            Ok(_) => info!(
                "vhost-user: {} was replaced by someone else; left in place",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

fn listen_err(path: &Path, source: io::Error) -> Error {
    Error::Listen {
        path: path.to_owned(),
        source,
    }
}

/// Make `path` free for a new socket: refused if a backend answers there or it is not a
/// socket; a stale socket file is removed.
fn clear_stale(path: &Path) -> Result<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(listen_err(path, e)),
    };
    if !md.file_type().is_socket() {
        return Err(listen_err(
            path,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(listen_err(
            path,
            io::Error::new(
                io::ErrorKind::AddrInUse,
                "a backend is listening on this socket",
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!("vhost-user: removing stale socket {}", path.display());
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(listen_err(path, e)),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(listen_err(path, e)),
    }
}

/// A listening unix socket bound at `path` with mode 0600 (no window where it is more open).
fn bind_0600(path: &Path) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Linux gives the socket file the mode of the socket inode at bind time.
    // SAFETY: fchmod(2) on a descriptor we own.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un and `len` covers the family and the
    // NUL-terminated path in it.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixListener::from(fd))
}

/// Listen on `path` (see the module documentation).
///
/// # Errors
///
/// [`Error::Listen`]: a live backend at `path`, not a socket, or a system call failed.
pub(crate) fn bind(path: &Path) -> Result<(UnixListener, SocketFile)> {
    clear_stale(path)?;
    let listener = bind_0600(path).map_err(|e| listen_err(path, e))?;
    let md = std::fs::symlink_metadata(path).map_err(|e| listen_err(path, e))?;
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            dev: md.dev(),
            ino: md.ino(),
        },
    ))
}

/// The form in which two paths are compared for "the same socket given twice": the
/// canonical parent directory joined with the file name (the file itself may not exist yet).
pub(crate) fn identity(path: &Path) -> PathBuf {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(parent), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("irqbridge-vu-sock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn live_refused_stale_replaced_only_own_inode_removed() {
        let d = dir("live");
        let p = d.join("s.sock");
        let (l, f) = bind(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Live: refused, and the file is still ours.
        assert!(matches!(bind(&p), Err(Error::Listen { .. })));
        drop(l);
        // Stale now (nobody listens): replaced.
        std::mem::forget(f);
        let (_l2, f2) = bind(&p).unwrap();
        // Someone replaces the file: our drop leaves theirs.
        std::fs::remove_file(&p).unwrap();
        let theirs = UnixListener::bind(&p).unwrap();
        drop(f2);
        assert!(p.exists(), "another inode is not removed");
        drop(theirs);
        std::fs::remove_file(&p).unwrap();
        let (_l3, f3) = bind(&p).unwrap();
        drop(f3);
        assert!(!p.exists(), "our own inode is removed");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn identity_sees_through_relative_spellings() {
        let d = dir("ident");
        let a = d.join("x.sock");
        let b = d.join(".").join("x.sock");
        assert_eq!(identity(&a), identity(&b));
        assert_ne!(identity(&a), identity(&d.join("y.sock")));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
