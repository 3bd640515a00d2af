// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The standard part of a function that a device drives: the config space and the interrupt
//! models (INTx, MSI, MSI-X, ERR, REQ) with their eventfds, and `DEVICE_SET_IRQS`.
//!
//! Rules (protocols.md §1.10, passthrough.md §3, the kernel's `vfio_pci_intrs.c`):
//!
//! - INTx: auto-masked level line; COMMAND bit 10 masks it; MSI or MSI-X Enable suppresses it.
//! - MSI and MSI-X are never delivered at the same time: an MSI event while MSI-X is enabled
//!   is dropped as "disabled".
//! - `SET_IRQS` is validated once by the server (index, `start + count`, fd counts); here each
//!   index applies the kernel's per-action rules.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use irqbridge_core::{Delivery, IntxLine, Msi, MsiDelivery, Msix, Notifier};
use irqbridge_sys::PeerEventFd;
use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use super::Error;
use super::config::ConfigSpace;
use super::consts::*;
use super::layout::Layout;
use super::parts::{IrqOp, msix_bind};
use crate::device::{Errno, IrqInfo, SetIrqs};
use crate::proto::{
    VFIO_IRQ_INFO_AUTOMASKED as IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD as IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE as IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE as IRQ_INFO_NORESIZE,
};

/// Upper bound of reads per unmask-eventfd event, so a peer writing in a loop cannot hold the
/// server thread.
const MAX_DRAIN_READS: usize = 64;

/// The config space and interrupt state of a function, handed to every [`PciDevice`]
/// callback so the device can raise interrupts.
///
/// [`PciDevice`]: super::PciDevice
#[derive(Debug)]
pub struct PciCore {
    pub(crate) layout: Layout,
    pub(crate) config: ConfigSpace,
    pub(crate) intx: IntxLine,
    /// Our copy of the INTx trigger, for loopback `SET_IRQS(INTX, TRIGGER|NONE)`.
    intx_trigger: Option<Arc<PeerEventFd>>,
    pub(crate) intx_unmask: Option<EventFd>,
    pub(crate) msi: Option<Msi>,
    /// Vectors allocated by the first `SET_IRQS(MSI, TRIGGER|EVENTFD)`; 0 while idle.
    msi_nvec: u32,
    pub(crate) msix: Option<Msix>,
    err_trigger: Option<PeerEventFd>,
    req_trigger: Option<PeerEventFd>,
}

fn log_err(what: &str, r: Result<(), irqbridge_core::Error>) {
    if let Err(e) = r {
        warn!("pci: {what}: {}", super::error_chain(&e));
    }
}

impl PciCore {
    pub(crate) fn new(layout: Layout) -> Result<Self, Error> {
        let config = ConfigSpace::new(&layout);
        let msi = match layout.msi_vectors {
            0 => None,
            n => Some(Msi::new(n)?),
        };
        let msix = match &layout.msix {
            Some(x) => Some(Msix::new(x.vectors)?),
            None => None,
        };
        Ok(PciCore {
            layout,
            config,
            intx: IntxLine::new(),
            intx_trigger: None,
            intx_unmask: None,
            msi,
            msi_nvec: 0,
            msix,
            err_trigger: None,
            req_trigger: None,
        })
    }

    /// The register layout of the MSI capability: always 64-bit, Mask and Pending Bits as
    /// the layout says.
    pub(crate) fn msi_shape(&self) -> super::parts::MsiShape {
        super::parts::MsiShape {
            is64: true,
            per_vector_mask: self.layout.msi_mask,
        }
    }

    /// The MSI registers the MSI model serves: the whole capability after its header.
    pub(crate) fn msi_window(&self) -> Option<super::parts::MsiWindow> {
        Some(super::parts::MsiWindow {
            cap: self.layout.cap_offset(PCI_CAP_ID_MSI)?,
            from: MSI_CAP_CONTROL,
            shape: self.msi_shape(),
        })
    }

    /// The function's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The INTx line model.
    pub fn intx(&self) -> &IntxLine {
        &self.intx
    }

    /// The MSI model, if the function has MSI.
    pub fn msi(&self) -> Option<&Msi> {
        self.msi.as_ref()
    }

    /// The MSI-X model, if the function has MSI-X.
    pub fn msix(&self) -> Option<&Msix> {
        self.msix.as_ref()
    }

    /// Drives INTx source `source` (0..32; the line is their OR) high or low. Returns whether
    /// the trigger eventfd was written (auto-mask, COMMAND.10 and MSI / MSI-X suppression
    /// apply).
    ///
    /// # Errors
    ///
    /// [`Error::NoIntx`] without an INTx pin; [`Error::Model`] for a bad source or a failed
    /// trigger write.
    pub fn intx_set_level(&mut self, source: u32, level: bool) -> Result<bool, Error> {
        if !self.layout.intx {
            return Err(Error::NoIntx);
        }
        if level {
            Ok(self.intx.assert(source)?)
        } else {
            self.intx.deassert(source)?;
            Ok(false)
        }
    }

    /// An event on MSI-X vector `vector`: sent, or pending in the PBA if masked.
    ///
    /// # Errors
    ///
    /// [`Error::NoMsix`] without MSI-X; [`Error::Model`] for a bad vector or a failed eventfd
    /// write.
    pub fn msix_fire(&mut self, vector: u16) -> Result<Delivery, Error> {
        Ok(self.msix.as_mut().ok_or(Error::NoMsix)?.fire(vector)?)
    }

    /// Sets or clears the vector-control mask bit of MSI-X vector `vector` (a device-side
    /// alias of the table's mask bit); clearing it delivers a pending event once.
    ///
    /// # Errors
    ///
    /// [`Error::NoMsix`] without MSI-X; [`Error::Model`] for a bad vector or a failed eventfd
    /// write.
    pub fn msix_set_entry_masked(&mut self, vector: u16, masked: bool) -> Result<(), Error> {
        let msix = self.msix.as_mut().ok_or(Error::NoMsix)?;
        Ok(msix.set_entry_masked(vector, masked)?)
    }

    /// An event on MSI vector `vector` (docs/device-abi.md "MSI capability"): sent, pending
    /// (masked), or dropped and counted (MSI disabled, MSI-X enabled, vector not enabled, no
    /// eventfd).
    ///
    /// # Errors
    ///
    /// [`Error::NoMsi`] without MSI; [`Error::Model`] for a vector beyond the capability or a
    /// failed eventfd write.
    pub fn msi_fire(&mut self, vector: u8) -> Result<MsiDelivery, Error> {
        let msix_on = self.msix.as_ref().is_some_and(Msix::enabled);
        let msi = self.msi.as_mut().ok_or(Error::NoMsi)?;
        Ok(msi.fire_blocked(vector, msix_on)?)
    }

    /// Reads `data.len()` bytes of the config image at `offset` (without the bits the
    /// interrupt models own: STATUS bit 3, MSI and MSI-X registers). Bytes outside read 0.
    pub fn config_bytes(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .map_or(0, |o| self.config.byte(o));
        }
    }

    /// Device-side update of the config image, ignoring the write masks (to set a status bit
    /// the guest clears with write-1-to-clear, for example). Bytes owned by the interrupt
    /// models and bytes outside the image are left alone.
    pub fn set_config_bytes(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(off) = offset.checked_add(i as u64) else {
                return;
            };
            if self.config.owner(off).is_none() {
                self.config.set_byte(off, v);
            }
        }
    }

    /// The address the guest programmed into memory or I/O BAR `index` (type bits cleared;
    /// both halves of a 64-bit BAR), or `None` if the BAR does not exist.
    pub fn bar_address(&self, index: u32) -> Option<u64> {
        let bar = self.layout.bar(index)?;
        let off = PCI_BAR0 + 4 * u64::from(index);
        let dword = |o: u64| self.config.dword(o);
        let lo = dword(off);
        Some(match bar.kind {
            super::BarKind::Io => u64::from(lo & !0x3),
            super::BarKind::Mem32 => u64::from(lo & !0xf),
            super::BarKind::Mem64 => u64::from(lo & !0xf) | u64::from(dword(off + 4)) << 32,
        })
    }

    /// The values of the standard parts (config image, interrupt models), without the device.
    pub fn state(&self) -> super::PciState {
        super::PciState {
            config_space: self.config.bytes().to_vec(),
            intx: self.intx.snapshot(),
            msi: self.msi.as_ref().map(|m| m.snapshot()),
            msix: self.msix.as_ref().map(|m| m.snapshot()),
            device: None,
        }
    }

    /// Back to the power-on state: config image, INTx level and masks, MSI and MSI-X
    /// registers. Eventfd bindings and counters survive.
    pub fn reset(&mut self) {
        self.config.reset();
        self.intx.reset();
        if let Some(m) = &mut self.msi {
            m.reset();
        }
        if let Some(m) = &mut self.msix {
            m.reset();
        }
    }

    /// The client went away: disable INTx and drop every eventfd it gave.
    pub(crate) fn drop_client_fds(&mut self) {
        self.intx.disable_index();
        self.intx_trigger = None;
        self.intx_unmask = None;
        if let Some(m) = &mut self.msi {
            m.clear_notifiers();
        }
        self.msi_nvec = 0;
        if let Some(m) = &mut self.msix {
            m.clear_notifiers();
        }
        self.err_trigger = None;
        self.req_trigger = None;
    }

    /// MSI or MSI-X Enable changed: INTx is suppressed while either is on. Suppress before
    /// MSI / MSI-X can fire, release after both are off.
    pub(crate) fn update_intx_suppression(&mut self) {
        let on = self.msi.as_ref().is_some_and(Msi::enabled)
            || self.msix.as_ref().is_some_and(Msix::enabled);
        log_err("INTx suppression", self.intx.set_suppressed(on).map(|_| ()));
    }

    pub(crate) fn irq_info(&self, index: u32) -> IrqInfo {
        match index {
            IRQ_INTX => IrqInfo {
                flags: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
                count: u32::from(self.layout.intx),
            },
            IRQ_MSI => match &self.msi {
                Some(m) => IrqInfo {
                    flags: IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE,
                    count: u32::from(m.num_vectors()),
                },
                None => IrqInfo {
                    flags: IRQ_INFO_EVENTFD,
                    count: 0,
                },
            },
            IRQ_MSIX => IrqInfo {
                flags: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE,
                count: self.msix.as_ref().map_or(0, |m| u32::from(m.num_vectors())),
            },
            IRQ_ERR | IRQ_REQ => IrqInfo {
                flags: IRQ_INFO_EVENTFD,
                count: 1,
            },
            _ => IrqInfo { flags: 0, count: 0 },
        }
    }

    pub(crate) fn set_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        debug!(
            "pci: SET_IRQS index {} {:?} start {} count {}",
            req.index, req.action, req.start, req.count
        );
        match req.index {
            IRQ_INTX => self.set_intx_irqs(req),
            IRQ_MSI => self.set_msi_irqs(req),
            IRQ_MSIX => self.set_msix_irqs(req),
            IRQ_ERR | IRQ_REQ => self.set_ext_irqs(req),
            _ => Err(libc::EINVAL),
        }
    }

    fn set_intx_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        match IrqOp::decode(req, 1)? {
            IrqOp::Bind { fds, .. } => {
                match fds.into_iter().next().flatten() {
                    Some(fd) => {
                        let fd = Arc::new(PeerEventFd::new(fd));
                        self.intx_trigger = Some(Arc::clone(&fd));
                        log_err(
                            "INTx trigger bind",
                            self.intx.set_trigger(Some(fd as Arc<dyn Notifier>)),
                        );
                    }
                    None => {
                        self.intx_trigger = None;
                        let _ = self.intx.set_trigger(None);
                    }
                }
                Ok(())
            }
            IrqOp::Disable => {
                self.intx.disable_index();
                self.intx_trigger = None;
                self.intx_unmask = None;
                Ok(())
            }
            IrqOp::Trigger(sel) => {
                if sel.is_empty() {
                    return Ok(());
                }
                // Loopback, like the kernel's `vfio_send_intx_eventfd`: signal the trigger if
                // the index is enabled and not disabled by COMMAND.10; the mask is untouched.
                match &self.intx_trigger {
                    Some(t) if self.intx.is_enabled() && !self.intx.intx_disabled() => {
                        // `notify`: a saturated counter is "already pending", never a wait.
                        t.notify().map_err(|e| {
                            warn!("pci: INTx loopback trigger failed: {e}");
                            libc::EIO
                        })
                    }
                    _ => Ok(()),
                }
            }
            IrqOp::MaskFd => Err(libc::ENOTTY),
            IrqOp::Mask { vectors, .. } if vectors.is_empty() => Ok(()),
            IrqOp::Mask { masked: true, .. } => {
                self.intx.mask();
                Ok(())
            }
            IrqOp::Mask { masked: false, .. } => {
                log_err("INTx unmask", self.intx.unmask().map(|_| ()));
                Ok(())
            }
            IrqOp::UnmaskFd(fd) => {
                self.intx_unmask = fd;
                Ok(())
            }
        }
    }

    /// MSI, after the kernel's `vfio_pci_set_msi_trigger` (passthrough.md §3).
    fn set_msi_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        let Some(msi) = self.msi.as_mut() else {
            return IrqOp::only_disable(req);
        };
        // Sub-indexes below `num_vectors` (at most 32) fit a u8.
        match IrqOp::decode(req, u32::from(msi.num_vectors()))? {
            IrqOp::Disable => {
                msi.clear_notifiers();
                self.msi_nvec = 0;
                Ok(())
            }
            IrqOp::Bind { start, fds } => {
                let end = start + fds.len() as u32;
                if self.msi_nvec == 0 {
                    // First bind on an idle index: allocate start + count vectors.
                    self.msi_nvec = end;
                } else if end > self.msi_nvec {
                    // NORESIZE: growing needs a disable and a new enable.
                    return Err(libc::EINVAL);
                }
                for (v, fd) in (start..).zip(fds) {
                    let n = fd.map(|fd| Arc::new(PeerEventFd::new(fd)) as Arc<dyn Notifier>);
                    msi.set_notifier(v as u8, n).map_err(|_| libc::EINVAL)?;
                }
                Ok(())
            }
            IrqOp::Trigger(sel) => {
                if self.msi_nvec == 0 {
                    return Err(libc::EINVAL);
                }
                for v in sel {
                    log_err("MSI loopback", msi.loopback(v as u8).map(|_| ()));
                }
                Ok(())
            }
            _ => Err(libc::ENOTTY),
        }
    }

    fn set_msix_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        let Some(msix) = self.msix.as_mut() else {
            return IrqOp::only_disable(req);
        };
        // Sub-indexes below `num_vectors` (at most 2048) fit a u16.
        match IrqOp::decode(req, u32::from(msix.num_vectors()))? {
            IrqOp::Bind { start, fds } => {
                for (v, fd) in (start..).zip(fds) {
                    let n = fd.map(|fd| Arc::new(PeerEventFd::new(fd)) as Arc<dyn Notifier>);
                    msix_bind(msix, v as u16, n).map_err(|_| libc::EINVAL)?;
                }
                Ok(())
            }
            IrqOp::Disable => {
                msix.clear_notifiers();
                Ok(())
            }
            IrqOp::Trigger(sel) => {
                // Loopback of the bound eventfds, as vfio-pci's `vfio_msi_set_block` does.
                for v in sel {
                    log_err("MSI-X loopback", msix.loopback(v as u16).map(|_| ()));
                }
                Ok(())
            }
            IrqOp::MaskFd | IrqOp::UnmaskFd(_) => Err(libc::ENOTTY),
            IrqOp::Mask { masked, vectors } => {
                for v in vectors {
                    log_err("MSI-X host mask", msix.set_host_mask(v as u16, masked));
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
        match IrqOp::decode(req, 1)? {
            IrqOp::Bind { fds, .. } => {
                *slot = fds.into_iter().next().flatten().map(PeerEventFd::new);
                Ok(())
            }
            IrqOp::Disable => {
                *slot = None;
                Ok(())
            }
            IrqOp::Trigger(sel) => {
                if let (false, Some(fd)) = (sel.is_empty(), slot) {
                    fd.notify().map_err(|_| libc::EIO)?;
                }
                Ok(())
            }
            _ => Err(libc::EINVAL),
        }
    }

    /// The INTx unmask (resample) eventfd is readable: drain it and unmask once. An eventfd
    /// that reports an error or hang-up is dropped.
    pub(crate) fn handle_intx_unmask_fd(&mut self) {
        let Some(fd) = &self.intx_unmask else {
            return;
        };
        let mut signalled = false;
        let mut drop_fd = false;
        for _ in 0..MAX_DRAIN_READS {
            match super::poll_now(super::eventfd_fd(fd)) {
                Ok(ev) if ev & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 => {
                    drop_fd = true;
                    break;
                }
                Ok(ev) if ev & libc::POLLIN != 0 => match fd.read() {
                    Ok(_) => signalled = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!("pci: reading the INTx unmask eventfd failed: {e}");
                        drop_fd = true;
                        break;
                    }
                },
                Ok(_) => break,
                Err(e) => {
                    warn!("pci: polling the INTx unmask eventfd failed: {e}");
                    drop_fd = true;
                    break;
                }
            }
        }
        if drop_fd {
            warn!("pci: dropping the INTx unmask eventfd {}", fd.as_raw_fd());
            self.intx_unmask = None;
        }
        if signalled {
            log_err("INTx unmask (eventfd)", self.intx.unmask().map(|_| ()));
        }
    }
}
