//! The irqbridge PCI test device served over vfio-user (`docs/device-abi.md`).
//!
//! [`IrqbridgeDevice`] implements [`VfioUserDevice`] on top of the protocol-free models of
//! `irqbridge-core`:
//!
//! - an [`IntxLine`] (INTx with VFIO's auto-mask / unmask semantics, COMMAND bit 10 and
//!   suppression while MSI-X is enabled), whose trigger and unmask (KVM resample) eventfds come
//!   from `SET_IRQS(INTX)`;
//! - an [`Msix`] function (table and PBA in BAR2, per-vector trigger eventfds from
//!   `SET_IRQS(MSIX)`, Message Control in the config space);
//! - [`EventChannels`] over a shared page ([`EventChannelPage`], a memfd) that the client maps
//!   as BAR4.
//!
//! BAR0 holds control registers that let the guest (or a test harness behind the VMM) raise
//! every kind of interrupt and read counters; its DOORBELL register is offered to the VMM as an
//! ioeventfd. The same operations are available to the host through the control socket
//! ([`crate::control`]).
//!
//! Lifecycle: [`IrqbridgeDevice::new`] builds the power-on state; the vfio-user server calls the
//! trait methods for each message; `DEVICE_RESET` returns to the power-on state keeping eventfd
//! bindings and counters; a client disconnect drops every fd the client gave and keeps the
//! device state. [`IrqbridgeDevice::snapshot`] / [`IrqbridgeDevice::restore`] save and load
//! the whole guest-visible state.

#![deny(missing_docs)]

mod config;
pub mod regs;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use irqbridge_core::{
    Delivery, EventChannels, EvtchnState, IntxLine, IntxState, Msix, MsixState, Notifier,
    PortState, SendOutcome,
};
use log::{debug, warn};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::control::{ControlRequest, ControlServer};
use crate::device::{
    DeviceInfo, Errno, IoFd, IrqAction, IrqData, IrqInfo, RegionInfo, SetIrqs, SparseArea,
    VfioUserDevice,
};
use crate::shmem::EventChannelPage;
use config::ConfigSpace;
use regs::*;

// The VFIO flag values come from the wire format, under the short names used here.
use crate::proto::{
    VFIO_DEVICE_FLAGS_PCI as DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET as DEVICE_FLAGS_RESET,
    VFIO_IRQ_INFO_AUTOMASKED as IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD as IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE as IRQ_INFO_MASKABLE, VFIO_REGION_INFO_FLAG_MMAP as REGION_MMAP,
    VFIO_REGION_INFO_FLAG_READ as REGION_READ, VFIO_REGION_INFO_FLAG_WRITE as REGION_WRITE,
};

/// Poll token of the doorbell ioeventfd.
const TOKEN_DOORBELL: u64 = 1;
/// Poll token of the INTx unmask (resample) eventfd.
const TOKEN_INTX_UNMASK: u64 = 2;
/// Poll tokens at and above this value belong to the control server.
const TOKEN_CONTROL_BASE: u64 = 1 << 32;

/// Upper bound of reads per unmask-eventfd event, so a peer writing in a loop cannot hold the
/// server thread.
const MAX_DRAIN_READS: usize = 64;

/// Default number of MSI-X vectors.
pub const DEFAULT_MSIX_VECTORS: u16 = 16;
/// Largest number of MSI-X vectors.
pub const MAX_MSIX_VECTORS: u16 = irqbridge_core::msix::MSIX_MAX_VECTORS;
/// Default number of event-channel ports.
pub const DEFAULT_EVTCHN_PORTS: u32 = irqbridge_core::evtchn::EVTCHN_DEFAULT_PORTS;
/// Largest number of event-channel ports.
pub const MAX_EVTCHN_PORTS: u32 = irqbridge_core::evtchn::EVTCHN_MAX_PORTS;

/// Errors of the PCI device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A [`DeviceConfig`] field is out of range.
    #[error("Invalid device configuration: {0}.")]
    InvalidConfig(String),
    /// The event-channel page could not be created.
    #[error("Failed to create the event-channel page.")]
    SharedMemory(#[source] io::Error),
    /// The doorbell eventfd could not be created.
    #[error("Failed to create the doorbell eventfd.")]
    Doorbell(#[source] io::Error),
    /// An interrupt model rejected an operation (bad vector or port, failed notifier write).
    #[error("Interrupt model operation failed.")]
    Model(#[from] irqbridge_core::Error),
    /// INTx was configured off (`intx: false`).
    #[error("The device has no INTx pin.")]
    NoIntx,
    /// A snapshot does not fit this device.
    #[error("Snapshot does not fit this device: {0}.")]
    SnapshotMismatch(String),
}

/// Build-time configuration of an [`IrqbridgeDevice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// MSI-X table size, 1..=2048 (default 16).
    pub msix_vectors: u16,
    /// Number of event-channel ports, 1..=4096 (default 1024).
    pub evtchn_ports: u32,
    /// Whether the device has an INTx pin (INTERRUPT_PIN 1 and INTx IRQ count 1; default true).
    pub intx: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            msix_vectors: DEFAULT_MSIX_VECTORS,
            evtchn_ports: DEFAULT_EVTCHN_PORTS,
            intx: true,
        }
    }
}

impl DeviceConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    ///
    /// [`DeviceError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), DeviceError> {
        if !(1..=MAX_MSIX_VECTORS).contains(&self.msix_vectors) {
            return Err(DeviceError::InvalidConfig(format!(
                "msix_vectors {} is not in 1..={MAX_MSIX_VECTORS}",
                self.msix_vectors
            )));
        }
        if !(1..=MAX_EVTCHN_PORTS).contains(&self.evtchn_ports) {
            return Err(DeviceError::InvalidConfig(format!(
                "evtchn_ports {} is not in 1..={MAX_EVTCHN_PORTS}",
                self.evtchn_ports
            )));
        }
        Ok(())
    }
}

/// Device counters (the BAR0 `CNT_*` registers hold their low 32 bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// INTx trigger eventfd writes by the line model.
    pub intx_triggers: u64,
    /// Unmasks that reached a masked line.
    pub intx_unmasks: u64,
    /// MSI-X vector eventfd writes.
    pub msix_triggers: u64,
    /// MSI-X events that set a PBA bit instead of firing.
    pub msix_pending: u64,
    /// MSI-X events on an unmasked vector without an eventfd (dropped).
    pub msix_dropped: u64,
    /// Event-channel sends.
    pub evtchn_sends: u64,
    /// Upcall vectors fired by event channels.
    pub evtchn_upcalls: u64,
    /// Event-channel sends to closed ports.
    pub evtchn_dropped: u64,
    /// Doorbells seen, through the ioeventfd or trapped writes.
    pub doorbells: u64,
    /// Guest accesses that were ignored (bad offset, width or value).
    pub bad_accesses: u64,
}

/// The whole guest-visible state of an [`IrqbridgeDevice`]; eventfd bindings are not part of
/// it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// ABI version of the device that took the snapshot.
    pub abi_version: u32,
    /// Configuration of the device; a snapshot only fits a device with the same one.
    pub config: DeviceConfig,
    /// The 4 KiB config-space image (without the live STATUS and Message Control bits, which
    /// are in the model states).
    pub config_space: Vec<u8>,
    /// INTx line state.
    pub intx: IntxState,
    /// MSI-X state.
    pub msix: MsixState,
    /// Event-channel state, including the shared page.
    pub evtchn: EvtchnState,
    /// Doorbell counter.
    pub doorbells: u64,
    /// Bad-access counter.
    pub bad_accesses: u64,
    /// Port selected by `EVTCHN_QUERY`.
    pub evtchn_query: u32,
}

/// The irqbridge PCI test device.
#[derive(Debug)]
pub struct IrqbridgeDevice {
    config: DeviceConfig,
    cfg: ConfigSpace,
    intx: IntxLine,
    /// Our copy of the INTx trigger, for loopback `SET_IRQS(INTX, TRIGGER|NONE)`.
    intx_trigger: Option<Arc<EventFd>>,
    intx_unmask: Option<EventFd>,
    msix: Msix,
    page: Arc<EventChannelPage>,
    evtchn: EventChannels,
    doorbell: EventFd,
    err_trigger: Option<EventFd>,
    req_trigger: Option<EventFd>,
    doorbells: u64,
    bad_accesses: u64,
    evtchn_query: u32,
    control: Option<ControlServer>,
}

/// Polls one fd without blocking and returns its `revents`.
pub(crate) fn poll_now(fd: BorrowedFd<'_>) -> io::Result<i16> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, initialised pollfd for the duration of the call; timeout 0
    // never blocks.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd.revents)
}

/// Borrows the fd of an [`EventFd`] (vmm-sys-util's `EventFd` has no `AsFd`).
pub(crate) fn eventfd_fd(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the raw fd belongs to `fd`, which stays open for the lifetime of the returned
    // borrow because the borrow is tied to `&EventFd`.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

fn le32(data: &[u8]) -> Option<u32> {
    let bytes: [u8; 4] = data.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// Flags of a DATA_NONE / DATA_BOOL request, one per sub-index of `[start, start + count)`.
fn selection(data: &IrqData, count: u32) -> Vec<bool> {
    match data {
        IrqData::Bool(flags) => flags.clone(),
        // The server checked `count` against the IRQ info (at most 2048).
        _ => vec![true; count.min(u32::from(MAX_MSIX_VECTORS)) as usize],
    }
}

impl IrqbridgeDevice {
    /// A device in its power-on state.
    ///
    /// # Errors
    ///
    /// [`DeviceError::InvalidConfig`] for a bad configuration, [`DeviceError::SharedMemory`] or
    /// [`DeviceError::Doorbell`] if a kernel object could not be created.
    pub fn new(config: DeviceConfig) -> Result<Self, DeviceError> {
        config.validate()?;
        let page = Arc::new(EventChannelPage::new().map_err(DeviceError::SharedMemory)?);
        let upcalls = config
            .msix_vectors
            .min(irqbridge_core::evtchn::EVTCHN_MAX_UPCALLS);
        let evtchn = EventChannels::new(config.evtchn_ports, upcalls, page.clone())?;
        Ok(IrqbridgeDevice {
            config,
            cfg: ConfigSpace::new(config.msix_vectors, config.intx),
            intx: IntxLine::new(),
            intx_trigger: None,
            intx_unmask: None,
            msix: Msix::new(config.msix_vectors)?,
            page,
            evtchn,
            doorbell: EventFd::new(EFD_NONBLOCK).map_err(DeviceError::Doorbell)?,
            err_trigger: None,
            req_trigger: None,
            doorbells: 0,
            bad_accesses: 0,
            evtchn_query: 0,
            control: None,
        })
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// Attaches the control socket: its listening and client fds join
    /// [`VfioUserDevice::poll_fds`] and its requests run on the server thread. Replaces (and
    /// drops) a previously attached one.
    pub fn attach_control(&mut self, control: ControlServer) {
        self.control = Some(control);
    }

    /// The attached control server, if any.
    pub fn control(&self) -> Option<&ControlServer> {
        self.control.as_ref()
    }

    /// Detaches and returns the control server.
    pub fn detach_control(&mut self) -> Option<ControlServer> {
        self.control.take()
    }

    /// The event-channel page (BAR4) as the device sees it.
    pub fn evtchn_page(&self) -> &EventChannelPage {
        &self.page
    }

    /// Current counters.
    pub fn counters(&self) -> Counters {
        let i = self.intx.stats();
        let m = self.msix.stats();
        let e = self.evtchn.stats();
        Counters {
            intx_triggers: i.triggers,
            intx_unmasks: i.unmasks,
            msix_triggers: m.triggers,
            msix_pending: m.pending_sets,
            msix_dropped: m.dropped,
            evtchn_sends: e.sends,
            evtchn_upcalls: e.upcalls,
            evtchn_dropped: e.dropped,
            doorbells: self.doorbells,
            bad_accesses: self.bad_accesses,
        }
    }

    /// Drives INTx source `source` (0 is the guest's `INTX_ASSERT`, 1 the control socket; up
    /// to 31) high or low. Returns whether the trigger eventfd was written.
    ///
    /// # Errors
    ///
    /// [`DeviceError::NoIntx`] without an INTx pin; [`DeviceError::Model`] for a bad source or
    /// a failed trigger write.
    pub fn intx_set_level(&mut self, source: u32, level: bool) -> Result<bool, DeviceError> {
        if !self.config.intx {
            return Err(DeviceError::NoIntx);
        }
        if level {
            Ok(self.intx.assert(source)?)
        } else {
            self.intx.deassert(source)?;
            Ok(false)
        }
    }

    /// An event on MSI-X vector `vector` (sent, or pending if masked).
    ///
    /// # Errors
    ///
    /// [`DeviceError::Model`] for a bad vector or a failed eventfd write.
    pub fn msix_fire(&mut self, vector: u16) -> Result<Delivery, DeviceError> {
        Ok(self.msix.fire(vector)?)
    }

    /// Device → guest event on `port`; fires the port's upcall vector when the protocol says
    /// so.
    ///
    /// # Errors
    ///
    /// [`DeviceError::Model`] for a bad port or a failed eventfd write.
    pub fn evtchn_send(&mut self, port: u32) -> Result<SendOutcome, DeviceError> {
        let outcome = self.evtchn.send(port)?;
        if let SendOutcome::Upcall { vector } = outcome {
            self.msix.fire(vector)?;
        }
        Ok(outcome)
    }

    /// Opens `port` and binds it to upcall vector `vector`; if the port is pending and not
    /// masked the upcall is raised now.
    ///
    /// # Errors
    ///
    /// [`DeviceError::Model`] for a bad port or vector (at most 64 upcall vectors, and fewer
    /// than the MSI-X table size), or a failed eventfd write.
    pub fn evtchn_bind(&mut self, port: u32, vector: u16) -> Result<(), DeviceError> {
        self.evtchn.bind(port, vector)?;
        if let Some(v) = self.evtchn.retrigger(port)? {
            self.msix.fire(v)?;
        }
        Ok(())
    }

    /// `EVTCHN_UNMASK`: clears the port's mask bit and raises its upcall if it is pending.
    ///
    /// # Errors
    ///
    /// [`DeviceError::Model`] for a bad port or a failed eventfd write.
    pub fn evtchn_unmask(&mut self, port: u32) -> Result<(), DeviceError> {
        if let Some(v) = self.evtchn.unmask(port)? {
            self.msix.fire(v)?;
        }
        Ok(())
    }

    /// The guest-visible state.
    pub fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot {
            abi_version: ABI_VERSION,
            config: self.config,
            config_space: self.cfg.bytes().to_vec(),
            intx: self.intx.snapshot(),
            msix: self.msix.snapshot(),
            evtchn: self.evtchn.snapshot(),
            doorbells: self.doorbells,
            bad_accesses: self.bad_accesses,
            evtchn_query: self.evtchn_query,
        }
    }

    /// Loads a state taken with [`snapshot`](Self::snapshot) on a device with the same
    /// configuration. Eventfd bindings are kept; nothing is signalled.
    ///
    /// # Errors
    ///
    /// [`DeviceError::SnapshotMismatch`] if the snapshot does not fit (the device is then
    /// unchanged), [`DeviceError::Model`] if a model rejects its part.
    pub fn restore(&mut self, snap: &DeviceSnapshot) -> Result<(), DeviceError> {
        if snap.abi_version != ABI_VERSION {
            return Err(DeviceError::SnapshotMismatch(format!(
                "ABI version {} is not {ABI_VERSION}",
                snap.abi_version
            )));
        }
        if snap.config != self.config {
            return Err(DeviceError::SnapshotMismatch(format!(
                "configuration {:?} differs from {:?}",
                snap.config, self.config
            )));
        }
        if snap.config_space.len() != CONFIG_SPACE_SIZE as usize {
            return Err(DeviceError::SnapshotMismatch(format!(
                "config space has {} bytes",
                snap.config_space.len()
            )));
        }
        // Validate every part against a scratch copy first, so a bad snapshot changes nothing.
        let mut msix = Msix::new(self.config.msix_vectors)?;
        msix.restore(&snap.msix)?;
        let scratch = irqbridge_core::evtchn::zeroed_page();
        let mut evtchn = EventChannels::new(
            self.evtchn.num_ports(),
            self.evtchn.num_upcalls(),
            Arc::clone(&scratch),
        )?;
        evtchn.restore(&snap.evtchn)?;

        self.msix.restore(&snap.msix)?;
        self.evtchn.restore(&snap.evtchn)?;
        self.intx.restore(&snap.intx)?;
        self.cfg.restore(&snap.config_space);
        self.doorbells = snap.doorbells;
        self.bad_accesses = snap.bad_accesses;
        self.evtchn_query = snap.evtchn_query;
        Ok(())
    }

    /// Runs one control-socket request and builds its JSON reply (`{"ok":true,...}` or
    /// `{"ok":false,"error":"..."}`).
    pub fn control_request(&mut self, req: &ControlRequest) -> serde_json::Value {
        match self.control_exec(req) {
            Ok(serde_json::Value::Object(mut map)) => {
                map.insert("ok".into(), true.into());
                serde_json::Value::Object(map)
            }
            Ok(_) => serde_json::json!({ "ok": true }),
            Err(e) => serde_json::json!({ "ok": false, "error": e }),
        }
    }

    fn control_exec(&mut self, req: &ControlRequest) -> Result<serde_json::Value, String> {
        use serde_json::json;
        let chain = |e: DeviceError| error_chain(&e);
        let vector16 = |v: u32| u16::try_from(v).map_err(|_| format!("vector {v} is out of range"));
        match *req {
            ControlRequest::IntxAssert => {
                let fired = self
                    .intx_set_level(INTX_SOURCE_CONTROL, true)
                    .map_err(chain)?;
                Ok(json!({ "fired": fired }))
            }
            ControlRequest::IntxDeassert => {
                self.intx_set_level(INTX_SOURCE_CONTROL, false)
                    .map_err(chain)?;
                Ok(json!({}))
            }
            ControlRequest::MsixFire { vector } => {
                let d = self.msix_fire(vector16(vector)?).map_err(chain)?;
                let d = match d {
                    Delivery::Sent => "sent",
                    Delivery::Pending => "pending",
                    Delivery::NoNotifier => "no_notifier",
                };
                Ok(json!({ "delivery": d }))
            }
            ControlRequest::EvtchnSend { port } => {
                let o = self.evtchn_send(port).map_err(chain)?;
                let mut reply = json!({ "outcome": send_outcome_name(o) });
                if let SendOutcome::Upcall { vector } = o {
                    reply["vector"] = vector.into();
                }
                Ok(reply)
            }
            ControlRequest::EvtchnBind { port, vector } => {
                self.evtchn_bind(port, vector16(vector)?).map_err(chain)?;
                Ok(json!({}))
            }
            ControlRequest::Counters => Ok(json!({ "counters": self.counters() })),
            ControlRequest::Snapshot => {
                let s = serde_json::to_value(self.snapshot()).map_err(|e| e.to_string())?;
                Ok(json!({ "snapshot": s }))
            }
            ControlRequest::Reset => {
                self.reset_state();
                Ok(json!({}))
            }
        }
    }

    /// Back to the power-on state of docs/device-abi.md; bindings and counters survive.
    fn reset_state(&mut self) {
        self.cfg.reset();
        self.intx.reset();
        self.msix.reset();
        self.evtchn.reset();
        self.evtchn_query = 0;
    }

    fn bad(&mut self, what: std::fmt::Arguments<'_>) {
        self.bad_accesses = self.bad_accesses.wrapping_add(1);
        warn!("irqbridge-pci: ignored {what}");
    }

    fn log_model_error(what: &str, r: Result<(), DeviceError>) {
        if let Err(e) = r {
            warn!("irqbridge-pci: {what}: {}", error_chain(&e));
        }
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) {
        let control = MSIX_CAP_OFFSET + MSIX_CAP_CONTROL;
        let msg_ctl = self.message_control();
        for (i, out) in data.iter_mut().enumerate() {
            let Some(off) = offset.checked_add(i as u64) else {
                *out = 0;
                continue;
            };
            let mut b = self.cfg.byte(off);
            if off == PCI_STATUS && self.intx.level() {
                b |= PCI_STATUS_INTERRUPT as u8;
            } else if off == control {
                b = msg_ctl.to_le_bytes()[0];
            } else if off == control + 1 {
                b = msg_ctl.to_le_bytes()[1];
            }
            *out = b;
        }
    }

    fn message_control(&self) -> u16 {
        let mut v = self.config.msix_vectors.saturating_sub(1) & MSIX_CONTROL_TABLE_SIZE;
        if self.msix.enabled() {
            v |= MSIX_CONTROL_ENABLE;
        }
        if self.msix.function_masked() {
            v |= MSIX_CONTROL_FUNCTION_MASK;
        }
        v
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        let w = self.cfg.write(offset, data);
        if let Some((old, new)) = w.command {
            if (old ^ new) & PCI_COMMAND_INTX_DISABLE != 0 {
                let disable = new & PCI_COMMAND_INTX_DISABLE != 0;
                debug!("irqbridge-pci: COMMAND.10 = {disable}");
                let r = self.intx.set_intx_disable(disable).map(|_| ());
                Self::log_model_error("COMMAND write", r.map_err(Into::into));
            }
        }
        if let Some((value, mask)) = w.msix_control {
            let cur = self.message_control();
            let new = (cur & !mask) | (value & mask);
            let enable = new & MSIX_CONTROL_ENABLE != 0;
            let fmask = new & MSIX_CONTROL_FUNCTION_MASK != 0;
            if enable != self.msix.enabled() || fmask != self.msix.function_masked() {
                debug!("irqbridge-pci: MSI-X enable={enable} function_mask={fmask}");
                // Suppress INTx before MSI-X can fire; release it after MSI-X is off.
                if enable {
                    let r = self.intx.set_suppressed(true).map(|_| ());
                    Self::log_model_error("INTx suppression", r.map_err(Into::into));
                }
                let r = self.msix.write_control(enable, fmask);
                Self::log_model_error("MSI-X Message Control write", r.map_err(Into::into));
                if !enable {
                    let r = self.intx.set_suppressed(false).map(|_| ());
                    Self::log_model_error("INTx suppression", r.map_err(Into::into));
                }
            }
        }
    }

    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 || offset % 4 != 0 {
            self.bad(format_args!(
                "BAR0 read of {} bytes at {offset:#x}",
                data.len()
            ));
            return;
        }
        let c = self.counters();
        let lo = |v: u64| v as u32;
        let value = match offset {
            REG_MAGIC => MAGIC,
            REG_ABI_VERSION => ABI_VERSION,
            REG_FEATURES => {
                let intx = if self.config.intx { FEATURE_INTX } else { 0 };
                intx | FEATURE_MSIX | FEATURE_EVTCHN
            }
            REG_MSIX_VECTORS => u32::from(self.config.msix_vectors),
            REG_INTX_STATUS => {
                let mut v = 0;
                if self.intx.level() {
                    v |= INTX_STATUS_LEVEL;
                }
                if self.intx.masked() {
                    v |= INTX_STATUS_MASKED;
                }
                if self.intx.intx_disabled() {
                    v |= INTX_STATUS_DISABLED;
                }
                v
            }
            REG_DOORBELL_COUNT => lo(c.doorbells),
            REG_EVTCHN_PORTS => self.evtchn.num_ports(),
            REG_EVTCHN_STATUS => match self.evtchn.state(self.evtchn_query) {
                Ok(PortState::Closed) | Err(_) => EVTCHN_STATUS_CLOSED,
                Ok(PortState::Unbound) => EVTCHN_STATUS_UNBOUND,
                Ok(PortState::Bound { vector }) => EVTCHN_STATUS_BOUND | (u32::from(vector) << 16),
            },
            REG_CNT_INTX_TRIGGERS => lo(c.intx_triggers),
            REG_CNT_INTX_UNMASKS => lo(c.intx_unmasks),
            REG_CNT_MSIX_TRIGGERS => lo(c.msix_triggers),
            REG_CNT_MSIX_PENDING => lo(c.msix_pending),
            REG_CNT_EVTCHN_SENDS => lo(c.evtchn_sends),
            REG_CNT_EVTCHN_UPCALLS => lo(c.evtchn_upcalls),
            REG_CNT_BAD_ACCESSES => lo(c.bad_accesses),
            // Write-only registers read 0.
            REG_INTX_ASSERT | REG_INTX_DEASSERT | REG_MSIX_FIRE | REG_MSIX_MASK
            | REG_MSIX_UNMASK | REG_EVTCHN_SEND | REG_EVTCHN_BIND | REG_EVTCHN_UNBIND
            | REG_EVTCHN_CLOSE | REG_DOORBELL | REG_EVTCHN_UNMASK | REG_EVTCHN_QUERY => 0,
            _ => {
                self.bad(format_args!("BAR0 read at undefined offset {offset:#x}"));
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        let Some(value) = le32(data).filter(|_| offset % 4 == 0) else {
            self.bad(format_args!(
                "BAR0 write of {} bytes at {offset:#x}",
                data.len()
            ));
            return;
        };
        let result = match offset {
            REG_INTX_ASSERT | REG_INTX_DEASSERT => {
                let level = offset == REG_INTX_ASSERT;
                self.intx_set_level(INTX_SOURCE_GUEST, level).map(|_| ())
            }
            REG_MSIX_FIRE | REG_MSIX_MASK | REG_MSIX_UNMASK => {
                match u16::try_from(value)
                    .ok()
                    .filter(|v| *v < self.config.msix_vectors)
                {
                    None => Err(DeviceError::Model(irqbridge_core::Error::InvalidVector(
                        value,
                    ))),
                    Some(v) if offset == REG_MSIX_FIRE => self.msix_fire(v).map(|_| ()),
                    Some(v) => self
                        .msix
                        .set_entry_masked(v, offset == REG_MSIX_MASK)
                        .map_err(Into::into),
                }
            }
            REG_EVTCHN_SEND => self.evtchn_send(value).map(|_| ()),
            REG_EVTCHN_BIND => {
                let port = value & 0xffff;
                let vector = (value >> 16) as u16;
                self.evtchn_bind(port, vector)
            }
            REG_EVTCHN_UNBIND => self.evtchn.unbind(value).map_err(Into::into),
            REG_EVTCHN_CLOSE => self.evtchn.close(value).map_err(Into::into),
            REG_EVTCHN_UNMASK => self.evtchn_unmask(value),
            REG_EVTCHN_QUERY => {
                if value < self.evtchn.num_ports() {
                    self.evtchn_query = value;
                    Ok(())
                } else {
                    Err(DeviceError::Model(irqbridge_core::Error::InvalidPort(
                        value,
                    )))
                }
            }
            REG_DOORBELL => {
                self.doorbells = self.doorbells.wrapping_add(1);
                Ok(())
            }
            _ => {
                self.bad(format_args!(
                    "BAR0 write of {value:#x} to read-only or undefined offset {offset:#x}"
                ));
                return;
            }
        };
        match result {
            Ok(()) => {}
            // A failed eventfd write is the client's problem, not a bad guest access.
            Err(DeviceError::Model(irqbridge_core::Error::Notify(e))) => {
                warn!("irqbridge-pci: BAR0 write at {offset:#x}: interrupt delivery failed: {e}");
            }
            Err(e) => self.bad(format_args!(
                "BAR0 write of {value:#x} at {offset:#x}: {}",
                error_chain(&e)
            )),
        }
    }

    fn bar2_access_ok(offset: u64, len: usize, size: u64) -> bool {
        matches!(len, 4 | 8)
            && offset % len as u64 == 0
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= size)
    }

    fn bar2_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let table = msix_table_size(self.config.msix_vectors);
        let pba = msix_pba_offset(self.config.msix_vectors);
        let pba_size = self.msix.pba_size_bytes();
        if Self::bar2_access_ok(offset, data.len(), table) {
            self.msix.table_read(offset, data);
        } else if offset >= pba && Self::bar2_access_ok(offset - pba, data.len(), pba_size) {
            self.msix.pba_read(offset - pba, data);
        } else {
            self.bad(format_args!(
                "BAR2 read of {} bytes at {offset:#x}",
                data.len()
            ));
        }
    }

    fn bar2_write(&mut self, offset: u64, data: &[u8]) {
        let table = msix_table_size(self.config.msix_vectors);
        if Self::bar2_access_ok(offset, data.len(), table) {
            let r = self.msix.table_write(offset, data);
            Self::log_model_error("MSI-X table write", r.map_err(Into::into));
        } else {
            // PBA writes are ignored (read-only), like everything outside the table.
            self.bad(format_args!(
                "BAR2 write of {} bytes at {offset:#x}",
                data.len()
            ));
        }
    }

    fn set_intx_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        match (req.action, req.data) {
            (IrqAction::Trigger, IrqData::Eventfds(fds)) => {
                match fds.into_iter().next().flatten() {
                    Some(fd) => {
                        let fd = Arc::new(fd);
                        self.intx_trigger = Some(Arc::clone(&fd));
                        let r = self.intx.set_trigger(Some(fd as Arc<dyn Notifier>));
                        Self::log_model_error("INTx trigger bind", r.map_err(Into::into));
                    }
                    None => {
                        self.intx_trigger = None;
                        let _ = self.intx.set_trigger(None);
                    }
                }
                Ok(())
            }
            (IrqAction::Trigger, IrqData::None) if req.count == 0 => {
                self.intx.disable_index();
                self.intx_trigger = None;
                self.intx_unmask = None;
                Ok(())
            }
            (IrqAction::Trigger, data) => {
                if !selection(&data, req.count)
                    .first()
                    .copied()
                    .unwrap_or(false)
                {
                    return Ok(());
                }
                // Loopback, like the kernel's `vfio_send_intx_eventfd`: signal the trigger if
                // the index is enabled and not disabled by COMMAND.10; the mask is untouched.
                match &self.intx_trigger {
                    Some(t) if self.intx.is_enabled() && !self.intx.intx_disabled() => {
                        t.write(1).map_err(|e| {
                            warn!("irqbridge-pci: INTx loopback trigger failed: {e}");
                            libc::EIO
                        })
                    }
                    _ => Ok(()),
                }
            }
            (IrqAction::Mask, IrqData::Eventfds(_)) => Err(libc::ENOTTY),
            (IrqAction::Mask, data) => {
                if selection(&data, req.count)
                    .first()
                    .copied()
                    .unwrap_or(false)
                {
                    self.intx.mask();
                }
                Ok(())
            }
            (IrqAction::Unmask, IrqData::Eventfds(fds)) => {
                self.intx_unmask = fds.into_iter().next().flatten();
                Ok(())
            }
            (IrqAction::Unmask, data) => {
                if selection(&data, req.count)
                    .first()
                    .copied()
                    .unwrap_or(false)
                {
                    let r = self.intx.unmask().map(|_| ());
                    Self::log_model_error("INTx unmask", r.map_err(Into::into));
                }
                Ok(())
            }
        }
    }

    fn set_msix_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        let vectors = |i: usize| -> Result<u16, Errno> {
            u32::try_from(i)
                .ok()
                .and_then(|i| req.start.checked_add(i))
                .and_then(|v| u16::try_from(v).ok())
                .filter(|v| *v < self.config.msix_vectors)
                .ok_or(libc::EINVAL)
        };
        match (req.action, req.data) {
            (IrqAction::Trigger, IrqData::Eventfds(fds)) => {
                let count = req.count as usize;
                let mut fds = fds.into_iter();
                for i in 0..count {
                    let v = vectors(i)?;
                    match fds.next().flatten() {
                        Some(fd) => {
                            let n: Arc<dyn Notifier> = Arc::new(fd);
                            self.msix
                                .set_notifier(v, Some(n))
                                .map_err(|_| libc::EINVAL)?;
                            // The VMM that binds a vector owns its masking (docs/device-abi.md).
                            let r = self.msix.set_entry_masked(v, false);
                            Self::log_model_error("MSI-X vector bind", r.map_err(Into::into));
                        }
                        None => {
                            self.msix.set_notifier(v, None).map_err(|_| libc::EINVAL)?;
                        }
                    }
                }
                Ok(())
            }
            (IrqAction::Trigger, IrqData::None) if req.count == 0 => {
                self.msix.clear_notifiers();
                Ok(())
            }
            (IrqAction::Trigger, data) => {
                for (i, sel) in selection(&data, req.count).into_iter().enumerate() {
                    if sel {
                        let r = self.msix.fire(vectors(i)?).map(|_| ());
                        Self::log_model_error("MSI-X loopback", r.map_err(Into::into));
                    }
                }
                Ok(())
            }
            (IrqAction::Mask | IrqAction::Unmask, IrqData::Eventfds(_)) => Err(libc::ENOTTY),
            (action, data) => {
                let masked = action == IrqAction::Mask;
                for (i, sel) in selection(&data, req.count).into_iter().enumerate() {
                    if sel {
                        let r = self.msix.set_host_mask(vectors(i)?, masked);
                        Self::log_model_error("MSI-X host mask", r.map_err(Into::into));
                    }
                }
                Ok(())
            }
        }
    }

    fn set_ext_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        let slot = if req.index == IRQ_ERR {
            &mut self.err_trigger
        } else {
            &mut self.req_trigger
        };
        match (req.action, req.data) {
            (IrqAction::Trigger, IrqData::Eventfds(fds)) => {
                *slot = fds.into_iter().next().flatten();
                Ok(())
            }
            (IrqAction::Trigger, IrqData::None) if req.count == 0 => {
                *slot = None;
                Ok(())
            }
            (IrqAction::Trigger, data) => {
                if selection(&data, req.count)
                    .first()
                    .copied()
                    .unwrap_or(false)
                {
                    if let Some(fd) = slot {
                        fd.write(1).map_err(|_| libc::EIO)?;
                    }
                }
                Ok(())
            }
            _ => Err(libc::EINVAL),
        }
    }

    fn handle_intx_unmask_fd(&mut self) {
        let Some(fd) = &self.intx_unmask else {
            return;
        };
        let mut signalled = false;
        let mut drop_fd = false;
        for _ in 0..MAX_DRAIN_READS {
            match poll_now(eventfd_fd(fd)) {
                Ok(ev) if ev & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 => {
                    drop_fd = true;
                    break;
                }
                Ok(ev) if ev & libc::POLLIN != 0 => match fd.read() {
                    Ok(_) => signalled = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!("irqbridge-pci: reading the INTx unmask eventfd failed: {e}");
                        drop_fd = true;
                        break;
                    }
                },
                Ok(_) => break,
                Err(e) => {
                    warn!("irqbridge-pci: polling the INTx unmask eventfd failed: {e}");
                    drop_fd = true;
                    break;
                }
            }
        }
        if drop_fd {
            warn!("irqbridge-pci: dropping the INTx unmask eventfd");
            self.intx_unmask = None;
        }
        if signalled {
            let r = self.intx.unmask().map(|_| ());
            Self::log_model_error("INTx unmask (eventfd)", r.map_err(Into::into));
        }
    }

    fn handle_doorbell(&mut self) {
        match self.doorbell.read() {
            Ok(n) => self.doorbells = self.doorbells.wrapping_add(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => warn!("irqbridge-pci: reading the doorbell eventfd failed: {e}"),
        }
    }
}

fn send_outcome_name(o: SendOutcome) -> &'static str {
    match o {
        SendOutcome::Upcall { .. } => "upcall",
        SendOutcome::Coalesced => "coalesced",
        SendOutcome::Masked => "masked",
        SendOutcome::SelectorSet => "selector_set",
        SendOutcome::UpcallPending => "upcall_pending",
        SendOutcome::NotBound => "not_bound",
    }
}

/// `e` and its sources, joined with ": ".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(if s.ends_with('.') { " " } else { ": " });
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

impl VfioUserDevice for IrqbridgeDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET,
            num_regions: NUM_REGIONS,
            num_irqs: NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> RegionInfo<'_> {
        let (flags, size) = match index {
            REGION_BAR0 => (REGION_READ | REGION_WRITE, BAR0_SIZE),
            REGION_BAR2 => (
                REGION_READ | REGION_WRITE,
                bar2_size(self.config.msix_vectors),
            ),
            REGION_BAR4 => (REGION_READ | REGION_WRITE | REGION_MMAP, BAR4_SIZE),
            REGION_CONFIG => (REGION_READ | REGION_WRITE, CONFIG_SPACE_SIZE),
            _ => (0, 0),
        };
        let mmap = index == REGION_BAR4;
        RegionInfo {
            flags,
            size,
            offset: 0,
            sparse_areas: if mmap {
                vec![SparseArea {
                    offset: 0,
                    size: BAR4_SIZE,
                }]
            } else {
                Vec::new()
            },
            mmap_fd: mmap.then(|| self.page.as_fd()),
        }
    }

    fn region_io_fds(&self, index: u32) -> Vec<IoFd<'_>> {
        if index != REGION_BAR0 {
            return Vec::new();
        }
        vec![IoFd {
            offset: REG_DOORBELL,
            size: 4,
            fd: eventfd_fd(&self.doorbell),
            datamatch: None,
        }]
    }

    fn irq_info(&self, index: u32) -> IrqInfo {
        match index {
            IRQ_INTX => IrqInfo {
                flags: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
                count: u32::from(self.config.intx),
            },
            IRQ_MSI => IrqInfo {
                flags: IRQ_INFO_EVENTFD,
                count: 0,
            },
            IRQ_MSIX => IrqInfo {
                flags: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE,
                count: u32::from(self.config.msix_vectors),
            },
            IRQ_ERR | IRQ_REQ => IrqInfo {
                flags: IRQ_INFO_EVENTFD,
                count: 1,
            },
            _ => IrqInfo { flags: 0, count: 0 },
        }
    }

    fn set_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        debug!(
            "irqbridge-pci: SET_IRQS index {} {:?} start {} count {}",
            req.index, req.action, req.start, req.count
        );
        match req.index {
            IRQ_INTX => self.set_intx_irqs(req),
            IRQ_MSI if req.count == 0 => Ok(()),
            IRQ_MSIX => self.set_msix_irqs(req),
            IRQ_ERR | IRQ_REQ => self.set_ext_irqs(req),
            _ => Err(libc::EINVAL),
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        match index {
            REGION_BAR0 => self.bar0_read(offset, data),
            REGION_BAR2 => self.bar2_read(offset, data),
            REGION_BAR4 => self.page.read_bytes(offset, data),
            REGION_CONFIG => self.config_read(offset, data),
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match index {
            REGION_BAR0 => self.bar0_write(offset, data),
            REGION_BAR2 => self.bar2_write(offset, data),
            REGION_BAR4 => self.page.write_bytes(offset, data),
            REGION_CONFIG => self.config_write(offset, data),
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        debug!("irqbridge-pci: device reset");
        self.reset_state();
        Ok(())
    }

    fn client_disconnected(&mut self) {
        debug!("irqbridge-pci: client gone, dropping its eventfds");
        // Like closing a VFIO device fd: the interrupt index is disabled and every eventfd of
        // the client dropped; the guest-visible state stays.
        self.intx.disable_index();
        self.intx_trigger = None;
        self.intx_unmask = None;
        self.msix.clear_notifiers();
        self.err_trigger = None;
        self.req_trigger = None;
    }

    fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
        let mut fds = vec![(eventfd_fd(&self.doorbell), TOKEN_DOORBELL)];
        if let Some(fd) = &self.intx_unmask {
            fds.push((eventfd_fd(fd), TOKEN_INTX_UNMASK));
        }
        if let Some(ctl) = &self.control {
            fds.extend(ctl.poll_fds(TOKEN_CONTROL_BASE));
        }
        fds
    }

    fn handle_fd_event(&mut self, token: u64) {
        match token {
            TOKEN_DOORBELL => self.handle_doorbell(),
            TOKEN_INTX_UNMASK => self.handle_intx_unmask_fd(),
            t if t >= TOKEN_CONTROL_BASE => {
                if let Some(mut ctl) = self.control.take() {
                    ctl.handle_event(t - TOKEN_CONTROL_BASE, &mut |req| self.control_request(req));
                    // A control request cannot attach another server, so put it back.
                    self.control = Some(ctl);
                }
            }
            _ => debug!("irqbridge-pci: event for unknown token {token}"),
        }
    }
}
