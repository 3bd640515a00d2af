// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`PassthroughDevice`]: a host VFIO PCI device served over vfio-user.
//!
//! Implemented on [`VfioUserDevice`] with the pieces of the [`pci`] model that mean the same
//! for a host device (`pci::parts`: SET_IRQS decoding, MSI register layout and writes, MSI-X
//! access classes and binding, BAR masks); the MSI registers and the MSI-X table and PBA are
//! `irqbridge-core`'s [`Msi`] and [`Msix`] models. The type is `Send`.
//!
//! # Interrupts
//! - **INTx**: the client's TRIGGER eventfd and UNMASK eventfd (a KVM resamplefd) go straight
//!   to `VFIO_DEVICE_SET_IRQS`; MASK/UNMASK messages are forwarded. No server thread sees an
//!   INTx.
//! - **MSI / MSI-X**: each vector's kernel trigger is either the client's eventfd (vector
//!   unmasked: host kernel → client fd, the server sleeps) or a server-owned *catcher* eventfd
//!   (vector masked by the virtual table, the function mask, MSI mask bits or a host mask). An
//!   event caught by a catcher sets the virtual pending bit. On unmask the client's eventfd is
//!   given back to the kernel and, if the bit was set, signalled once. Catchers are drained
//!   before every change that may unmask, so events that came while masked collapse into one
//!   pending bit.
//!
//! # DMA
//! Each client DMA_MAP with an fd is mmapped here and mapped into the VFIO container
//! (`VFIO_IOMMU_MAP_DMA`, IOVA = the client's DMA address); DMA_UNMAP and the end of the
//! client undo it, IOMMU first, then the mmap.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use irqbridge_core::Msi;
use irqbridge_core::msix::Msix;
use irqbridge_core::notifier::Notifier;
use irqbridge_sys::PeerEventFd;
use log::{debug, info, warn};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::config::{HostBar, VirtConfig};
use super::vfio::{IrqSet, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VfioBackend};
use crate::device::{
    DeviceInfo, Errno, IoFd, IrqInfo, RegionInfo, SetIrqs, SparseArea, VfioUserDevice,
};
use crate::dma::DmaMapping;
use crate::pci::consts::{PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};
use crate::pci::parts::{IrqOp, MsixHit, apply_msi_write, msix_bind, msix_hit};
use crate::pci::{self, eventfd_fd};
use crate::proto::{
    VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
    VFIO_PCI_ROM_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};

const PAGE: u64 = 4096;

/// `(offset, length)` of the MSI-X table and of the PBA inside one BAR, where present.
type MsixRanges = (Option<(u64, u64)>, Option<(u64, u64)>);
const PCI_COMMAND_IO_MEM_MASTER: u16 = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;

/// Options of a passed-through device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassthroughOptions {
    /// Offer the BAR pages without the MSI-X table and PBA as sparse-mmap areas of the device
    /// fd: the client then reaches the device registers without the server.
    pub mmap_bars: bool,
}

/// Counters of a passed-through device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassthroughStats {
    /// Events the server's catcher eventfds caught (masked vectors): each is a server wakeup.
    pub caught: u64,
    /// Pending events delivered to the client on unmask.
    pub pending_delivered: u64,
    /// Per-vector `SET_IRQS` rebinds issued to the kernel (mask and unmask switches).
    pub rebinds: u64,
    /// Client DMA mappings currently in the IOMMU.
    pub dma_maps: u64,
}

/// What the kernel currently signals for a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bound {
    Nothing,
    Client,
    Catcher,
}

/// One MSI or MSI-X vector.
#[derive(Debug)]
struct Vector {
    client: Option<Arc<PeerEventFd>>,
    catcher: EventFd,
    kernel: Bound,
}

impl Vector {
    fn new() -> std::io::Result<Vector> {
        Ok(Vector {
            client: None,
            catcher: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            kernel: Bound::Nothing,
        })
    }

    /// Reads the catcher; true if it had counted events.
    fn drain(&self) -> bool {
        matches!(self.catcher.read(), Ok(n) if n > 0)
    }

    fn kernel_fd(&self, b: Bound) -> RawFd {
        match (b, &self.client) {
            (Bound::Client, Some(c)) => c.as_raw_fd(),
            (Bound::Catcher, _) => self.catcher.as_raw_fd(),
            _ => -1,
        }
    }
}

/// One host DMA mapping of a client region.
#[derive(Debug)]
struct DmaMap {
    host: usize,
    size: u64,
}

/// A host VFIO PCI device served over vfio-user; see the [module documentation](self).
#[derive(Debug)]
pub struct PassthroughDevice<B: VfioBackend> {
    backend: B,
    opts: PassthroughOptions,
    config: VirtConfig,
    /// The kernel's enabled IRQ index (INTx, MSI or MSI-X), if any.
    active: Option<u32>,
    /// Vectors enabled in the kernel for the active MSI / MSI-X index.
    active_nvec: u32,
    intx_trigger: Option<EventFd>,
    intx_unmask: Option<EventFd>,
    other_triggers: [Option<EventFd>; 2],
    msi: Vec<Vector>,
    /// The virtual MSI registers after Message Control (address, data, mask and pending
    /// bits); always enabled with every vector, as the kernel's MSI index decides delivery.
    msi_model: Option<Msi>,
    msix: Option<Msix>,
    msix_vectors: Vec<Vector>,
    dma: BTreeMap<u64, DmaMap>,
    stats: PassthroughStats,
}

fn errno_of(e: &std::io::Error) -> Errno {
    e.raw_os_error().filter(|e| *e > 0).unwrap_or(libc::EIO)
}

fn token(index: u32, v: usize) -> u64 {
    (u64::from(index) << 32) | v as u64
}

impl<B: VfioBackend> PassthroughDevice<B> {
    /// Builds the device on an open backend: reads the host config space and sets up the
    /// virtual copy, the MSI-X model and one catcher eventfd per MSI / MSI-X vector.
    ///
    /// # Errors
    /// The host config space cannot be read (errno), or eventfds cannot be created.
    pub fn new(backend: B, opts: PassthroughOptions) -> std::io::Result<Self> {
        let cfg_region = backend
            .region(VFIO_PCI_CONFIG_REGION_INDEX)
            .filter(|r| r.size > 0)
            .ok_or_else(|| std::io::Error::other("the device has no config region"))?;
        let cfg_len = usize::try_from(cfg_region.size)
            .unwrap_or(super::config::PCIE_CONFIG_SIZE)
            .clamp(
                super::config::PCI_CONFIG_SIZE,
                super::config::PCIE_CONFIG_SIZE,
            );
        let mut host_cfg = vec![0u8; cfg_len];
        // Conventional devices answer only the first 256 bytes; read those first.
        backend.read(
            VFIO_PCI_CONFIG_REGION_INDEX,
            0,
            &mut host_cfg[..super::config::PCI_CONFIG_SIZE],
        )?;
        if cfg_len > super::config::PCI_CONFIG_SIZE {
            let _ = backend.read(
                VFIO_PCI_CONFIG_REGION_INDEX,
                super::config::PCI_CONFIG_SIZE as u64,
                &mut host_cfg[super::config::PCI_CONFIG_SIZE..],
            );
        }
        let mut bars = [HostBar::default(); 6];
        for (i, b) in bars.iter_mut().enumerate() {
            b.size = backend.region(i as u32).map_or(0, |r| r.size);
        }
        let rom = backend
            .region(VFIO_PCI_ROM_REGION_INDEX)
            .map_or(0, |r| r.size);
        let config = VirtConfig::new(&host_cfg, bars, rom);

        let msi_count = match config.msi() {
            Some(m) => backend
                .irq(VFIO_PCI_MSI_IRQ_INDEX)
                .map_or(0, |q| q.count)
                .min(m.vectors()),
            None => 0,
        };
        // The MSI model needs a power of two (the host reports the capability's count).
        let msi_count = match msi_count {
            0 => 0,
            n => 1 << (31 - n.leading_zeros()),
        };
        let msi_model = u8::try_from(msi_count)
            .ok()
            .and_then(|n| Msi::new(n).ok())
            .map(enabled_msi);
        let msi = (0..msi_count)
            .map(|_| Vector::new())
            .collect::<std::io::Result<Vec<_>>>()?;
        let (msix, msix_vectors) = match config.msix() {
            Some(x) => {
                let host = backend.irq(VFIO_PCI_MSIX_IRQ_INDEX).map_or(0, |q| q.count);
                let n = u32::from(x.vectors).min(host);
                match u16::try_from(n).ok().and_then(|n| Msix::new(n).ok()) {
                    Some(m) => (
                        Some(m),
                        (0..n)
                            .map(|_| Vector::new())
                            .collect::<std::io::Result<Vec<_>>>()?,
                    ),
                    None => (None, Vec::new()),
                }
            }
            None => (None, Vec::new()),
        };
        Ok(PassthroughDevice {
            backend,
            opts,
            config,
            active: None,
            active_nvec: 0,
            intx_trigger: None,
            intx_unmask: None,
            other_triggers: [None, None],
            msi,
            msi_model,
            msix,
            msix_vectors,
            dma: BTreeMap::new(),
            stats: PassthroughStats::default(),
        })
    }

    /// The backend (the open VFIO device).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Counters.
    pub fn stats(&self) -> PassthroughStats {
        PassthroughStats {
            dma_maps: self.dma.len() as u64,
            ..self.stats
        }
    }

    /// The kernel's enabled IRQ index, if any.
    pub fn active_irq_index(&self) -> Option<u32> {
        self.active
    }

    /// The virtual MSI-X pending bit of `vector`, or the MSI pending bit (index 1).
    pub fn pending(&self, index: u32, vector: u16) -> bool {
        match index {
            VFIO_PCI_MSIX_IRQ_INDEX => self
                .msix
                .as_ref()
                .is_some_and(|m| m.pending(vector).unwrap_or(false)),
            VFIO_PCI_MSI_IRQ_INDEX => self
                .msi_model
                .as_ref()
                .is_some_and(|m| m.pending_bits() & (1 << (vector % 32)) != 0),
            _ => false,
        }
    }

    fn vectors(&self, index: u32) -> &[Vector] {
        match index {
            VFIO_PCI_MSI_IRQ_INDEX => &self.msi,
            VFIO_PCI_MSIX_IRQ_INDEX => &self.msix_vectors,
            _ => &[],
        }
    }

    fn vectors_mut(&mut self, index: u32) -> &mut Vec<Vector> {
        match index {
            VFIO_PCI_MSI_IRQ_INDEX => &mut self.msi,
            _ => &mut self.msix_vectors,
        }
    }

    /// Whether vector `v` of `index` is masked in the virtual state.
    fn masked(&self, index: u32, v: usize) -> bool {
        match index {
            VFIO_PCI_MSIX_IRQ_INDEX => self.msix.as_ref().is_none_or(|m| {
                u16::try_from(v)
                    .ok()
                    .and_then(|v| m.is_masked(v).ok())
                    .unwrap_or(true)
            }),
            _ => self
                .msi_model
                .as_ref()
                .is_some_and(|m| m.mask_bits() & (1u32 << (v % 32)) != 0),
        }
    }

    fn desired(&self, index: u32, v: usize) -> Bound {
        let Some(vec) = self.vectors(index).get(v) else {
            return Bound::Nothing;
        };
        if vec.client.is_some() && !self.masked(index, v) {
            Bound::Client
        } else {
            Bound::Catcher
        }
    }

    /// Feeds events counted by the catchers of `index` into the virtual state.
    fn drain(&mut self, index: u32) {
        if self.active != Some(index) {
            return;
        }
        let fired: Vec<usize> = self
            .vectors(index)
            .iter()
            .enumerate()
            .filter(|(_, v)| v.kernel == Bound::Catcher && v.drain())
            .map(|(i, _)| i)
            .collect();
        for v in fired {
            self.stats.caught += 1;
            self.event(index, v);
        }
    }

    /// An event on vector `v` reached the server: pending if masked, else to the client.
    fn event(&mut self, index: u32, v: usize) {
        match index {
            VFIO_PCI_MSIX_IRQ_INDEX => {
                if let (Some(m), Ok(v)) = (self.msix.as_mut(), u16::try_from(v)) {
                    match m.fire(v) {
                        Ok(d) => debug!("passthrough: MSI-X vector {v} caught: {d:?}"),
                        Err(e) => warn!("passthrough: MSI-X vector {v}: {e}"),
                    }
                }
            }
            _ => {
                if let (Some(m), Ok(v)) = (self.msi_model.as_mut(), u8::try_from(v)) {
                    match m.fire(v) {
                        Ok(d) => debug!("passthrough: MSI vector {v} caught: {d:?}"),
                        Err(e) => warn!("passthrough: MSI vector {v}: {e}"),
                    }
                }
            }
        }
    }

    /// Applies `change` to the MSI model, which signals (once) every vector it unmasks with
    /// its pending bit set; counts those deliveries.
    fn msi_write(&mut self, change: impl FnOnce(&mut Msi)) {
        let Some(m) = self.msi_model.as_mut() else {
            return;
        };
        let before = m.pending_bits();
        change(m);
        let cleared = before & !m.pending_bits();
        let delivered = (0..self.msi.len().min(32))
            .filter(|v| {
                cleared & (1 << v) != 0 && self.msi.get(*v).is_some_and(|x| x.client.is_some())
            })
            .count();
        self.stats.pending_delivered += delivered as u64;
    }

    /// Points the kernel at the desired fd of every vector of `index` that changed.
    fn sync(&mut self, index: u32) -> Result<(), Errno> {
        if self.active != Some(index) {
            return Ok(());
        }
        let n = (self.active_nvec as usize).min(self.vectors(index).len());
        let mut first_err = None;
        for v in 0..n {
            let want = self.desired(index, v);
            let Some(vec) = self.vectors(index).get(v) else {
                continue;
            };
            if vec.kernel == want {
                continue;
            }
            let fd = [vec.kernel_fd(want)];
            let set = IrqSet::eventfds(index, VFIO_IRQ_SET_ACTION_TRIGGER, v as u32, &fd);
            match self.backend.set_irqs(&set) {
                Ok(()) => {
                    self.stats.rebinds += 1;
                    if let Some(x) = self.vectors_mut(index).get_mut(v) {
                        x.kernel = want;
                    }
                }
                Err(e) => {
                    warn!("passthrough: rebinding vector {v} of IRQ index {index}: {e}");
                    first_err.get_or_insert(errno_of(&e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Drains, applies `change` to the virtual state, rebinds, drains again (see the module
    /// documentation).
    fn with_masks<T>(&mut self, index: u32, change: impl FnOnce(&mut Self) -> T) -> T {
        self.drain(index);
        let r = change(self);
        if let Err(e) = self.sync(index) {
            warn!("passthrough: IRQ index {index}: kernel rebind failed (errno {e})");
        }
        self.drain(index);
        r
    }

    /// Enables `index` (MSI or MSI-X) in the kernel with `nvec` vectors, each on its desired
    /// fd.
    fn enable_vectors(&mut self, index: u32, nvec: u32) -> Result<(), Errno> {
        self.active = Some(index);
        self.active_nvec = nvec;
        if index == VFIO_PCI_MSIX_IRQ_INDEX {
            let (_, fmask) = self.config.msix_control();
            if let Some(m) = self.msix.as_mut() {
                let _ = m.write_control(true, fmask);
            }
        }
        let want: Vec<Bound> = (0..nvec as usize).map(|v| self.desired(index, v)).collect();
        let fds: Vec<RawFd> = want
            .iter()
            .enumerate()
            .map(|(v, b)| self.vectors(index).get(v).map_or(-1, |x| x.kernel_fd(*b)))
            .collect();
        let set = IrqSet::eventfds(index, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &fds);
        if let Err(e) = self.backend.set_irqs(&set) {
            self.active = None;
            self.active_nvec = 0;
            if let Some(m) = self
                .msix
                .as_mut()
                .filter(|_| index == VFIO_PCI_MSIX_IRQ_INDEX)
            {
                let _ = m.write_control(false, false);
            }
            return Err(errno_of(&e));
        }
        for (x, b) in self.vectors_mut(index).iter_mut().zip(want) {
            x.kernel = b;
        }
        Ok(())
    }

    /// Disables the kernel's active index (interrupts off), keeping client fds unless
    /// `drop_fds`.
    fn disable_active(&mut self) -> Result<(), Errno> {
        let Some(index) = self.active else {
            return Ok(());
        };
        let r = self.backend.set_irqs(&IrqSet::disable(index));
        self.active = None;
        self.active_nvec = 0;
        for v in self.vectors_mut(index).iter_mut() {
            v.kernel = Bound::Nothing;
            let _ = v.catcher.read();
        }
        if index == VFIO_PCI_MSIX_IRQ_INDEX {
            let (_, fmask) = self.config.msix_control();
            if let Some(m) = self.msix.as_mut() {
                let _ = m.write_control(false, fmask);
            }
        }
        r.map_err(|e| errno_of(&e))
    }

    fn drop_client_fds(&mut self, index: u32) {
        match index {
            VFIO_PCI_INTX_IRQ_INDEX => {
                self.intx_trigger = None;
                self.intx_unmask = None;
            }
            VFIO_PCI_MSI_IRQ_INDEX | VFIO_PCI_MSIX_IRQ_INDEX => {
                for v in self.vectors_mut(index).iter_mut() {
                    v.client = None;
                }
                if index == VFIO_PCI_MSIX_IRQ_INDEX {
                    if let Some(m) = self.msix.as_mut() {
                        m.clear_notifiers();
                    }
                } else if let Some(m) = self.msi_model.as_mut() {
                    m.clear_notifiers();
                }
            }
            _ => {}
        }
    }

    /// EINVAL unless `len` bytes at `offset` lie inside region `index`.
    fn check_region(&self, index: u32, offset: u64, len: usize) -> Result<(), Errno> {
        let size = self.region_info(index).size;
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(libc::EINVAL),
        }
    }

    /// Disables `index` in the kernel if it is the active one and drops the client's fds.
    fn disable_index(&mut self, index: u32) -> Result<(), Errno> {
        let r = if self.active == Some(index) {
            self.disable_active()
        } else {
            Ok(())
        };
        self.drop_client_fds(index);
        r
    }

    fn set_intx(&mut self, req: SetIrqs) -> Result<(), Errno> {
        const I: u32 = VFIO_PCI_INTX_IRQ_INDEX;
        match IrqOp::decode(req, 1)? {
            IrqOp::Disable => self.disable_index(I),
            IrqOp::Bind { fds, .. } => {
                if matches!(self.active, Some(i) if i != I) {
                    return Err(libc::EINVAL);
                }
                let fd = fds.into_iter().next().flatten();
                self.intx_trigger = self.forward_fd(I, VFIO_IRQ_SET_ACTION_TRIGGER, fd)?;
                self.active = Some(I);
                Ok(())
            }
            IrqOp::UnmaskFd(fd) => {
                self.intx_unmask = self.forward_fd(I, VFIO_IRQ_SET_ACTION_UNMASK, fd)?;
                Ok(())
            }
            IrqOp::Trigger(v) => self.forward_none(I, VFIO_IRQ_SET_ACTION_TRIGGER, &v),
            IrqOp::Mask { masked, vectors } => self.forward_none(I, mask_action(masked), &vectors),
            IrqOp::MaskFd => Err(libc::ENOTTY),
        }
    }

    /// Hands the client's eventfd for `action` on sub-index 0 of `index` to the kernel (no fd:
    /// −1, de-assign) and returns it to be kept.
    fn forward_fd(
        &mut self,
        index: u32,
        action: u32,
        fd: Option<EventFd>,
    ) -> Result<Option<EventFd>, Errno> {
        let raw = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        self.backend
            .set_irqs(&IrqSet::eventfds(index, action, 0, &[raw]))
            .map_err(|e| errno_of(&e))?;
        Ok(fd)
    }

    /// `action` with DATA_NONE on the sub-indexes `vectors` (ascending), one kernel call per
    /// run of consecutive ones.
    fn forward_none(&mut self, index: u32, action: u32, vectors: &[u32]) -> Result<(), Errno> {
        let mut rest = vectors;
        while let Some(&first) = rest.first() {
            let run = rest
                .iter()
                .zip(first..)
                .take_while(|(v, want)| **v == *want)
                .count();
            self.backend
                .set_irqs(&IrqSet::none(index, action, first, run as u32))
                .map_err(|e| errno_of(&e))?;
            rest = rest.get(run..).unwrap_or_default();
        }
        Ok(())
    }

    fn set_vectors(&mut self, req: SetIrqs) -> Result<(), Errno> {
        let index = req.index;
        let n = self.vectors(index).len();
        match IrqOp::decode(req, n as u32)? {
            IrqOp::Disable => self.disable_index(index),
            IrqOp::Bind { start, fds } => {
                if matches!(self.active, Some(i) if i != index) {
                    // Like the kernel: one index at a time (disable INTx first).
                    return Err(libc::EINVAL);
                }
                let end = start as usize + fds.len();
                self.drain(index);
                for (v, fd) in (start as usize..).zip(fds) {
                    let client = fd.map(|fd| Arc::new(PeerEventFd::new(fd)));
                    let notifier = client.clone().map(|c| c as Arc<dyn Notifier>);
                    match index {
                        VFIO_PCI_MSIX_IRQ_INDEX => {
                            if let (Some(m), Ok(v)) = (self.msix.as_mut(), u16::try_from(v)) {
                                let _ = msix_bind(m, v, notifier);
                            }
                        }
                        _ => {
                            if let (Some(m), Ok(v)) = (self.msi_model.as_mut(), u8::try_from(v)) {
                                let _ = m.set_notifier(v, notifier);
                            }
                        }
                    }
                    if let Some(x) = self.vectors_mut(index).get_mut(v) {
                        x.client = client;
                    }
                }
                if self.active == Some(index) && end as u32 <= self.active_nvec {
                    if index == VFIO_PCI_MSI_IRQ_INDEX {
                        // A vector bound unmasked with its pending bit set gets it now.
                        self.msi_write(|m| {
                            let _ = m.write_mask(m.mask_bits());
                        });
                    }
                    let r = self.sync(index);
                    self.drain(index);
                    return r;
                }
                // First enable, or MSI growing past the enabled count: (re-)enable.
                if self.active == Some(index) {
                    self.disable_active()?;
                }
                let nvec = if index == VFIO_PCI_MSIX_IRQ_INDEX {
                    n as u32
                } else {
                    end as u32
                };
                let r = self.enable_vectors(index, nvec);
                if r.is_err() {
                    self.drop_client_fds(index);
                }
                r
            }
            IrqOp::Trigger(v) => {
                if self.active != Some(index) {
                    return Err(libc::EINVAL);
                }
                self.forward_none(index, VFIO_IRQ_SET_ACTION_TRIGGER, &v)
            }
            IrqOp::Mask { masked, vectors } if index == VFIO_PCI_MSIX_IRQ_INDEX => {
                self.with_masks(index, |d| {
                    if let Some(m) = d.msix.as_mut() {
                        for v in vectors {
                            if let Ok(v) = u16::try_from(v) {
                                let _ = m.set_host_mask(v, masked);
                            }
                        }
                    }
                });
                Ok(())
            }
            IrqOp::Mask { .. } | IrqOp::MaskFd | IrqOp::UnmaskFd(_) => Err(libc::ENOTTY),
        }
    }

    /// Where the MSI-X table and PBA sit in BAR `bar`: `(table range, pba range)`.
    fn msix_ranges(&self, bar: u32) -> MsixRanges {
        let (Some(x), Some(_)) = (self.config.msix(), self.msix.as_ref()) else {
            return (None, None);
        };
        let t = (u32::from(x.table_bar) == bar).then(|| (x.table_offset, x.table_len()));
        let p = (u32::from(x.pba_bar) == bar).then(|| (x.pba_offset, x.pba_len()));
        (t, p)
    }

    fn bar_access(
        &mut self,
        bar: u32,
        offset: u64,
        len: usize,
        write: Option<&[u8]>,
        read: Option<&mut [u8]>,
    ) -> Result<(), Errno> {
        let (table, pba) = self.msix_ranges(bar);
        let hit = |r: Option<(u64, u64)>| {
            r.map_or(MsixHit::Outside, |(o, l)| msix_hit(o, l, offset, len))
        };
        match (hit(table), hit(pba), write, read) {
            // The virtual table and PBA: whole, naturally aligned 4- or 8-byte accesses only;
            // the PBA is read-only.
            (MsixHit::Partial, ..)
            | (MsixHit::Outside, MsixHit::Partial, ..)
            | (MsixHit::Outside, MsixHit::Inside(_), Some(_), _) => Err(libc::EINVAL),
            (MsixHit::Inside(rel), _, Some(data), _) => {
                self.with_masks(VFIO_PCI_MSIX_IRQ_INDEX, |d| {
                    if let Some(m) = d.msix.as_mut() {
                        if let Err(e) = m.table_write(rel, data) {
                            warn!("passthrough: MSI-X table write: {e}");
                        }
                    }
                });
                Ok(())
            }
            (MsixHit::Inside(rel), _, None, out) => {
                if let (Some(m), Some(out)) = (self.msix.as_ref(), out) {
                    m.table_read(rel, out);
                }
                Ok(())
            }
            (MsixHit::Outside, MsixHit::Inside(rel), None, out) => {
                // Catch up with events the catchers hold before showing the PBA.
                self.drain(VFIO_PCI_MSIX_IRQ_INDEX);
                if let (Some(m), Some(out)) = (self.msix.as_ref(), out) {
                    m.pba_read(rel, out);
                }
                Ok(())
            }
            (MsixHit::Outside, MsixHit::Outside, Some(data), _) => self
                .backend
                .write(bar, offset, data)
                .map_err(|e| errno_of(&e)),
            (MsixHit::Outside, MsixHit::Outside, None, Some(out)) => self
                .backend
                .read(bar, offset, out)
                .map_err(|e| errno_of(&e)),
            (MsixHit::Outside, MsixHit::Outside, None, None) => Ok(()),
        }
    }

    fn config_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        let off = usize::try_from(offset).map_err(|_| libc::EINVAL)?;
        if off + data.len() > self.config.size() {
            return Err(libc::EINVAL);
        }
        if self.config.msi().is_some_and(|m| m.pvm) {
            self.drain(VFIO_PCI_MSI_IRQ_INDEX);
        }
        for (o, l, virt) in self.config.runs(off, data.len()) {
            let dst = data.get_mut(o - off..o - off + l).ok_or(libc::EINVAL)?;
            if virt {
                self.config.read(o, dst);
                if let (Some(cap), Some(m)) = (self.config.msi(), self.msi_model.as_ref()) {
                    cap.window().read(m, o as u64, dst);
                }
            } else {
                self.backend
                    .read(VFIO_PCI_CONFIG_REGION_INDEX, o as u64, dst)
                    .map_err(|e| errno_of(&e))?;
            }
        }
        Ok(())
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let off = usize::try_from(offset).map_err(|_| libc::EINVAL)?;
        if off + data.len() > self.config.size() {
            return Err(libc::EINVAL);
        }
        for (o, l, virt) in self.config.runs(off, data.len()) {
            let src = data.get(o - off..o - off + l).ok_or(libc::EINVAL)?;
            if !virt {
                self.backend
                    .write(VFIO_PCI_CONFIG_REGION_INDEX, o as u64, src)
                    .map_err(|e| errno_of(&e))?;
                continue;
            }
            // Mask changes may unmask: drain first (collapse caught events into pending).
            self.drain(VFIO_PCI_MSI_IRQ_INDEX);
            self.drain(VFIO_PCI_MSIX_IRQ_INDEX);
            let ch = self.config.write(o, src);
            if ch.msix_control {
                let (_, fmask) = self.config.msix_control();
                let on = self.active == Some(VFIO_PCI_MSIX_IRQ_INDEX);
                self.with_masks(VFIO_PCI_MSIX_IRQ_INDEX, |d| {
                    if let Some(m) = d.msix.as_mut() {
                        let _ = m.write_control(on, fmask);
                    }
                });
            }
            let msi = match (self.config.msi(), self.msi_model.as_ref()) {
                (Some(cap), Some(m)) => cap.window().collect(m, o as u64, src).zip(Some(cap)),
                _ => None,
            };
            if let Some(((regs, written), cap)) = msi {
                self.with_masks(VFIO_PCI_MSI_IRQ_INDEX, |d| {
                    d.msi_write(|m| apply_msi_write(m, cap.shape(), &regs, written));
                });
            }
        }
        Ok(())
    }

    fn host_command(&mut self, clear: u16) {
        let mut cmd = [0u8; 2];
        if self
            .backend
            .read(VFIO_PCI_CONFIG_REGION_INDEX, PCI_COMMAND, &mut cmd)
            .is_ok()
        {
            let v = u16::from_le_bytes(cmd) & !clear;
            if let Err(e) =
                self.backend
                    .write(VFIO_PCI_CONFIG_REGION_INDEX, PCI_COMMAND, &v.to_le_bytes())
            {
                warn!("passthrough: writing COMMAND: {e}");
            }
        }
    }

    fn unmap_all_dma(&mut self) {
        let all: Vec<(u64, u64)> = self.dma.iter().map(|(i, m)| (*i, m.size)).collect();
        for (iova, size) in all {
            self.dma_unmap(iova, size);
        }
    }
}

impl<B: VfioBackend> Drop for PassthroughDevice<B> {
    fn drop(&mut self) {
        let _ = self.disable_active();
        self.unmap_all_dma();
    }
}

impl<B: VfioBackend> VfioUserDevice for PassthroughDevice<B> {
    fn device_info(&self) -> DeviceInfo {
        // RESET is always offered: with a host reset method it is VFIO_DEVICE_RESET, without
        // one a reset of the virtual state with interrupts off and COMMAND cleared.
        pci::parts::pci_device_info()
    }

    fn region_info(&self, index: u32) -> RegionInfo<'_> {
        let absent = pci::parts::absent_region();
        let Some(host) = self.backend.region(index) else {
            return absent;
        };
        match index {
            0..=5 => {
                if host.size == 0 {
                    return absent;
                }
                let rw = host.flags & (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE);
                let mut info = RegionInfo {
                    flags: rw,
                    size: host.size,
                    offset: host.offset,
                    sparse_areas: Vec::new(),
                    mmap_fd: None,
                };
                if self.opts.mmap_bars && host.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
                    let areas = mmap_areas(host.size, self.msix_ranges(index));
                    if let (false, Some(fd)) = (areas.is_empty(), self.backend.mmap_fd()) {
                        info.flags |= VFIO_REGION_INFO_FLAG_MMAP;
                        info.sparse_areas = areas;
                        info.mmap_fd = Some(fd);
                    }
                }
                info
            }
            VFIO_PCI_ROM_REGION_INDEX if host.size > 0 => RegionInfo {
                flags: VFIO_REGION_INFO_FLAG_READ,
                size: host.size,
                offset: host.offset,
                ..absent
            },
            VFIO_PCI_CONFIG_REGION_INDEX => RegionInfo {
                flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
                size: self.config.size() as u64,
                offset: host.offset,
                ..absent
            },
            _ => absent,
        }
    }

    fn region_io_fds(&self, _index: u32) -> Vec<IoFd<'_>> {
        Vec::new()
    }

    fn irq_info(&self, index: u32) -> IrqInfo {
        let host = self.backend.irq(index).unwrap_or_default();
        match index {
            VFIO_PCI_MSI_IRQ_INDEX => IrqInfo {
                flags: host.flags & !VFIO_IRQ_INFO_MASKABLE,
                count: self.msi.len() as u32,
            },
            VFIO_PCI_MSIX_IRQ_INDEX => IrqInfo {
                // Any vector can be rebound at any time (the kernel index is enabled with the
                // whole table), and per-vector MASK/UNMASK act on the virtual table.
                flags: (host.flags & !VFIO_IRQ_INFO_NORESIZE) | VFIO_IRQ_INFO_MASKABLE,
                count: self.msix_vectors.len() as u32,
            },
            VFIO_PCI_INTX_IRQ_INDEX => IrqInfo {
                flags: host.flags,
                count: host.count.min(1),
            },
            VFIO_PCI_ERR_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX => IrqInfo {
                flags: host.flags & !VFIO_IRQ_INFO_MASKABLE,
                count: host.count.min(1),
            },
            _ => IrqInfo { flags: 0, count: 0 },
        }
    }

    fn set_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        match req.index {
            VFIO_PCI_INTX_IRQ_INDEX => self.set_intx(req),
            VFIO_PCI_MSI_IRQ_INDEX | VFIO_PCI_MSIX_IRQ_INDEX => self.set_vectors(req),
            i @ (VFIO_PCI_ERR_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX) => {
                let slot = (i - VFIO_PCI_ERR_IRQ_INDEX) as usize;
                let fd = match IrqOp::decode(req, 1)? {
                    IrqOp::Bind { fds, .. } => {
                        let fd = fds.into_iter().next().flatten();
                        self.forward_fd(i, VFIO_IRQ_SET_ACTION_TRIGGER, fd)?
                    }
                    IrqOp::Disable => {
                        self.backend
                            .set_irqs(&IrqSet::disable(i))
                            .map_err(|e| errno_of(&e))?;
                        None
                    }
                    IrqOp::Trigger(v) => {
                        return self.forward_none(i, VFIO_IRQ_SET_ACTION_TRIGGER, &v);
                    }
                    _ => return Err(libc::EINVAL),
                };
                if let Some(s) = self.other_triggers.get_mut(slot) {
                    *s = fd;
                }
                Ok(())
            }
            _ => Err(libc::EINVAL),
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        self.check_region(index, offset, data.len())?;
        match index {
            0..=5 => self.bar_access(index, offset, data.len(), None, Some(data)),
            VFIO_PCI_ROM_REGION_INDEX => self
                .backend
                .read(index, offset, data)
                .map_err(|e| errno_of(&e)),
            VFIO_PCI_CONFIG_REGION_INDEX => self.config_read(offset, data),
            _ => Err(libc::EINVAL),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.check_region(index, offset, data.len())?;
        match index {
            0..=5 => self.bar_access(index, offset, data.len(), Some(data), None),
            VFIO_PCI_CONFIG_REGION_INDEX => self.config_write(offset, data),
            _ => Err(libc::EINVAL),
        }
    }

    fn reset(&mut self) -> Result<(), Errno> {
        // Like QEMU's vfio pre-reset: MSI / MSI-X off (INTx bindings survive).
        if matches!(
            self.active,
            Some(VFIO_PCI_MSI_IRQ_INDEX | VFIO_PCI_MSIX_IRQ_INDEX)
        ) {
            let _ = self.disable_active();
        }
        self.drop_client_fds(VFIO_PCI_MSI_IRQ_INDEX);
        self.drop_client_fds(VFIO_PCI_MSIX_IRQ_INDEX);
        self.config.reset();
        if let Some(m) = self.msix.as_mut() {
            m.reset();
        }
        if let Some(m) = self.msi_model.take() {
            self.msi_model = Some(enabled_msi(m));
        }
        if self.backend.device_flags() & VFIO_DEVICE_FLAGS_RESET != 0 {
            info!("passthrough: DEVICE_RESET: VFIO_DEVICE_RESET and a reset of the virtual state");
            self.backend.reset().map_err(|e| errno_of(&e))
        } else {
            info!(
                "passthrough: the host device has no reset method; reset of the virtual state only, COMMAND I/O, memory and bus master cleared"
            );
            self.host_command(PCI_COMMAND_IO_MEM_MASTER);
            Ok(())
        }
    }

    fn client_disconnected(&mut self) {
        // Quiesce: interrupts off, client fds dropped, bus mastering off; the server already
        // unmapped the client's DMA (and anything left is unmapped here).
        if let Err(e) = self.disable_active() {
            warn!("passthrough: disabling interrupts: errno {e}");
        }
        for (i, t) in self.other_triggers.iter_mut().enumerate() {
            if t.take().is_some() {
                let index = VFIO_PCI_ERR_IRQ_INDEX + i as u32;
                let _ = self.backend.set_irqs(&IrqSet::disable(index));
            }
        }
        self.drop_client_fds(VFIO_PCI_INTX_IRQ_INDEX);
        self.drop_client_fds(VFIO_PCI_MSI_IRQ_INDEX);
        self.drop_client_fds(VFIO_PCI_MSIX_IRQ_INDEX);
        self.host_command(PCI_COMMAND_MASTER);
        self.unmap_all_dma();
        info!(
            "passthrough: client gone; device quiesced ({:?})",
            self.stats()
        );
    }

    fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
        let Some(index) = self.active.filter(|i| *i != VFIO_PCI_INTX_IRQ_INDEX) else {
            return Vec::new();
        };
        self.vectors(index)
            .iter()
            .enumerate()
            .filter(|(_, v)| v.kernel == Bound::Catcher)
            .map(|(i, v)| (eventfd_fd(&v.catcher), token(index, i)))
            .collect()
    }

    fn handle_fd_event(&mut self, token: u64) {
        let index = (token >> 32) as u32;
        let v = (token & 0xffff_ffff) as usize;
        if self.active != Some(index) {
            return;
        }
        let fired = self
            .vectors(index)
            .get(v)
            .is_some_and(|x| x.kernel == Bound::Catcher && x.drain());
        if fired {
            self.stats.caught += 1;
            self.event(index, v);
        }
    }

    fn try_dma_map(&mut self, map: &DmaMapping) -> Result<(), Errno> {
        let Some(fd) = map.fd() else {
            warn!(
                "passthrough: DMA_MAP {:#x}+{:#x} without a file: the device cannot reach it",
                map.iova(),
                map.size()
            );
            return Ok(());
        };
        if map.iova() % PAGE != 0 || map.size() % PAGE != 0 || map.file_offset() % PAGE != 0 {
            return Err(libc::EINVAL);
        }
        let len = usize::try_from(map.size()).map_err(|_| libc::EINVAL)?;
        let off = libc::off_t::try_from(map.file_offset()).map_err(|_| libc::EINVAL)?;
        check_inside_file(fd, map.file_offset(), map.size())?;
        let mut prot = 0;
        if map.flags() & VFIO_DMA_MAP_FLAG_READ != 0 {
            prot |= libc::PROT_READ;
        }
        if map.flags() & VFIO_DMA_MAP_FLAG_WRITE != 0 {
            prot |= libc::PROT_READ | libc::PROT_WRITE;
        }
        if prot == 0 {
            return Err(libc::EINVAL);
        }
        // SAFETY: a new shared mapping of the client's file; nothing else is at the address
        // the kernel picks, and this process never dereferences it (only the IOMMU uses it).
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(errno_of(&std::io::Error::last_os_error()));
        }
        let flags = map.flags() & (VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE);
        if let Err(e) = self
            .backend
            .dma_map(host as u64, map.iova(), map.size(), flags)
        {
            // SAFETY: unmapping exactly the mapping made above.
            unsafe { libc::munmap(host, len) };
            return Err(errno_of(&e));
        }
        self.dma.insert(
            map.iova(),
            DmaMap {
                host: host as usize,
                size: map.size(),
            },
        );
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) {
        let Some(m) = self.dma.remove(&iova) else {
            return;
        };
        if m.size != size {
            debug!(
                "passthrough: DMA unmap size {size:#x} differs from {:#x}",
                m.size
            );
        }
        if let Err(e) = self.backend.dma_unmap(iova, m.size) {
            warn!(
                "passthrough: VFIO_IOMMU_UNMAP_DMA {iova:#x}+{:#x}: {e}",
                m.size
            );
        }
        if let Ok(len) = usize::try_from(m.size) {
            // SAFETY: `host`/`len` are a mapping made in try_dma_map, unmapped once.
            unsafe { libc::munmap(m.host as *mut libc::c_void, len) };
        }
    }
}

/// The VFIO action of a MASK (`masked`) or UNMASK request.
fn mask_action(masked: bool) -> u32 {
    if masked {
        VFIO_IRQ_SET_ACTION_MASK
    } else {
        VFIO_IRQ_SET_ACTION_UNMASK
    }
}

/// The MSI model back to power-on, then enabled with every vector: whether MSI is on is the
/// kernel's MSI index (`SET_IRQS`), not the guest's Enable bit.
fn enabled_msi(mut m: Msi) -> Msi {
    m.reset();
    let mmc = m.mmc();
    let _ = m.write_control(true, mmc);
    m
}

/// A client file must hold the whole range it maps (a memfd or regular file); other kinds
/// (hugetlbfs, devices) are left to mmap and the IOMMU to judge.
fn check_inside_file(fd: &OwnedFd, offset: u64, size: u64) -> Result<(), Errno> {
    // SAFETY: fstat into a zeroed stat buffer on a live descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(errno_of(&std::io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFREG {
        let file_size = u64::try_from(st.st_size).unwrap_or(0);
        if offset.checked_add(size).is_none_or(|end| end > file_size) {
            return Err(libc::EINVAL);
        }
    }
    Ok(())
}

/// The page-aligned parts of a BAR of `size` bytes that hold neither the MSI-X table nor the
/// PBA.
fn mmap_areas(size: u64, (table, pba): MsixRanges) -> Vec<SparseArea> {
    let mut holes: Vec<(u64, u64)> = [table, pba]
        .into_iter()
        .flatten()
        .filter(|(_, l)| *l > 0)
        .map(|(o, l)| (o / PAGE * PAGE, (o + l).div_ceil(PAGE) * PAGE))
        .collect();
    holes.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    let end = size;
    for (s, e) in holes {
        let stop = s.min(end);
        if stop > at {
            out.push(SparseArea {
                offset: at,
                size: stop - at,
            });
        }
        at = at.max(e);
    }
    if at < end {
        out.push(SparseArea {
            offset: at,
            size: end - at,
        });
    }
    out.retain(|a| a.size > 0);
    out
}

#[cfg(test)]
mod tests;
