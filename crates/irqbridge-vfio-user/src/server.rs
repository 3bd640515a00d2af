// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vfio-user server: one client at a time, a device behind [`VfioUserDevice`], two
//! threads.
//!
//! Written in the project rather than taken from the rust-vmm `vfio_user` crate, whose server
//! replies to NO_REPLY messages (QEMU posts MMIO writes NO_REPLY and desynchronises on an
//! unexpected reply), panics on a VERSION message without capabilities JSON, and sends errno 0
//! in most error replies.
//!
//! # Lifecycle
//! 1. [`Server::bind`] (or [`Server::from_listener`] for a socket passed with `--fd`).
//! 2. [`Server::run`] shares the device (behind a mutex) between two threads:
//!    - the connection thread (the caller) waits for a client, then serves it in blocking
//!      I/O: one `recvmsg` and one `sendmsg` per request (several pipelined messages that
//!      arrive together are taken with one `recvmsg`). The device is locked only while a
//!      message is handled; the reply goes out after.
//!    - the device thread polls the device's [`VfioUserDevice::poll_fds`] (unmask eventfds,
//!      doorbell ioeventfds, the control socket's request queue) and the stop eventfd, and
//!      hands events to [`VfioUserDevice::handle_fd_event`]. It is woken through an eventfd
//!      when a message may have changed the poll set (not after REGION_READ/WRITE).
//! 3. A client must start with VERSION. Every command gets a reply unless it has NO_REPLY set
//!    (then never, not even an error: errors are logged). An error reply is a bare header
//!    with a positive errno.
//! 4. When the client goes away (or breaks framing, or misses the per-message deadline
//!    [`ServerConfig::io_timeout`]), its socket is closed, its DMA mappings are unmapped, the
//!    device hears [`VfioUserDevice::client_disconnected`], and the next client is accepted
//!    on the same socket (QEMU and Cloud Hypervisor reconnect on guest reboot). Device state
//!    stays.
//! 5. [`StopHandle::stop`] ends `run` with `Ok(())`: it wakes both threads and shuts the
//!    client socket down, so a blocking receive or reply returns at once.
//!
//! docs/reliability.md says what a hostile client can and cannot do, and why.
//!
//! # Validation
//! Every request is checked before the device sees it: exact body lengths, `argsz`, flag
//! bits, index ranges, `start + count` (checked), region bounds, `max_data_xfer_size`, fd
//! counts, that every SET_IRQS descriptor is an eventfd (then made non-blocking) and that a
//! DMA_MAP region lies inside its file. A malformed message is consumed whole so the stream
//! stays in step; only a message that cannot be consumed safely (`msg_size` over the limit)
//! or a broken socket ends the session.

#![deny(missing_docs)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use log::{debug, info, warn};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::conn::{Connection, Message};
use crate::device::{IrqAction, IrqData, SetIrqs, VfioUserDevice};
use crate::dma::{DEFAULT_MAX_DMA_MAPS, DmaTable};
use crate::error::{Error, Result};
use crate::proto::{
    self, Capabilities, Command, DEFAULT_MAX_DATA_XFER_SIZE, DeviceInfoMsg, DmaMapRequest,
    DmaUnmapRequest, IoFdEntry, IrqInfoMsg, KVM_IOEVENTFD_FLAG_DATAMATCH, MAX_MSG_FDS,
    RegionAccess, RegionCap, RegionData, RegionInfoReply, RegionInfoRequest, RegionIoFdsReply,
    RegionIoFdsRequest, SetIrqsRequest, SparseMmapArea, VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_REQ_IRQ_INDEX, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_USER_IO_FD_TYPE_IOEVENTFD, Version, WRITE_MULTI_DATA_SIZE, WriteMultiReply,
    WriteMultiRequest,
};

/// Server limits and timeouts.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `max_data_xfer_size` offered in VERSION and enforced on REGION_READ/WRITE.
    pub max_data_xfer_size: u32,
    /// Most DMA mappings per client (the VERSION reply offers the smaller of this and the
    /// client's value).
    pub max_dma_maps: u32,
    /// A deadline per message: once a message has begun to arrive, all of it must be there
    /// within this time, and a reply must be taken by the client within about this time
    /// (each blocked `sendmsg` waits at most this long, and a reply is given up once this
    /// long has passed since it began). A client that stalls longer is dropped. Waiting for
    /// the next message is not limited: an idle client stays connected.
    pub io_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS as u32,
            io_timeout: Duration::from_secs(5),
        }
    }
}

/// What [`StopHandle`] shares with the server.
#[derive(Debug)]
struct StopState {
    /// Readable once a stop is requested; consumed by the connection loop when it returns.
    efd: EventFd,
    /// A second handle on the connected client's socket, so that a stop can `shutdown(2)` it
    /// and end a blocking `recvmsg`/`sendmsg` of the connection thread.
    client: Mutex<Option<UnixStream>>,
}

/// Ends [`Server::run`] from another thread or a signal handler thread.
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<StopState>);

impl StopHandle {
    /// Asks the server loop to return: wakes the device thread and the accept wait, and shuts
    /// the connected client's socket down so that a blocked receive or reply returns at once.
    ///
    /// # Errors
    /// The eventfd write failed (cannot happen short of an exhausted counter).
    pub fn stop(&self) -> io::Result<()> {
        self.0.efd.write(1)?;
        if let Some(s) = lock(&self.0.client).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    }
}

/// Locks a mutex, going on with the data of a poisoned one (a panic on another thread of the
/// server is already fatal; the state it guards stays usable).
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// True if `fd` is readable now.
fn readable_now(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; timeout 0 never blocks.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// A vfio-user server on a listening socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    /// Path, device and inode of the socket this server bound (removed on drop).
    bound: Option<(PathBuf, u64, u64)>,
    stop: Arc<StopState>,
    /// Wakes the device thread when the device's poll set may have changed.
    wake: EventFd,
    config: ServerConfig,
}

/// The device as both server threads share it.
type SharedDevice<'a> = Mutex<&'a mut dyn VfioUserDevice>;

/// Reply body and descriptors borrowed from the device.
struct Reply<'d> {
    body: Vec<u8>,
    fds: Vec<BorrowedFd<'d>>,
}

impl Reply<'_> {
    fn body(body: Vec<u8>) -> Self {
        Reply {
            body,
            fds: Vec::new(),
        }
    }
}

/// One connected client.
struct Session {
    conn: Connection,
    versioned: bool,
    peer: Capabilities,
    dma: DmaTable,
    config: ServerConfig,
}

fn path_string(p: &Path) -> String {
    p.display().to_string()
}

fn bind_0600(path: &Path) -> Result<UnixListener> {
    let bind_err = |source: io::Error| Error::Bind {
        path: path_string(path),
        source,
    };
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(bind_err(io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: `raw` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // On Linux the socket file takes its mode from the socket inode at bind time, so this
    // creates it 0600 (less the umask) with no window where it is more open.
    // SAFETY: fchmod on a live descriptor.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` covers the family and the
    // NUL-terminated path inside it.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: listen on a bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 4) } != 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(UnixListener::from(fd))
}

impl Server {
    /// Listens on `path` (mode 0600). A stale socket file (a socket nobody listens on) is
    /// removed first; anything else at `path` is an error. The socket file is removed when the
    /// server is dropped.
    ///
    /// # Errors
    /// [`Error::PathInUse`] if a server answers at `path` or `path` is not a socket,
    /// [`Error::Bind`] for any other failure.
    pub fn bind(path: impl AsRef<Path>) -> Result<Server> {
        let path = path.as_ref();
        match std::fs::symlink_metadata(path) {
            Ok(md) => {
                if !md.file_type().is_socket() {
                    return Err(Error::PathInUse(path_string(path)));
                }
                match UnixStream::connect(path) {
                    Ok(_) => return Err(Error::PathInUse(path_string(path))),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        info!("vfio-user: removing stale socket {}", path.display());
                        std::fs::remove_file(path).map_err(|source| Error::Bind {
                            path: path_string(path),
                            source,
                        })?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(Error::Bind {
                            path: path_string(path),
                            source,
                        });
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Bind {
                    path: path_string(path),
                    source,
                });
            }
        }
        let listener = bind_0600(path)?;
        let md = std::fs::symlink_metadata(path).map_err(|source| Error::Bind {
            path: path_string(path),
            source,
        })?;
        let mut server = Server::from_listener(listener)?;
        server.bound = Some((path.to_path_buf(), md.dev(), md.ino()));
        Ok(server)
    }

    /// Serves on an already listening socket (e.g. one inherited with `--fd N`). The socket
    /// file, if any, is left alone on drop.
    ///
    /// # Errors
    /// [`Error::Io`] if the listener cannot be made non-blocking or the stop eventfd cannot be
    /// created.
    pub fn from_listener(listener: UnixListener) -> Result<Server> {
        listener.set_nonblocking(true)?;
        Ok(Server {
            listener,
            bound: None,
            stop: Arc::new(StopState {
                efd: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
                client: Mutex::new(None),
            }),
            wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            config: ServerConfig::default(),
        })
    }

    /// Replaces the limits (applies to the next client).
    pub fn with_config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// The current limits.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The socket path this server bound, if it bound one.
    pub fn path(&self) -> Option<&Path> {
        self.bound.as_ref().map(|(p, _, _)| p.as_path())
    }

    /// A handle that ends [`Server::run`]. A stop requested while `run` is not running makes
    /// the next `run` return at once.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(Arc::clone(&self.stop))
    }

    /// Serves clients one after the other until stopped.
    ///
    /// Two threads share the device behind a mutex: the calling thread serves the client's
    /// socket in blocking I/O (one `recvmsg` and one `sendmsg` per request), and a second
    /// thread polls the device's own fds ([`VfioUserDevice::poll_fds`]) and the stop eventfd.
    ///
    /// # Errors
    /// Only failures of the loop itself (poll on the server's own descriptors, no thread).
    /// Client faults end that client's session, never `run`.
    pub fn run(&mut self, device: &mut dyn VfioUserDevice) -> Result<()> {
        let quit = AtomicBool::new(false);
        let shared: SharedDevice<'_> = Mutex::new(device);
        let this: &Server = self;
        let wake = &this.wake;
        let _ = wake.read();
        std::thread::scope(|scope| {
            let poller = std::thread::Builder::new()
                .name("vfio-user-dev".into())
                .spawn_scoped(scope, || device_loop(&shared, &this.stop.efd, wake, &quit))?;
            let r = this.connection_loop(&shared, wake);
            quit.store(true, Ordering::SeqCst);
            let _ = wake.write(1);
            let p = poller
                .join()
                .unwrap_or_else(|_| Err(Error::Io(io::Error::other("the device thread panicked"))));
            r.and(p)
        })
    }

    /// Serves one connected client on the calling thread until it leaves, without polling
    /// the device's fds; for tests and fuzzing. The device hears
    /// [`VfioUserDevice::client_disconnected`] at the end.
    pub fn serve_stream(device: &mut dyn VfioUserDevice, stream: UnixStream, config: ServerConfig) {
        let shared: SharedDevice<'_> = Mutex::new(device);
        match Session::new(stream, config) {
            Ok(mut s) => {
                let r = s.serve(&shared, None);
                log_session_end(r);
                s.end(&shared);
            }
            Err(e) => warn!("vfio-user: cannot set up the client socket: {e}"),
        }
    }

    /// Waits for a client (or a stop), serves it to the end, and again.
    fn connection_loop(&self, device: &SharedDevice<'_>, wake: &EventFd) -> Result<()> {
        loop {
            let mut pfds =
                [self.stop.efd.as_raw_fd(), self.listener.as_raw_fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            // SAFETY: `pfds` is a live array of two pollfd.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io(e));
            }
            if pfds[0].revents != 0 {
                // Consume the stop request so that a later `run` serves again.
                let _ = self.stop.efd.read();
                return Ok(());
            }
            if pfds[1].revents == 0 {
                continue;
            }
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    warn!("vfio-user: accept failed: {e}");
                    // Avoid spinning on a persistent failure (e.g. EMFILE).
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let handle = match stream.try_clone() {
                Ok(h) => h,
                Err(e) => {
                    warn!("vfio-user: cannot set up the client socket: {e}");
                    continue;
                }
            };
            let mut session = match Session::new(stream, self.config.clone()) {
                Ok(s) => s,
                Err(e) => {
                    warn!("vfio-user: cannot set up the client socket: {e}");
                    continue;
                }
            };
            info!("vfio-user: client connected");
            *lock(&self.stop.client) = Some(handle);
            // A stop that came before the handle was published did not shut it down: look.
            let r = if readable_now(self.stop.efd.as_raw_fd()) {
                Err(Error::Disconnected)
            } else {
                session.serve(device, Some(wake))
            };
            *lock(&self.stop.client) = None;
            log_session_end(r);
            session.end(device);
            let _ = wake.write(1);
        }
    }
}

fn log_session_end(r: Result<()>) {
    match r {
        Ok(()) | Err(Error::Disconnected) => info!("vfio-user: client disconnected"),
        Err(e) => warn!("vfio-user: dropping the client: {e}"),
    }
}

/// The device thread: polls the stop eventfd, the wake eventfd (the poll set changed) and the
/// device's fds, and hands the device its events. Returns when `quit` is set or a stop is
/// requested.
fn device_loop(
    device: &SharedDevice<'_>,
    stop: &EventFd,
    wake: &EventFd,
    quit: &AtomicBool,
) -> Result<()> {
    // Reused every round: (fd, token) of the device's fds, and the pollfd array.
    let mut dev_fds: Vec<(RawFd, u64)> = Vec::new();
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    loop {
        if quit.load(Ordering::SeqCst) {
            return Ok(());
        }
        dev_fds.clear();
        {
            let dev = lock(device);
            dev_fds.extend(
                dev.poll_fds()
                    .iter()
                    .map(|(fd, token)| (fd.as_raw_fd(), *token)),
            );
        }
        pfds.clear();
        pfds.extend(
            [stop.as_raw_fd(), wake.as_raw_fd()]
                .into_iter()
                .chain(dev_fds.iter().map(|(fd, _)| *fd))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                }),
        );
        // SAFETY: `pfds` is a live, correctly sized array of pollfd.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("vfio-user: the device thread cannot poll, device fds go unserved: {e}");
            return Err(Error::Io(e));
        }
        if pfds.first().is_some_and(|p| p.revents != 0) || quit.load(Ordering::SeqCst) {
            // Left for the connection loop to consume.
            return Ok(());
        }
        if pfds.get(1).is_some_and(|p| p.revents != 0) {
            let _ = wake.read();
        }
        for ((_, token), p) in dev_fds.iter().zip(pfds.iter().skip(2)) {
            if p.revents != 0 {
                lock(device).handle_fd_event(*token);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.bound {
            // Only remove the file if it is still the socket this server created.
            if let Ok(md) = std::fs::symlink_metadata(path) {
                if md.dev() == *dev && md.ino() == *ino {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// True if `fd` is an eventfd (its /proc/self/fd link reads `anon_inode:[eventfd]`).
fn is_eventfd(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|t| t.as_os_str() == "anon_inode:[eventfd]")
}

/// Sets `O_NONBLOCK` on an eventfd received from the peer, so that the server never waits on
/// it: a write to a saturated counter fails with `EAGAIN` (counted as "already pending" by
/// `irqbridge_core::notifier`) and a read of a zero counter returns at once.
///
/// The flag lives on the open file description, which the peer shares: its own copy of the
/// eventfd becomes non-blocking too. That is acceptable for an eventfd: the flag only changes
/// a read of a zero counter and a write of a saturated one, KVM's irqfd and ioeventfd paths
/// never look at it, and the VMMs poll an eventfd before they read it. A peer could clear the
/// flag again on its copy: the device writes its triggers through `irqbridge_sys::PeerEventFd`,
/// which sets it again and cuts a write that blocks anyway off at a 2 ms deadline.
fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a live descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::Io(io::Error::last_os_error()));
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(Error::Io(io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn no_fds(command: Command, fds: &[OwnedFd]) -> Result<()> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(Error::UnexpectedFds {
            command: command.into(),
            got: fds.len(),
            reason: "this command takes none",
        })
    }
}

fn check_region(device: &dyn VfioUserDevice, region: u32, offset: u64, count: u64) -> Result<()> {
    let info = device.device_info();
    if region >= info.num_regions {
        return Err(Error::InvalidField {
            what: "region index",
            value: region.into(),
        });
    }
    let size = device.region_info(region).size;
    let out = Error::OutOfRange {
        what: "the region",
        start: offset,
        count,
        limit: size,
    };
    match offset.checked_add(count) {
        Some(end) if end <= size => Ok(()),
        _ => Err(out),
    }
}

impl Session {
    fn new(stream: UnixStream, config: ServerConfig) -> Result<Session> {
        stream.set_nonblocking(false)?;
        let mut conn = Connection::new(stream);
        conn.set_max_data_xfer_size(config.max_data_xfer_size);
        // No SO_RCVTIMEO: waiting for the next message is not limited, the rest of a started
        // one is (the deadline is per message).
        conn.set_message_timeout(Some(config.io_timeout));
        conn.set_write_timeout(Some(config.io_timeout))?;
        Ok(Session {
            conn,
            versioned: false,
            peer: Capabilities::default(),
            dma: DmaTable::new(usize::try_from(config.max_dma_maps).unwrap_or(usize::MAX)),
            config,
        })
    }

    /// Drops the client: unmap its DMA, tell the device.
    fn end(self, device: &SharedDevice<'_>) {
        let Session { conn, mut dma, .. } = self;
        // The socket first: by the time the device hears of it, nothing of the client is open.
        drop(conn);
        let maps = dma.unmap_all();
        let mut dev = lock(device);
        for m in &maps {
            dev.dma_unmap(m.iova(), m.size());
        }
        drop(maps);
        dev.client_disconnected();
    }

    /// Serves messages until the session ends (the `Err` says why). `wake` is written when a
    /// message may have changed the device's poll set.
    fn serve(&mut self, device: &SharedDevice<'_>, wake: Option<&EventFd>) -> Result<()> {
        loop {
            self.handle_one(device, wake)?;
        }
    }

    /// Receives and handles one message. `Err` means the session is over.
    fn handle_one(&mut self, device: &SharedDevice<'_>, wake: Option<&EventFd>) -> Result<()> {
        let msg = match self.conn.recv() {
            Ok(m) => m,
            Err(e @ (Error::MessageTooSmall { header, .. } | Error::TooManyFds { header, .. })) => {
                warn!("vfio-user: command {}: {e}", header.command);
                if !header.no_reply() && header.is_command() {
                    self.conn.send(&header.error_reply(e.errno()), &[], &[])?;
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let header = msg.header;
        if header.is_reply() {
            warn!(
                "vfio-user: ignoring an unexpected reply (command {}, id {})",
                header.command, header.msg_id
            );
            return Ok(());
        }
        // Region accesses are the hot path and never change the device's poll set (see
        // `VfioUserDevice::poll_fds`); anything else may, so the device thread looks again.
        let region_access = [
            Command::RegionRead as u16,
            Command::RegionWrite as u16,
            Command::RegionWriteMulti as u16,
        ]
        .contains(&header.command);
        let result = if header.is_command() {
            let mut dev = lock(device);
            // The device is only locked while the message is handled: the reply goes out
            // after, with duplicates of any descriptors it lends.
            self.dispatch(msg, &mut **dev).and_then(|r| {
                let fds = r
                    .fds
                    .iter()
                    .map(|fd| fd.try_clone_to_owned())
                    .collect::<io::Result<Vec<OwnedFd>>>()
                    .map_err(|e| {
                        warn!("vfio-user: cannot duplicate a reply descriptor: {e}");
                        Error::Device(e.raw_os_error().unwrap_or(libc::EMFILE))
                    })?;
                Ok((r.body, fds))
            })
        } else {
            Err(Error::InvalidField {
                what: "message type",
                value: header.message_type().into(),
            })
        };
        if !region_access {
            if let Some(w) = wake {
                let _ = w.write(1);
            }
        }
        match result {
            Ok((body, fds)) => {
                if !header.no_reply() {
                    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                    self.conn
                        .send(&header.reply(body.len()), &body, &borrowed)?;
                }
                Ok(())
            }
            Err(e) if e.is_fatal() => Err(e),
            Err(e) => {
                if header.no_reply() {
                    warn!(
                        "vfio-user: command {} (NO_REPLY, id {}) failed: {e}",
                        header.command, header.msg_id
                    );
                } else {
                    debug!(
                        "vfio-user: command {} (id {}) failed: {e}",
                        header.command, header.msg_id
                    );
                    self.conn.send(&header.error_reply(e.errno()), &[], &[])?;
                }
                Ok(())
            }
        }
    }

    fn dispatch<'d>(
        &mut self,
        msg: Message,
        device: &'d mut dyn VfioUserDevice,
    ) -> Result<Reply<'d>> {
        let Message { header, body, fds } = msg;
        let command = Command::try_from(header.command)?;
        if command == Command::Version {
            no_fds(command, &fds)?;
            return self.version(&body).map(Reply::body);
        }
        if !self.versioned {
            return Err(Error::BadState {
                command: header.command,
                reason: "VERSION must come first",
            });
        }
        match command {
            Command::DmaMap => {
                if fds.len() > 1 {
                    return Err(Error::UnexpectedFds {
                        command: header.command,
                        got: fds.len(),
                        reason: "DMA_MAP takes at most one",
                    });
                }
                let req = DmaMapRequest::parse(&body)?;
                self.dma.map(&req, fds.into_iter().next())?;
                if let Some(m) = self.dma.get(req.address) {
                    if let Err(errno) = device.try_dma_map(m) {
                        drop(self.dma.unmap(req.address, req.size));
                        return Err(Error::Device(errno));
                    }
                }
                Ok(Reply::body(Vec::new()))
            }
            Command::DmaUnmap => {
                no_fds(command, &fds)?;
                let req = DmaUnmapRequest::parse(&body)?;
                self.dma_unmap(&req, device)?;
                Ok(Reply::body(
                    DmaUnmapRequest::new(req.flags, req.address, req.size).encode(),
                ))
            }
            Command::DeviceGetInfo => {
                no_fds(command, &fds)?;
                DeviceInfoMsg::parse(&body)?;
                let info = device.device_info();
                Ok(Reply::body(
                    DeviceInfoMsg::reply(info.flags, info.num_regions, info.num_irqs).encode(),
                ))
            }
            Command::DeviceGetRegionInfo => {
                no_fds(command, &fds)?;
                let req = RegionInfoRequest::parse(&body)?;
                Self::region_info(&req, device)
            }
            Command::DeviceGetRegionIoFds => {
                no_fds(command, &fds)?;
                let req = RegionIoFdsRequest::parse(&body)?;
                self.region_io_fds(&req, device)
            }
            Command::DeviceGetIrqInfo => {
                no_fds(command, &fds)?;
                let req = IrqInfoMsg::parse(&body)?;
                if req.index >= device.device_info().num_irqs {
                    return Err(Error::InvalidField {
                        what: "IRQ index",
                        value: req.index.into(),
                    });
                }
                let info = device.irq_info(req.index);
                Ok(Reply::body(
                    IrqInfoMsg::reply(req.index, info.flags, info.count).encode(),
                ))
            }
            Command::DeviceSetIrqs => {
                let req = SetIrqsRequest::parse(&body)?;
                Self::set_irqs(req, fds, device)?;
                Ok(Reply::body(Vec::new()))
            }
            Command::RegionRead => {
                no_fds(command, &fds)?;
                let req = RegionAccess::parse(&body)?;
                self.check_xfer(req.count.into())?;
                check_region(device, req.region, req.offset, req.count.into())?;
                let mut data = vec![0u8; usize::try_from(req.count).unwrap_or(0)];
                if !data.is_empty() {
                    device
                        .region_read(req.region, req.offset, &mut data)
                        .map_err(Error::Device)?;
                }
                Ok(Reply::body(
                    RegionData {
                        offset: req.offset,
                        region: req.region,
                        data,
                    }
                    .encode(),
                ))
            }
            Command::RegionWrite => {
                no_fds(command, &fds)?;
                let req = RegionData::parse(&body)?;
                let head = req.head();
                self.check_xfer(head.count.into())?;
                check_region(device, req.region, req.offset, head.count.into())?;
                if !req.data.is_empty() {
                    device
                        .region_write(req.region, req.offset, &req.data)
                        .map_err(Error::Device)?;
                }
                Ok(Reply::body(head.encode()))
            }
            Command::RegionWriteMulti => {
                no_fds(command, &fds)?;
                let req = WriteMultiRequest::parse(&body)?;
                for e in &req.entries {
                    if usize::try_from(e.count).map_or(true, |c| c > WRITE_MULTI_DATA_SIZE) {
                        return Err(Error::InvalidField {
                            what: "WRITE_MULTI entry count",
                            value: e.count.into(),
                        });
                    }
                    check_region(device, e.region, e.offset, e.count.into())?;
                }
                for e in &req.entries {
                    if let Some(bytes) = e.bytes().filter(|b| !b.is_empty()) {
                        device
                            .region_write(e.region, e.offset, bytes)
                            .map_err(Error::Device)?;
                    }
                }
                Ok(Reply::body(
                    WriteMultiReply {
                        wr_cnt: req.entries.len() as u64,
                    }
                    .encode(),
                ))
            }
            Command::DeviceReset => {
                no_fds(command, &fds)?;
                if !body.is_empty() {
                    return Err(Error::BadBodyLength {
                        command: header.command,
                        len: body.len(),
                        expected: 0,
                    });
                }
                device.reset().map_err(Error::Device)?;
                Ok(Reply::body(Vec::new()))
            }
            Command::Version
            | Command::DmaRead
            | Command::DmaWrite
            | Command::DirtyPages
            | Command::DeviceFeature
            | Command::MigDataRead
            | Command::MigDataWrite => Err(Error::UnknownCommand(header.command)),
        }
    }

    fn check_xfer(&self, count: u64) -> Result<()> {
        let max = u64::from(self.config.max_data_xfer_size);
        if count > max {
            return Err(Error::TransferTooLarge { count, max });
        }
        Ok(())
    }

    fn version(&mut self, body: &[u8]) -> Result<Vec<u8>> {
        if self.versioned {
            return Err(Error::BadState {
                command: Command::Version.into(),
                reason: "VERSION was already negotiated",
            });
        }
        let v = Version::parse(body)?;
        if v.major != proto::VERSION_MAJOR {
            return Err(Error::UnsupportedVersion {
                major: v.major,
                minor: v.minor,
            });
        }
        let max_dma_maps = u64::from(self.config.max_dma_maps).min(v.capabilities.max_dma_maps);
        self.dma = DmaTable::new(usize::try_from(max_dma_maps).unwrap_or(usize::MAX));
        info!(
            "vfio-user: client version {}.{}, capabilities {}",
            v.major,
            v.minor,
            String::from_utf8_lossy(&v.capabilities.to_json())
        );
        self.peer = v.capabilities;
        self.versioned = true;
        Ok(Version {
            major: proto::VERSION_MAJOR,
            minor: proto::VERSION_MINOR,
            capabilities: Capabilities {
                max_msg_fds: MAX_MSG_FDS as u32,
                max_data_xfer_size: self.config.max_data_xfer_size.into(),
                write_multiple: true,
                pgsizes: proto::DEFAULT_PGSIZES,
                max_dma_maps,
                migration: None,
                twin_socket: None,
            },
        }
        .encode())
    }

    fn dma_unmap(&mut self, req: &DmaUnmapRequest, device: &mut dyn VfioUserDevice) -> Result<()> {
        let known = VFIO_DMA_UNMAP_FLAG_ALL | VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
        if req.flags & !known != 0 {
            return Err(Error::InvalidField {
                what: "DMA_UNMAP flags",
                value: req.flags.into(),
            });
        }
        if req.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
            return Err(Error::Unsupported("DMA_UNMAP dirty bitmaps"));
        }
        if req.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            if req.address != 0 || req.size != 0 {
                return Err(Error::InvalidField {
                    what: "DMA_UNMAP ALL address/size",
                    value: req.address | req.size,
                });
            }
            for m in self.dma.unmap_all() {
                device.dma_unmap(m.iova(), m.size());
            }
            return Ok(());
        }
        let m = self.dma.unmap(req.address, req.size)?;
        device.dma_unmap(m.iova(), m.size());
        Ok(())
    }

    fn region_info<'d>(
        req: &RegionInfoRequest,
        device: &'d mut dyn VfioUserDevice,
    ) -> Result<Reply<'d>> {
        let device: &'d dyn VfioUserDevice = device;
        if req.index >= device.device_info().num_regions {
            return Err(Error::InvalidField {
                what: "region index",
                value: req.index.into(),
            });
        }
        let info = device.region_info(req.index);
        let mut flags = info.flags & !VFIO_REGION_INFO_FLAG_CAPS;
        if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && info.mmap_fd.is_none() {
            warn!(
                "vfio-user: region {} claims MMAP without a file; not advertising MMAP",
                req.index
            );
            flags &= !VFIO_REGION_INFO_FLAG_MMAP;
        }
        let caps = if info.sparse_areas.is_empty() {
            Vec::new()
        } else {
            vec![RegionCap::SparseMmap(
                info.sparse_areas
                    .iter()
                    .map(|a| SparseMmapArea {
                        offset: a.offset,
                        size: a.size,
                    })
                    .collect(),
            )]
        };
        let reply = RegionInfoReply::new(req.index, flags, info.size, info.offset, caps);
        if (req.argsz as usize) < reply.needed() {
            // Too small for the capabilities: the bare structure with the size needed, no
            // capabilities and no fd; the client asks again.
            return Ok(Reply::body(reply.truncated().encode()));
        }
        let fds = match info.mmap_fd {
            Some(fd) if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 => vec![fd],
            _ => Vec::new(),
        };
        Ok(Reply {
            body: reply.encode(),
            fds,
        })
    }

    fn region_io_fds<'d>(
        &self,
        req: &RegionIoFdsRequest,
        device: &'d mut dyn VfioUserDevice,
    ) -> Result<Reply<'d>> {
        let device: &'d dyn VfioUserDevice = device;
        if req.flags != 0 {
            return Err(Error::InvalidField {
                what: "REGION_IO_FDS flags",
                value: req.flags.into(),
            });
        }
        if req.index >= device.device_info().num_regions {
            return Err(Error::InvalidField {
                what: "region index",
                value: req.index.into(),
            });
        }
        let io_fds = device.region_io_fds(req.index);
        let mut fds = Vec::with_capacity(io_fds.len());
        let mut entries = Vec::with_capacity(io_fds.len());
        for (i, f) in io_fds.into_iter().enumerate() {
            entries.push(IoFdEntry {
                offset: f.offset,
                size: f.size,
                fd_index: i as u32,
                kind: VFIO_USER_IO_FD_TYPE_IOEVENTFD,
                flags: if f.datamatch.is_some() {
                    KVM_IOEVENTFD_FLAG_DATAMATCH
                } else {
                    0
                },
                datamatch: f.datamatch.unwrap_or(0),
            });
            fds.push(f.fd);
        }
        let reply = RegionIoFdsReply::new(req.index, entries);
        if req.argsz < reply.argsz {
            return Ok(Reply::body(reply.truncated().encode()));
        }
        let peer_max = usize::try_from(self.peer.max_msg_fds)
            .unwrap_or(usize::MAX)
            .min(MAX_MSG_FDS);
        if fds.len() > peer_max {
            return Err(Error::Unsupported(
                "more io fds than the client accepts in one message",
            ));
        }
        Ok(Reply {
            body: reply.encode(),
            fds,
        })
    }

    fn set_irqs(
        req: SetIrqsRequest,
        fds: Vec<OwnedFd>,
        device: &mut dyn VfioUserDevice,
    ) -> Result<()> {
        const CMD: u16 = Command::DeviceSetIrqs as u16;
        let known = VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK;
        let bad_flags = Error::InvalidField {
            what: "SET_IRQS flags",
            value: req.flags.into(),
        };
        if req.flags & !known != 0 {
            return Err(bad_flags);
        }
        let data = req.flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = req.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if data.count_ones() != 1 || action.count_ones() != 1 {
            return Err(bad_flags);
        }
        if req.index >= device.device_info().num_irqs {
            return Err(Error::InvalidField {
                what: "IRQ index",
                value: req.index.into(),
            });
        }
        let info = device.irq_info(req.index);
        let out_of_range = Error::OutOfRange {
            what: "the IRQ index",
            start: req.start.into(),
            count: req.count.into(),
            limit: info.count.into(),
        };
        match req.start.checked_add(req.count) {
            Some(end) if end <= info.count => {}
            _ => return Err(out_of_range),
        }
        let disable = action == VFIO_IRQ_SET_ACTION_TRIGGER
            && data == VFIO_IRQ_SET_DATA_NONE
            && req.count == 0;
        if req.count == 0 {
            if req.start != 0 {
                return Err(Error::InvalidField {
                    what: "SET_IRQS start with count 0",
                    value: req.start.into(),
                });
            }
            if !disable {
                return Err(Error::InvalidField {
                    what: "SET_IRQS count 0 without TRIGGER|DATA_NONE",
                    value: req.flags.into(),
                });
            }
        }
        if data != VFIO_IRQ_SET_DATA_EVENTFD && !fds.is_empty() {
            return Err(Error::UnexpectedFds {
                command: CMD,
                got: fds.len(),
                reason: "only DATA_EVENTFD carries descriptors",
            });
        }
        let data_len = if data == VFIO_IRQ_SET_DATA_BOOL {
            req.count as usize
        } else {
            0
        };
        if req.data.len() != data_len {
            return Err(Error::BadBodyLength {
                command: CMD,
                len: SetIrqsRequest::SIZE + req.data.len(),
                expected: SetIrqsRequest::SIZE + data_len,
            });
        }
        if data == VFIO_IRQ_SET_DATA_EVENTFD && !fds.is_empty() && fds.len() != req.count as usize {
            return Err(Error::UnexpectedFds {
                command: CMD,
                got: fds.len(),
                reason: "DATA_EVENTFD needs count descriptors or none",
            });
        }
        let unsupported = Error::IrqActionUnsupported {
            index: req.index,
            flags: req.flags,
        };
        match req.index {
            VFIO_PCI_INTX_IRQ_INDEX => {
                if !disable && (req.start != 0 || req.count != 1) {
                    return Err(out_of_range);
                }
                // Kernel VFIO: INTx MASK has no eventfd form.
                if action == VFIO_IRQ_SET_ACTION_MASK && data == VFIO_IRQ_SET_DATA_EVENTFD {
                    return Err(unsupported);
                }
            }
            VFIO_PCI_ERR_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX => {
                if action != VFIO_IRQ_SET_ACTION_TRIGGER {
                    return Err(unsupported);
                }
                if req.count > 1 {
                    return Err(out_of_range);
                }
            }
            _ => {}
        }
        if action != VFIO_IRQ_SET_ACTION_TRIGGER && info.flags & VFIO_IRQ_INFO_MASKABLE == 0 {
            return Err(unsupported);
        }
        if let Some(i) = fds.iter().position(|fd| !is_eventfd(fd)) {
            return Err(Error::NotEventfd { index: i });
        }
        for fd in &fds {
            set_nonblocking(fd)?;
        }
        let irq_data = match data {
            VFIO_IRQ_SET_DATA_NONE => IrqData::None,
            VFIO_IRQ_SET_DATA_BOOL => IrqData::Bool(req.data.iter().map(|&b| b != 0).collect()),
            _ => {
                if fds.is_empty() {
                    IrqData::Eventfds((0..req.count).map(|_| None).collect())
                } else {
                    IrqData::Eventfds(
                        fds.into_iter()
                            .map(|fd| {
                                // SAFETY: `fd` is an owned descriptor checked above to be an
                                // eventfd; ownership moves into the EventFd.
                                Some(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
                            })
                            .collect(),
                    )
                }
            }
        };
        let action = match action {
            VFIO_IRQ_SET_ACTION_MASK => IrqAction::Mask,
            VFIO_IRQ_SET_ACTION_UNMASK => IrqAction::Unmask,
            _ => IrqAction::Trigger,
        };
        device
            .set_irqs(SetIrqs {
                index: req.index,
                action,
                start: req.start,
                count: req.count,
                data: irq_data,
            })
            .map_err(Error::Device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_makes_a_0600_socket_and_removes_stale_ones() {
        let dir = std::env::temp_dir().join(format!("vfu-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");

        let s = Server::bind(&path).unwrap();
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(s.path(), Some(path.as_path()));
        // A live server at the path: refused.
        assert!(matches!(Server::bind(&path), Err(Error::PathInUse(_))));
        drop(s);
        assert!(!path.exists(), "socket removed on drop");

        // A stale socket (bound, never listening) is replaced.
        let stale = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let s = Server::bind(&path).unwrap();
        drop(s);

        // A regular file is never removed.
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(Server::bind(&path), Err(Error::PathInUse(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn eventfd_detection() {
        let e = EventFd::new(0).unwrap();
        // SAFETY: into_raw_fd hands over sole ownership.
        let owned = unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) };
        assert!(is_eventfd(&owned));
        let f: OwnedFd = std::fs::File::open("/proc/self/stat").unwrap().into();
        assert!(!is_eventfd(&f));
    }

    #[test]
    fn stop_before_run_returns_at_once() {
        struct Nothing;
        impl VfioUserDevice for Nothing {
            fn device_info(&self) -> crate::device::DeviceInfo {
                crate::device::DeviceInfo {
                    flags: 0,
                    num_regions: 0,
                    num_irqs: 0,
                }
            }
            fn region_info(&self, _: u32) -> crate::device::RegionInfo<'_> {
                crate::device::RegionInfo {
                    flags: 0,
                    size: 0,
                    offset: 0,
                    sparse_areas: Vec::new(),
                    mmap_fd: None,
                }
            }
            fn region_io_fds(&self, _: u32) -> Vec<crate::device::IoFd<'_>> {
                Vec::new()
            }
            fn irq_info(&self, _: u32) -> crate::device::IrqInfo {
                crate::device::IrqInfo { flags: 0, count: 0 }
            }
            fn set_irqs(&mut self, _: SetIrqs) -> std::result::Result<(), i32> {
                Ok(())
            }
            fn region_read(
                &mut self,
                _: u32,
                _: u64,
                _: &mut [u8],
            ) -> std::result::Result<(), i32> {
                Ok(())
            }
            fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> std::result::Result<(), i32> {
                Ok(())
            }
            fn reset(&mut self) -> std::result::Result<(), i32> {
                Ok(())
            }
            fn client_disconnected(&mut self) {}
            fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
                Vec::new()
            }
            fn handle_fd_event(&mut self, _: u64) {}
        }
        let (l, _) = {
            let dir = std::env::temp_dir().join(format!("vfu-stop-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join("s");
            (UnixListener::bind(&p).unwrap(), dir)
        };
        let mut s = Server::from_listener(l).unwrap();
        s.stop_handle().stop().unwrap();
        s.run(&mut Nothing).unwrap();
    }

    /// One 64-byte region: writes are logged, a read returns how many there were.
    #[derive(Default)]
    struct WriteLog {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl VfioUserDevice for WriteLog {
        fn device_info(&self) -> crate::device::DeviceInfo {
            crate::device::DeviceInfo {
                flags: 0,
                num_regions: 1,
                num_irqs: 0,
            }
        }
        fn region_info(&self, _: u32) -> crate::device::RegionInfo<'_> {
            crate::device::RegionInfo {
                flags: 3,
                size: 64,
                offset: 0,
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        }
        fn region_io_fds(&self, _: u32) -> Vec<crate::device::IoFd<'_>> {
            Vec::new()
        }
        fn irq_info(&self, _: u32) -> crate::device::IrqInfo {
            crate::device::IrqInfo { flags: 0, count: 0 }
        }
        fn set_irqs(&mut self, _: SetIrqs) -> std::result::Result<(), i32> {
            Ok(())
        }
        fn region_read(&mut self, _: u32, _: u64, data: &mut [u8]) -> std::result::Result<(), i32> {
            let n = (self.writes.len() as u32).to_le_bytes();
            for (d, s) in data.iter_mut().zip(n) {
                *d = s;
            }
            Ok(())
        }
        fn region_write(
            &mut self,
            _: u32,
            offset: u64,
            data: &[u8],
        ) -> std::result::Result<(), i32> {
            self.writes.push((offset, data.to_vec()));
            Ok(())
        }
        fn reset(&mut self) -> std::result::Result<(), i32> {
            Ok(())
        }
        fn client_disconnected(&mut self) {}
        fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
            Vec::new()
        }
        fn handle_fd_event(&mut self, _: u64) {}
    }

    #[test]
    fn pipelined_messages_are_all_handled_in_order() {
        const POSTED: u32 = 69;
        let dir = std::env::temp_dir().join(format!("vfu-pipe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let mut server = Server::from_listener(UnixListener::bind(&path).unwrap()).unwrap();
        let stop = server.stop_handle();
        // Everything is queued on the socket before the server reads anything, so its reads
        // take many messages at once.
        let mut c = Connection::new(UnixStream::connect(&path).unwrap());
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let version = Version {
            major: 0,
            minor: 0,
            capabilities: Capabilities::default(),
        };
        let version_id = c.next_msg_id();
        let body = version.encode();
        c.send(
            &proto::Header::command(version_id, Command::Version, body.len()),
            &body,
            &[],
        )
        .unwrap();
        for i in 0..POSTED {
            let w = RegionData {
                offset: u64::from(i % 16) * 4,
                region: 0,
                data: i.to_le_bytes().to_vec(),
            };
            c.post(Command::RegionWrite, &w.encode(), &[]).unwrap();
        }
        // The read's reply can only come if the server handles what it has buffered without
        // waiting for the socket to become readable again: nothing more is sent.
        let read = RegionAccess {
            offset: 0,
            region: 0,
            count: 4,
        };
        let read_id = c.next_msg_id();
        c.send(
            &proto::Header::command(read_id, Command::RegionRead, RegionAccess::SIZE),
            &read.encode(),
            &[],
        )
        .unwrap();
        let t = std::thread::spawn(move || {
            let mut dev = WriteLog::default();
            server.run(&mut dev).unwrap();
            dev
        });
        let v = c.recv().unwrap();
        assert_eq!(v.header.msg_id, version_id);
        assert!(v.header.is_reply() && !v.header.is_error());
        let r = c.recv().unwrap();
        assert_eq!(r.header.msg_id, read_id);
        assert!(r.header.is_reply() && !r.header.is_error());
        let data = RegionData::parse(&r.body).unwrap();
        assert_eq!(data.data, POSTED.to_le_bytes().to_vec());
        stop.stop().unwrap();
        let dev = t.join().unwrap();
        let expected: Vec<(u64, Vec<u8>)> = (0..POSTED)
            .map(|i| (u64::from(i % 16) * 4, i.to_le_bytes().to_vec()))
            .collect();
        assert!(dev.writes == expected, "writes out of order or missing");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
