// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The crate's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Errors of the vfio-user client, the KVM wiring and the attachment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the server's socket kept failing until the deadline.
    #[error("could not connect to the vfio-user server at {path} within {timeout:?}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// How long the client kept retrying.
        timeout: Duration,
        /// The last connect error.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving on the socket failed.
    #[error("vfio-user socket I/O failed during {command}")]
    Io {
        /// The command in flight.
        command: &'static str,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The server did not answer within the per-call timeout.
    #[error("the vfio-user server did not answer {command} within {timeout:?}")]
    Timeout {
        /// The command in flight.
        command: &'static str,
        /// The per-call timeout.
        timeout: Duration,
    },
    /// The server closed the connection.
    #[error("the vfio-user server closed the connection during {command}")]
    Disconnected {
        /// The command in flight.
        command: &'static str,
    },
    /// An earlier failure left the stream out of step; reconnect.
    #[error(
        "the vfio-user connection is out of step after an earlier failure ({command} not sent)"
    )]
    ConnectionBroken {
        /// The command that was not sent.
        command: &'static str,
    },
    /// The server answered with an error reply.
    #[error("the vfio-user server refused {command} with errno {errno}")]
    Remote {
        /// The refused command.
        command: &'static str,
        /// Positive errno from the reply header.
        errno: i32,
    },
    /// The server's reply does not follow the protocol.
    #[error("malformed vfio-user reply to {command}: {reason}")]
    Protocol {
        /// The command the reply was for.
        command: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    Kvm {
        /// The ioctl (e.g. `KVM_IRQFD`).
        op: &'static str,
        /// The kernel's errno.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// Creating, duplicating, reading or writing an eventfd failed.
    #[error("eventfd operation failed")]
    EventFd(#[source] io::Error),
    /// Mapping a device region into the VMM failed.
    #[error("could not mmap region {region}")]
    Mmap {
        /// Region index.
        region: u32,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
    /// Every GSI is in use.
    #[error("no free GSI is left in the routing table")]
    NoFreeGsi,
    /// The GSI cannot take the requested route.
    #[error("GSI {0} cannot take this route")]
    InvalidGsi(u32),
    /// The routing table would exceed `KVM_MAX_IRQ_ROUTES`.
    #[error("the GSI routing table is full")]
    TooManyRoutes,
    /// An interrupt, region or vector index is out of range.
    #[error("{what} {index} does not exist")]
    InvalidIndex {
        /// What kind of index.
        what: &'static str,
        /// The index.
        index: u32,
    },
    /// An argument is not acceptable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The device or the VM lacks something this operation needs.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl Error {
    /// The errno of an error reply, if this is one.
    pub fn remote_errno(&self) -> Option<i32> {
        match self {
            Error::Remote { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// True if the connection is no longer usable (socket failure, hang-up, or a stream out
    /// of step). A [`Error::Timeout`] is not: the client skips the late reply.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            Error::Io { .. } | Error::Disconnected { .. } | Error::ConnectionBroken { .. }
        )
    }
}

impl From<Error> for io::Error {
    /// For traits in the style of Cloud Hypervisor's `vm-device`, whose methods return
    /// `std::io::Result`.
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Timeout { .. } => io::ErrorKind::TimedOut,
            Error::Disconnected { .. } | Error::ConnectionBroken { .. } => {
                io::ErrorKind::ConnectionReset
            }
            Error::InvalidIndex { .. } | Error::InvalidArgument(_) | Error::InvalidGsi(_) => {
                io::ErrorKind::InvalidInput
            }
            Error::Unsupported(_) => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

impl From<irqbridge_vfio_user::client::Error> for Error {
    /// The client's errors keep their variant (same names, same fields), so a match on
    /// [`Error::Remote`] or [`Error::Timeout`] sees them as before the client moved.
    fn from(e: irqbridge_vfio_user::client::Error) -> Error {
        use irqbridge_vfio_user::client::Error as C;
        match e {
            C::Connect {
                path,
                timeout,
                source,
            } => Error::Connect {
                path,
                timeout,
                source,
            },
            C::Io { command, source } => Error::Io { command, source },
            C::Timeout { command, timeout } => Error::Timeout { command, timeout },
            C::Disconnected { command } => Error::Disconnected { command },
            C::ConnectionBroken { command } => Error::ConnectionBroken { command },
            C::Remote { command, errno } => Error::Remote { command, errno },
            C::Protocol { command, reason } => Error::Protocol { command, reason },
            C::Fd(source) => Error::EventFd(source),
            C::InvalidArgument(reason) => Error::InvalidArgument(reason),
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
