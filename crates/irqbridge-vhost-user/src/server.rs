// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Configuration, the [`Backend`] handle, and the socket server.
//!
//! [`Server::start`] binds every socket, then runs one thread per socket. Each thread waits
//! for a frontend, serves it with a fresh `VhostUserDaemon` (whose backend is a session of
//! that socket's connection) until it disconnects, and waits for the next one, so a frontend
//! can reconnect at any time and finds its ports as it left them. [`StopHandle::stop`] ends
//! every thread, dropping connected frontends; [`Server::wait`] then returns.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use irqbridge_core::evtchn::{EVTCHN_DEFAULT_PORTS, EVTCHN_MAX_PORTS};
use irqbridge_core::{EvtchnStats, PortState, SendOutcome};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use vhost::vhost_user::Error as VhostUserError;
use vhost::vhost_user::Listener;
use vhost_user_backend::{Error as VhostUserDaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::abi::{ABI_VERSION, ConfigSpace, DEFAULT_VIRTIO_ID, FEATURES, MAX_UPCALLS};
use crate::error::{Error, Result};
use crate::router::{ConnCounters, ConnId, Endpoint, Router, RouterState, deliver};
use crate::session::{Session, SessionParams, lock};
use crate::socket::SocketFile;
use crate::vring::{Breaker, with_breaker};

/// Default number of upcalls (event queues) per connection.
pub const DEFAULT_UPCALLS: u16 = 4;
/// Default largest virtqueue size offered to the frontend.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// The `type` this backend reports in `--print-capabilities` (QEMU's
/// docs/interop/vhost-user.json `VHostUserBackendType`). None of the types describes an
/// event-channel device; `rpmsg` (remote processor messaging, an inter-processor notification
/// channel over virtqueues) is the closest. QEMU itself never reads it; management software
/// must not pick this backend for a real virtio-rpmsg device.
pub const BACKEND_TYPE: &str = "rpmsg";

/// Everything `irqbridge vhost-user` needs to run.
#[derive(Debug)]
pub struct BackendConfig {
    /// Sockets to create and listen on (`--socket-path`, repeatable), connections
    /// `listen_fd.is_some() as u32 ..` in order.
    pub sockets: Vec<PathBuf>,
    /// An inherited listening unix socket (`--fd N`); it is connection 0 when present.
    pub listen_fd: Option<OwnedFd>,
    /// Event-channel ports per connection (1..=4096).
    pub ports: u32,
    /// Upcalls, i.e. event queues, per connection (1..=62).
    pub upcalls: u16,
    /// The virtio device ID the frontend should present (informational for the backend: it is
    /// reported in the config space and the logs; vhost-user does not carry it). Not 0.
    pub virtio_id: u16,
    /// Largest virtqueue size accepted (a power of two, 2..=32768).
    pub queue_size: u16,
    /// Port links made before any socket is bound (`--link`), so a frontend never sees the
    /// device without them: see [`Router::connect_interdomain`].
    pub links: Vec<(Endpoint, Endpoint)>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            sockets: Vec::new(),
            listen_fd: None,
            ports: EVTCHN_DEFAULT_PORTS,
            upcalls: DEFAULT_UPCALLS,
            virtio_id: DEFAULT_VIRTIO_ID,
            queue_size: DEFAULT_QUEUE_SIZE,
            links: Vec::new(),
        }
    }
}

impl BackendConfig {
    /// Number of connections (listening sockets).
    pub fn connections(&self) -> u32 {
        u32::try_from(self.sockets.len())
            .unwrap_or(u32::MAX)
            .saturating_add(u32::from(self.listen_fd.is_some()))
    }

    /// Check the ranges.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the bad value.
    pub fn validate(&self) -> Result<()> {
        if self.connections() == 0 {
            return Err(Error::InvalidConfig(
                "at least one socket path or an inherited fd is needed".into(),
            ));
        }
        if self.ports == 0 || self.ports > EVTCHN_MAX_PORTS {
            return Err(Error::InvalidConfig(format!(
                "port count {} is not in 1..={EVTCHN_MAX_PORTS}",
                self.ports
            )));
        }
        if self.upcalls == 0 || self.upcalls > MAX_UPCALLS {
            return Err(Error::InvalidConfig(format!(
                "upcall count {} is not in 1..={MAX_UPCALLS}",
                self.upcalls
            )));
        }
        if self.virtio_id == 0 {
            return Err(Error::InvalidConfig(
                "virtio device ID 0 is reserved".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.sockets {
            if !seen.insert(crate::socket::identity(p)) {
                return Err(Error::InvalidConfig(format!(
                    "socket path {} is given twice",
                    p.display()
                )));
            }
        }
        if self.queue_size < 2 || !self.queue_size.is_power_of_two() {
            return Err(Error::InvalidConfig(format!(
                "queue size {} is not a power of two in 2..=32768",
                self.queue_size
            )));
        }
        Ok(())
    }
}

/// The `--print-capabilities` output: a JSON object `{"type": "rpmsg"}` (see
/// [`BACKEND_TYPE`]), followed by a newline.
pub fn print_capabilities() -> String {
    let mut s = serde_json::to_string_pretty(&serde_json::json!({ "type": BACKEND_TYPE }))
        .unwrap_or_else(|_| format!("{{\"type\": \"{BACKEND_TYPE}\"}}"));
    s.push('\n');
    s
}

/// Serializable state of a [`Backend`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendState {
    /// ABI version of the device ([`ABI_VERSION`]).
    pub abi_version: u16,
    /// The configured virtio device ID.
    pub virtio_id: u16,
    /// Ports, links and counters of every connection.
    pub router: RouterState,
}

/// Shared handle to the event-channel state of every connection. Cheap to clone; all clones
/// see the same state. Tests and harnesses use it to send events, link ports and snapshot.
#[derive(Clone, Debug)]
pub struct Backend {
    router: Arc<Mutex<Router>>,
    config: ConfigSpace,
    queue_size: u16,
}

impl Backend {
    /// A backend with the sizes of `config` and one connection per socket of it (its sockets
    /// are not touched; [`Server::start`] does that).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`].
    pub fn new(config: &BackendConfig) -> Result<Backend> {
        config.validate()?;
        Ok(Backend {
            router: Arc::new(Mutex::new(Router::new(
                config.connections(),
                config.ports,
                config.upcalls,
            )?)),
            config: ConfigSpace {
                num_ports: config.ports,
                num_upcalls: config.upcalls,
                abi_version: ABI_VERSION,
                features: FEATURES,
                virtio_id: config.virtio_id,
            },
            queue_size: config.queue_size,
        })
    }

    /// The router shared by every connection. Lock it for several operations at once; the
    /// methods below lock it for one each.
    pub fn router(&self) -> &Arc<Mutex<Router>> {
        &self.router
    }

    /// The config space every frontend reads.
    pub fn config_space(&self) -> ConfigSpace {
        self.config
    }

    /// See [`Router::connect_interdomain`].
    ///
    /// # Errors
    ///
    /// As [`Router::connect_interdomain`].
    pub fn connect_interdomain(&self, a: Endpoint, b: Endpoint) -> Result<()> {
        lock(&self.router).connect_interdomain(a, b)
    }

    /// See [`Router::send`]: an event to the guest on `port` of `conn`.
    ///
    /// # Errors
    ///
    /// As [`Router::send`].
    pub fn send(&self, conn: ConnId, port: u32) -> Result<SendOutcome> {
        let mut out = Vec::new();
        let r = lock(&self.router).send_deferred(conn, port, &mut out);
        deliver(out);
        r
    }

    /// See [`Router::send_to_peer`]: what a doorbell on `port` of `conn` does.
    ///
    /// # Errors
    ///
    /// As [`Router::send_to_peer`].
    pub fn send_to_peer(&self, conn: ConnId, port: u32) -> Result<SendOutcome> {
        let mut out = Vec::new();
        let r = lock(&self.router).send_to_peer_deferred(conn, port, &mut out);
        deliver(out);
        r
    }

    /// See [`Router::port_state`].
    ///
    /// # Errors
    ///
    /// As [`Router::port_state`].
    pub fn port_state(&self, conn: ConnId, port: u32) -> Result<PortState> {
        lock(&self.router).port_state(conn, port)
    }

    /// See [`Router::is_pending`].
    ///
    /// # Errors
    ///
    /// As [`Router::is_pending`].
    pub fn is_pending(&self, conn: ConnId, port: u32) -> Result<bool> {
        lock(&self.router).is_pending(conn, port)
    }

    /// See [`Router::stats`].
    ///
    /// # Errors
    ///
    /// As [`Router::stats`].
    pub fn stats(&self, conn: ConnId) -> Result<EvtchnStats> {
        lock(&self.router).stats(conn)
    }

    /// See [`Router::counters`].
    ///
    /// # Errors
    ///
    /// As [`Router::counters`].
    pub fn counters(&self, conn: ConnId) -> Result<ConnCounters> {
        lock(&self.router).counters(conn)
    }

    /// See [`Router::is_attached`].
    ///
    /// # Errors
    ///
    /// As [`Router::is_attached`].
    pub fn is_attached(&self, conn: ConnId) -> Result<bool> {
        lock(&self.router).is_attached(conn)
    }

    /// See [`Router::page_gpa`].
    ///
    /// # Errors
    ///
    /// As [`Router::page_gpa`].
    pub fn page_gpa(&self, conn: ConnId) -> Result<Option<u64>> {
        lock(&self.router).page_gpa(conn)
    }

    /// Port states, pages, links and counters of every connection.
    pub fn snapshot(&self) -> BackendState {
        BackendState {
            abi_version: ABI_VERSION,
            virtio_id: self.config.virtio_id,
            router: lock(&self.router).snapshot(),
        }
    }

    /// Restore a [`snapshot`](Self::snapshot) (see [`Router::restore`]).
    ///
    /// # Errors
    ///
    /// [`Error::Snapshot`] if it does not fit or a page is registered; nothing changes then.
    pub fn restore(&self, state: &BackendState) -> Result<()> {
        if state.abi_version != ABI_VERSION {
            return Err(Error::Snapshot(format!(
                "ABI version {} is not {ABI_VERSION}",
                state.abi_version
            )));
        }
        lock(&self.router).restore(&state.router)
    }

    fn session_params(&self, conn: ConnId) -> SessionParams {
        SessionParams {
            conn,
            upcalls: self.config.num_upcalls,
            queue_size: self.queue_size,
            config: self.config,
        }
    }
}

#[derive(Debug)]
struct StopState {
    stopped: AtomicBool,
    event: EventFd,
    /// Per connection: the listening fd while its thread owns it, and the running daemon.
    slots: Mutex<Vec<Slot>>,
}

#[derive(Default)]
struct Slot {
    listener: Option<RawFd>,
    daemon: Option<ShutdownHandle>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("listener", &self.listener)
            .field("connected", &self.daemon.is_some())
            .finish()
    }
}

/// Ends a [`Server`] from any thread (for example a signal-waiting thread).
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<StopState>);

impl StopHandle {
    /// Stop accepting frontends and drop the connected ones; [`Server::wait`] then returns.
    /// Idempotent.
    pub fn stop(&self) {
        let s = &self.0;
        s.stopped.store(true, Ordering::SeqCst);
        if let Err(e) = s.event.write(1) {
            warn!("vhost-user: stop eventfd write failed: {e}");
        }
        for slot in lock(&s.slots).iter() {
            if let Some(h) = &slot.daemon {
                h.shutdown();
            }
            if let Some(fd) = slot.listener {
                // Wakes a thread blocked in accept(2) on Linux. The fd stays open: the
                // owning thread deregisters it under this lock before closing it.
                // SAFETY: shutdown(2) on a descriptor that is open (see above); it touches
                // no memory.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::SeqCst)
    }
}

/// A running backend: one thread per listening socket.
#[derive(Debug)]
pub struct Server {
    backend: Backend,
    stop: StopHandle,
    threads: Vec<JoinHandle<Result<()>>>,
    paths: Vec<PathBuf>,
    /// The socket files this server created, removed (if still ours) when it is dropped,
    /// after every socket thread ended.
    _files: Vec<SocketFile>,
}

impl Server {
    /// Bind every socket of `config` and start serving.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`], [`Error::Listen`], or [`Error::Io`] (threads, eventfd).
    pub fn start(mut config: BackendConfig) -> Result<Server> {
        let backend = Backend::new(&config)?;
        for (a, b) in &config.links {
            backend.connect_interdomain(*a, *b)?;
        }
        let mut listeners: Vec<(Listener, String)> = Vec::new();
        if let Some(fd) = config.listen_fd.take() {
            let raw = fd.as_raw_fd();
            listeners.push((Listener::from(UnixListener::from(fd)), format!("fd {raw}")));
        }
        let mut files = Vec::new();
        for path in &config.sockets {
            let (listener, file) = crate::socket::bind(path)?;
            files.push(file);
            listeners.push((Listener::from(listener), path.display().to_string()));
        }
        let stop = StopHandle(Arc::new(StopState {
            stopped: AtomicBool::new(false),
            event: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Io)?,
            slots: Mutex::new((0..listeners.len()).map(|_| Slot::default()).collect()),
        }));
        let mut server = Server {
            backend,
            stop,
            threads: Vec::new(),
            paths: config.sockets.clone(),
            _files: files,
        };
        for (i, (listener, name)) in listeners.into_iter().enumerate() {
            let conn = ConnId(i as u32);
            info!(
                "vhost-user: {conn} listening on {name} (frontend: virtio-id {}, {} queues, config size {})",
                config.virtio_id,
                crate::abi::num_queues(config.upcalls),
                crate::abi::CONFIG_SIZE
            );
            let backend = server.backend.clone();
            let stop = server.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("irqbridge-vu-{i}"))
                .spawn(move || serve_socket(conn, listener, backend, stop))
                .map_err(Error::Io);
            match thread {
                Ok(t) => server.threads.push(t),
                Err(e) => {
                    server.stop.stop();
                    return Err(e);
                }
            }
        }
        Ok(server)
    }

    /// The backend's shared state.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// A handle that stops this server.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// The socket paths this server created (removed when it ends).
    pub fn socket_paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Wait until the server is stopped and every socket thread ended.
    ///
    /// # Errors
    ///
    /// The first error of a socket thread ([`Error::Daemon`], [`Error::Io`]).
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        let mut result = Ok(());
        for t in self.threads.drain(..) {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(Error::Daemon("a socket thread panicked".into())));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop.stop();
            if let Err(e) = self.join() {
                error!("vhost-user: {e}");
            }
        }
    }
}

/// Serve the sockets of `config` until a socket fails or the process ends. Use
/// [`Server::start`] to get a [`StopHandle`] (for SIGTERM handling) and the [`Backend`].
///
/// # Errors
///
/// As [`Server::start`] and [`Server::wait`].
pub fn serve(config: BackendConfig) -> Result<()> {
    Server::start(config)?.wait()
}

/// Wait until the listener is readable (`true`) or the server is stopped (`false`).
fn wait_for_frontend(listener: RawFd, stop: &StopHandle) -> Result<bool> {
    loop {
        if stop.is_stopped() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: stop.0.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures for the duration of the
        // call, and its length is passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io(e));
        }
        if fds[0].revents != 0 || stop.is_stopped() {
            return Ok(false);
        }
        if fds[1].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(Error::Io(std::io::Error::other(
                "the listening socket failed",
            )));
        }
        if fds[1].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
    }
}

/// Serve frontends on `listener`, one after the other, until stopped.
fn serve_socket(
    conn: ConnId,
    mut listener: Listener,
    backend: Backend,
    stop: StopHandle,
) -> Result<()> {
    let index = conn.0 as usize;
    let set_slot = |f: &dyn Fn(&mut Slot)| {
        if let Some(slot) = lock(&stop.0.slots).get_mut(index) {
            f(slot);
        }
    };
    let fd = listener.as_raw_fd();
    set_slot(&|s| s.listener = Some(fd));
    let result = loop {
        match wait_for_frontend(fd, &stop) {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
        if let Err(e) = serve_one(conn, &mut listener, &backend, &stop) {
            if stop.is_stopped() {
                break Ok(());
            }
            break Err(e);
        }
    };
    // Deregister before the listener (and its fd) is dropped.
    set_slot(&|s| s.listener = None);
    drop(listener);
    info!("vhost-user: {conn}: stopped");
    result
}

/// Accept one frontend on `listener` and serve it until it disconnects.
fn serve_one(
    conn: ConnId,
    listener: &mut Listener,
    backend: &Backend,
    stop: &StopHandle,
) -> Result<()> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let breaker = Arc::new(Breaker::new(conn));
    let session = Arc::new(Session::attach(
        backend.session_params(conn),
        Arc::clone(&backend.router),
        mem.clone(),
        Arc::clone(&breaker),
    )?);
    // The vrings created in there check the descriptors they are given and report to
    // `breaker` (see crate::vring).
    let daemon = with_breaker(&breaker, || {
        VhostUserDaemon::new(format!("irqbridge-vu-{}", conn.0), session.clone(), mem)
    });
    let mut daemon = match daemon {
        Ok(d) => d,
        Err(e) => {
            session.detach();
            session.retire_memory();
            return Err(Error::Daemon(e.to_string()));
        }
    };
    let end = |daemon: &VhostUserDaemon<Arc<Session>>| {
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        session.detach();
        session.retire_memory();
    };
    // Upcalls that other connections' frontends cause are raised on this session's worker
    // thread, never on theirs (see crate::vring for why that matters).
    let (wake_fd, wake_id) = session.wake_listener();
    let handlers = daemon.get_epoll_handlers();
    let registered = handlers
        .iter()
        .all(|h| h.register_listener(wake_fd, EventSet::IN, wake_id).is_ok());
    if registered && !handlers.is_empty() {
        session.enable_handoff();
    } else {
        warn!("vhost-user: {conn}: cannot register the upcall wake-up; upcalls raised inline");
    }
    drop(handlers);
    if let Err(e) = daemon.start(listener) {
        end(&daemon);
        return Err(Error::Daemon(e.to_string()));
    }
    info!("vhost-user: {conn}: frontend connected");
    breaker.set_handle(daemon.shutdown_handle());
    if let Some(slot) = lock(&stop.0.slots).get_mut(conn.0 as usize) {
        slot.daemon = daemon.shutdown_handle();
    }
    // A stop that came before the handle was registered.
    if stop.is_stopped() {
        daemon.request_shutdown();
    }
    let result = daemon.wait();
    breaker.set_handle(None);
    if let Some(slot) = lock(&stop.0.slots).get_mut(conn.0 as usize) {
        slot.daemon = None;
    }
    end(&daemon);
    match result {
        Ok(()) if breaker.is_broken() => info!("vhost-user: {conn}: frontend connection ended"),
        Ok(()) => info!("vhost-user: {conn}: frontend disconnected"),
        // vhost-user-backend reports a plain hang-up as an error; that is a normal end.
        Err(VhostUserDaemonError::HandleRequest(VhostUserError::Disconnected)) => {
            info!("vhost-user: {conn}: frontend disconnected")
        }
        // A frontend that breaks the protocol loses its connection, not the server.
        Err(e) => warn!("vhost-user: {conn}: frontend connection ended: {e}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    #[test]
    fn config_validation() {
        let ok = BackendConfig {
            sockets: vec!["/nonexistent/x".into()],
            ..BackendConfig::default()
        };
        ok.validate().unwrap();
        assert_eq!(ok.connections(), 1);
        let bad = |f: &dyn Fn(&mut BackendConfig)| {
            let mut c = BackendConfig {
                sockets: vec!["/x".into()],
                ..BackendConfig::default()
            };
            f(&mut c);
            matches!(c.validate(), Err(Error::InvalidConfig(_)))
        };
        assert!(bad(&|c| c.sockets.clear()));
        assert!(bad(&|c| c.ports = 0));
        assert!(bad(&|c| c.ports = 4097));
        assert!(bad(&|c| c.upcalls = 0));
        assert!(bad(&|c| c.upcalls = 63));
        assert!(bad(&|c| c.virtio_id = 0));
        assert!(bad(&|c| c.queue_size = 100));
        assert!(bad(&|c| c.queue_size = 1));
        assert!(!bad(&|c| c.upcalls = 62));
    }

    #[test]
    fn capabilities_json() {
        let s = print_capabilities();
        assert!(s.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, serde_json::json!({ "type": "rpmsg" }));
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let dir = std::env::temp_dir().join(format!("irqbridge-vu-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-socket");
        std::fs::write(&path, b"keep me").unwrap();
        let r = Server::start(BackendConfig {
            sockets: vec![path.clone()],
            ..BackendConfig::default()
        });
        assert!(matches!(r, Err(Error::Listen { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stop_without_frontends_removes_sockets() {
        let dir = std::env::temp_dir().join(format!("irqbridge-vu-unit2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths = vec![dir.join("a.sock"), dir.join("b.sock")];
        let server = Server::start(BackendConfig {
            sockets: paths.clone(),
            ..BackendConfig::default()
        })
        .unwrap();
        for p in &paths {
            let m = std::fs::metadata(p).unwrap();
            assert!(m.file_type().is_socket());
            assert_eq!(m.permissions().mode() & 0o777, 0o600);
        }
        server.stop_handle().stop();
        server.wait().unwrap();
        for p in &paths {
            assert!(!p.exists(), "{} removed", p.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
