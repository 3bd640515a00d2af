// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors of the vhost-user event-channel backend.
//!
//! Nothing a frontend or a guest sends produces one of these: guest faults become a status in
//! the control reply (see [`crate::abi::Status`]) or a counter, frontend faults end that
//! connection inside vhost-user-backend. These errors are for the local API (configuration,
//! routing calls, snapshots) and for the listening sockets.

use std::io;
use std::path::PathBuf;

/// Errors of the backend's local API and server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range.
    #[error("Invalid configuration: {0}.")]
    InvalidConfig(String),
    /// A connection (socket) index that the backend does not have.
    #[error("Connection {0} does not exist.")]
    UnknownConnection(u32),
    /// The event-channel model refused the operation (bad port or upcall number).
    #[error("Event-channel operation failed.")]
    Evtchn(#[source] irqbridge_core::Error),
    /// A send on a port that has no interdomain or loopback link.
    #[error("Port {port} of connection {conn} has no link.")]
    NotConnected {
        /// The connection.
        conn: u32,
        /// The port.
        port: u32,
    },
    /// The event-channel page address cannot be used.
    #[error("Event-channel page at guest address {gpa:#x} is unusable: {reason}.")]
    BadPage {
        /// The guest physical address.
        gpa: u64,
        /// Why.
        reason: &'static str,
    },
    /// A snapshot does not fit this backend, or cannot be restored now.
    #[error("Snapshot cannot be restored: {0}.")]
    Snapshot(String),
    /// A listening socket could not be set up.
    #[error("Cannot listen on {}.", path.display())]
    Listen {
        /// The socket path (empty for an inherited descriptor).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A vhost-user daemon could not be created or started.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// Another system call failed.
    #[error("I/O failed.")]
    Io(#[source] io::Error),
}

impl From<irqbridge_core::Error> for Error {
    fn from(e: irqbridge_core::Error) -> Self {
        Error::Evtchn(e)
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn messages() {
        assert_eq!(
            Error::NotConnected { conn: 1, port: 7 }.to_string(),
            "Port 7 of connection 1 has no link."
        );
        let e = Error::from(irqbridge_core::Error::InvalidPort(4096));
        assert_eq!(e.to_string(), "Event-channel operation failed.");
        assert_eq!(
            e.source().map(|s| s.to_string()).as_deref(),
            Some("event channel port 4096 is out of range")
        );
        let e = Error::Listen {
            path: "/tmp/x.sock".into(),
            source: io::Error::other("boom"),
        };
        assert_eq!(e.to_string(), "Cannot listen on /tmp/x.sock.");
    }
}
