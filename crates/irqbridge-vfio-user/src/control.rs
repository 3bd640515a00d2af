// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The external control socket of the irqbridge device (`docs/control.md`).
//!
//! A host-side tool or test harness connects to a unix socket and sends newline-delimited JSON
//! requests such as `{"cmd":"msix_fire","vector":3}`; each gets exactly one JSON line back,
//! `{"ok":true,...}` or `{"ok":false,"error":"..."}`, in order.
//!
//! [`ControlServer`] does its socket I/O on a thread of its own (accepting, reading lines,
//! writing replies; non-blocking, with bounded buffers), so a slow or stuck client never delays
//! device service. It is attached to an [`IrqbridgeDevice`](crate::pci::IrqbridgeDevice), whose
//! [`poll_fds`](crate::device::VfioUserDevice::poll_fds) include an eventfd that is readable
//! while requests wait: the requests themselves run on the vfio-user server's device thread,
//! in order, and their replies go back to the I/O thread. [`ControlClient`] is a small blocking
//! client for the CLI and tests.

#![deny(missing_docs)]

use std::collections::VecDeque;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

/// Longest request line in bytes (without the newline); a longer line gets an error reply and
/// the client is disconnected.
pub const MAX_REQUEST_LINE: usize = 4096;
/// Most clients connected at once; more are told so and disconnected.
pub const MAX_CLIENTS: usize = 16;
/// Longest reply line [`ControlClient`] accepts (a snapshot of the largest device is a few
/// hundred KiB).
pub const MAX_REPLY_LINE: usize = 16 << 20;
/// How long the server waits for a client to take any of its replies before disconnecting it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests of one client queued or running at once; its socket is not read beyond that until
/// replies go out (this bounds what a client that never reads can make the server hold).
const MAX_IN_FLIGHT: usize = 32;
/// Requests run per device-thread event, so a burst of control requests cannot hold the
/// device long.
pub const MAX_RUN_PER_EVENT: usize = 4;
/// Default timeout of [`ControlClient`] requests.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be created at `path`.
    #[error("Failed to bind the control socket at {path}.")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The server at `path` could not be reached.
    #[error("Failed to connect to the control socket at {path}.")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A socket operation failed.
    #[error("Control socket I/O failed.")]
    Io(#[source] io::Error),
    /// The server closed the connection before replying.
    #[error("The control server closed the connection.")]
    Closed,
    /// A reply was not valid JSON.
    #[error("The control server sent invalid JSON.")]
    Json(#[source] serde_json::Error),
    /// A reply line exceeded [`MAX_REPLY_LINE`].
    #[error("A control reply exceeds {0} bytes.")]
    ReplyTooLong(usize),
}

/// One control request, the JSON object `{"cmd": "<name>", ...}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Raise INTx source 1 (the control source).
    IntxAssert,
    /// Lower INTx source 1.
    IntxDeassert,
    /// An event on MSI-X vector `vector`.
    MsixFire {
        /// The vector.
        vector: u32,
    },
    /// An event on MSI vector `vector`.
    MsiFire {
        /// The vector.
        vector: u32,
    },
    /// Send an event on event-channel port `port`.
    EvtchnSend {
        /// The port.
        port: u32,
    },
    /// Open `port` and bind it to upcall vector `vector`.
    EvtchnBind {
        /// The port.
        port: u32,
        /// The upcall (MSI-X) vector, below 64.
        vector: u32,
    },
    /// Read the counters.
    Counters,
    /// Read the whole device state.
    Snapshot,
    /// Device reset, as `VFIO_DEVICE_RESET`.
    Reset,
}

/// A request handed from the I/O thread to the device thread, with the reply already made
/// for a line that did not parse (so that replies stay in order).
#[derive(Debug)]
struct Pending {
    client: u64,
    request: Result<ControlRequest, Value>,
    /// Close the client once this reply is out (an over-long line).
    close_after: bool,
}

/// A reply line on its way back to the I/O thread.
#[derive(Debug)]
struct Done {
    client: u64,
    /// Serialized by the I/O thread, off the device lock.
    reply: Value,
    close_after: bool,
}

/// What the I/O thread and the device thread share.
#[derive(Debug)]
struct Shared {
    /// Requests in arrival order (per client, and overall).
    requests: Mutex<VecDeque<Pending>>,
    /// Replies not yet picked up by the I/O thread.
    replies: Mutex<Vec<Done>>,
    /// Readable while requests wait: the device polls it.
    ready: EventFd,
    /// Wakes the I/O thread (replies to send, or quit).
    wake_io: EventFd,
    quit: AtomicBool,
    clients: AtomicUsize,
}

/// The listening control socket. Its socket I/O runs on a thread of its own: accepting,
/// reading request lines and writing replies, all non-blocking with bounded buffers, so a
/// client that sends slowly or never reads its replies costs nothing to anybody else. The
/// requests themselves run on the device's thread: the device polls an eventfd that is
/// readable while requests wait, and runs them when it is.
#[derive(Debug)]
pub struct ControlServer {
    /// Path and inode of the socket file we created, removed on drop.
    owned_path: Option<(PathBuf, u64, u64)>,
    shared: Arc<Shared>,
    io_thread: Option<JoinHandle<()>>,
}

fn is_stale_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
        && UnixStream::connect(path).is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn reply_line(v: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(v).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    line
}

impl ControlServer {
    /// Creates the socket at `path` with mode 0600. A stale socket file (nobody listening) is
    /// replaced; a live one is an error. The file is removed when the server is dropped.
    ///
    /// # Errors
    ///
    /// [`ControlError::Bind`] if the socket cannot be created, [`ControlError::Io`] if its
    /// thread cannot be started.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ControlError> {
        let path = path.as_ref();
        let bind_err = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && is_stale_socket(path) => {
                info!("control: replacing stale socket {}", path.display());
                fs::remove_file(path).map_err(bind_err)?;
                UnixListener::bind(path).map_err(bind_err)?
            }
            Err(e) => return Err(bind_err(e)),
        };
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        let meta = fs::symlink_metadata(path).map_err(bind_err)?;
        let mut server = Self::from_listener(listener)?;
        server.owned_path = Some((path.to_owned(), meta.dev(), meta.ino()));
        Ok(server)
    }

    /// Wraps a listening socket (for example one inherited from a parent); nothing is removed
    /// on drop. Starts the I/O thread.
    ///
    /// # Errors
    ///
    /// [`ControlError::Io`] if the socket cannot be made non-blocking or the thread or its
    /// eventfds cannot be created.
    pub fn from_listener(listener: UnixListener) -> Result<Self, ControlError> {
        listener.set_nonblocking(true).map_err(ControlError::Io)?;
        let efd = || EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(ControlError::Io);
        let shared = Arc::new(Shared {
            requests: Mutex::new(VecDeque::new()),
            replies: Mutex::new(Vec::new()),
            ready: efd()?,
            wake_io: efd()?,
            quit: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
        });
        let io = IoThread {
            listener,
            shared: Arc::clone(&shared),
            clients: Vec::new(),
            next_id: 0,
        };
        let io_thread = std::thread::Builder::new()
            .name("control-io".into())
            .spawn(move || io.run())
            .map_err(ControlError::Io)?;
        Ok(ControlServer {
            owned_path: None,
            shared,
            io_thread: Some(io_thread),
        })
    }

    /// The socket path if the server created it.
    pub fn path(&self) -> Option<&Path> {
        self.owned_path.as_ref().map(|(p, _, _)| p.as_path())
    }

    /// Number of connected clients.
    pub fn num_clients(&self) -> usize {
        self.shared.clients.load(Ordering::Relaxed)
    }

    /// The fd to poll for readability, with token `base`: readable while requests wait.
    pub(crate) fn poll_fds(&self, base: u64) -> Vec<(BorrowedFd<'_>, u64)> {
        // SAFETY: the eventfd lives in `shared` as long as `self`, to which the borrow is
        // tied.
        let fd = unsafe { BorrowedFd::borrow_raw(self.shared.ready.as_raw_fd()) };
        vec![(fd, base)]
    }

    /// The fd with token `base + token` is readable: run up to [`MAX_RUN_PER_EVENT`] waiting
    /// requests with `exec` and hand their replies to the I/O thread. Never blocks.
    pub(crate) fn handle_event(
        &mut self,
        token: u64,
        exec: &mut dyn FnMut(&ControlRequest) -> Value,
    ) {
        if token != 0 {
            return;
        }
        let _ = self.shared.ready.read();
        let mut done = Vec::new();
        for _ in 0..MAX_RUN_PER_EVENT {
            let Some(p) = lock(&self.shared.requests).pop_front() else {
                break;
            };
            let reply = match &p.request {
                Ok(req) => {
                    debug!("control: client {}: {req:?}", p.client);
                    exec(req)
                }
                Err(v) => v.clone(),
            };
            done.push(Done {
                client: p.client,
                reply,
                close_after: p.close_after,
            });
        }
        if !lock(&self.shared.requests).is_empty() {
            // More than one round's worth: come back after the other fds had a turn.
            let _ = self.shared.ready.write(1);
        }
        if !done.is_empty() {
            lock(&self.shared.replies).extend(done);
            let _ = self.shared.wake_io.write(1);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        let _ = self.shared.wake_io.write(1);
        if let Some(t) = self.io_thread.take() {
            let _ = t.join();
        }
        if let Some((path, dev, ino)) = &self.owned_path {
            // Only remove the file if it is still the socket we created.
            if fs::symlink_metadata(path).is_ok_and(|m| m.dev() == *dev && m.ino() == *ino) {
                let _ = fs::remove_file(path);
            }
        }
    }
}

/// One connected control client, as the I/O thread keeps it.
#[derive(Debug)]
struct Client {
    id: u64,
    stream: UnixStream,
    /// Received bytes not yet forming a whole line.
    inbuf: Vec<u8>,
    /// Reply bytes not yet written.
    out: Vec<u8>,
    /// Requests handed to the device thread whose replies are not in `out` yet.
    in_flight: usize,
    /// When a write last made progress (or `out` became non-empty).
    progress: Instant,
    /// No more requests are read: the peer closed its side, or the last one was refused.
    read_done: bool,
    /// Close once everything owed has been written.
    close_when_done: bool,
}

impl Client {
    fn finished(&self) -> bool {
        self.close_when_done && self.in_flight == 0 && self.out.is_empty()
    }
}

/// The control socket's I/O thread.
struct IoThread {
    listener: UnixListener,
    shared: Arc<Shared>,
    clients: Vec<Client>,
    next_id: u64,
}

impl IoThread {
    fn run(mut self) {
        let mut pfds: Vec<libc::pollfd> = Vec::new();
        while !self.shared.quit.load(Ordering::SeqCst) {
            pfds.clear();
            for fd in [self.shared.wake_io.as_raw_fd(), self.listener.as_raw_fd()] {
                pfds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let mut timeout = -1i32;
            for c in &self.clients {
                let mut events = 0;
                if !c.read_done && c.in_flight < MAX_IN_FLIGHT {
                    events |= libc::POLLIN;
                }
                if !c.out.is_empty() {
                    events |= libc::POLLOUT;
                    let left = WRITE_TIMEOUT.saturating_sub(c.progress.elapsed());
                    let ms = i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX);
                    timeout = if timeout < 0 { ms } else { timeout.min(ms) };
                }
                // A client with nothing to wait for is left out (poll ignores a negative fd),
                // so that a hang-up it reports cannot make this loop spin.
                pfds.push(libc::pollfd {
                    fd: if events == 0 {
                        -1
                    } else {
                        c.stream.as_raw_fd()
                    },
                    events,
                    revents: 0,
                });
            }
            // SAFETY: `pfds` is a live, correctly sized array of pollfd.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("control: poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            if pfds.first().is_some_and(|p| p.revents != 0) {
                let _ = self.shared.wake_io.read();
                self.take_replies();
            }
            // Clients first (their pollfds follow the two fixed ones), then new ones.
            let revents: Vec<i16> = pfds.iter().skip(2).map(|p| p.revents).collect();
            let mut queued = false;
            for (c, ev) in self.clients.iter_mut().zip(revents) {
                if ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !c.read_done {
                    queued |= read_requests(c, &self.shared);
                }
            }
            if queued {
                let _ = self.shared.ready.write(1);
            }
            if pfds.get(1).is_some_and(|p| p.revents != 0) {
                self.accept_all();
            }
            self.flush_and_reap();
        }
    }

    /// Moves finished replies into their clients' output buffers.
    fn take_replies(&mut self) {
        let done = std::mem::take(&mut *lock(&self.shared.replies));
        for d in done {
            // A reply for a client that has gone is dropped.
            if let Some(c) = self.clients.iter_mut().find(|c| c.id == d.client) {
                if c.out.is_empty() {
                    c.progress = Instant::now();
                }
                c.out.extend_from_slice(&reply_line(&d.reply));
                c.in_flight = c.in_flight.saturating_sub(1);
                if d.close_after {
                    c.close_when_done = true;
                }
            }
        }
    }

    /// Writes what each client can take, and drops the clients that are done, broken, or have
    /// not taken any of their replies for [`WRITE_TIMEOUT`].
    fn flush_and_reap(&mut self) {
        let before = self.clients.len();
        self.clients.retain_mut(|c| {
            while !c.out.is_empty() {
                match c.stream.write(&c.out) {
                    Ok(0) => return false,
                    Ok(n) => {
                        c.out.drain(..n.min(c.out.len()));
                        c.progress = Instant::now();
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!("control: client {}: reply failed: {e}", c.id);
                        return false;
                    }
                }
            }
            if !c.out.is_empty() && c.progress.elapsed() >= WRITE_TIMEOUT {
                warn!(
                    "control: client {} has not read its replies for {WRITE_TIMEOUT:?}; dropping it",
                    c.id
                );
                return false;
            }
            if c.finished() {
                debug!("control: client {} disconnected", c.id);
                return false;
            }
            true
        });
        if self.clients.len() != before {
            self.shared
                .clients
                .store(self.clients.len(), Ordering::Relaxed);
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("control: cannot set up a client socket: {e}");
                        continue;
                    }
                    if self.clients.len() >= MAX_CLIENTS {
                        warn!("control: too many clients, refusing one");
                        // Best effort: the socket is non-blocking and fresh, so this either
                        // fits in its buffer or is lost.
                        let mut s = stream;
                        let _ = s.write(&reply_line(
                            &json!({ "ok": false, "error": "too many control clients" }),
                        ));
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id = self.next_id.wrapping_add(1);
                    debug!("control: client {id} connected");
                    self.clients.push(Client {
                        id,
                        stream,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        in_flight: 0,
                        progress: Instant::now(),
                        read_done: false,
                        close_when_done: false,
                    });
                    self.shared
                        .clients
                        .store(self.clients.len(), Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("control: accept failed: {e}");
                    return;
                }
            }
        }
    }
}

/// Reads what a client has sent (one bounded read) and queues its complete request lines.
/// Returns whether anything was queued.
fn read_requests(c: &mut Client, shared: &Shared) -> bool {
    let mut chunk = [0u8; 4096];
    let n = match c.stream.read(&mut chunk) {
        Ok(0) => {
            // The peer closed its side: answer what it asked, then close.
            c.read_done = true;
            c.close_when_done = true;
            return false;
        }
        Ok(n) => n,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) =>
        {
            return false;
        }
        Err(e) => {
            debug!("control: client {}: read failed: {e}", c.id);
            c.read_done = true;
            c.close_when_done = true;
            return false;
        }
    };
    c.inbuf
        .extend_from_slice(chunk.get(..n).unwrap_or_default());
    let mut queue = Vec::new();
    while let Some(nl) = c.inbuf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = c.inbuf.drain(..=nl).collect();
        let line = line.get(..nl).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_REQUEST_LINE {
            queue.push(refuse_long_line(c));
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let request = serde_json::from_slice::<ControlRequest>(line)
            .map_err(|e| json!({ "ok": false, "error": format!("bad request: {e}") }));
        queue.push(Pending {
            client: c.id,
            request,
            close_after: false,
        });
    }
    if !c.read_done && c.inbuf.len() > MAX_REQUEST_LINE {
        queue.push(refuse_long_line(c));
    }
    if queue.is_empty() {
        return false;
    }
    c.in_flight = c.in_flight.saturating_add(queue.len());
    lock(&shared.requests).extend(queue);
    true
}

/// The error reply for an over-long line; the client is closed after it.
fn refuse_long_line(c: &mut Client) -> Pending {
    warn!(
        "control: client {} sent a line over {MAX_REQUEST_LINE} bytes",
        c.id
    );
    c.read_done = true;
    c.inbuf.clear();
    Pending {
        client: c.id,
        request: Err(
            json!({ "ok": false, "error": format!("request line longer than {MAX_REQUEST_LINE} bytes") }),
        ),
        close_after: true,
    }
}

/// A blocking control-socket client.
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to the control socket at `path`; requests time out after 10 s.
    ///
    /// # Errors
    ///
    /// [`ControlError::Connect`] if the socket cannot be reached.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ControlError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Self::from_stream(stream)
    }

    /// Wraps a connected stream; requests time out after 10 s.
    ///
    /// # Errors
    ///
    /// [`ControlError::Io`] if the stream cannot be cloned or configured.
    pub fn from_stream(stream: UnixStream) -> Result<Self, ControlError> {
        let writer = stream.try_clone().map_err(ControlError::Io)?;
        let client = ControlClient {
            reader: BufReader::new(stream),
            writer,
        };
        client.set_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(client)
    }

    /// Sets the read and write timeout of requests (`None`: wait forever).
    ///
    /// # Errors
    ///
    /// [`ControlError::Io`] if the socket rejects it.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ControlError> {
        self.writer
            .set_read_timeout(timeout)
            .and_then(|()| self.writer.set_write_timeout(timeout))
            .map_err(ControlError::Io)
    }

    /// Sends one JSON request line and returns the reply line parsed. An `{"ok":false}` reply
    /// is returned as a value, not an error.
    ///
    /// # Errors
    ///
    /// [`ControlError::Io`], [`ControlError::Closed`], [`ControlError::Json`] or
    /// [`ControlError::ReplyTooLong`].
    pub fn request(&mut self, req: &Value) -> Result<Value, ControlError> {
        self.send_raw(&serde_json::to_vec(req).map_err(ControlError::Json)?)?;
        self.read_reply()
    }

    /// [`request`](Self::request) with a typed request.
    ///
    /// # Errors
    ///
    /// As [`request`](Self::request).
    pub fn call(&mut self, req: &ControlRequest) -> Result<Value, ControlError> {
        self.request(&serde_json::to_value(req).map_err(ControlError::Json)?)
    }

    /// Sends `line` (a newline is appended) without waiting for a reply; for tests of
    /// malformed input.
    ///
    /// # Errors
    ///
    /// [`ControlError::Io`].
    pub fn send_raw(&mut self, line: &[u8]) -> Result<(), ControlError> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line);
        buf.push(b'\n');
        self.writer.write_all(&buf).map_err(ControlError::Io)
    }

    /// Reads one reply line.
    ///
    /// # Errors
    ///
    /// [`ControlError::Io`], [`ControlError::Closed`], [`ControlError::Json`] or
    /// [`ControlError::ReplyTooLong`].
    pub fn read_reply(&mut self) -> Result<Value, ControlError> {
        let mut line = Vec::new();
        let limit = MAX_REPLY_LINE as u64 + 1;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut line)
            .map_err(ControlError::Io)?;
        if n == 0 {
            return Err(ControlError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return if n as u64 >= limit {
                Err(ControlError::ReplyTooLong(MAX_REPLY_LINE))
            } else {
                Err(ControlError::Closed)
            };
        }
        serde_json::from_slice(&line).map_err(ControlError::Json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_shape() {
        let r: ControlRequest = serde_json::from_str(r#"{"cmd":"msix_fire","vector":3}"#).unwrap();
        assert_eq!(r, ControlRequest::MsixFire { vector: 3 });
        let r: ControlRequest =
            serde_json::from_str(r#"{"cmd":"evtchn_bind","port":5,"vector":1}"#).unwrap();
        assert_eq!(r, ControlRequest::EvtchnBind { port: 5, vector: 1 });
        assert_eq!(
            serde_json::to_value(ControlRequest::IntxAssert).unwrap(),
            json!({"cmd":"intx_assert"})
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"msix_fire"}"#).is_err());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"nope"}"#).is_err());
        assert!(
            serde_json::from_str::<ControlRequest>(r#"{"cmd":"msix_fire","vector":-1}"#).is_err()
        );
    }

    #[test]
    fn server_lines_over_a_socket_pair() {
        let dir = std::env::temp_dir().join(format!("irqbridge-ctl-unit-{}", std::process::id()));
        let _ = fs::create_dir_all(&dir);
        let path = dir.join("ctl.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut client = ControlClient::connect(&path).unwrap();
        client
            .send_raw(b"{\"cmd\":\"counters\"}\n\n{bad\n{\"cmd\":\"reset\"}")
            .unwrap();
        // Serve as the device thread would: wait for the ready fd, run what is queued.
        let mut seen = Vec::new();
        let ready = server.poll_fds(0)[0].0.as_raw_fd();
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.len() < 2 && Instant::now() < deadline {
            let mut p = libc::pollfd {
                fd: ready,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
            server.handle_event(0, &mut |r| {
                seen.push(*r);
                json!({"ok": true})
            });
        }
        assert_eq!(seen, vec![ControlRequest::Counters, ControlRequest::Reset]);
        assert_eq!(server.num_clients(), 1);
        assert_eq!(client.read_reply().unwrap(), json!({"ok": true}));
        let bad = client.read_reply().unwrap();
        assert_eq!(bad["ok"], false);
        assert!(bad["error"].as_str().unwrap().starts_with("bad request"));
        assert_eq!(client.read_reply().unwrap(), json!({"ok": true}));
        drop(server);
        assert!(!path.exists());
        let _ = fs::remove_dir(&dir);
    }
}
