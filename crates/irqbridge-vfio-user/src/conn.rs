//! Message framing over an AF_UNIX stream socket, with file descriptors in `SCM_RIGHTS`.
//!
//! A [`Connection`] sends and receives whole vfio-user messages. Receiving:
//! - reads the 16-byte header, checks `msg_size` against the connection's limit (16 +
//!   max(`max_data_xfer_size`, 64 KiB) + 64 bytes of slack) *before* allocating the body, then
//!   reads exactly `msg_size - 16` bytes, so the stream stays in step;
//! - retries on `EINTR`, treats a peer close between messages as [`Error::Disconnected`] and in
//!   the middle of one as [`Error::Truncated`];
//! - receives descriptors with `MSG_CMSG_CLOEXEC` and wraps each in an [`OwnedFd`] at once. At
//!   most [`MAX_MSG_FDS`] are accepted per message; more (or a truncated control message,
//!   `MSG_CTRUNC`) reads the rest of the message, closes every descriptor and returns
//!   [`Error::TooManyFds`], after which the stream is still in step.
//!
//! Errors for which [`Error::is_fatal`] is true leave the stream out of step: drop the
//! connection.

#![deny(missing_docs)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

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
}

fn cmsg_align(len: usize) -> usize {
    let a = std::mem::size_of::<usize>();
    len.saturating_add(a - 1) & !(a - 1)
}

fn cmsg_hdr_len() -> usize {
    cmsg_align(std::mem::size_of::<libc::cmsghdr>())
}

fn cmsg_space(data_len: usize) -> usize {
    cmsg_hdr_len().saturating_add(cmsg_align(data_len))
}

fn cmsg_len(data_len: usize) -> usize {
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

/// Progress of one message being received.
struct RecvState {
    fds: Vec<OwnedFd>,
    overflow: bool,
}

impl Connection {
    /// Wraps a connected stream. The limit follows the default `max_data_xfer_size` (1 MiB).
    pub fn new(stream: UnixStream) -> Self {
        Connection {
            stream,
            max_msg_size: Self::max_msg_size_for(DEFAULT_MAX_DATA_XFER_SIZE),
            next_msg_id: 0,
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

    /// Sets `SO_SNDTIMEO`.
    ///
    /// # Errors
    /// [`Error::Io`] if the socket option cannot be set.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.stream.set_write_timeout(timeout).map_err(Error::Io)
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives the stream back.
    pub fn into_stream(self) -> UnixStream {
        self.stream
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
        while sent < total {
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

    fn recv_exact(&self, buf: &mut [u8], state: &mut RecvState, at_start: bool) -> Result<()> {
        let mut got = 0usize;
        let mut control = vec![0u8; cmsg_space(MAX_MSG_FDS * std::mem::size_of::<RawFd>())];
        while got < buf.len() {
            let rest = &mut buf[got..];
            let mut iov = libc::iovec {
                iov_base: rest.as_mut_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = control.len() as _;
            // SAFETY: the iovec covers the unfilled tail of `buf` and the control buffer is
            // `control`, both live and writable for the whole call; the kernel writes at most
            // their lengths.
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
            for fd in adopt_fds(&control[..used]) {
                if state.fds.len() < MAX_MSG_FDS {
                    state.fds.push(fd);
                } else {
                    state.overflow = true;
                }
            }
            if msg.msg_flags & libc::MSG_CTRUNC != 0 {
                state.overflow = true;
            }
            if n == 0 {
                return Err(if got == 0 && at_start {
                    Error::Disconnected
                } else {
                    Error::Truncated {
                        got,
                        expected: buf.len(),
                    }
                });
            }
            got = got.saturating_add(usize::try_from(n).unwrap_or(0));
        }
        Ok(())
    }

    /// Receives one whole message (blocking, subject to the read timeout).
    ///
    /// # Errors
    /// Fatal: [`Error::Disconnected`], [`Error::Truncated`], [`Error::Io`],
    /// [`Error::MessageTooLarge`]. Recoverable (the stream is in step, the header is in the
    /// error so a reply can be sent): [`Error::MessageTooSmall`] (only the header was
    /// consumed), [`Error::TooManyFds`] (the body was consumed).
    pub fn recv(&self) -> Result<Message> {
        let mut state = RecvState {
            fds: Vec::new(),
            overflow: false,
        };
        let mut hdr = [0u8; HEADER_SIZE];
        self.recv_exact(&mut hdr, &mut state, true)?;
        let header = Header::parse(&hdr);
        let Some(body_len) = header.body_len() else {
            return Err(Error::MessageTooSmall {
                header,
                msg_size: header.msg_size,
            });
        };
        if body_len > self.max_msg_size - HEADER_SIZE {
            return Err(Error::MessageTooLarge {
                header,
                msg_size: header.msg_size,
                max: self.max_msg_size,
            });
        }
        let mut body = vec![0u8; body_len];
        self.recv_exact(&mut body, &mut state, false)?;
        if state.overflow {
            return Err(Error::TooManyFds {
                header,
                max: MAX_MSG_FDS,
            });
        }
        Ok(Message {
            header,
            body,
            fds: state.fds,
        })
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
}
