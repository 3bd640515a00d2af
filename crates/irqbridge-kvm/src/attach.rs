// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Attaching a vfio-user PCI device to a KVM VM: [`AttachedDevice`].
//!
//! [`AttachedDevice::attach`] does, in order:
//!
//! 1. connect (with retry until the deadline) and VERSION;
//! 2. DEVICE_GET_INFO, DEVICE_GET_REGION_INFO for every region, DEVICE_GET_IRQ_INFO for every
//!    index; the MSI-X capability is found by walking the config-space capability list;
//! 3. DMA_MAP of the guest RAM regions the VMM passes (memfd + file offset + GPA + size), so
//!    the server reaches guest memory through its own mmap;
//! 4. INTx, in QEMU's order (`vfio_intx_enable_kvm`):
//!    SET_IRQS(INTx, TRIGGER|EVENTFD, trigger) → SET_IRQS(INTx, MASK|NONE) →
//!    `KVM_IRQFD{trigger, gsi, RESAMPLE, resamplefd}` → SET_IRQS(INTx, UNMASK|EVENTFD,
//!    resamplefd) → SET_IRQS(INTx, UNMASK|NONE). The device auto-masks the line when it
//!    triggers; the guest's EOI makes KVM de-assert the GSI and signal the resample eventfd,
//!    which the device reads as UNMASK and re-triggers if the line is still high. Masking
//!    around the irqfd setup keeps the device from triggering into a half-built path. With a
//!    split irqchip KVM refuses resample: the trigger is a plain irqfd and the VMM reports each
//!    EOI with [`AttachedDevice::eoi`] (an UNMASK|NONE message);
//! 5. MSI-X: one eventfd and GSI per vector, each registered as an irqfd, and all of them bound
//!    to the device once (SET_IRQS(MSIX, TRIGGER|EVENTFD) in chunks of the server's
//!    `max_msg_fds`). The device owns masking and the PBA (`docs/device-abi.md`): binding
//!    clears a vector's mask bit, which is why it happens here, before any guest table write
//!    is forwarded. Trapped table writes go to the device *and* are mirrored into the vector's
//!    MSI route (committed before the write is forwarded, so an event the write unleashes
//!    takes the new route). A vector the guest masks keeps its irqfd: the device holds the
//!    event in its PBA and writes the irqfd once on unmask;
//!
//!    MSI ([`crate::msi`]): one eventfd and GSI per vector the capability offers, all masked
//!    and unbound at attach. The guest's config writes to the MSI capability drive them:
//!    on enable, routes for the enabled vectors (vector `i` sends Message Data with its low
//!    bits replaced by `i`), irqfds for the unmasked ones, SET_IRQS(INTx, NONE|TRIGGER, 0, 0)
//!    (the kernel binds MSI only with no other index bound) and SET_IRQS(MSI, TRIGGER|EVENTFD)
//!    before the write is forwarded; a mask bit deassigns the vector's irqfd (events stay
//!    pending and show in the Pending Bits, one injection on unmask); disable drops pending
//!    events, unbinds MSI and binds INTx again. A device whose MSI was enabled before a
//!    reconnect is wired again at attach;
//! 6. doorbells: every ioeventfd of DEVICE_GET_REGION_IO_FDS becomes a `KVM_IOEVENTFD` at the
//!    BAR's guest address + offset (with datamatch when given): guest writes reach the server
//!    with no VM exit and no message;
//! 7. mmap of each mappable BAR's sparse areas (never over the MSI-X table or PBA), handed to
//!    the VMM as [`MappedRegion`]s to install as memory slots.
//!
//! The VMM then forwards trapped BAR and config-space accesses with
//! [`AttachedDevice::mmio_read`] / [`AttachedDevice::mmio_write`] /
//! [`AttachedDevice::config_read`] / [`AttachedDevice::config_write`]. BAR registers in config
//! space are the VMM's to emulate (as Cloud Hypervisor does); when the guest moves a BAR, call
//! [`AttachedDevice::set_bar_gpa`].
//!
//! [`AttachedDevice::detach`] undoes it in reverse and closes the connection; the server keeps
//! the device state for the next client.

use std::fmt;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use irqbridge_vfio_user::proto::{
    KVM_IOEVENTFD_FLAG_PIO, SparseMmapArea, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_USER_F_DMA_REGION_READ,
    VFIO_USER_F_DMA_REGION_WRITE, VFIO_USER_IO_FD_TYPE_IOEVENTFD,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::client::{
    Client, ClientConfig, DEFAULT_TIMEOUT, DeviceInfo, Error as ClientError, IoFd, IrqInfo,
};
use crate::interrupt::{
    InterruptSourceGroup, LegacyInterruptGroup, MsiInterruptGroup, MsiIrqSourceConfig,
};
use crate::mmap::{MappedRegion, RegionMapping, page_size};
use crate::msi::{self, MsiLayout, MsiRegs, PCI_CAP_ID_MSI};
use crate::routing::{IrqChip, SharedGsiRouter};
use crate::{Error, Result, eventfd_as_fd};

/// Number of PCI BARs.
pub const NUM_BARS: usize = 6;

/// PCI capability id of MSI-X.
const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Status register and its capability-list bit.
const PCI_STATUS: u64 = 0x06;
const PCI_STATUS_CAP_LIST: u16 = 0x10;
/// Capability pointer.
const PCI_CAPABILITY_LIST: u64 = 0x34;
/// Bytes per MSI-X table entry.
const MSIX_ENTRY_SIZE: u64 = 16;
/// Most capabilities walked before the list is declared looped.
const MAX_CAPS: usize = 48;

/// A guest RAM region the server may DMA to, shared through its file.
#[derive(Clone, Copy, Debug)]
pub struct GuestRam<'a> {
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The file backing the region (a memfd or hugetlbfs file, mapped shared by the VMM).
    pub fd: BorrowedFd<'a>,
    /// Offset of the region in `fd`.
    pub file_offset: u64,
}

/// What [`AttachedDevice::attach`] wires up.
#[derive(Clone, Debug)]
pub struct AttachConfig<'a> {
    /// GSI of the device's INTx line (its IOAPIC pin with the full irqchip); `None` leaves
    /// INTx unconnected.
    pub intx_gsi: Option<u32>,
    /// Guest physical address of each BAR (ioeventfds and memory slots are placed there).
    pub bar_gpas: [Option<u64>; NUM_BARS],
    /// BARs without an address in `bar_gpas` are laid out from here (see [`layout_bars`]);
    /// `None` leaves them unplaced.
    pub bar_base: Option<u64>,
    /// Guest RAM to DMA_MAP.
    pub guest_ram: Vec<GuestRam<'a>>,
    /// Wire MSI-X (if the device has it).
    pub msix: bool,
    /// Wire MSI (if the device has it): vectors follow the guest's config writes.
    pub msi: bool,
    /// Register the device's ioeventfds.
    pub ioeventfds: bool,
    /// mmap the mappable BARs.
    pub mmap_bars: bool,
    /// Send trapped BAR writes as posted writes (NO_REPLY), like QEMU; config-space writes
    /// always wait for the reply.
    pub posted_writes: bool,
    /// How long to keep trying to connect.
    pub connect_timeout: Duration,
    /// Per-message reply timeout.
    pub timeout: Duration,
}

impl Default for AttachConfig<'_> {
    fn default() -> Self {
        AttachConfig {
            intx_gsi: None,
            bar_gpas: [None; NUM_BARS],
            bar_base: None,
            guest_ram: Vec::new(),
            msix: true,
            msi: true,
            ioeventfds: true,
            mmap_bars: true,
            posted_writes: true,
            connect_timeout: DEFAULT_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Places BARs of the given sizes (0 = absent) from `base` upward, each naturally aligned to
/// its size rounded up to a power of two and at least one page. Returns `None` for absent BARs
/// and for BARs that would not fit below 2^64.
pub fn layout_bars(sizes: [u64; NUM_BARS], base: u64) -> [Option<u64>; NUM_BARS] {
    let mut out = [None; NUM_BARS];
    let mut next = Some(base);
    for (bar, size) in sizes.iter().enumerate() {
        if *size == 0 {
            continue;
        }
        let Some(span) = (*size).max(page_size()).checked_next_power_of_two() else {
            continue;
        };
        let Some(at) = next.and_then(|n| n.checked_next_multiple_of(span)) else {
            break;
        };
        out[bar] = Some(at);
        next = at.checked_add(span);
    }
    out
}

/// Where the MSI-X table and PBA live, from the device's MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    /// Config-space offset of the capability.
    pub cap_offset: u64,
    /// Table size.
    pub vectors: u16,
    /// BAR of the table.
    pub table_bar: u32,
    /// Offset of the table in its BAR.
    pub table_offset: u64,
    /// BAR of the PBA.
    pub pba_bar: u32,
    /// Offset of the PBA in its BAR.
    pub pba_offset: u64,
}

impl MsixLayout {
    /// Byte range of the table in its BAR.
    pub fn table_range(&self) -> std::ops::Range<u64> {
        self.table_offset..self.table_offset + u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }

    /// Byte range of the PBA in its BAR.
    pub fn pba_range(&self) -> std::ops::Range<u64> {
        self.pba_offset..self.pba_offset + u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// An ioeventfd the attachment registered (or could not place yet).
#[derive(Debug)]
struct IoEvent {
    bar: u32,
    offset: u64,
    size: u64,
    datamatch: Option<u64>,
    pio: bool,
    fd: EventFd,
    /// Address it is registered at.
    registered_at: Option<u64>,
}

/// Public view of one ioeventfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoEventInfo {
    /// BAR index.
    pub bar: u32,
    /// Offset in the BAR.
    pub offset: u64,
    /// Access size the server asked for.
    pub size: u64,
    /// Datamatch value, if any.
    pub datamatch: Option<u64>,
    /// Port I/O rather than MMIO.
    pub pio: bool,
    /// Guest address it is registered at (`None` while its BAR has no address).
    pub address: Option<u64>,
}

/// Per-region facts kept after attach (the mmap fd is consumed by the mappings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSummary {
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0 = absent).
    pub size: u64,
}

/// Shadow of the guest-programmed address/data of one MSI-X vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MsixShadow {
    bytes: [u8; 12],
}

impl MsixShadow {
    fn route(&self) -> Option<MsiIrqSourceConfig> {
        let w = |i: usize| {
            u32::from_le_bytes([
                self.bytes[i],
                self.bytes[i + 1],
                self.bytes[i + 2],
                self.bytes[i + 3],
            ])
        };
        let cfg = MsiIrqSourceConfig {
            low_addr: w(0),
            high_addr: w(4),
            data: w(8),
            devid: 0,
        };
        // An unprogrammed (zero) address is no destination: leave the GSI without a route.
        (cfg.address() != 0).then_some(cfg)
    }
}

struct Msix {
    layout: MsixLayout,
    group: MsiInterruptGroup,
    shadow: Mutex<Vec<MsixShadow>>,
}

/// MSI: the group of `layout.vectors` vectors and the shadow of the guest's registers. The
/// lock on `regs` is held across a whole config write (KVM steps and forwarding), so
/// concurrent writes reach KVM and the device in the same order.
struct Msi {
    layout: MsiLayout,
    group: MsiInterruptGroup,
    regs: Mutex<MsiRegs>,
}

/// What the capability walk found.
#[derive(Default)]
struct Caps {
    msix: Option<MsixLayout>,
    /// Offset and Message Control of the MSI capability.
    msi: Option<(u64, u16)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn kvm_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// A vfio-user PCI device wired into a KVM VM; see the [module documentation](self).
pub struct AttachedDevice {
    vm: Arc<VmFd>,
    client: Mutex<Client>,
    chip: IrqChip,
    info: DeviceInfo,
    regions: Vec<RegionSummary>,
    irqs: Vec<IrqInfo>,
    bar_gpas: [Option<u64>; NUM_BARS],
    posted_writes: bool,
    dma: Vec<(u64, u64)>,
    intx: Option<LegacyInterruptGroup>,
    msix: Option<Msix>,
    msi: Option<Msi>,
    ioevents: Vec<IoEvent>,
    mappings: Vec<RegionMapping>,
}

impl fmt::Debug for AttachedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttachedDevice")
            .field("info", &self.info)
            .field("chip", &self.chip)
            .field("bar_gpas", &self.bar_gpas)
            .field("intx", &self.intx)
            .field("msix", &self.msix.as_ref().map(|m| (&m.layout, &m.group)))
            .field("msi", &self.msi.as_ref().map(|m| (&m.layout, &m.group)))
            .field("ioevents", &self.ioevents.len())
            .field("mappings", &self.mappings)
            .finish()
    }
}

impl AttachedDevice {
    /// Connects to the vfio-user server at `socket_path` and wires the device into `vm`; see
    /// the [module documentation](self) for the steps and their order. The irqchip model
    /// (resample INTx or not) is the router's.
    ///
    /// On failure everything done so far is undone (irqfds and ioeventfds deassigned, GSIs
    /// freed, mappings dropped) and the connection closed.
    ///
    /// # Errors
    ///
    /// [`Error::Client`] with [`ClientError::Connect`] if the server cannot be reached in
    /// time; [`Error::Unsupported`] for a device that is not PCI; [`ClientError::Remote`]
    /// when the server refuses a step;
    /// [`Error::Kvm`] when an irqfd, ioeventfd or routing ioctl fails; [`Error::Mmap`];
    /// transport errors.
    pub fn attach(
        vm: Arc<VmFd>,
        router: SharedGsiRouter,
        socket_path: &Path,
        config: AttachConfig<'_>,
    ) -> Result<Self> {
        let client_config = ClientConfig {
            connect_timeout: config.connect_timeout,
            call_timeout: config.timeout,
            ..ClientConfig::default()
        };
        let mut client = Client::connect(socket_path, &client_config)?;
        let chip = lock(&router).irqchip();

        // 2. Enumerate.
        let info = client.device_info()?;
        if !info.is_pci() {
            return Err(Error::Unsupported(
                "the vfio-user device is not a PCI device".into(),
            ));
        }
        let mut region_infos = Vec::with_capacity(info.num_regions as usize);
        for index in 0..info.num_regions {
            region_infos.push(client.region_info(index)?);
        }
        let mut irqs = Vec::with_capacity(info.num_irqs as usize);
        for index in 0..info.num_irqs {
            irqs.push(client.irq_info(index)?);
        }
        let regions: Vec<RegionSummary> = region_infos
            .iter()
            .map(|r| RegionSummary {
                flags: r.flags,
                size: r.size,
            })
            .collect();
        let mut sizes = [0u64; NUM_BARS];
        for (bar, size) in sizes.iter_mut().enumerate() {
            *size = regions.get(bar).map_or(0, |r| r.size);
        }
        let mut bar_gpas = config.bar_gpas;
        if let Some(base) = config.bar_base {
            let free: [u64; NUM_BARS] =
                std::array::from_fn(|i| if bar_gpas[i].is_none() { sizes[i] } else { 0 });
            // Start above every fixed BAR so auto-placed ones cannot overlap them.
            let floor = (0..NUM_BARS)
                .filter_map(|i| bar_gpas[i].map(|g| g.saturating_add(sizes[i])))
                .fold(base, u64::max);
            for (i, gpa) in layout_bars(free, floor).into_iter().enumerate() {
                if bar_gpas[i].is_none() {
                    bar_gpas[i] = gpa;
                }
            }
        }
        for (bar, gpa) in bar_gpas.iter_mut().enumerate() {
            if sizes[bar] == 0 {
                *gpa = None;
            }
        }

        let mut dev = AttachedDevice {
            vm,
            client: Mutex::new(client),
            chip,
            info,
            regions,
            irqs,
            bar_gpas,
            posted_writes: config.posted_writes,
            dma: Vec::new(),
            intx: None,
            msix: None,
            msi: None,
            ioevents: Vec::new(),
            mappings: Vec::new(),
        };
        // From here on, `dev`'s Drop undoes what was done if a step fails.

        // 3. Guest RAM.
        for ram in &config.guest_ram {
            dev.client().dma_map(
                VFIO_USER_F_DMA_REGION_READ | VFIO_USER_F_DMA_REGION_WRITE,
                Some(ram.fd),
                ram.file_offset,
                ram.gpa,
                ram.size,
            )?;
            dev.dma.push((ram.gpa, ram.size));
        }

        // 4. INTx.
        if let Some(gsi) = config.intx_gsi
            && dev
                .irq(VFIO_PCI_INTX_IRQ_INDEX)
                .is_some_and(|i| i.count > 0)
        {
            dev.wire_intx(&router, gsi)?;
        }

        // 5. MSI-X, then MSI.
        let caps = if config.msix || config.msi {
            dev.find_caps()?
        } else {
            Caps::default()
        };
        if config.msix
            && let Some(count) = dev
                .irq(VFIO_PCI_MSIX_IRQ_INDEX)
                .map(|i| i.count)
                .filter(|c| *c > 0)
            && let Some(layout) = caps.msix
        {
            dev.wire_msix(&router, layout, count)?;
        }
        if config.msi
            && let Some(count) = dev.irq(VFIO_PCI_MSI_IRQ_INDEX).map(|i| i.count)
            && let Some((offset, control)) = caps.msi
            && let Some(layout) = MsiLayout::new(offset, control, count)
        {
            dev.wire_msi(&router, layout)?;
        }

        // 6. Doorbells.
        if config.ioeventfds {
            dev.fetch_ioevents()?;
        }

        // 7. BAR mmaps.
        if config.mmap_bars {
            dev.map_bars(region_infos)?;
        }
        Ok(dev)
    }

    fn client(&self) -> MutexGuard<'_, Client> {
        lock(&self.client)
    }

    fn irq(&self, index: u32) -> Option<IrqInfo> {
        self.irqs.get(index as usize).copied()
    }

    fn wire_intx(&mut self, router: &SharedGsiRouter, gsi: u32) -> Result<()> {
        let group = LegacyInterruptGroup::new(self.vm.clone(), router.clone(), gsi)?;
        let group = self.intx.insert(group);
        bind_intx(&mut lock(&self.client), group)
    }

    /// Walks the config-space capability list for MSI-X and MSI.
    fn find_caps(&self) -> Result<Caps> {
        let read = |off: u64, len: usize| -> Result<u32> {
            let mut b = [0u8; 4];
            self.client()
                .region_read(VFIO_PCI_CONFIG_REGION_INDEX, off, &mut b[..len])?;
            Ok(u32::from_le_bytes(b))
        };
        let mut caps = Caps::default();
        if read(PCI_STATUS, 2)? as u16 & PCI_STATUS_CAP_LIST == 0 {
            return Ok(caps);
        }
        let mut ptr = u64::from(read(PCI_CAPABILITY_LIST, 1)? as u8 & !3);
        for _ in 0..MAX_CAPS {
            if ptr < 0x40 {
                return Ok(caps);
            }
            let head = read(ptr, 4)?;
            let control = (head >> 16) as u16;
            match head as u8 {
                PCI_CAP_ID_MSIX if caps.msix.is_none() => {
                    let table = read(ptr + 4, 4)?;
                    let pba = read(ptr + 8, 4)?;
                    caps.msix = Some(MsixLayout {
                        cap_offset: ptr,
                        vectors: (control & 0x7ff) + 1,
                        table_bar: table & 7,
                        table_offset: u64::from(table & !7),
                        pba_bar: pba & 7,
                        pba_offset: u64::from(pba & !7),
                    });
                }
                PCI_CAP_ID_MSI if caps.msi.is_none() => caps.msi = Some((ptr, control)),
                _ => {}
            }
            ptr = u64::from((head >> 8) as u8 & !3);
        }
        log::warn!("irqbridge-kvm: config-space capability list does not end");
        Ok(caps)
    }

    fn wire_msix(
        &mut self,
        router: &SharedGsiRouter,
        mut layout: MsixLayout,
        count: u32,
    ) -> Result<()> {
        let vectors = u32::from(layout.vectors).min(count);
        if vectors != count || vectors != u32::from(layout.vectors) {
            log::warn!(
                "irqbridge-kvm: MSI-X table has {} entries, IRQ index {count}; using {vectors}",
                layout.vectors
            );
        }
        layout.vectors = u16::try_from(vectors).unwrap_or(u16::MAX);
        if layout.table_bar as usize >= NUM_BARS || layout.pba_bar as usize >= NUM_BARS {
            return Err(Error::Unsupported(format!(
                "MSI-X table in BAR {} / PBA in BAR {}",
                layout.table_bar, layout.pba_bar
            )));
        }
        let group = MsiInterruptGroup::new(self.vm.clone(), router.clone(), vectors)?;
        // Every vector live from the start: the device, not KVM, decides what is masked.
        for v in 0..vectors {
            group.set_masked(v, false)?;
        }
        // The device's table is the truth (it survives reconnects): start the shadow and the
        // routes from it. MSI-X tables take only DWORD/QWORD accesses: one QWORD for the
        // address, one DWORD for the data.
        let mut shadow = Vec::with_capacity(vectors as usize);
        for v in 0..vectors {
            let entry = layout.table_offset + u64::from(v) * MSIX_ENTRY_SIZE;
            let mut s = MsixShadow::default();
            {
                let mut client = self.client();
                client.region_read(layout.table_bar, entry, &mut s.bytes[..8])?;
                client.region_read(layout.table_bar, entry + 8, &mut s.bytes[8..12])?;
            }
            group.set_route(v, s.route())?;
            shadow.push(s);
        }
        group.set_gsi()?;
        // Bind after the irqfds are live; binding clears each vector's mask bit in the device.
        let fds = group.notifiers()?;
        let list: Vec<Option<BorrowedFd<'_>>> =
            fds.iter().map(|f| Some(eventfd_as_fd(f))).collect();
        self.client().set_irq_eventfds(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            &list,
        )?;
        self.msix = Some(Msix {
            layout,
            group,
            shadow: Mutex::new(shadow),
        });
        Ok(())
    }

    fn wire_msi(&mut self, router: &SharedGsiRouter, layout: MsiLayout) -> Result<()> {
        // Every vector starts masked (not registered); the guest's config writes decide.
        let group = MsiInterruptGroup::new(self.vm.clone(), router.clone(), layout.vectors)?;
        let device = self.read_msi_regs(&layout)?;
        let msi = self.msi.insert(Msi {
            layout,
            group,
            regs: Mutex::new(MsiRegs::default()),
        });
        // The device keeps its registers across reconnects: start from them. If the guest had
        // MSI enabled, the device dropped our predecessor's eventfds with the connection;
        // wire and bind again (nothing to forward).
        let mut regs = lock(&msi.regs);
        let mut off = device;
        off.write(&layout, layout.cap_offset + 2, &[0, 0]);
        *regs = off;
        if device.enabled() {
            let steps = msi::plan(&layout, &off, &device);
            *regs = device;
            run_msi_steps(
                &mut lock(&self.client),
                self.intx.as_ref(),
                &msi.group,
                &steps,
                None,
            )?;
        } else {
            *regs = device;
        }
        Ok(())
    }

    fn read_msi_regs(&self, layout: &MsiLayout) -> Result<MsiRegs> {
        let mut image = [0u8; msi::MSI_CAP_MAX_SIZE];
        let len = layout.size().min(image.len());
        self.client().region_read(
            VFIO_PCI_CONFIG_REGION_INDEX,
            layout.cap_offset,
            &mut image[..len],
        )?;
        Ok(MsiRegs::from_image(&image[..len]))
    }

    fn fetch_ioevents(&mut self) -> Result<()> {
        for bar in 0..NUM_BARS as u32 {
            if self.regions.get(bar as usize).is_none_or(|r| r.size == 0) {
                continue;
            }
            let fds = match self.client().region_io_fds(bar) {
                Ok(fds) => fds,
                // Servers without io fds (QEMU never asks; libvfio-user may not implement it).
                Err(ClientError::Remote { errno, .. })
                    if matches!(
                        errno,
                        libc::ENOSYS | libc::EINVAL | libc::ENOTSUP | libc::ENOTTY | libc::ENOENT
                    ) =>
                {
                    log::debug!("irqbridge-kvm: no io fds for BAR {bar} (errno {errno})");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for IoFd {
                offset,
                size,
                kind,
                flags,
                datamatch,
                fd,
            } in fds
            {
                if kind != VFIO_USER_IO_FD_TYPE_IOEVENTFD {
                    log::warn!("irqbridge-kvm: BAR {bar}: io fd type {kind} not supported");
                    continue;
                }
                if datamatch.is_some() && !matches!(size, 1 | 2 | 4 | 8) {
                    log::warn!("irqbridge-kvm: BAR {bar}: datamatch of {size} bytes ignored");
                    continue;
                }
                // SAFETY: `fd` is an owned descriptor received from the server; its ownership
                // moves into the EventFd. KVM checks that it is an eventfd.
                let fd = unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) };
                self.ioevents.push(IoEvent {
                    bar,
                    offset,
                    size,
                    datamatch,
                    pio: flags & KVM_IOEVENTFD_FLAG_PIO != 0,
                    fd,
                    registered_at: None,
                });
            }
        }
        for i in 0..self.ioevents.len() {
            self.place_ioevent(i)?;
        }
        Ok(())
    }

    /// Registers ioevent `i` at its BAR's current address (if it has one).
    fn place_ioevent(&mut self, i: usize) -> Result<()> {
        let Some(ev) = self.ioevents.get(i) else {
            return Ok(());
        };
        let Some(base) = self.bar_gpas.get(ev.bar as usize).copied().flatten() else {
            return Ok(());
        };
        let addr = base.checked_add(ev.offset).ok_or_else(|| {
            Error::InvalidArgument(format!("BAR {} ioeventfd offset overflows", ev.bar))
        })?;
        ioevent(&self.vm, ev, addr, true)?;
        if let Some(ev) = self.ioevents.get_mut(i) {
            ev.registered_at = Some(addr);
        }
        Ok(())
    }

    fn unplace_ioevent(&mut self, i: usize) -> Result<()> {
        let Some(ev) = self.ioevents.get(i) else {
            return Ok(());
        };
        if let Some(addr) = ev.registered_at {
            ioevent(&self.vm, ev, addr, false)?;
        }
        if let Some(ev) = self.ioevents.get_mut(i) {
            ev.registered_at = None;
        }
        Ok(())
    }

    fn map_bars(&mut self, infos: Vec<crate::client::RegionInfo>) -> Result<()> {
        let page = page_size();
        for info in infos.into_iter().take(NUM_BARS) {
            let bar = info.index;
            let areas = info.mmap_areas();
            if areas.is_empty() {
                continue;
            }
            let Some(fd) = info.fd.as_ref() else {
                log::warn!("irqbridge-kvm: BAR {bar} is mappable but came without an fd");
                continue;
            };
            for SparseMmapArea { offset, size } in areas {
                if offset % page != 0 || size % page != 0 || size == 0 {
                    log::warn!(
                        "irqbridge-kvm: BAR {bar}: unaligned sparse area {offset:#x}+{size:#x}"
                    );
                    continue;
                }
                if offset.checked_add(size).is_none_or(|end| end > info.size) {
                    log::warn!("irqbridge-kvm: BAR {bar}: sparse area beyond the region");
                    continue;
                }
                if self.overlaps_msix(bar, offset, size) {
                    // The table and PBA must stay trapped or MSI-X routing silently breaks.
                    log::warn!("irqbridge-kvm: BAR {bar}: not mapping the MSI-X table/PBA pages");
                    continue;
                }
                let file_offset = info.offset.checked_add(offset).ok_or_else(|| {
                    Error::InvalidArgument(format!("BAR {bar}: mmap offset overflows"))
                })?;
                let mut m = RegionMapping::new(
                    std::os::fd::AsFd::as_fd(fd),
                    bar,
                    offset,
                    file_offset,
                    size,
                    info.is_writable(),
                )?;
                let gpa = self.bar_gpa(bar).and_then(|g| g.checked_add(offset));
                m.set_gpa(gpa);
                self.mappings.push(m);
            }
        }
        Ok(())
    }

    fn overlaps_msix(&self, bar: u32, offset: u64, size: u64) -> bool {
        let Some(m) = &self.msix else { return false };
        let page = page_size();
        let overlaps = |r: std::ops::Range<u64>| {
            // Whole pages: the table/PBA pages may not be mapped at all.
            let start = r.start / page * page;
            let end = r.end.div_ceil(page) * page;
            offset < end && start < offset + size
        };
        (m.layout.table_bar == bar && overlaps(m.layout.table_range()))
            || (m.layout.pba_bar == bar && overlaps(m.layout.pba_range()))
    }

    /// DEVICE_GET_INFO as read at attach time.
    pub fn device_info(&self) -> DeviceInfo {
        self.info
    }

    /// Flags and size of region `index`.
    pub fn region(&self, index: u32) -> Option<RegionSummary> {
        self.regions.get(index as usize).copied()
    }

    /// DEVICE_GET_IRQ_INFO of `index` as read at attach time.
    pub fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.irq(index)
    }

    /// The irqchip model the device was wired for.
    pub fn irqchip(&self) -> IrqChip {
        self.chip
    }

    /// Guest address of `bar`.
    pub fn bar_gpa(&self, bar: u32) -> Option<u64> {
        self.bar_gpas.get(bar as usize).copied().flatten()
    }

    /// The INTx group, if INTx is wired. With a split irqchip the VMM's IOAPIC sets the
    /// GSI's route through it (`update` with an `MsiIrq` config).
    pub fn intx(&self) -> Option<&LegacyInterruptGroup> {
        self.intx.as_ref()
    }

    /// The MSI-X vectors, if MSI-X is wired.
    pub fn msix(&self) -> Option<&MsiInterruptGroup> {
        self.msix.as_ref().map(|m| &m.group)
    }

    /// The MSI vectors, if MSI is wired (vector `i` of the group is MSI vector `i`).
    pub fn msi(&self) -> Option<&MsiInterruptGroup> {
        self.msi.as_ref().map(|m| &m.group)
    }

    /// The MSI capability, if MSI is wired.
    pub fn msi_layout(&self) -> Option<MsiLayout> {
        self.msi.as_ref().map(|m| m.layout)
    }

    /// Where the MSI-X table and PBA are, if MSI-X is wired.
    pub fn msix_layout(&self) -> Option<MsixLayout> {
        self.msix.as_ref().map(|m| m.layout)
    }

    /// The ioeventfds the server asked for.
    pub fn ioevents(&self) -> Vec<IoEventInfo> {
        self.ioevents
            .iter()
            .map(|e| IoEventInfo {
                bar: e.bar,
                offset: e.offset,
                size: e.size,
                datamatch: e.datamatch,
                pio: e.pio,
                address: e.registered_at,
            })
            .collect()
    }

    /// The BAR mappings (owning; unmapped when the device is dropped). Remove their memory
    /// slots before detaching.
    pub fn mappings(&self) -> &[RegionMapping] {
        &self.mappings
    }

    /// The memory slots to install: every mapping whose BAR has a guest address.
    pub fn mapped_regions(&self) -> Vec<MappedRegion> {
        self.mappings
            .iter()
            .filter_map(RegionMapping::mapped_region)
            .collect()
    }

    /// Moves `bar` to `gpa` (or unplaces it): ioeventfds are re-registered at the new address
    /// and mappings report it. The VMM moves the memory slots itself.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIndex`] for a BAR that does not exist, [`Error::Kvm`].
    pub fn set_bar_gpa(&mut self, bar: u32, gpa: Option<u64>) -> Result<()> {
        if self.regions.get(bar as usize).is_none_or(|r| r.size == 0) || bar as usize >= NUM_BARS {
            return Err(Error::InvalidIndex {
                what: "BAR",
                index: bar,
            });
        }
        let mine: Vec<usize> = (0..self.ioevents.len())
            .filter(|i| self.ioevents[*i].bar == bar)
            .collect();
        for &i in &mine {
            self.unplace_ioevent(i)?;
        }
        self.bar_gpas[bar as usize] = gpa;
        for &i in &mine {
            self.place_ioevent(i)?;
        }
        for m in self.mappings.iter_mut().filter(|m| m.region() == bar) {
            m.set_gpa(gpa.and_then(|g| g.checked_add(m.region_offset())));
        }
        Ok(())
    }

    fn check_bar(&self, bar: u32) -> Result<()> {
        if (bar as usize) < NUM_BARS && self.regions.get(bar as usize).is_some_and(|r| r.size > 0) {
            Ok(())
        } else {
            Err(Error::InvalidIndex {
                what: "BAR",
                index: bar,
            })
        }
    }

    /// A trapped guest read of `data.len()` bytes at `offset` in `bar` (REGION_READ). PBA
    /// reads come from the device, whose PBA is the truth.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIndex`], [`ClientError::Remote`], transport errors. A VMM answers a failed
    /// read with all-ones.
    pub fn mmio_read(&self, bar: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        self.check_bar(bar)?;
        Ok(self.client().region_read(bar, offset, data)?)
    }

    /// A trapped guest write to `bar` (REGION_WRITE, posted unless configured otherwise).
    /// Writes into the MSI-X table also update the vector's MSI route, committed before the
    /// write is forwarded.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIndex`], [`Error::Kvm`] (route commit), [`ClientError::Remote`] (waited
    /// writes only), transport errors.
    pub fn mmio_write(&self, bar: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.check_bar(bar)?;
        let Some(msix) = self.msix.as_ref().filter(|m| m.layout.table_bar == bar) else {
            return self.forward_write(bar, offset, data);
        };
        // Hold the shadow across route update and forwarding so concurrent table writes reach
        // KVM and the device in the same order.
        let mut shadow = lock(&msix.shadow);
        let table = msix.layout.table_range();
        let mut touched = Vec::new();
        for (i, byte) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            if !table.contains(&at) {
                continue;
            }
            let rel = at - table.start;
            let v = (rel / MSIX_ENTRY_SIZE) as usize;
            let field = (rel % MSIX_ENTRY_SIZE) as usize;
            if field < 12
                && let Some(s) = shadow.get_mut(v)
            {
                s.bytes[field] = *byte;
                if touched.last() != Some(&v) {
                    touched.push(v);
                }
            }
        }
        for v in &touched {
            if let Some(s) = shadow.get(*v) {
                msix.group.set_route(*v as u32, s.route())?;
            }
        }
        if !touched.is_empty() {
            msix.group.set_gsi()?;
        }
        self.forward_write(bar, offset, data)
    }

    fn forward_write(&self, region: u32, offset: u64, data: &[u8]) -> Result<()> {
        let mut client = self.client();
        if self.posted_writes {
            client.region_write_posted(region, offset, data)?;
        } else {
            client.region_write(region, offset, data)?;
        }
        Ok(())
    }

    /// A guest config-space read (REGION_READ of region 7). The MSI Pending Bits also show
    /// the events the plugin holds for vectors it masked in KVM.
    ///
    /// # Errors
    ///
    /// [`ClientError::Remote`], transport errors.
    pub fn config_read(&self, offset: u64, data: &mut [u8]) -> Result<()> {
        self.client()
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, offset, data)?;
        // MSI Pending Bits: events the plugin holds for vectors masked in KVM count too.
        if let Some(msi) = &self.msi
            && let Some(at) = msi.layout.pending_at()
            && lock(&msi.regs).enabled()
        {
            let pending_off = msi.layout.cap_offset + at as u64;
            let len = data.len() as u64;
            if offset < pending_off + 4 && pending_off < offset.saturating_add(len) {
                let mut bits = 0u32;
                for v in 0..msi.group.len() {
                    if msi.group.is_pending(v)? {
                        bits |= 1 << v;
                    }
                }
                let bytes = bits.to_le_bytes();
                for (k, b) in data.iter_mut().enumerate() {
                    let at = (offset + k as u64).checked_sub(pending_off);
                    if let Some(p) = at.and_then(|a| bytes.get(a as usize)) {
                        *b |= p;
                    }
                }
            }
        }
        Ok(())
    }

    /// A guest config-space write (REGION_WRITE of region 7, waiting for the reply). BAR
    /// registers are the VMM's to emulate: don't forward writes to them.
    ///
    /// A write to the MSI capability also drives MSI ([`crate::msi`]): enabling it turns
    /// INTx off on the device, commits a route per enabled vector (vector `i` sends Message
    /// Data with its low bits replaced by `i`), registers the unmasked vectors' irqfds and
    /// binds the eventfds (SET_IRQS(MSI)) before the write is forwarded; a mask bit deassigns
    /// its vector's irqfd (events stay pending, one injection on unmask); disabling it
    /// unbinds MSI, drops pending events and binds INTx again.
    ///
    /// # Errors
    ///
    /// [`ClientError::Remote`], [`Error::Kvm`] (MSI routes and irqfds), transport errors.
    pub fn config_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if let Some(msi) = &self.msi {
            let mut regs = lock(&msi.regs);
            let mut new = *regs;
            if new.write(&msi.layout, offset, data) {
                let steps = msi::plan(&msi.layout, &regs, &new);
                // The shadow follows the guest even if a step fails: the guest wrote it.
                *regs = new;
                return run_msi_steps(
                    &mut self.client(),
                    self.intx.as_ref(),
                    &msi.group,
                    &steps,
                    Some((offset, data)),
                );
            }
        }
        Ok(self
            .client()
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, offset, data)?)
    }

    /// The guest ended an INTx interrupt (EOI): SET_IRQS(INTx, UNMASK|NONE). Needed with a
    /// split irqchip (no resample irqfd); harmless with the full one.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] if INTx is not wired; [`ClientError::Remote`], transport errors.
    pub fn eoi(&self) -> Result<()> {
        if self.intx.is_none() {
            return Err(Error::Unsupported("INTx is not wired".into()));
        }
        Ok(self.client().set_irqs_none(
            VFIO_PCI_INTX_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_UNMASK,
            0,
            1,
        )?)
    }

    /// DEVICE_RESET. Eventfd bindings survive on the device; the VMM resets its own view of
    /// config space and MSI-X (the device's table is back to its reset state, so the routes
    /// are cleared too).
    ///
    /// # Errors
    ///
    /// [`ClientError::Remote`], [`Error::Kvm`], transport errors.
    pub fn reset(&self) -> Result<()> {
        self.client().reset()?;
        if let Some(msix) = &self.msix {
            let mut shadow = lock(&msix.shadow);
            for (v, s) in shadow.iter_mut().enumerate() {
                *s = MsixShadow::default();
                msix.group.set_route(v as u32, None)?;
            }
            msix.group.set_gsi()?;
        }
        if let Some(msi) = &self.msi {
            // The device's MSI is back to its reset state: follow it (nothing to forward).
            let device = self.read_msi_regs(&msi.layout)?;
            let mut regs = lock(&msi.regs);
            let steps = msi::plan(&msi.layout, &regs, &device);
            *regs = device;
            run_msi_steps(
                &mut self.client(),
                self.intx.as_ref(),
                &msi.group,
                &steps,
                None,
            )?;
        }
        Ok(())
    }

    /// Runs a closure with the client for anything not covered here (DMA map/unmap after
    /// memory hotplug, IRQ info...).
    pub fn with_client<T>(&self, f: impl FnOnce(&mut Client) -> T) -> T {
        f(&mut self.client())
    }

    /// Tears the wiring down in reverse and closes the connection; the server keeps the device
    /// state. Remove the BAR memory slots first: the mappings are unmapped here.
    ///
    /// Every step is attempted; the first error is returned.
    ///
    /// # Errors
    ///
    /// The first failing step's error.
    pub fn detach(mut self) -> Result<()> {
        self.teardown(true)
    }

    fn teardown(&mut self, polite: bool) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut note = |r: std::result::Result<(), Error>| {
            if let Err(e) = r {
                log::warn!("irqbridge-kvm: detach: {e}");
                first.get_or_insert(e);
            }
        };
        self.mappings.clear();
        for i in 0..self.ioevents.len() {
            note(self.unplace_ioevent(i));
        }
        self.ioevents.clear();
        let talk = polite && !self.client().is_broken();
        if let Some(msi) = self.msi.take() {
            let bound = lock(&msi.regs).enabled();
            // Deassign the irqfds (and free the GSIs) before the device lets go of the fds.
            drop(msi);
            if talk && bound {
                note(
                    self.client()
                        .disable_irqs(VFIO_PCI_MSI_IRQ_INDEX)
                        .map_err(Error::from),
                );
            }
        }
        if let Some(msix) = self.msix.take() {
            // Deassign the irqfds (and free the GSIs) before the device lets go of the fds.
            drop(msix);
            if talk {
                note(
                    self.client()
                        .disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX)
                        .map_err(Error::from),
                );
            }
        }
        if let Some(intx) = self.intx.take() {
            // QEMU's order: mask on the device, deassign the irqfd (which de-asserts the
            // line), then disable the index (the device drops trigger and unmask fds).
            if talk {
                note(
                    self.client()
                        .set_irqs_none(VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_MASK, 0, 1)
                        .map_err(Error::from),
                );
            }
            note(intx.disable());
            drop(intx);
            if talk {
                note(
                    self.client()
                        .disable_irqs(VFIO_PCI_INTX_IRQ_INDEX)
                        .map_err(Error::from),
                );
            }
        }
        for (gpa, size) in std::mem::take(&mut self.dma) {
            if talk {
                note(self.client().dma_unmap(gpa, size).map_err(Error::from));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for AttachedDevice {
    fn drop(&mut self) {
        // Without detach(): undo the KVM side; the server cleans up when the socket closes.
        let _ = self.teardown(false);
    }
}

/// Carries out MSI steps in order ([`msi::plan`]); `forward` is the guest's config write.
fn run_msi_steps(
    client: &mut Client,
    intx: Option<&LegacyInterruptGroup>,
    group: &MsiInterruptGroup,
    steps: &[msi::Step],
    forward: Option<(u64, &[u8])>,
) -> Result<()> {
    use msi::Step;
    for step in steps {
        match *step {
            Step::Route(i, config) => group.set_route(i, config)?,
            Step::Commit => group.set_gsi()?,
            Step::Mask(i, masked) => group.set_masked(i, masked)?,
            Step::ClearPending(i) => group.clear_pending(i)?,
            Step::DisableIntx => {
                if let Some(intx) = intx {
                    // The device first (it stops triggering), then KVM: deassigning the irqfd
                    // also de-asserts a line it held.
                    client.disable_irqs(VFIO_PCI_INTX_IRQ_INDEX)?;
                    intx.disable()?;
                }
            }
            Step::EnableIntx => {
                if let Some(intx) = intx {
                    bind_intx(client, intx)?;
                }
            }
            Step::Bind(n) => {
                let fds = group.notifiers()?;
                let list: Vec<Option<BorrowedFd<'_>>> = fds
                    .iter()
                    .take(n as usize)
                    .map(|f| Some(eventfd_as_fd(f)))
                    .collect();
                client.set_irq_eventfds(
                    VFIO_PCI_MSI_IRQ_INDEX,
                    VFIO_IRQ_SET_ACTION_TRIGGER,
                    0,
                    &list,
                )?;
            }
            Step::Unbind => client.disable_irqs(VFIO_PCI_MSI_IRQ_INDEX)?,
            Step::Forward => {
                if let Some((offset, data)) = forward {
                    client.region_write(VFIO_PCI_CONFIG_REGION_INDEX, offset, data)?;
                }
            }
        }
    }
    Ok(())
}

/// Binds INTx on the device side to `group` and makes sure its irqfd is registered, in
/// QEMU's order (`vfio_intx_enable_kvm`, see the [module documentation](self)). Used at attach
/// and again when the guest turns MSI off.
fn bind_intx(client: &mut Client, group: &LegacyInterruptGroup) -> Result<()> {
    const INTX: u32 = VFIO_PCI_INTX_IRQ_INDEX;
    let trigger = group.notifier(0).ok_or_else(|| {
        Error::EventFd(std::io::Error::other("cannot duplicate the INTx eventfd"))
    })?;
    client.set_irq_eventfds(
        INTX,
        VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        &[Some(eventfd_as_fd(&trigger))],
    )?;
    match group.resample_notifier() {
        Some(resample) => {
            // Masked while KVM's side is built, so the device cannot trigger into it.
            client.set_irqs_none(INTX, VFIO_IRQ_SET_ACTION_MASK, 0, 1)?;
            // KVM_IRQFD with RESAMPLE: a trigger write asserts the GSI; the guest's EOI
            // de-asserts it and signals `resample`.
            group.enable()?;
            client.set_irq_eventfds(
                INTX,
                VFIO_IRQ_SET_ACTION_UNMASK,
                0,
                &[Some(eventfd_as_fd(&resample))],
            )?;
            client.set_irqs_none(INTX, VFIO_IRQ_SET_ACTION_UNMASK, 0, 1)?;
        }
        None => {
            // Split irqchip: a plain irqfd on the route the VMM's IOAPIC gives the GSI; EOIs
            // come back through `eoi()`.
            group.enable()?;
        }
    }
    Ok(())
}

/// Assigns or deassigns one ioeventfd at `addr`.
fn ioevent(vm: &VmFd, ev: &IoEvent, addr: u64, assign: bool) -> Result<()> {
    let a = if ev.pio {
        IoEventAddress::Pio(addr)
    } else {
        IoEventAddress::Mmio(addr)
    };
    let fd = &ev.fd;
    // The datamatch type's size is the access length KVM matches.
    let r = match (ev.datamatch, ev.size, assign) {
        (None, _, true) => vm.register_ioevent(fd, &a, NoDatamatch),
        (None, _, false) => vm.unregister_ioevent(fd, &a, NoDatamatch),
        (Some(d), 1, true) => vm.register_ioevent(fd, &a, d as u8),
        (Some(d), 1, false) => vm.unregister_ioevent(fd, &a, d as u8),
        (Some(d), 2, true) => vm.register_ioevent(fd, &a, d as u16),
        (Some(d), 2, false) => vm.unregister_ioevent(fd, &a, d as u16),
        (Some(d), 4, true) => vm.register_ioevent(fd, &a, d as u32),
        (Some(d), 4, false) => vm.unregister_ioevent(fd, &a, d as u32),
        (Some(d), _, true) => vm.register_ioevent(fd, &a, d),
        (Some(d), _, false) => vm.unregister_ioevent(fd, &a, d),
    };
    r.map_err(kvm_err(if assign {
        "KVM_IOEVENTFD"
    } else {
        "KVM_IOEVENTFD(DEASSIGN)"
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attached_device_is_shareable_between_vcpu_threads() {
        fn check<T: Send + Sync>() {}
        check::<AttachedDevice>();
        check::<MsiInterruptGroup>();
        check::<LegacyInterruptGroup>();
        check::<crate::routing::GsiRouter>();
    }

    #[test]
    fn layout_aligns_each_bar_to_its_size() {
        let sizes = [4096, 0, 16384, 0, 4096, 0];
        let l = layout_bars(sizes, 0xd000_1000);
        assert_eq!(l[0], Some(0xd000_1000));
        assert_eq!(l[1], None);
        assert_eq!(l[2], Some(0xd000_4000));
        assert_eq!(l[4], Some(0xd000_8000));
        assert_eq!(l[5], None);
    }

    #[test]
    fn layout_rounds_small_and_odd_sizes_up() {
        let l = layout_bars([100, 5000, 0, 0, 0, 0], 0);
        assert_eq!(l[0], Some(0));
        assert_eq!(l[1], Some(0x2000));
        let l = layout_bars([4096, 0, 0, 0, 0, 0], u64::MAX - 100);
        assert_eq!(l[0], None, "does not fit");
    }

    #[test]
    fn shadow_route_needs_an_address() {
        let mut s = MsixShadow::default();
        assert_eq!(s.route(), None);
        s.bytes[..4].copy_from_slice(&0xfee0_1000u32.to_le_bytes());
        s.bytes[8..12].copy_from_slice(&0x41u32.to_le_bytes());
        assert_eq!(
            s.route(),
            Some(MsiIrqSourceConfig {
                high_addr: 0,
                low_addr: 0xfee0_1000,
                data: 0x41,
                devid: 0
            })
        );
    }

    #[test]
    fn msix_ranges() {
        let l = MsixLayout {
            cap_offset: 0x40,
            vectors: 65,
            table_bar: 2,
            table_offset: 0,
            pba_bar: 2,
            pba_offset: 0x2000,
        };
        assert_eq!(l.table_range(), 0..65 * 16);
        assert_eq!(l.pba_range(), 0x2000..0x2010);
    }
}
