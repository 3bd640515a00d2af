// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The crate's error type.

use std::io;

pub use irqbridge_vfio_user::client::Error as ClientError;

/// Errors of the vfio-user client, the KVM wiring and the attachment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vfio-user client failed: connecting, socket I/O, a timeout, a hang-up, a stream
    /// out of step, an error reply or a malformed one. The client's own error, unchanged;
    /// see [`Error::remote_errno`] and [`Error::is_connection_lost`].
    #[error(transparent)]
    Client(ClientError),
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
            Error::Client(e) => e.remote_errno(),
            _ => None,
        }
    }

    /// True if the connection is no longer usable (socket failure, hang-up, or a stream out
    /// of step). A client timeout is not: the client skips the late reply.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Error::Client(e) if e.is_connection_lost())
    }
}

impl From<Error> for io::Error {
    /// For traits in the style of Cloud Hypervisor's `vm-device`, whose methods return
    /// `std::io::Result`.
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Client(ClientError::Timeout { .. }) => io::ErrorKind::TimedOut,
            Error::Client(
                ClientError::Disconnected { .. } | ClientError::ConnectionBroken { .. },
            ) => io::ErrorKind::ConnectionReset,
            Error::InvalidIndex { .. } | Error::InvalidArgument(_) | Error::InvalidGsi(_) => {
                io::ErrorKind::InvalidInput
            }
            Error::Unsupported(_) => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

impl From<ClientError> for Error {
    /// Wraps the client's error in [`Error::Client`]; an invalid argument stays
    /// [`Error::InvalidArgument`], like the plugin's own.
    fn from(e: ClientError) -> Error {
        match e {
            ClientError::InvalidArgument(reason) => Error::InvalidArgument(reason),
            e => Error::Client(e),
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
