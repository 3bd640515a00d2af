// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Message framing over an AF_UNIX stream socket, with file descriptors in `SCM_RIGHTS`.
//!
//! A [`Connection`] sends and receives whole vfio-user messages. Receiving:
//! - reads through a small buffer of the connection ([`RECV_WINDOW`] bytes): one `recvmsg`
//!   at a message boundary takes whatever has arrived, usually the whole message (header and
//!   body) and, when the peer pipelines, the next messages too, which later calls return
//!   without a system call. Once a message has started, only the rest of that message is
//!   read; a message too big for the buffer is finished straight into its body;
//! - checks `msg_size` against the connection's limit (16 + max(`max_data_xfer_size`,
//!   64 KiB) + 64 bytes of slack) *before* reading or allocating the body, so the stream
//!   stays in step;
//! - retries on `EINTR`, treats a peer close between messages as [`Error::Disconnected`] and in
//!   the middle of one as [`Error::Truncated`]; a read timeout (`SO_RCVTIMEO`) keeps what was
//!   read, and the next call continues the same message;
//! - with a message timeout ([`Connection::set_message_timeout`], the server's), waits at a
//!   message boundary for as long as it takes (an idle peer is fine), but once a message has
//!   begun the rest of it must arrive before a deadline: a peer trickling one byte at a time
//!   is cut off when the deadline passes, not when one read waits too long. Only a read in the
//!   middle of a message pays for the deadline (a `poll` before it); the usual message comes
//!   whole with one `recvmsg`;
//! - receives descriptors with `MSG_CMSG_CLOEXEC` and wraps each in an [`OwnedFd`] at once. At
//!   most [`MAX_MSG_FDS`] are accepted per message; more (or a truncated control message,
//!   `MSG_CTRUNC`) reads the rest of the message, closes every descriptor and returns
//!   [`Error::TooManyFds`], after which the stream is still in step.
//!
//! # Which message descriptors belong to
//!
//! The kernel attaches the descriptors of a `sendmsg` to the first socket buffer of that
//! call, hands them out with the first byte read from it, and ends a stream `recvmsg` right
//! after a buffer that carried descriptors; the same call may first have read buffers
//! without descriptors. Descriptors are therefore given to the message that contains the
//! first byte of the `sendmsg` that carried them (as a reader of exact header and body
//! sizes would). A read that starts in the middle of a message reads no further than that
//! message, so its descriptors are that message's. A read at a message boundary may cover
//! several messages; its descriptors came with the last buffer it touched, and they are
//! given to the last message that begins in the read. That is right whenever the
//! `sendmsg` that carries a message's descriptors starts inside that message and carries
//! no bytes of a later one: [`Connection::send`] sends each message with one `sendmsg`
//! (continuations of a short write carry no descriptors), and so do QEMU, libvfio-user and
//! Cloud Hypervisor. A peer that packs several messages into one `sendmsg` with
//! descriptors can only have them given to another of its own messages (and then be
//! refused by the command checks); descriptors are never leaked and never cross peers.
//!
//! Errors for which [`Error::is_fatal`] is true leave the stream out of step: drop the
//! connection.
//!
//! # Why not `vmm_sys_util::sock_ctrl_msg::ScmSocket`
//!
//! It costs no extra system call, but it is not a fit for a peer that may be hostile or sit on
//! the request path: it allocates a control buffer (and an iovec vector when sending) on the
//! heap for every call, even without descriptors; it receives without `MSG_CMSG_CLOEXEC`; and
//! when the control data is cut short (`MSG_CTRUNC`) it closes the descriptors and returns
//! `ENOBUFS` without the byte count of the data it did consume, which leaves a stream reader
//! out of step. The code here reads into a stack control buffer, adopts every descriptor as an
//! [`OwnedFd`] at once, and reports `MSG_CTRUNC` next to the bytes read.

#![deny(missing_docs)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::proto::{
    Command, DEFAULT_MAX_DATA_XFER_SIZE, FLAGS_NO_REPLY, HEADER_SIZE, Header, MAX_MSG_FDS,
};

/// Slack added to the message size limit for the fixed part of the largest data message.
const MSG_SIZE_SLACK: usize = 64;
/// The smallest body limit, whatever `max_data_xfer_size` is (VERSION JSON, WRITE_MULTI).
const MIN_BODY_LIMIT: usize = 64 * 1024;
/// Linux `SCM_MAX_FD`: the most descriptors one `sendmsg` can carry.
const SCM_MAX_FD: usize = 253;
/// Size of the receive buffer: the most one `recvmsg` at a message boundary takes. Larger
/// messages are finished in a buffer of their own.
pub const RECV_WINDOW: usize = 4096;
/// Control buffer of one `recvmsg`: room for [`MAX_MSG_FDS`] descriptors.
const CONTROL_LEN: usize = cmsg_space(MAX_MSG_FDS * std::mem::size_of::<RawFd>());

/// One received message.
#[derive(Debug)]
pub struct Message {
    /// The header.
    pub header: Header,
    /// `msg_size - 16` bytes of body.
    pub body: Vec<u8>,
    /// Descriptors that came with the message (close-on-exec, owned).
    pub fds: Vec<OwnedFd>,
}

/// A vfio-user connection over a connected [`UnixStream`].
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    max_msg_size: usize,
    next_msg_id: u16,
    /// Time the rest of a started message may take ([`Connection::set_message_timeout`]).
    msg_timeout: Option<Duration>,
    /// Received bytes and descriptors not yet returned. A mutex so that `recv` can take
    /// `&self` and the connection stays `Sync`; it is never contended in practice.
    rx: Mutex<RecvBuf>,
}

const fn cmsg_align(len: usize) -> usize {
    let a = std::mem::size_of::<usize>();
    len.saturating_add(a - 1) & !(a - 1)
}

const fn cmsg_hdr_len() -> usize {
    cmsg_align(std::mem::size_of::<libc::cmsghdr>())
}

const fn cmsg_space(data_len: usize) -> usize {
    cmsg_hdr_len().saturating_add(cmsg_align(data_len))
}

const fn cmsg_len(data_len: usize) -> usize {
    cmsg_hdr_len().saturating_add(data_len)
}

/// Builds one `SCM_RIGHTS` control message carrying `fds`, as bytes (the kernel copies control
/// data, so the buffer needs no particular alignment).
fn scm_rights(fds: &[BorrowedFd<'_>]) -> Vec<u8> {
    let data_len = fds.len() * std::mem::size_of::<RawFd>();
    let mut buf = vec![0u8; cmsg_space(data_len)];
    let hdr = libc::cmsghdr {
        cmsg_len: cmsg_len(data_len) as _,
        cmsg_level: libc::SOL_SOCKET,
        cmsg_type: libc::SCM_RIGHTS,
    };
    let mut off = 0;
    buf[off..off + std::mem::size_of_val(&hdr.cmsg_len)]
        .copy_from_slice(&hdr.cmsg_len.to_ne_bytes());
    off += std::mem::size_of_val(&hdr.cmsg_len);
    buf[off..off + 4].copy_from_slice(&hdr.cmsg_level.to_ne_bytes());
    off += 4;
    buf[off..off + 4].copy_from_slice(&hdr.cmsg_type.to_ne_bytes());
    let mut off = cmsg_hdr_len();
    for fd in fds {
        buf[off..off + 4].copy_from_slice(&fd.as_raw_fd().to_ne_bytes());
        off += 4;
    }
    buf
}

/// Walks received control data and adopts every `SCM_RIGHTS` descriptor. Returns the
/// descriptors in order; the caller enforces the limit (extra ones close on drop).
fn adopt_fds(control: &[u8]) -> Vec<OwnedFd> {
    let word = std::mem::size_of::<usize>();
    let hdr_len = cmsg_hdr_len();
    let mut fds = Vec::new();
    let mut off = 0usize;
    while let Some(hdr) = control.get(off..off.saturating_add(hdr_len)) {
        let mut len_bytes = [0u8; std::mem::size_of::<usize>()];
        len_bytes.copy_from_slice(&hdr[..word]);
        let len = usize::from_ne_bytes(len_bytes);
        let level = i32::from_ne_bytes([hdr[word], hdr[word + 1], hdr[word + 2], hdr[word + 3]]);
        let kind = i32::from_ne_bytes([hdr[word + 4], hdr[word + 5], hdr[word + 6], hdr[word + 7]]);
        if len < hdr_len {
            break;
        }
        let end = off.saturating_add(len).min(control.len());
        let data = control.get(off + hdr_len..end).unwrap_or(&[]);
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            for chunk in data.chunks_exact(4) {
                let raw = i32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                if raw >= 0 {
                    // SAFETY: the kernel has just installed this descriptor in our table for
                    // this SCM_RIGHTS message; nothing else refers to it, so we take sole
                    // ownership here and it is closed when the OwnedFd drops.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        off = off.saturating_add(cmsg_align(len));
    }
    fds
}

/// A message too big for the receive buffer, being read straight into its body.
struct LargeMsg {
    header: Header,
    body: Vec<u8>,
    /// Bytes of `body` received.
    got: usize,
    fds: Vec<OwnedFd>,
    overflow: bool,
}

/// Receive state kept between calls: `buf[start..end]` has been received and not returned.
///
/// Invariants: descriptors in `fds` (or `overflow`) belong to the message that begins at
/// `fds_at`, which is at or after `start`; when the message at `start` is incomplete it is the
/// last one in the buffer, so pending descriptors are its own. While `large` is set the buffer
/// is empty.
#[derive(Default)]
struct RecvBuf {
    /// [`RECV_WINDOW`] bytes once the first read has happened.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    fds: Vec<OwnedFd>,
    fds_at: usize,
    overflow: bool,
    large: Option<LargeMsg>,
    /// When the message being read must be complete (with a message timeout); set at the
    /// first read in the middle of a message, cleared when a message is returned.
    deadline: Option<Instant>,
}

impl std::fmt::Debug for RecvBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBuf")
            .field("buffered", &(self.end - self.start))
            .field("fds", &self.fds.len())
            .field("fds_at", &self.fds_at)
            .field("overflow", &self.overflow)
            .field(
                "large",
                &self.large.as_ref().map(|l| (l.header, l.got, l.body.len())),
            )
            .finish()
    }
}

/// Adds received descriptors to a message's, keeping at most [`MAX_MSG_FDS`]; extra ones are
/// closed and recorded as an overflow.
fn keep_fds(into: &mut Vec<OwnedFd>, overflow: &mut bool, fds: Vec<OwnedFd>, ctrunc: bool) {
    for fd in fds {
        if into.len() < MAX_MSG_FDS {
            into.push(fd);
        } else {
            *overflow = true;
        }
    }
    if ctrunc {
        *overflow = true;
    }
}

impl RecvBuf {
    fn has_fds(&self) -> bool {
        !self.fds.is_empty() || self.overflow
    }

    /// Gives received descriptors to the message that begins at buffer offset `at`.
    fn add_fds(&mut self, at: usize, fds: Vec<OwnedFd>, ctrunc: bool) {
        if fds.is_empty() && !ctrunc {
            return;
        }
        if self.has_fds() && self.fds_at != at {
            // Cannot happen (see the invariants); keep the stream usable and leak nothing.
            self.fds.clear();
            self.overflow = true;
        }
        self.fds_at = at;
        keep_fds(&mut self.fds, &mut self.overflow, fds, ctrunc);
    }

    /// The descriptors of the message at `start` (and whether there were too many).
    fn take_fds(&mut self) -> (Vec<OwnedFd>, bool) {
        if self.has_fds() && self.fds_at == self.start {
            (
                std::mem::take(&mut self.fds),
                std::mem::replace(&mut self.overflow, false),
            )
        } else {
            (Vec::new(), false)
        }
    }

    /// Drops `n` bytes at `start` (with the descriptors of the message there).
    fn consume(&mut self, n: usize) {
        drop(self.take_fds());
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // Descriptors only ever belong to a message in the buffer.
            self.fds.clear();
            self.overflow = false;
        }
    }

    /// Makes room for `total` bytes from `start` by moving the buffered bytes to offset 0.
    fn compact_for(&mut self, total: usize) {
        if self.start > 0 && self.start.saturating_add(total) > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            if self.has_fds() {
                self.fds_at = self.fds_at.saturating_sub(self.start);
            }
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Forgets everything (closing held descriptors): the stream is broken.
    fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.fds.clear();
        self.overflow = false;
        self.large = None;
    }

    /// What `recv` returns without reading, if anything: whether the buffer starts with a whole
    /// message or a header `recv` refuses.
    fn has_message(&self, max_msg_size: usize) -> bool {
        let Some(header) = self
            .buf
            .get(self.start..self.end)
            .and_then(|b| b.get(..HEADER_SIZE))
            .and_then(|b| <&[u8; HEADER_SIZE]>::try_from(b).ok())
            .map(Header::parse)
        else {
            return self.large.as_ref().is_some_and(|l| l.got == l.body.len());
        };
        match header.body_len() {
            None => true,
            Some(len) if len > max_msg_size - HEADER_SIZE => true,
            Some(len) => self.end - self.start >= HEADER_SIZE + len,
        }
    }
}

/// The offset of the last message that begins in `read`, a read that started at a message
/// boundary: the message its descriptors belong to (see the module documentation). Headers
/// are walked as `recv` will take them (a `msg_size` under 16 takes the header only; an
/// oversized one ends the walk, as `recv` will fail there).
fn last_message_start(read: &[u8], max_msg_size: usize) -> usize {
    let mut at = 0usize;
    loop {
        let Some(h) = read
            .get(at..)
            .and_then(|b| b.get(..HEADER_SIZE))
            .and_then(|b| <&[u8; HEADER_SIZE]>::try_from(b).ok())
        else {
            return at;
        };
        let size = match Header::parse(h).body_len() {
            None => HEADER_SIZE,
            Some(len) if len > max_msg_size - HEADER_SIZE => return at,
            Some(len) => HEADER_SIZE + len,
        };
        let next = at.saturating_add(size);
        if next >= read.len() {
            return at;
        }
        at = next;
    }
}

/// A received message, or [`Error::TooManyFds`] (its descriptors closed) if it overflowed.
fn finish(header: Header, body: Vec<u8>, fds: Vec<OwnedFd>, overflow: bool) -> Result<Message> {
    if overflow {
        return Err(Error::TooManyFds {
            header,
            max: MAX_MSG_FDS,
        });
    }
    Ok(Message { header, body, fds })
}

impl Connection {
    /// Wraps a connected stream. The limit follows the default `max_data_xfer_size` (1 MiB).
    pub fn new(stream: UnixStream) -> Self {
        Connection {
            stream,
            max_msg_size: Self::max_msg_size_for(DEFAULT_MAX_DATA_XFER_SIZE),
            next_msg_id: 0,
            msg_timeout: None,
            rx: Mutex::new(RecvBuf::default()),
        }
    }

    /// The message size limit for a given `max_data_xfer_size`:
    /// 16 + max(`max_data_xfer_size`, 64 KiB) + 64.
    pub fn max_msg_size_for(max_data_xfer_size: u32) -> usize {
        let xfer = usize::try_from(max_data_xfer_size).unwrap_or(usize::MAX);
        HEADER_SIZE
            .saturating_add(xfer.max(MIN_BODY_LIMIT))
            .saturating_add(MSG_SIZE_SLACK)
    }

    /// Sets the receive limit from the `max_data_xfer_size` this side offered.
    pub fn set_max_data_xfer_size(&mut self, max_data_xfer_size: u32) {
        self.max_msg_size = Self::max_msg_size_for(max_data_xfer_size);
    }

    /// Largest message (header included) [`Connection::recv`] accepts.
    pub fn max_msg_size(&self) -> usize {
        self.max_msg_size
    }

    /// Sets `SO_RCVTIMEO`: a receive that waits longer fails with an [`Error::Io`] of kind
    /// `WouldBlock`. `None` blocks forever.
    ///
    /// # Errors
    /// [`Error::Io`] if the socket option cannot be set.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.stream.set_read_timeout(timeout).map_err(Error::Io)
    }

    /// Sets the message timeout: once a message has begun to arrive, the rest of it must come
    /// within `timeout` (counted from the first read that waits for the rest), or
    /// [`Connection::recv`] fails with an [`Error::Io`] of kind `TimedOut` (fatal for the
    /// stream). Waiting for the first byte of a message is not limited by it. `None` (the
    /// default) turns it off. Meant for a blocking socket without `SO_RCVTIMEO`.
    pub fn set_message_timeout(&mut self, timeout: Option<Duration>) {
        self.msg_timeout = timeout;
    }

    /// Sets `SO_SNDTIMEO`.
    ///
    /// # Errors
    /// [`Error::Io`] if the socket option cannot be set.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.stream.set_write_timeout(timeout).map_err(Error::Io)
    }

    /// The underlying stream. Reading from it directly bypasses the receive buffer: only do
    /// so while [`Connection::buffered_len`] is 0, and never in the middle of a message.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives the stream back. Bytes and descriptors received but not yet returned by
    /// [`Connection::recv`] ([`Connection::buffered_len`]) are dropped.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    fn rx(&self) -> MutexGuard<'_, RecvBuf> {
        // A panic while holding the lock cannot leave the state torn in a way that matters
        // more than the panic itself; keep going with it.
        self.rx.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes received from the socket and not yet returned by [`Connection::recv`] (the rest
    /// of a read that took more than one message, or the start of a message whose read
    /// timed out). Polling the socket does not see them.
    pub fn buffered_len(&self) -> usize {
        let rx = self.rx();
        let large = rx
            .large
            .as_ref()
            .map_or(0, |l| HEADER_SIZE.saturating_add(l.got));
        (rx.end - rx.start).saturating_add(large)
    }

    /// True if [`Connection::recv`] would return at once from what is buffered, without
    /// reading the socket: a poll loop must call it before waiting for the socket again.
    pub fn has_buffered_message(&self) -> bool {
        self.rx().has_message(self.max_msg_size)
    }

    /// Sends one message. `msg_size` is set to `16 + body.len()` whatever `header` says; the
    /// descriptors ride on the first byte of the message. Partial writes are continued.
    ///
    /// # Errors
    /// [`Error::SendTooLarge`] for a message over 4 GiB or more than 253 fds, [`Error::Io`]
    /// (`EPIPE` when the peer is gone; no `SIGPIPE` is raised).
    pub fn send(&self, header: &Header, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        let total = HEADER_SIZE.saturating_add(body.len());
        let msg_size = u32::try_from(total).map_err(|_| Error::SendTooLarge {
            len: total,
            fds: fds.len(),
        })?;
        if fds.len() > SCM_MAX_FD {
            return Err(Error::SendTooLarge {
                len: total,
                fds: fds.len(),
            });
        }
        let hdr = Header {
            msg_size,
            ..*header
        }
        .encode();
        self.send_parts(&hdr, body, fds)
    }

    /// Sends raw bytes as they are, with `fds` on the first byte: no framing, no checks. For
    /// tests and tools that need to produce malformed messages.
    ///
    /// # Errors
    /// [`Error::SendTooLarge`] for more than 253 fds, [`Error::Io`].
    pub fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        if fds.len() > SCM_MAX_FD {
            return Err(Error::SendTooLarge {
                len: bytes.len(),
                fds: fds.len(),
            });
        }
        self.send_parts(bytes, &[], fds)
    }

    fn send_parts(&self, first: &[u8], second: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        let total = first.len().saturating_add(second.len());
        let mut control = if fds.is_empty() {
            Vec::new()
        } else {
            scm_rights(fds)
        };
        let mut sent = 0usize;
        let started = Instant::now();
        while sent < total {
            // A reply the peer does not take within the message timeout is given up (each
            // blocked sendmsg is bounded by SO_SNDTIMEO).
            if sent > 0 && self.msg_timeout.is_some_and(|t| started.elapsed() >= t) {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer did not take a message in time",
                )));
            }
            let (h, b) = if sent < first.len() {
                (&first[sent..], second)
            } else {
                (&first[first.len()..], &second[sent - first.len()..])
            };
            let mut iov = [
                libc::iovec {
                    iov_base: h.as_ptr() as *mut libc::c_void,
                    iov_len: h.len(),
                },
                libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                },
            ];
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len() as _;
            if !control.is_empty() {
                msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = control.len() as _;
            }
            // SAFETY: `msg` points at two iovecs over live buffers (`first`, `second`) and an
            // optional control buffer, all outliving the call; sendmsg only reads them.
            let n = unsafe { libc::sendmsg(self.stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io(e));
            }
            if n == 0 {
                return Err(Error::Io(io::Error::from(io::ErrorKind::WriteZero)));
            }
            // The descriptors went with the first chunk.
            control.clear();
            sent = sent.saturating_add(usize::try_from(n).unwrap_or(0));
        }
        Ok(())
    }

    /// With a message timeout: waits until the socket is readable or the message's deadline
    /// (set now if the message has none yet) passes. Without one: nothing.
    fn wait_for_rest(&self, deadline: &mut Option<Instant>) -> Result<()> {
        let Some(timeout) = self.msg_timeout else {
            return Ok(());
        };
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timed_out = || {
                Error::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the rest of a message did not arrive in time",
                ))
            };
            if left.is_zero() {
                return Err(timed_out());
            }
            let ms = i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX);
            let mut pfd = libc::pollfd {
                fd: self.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return Ok(());
            }
            if r == 0 {
                if Instant::now() >= deadline {
                    return Err(timed_out());
                }
                continue;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Error::Io(e));
            }
        }
    }

    /// One `recvmsg` into `buf` (retried on `EINTR`): the byte count, the descriptors that
    /// came with it and whether the control data was cut short (`MSG_CTRUNC`).
    fn read_some(&self, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>, bool)> {
        let mut control = [0u8; CONTROL_LEN];
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = control.len() as _;
            // SAFETY: the iovec covers `buf` and the control buffer is `control`, both live and
            // writable for the whole call; the kernel writes at most their lengths.
            let n =
                unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io(e));
            }
            // msg_controllen is size_t on glibc, socklen_t elsewhere.
            #[allow(clippy::unnecessary_cast)]
            let used = (msg.msg_controllen as usize).min(control.len());
            let fds = if used == 0 {
                Vec::new()
            } else {
                adopt_fds(&control[..used])
            };
            let ctrunc = msg.msg_flags & libc::MSG_CTRUNC != 0;
            return Ok((usize::try_from(n).unwrap_or(0), fds, ctrunc));
        }
    }

    /// Receives one whole message (blocking, subject to the read timeout).
    ///
    /// # Errors
    /// Fatal: [`Error::Disconnected`], [`Error::Truncated`], [`Error::Io`],
    /// [`Error::MessageTooLarge`] (its header is consumed, the body is not). Recoverable (the
    /// stream is in step, the header is in the error so a reply can be sent):
    /// [`Error::MessageTooSmall`] (only the header was consumed), [`Error::TooManyFds`] (the
    /// body was consumed). An [`Error::Io`] of kind `WouldBlock` or `TimedOut` (the read
    /// timeout) consumed nothing if [`Connection::buffered_len`] was 0 before the call and is
    /// 0 after it; otherwise what arrived is kept and the next call continues the message.
    pub fn recv(&self) -> Result<Message> {
        let mut rx = self.rx();
        let r = self.recv_buffered(&mut rx);
        rx.deadline = None;
        if let Err(e) = &r {
            let broken = match e {
                Error::Io(io) => !matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                Error::Disconnected | Error::Truncated { .. } => true,
                _ => false,
            };
            if broken {
                // Close what was received of a message that will never be returned.
                rx.reset();
            }
        }
        r
    }

    fn recv_buffered(&self, rx: &mut RecvBuf) -> Result<Message> {
        let body_limit = self.max_msg_size - HEADER_SIZE;
        loop {
            if let Some(large) = rx.large.as_mut() {
                let (got, len) = (large.got, large.body.len());
                if got >= len {
                    if let Some(l) = rx.large.take() {
                        return finish(l.header, l.body, l.fds, l.overflow);
                    }
                    continue;
                }
                self.wait_for_rest(&mut rx.deadline)?;
                let Some(large) = rx.large.as_mut() else {
                    continue;
                };
                let (n, fds, ctrunc) = self.read_some(&mut large.body[got..])?;
                keep_fds(&mut large.fds, &mut large.overflow, fds, ctrunc);
                if n == 0 {
                    return Err(Error::Truncated { got, expected: len });
                }
                large.got = got.saturating_add(n);
                continue;
            }
            if rx.buf.len() < RECV_WINDOW {
                rx.buf.resize(RECV_WINDOW, 0);
            }
            let (start, end) = (rx.start, rx.end);
            let avail = end - start;
            if avail == 0 {
                // A message boundary: take whatever has arrived, up to the window.
                rx.start = 0;
                let (n, fds, ctrunc) = self.read_some(&mut rx.buf[..RECV_WINDOW])?;
                if n == 0 {
                    return Err(Error::Disconnected);
                }
                let n = n.min(RECV_WINDOW);
                rx.end = n;
                if !fds.is_empty() || ctrunc {
                    let at = last_message_start(&rx.buf[..n], self.max_msg_size);
                    rx.add_fds(at, fds, ctrunc);
                }
                continue;
            }
            let Some(header) = rx
                .buf
                .get(start..end)
                .and_then(|b| b.get(..HEADER_SIZE))
                .and_then(|b| <&[u8; HEADER_SIZE]>::try_from(b).ok())
                .map(Header::parse)
            else {
                // Part of a header: read exactly the rest of it.
                rx.compact_for(HEADER_SIZE);
                let (start, end) = (rx.start, rx.end);
                let want = HEADER_SIZE - (end - start);
                self.wait_for_rest(&mut rx.deadline)?;
                let (n, fds, ctrunc) = self.read_some(&mut rx.buf[end..end + want])?;
                rx.add_fds(start, fds, ctrunc);
                if n == 0 {
                    return Err(Error::Truncated {
                        got: end - start,
                        expected: HEADER_SIZE,
                    });
                }
                rx.end = end + n.min(want);
                continue;
            };
            let Some(body_len) = header.body_len() else {
                rx.consume(HEADER_SIZE);
                return Err(Error::MessageTooSmall {
                    header,
                    msg_size: header.msg_size,
                });
            };
            if body_len > body_limit {
                rx.consume(HEADER_SIZE);
                return Err(Error::MessageTooLarge {
                    header,
                    msg_size: header.msg_size,
                    max: self.max_msg_size,
                });
            }
            let total = HEADER_SIZE + body_len;
            if avail >= total {
                let body = rx.buf[start + HEADER_SIZE..start + total].to_vec();
                let (fds, overflow) = rx.take_fds();
                rx.consume(total);
                return finish(header, body, fds, overflow);
            }
            if total > RECV_WINDOW {
                // Finish it in a body of its own.
                let mut body = vec![0u8; body_len];
                let got = avail - HEADER_SIZE;
                body[..got].copy_from_slice(&rx.buf[start + HEADER_SIZE..end]);
                let (fds, overflow) = rx.take_fds();
                rx.consume(avail);
                rx.large = Some(LargeMsg {
                    header,
                    body,
                    got,
                    fds,
                    overflow,
                });
                continue;
            }
            // The rest of this message and nothing beyond it.
            rx.compact_for(total);
            let (start, end) = (rx.start, rx.end);
            let want = total - (end - start);
            self.wait_for_rest(&mut rx.deadline)?;
            let (n, fds, ctrunc) = self.read_some(&mut rx.buf[end..end + want])?;
            rx.add_fds(start, fds, ctrunc);
            if n == 0 {
                return Err(Error::Truncated {
                    got: end - start - HEADER_SIZE,
                    expected: body_len,
                });
            }
            rx.end = end + n.min(want);
        }
    }

    /// Takes the next message id (client side).
    pub fn next_msg_id(&mut self) -> u16 {
        let id = self.next_msg_id;
        self.next_msg_id = id.wrapping_add(1);
        id
    }

    /// Client side: sends a command and waits for its reply (strictly in order, as vfio-user
    /// servers answer). Returns the reply message; its body is parsed with the matching
    /// `proto` type.
    ///
    /// # Errors
    /// [`Error::Peer`] for an error reply, [`Error::BadReply`] if the reply does not answer
    /// this command (wrong id, command or type), and any error of [`Connection::send`] or
    /// [`Connection::recv`].
    pub fn request(
        &mut self,
        command: Command,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message> {
        let id = self.next_msg_id();
        let header = Header::command(id, command, body.len());
        self.send(&header, body, fds)?;
        let reply = self.recv()?;
        if !reply.header.is_reply() {
            return Err(Error::BadReply("a command arrived instead of a reply"));
        }
        if reply.header.msg_id != id || reply.header.command != u16::from(command) {
            return Err(Error::BadReply("the reply answers another command"));
        }
        if reply.header.is_error() {
            return Err(Error::Peer {
                command: command.into(),
                errno: reply.header.error,
            });
        }
        Ok(reply)
    }

    /// Client side: sends a command with NO_REPLY set (the server never answers it).
    ///
    /// # Errors
    /// Any error of [`Connection::send`].
    pub fn post(&mut self, command: Command, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        let id = self.next_msg_id();
        let mut header = Header::command(id, command, body.len());
        header.flags |= FLAGS_NO_REPLY;
        self.send(&header, body, fds)
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::proto::{FLAGS_TYPE_REPLY, VersionRequest};
    use vmm_sys_util::eventfd::EventFd;

    fn pair() -> (Connection, Connection) {
        let (a, b) = UnixStream::pair().unwrap();
        (Connection::new(a), Connection::new(b))
    }

    #[test]
    fn round_trip_with_fds() {
        let (a, b) = pair();
        let e1 = EventFd::new(0).unwrap();
        let e2 = EventFd::new(0).unwrap();
        // SAFETY: the eventfds outlive the borrows.
        let fds = unsafe {
            [
                BorrowedFd::borrow_raw(e1.as_raw_fd()),
                BorrowedFd::borrow_raw(e2.as_raw_fd()),
            ]
        };
        let h = Header::command(7, Command::DeviceSetIrqs, 0);
        a.send(&h, &[1, 2, 3], &fds).unwrap();
        let m = b.recv().unwrap();
        assert_eq!(m.header.msg_id, 7);
        assert_eq!(m.header.msg_size, 19);
        assert_eq!(m.body, vec![1, 2, 3]);
        assert_eq!(m.fds.len(), 2);
        // The received fd is the same eventfd.
        e2.write(5).unwrap();
        let mut v = [0u8; 8];
        // SAFETY: m.fds[1] is a live eventfd owned by the message.
        let r = unsafe { libc::read(m.fds[1].as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        assert_eq!(r, 8);
        assert_eq!(u64::from_ne_bytes(v), 5);
        // Close-on-exec is set.
        // SAFETY: F_GETFD on a live fd.
        let flags = unsafe { libc::fcntl(m.fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn eof_between_and_within_messages() {
        let (a, b) = pair();
        drop(a);
        assert!(matches!(b.recv(), Err(Error::Disconnected)));

        let (a, b) = pair();
        let h = Header::command(1, Command::RegionWrite, 0).encode();
        let mut s = a.into_stream();
        let mut msg = h.to_vec();
        msg[4] = 40; // msg_size 40, only 20 sent
        msg.extend_from_slice(&[0; 4]);
        s.write_all(&msg).unwrap();
        drop(s);
        assert!(matches!(
            b.recv(),
            Err(Error::Truncated {
                got: 4,
                expected: 24
            })
        ));

        let (a, b) = pair();
        let mut s = a.into_stream();
        s.write_all(&h[..10]).unwrap();
        drop(s);
        assert!(matches!(b.recv(), Err(Error::Truncated { got: 10, .. })));
    }

    #[test]
    fn size_limits() {
        let (a, b) = pair();
        let mut s = a.into_stream();
        let mut h = Header::command(1, Command::RegionWrite, 0);
        h.msg_size = 8;
        s.write_all(&h.encode()).unwrap();
        assert!(matches!(
            b.recv(),
            Err(Error::MessageTooSmall { msg_size: 8, .. })
        ));
        h.msg_size = u32::MAX;
        s.write_all(&h.encode()).unwrap();
        let err = b.recv().unwrap_err();
        assert!(matches!(err, Error::MessageTooLarge { .. }));
        assert!(err.is_fatal());

        // Exactly at the limit is accepted.
        let (a, b) = pair();
        let body = vec![0xab; b.max_msg_size() - HEADER_SIZE];
        let t = std::thread::spawn(move || {
            a.send(&Header::command(2, Command::RegionWrite, 0), &body, &[])
                .unwrap();
        });
        let m = b.recv().unwrap();
        assert_eq!(m.body.len(), b.max_msg_size() - HEADER_SIZE);
        t.join().unwrap();
        assert_eq!(
            Connection::max_msg_size_for(1 << 20),
            16 + (1 << 20) + MSG_SIZE_SLACK
        );
        assert_eq!(Connection::max_msg_size_for(4096), 16 + 65536 + 64);
    }

    /// A pipe whose write end is passed around: once every copy of the write end is closed,
    /// reading the read end gives EOF; a leaked copy makes it give EAGAIN instead.
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(r, 0);
        // SAFETY: both descriptors were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn all_writers_closed(read_end: &OwnedFd) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: reading one byte into a live buffer from a live descriptor.
        let n = unsafe { libc::read(read_end.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        n == 0
    }

    #[test]
    fn too_many_fds_are_closed_and_stream_stays_in_step() {
        let (a, b) = pair();
        let (r, w) = pipe();
        let copies: Vec<BorrowedFd<'_>> = (0..20).map(|_| w.as_fd()).collect();
        a.send(
            &Header::command(1, Command::DeviceSetIrqs, 0),
            &[9; 20],
            &copies,
        )
        .unwrap();
        a.send(&Header::command(2, Command::DeviceReset, 0), &[], &[])
            .unwrap();
        drop(copies);
        drop(w);
        match b.recv() {
            Err(Error::TooManyFds { header, max: 16 }) => assert_eq!(header.msg_id, 1),
            other => panic!("unexpected {other:?}"),
        }
        let next = b.recv().unwrap();
        assert_eq!(next.header.msg_id, 2);
        assert!(all_writers_closed(&r), "a received descriptor leaked");
    }

    #[test]
    fn fds_of_refused_messages_are_closed() {
        let (a, b) = pair();
        let (r, w) = pipe();
        let mut h = Header::command(1, Command::RegionWrite, 0);
        h.msg_size = 4;
        a.send_raw(&h.encode(), &[w.as_fd(), w.as_fd()]).unwrap();
        assert!(matches!(b.recv(), Err(Error::MessageTooSmall { .. })));
        h.msg_size = u32::MAX;
        a.send_raw(&h.encode(), &[w.as_fd()]).unwrap();
        assert!(matches!(b.recv(), Err(Error::MessageTooLarge { .. })));
        h.msg_size = 20;
        a.send_raw(&h.encode(), &[w.as_fd()]).unwrap();
        drop(a);
        assert!(matches!(b.recv(), Err(Error::Truncated { .. })));
        drop(w);
        assert!(all_writers_closed(&r), "a received descriptor leaked");
    }

    #[test]
    fn exactly_sixteen_fds_accepted() {
        let (a, b) = pair();
        let efds: Vec<EventFd> = (0..16).map(|_| EventFd::new(0).unwrap()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = efds
            .iter()
            // SAFETY: the eventfds outlive the borrows.
            .map(|e| unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) })
            .collect();
        a.send(
            &Header::command(1, Command::DeviceSetIrqs, 0),
            &[0; 20],
            &borrowed,
        )
        .unwrap();
        assert_eq!(b.recv().unwrap().fds.len(), 16);
    }

    #[test]
    fn request_matches_replies() {
        let (mut client, server) = pair();
        let t = std::thread::spawn(move || {
            let m = server.recv().unwrap();
            let v = VersionRequest::parse(&m.body).unwrap();
            assert_eq!(v.major, 0);
            server
                .send(&m.header.reply(m.body.len()), &m.body, &[])
                .unwrap();
            let m = server.recv().unwrap();
            server
                .send(&m.header.error_reply(libc::ENOSYS), &[], &[])
                .unwrap();
            let m = server.recv().unwrap();
            let wrong = Header {
                msg_id: m.header.msg_id.wrapping_add(1),
                flags: FLAGS_TYPE_REPLY,
                ..m.header
            };
            server.send(&wrong, &[], &[]).unwrap();
        });
        let v = crate::proto::Version {
            major: 0,
            minor: 0,
            capabilities: Default::default(),
        };
        let r = client.request(Command::Version, &v.encode(), &[]).unwrap();
        assert_eq!(r.header.msg_id, 0);
        assert!(matches!(
            client.request(Command::DmaRead, &[], &[]),
            Err(Error::Peer {
                command: 11,
                errno
            }) if errno == libc::ENOSYS as u32
        ));
        assert!(matches!(
            client.request(Command::DeviceReset, &[], &[]),
            Err(Error::BadReply(_))
        ));
        t.join().unwrap();
    }

    #[test]
    fn read_timeout_passthrough() {
        let (a, b) = pair();
        b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let e = b.recv().unwrap_err();
        assert!(
            matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock),
            "{e:?}"
        );
        drop(a);
    }

    /// The eventfd behind `fd` is `e`: a value written to `e` reads back through `fd`.
    fn same_eventfd(e: &EventFd, fd: &OwnedFd, value: u64) -> bool {
        e.write(value).unwrap();
        let mut v = [0u8; 8];
        // SAFETY: reading 8 bytes into a live buffer from a live eventfd.
        let r = unsafe { libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        r == 8 && u64::from_ne_bytes(v) == value
    }

    fn borrow(e: &EventFd) -> BorrowedFd<'_> {
        // SAFETY: the eventfd outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
    }

    #[test]
    fn pipelined_messages_keep_their_own_fds() {
        let (a, b) = pair();
        let e1 = EventFd::new(0).unwrap();
        let e2 = EventFd::new(0).unwrap();
        let e3 = EventFd::new(0).unwrap();
        // All queued before the first recv: a header-only message, one with two fds, one
        // without, a header-only one with an fd, one without.
        a.send(&Header::command(1, Command::DeviceReset, 0), &[], &[])
            .unwrap();
        a.send(
            &Header::command(2, Command::DeviceSetIrqs, 0),
            &[2; 8],
            &[borrow(&e1), borrow(&e2)],
        )
        .unwrap();
        a.send(&Header::command(3, Command::RegionWrite, 0), &[3; 5], &[])
            .unwrap();
        a.send(&Header::command(4, Command::DmaMap, 0), &[], &[borrow(&e3)])
            .unwrap();
        a.send(&Header::command(5, Command::RegionRead, 0), &[5; 16], &[])
            .unwrap();

        let m = b.recv().unwrap();
        assert_eq!((m.header.msg_id, m.body.len(), m.fds.len()), (1, 0, 0));
        // The first read went on into message 2 (and stopped after it: it carried fds).
        assert_eq!(b.buffered_len(), 24);
        assert!(b.has_buffered_message());
        let m = b.recv().unwrap();
        assert_eq!(
            (m.header.msg_id, m.body.clone(), m.fds.len()),
            (2, vec![2; 8], 2)
        );
        assert!(same_eventfd(&e1, &m.fds[0], 11));
        assert!(same_eventfd(&e2, &m.fds[1], 12));
        assert_eq!(b.buffered_len(), 0);
        let m = b.recv().unwrap();
        assert_eq!(
            (m.header.msg_id, m.body.clone(), m.fds.len()),
            (3, vec![3; 5], 0)
        );
        // Message 3 read on into message 4, which carried an fd.
        assert_eq!(b.buffered_len(), 16);
        let m = b.recv().unwrap();
        assert_eq!((m.header.msg_id, m.body.len(), m.fds.len()), (4, 0, 1));
        assert!(same_eventfd(&e3, &m.fds[0], 13));
        let m = b.recv().unwrap();
        assert_eq!(
            (m.header.msg_id, m.body.clone(), m.fds.len()),
            (5, vec![5; 16], 0)
        );
        assert_eq!(b.buffered_len(), 0);
        assert!(!b.has_buffered_message());
    }

    #[test]
    fn one_read_takes_several_messages_without_fds() {
        let (mut a, b) = pair();
        for id in 0..10u16 {
            a.post(Command::RegionWrite, &[id as u8; 20], &[]).unwrap();
        }
        let m = b.recv().unwrap();
        assert_eq!(m.header.msg_id, 0);
        // The other nine came with the first read.
        assert_eq!(b.buffered_len(), 9 * 36);
        for id in 1..10u16 {
            assert!(b.has_buffered_message());
            let m = b.recv().unwrap();
            assert_eq!(m.header.msg_id, id);
            assert_eq!(m.body, vec![id as u8; 20]);
            assert!(m.header.no_reply());
        }
        assert!(!b.has_buffered_message());
    }

    #[test]
    fn messages_larger_than_the_buffer_with_fds_around_them() {
        let (a, b) = pair();
        let e1 = EventFd::new(0).unwrap();
        let e2 = EventFd::new(0).unwrap();
        let big: Vec<u8> = (0..3 * RECV_WINDOW + 7).map(|i| (i % 251) as u8).collect();
        let big2 = big.clone();
        let sender = std::thread::spawn(move || {
            a.send(&Header::command(1, Command::RegionWrite, 0), &[1; 4], &[])
                .unwrap();
            a.send(
                &Header::command(2, Command::RegionWrite, 0),
                &big2,
                &[borrow(&e1)],
            )
            .unwrap();
            a.send(
                &Header::command(3, Command::DeviceSetIrqs, 0),
                &[3; 4],
                &[borrow(&e2)],
            )
            .unwrap();
            (a, e1, e2)
        });
        let m1 = b.recv().unwrap();
        let m2 = b.recv().unwrap();
        let m3 = b.recv().unwrap();
        let (_a, e1, e2) = sender.join().unwrap();
        assert_eq!(
            (m1.header.msg_id, m1.body, m1.fds.len()),
            (1, vec![1; 4], 0)
        );
        assert_eq!((m2.header.msg_id, m2.fds.len()), (2, 1));
        assert!(m2.body == big, "large body corrupted");
        assert!(same_eventfd(&e1, &m2.fds[0], 21));
        assert_eq!(
            (m3.header.msg_id, m3.body, m3.fds.len()),
            (3, vec![3; 4], 1)
        );
        assert!(same_eventfd(&e2, &m3.fds[0], 22));
    }

    #[test]
    fn a_timeout_in_the_middle_keeps_the_message() {
        let (a, b) = pair();
        b.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let e = EventFd::new(0).unwrap();
        let mut msg = Header::command(9, Command::DeviceSetIrqs, 30)
            .encode()
            .to_vec();
        msg.extend_from_slice(&[7; 30]);
        // Part of the header, with the fd.
        a.send_raw(&msg[..10], &[borrow(&e)]).unwrap();
        let err = b.recv().unwrap_err();
        assert!(
            matches!(&err, Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock),
            "{err:?}"
        );
        assert_eq!(b.buffered_len(), 10);
        assert!(!b.has_buffered_message());
        // The rest of the header and part of the body.
        a.send_raw(&msg[10..20], &[]).unwrap();
        assert!(b.recv().is_err());
        assert_eq!(b.buffered_len(), 20);
        // The rest, and the next message behind it.
        a.send_raw(&msg[20..], &[]).unwrap();
        a.send(&Header::command(10, Command::DeviceReset, 0), &[], &[])
            .unwrap();
        let m = b.recv().unwrap();
        assert_eq!(
            (m.header.msg_id, m.body.clone(), m.fds.len()),
            (9, vec![7; 30], 1)
        );
        assert!(same_eventfd(&e, &m.fds[0], 5));
        let m = b.recv().unwrap();
        assert_eq!((m.header.msg_id, m.fds.len()), (10, 0));
    }

    #[test]
    fn message_deadline_cuts_off_a_trickle_but_not_an_idle_peer() {
        let (a, mut b) = pair();
        b.set_message_timeout(Some(Duration::from_millis(150)));
        // Idle longer than the timeout between messages: no deadline applies.
        let msg = Header::command(3, Command::DeviceReset, 0).encode();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            a.send_raw(&msg, &[]).unwrap();
            // The next message trickles: a byte every 60 ms, each read well inside the
            // timeout, the message as a whole not.
            for byte in Header::command(4, Command::DeviceReset, 0).encode() {
                if a.send_raw(&[byte], &[]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(60));
            }
            a
        });
        assert_eq!(b.recv().unwrap().header.msg_id, 3);
        let t0 = Instant::now();
        let e = b.recv().unwrap_err();
        assert!(
            matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::TimedOut),
            "{e:?}"
        );
        assert!(e.is_fatal());
        let waited = t0.elapsed();
        assert!(
            waited < Duration::from_millis(600),
            "cut off after {waited:?}, the deadline is 150 ms after the first byte"
        );
        drop(b);
        drop(sender.join().unwrap());
    }

    #[test]
    fn a_large_message_survives_a_timeout() {
        let (a, b) = pair();
        b.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let body: Vec<u8> = (0..2 * RECV_WINDOW).map(|i| (i % 13) as u8).collect();
        let mut msg = Header::command(4, Command::RegionWrite, body.len())
            .encode()
            .to_vec();
        msg.extend_from_slice(&body);
        let cut = RECV_WINDOW + 100;
        a.send_raw(&msg[..cut], &[]).unwrap();
        assert!(b.recv().is_err());
        assert_eq!(b.buffered_len(), cut);
        a.send_raw(&msg[cut..], &[]).unwrap();
        let m = b.recv().unwrap();
        assert_eq!(m.header.msg_id, 4);
        assert!(m.body == body, "body corrupted");
        assert_eq!(b.buffered_len(), 0);
    }

    #[test]
    fn pipelined_too_many_fds_and_refused_headers_leak_nothing() {
        let (a, b) = pair();
        let (r, w) = pipe();
        // An fd-less message, then one with 20 fds (over the limit), then a header too small
        // with an fd, then a good one with an fd, all queued.
        a.send(&Header::command(1, Command::RegionWrite, 0), &[0; 4], &[])
            .unwrap();
        let copies: Vec<BorrowedFd<'_>> = (0..20).map(|_| w.as_fd()).collect();
        a.send(
            &Header::command(2, Command::DeviceSetIrqs, 0),
            &[0; 4],
            &copies,
        )
        .unwrap();
        let mut small = Header::command(3, Command::DeviceReset, 0);
        small.msg_size = 8;
        a.send_raw(&small.encode(), &[w.as_fd()]).unwrap();
        a.send(
            &Header::command(4, Command::DmaMap, 0),
            &[0; 4],
            &[w.as_fd()],
        )
        .unwrap();
        drop(copies);
        drop(w);
        assert_eq!(b.recv().unwrap().fds.len(), 0);
        match b.recv() {
            Err(Error::TooManyFds { header, max: 16 }) => assert_eq!(header.msg_id, 2),
            other => panic!("unexpected {other:?}"),
        }
        match b.recv() {
            Err(Error::MessageTooSmall { header, .. }) => assert_eq!(header.msg_id, 3),
            other => panic!("unexpected {other:?}"),
        }
        let m = b.recv().unwrap();
        assert_eq!((m.header.msg_id, m.fds.len()), (4, 1));
        drop(m);
        assert!(all_writers_closed(&r), "a received descriptor leaked");
    }

    #[test]
    fn last_message_start_walks_headers() {
        let max = Connection::max_msg_size_for(4096);
        let mut bytes = Header::command(1, Command::RegionWrite, 4)
            .encode()
            .to_vec();
        bytes.extend_from_slice(&[0; 4]);
        assert_eq!(last_message_start(&bytes, max), 0);
        assert_eq!(last_message_start(&bytes[..3], max), 0);
        bytes.extend_from_slice(&Header::command(2, Command::DeviceReset, 0).encode());
        assert_eq!(last_message_start(&bytes, max), 20);
        bytes.push(0);
        // One byte of a third message.
        assert_eq!(last_message_start(&bytes, max), 36);
        // A header under 16 bytes counts as 16.
        let mut small = Header::command(1, Command::DeviceReset, 0);
        small.msg_size = 3;
        let mut bytes = small.encode().to_vec();
        bytes.extend_from_slice(&[0; 2]);
        assert_eq!(last_message_start(&bytes, max), 16);
        // An oversized header ends the walk.
        small.msg_size = u32::MAX;
        let mut bytes = small.encode().to_vec();
        bytes.extend_from_slice(&[0; 40]);
        assert_eq!(last_message_start(&bytes, max), 0);
    }
}
