//! The external control socket of the irqbridge device (`docs/control.md`).
//!
//! A host-side tool or test harness connects to a unix socket and sends newline-delimited JSON
//! requests such as `{"cmd":"msix_fire","vector":3}`; each gets exactly one JSON line back,
//! `{"ok":true,...}` or `{"ok":false,"error":"..."}`, in order.
//!
//! [`ControlServer`] is passive: it is attached to an
//! [`IrqbridgeDevice`](crate::pci::IrqbridgeDevice), whose
//! [`poll_fds`](crate::device::VfioUserDevice::poll_fds) include the listening socket and every
//! client, so requests run on the vfio-user server thread between protocol messages, with no
//! locking. [`ControlClient`] is a small blocking client for the CLI and tests.

#![deny(missing_docs)]

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::pci::poll_now;

/// Longest request line in bytes (without the newline); a longer line gets an error reply and
/// the client is disconnected.
pub const MAX_REQUEST_LINE: usize = 4096;
/// Most clients connected at once; more are told so and disconnected.
pub const MAX_CLIENTS: usize = 16;
/// Longest reply line [`ControlClient`] accepts (a snapshot of the largest device is a few
/// hundred KiB).
pub const MAX_REPLY_LINE: usize = 16 << 20;
/// How long the server waits for a client to take a reply before disconnecting it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
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

#[derive(Debug)]
struct Client {
    id: u64,
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The listening control socket and its clients.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    /// Path and inode of the socket file we created, removed on drop.
    owned_path: Option<(PathBuf, u64, u64)>,
    clients: Vec<Client>,
    next_id: u64,
}

fn is_stale_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
        && UnixStream::connect(path).is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
}

impl ControlServer {
    /// Creates the socket at `path` with mode 0600. A stale socket file (nobody listening) is
    /// replaced; a live one is an error. The file is removed when the server is dropped.
    ///
    /// # Errors
    ///
    /// [`ControlError::Bind`] if the socket cannot be created.
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
    /// on drop.
    ///
    /// # Errors
    ///
    /// [`ControlError::Io`] if the socket cannot be made non-blocking.
    pub fn from_listener(listener: UnixListener) -> Result<Self, ControlError> {
        listener.set_nonblocking(true).map_err(ControlError::Io)?;
        Ok(ControlServer {
            listener,
            owned_path: None,
            clients: Vec::new(),
            next_id: 0,
        })
    }

    /// The socket path if the server created it.
    pub fn path(&self) -> Option<&Path> {
        self.owned_path.as_ref().map(|(p, _, _)| p.as_path())
    }

    /// Number of connected clients.
    pub fn num_clients(&self) -> usize {
        self.clients.len()
    }

    /// The fds to poll for readability: the listener with token `base`, client `id` with
    /// `base + 1 + id`.
    pub(crate) fn poll_fds(&self, base: u64) -> Vec<(BorrowedFd<'_>, u64)> {
        let mut v = vec![(self.listener.as_fd(), base)];
        v.extend(self.clients.iter().map(|c| {
            (
                c.stream.as_fd(),
                base.saturating_add(1).saturating_add(c.id),
            )
        }));
        v
    }

    /// The fd with token `base + token` is readable: accept clients or serve a client's
    /// complete request lines with `exec`.
    pub(crate) fn handle_event(
        &mut self,
        token: u64,
        exec: &mut dyn FnMut(&ControlRequest) -> Value,
    ) {
        if token == 0 {
            self.accept_all();
            return;
        }
        let id = token - 1;
        let Some(pos) = self.clients.iter().position(|c| c.id == id) else {
            return;
        };
        let keep = self
            .clients
            .get_mut(pos)
            .is_some_and(|c| Self::serve_client(c, exec));
        if !keep {
            let c = self.clients.swap_remove(pos);
            debug!("control: client {} disconnected", c.id);
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream
                        .set_nonblocking(false)
                        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
                    {
                        warn!("control: cannot set up a client socket: {e}");
                        continue;
                    }
                    if self.clients.len() >= MAX_CLIENTS {
                        warn!("control: too many clients, refusing one");
                        let mut s = stream;
                        let _ = write_line(
                            &mut s,
                            &json!({ "ok": false, "error": "too many control clients" }),
                        );
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id = self.next_id.wrapping_add(1);
                    debug!("control: client {id} connected");
                    self.clients.push(Client {
                        id,
                        stream,
                        buf: Vec::new(),
                    });
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

    /// Reads what is available and answers every complete line. Returns false when the client
    /// must be dropped.
    fn serve_client(c: &mut Client, exec: &mut dyn FnMut(&ControlRequest) -> Value) -> bool {
        match poll_now(c.stream.as_fd()) {
            Ok(ev) if ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 => {}
            Ok(_) => return true,
            Err(_) => return false,
        }
        let mut chunk = [0u8; 4096];
        let n = match c.stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(_) => return false,
        };
        c.buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        while let Some(nl) = c.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = c.buf.drain(..=nl).collect();
            let line = line.get(..nl).unwrap_or_default();
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > MAX_REQUEST_LINE {
                return Self::refuse_long_line(c);
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let reply = match serde_json::from_slice::<ControlRequest>(line) {
                Ok(req) => {
                    debug!("control: client {}: {req:?}", c.id);
                    exec(&req)
                }
                Err(e) => json!({ "ok": false, "error": format!("bad request: {e}") }),
            };
            if let Err(e) = write_line(&mut c.stream, &reply) {
                debug!("control: client {}: reply failed: {e}", c.id);
                return false;
            }
        }
        if c.buf.len() > MAX_REQUEST_LINE {
            return Self::refuse_long_line(c);
        }
        true
    }

    fn refuse_long_line(c: &mut Client) -> bool {
        warn!(
            "control: client {} sent a line over {MAX_REQUEST_LINE} bytes",
            c.id
        );
        let _ = write_line(
            &mut c.stream,
            &json!({ "ok": false, "error": format!("request line longer than {MAX_REQUEST_LINE} bytes") }),
        );
        false
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.owned_path {
            // Only remove the file if it is still the socket we created.
            if fs::symlink_metadata(path).is_ok_and(|m| m.dev() == *dev && m.ino() == *ino) {
                let _ = fs::remove_file(path);
            }
        }
    }
}

fn write_line(stream: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
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
        server.handle_event(0, &mut |_| json!({"ok": true}));
        assert_eq!(server.num_clients(), 1);
        let mut seen = Vec::new();
        client
            .send_raw(b"{\"cmd\":\"counters\"}\n\n{bad\n{\"cmd\":\"reset\"}")
            .unwrap();
        // Serve until the three replies are there.
        let token = server.poll_fds(0).get(1).unwrap().1;
        server.handle_event(token, &mut |r| {
            seen.push(*r);
            json!({"ok": true})
        });
        assert_eq!(seen, vec![ControlRequest::Counters, ControlRequest::Reset]);
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
