// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The irqbridge device server run in a thread of the test process: [`DeviceServer`].
//!
//! The thread runs `irqbridge_vfio_user::server::Server` on a socket in a private temporary
//! directory, serving a [`MeteredDevice`]: the real [`IrqbridgeDevice`] behind a thin wrapper
//! that
//!
//! - counts the vfio-user messages the device receives ([`ServerMetrics`]), so a scenario can
//!   prove that doorbells came through the ioeventfd and not as REGION_WRITE messages;
//! - publishes the device's counters after every message and event;
//! - runs [`HookRequest`]s on the server thread (fire an MSI-X vector, pulse INTx) and reports
//!   when they started and, for INTx, when the line was ready again ([`HookEvent`]). The
//!   benchmarks use these to take timestamps on the thread that does the work.
//!
//! Nothing here changes what the device does: every trait call is forwarded unchanged.

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use irqbridge_vfio_user::device::{
    DeviceInfo, Errno, IoFd, IrqInfo, RegionInfo, SetIrqs, VfioUserDevice,
};
use irqbridge_vfio_user::pci::regs::{
    INTX_SOURCE_CONTROL, INTX_STATUS_MASKED, NUM_REGIONS, REG_DOORBELL, REG_INTX_STATUS,
    REGION_BAR0,
};
use irqbridge_vfio_user::pci::{Counters, DeviceConfig, IrqbridgeDevice};
use irqbridge_vfio_user::server::{Server, StopHandle};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::error::{Error, Result};

/// Poll token of the hook eventfd. The wrapper handles it before the device sees any event;
/// the device's own tokens are small numbers and `1 << 32` upward (control socket).
const TOKEN_HOOK: u64 = 0xffff_0000;

/// Number of region indexes the metrics keep apart (a PCI device has 9).
const METERED_REGIONS: usize = NUM_REGIONS as usize;

/// Something the server thread does on request, between two messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookRequest {
    /// An event on MSI-X vector `vector` (as the device's `MSIX_FIRE`); reported as
    /// [`HookEventKind::MsixFired`] with the time just before the device model ran.
    MsixFire {
        /// The vector.
        vector: u16,
    },
    /// Raises then lowers INTx source 1 (the control source): the device triggers once and
    /// the line is low again before the guest's EOI, so the resample-driven unmask finds it
    /// low and the line becomes ready. Reported as [`HookEventKind::IntxReady`] once the
    /// device is unmasked again.
    IntxPulse,
}

/// What a [`HookEvent`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookEventKind {
    /// [`HookRequest::MsixFire`] ran; `outcome` is the device's delivery (`Ok(true)` sent,
    /// `Ok(false)` pending or no eventfd, `Err` the model refused).
    MsixFired {
        /// Vector fired.
        vector: u16,
        /// Whether the device wrote the vector's eventfd.
        sent: bool,
    },
    /// [`HookRequest::IntxPulse`] completed: the trigger was written at `started` and the
    /// device saw the unmask that made the line ready at `finished`.
    IntxReady,
    /// A hook request failed in the device model.
    Failed,
}

/// A hook request's report, with timestamps taken on the server thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookEvent {
    /// What happened.
    pub kind: HookEventKind,
    /// Just before the device model acted.
    pub started: Instant,
    /// When the request was complete (equal to `started` for one-shot requests).
    pub finished: Instant,
}

/// Message counters of the server's device, shared with the test.
#[derive(Debug)]
pub struct ServerMetrics {
    base: Instant,
    region_reads: [AtomicU64; METERED_REGIONS],
    region_writes: [AtomicU64; METERED_REGIONS],
    doorbell_writes: AtomicU64,
    set_irqs: AtomicU64,
    fd_events: AtomicU64,
    resets: AtomicU64,
    dma_maps: AtomicU64,
    disconnects: AtomicU64,
    doorbells: AtomicU64,
    doorbell_ns: AtomicU64,
    /// First doorbell change since [`ServerMetrics::arm_doorbell_mark`]: its time (0 = none
    /// yet) and the count it reached.
    mark_ns: AtomicU64,
    mark_count: AtomicU64,
    counters: Mutex<Counters>,
}

/// A copy of [`ServerMetrics`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// REGION_READ messages per region index (0-8).
    pub region_reads: [u64; METERED_REGIONS],
    /// REGION_WRITE messages (and WRITE_MULTI entries) per region index.
    pub region_writes: [u64; METERED_REGIONS],
    /// REGION_WRITEs that hit BAR0's DOORBELL register.
    pub doorbell_writes: u64,
    /// DEVICE_SET_IRQS messages.
    pub set_irqs: u64,
    /// Events on the device's polled fds (doorbell ioeventfd, INTx unmask eventfd, ...).
    pub fd_events: u64,
    /// DEVICE_RESET messages.
    pub resets: u64,
    /// DMA_MAP messages accepted.
    pub dma_maps: u64,
    /// Client disconnects.
    pub disconnects: u64,
    /// The device's counters after the last message or event.
    pub device: Counters,
}

impl MetricsSnapshot {
    /// REGION_READ + REGION_WRITE messages over every region.
    pub fn region_messages(&self) -> u64 {
        self.region_reads.iter().chain(&self.region_writes).sum()
    }
}

impl ServerMetrics {
    fn new() -> ServerMetrics {
        ServerMetrics {
            base: Instant::now(),
            region_reads: Default::default(),
            region_writes: Default::default(),
            doorbell_writes: AtomicU64::new(0),
            set_irqs: AtomicU64::new(0),
            fd_events: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            dma_maps: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            doorbells: AtomicU64::new(0),
            doorbell_ns: AtomicU64::new(0),
            mark_ns: AtomicU64::new(u64::MAX),
            mark_count: AtomicU64::new(0),
            counters: Mutex::new(Counters::default()),
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let load = |a: &[AtomicU64; METERED_REGIONS]| {
            std::array::from_fn(|i| a[i].load(Ordering::Acquire))
        };
        MetricsSnapshot {
            region_reads: load(&self.region_reads),
            region_writes: load(&self.region_writes),
            doorbell_writes: self.doorbell_writes.load(Ordering::Acquire),
            set_irqs: self.set_irqs.load(Ordering::Acquire),
            fd_events: self.fd_events.load(Ordering::Acquire),
            resets: self.resets.load(Ordering::Acquire),
            dma_maps: self.dma_maps.load(Ordering::Acquire),
            disconnects: self.disconnects.load(Ordering::Acquire),
            device: self.device_counters(),
        }
    }

    /// The device's counters after the last message or event.
    pub fn device_counters(&self) -> Counters {
        *self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Doorbells the device has counted (ioeventfd and trapped), updated on the server thread
    /// as soon as it handled them.
    pub fn doorbells(&self) -> u64 {
        self.doorbells.load(Ordering::Acquire)
    }

    /// When the doorbell count last changed (server thread clock), if it ever did.
    pub fn doorbell_changed_at(&self) -> Option<Instant> {
        match self.doorbell_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }

    /// Starts watching for the next change of the doorbell count: the server thread records
    /// its time and the count it reached ([`ServerMetrics::doorbell_mark`]).
    pub fn arm_doorbell_mark(&self) {
        self.mark_ns.store(0, Ordering::Release);
    }

    /// The first doorbell change since [`ServerMetrics::arm_doorbell_mark`]: when (server
    /// thread clock) and the count reached then.
    pub fn doorbell_mark(&self) -> Option<(Instant, u64)> {
        match self.mark_ns.load(Ordering::Acquire) {
            0 | u64::MAX => None,
            ns => Some((
                self.base + Duration::from_nanos(ns),
                self.mark_count.load(Ordering::Acquire),
            )),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::AcqRel);
    }

    fn publish(&self, c: Counters) {
        if self.doorbells.load(Ordering::Relaxed) != c.doorbells {
            let ns = u64::try_from(self.base.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1);
            if self.mark_ns.load(Ordering::Acquire) == 0 {
                self.mark_count.store(c.doorbells, Ordering::Release);
                self.mark_ns.store(ns, Ordering::Release);
            }
            // Time first: a reader that sees the new count also sees its time.
            self.doorbell_ns.store(ns, Ordering::Release);
            self.doorbells.store(c.doorbells, Ordering::Release);
        }
        *self.counters.lock().unwrap_or_else(PoisonError::into_inner) = c;
    }
}

/// Shared between the test and the server thread: the hook queue and its wake-up eventfd.
#[derive(Debug)]
struct Hooks {
    queue: Mutex<VecDeque<HookRequest>>,
    wake: EventFd,
    events: Mutex<Sender<HookEvent>>,
}

/// [`IrqbridgeDevice`] with message metering and server-thread hooks; see the
/// [module documentation](self).
pub struct MeteredDevice {
    inner: IrqbridgeDevice,
    metrics: Arc<ServerMetrics>,
    hooks: Arc<Hooks>,
    /// Start time of an INTx pulse waiting for its unmask.
    pulse: Option<Instant>,
}

impl fmt::Debug for MeteredDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeteredDevice")
            .field("inner", &self.inner)
            .field("pulse", &self.pulse)
            .finish_non_exhaustive()
    }
}

impl MeteredDevice {
    fn publish(&self) {
        self.metrics.publish(self.inner.counters());
    }

    fn send_event(&self, kind: HookEventKind, started: Instant, finished: Instant) {
        let tx = self
            .hooks
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // The receiver may be gone at shutdown; nothing to report to then.
        let _ = tx.send(HookEvent {
            kind,
            started,
            finished,
        });
    }

    fn run_hooks(&mut self) {
        // Consume the wake-up first so that a request queued meanwhile wakes the loop again.
        let _ = self.hooks.wake.read();
        loop {
            let next = self
                .hooks
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            let Some(req) = next else { break };
            match req {
                HookRequest::MsixFire { vector } => {
                    let started = Instant::now();
                    let kind = match self.inner.msix_fire(vector) {
                        Ok(d) => HookEventKind::MsixFired {
                            vector,
                            sent: d == irqbridge_core::Delivery::Sent,
                        },
                        Err(e) => {
                            log::warn!("hook: MSI-X fire of vector {vector} failed: {e}");
                            HookEventKind::Failed
                        }
                    };
                    self.send_event(kind, started, started);
                }
                HookRequest::IntxPulse => {
                    let started = Instant::now();
                    let r = self
                        .inner
                        .intx_set_level(INTX_SOURCE_CONTROL, true)
                        .and_then(|_| self.inner.intx_set_level(INTX_SOURCE_CONTROL, false));
                    match r {
                        Ok(_) => self.pulse = Some(started),
                        Err(e) => {
                            log::warn!("hook: INTx pulse failed: {e}");
                            self.send_event(HookEventKind::Failed, started, started);
                        }
                    }
                }
            }
        }
        self.check_pulse();
    }

    /// Reports a pending INTx pulse once the line is unmasked again.
    fn check_pulse(&mut self) {
        let Some(started) = self.pulse else { return };
        let mut status = [0u8; 4];
        if self
            .inner
            .region_read(REGION_BAR0, REG_INTX_STATUS, &mut status)
            .is_ok()
            && u32::from_le_bytes(status) & INTX_STATUS_MASKED == 0
        {
            self.pulse = None;
            self.send_event(HookEventKind::IntxReady, started, Instant::now());
        }
    }
}

impl VfioUserDevice for MeteredDevice {
    fn device_info(&self) -> DeviceInfo {
        self.inner.device_info()
    }

    fn region_info(&self, index: u32) -> RegionInfo<'_> {
        self.inner.region_info(index)
    }

    fn region_io_fds(&self, index: u32) -> Vec<IoFd<'_>> {
        self.inner.region_io_fds(index)
    }

    fn irq_info(&self, index: u32) -> IrqInfo {
        self.inner.irq_info(index)
    }

    fn set_irqs(&mut self, req: SetIrqs) -> std::result::Result<(), Errno> {
        ServerMetrics::bump(&self.metrics.set_irqs);
        let r = self.inner.set_irqs(req);
        self.publish();
        r
    }

    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> std::result::Result<(), Errno> {
        if let Some(c) = self.metrics.region_reads.get(index as usize) {
            ServerMetrics::bump(c);
        }
        let r = self.inner.region_read(index, offset, data);
        self.publish();
        r
    }

    fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<(), Errno> {
        if let Some(c) = self.metrics.region_writes.get(index as usize) {
            ServerMetrics::bump(c);
        }
        if index == REGION_BAR0 && offset == REG_DOORBELL {
            ServerMetrics::bump(&self.metrics.doorbell_writes);
        }
        let r = self.inner.region_write(index, offset, data);
        self.publish();
        self.check_pulse();
        r
    }

    fn reset(&mut self) -> std::result::Result<(), Errno> {
        ServerMetrics::bump(&self.metrics.resets);
        let r = self.inner.reset();
        self.publish();
        r
    }

    fn client_disconnected(&mut self) {
        ServerMetrics::bump(&self.metrics.disconnects);
        self.inner.client_disconnected();
        self.pulse = None;
        self.publish();
    }

    fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
        let mut fds = self.inner.poll_fds();
        // SAFETY: the eventfd is owned by `self.hooks`, which `self` keeps alive for at least
        // the lifetime of the returned borrow (tied to `&self`).
        let hook = unsafe { BorrowedFd::borrow_raw(self.hooks.wake.as_raw_fd()) };
        fds.push((hook, TOKEN_HOOK));
        fds
    }

    fn handle_fd_event(&mut self, token: u64) {
        if token == TOKEN_HOOK {
            self.run_hooks();
            return;
        }
        ServerMetrics::bump(&self.metrics.fd_events);
        self.inner.handle_fd_event(token);
        self.publish();
        self.check_pulse();
    }

    fn dma_map(&mut self, iova: u64, size: u64, fd: Option<&OwnedFd>) {
        ServerMetrics::bump(&self.metrics.dma_maps);
        self.inner.dma_map(iova, size, fd);
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) {
        self.inner.dma_unmap(iova, size);
    }
}

/// A private temporary directory, removed (with its contents) on drop.
#[derive(Debug)]
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// Creates `irqbridge-TAG-PID-N` under `$XDG_RUNTIME_DIR` or the temporary directory.
    pub(crate) fn new(tag: &str) -> Result<TempDir> {
        use std::sync::atomic::AtomicU32;
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        for _ in 0..16 {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("irqbridge-{tag}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(TempDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::Io(e)),
            }
        }
        Err(Error::InvalidArgument(format!(
            "no free temporary directory name under {}",
            base.display()
        )))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            log::debug!("removing {}: {e}", self.0.display());
        }
    }
}

/// The device server thread; see the [module documentation](self). Dropping it stops the
/// thread and removes the socket.
pub struct DeviceServer {
    thread: Option<JoinHandle<Result<()>>>,
    stop: StopHandle,
    path: PathBuf,
    metrics: Arc<ServerMetrics>,
    hooks: Arc<Hooks>,
    events: Mutex<Receiver<HookEvent>>,
    config: DeviceConfig,
    _dir: TempDir,
}

impl fmt::Debug for DeviceServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceServer")
            .field("path", &self.path)
            .field("config", &self.config)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl DeviceServer {
    /// Creates the device and starts serving it on a fresh socket.
    ///
    /// # Errors
    ///
    /// [`Error::Device`] for a bad configuration, [`Error::Server`] if the socket cannot be
    /// bound, [`Error::Io`] for the temporary directory, the hook eventfd or the thread.
    pub fn start(config: DeviceConfig) -> Result<DeviceServer> {
        Self::start_with(config, None)
    }

    /// As [`DeviceServer::start`], with the server thread pinned to `cpu` (if given).
    ///
    /// # Errors
    ///
    /// As [`DeviceServer::start`].
    pub fn start_with(config: DeviceConfig, cpu: Option<usize>) -> Result<DeviceServer> {
        let dir = TempDir::new("srv")?;
        let path = dir.0.join("vfio-user.sock");
        let device = IrqbridgeDevice::new(config).map_err(Error::Device)?;
        let mut server = Server::bind(&path).map_err(Error::Server)?;
        let stop = server.stop_handle();
        let metrics = Arc::new(ServerMetrics::new());
        let (tx, rx) = mpsc::channel();
        let hooks = Arc::new(Hooks {
            queue: Mutex::new(VecDeque::new()),
            wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Io)?,
            events: Mutex::new(tx),
        });
        let mut dev = MeteredDevice {
            inner: device,
            metrics: Arc::clone(&metrics),
            hooks: Arc::clone(&hooks),
            pulse: None,
        };
        dev.publish();
        let thread = thread::Builder::new()
            .name("irqbridge-server".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    crate::bench::pin_current_thread(cpu)?;
                }
                server.run(&mut dev).map_err(Error::Server)
            })
            .map_err(Error::Io)?;
        Ok(DeviceServer {
            thread: Some(thread),
            stop,
            path,
            metrics,
            hooks,
            events: Mutex::new(rx),
            config,
            _dir: dir,
        })
    }

    /// The socket the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// The device configuration.
    pub fn device_config(&self) -> &DeviceConfig {
        &self.config
    }

    /// The live message counters.
    pub fn metrics(&self) -> &Arc<ServerMetrics> {
        &self.metrics
    }

    /// Whether the server thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Queues `req` for the server thread and wakes it.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the wake-up eventfd cannot be written.
    pub fn hook(&self, req: HookRequest) -> Result<()> {
        self.hooks
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(req);
        self.hooks.wake.write(1).map_err(Error::Io)
    }

    /// The next hook report, waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if none arrives in time.
    pub fn next_event(&self, timeout: Duration) -> Result<HookEvent> {
        let rx = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        match rx.recv_timeout(timeout) {
            Ok(ev) => Ok(ev),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout {
                what: "a report from the device server thread".into(),
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(Error::VcpuStopped(
                "the device server thread has ended".into(),
            )),
        }
    }

    /// Drops reports nobody waited for.
    pub fn drain_events(&self) {
        let rx = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        while rx.try_recv().is_ok() {}
    }

    /// Stops the server thread and returns how its loop ended.
    ///
    /// # Errors
    ///
    /// The loop's error, or [`Error::InvalidArgument`] if the thread panicked.
    pub fn stop(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        if let Err(e) = self.stop.stop() {
            log::warn!("stopping the device server: {e}");
        }
        match thread.join() {
            Ok(r) => r,
            Err(_) => Err(Error::InvalidArgument(
                "the device server thread panicked".into(),
            )),
        }
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("device server: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqbridge_kvm::client::{Client, ClientConfig};
    use irqbridge_vfio_user::pci::regs::{
        MSIX_CAP_OFFSET, MSIX_CONTROL_ENABLE, REG_INTX_ASSERT, REGION_CONFIG,
    };
    use irqbridge_vfio_user::proto::{
        VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_INTX_IRQ_INDEX,
        VFIO_PCI_MSIX_IRQ_INDEX,
    };

    const WAIT: Duration = Duration::from_secs(5);

    fn connect(server: &DeviceServer) -> Client {
        Client::connect(server.socket_path(), &ClientConfig::default()).unwrap()
    }

    fn fd(e: &EventFd) -> BorrowedFd<'_> {
        irqbridge_kvm::eventfd_as_fd(e)
    }

    #[test]
    fn meters_messages_and_trapped_doorbells() {
        let server = DeviceServer::start(DeviceConfig::default()).unwrap();
        let mut client = connect(&server);
        let before = server.metrics().snapshot();
        client
            .region_write(REGION_BAR0, REG_DOORBELL, &1u32.to_le_bytes())
            .unwrap();
        let mut v = [0u8; 4];
        client
            .region_read(REGION_BAR0, REG_INTX_STATUS, &mut v)
            .unwrap();
        let after = server.metrics().snapshot();
        assert_eq!(after.region_writes[0] - before.region_writes[0], 1);
        assert_eq!(after.region_reads[0] - before.region_reads[0], 1);
        assert_eq!(after.doorbell_writes - before.doorbell_writes, 1);
        assert_eq!(after.device.doorbells, 1);
        assert_eq!(server.metrics().doorbells(), 1);
        assert!(server.metrics().doorbell_changed_at().is_some());
        assert_eq!(after.region_messages() - before.region_messages(), 2);
    }

    #[test]
    fn doorbell_ioeventfd_is_counted_without_messages() {
        let server = DeviceServer::start(DeviceConfig::default()).unwrap();
        let mut client = connect(&server);
        let fds = client.region_io_fds(REGION_BAR0).unwrap();
        assert_eq!(fds.len(), 1);
        assert_eq!(fds[0].offset, REG_DOORBELL);
        let before = server.metrics().snapshot();
        server.metrics().arm_doorbell_mark();
        assert_eq!(server.metrics().doorbell_mark(), None);
        let mut doorbell = std::fs::File::from(fds.into_iter().next().unwrap().fd);
        // An eventfd write adds the 8-byte value to the counter.
        std::io::Write::write_all(&mut doorbell, &3u64.to_ne_bytes()).unwrap();
        let deadline = Instant::now() + WAIT;
        while server.metrics().doorbells() < 3 {
            assert!(Instant::now() < deadline, "doorbells not counted");
            thread::sleep(Duration::from_millis(1));
        }
        let after = server.metrics().snapshot();
        assert_eq!(after.device.doorbells, 3);
        assert_eq!(after.doorbell_writes, before.doorbell_writes);
        assert_eq!(after.region_writes, before.region_writes);
        assert!(after.fd_events > before.fd_events);
        let (_, count) = server.metrics().doorbell_mark().unwrap();
        assert_eq!(count, 3);
    }

    #[test]
    fn msix_hook_reports_delivery_from_the_server_thread() {
        let server = DeviceServer::start(DeviceConfig::default()).unwrap();
        let mut client = connect(&server);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        client
            .set_irq_eventfds(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                &[Some(fd(&irq))],
            )
            .unwrap();
        // MSI-X disabled: the event is held in the PBA.
        server.hook(HookRequest::MsixFire { vector: 0 }).unwrap();
        let ev = server.next_event(WAIT).unwrap();
        assert_eq!(
            ev.kind,
            HookEventKind::MsixFired {
                vector: 0,
                sent: false
            }
        );
        assert!(irq.read().is_err(), "nothing signalled while disabled");
        // Enabling MSI-X delivers the pending event once; the next fire is sent directly.
        let control = (u32::from(MSIX_CONTROL_ENABLE)) << 16;
        let mut head = [0u8; 4];
        client
            .region_read(REGION_CONFIG, MSIX_CAP_OFFSET, &mut head)
            .unwrap();
        let head = u32::from_le_bytes(head) & 0xffff | control;
        client
            .region_write(REGION_CONFIG, MSIX_CAP_OFFSET, &head.to_le_bytes())
            .unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        server.hook(HookRequest::MsixFire { vector: 0 }).unwrap();
        let ev = server.next_event(WAIT).unwrap();
        assert_eq!(
            ev.kind,
            HookEventKind::MsixFired {
                vector: 0,
                sent: true
            }
        );
        assert_eq!(ev.started, ev.finished);
        assert_eq!(irq.read().unwrap(), 1);
        // A bad vector is reported as a failure, not a panic.
        server.hook(HookRequest::MsixFire { vector: 999 }).unwrap();
        assert_eq!(server.next_event(WAIT).unwrap().kind, HookEventKind::Failed);
        assert!(server.is_running());
    }

    #[test]
    fn intx_pulse_reports_ready_after_the_unmask() {
        let server = DeviceServer::start(DeviceConfig::default()).unwrap();
        let mut client = connect(&server);
        let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
        let unmask = EventFd::new(EFD_NONBLOCK).unwrap();
        client
            .set_irq_eventfds(
                VFIO_PCI_INTX_IRQ_INDEX,
                VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                &[Some(fd(&trigger))],
            )
            .unwrap();
        client
            .set_irq_eventfds(
                VFIO_PCI_INTX_IRQ_INDEX,
                VFIO_IRQ_SET_ACTION_UNMASK,
                0,
                &[Some(fd(&unmask))],
            )
            .unwrap();
        for _ in 0..3 {
            server.hook(HookRequest::IntxPulse).unwrap();
            // The device triggers once and waits, masked, for the unmask.
            let deadline = Instant::now() + WAIT;
            loop {
                match trigger.read() {
                    Ok(n) => {
                        assert_eq!(n, 1);
                        break;
                    }
                    Err(_) => assert!(Instant::now() < deadline, "no trigger"),
                }
                thread::sleep(Duration::from_micros(200));
            }
            unmask.write(1).unwrap();
            let ev = server.next_event(WAIT).unwrap();
            assert_eq!(ev.kind, HookEventKind::IntxReady);
            assert!(ev.finished >= ev.started);
        }
        assert_eq!(server.metrics().device_counters().intx_triggers, 3);
        // A guest-side assert (through a message) still works next to the hooks.
        client
            .region_write(REGION_BAR0, REG_INTX_ASSERT, &1u32.to_le_bytes())
            .unwrap();
        assert_eq!(trigger.read().unwrap(), 1);
    }

    #[test]
    fn stop_ends_the_thread_and_removes_the_socket() {
        let mut server = DeviceServer::start(DeviceConfig::default()).unwrap();
        let path = server.socket_path().to_path_buf();
        assert!(path.exists());
        server.stop().unwrap();
        assert!(!server.is_running());
        assert!(!path.exists());
        drop(server);
        assert!(!path.parent().unwrap().exists());
    }
}
