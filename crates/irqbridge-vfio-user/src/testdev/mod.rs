// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The irqbridge PCI test device (`docs/device-abi.md`), a [`PciDevice`] inside a
//! [`PciFunction`].
//!
//! [`IrqbridgeDevice`] is `PciFunction<TestDevice>`: the function owns the config space and
//! the interrupt models (INTx, MSI, MSI-X with its table and PBA in BAR2); the test device adds
//!
//! - the BAR0 register file ([`bar0`](self) module): registers that let the guest (or a test
//!   harness behind the VMM) raise every kind of interrupt and read counters; its DOORBELL
//!   register is an ioeventfd of the function;
//! - [`EventChannels`] over a shared page ([`EventChannelPage`], a memfd) that the client maps
//!   as BAR4 (`evtchn_bar` module);
//! - the external control socket ([`crate::control`]), whose requests run in the
//!   `control_exec` module.
//!
//! Lifecycle: [`IrqbridgeDevice::new`] builds the power-on state; `DEVICE_RESET` returns to
//! it keeping eventfd bindings and counters; a client disconnect drops every fd the client
//! gave and keeps the device state. [`IrqbridgeDevice::snapshot`] /
//! [`IrqbridgeDevice::restore`] save and load the whole guest-visible state.

#![deny(missing_docs)]

mod bar0;
mod control_exec;
mod evtchn_bar;
pub mod regs;

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use irqbridge_core::{
    Delivery, EventChannels, EvtchnState, IntxState, MsiDelivery, MsiState, MsixState, SendOutcome,
};
use log::warn;
use serde::{Deserialize, Serialize};

use crate::control::ControlServer;
use crate::pci::{
    Bar, BarIndex, Identity, PciCore, PciDevice, PciFunction, PciFunctionBuilder, PciState,
};
use crate::shmem::EventChannelPage;
use regs::*;

/// Poll tokens at and above this value belong to the control server.
const TOKEN_CONTROL_BASE: u64 = 1 << 32;

/// Default number of MSI-X vectors.
pub const DEFAULT_MSIX_VECTORS: u16 = 16;
/// Largest number of MSI-X vectors.
pub const MAX_MSIX_VECTORS: u16 = irqbridge_core::msix::MSIX_MAX_VECTORS;
/// Default number of event-channel ports.
pub const DEFAULT_EVTCHN_PORTS: u32 = irqbridge_core::evtchn::EVTCHN_DEFAULT_PORTS;
/// Largest number of event-channel ports.
pub const MAX_EVTCHN_PORTS: u32 = irqbridge_core::evtchn::EVTCHN_MAX_PORTS;

/// Errors of the test device.
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
    /// MSI was configured off (`msi_vectors: 0`).
    #[error("The device has no MSI capability.")]
    NoMsi,
    /// A snapshot does not fit this device.
    #[error("Snapshot does not fit this device: {0}.")]
    SnapshotMismatch(String),
}

impl From<crate::pci::Error> for DeviceError {
    fn from(e: crate::pci::Error) -> Self {
        use crate::pci::Error as E;
        match e {
            E::Model(m) => DeviceError::Model(m),
            E::NoIntx => DeviceError::NoIntx,
            E::NoMsi => DeviceError::NoMsi,
            E::Io(io) => DeviceError::Doorbell(io),
            E::SnapshotMismatch(s) => DeviceError::SnapshotMismatch(s),
            other => DeviceError::InvalidConfig(crate::pci::error_chain(&other)),
        }
    }
}

fn default_msi_vectors() -> u8 {
    DEFAULT_MSI_VECTORS
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
    /// Number of MSI vectors: 1, 2, 4, 8, 16 or 32 (default 4); 0 = no MSI capability.
    #[serde(default = "default_msi_vectors")]
    pub msi_vectors: u8,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            msix_vectors: DEFAULT_MSIX_VECTORS,
            evtchn_ports: DEFAULT_EVTCHN_PORTS,
            intx: true,
            msi_vectors: DEFAULT_MSI_VECTORS,
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
        if !matches!(self.msi_vectors, 0 | 1 | 2 | 4 | 8 | 16 | 32) {
            return Err(DeviceError::InvalidConfig(format!(
                "msi_vectors {} is not 0, 1, 2, 4, 8, 16 or 32",
                self.msi_vectors
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
    /// MSI vector eventfd writes.
    #[serde(default)]
    pub msi_triggers: u64,
    /// MSI events that set a pending bit instead of firing.
    #[serde(default)]
    pub msi_pending: u64,
    /// MSI events dropped because MSI was disabled (or MSI-X enabled).
    #[serde(default)]
    pub msi_dropped_disabled: u64,
    /// MSI events dropped because the vector was not enabled (MME).
    #[serde(default)]
    pub msi_dropped_mme: u64,
    /// MSI events dropped because the vector had no eventfd.
    #[serde(default)]
    pub msi_dropped: u64,
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
    /// The 4 KiB config-space image (without the live STATUS, MSI and MSI-X bits, which are in
    /// the model states).
    pub config_space: Vec<u8>,
    /// INTx line state.
    pub intx: IntxState,
    /// MSI-X state.
    pub msix: MsixState,
    /// MSI state (absent with `msi_vectors: 0`).
    #[serde(default)]
    pub msi: Option<MsiState>,
    /// Event-channel state, including the shared page.
    pub evtchn: EvtchnState,
    /// Doorbell counter.
    pub doorbells: u64,
    /// Bad-access counter.
    pub bad_accesses: u64,
    /// Port selected by `EVTCHN_QUERY`.
    pub evtchn_query: u32,
}

/// The registers and behaviour of the test device (everything but the standard PCI parts).
#[derive(Debug)]
pub struct TestDevice {
    config: DeviceConfig,
    page: Arc<EventChannelPage>,
    evtchn: EventChannels,
    doorbells: u64,
    bad_accesses: u64,
    evtchn_query: u32,
    control: Option<ControlServer>,
}

/// The irqbridge PCI test device.
pub type IrqbridgeDevice = PciFunction<TestDevice>;

impl TestDevice {
    fn bad(&mut self, what: std::fmt::Arguments<'_>) {
        self.bad_accesses = self.bad_accesses.wrapping_add(1);
        warn!("irqbridge-pci: ignored {what}");
    }

    fn counters(&self, core: &PciCore) -> Counters {
        let i = core.intx().stats();
        let m = core.msix().map(|m| m.stats()).unwrap_or_default();
        let s = core.msi().map(|m| m.stats()).unwrap_or_default();
        let e = self.evtchn.stats();
        Counters {
            intx_triggers: i.triggers,
            intx_unmasks: i.unmasks,
            msix_triggers: m.triggers,
            msix_pending: m.pending_sets,
            msix_dropped: m.dropped,
            msi_triggers: s.triggers,
            msi_pending: s.pending_sets,
            msi_dropped_disabled: s.dropped_disabled,
            msi_dropped_mme: s.dropped_mme,
            msi_dropped: s.dropped(),
            evtchn_sends: e.sends,
            evtchn_upcalls: e.upcalls,
            evtchn_dropped: e.dropped,
            doorbells: self.doorbells,
            bad_accesses: self.bad_accesses,
        }
    }

    fn intx_set_level(
        &self,
        core: &mut PciCore,
        source: u32,
        level: bool,
    ) -> Result<bool, DeviceError> {
        Ok(core.intx_set_level(source, level)?)
    }

    fn msi_fire(&self, core: &mut PciCore, vector: u32) -> Result<MsiDelivery, DeviceError> {
        let v = u8::try_from(vector)
            .map_err(|_| DeviceError::Model(irqbridge_core::Error::InvalidVector(vector)))?;
        Ok(core.msi_fire(v)?)
    }

    fn snapshot(&self, core: &PciCore) -> DeviceSnapshot {
        let s = core.state();
        DeviceSnapshot {
            abi_version: ABI_VERSION,
            config: self.config,
            config_space: s.config_space,
            intx: s.intx,
            msix: s.msix.unwrap_or_else(|| MsixState {
                entries: Vec::new(),
                pba: Vec::new(),
                host_masked: Vec::new(),
                enabled: false,
                function_mask: false,
                stats: Default::default(),
            }),
            msi: s.msi,
            evtchn: self.evtchn.snapshot(),
            doorbells: self.doorbells,
            bad_accesses: self.bad_accesses,
            evtchn_query: self.evtchn_query,
        }
    }

    /// Power-on state of the device's own parts; bindings and counters survive.
    fn reset_state(&mut self) {
        self.evtchn.reset();
        self.evtchn_query = 0;
    }
}

impl PciDevice for TestDevice {
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8], pci: &mut PciCore) {
        match bar {
            0 => self.bar0_read(pci, offset, data),
            4 => self.page.read_bytes(offset, data),
            _ => {
                // BAR2 accesses the MSI-X model does not honour.
                data.fill(0);
                self.bad(format_args!(
                    "BAR{bar} read of {} bytes at {offset:#x}",
                    data.len()
                ));
            }
        }
    }

    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8], pci: &mut PciCore) {
        match bar {
            0 => self.bar0_write(pci, offset, data),
            4 => self.page.write_bytes(offset, data),
            // PBA writes (read-only) and other BAR2 accesses the MSI-X model ignores.
            _ => self.bad(format_args!(
                "BAR{bar} write of {} bytes at {offset:#x}",
                data.len()
            )),
        }
    }

    fn reset(&mut self, _pci: &mut PciCore) {
        self.reset_state();
    }

    fn bar_mmap_fd(&self, bar: BarIndex) -> Option<BorrowedFd<'_>> {
        (bar == REGION_BAR4).then(|| self.page.as_fd())
    }

    fn ioeventfd(&mut self, _bar: BarIndex, _area: usize, count: u64, _pci: &mut PciCore) {
        self.doorbells = self.doorbells.wrapping_add(count);
    }

    fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
        self.control
            .as_ref()
            .map(|c| c.poll_fds(TOKEN_CONTROL_BASE))
            .unwrap_or_default()
    }

    fn handle_fd_event(&mut self, token: u64, pci: &mut PciCore) {
        let Some(t) = token.checked_sub(TOKEN_CONTROL_BASE) else {
            log::debug!("irqbridge-pci: event for unknown token {token}");
            return;
        };
        if let Some(mut ctl) = self.control.take() {
            ctl.handle_event(t, &mut |req| self.control_request(pci, req));
            // A control request cannot attach another server, so put it back.
            self.control = Some(ctl);
        }
    }
}

impl PciFunction<TestDevice> {
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
        let device = TestDevice {
            config,
            page,
            evtchn,
            doorbells: 0,
            bad_accesses: 0,
            evtchn_query: 0,
            control: None,
        };
        let v = config.msix_vectors;
        Ok(PciFunctionBuilder::new(Identity {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            subsystem_vendor_id: SUBSYSTEM_VENDOR_ID,
            subsystem_id: SUBSYSTEM_ID,
            class_code: CLASS_CODE,
            revision: REVISION_ID,
        })
        .intx(config.intx)
        .bar(0, Bar::mem32(BAR0_SIZE).ioeventfd(REG_DOORBELL, 4, None))
        .bar(MSIX_BAR, Bar::mem32(bar2_size(v)))
        .bar(4, Bar::mem32(BAR4_SIZE).mmap(0, BAR4_SIZE))
        .msix(v, MSIX_BAR, 0, msix_pba_offset(v))
        .msi(config.msi_vectors)
        .build(device)?)
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> &DeviceConfig {
        &self.device().config
    }

    /// Attaches the control socket: its listening and client fds join the polled fds and its
    /// requests run on the server thread. Replaces (and drops) a previously attached one.
    pub fn attach_control(&mut self, control: ControlServer) {
        self.device_mut().control = Some(control);
    }

    /// The attached control server, if any.
    pub fn control(&self) -> Option<&ControlServer> {
        self.device().control.as_ref()
    }

    /// Detaches and returns the control server.
    pub fn detach_control(&mut self) -> Option<ControlServer> {
        self.device_mut().control.take()
    }

    /// The event-channel page (BAR4) as the device sees it.
    pub fn evtchn_page(&self) -> &EventChannelPage {
        &self.device().page
    }

    /// Current counters.
    pub fn counters(&self) -> Counters {
        self.device().counters(self.core())
    }

    /// Drives INTx source `source` (0 is the guest's `INTX_ASSERT`, 1 the control socket; up
    /// to 31) high or low. Returns whether the trigger eventfd was written.
    ///
    /// # Errors
    ///
    /// [`DeviceError::NoIntx`] without an INTx pin; [`DeviceError::Model`] for a bad source or
    /// a failed trigger write.
    pub fn intx_set_level(&mut self, source: u32, level: bool) -> Result<bool, DeviceError> {
        let (d, core) = self.split_mut();
        d.intx_set_level(core, source, level)
    }

    /// An event on MSI-X vector `vector` (sent, or pending if masked).
    ///
    /// # Errors
    ///
    /// [`DeviceError::Model`] for a bad vector or a failed eventfd write.
    pub fn msix_fire(&mut self, vector: u16) -> Result<Delivery, DeviceError> {
        Ok(self.core_mut().msix_fire(vector)?)
    }

    /// An event on MSI vector `vector` (docs/device-abi.md: sent, pending, or dropped and
    /// counted).
    ///
    /// # Errors
    ///
    /// [`DeviceError::NoMsi`] without MSI; [`DeviceError::Model`] for a vector beyond the
    /// capability or a failed eventfd write.
    pub fn msi_fire(&mut self, vector: u8) -> Result<MsiDelivery, DeviceError> {
        let (d, core) = self.split_mut();
        d.msi_fire(core, u32::from(vector))
    }

    /// Device → guest event on `port`; fires the port's upcall vector when the protocol says
    /// so.
    ///
    /// # Errors
    ///
    /// [`DeviceError::Model`] for a bad port or a failed eventfd write.
    pub fn evtchn_send(&mut self, port: u32) -> Result<SendOutcome, DeviceError> {
        let (d, core) = self.split_mut();
        d.evtchn_send(core, port)
    }

    /// Opens `port` and binds it to upcall vector `vector`; if the port is pending and not
    /// masked the upcall is raised now.
    ///
    /// # Errors
    ///
    /// [`DeviceError::Model`] for a bad port or vector (at most 64 upcall vectors, and fewer
    /// than the MSI-X table size), or a failed eventfd write.
    pub fn evtchn_bind(&mut self, port: u32, vector: u16) -> Result<(), DeviceError> {
        let (d, core) = self.split_mut();
        d.evtchn_bind(core, port, vector)
    }

    /// `EVTCHN_UNMASK`: clears the port's mask bit and raises its upcall if it is pending.
    ///
    /// # Errors
    ///
    /// [`DeviceError::Model`] for a bad port or a failed eventfd write.
    pub fn evtchn_unmask(&mut self, port: u32) -> Result<(), DeviceError> {
        let (d, core) = self.split_mut();
        d.evtchn_unmask(core, port)
    }

    /// The guest-visible state.
    pub fn snapshot(&self) -> DeviceSnapshot {
        self.device().snapshot(self.core())
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
        if snap.config != *self.config() {
            return Err(DeviceError::SnapshotMismatch(format!(
                "configuration {:?} differs from {:?}",
                snap.config,
                self.config()
            )));
        }
        let state = PciState {
            config_space: snap.config_space.clone(),
            intx: snap.intx.clone(),
            msi: snap.msi.clone(),
            msix: Some(snap.msix.clone()),
            device: None,
        };
        self.check_state(&state)?;
        // Validate the event channels against a scratch copy first, so a bad snapshot changes
        // nothing.
        let d = self.device();
        let scratch = irqbridge_core::evtchn::zeroed_page();
        let mut evtchn = EventChannels::new(d.evtchn.num_ports(), d.evtchn.num_upcalls(), scratch)?;
        evtchn.restore(&snap.evtchn)?;

        self.apply_state(&state)?;
        let d = self.device_mut();
        d.evtchn.restore(&snap.evtchn)?;
        d.doorbells = snap.doorbells;
        d.bad_accesses = snap.bad_accesses;
        d.evtchn_query = snap.evtchn_query;
        Ok(())
    }

    /// Runs one control-socket request and builds its JSON reply (`{"ok":true,...}` or
    /// `{"ok":false,"error":"..."}`).
    pub fn control_request(&mut self, req: &crate::control::ControlRequest) -> serde_json::Value {
        let (d, core) = self.split_mut();
        d.control_request(core, req)
    }
}
