// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors of the vfio-user protocol and transport layer ([`crate::proto`], [`crate::conn`],
//! `server`, `dma`).
//!
//! Variants fall into three classes:
//! - **peer faults** in one message (bad length, bad argsz, bad flags, out-of-range index...):
//!   the stream is still in step, the server answers with an error reply carrying
//!   [`Error::errno`] and keeps serving;
//! - **transport faults** ([`Error::Io`], [`Error::Disconnected`], [`Error::Truncated`],
//!   [`Error::MessageTooLarge`]...): the stream can no longer be trusted and the connection is
//!   dropped ([`Error::is_fatal`]);
//! - **peer error replies** ([`Error::Peer`]), seen only by clients.

use std::io;

/// Errors of the vfio-user protocol and transport layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket operation failed.
    #[error("Socket I/O failed.")]
    Io(#[source] io::Error),
    /// The peer closed the connection between two messages.
    #[error("The peer closed the connection.")]
    Disconnected,
    /// The peer closed the connection in the middle of a message.
    #[error("The peer closed the connection after {got} of {expected} bytes of a message.")]
    Truncated {
        /// Bytes of the current part (header or body) received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A header announced a message larger than this connection accepts; the body was not read,
    /// so the stream is out of step.
    #[error("Message of {msg_size} bytes exceeds the limit of {max} bytes.")]
    MessageTooLarge {
        /// The header of the oversized message.
        header: crate::proto::Header,
        /// `msg_size` from the header.
        msg_size: u32,
        /// The connection's limit.
        max: usize,
    },
    /// A header announced a message smaller than the 16-byte header itself. Only the header was
    /// consumed.
    #[error("Message size {msg_size} is smaller than the 16-byte header.")]
    MessageTooSmall {
        /// The header as received.
        header: crate::proto::Header,
        /// `msg_size` from the header.
        msg_size: u32,
    },
    /// A message carried more file descriptors than the receiver accepts. The whole message was
    /// read and every received descriptor closed.
    #[error("A message carried more than {max} file descriptors.")]
    TooManyFds {
        /// The header of the message.
        header: crate::proto::Header,
        /// The per-message limit.
        max: usize,
    },
    /// A message to send does not fit the wire format.
    #[error("A message of {len} bytes or {fds} file descriptors cannot be sent.")]
    SendTooLarge {
        /// Total message length in bytes.
        len: usize,
        /// Number of descriptors.
        fds: usize,
    },
    /// A message body is shorter than its fixed part.
    #[error("Body of command {command} is {len} bytes, at least {min} needed.")]
    ShortBody {
        /// Command number.
        command: u16,
        /// Body length received.
        len: usize,
        /// Minimum body length.
        min: usize,
    },
    /// A message body has a length the command does not allow.
    #[error("Body of command {command} is {len} bytes, {expected} expected.")]
    BadBodyLength {
        /// Command number.
        command: u16,
        /// Body length received.
        len: usize,
        /// Length expected.
        expected: usize,
    },
    /// `argsz` is smaller than the fixed part of the structure.
    #[error("argsz {argsz} of command {command} is below the minimum {min}.")]
    BadArgsz {
        /// Command number.
        command: u16,
        /// `argsz` received.
        argsz: u32,
        /// Minimum `argsz`.
        min: u32,
    },
    /// The VERSION capabilities are not valid JSON of the expected shape.
    #[error("The VERSION capabilities are malformed.")]
    BadCapabilities(#[source] crate::json::JsonError),
    /// The VERSION capabilities are not UTF-8 or contain a NUL before the end.
    #[error("The VERSION capabilities are not a NUL-terminated UTF-8 string.")]
    CapabilitiesNotText,
    /// The peer asked for a protocol major version this implementation does not speak.
    #[error("Unsupported vfio-user version {major}.{minor}.")]
    UnsupportedVersion {
        /// Major version offered.
        major: u16,
        /// Minor version offered.
        minor: u16,
    },
    /// A command arrived before VERSION, or VERSION arrived twice.
    #[error("Command {command} is not allowed in this state: {reason}.")]
    BadState {
        /// Command number.
        command: u16,
        /// Why.
        reason: &'static str,
    },
    /// The command number is unknown or not implemented.
    #[error("Command {0} is not supported.")]
    UnknownCommand(u16),
    /// File descriptors came with a message that does not take them, or in the wrong number.
    #[error("Command {command} carried {got} file descriptors: {reason}.")]
    UnexpectedFds {
        /// Command number.
        command: u16,
        /// Descriptors received.
        got: usize,
        /// What was expected.
        reason: &'static str,
    },
    /// A field has a value the protocol does not allow (the message is well formed otherwise).
    #[error("Invalid {what}: {value:#x}.")]
    InvalidField {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A region access or IRQ range is outside what the device reports.
    #[error("Range {start:#x}+{count:#x} is outside {what} of size {limit:#x}.")]
    OutOfRange {
        /// What the range refers to.
        what: &'static str,
        /// Start of the range.
        start: u64,
        /// Length of the range.
        count: u64,
        /// Size of the object.
        limit: u64,
    },
    /// A data transfer is larger than the negotiated maximum.
    #[error("Transfer of {count} bytes exceeds max_data_xfer_size {max}.")]
    TransferTooLarge {
        /// Requested byte count.
        count: u64,
        /// Negotiated limit.
        max: u64,
    },
    /// A descriptor passed as an eventfd is something else.
    #[error("File descriptor {index} of the message is not an eventfd.")]
    NotEventfd {
        /// Position of the descriptor in the message.
        index: usize,
    },
    /// The action is not supported for this IRQ index (kernel VFIO answers ENOTTY).
    #[error("IRQ action {flags:#x} is not supported on index {index}.")]
    IrqActionUnsupported {
        /// IRQ index.
        index: u32,
        /// SET_IRQS flags.
        flags: u32,
    },
    /// A DMA mapping overlaps an existing one.
    #[error("DMA range {iova:#x}+{size:#x} overlaps an existing mapping.")]
    DmaOverlap {
        /// Start of the new range.
        iova: u64,
        /// Length of the new range.
        size: u64,
    },
    /// No DMA mapping starts at this address.
    #[error("No DMA mapping at {iova:#x}.")]
    DmaNotFound {
        /// Address asked for.
        iova: u64,
    },
    /// An unmap does not match the size of the mapping at its address.
    #[error("DMA unmap of {iova:#x}+{size:#x} does not match the mapping of size {mapped:#x}.")]
    DmaSizeMismatch {
        /// Address.
        iova: u64,
        /// Size asked for.
        size: u64,
        /// Size of the mapping.
        mapped: u64,
    },
    /// The DMA table is full.
    #[error("Too many DMA mappings (limit {max}).")]
    DmaTableFull {
        /// The limit.
        max: usize,
    },
    /// mmap of a DMA region failed.
    #[error("Mapping a DMA region failed.")]
    DmaMmap(#[source] io::Error),
    /// A DMA_MAP region does not lie inside its file (EINVAL).
    #[error(
        "DMA_MAP region at file offset {offset:#x}, {size:#x} bytes, is outside its file of {file_size:#x} bytes."
    )]
    DmaOutsideFile {
        /// File offset of the region.
        offset: u64,
        /// Size of the region.
        size: u64,
        /// Size of the file at DMA_MAP.
        file_size: u64,
    },
    /// A DMA_MAP descriptor is not a regular file (a memfd, a tmpfs or hugetlbfs file) (EINVAL).
    #[error("DMA_MAP needs a regular file or memfd, not file type {mode:#o}.")]
    DmaNotAFile {
        /// `st_mode & S_IFMT` of the descriptor.
        mode: u32,
    },
    /// The request asks for a feature this server does not implement.
    #[error("Unsupported request: {0}.")]
    Unsupported(&'static str),
    /// The device model refused a request with this errno.
    #[error("The device failed the request with errno {0}.")]
    Device(i32),
    /// The peer answered with an error reply (client side).
    #[error("The peer answered command {command} with errno {errno}.")]
    Peer {
        /// Command number.
        command: u16,
        /// errno from the reply header.
        errno: u32,
    },
    /// A reply does not match the request it answers (client side).
    #[error("Reply mismatch: {0}.")]
    BadReply(&'static str),
    /// Binding the listening socket failed.
    #[error("Cannot listen on {path}.")]
    Bind {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Something other than a stale socket occupies the socket path, or a server answers there.
    #[error("The socket path {0} is in use.")]
    PathInUse(String),
}

impl Error {
    /// The positive errno to send in an error reply for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().filter(|&e| e > 0).unwrap_or(libc::EIO),
            Error::Disconnected | Error::Truncated { .. } => libc::ECONNRESET,
            Error::MessageTooLarge { .. } | Error::SendTooLarge { .. } => libc::E2BIG,
            Error::TransferTooLarge { .. } => libc::E2BIG,
            Error::MessageTooSmall { .. }
            | Error::TooManyFds { .. }
            | Error::ShortBody { .. }
            | Error::BadBodyLength { .. }
            | Error::BadArgsz { .. }
            | Error::BadCapabilities(_)
            | Error::CapabilitiesNotText
            | Error::UnsupportedVersion { .. }
            | Error::BadState { .. }
            | Error::UnexpectedFds { .. }
            | Error::InvalidField { .. }
            | Error::OutOfRange { .. }
            | Error::NotEventfd { .. }
            | Error::DmaSizeMismatch { .. }
            | Error::DmaOutsideFile { .. }
            | Error::DmaNotAFile { .. }
            | Error::BadReply(_) => libc::EINVAL,
            Error::UnknownCommand(_) => libc::ENOSYS,
            Error::IrqActionUnsupported { .. } => libc::ENOTTY,
            Error::DmaOverlap { .. } => libc::EEXIST,
            Error::DmaNotFound { .. } => libc::ENOENT,
            Error::DmaTableFull { .. } => libc::ENOSPC,
            Error::DmaMmap(e) => e.raw_os_error().filter(|&e| e > 0).unwrap_or(libc::ENOMEM),
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::Device(e) => {
                if *e > 0 {
                    *e
                } else {
                    libc::EIO
                }
            }
            Error::Peer { errno, .. } => i32::try_from(*errno)
                .ok()
                .filter(|&e| e > 0)
                .unwrap_or(libc::EIO),
            Error::Bind { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::PathInUse(_) => libc::EADDRINUSE,
        }
    }

    /// True if the connection cannot be used after this error (the stream is out of step or
    /// gone); false for errors confined to one message.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Io(_)
                | Error::Disconnected
                | Error::Truncated { .. }
                | Error::MessageTooLarge { .. }
                | Error::SendTooLarge { .. }
                | Error::Bind { .. }
                | Error::PathInUse(_)
        )
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// Result of the vfio-user protocol layer.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_positive_for_every_class() {
        let cases = [
            (Error::UnknownCommand(99), libc::ENOSYS),
            (Error::DmaOverlap { iova: 0, size: 1 }, libc::EEXIST),
            (Error::DmaNotFound { iova: 0 }, libc::ENOENT),
            (Error::Device(0), libc::EIO),
            (Error::Device(-3), libc::EIO),
            (Error::Device(libc::EBUSY), libc::EBUSY),
            (
                Error::Peer {
                    command: 1,
                    errno: 0,
                },
                libc::EIO,
            ),
            (
                Error::Io(io::Error::from_raw_os_error(libc::EPIPE)),
                libc::EPIPE,
            ),
            (Error::Io(io::Error::other("x")), libc::EIO),
            (
                Error::IrqActionUnsupported { index: 0, flags: 0 },
                libc::ENOTTY,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.errno(), want, "{e}");
        }
    }

    #[test]
    fn fatal_classification() {
        assert!(Error::Disconnected.is_fatal());
        assert!(!Error::UnknownCommand(3).is_fatal());
        assert!(!Error::NotEventfd { index: 0 }.is_fatal());
    }
}
