// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The end-to-end rig: the irqbridge device server, the irqbridge-kvm plugin and the guest
//! agent in one [`TestVm`]: [`Rig`].
//!
//! [`Rig::new`]:
//! 1. starts a [`DeviceServer`] (the real vfio-user server and PCI device, in a thread);
//! 2. creates a [`TestVm`] and a [`GsiRouter`] over its VM
//!    fd (full in-kernel irqchip);
//! 3. attaches the device with [`AttachedDevice::attach`]: guest RAM DMA-mapped, INTx on IOAPIC
//!    pin [`RigOptions::intx_pin`] (level, resample irqfd), MSI-X vectors as irqfds on MSI
//!    routes, MSI vectors wired by the plugin as the guest writes the MSI capability, the doorbell as an ioeventfd, BARs at fixed addresses ([`BAR0_GPA`],
//!    [`BAR2_GPA`], [`BAR4_GPA`]);
//! 4. registers BAR0 and BAR2 as [`MmioHandler`]s that forward to the attachment (BAR2 writes
//!    into the MSI-X table are mirrored into the vectors' MSI routes by the plugin), a
//!    config-space window at [`CONFIG_GPA`] (one ECAM-style page, BAR registers emulated here),
//!    and BAR4 (the event-channel page) as a memory slot;
//! 5. boots the guest agent.
//!
//! Drop order: the vCPU stops and the memory slots go first, then the device is detached, then
//! the server stops.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use irqbridge_kvm::attach::{AttachConfig, AttachedDevice, GuestRam, MsixLayout, NUM_BARS};
use irqbridge_kvm::msi::MsiLayout;
use irqbridge_kvm::routing::{GsiRouter, IrqChip, RoutingSink, SharedGsiRouter};
use irqbridge_vfio_user::pci::DeviceConfig;
use irqbridge_vfio_user::pci::regs::{
    MSIX_CAP_OFFSET, MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK, PCI_BAR0, PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE, REGION_BAR0, REGION_BAR2,
};

use crate::error::{Error, Result};
use crate::server::{DeviceServer, MetricsSnapshot};
use crate::{ExitStats, Guest, MmioHandler, TestVm, VmOptions};

/// Guest address of BAR0 (control registers, trapped; DOORBELL as an ioeventfd).
pub const BAR0_GPA: u64 = 0xd000_0000;
/// Guest address of BAR2 (MSI-X table and PBA, trapped).
pub const BAR2_GPA: u64 = 0xd001_0000;
/// Guest address of BAR4 (event-channel page, a memory slot).
pub const BAR4_GPA: u64 = 0xd002_0000;
/// Guest address of the config-space window (4 KiB, ECAM layout of one function).
pub const CONFIG_GPA: u64 = 0xd00f_0000;
/// Size of the config-space window.
pub const CONFIG_WINDOW_SIZE: u64 = 0x1000;
/// Default IOAPIC pin (= GSI) of the device's INTx line.
pub const DEFAULT_INTX_PIN: u8 = 10;

/// What [`Rig::new`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RigOptions {
    /// The device (MSI-X vectors, event-channel ports, INTx).
    pub device: DeviceConfig,
    /// Guest RAM size.
    pub ram_size: u64,
    /// IOAPIC pin of INTx; `None` leaves INTx unwired.
    pub intx_pin: Option<u8>,
    /// Register the device's doorbell ioeventfd (else guest doorbell writes are trapped and
    /// forwarded as REGION_WRITE messages).
    pub ioeventfds: bool,
    /// Forward trapped BAR writes as posted writes (NO_REPLY, like QEMU). Off by default: the
    /// guest agent writes `INTX_DEASSERT` and then EOIs without reading back, and only a
    /// waited write keeps the de-assert ahead of the EOI's resample at the server.
    pub posted_writes: bool,
    /// Pin the server thread to this CPU.
    pub server_cpu: Option<usize>,
    /// Pin the vCPU thread to this CPU.
    pub vcpu_cpu: Option<usize>,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            device: DeviceConfig::default(),
            ram_size: VmOptions::default().ram_size,
            intx_pin: Some(DEFAULT_INTX_PIN),
            ioeventfds: true,
            posted_writes: false,
            server_cpu: None,
            vcpu_cpu: None,
        }
    }
}

/// Forwards trapped accesses to one BAR to the attachment.
struct BarHandler {
    dev: Arc<AttachedDevice>,
    bar: u32,
    base: u64,
    errors: Arc<AtomicU64>,
}

impl MmioHandler for BarHandler {
    fn read(&self, gpa: u64, data: &mut [u8]) {
        if let Err(e) = self.dev.mmio_read(self.bar, gpa - self.base, data) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("BAR{} read at {gpa:#x}: {e}", self.bar);
            data.fill(0xff);
        }
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        if let Err(e) = self.dev.mmio_write(self.bar, gpa - self.base, data) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("BAR{} write at {gpa:#x}: {e}", self.bar);
        }
    }
}

/// The config-space window: forwards to the device, except the BAR registers, which the VMM
/// owns (they read the fixed addresses; writes are dropped).
struct ConfigHandler {
    dev: Arc<AttachedDevice>,
    bars: [u64; NUM_BARS],
    errors: Arc<AtomicU64>,
}

impl ConfigHandler {
    fn bar_byte(&self, offset: u64) -> Option<u8> {
        let rel = offset.checked_sub(PCI_BAR0)?;
        let bar = usize::try_from(rel / 4).ok()?;
        let addr = *self.bars.get(bar)?;
        // 32-bit memory BARs: type bits 0.
        Some((addr as u32).to_le_bytes()[(rel % 4) as usize])
    }
}

impl MmioHandler for ConfigHandler {
    fn read(&self, gpa: u64, data: &mut [u8]) {
        let offset = gpa - CONFIG_GPA;
        if self.bar_byte(offset).is_some() {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.bar_byte(offset + i as u64).unwrap_or(0);
            }
            return;
        }
        if let Err(e) = self.dev.config_read(offset, data) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("config read at {offset:#x}: {e}");
            data.fill(0xff);
        }
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        let offset = gpa - CONFIG_GPA;
        if self.bar_byte(offset).is_some() {
            return;
        }
        if let Err(e) = self.dev.config_write(offset, data) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("config write at {offset:#x}: {e}");
        }
    }
}

/// The device server, the plugin and the guest agent wired together; see the
/// [module documentation](self).
pub struct Rig {
    guest: Option<Guest>,
    device: Option<Arc<AttachedDevice>>,
    router: SharedGsiRouter,
    server: DeviceServer,
    options: RigOptions,
    forward_errors: Arc<AtomicU64>,
}

impl fmt::Debug for Rig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rig")
            .field("options", &self.options)
            .field("device", &self.device)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Rig {
    /// Builds the rig; see the [module documentation](self).
    ///
    /// # Errors
    ///
    /// [`Error::KvmUnavailable`] without a usable `/dev/kvm`; the errors of
    /// [`DeviceServer::start_with`], [`TestVm::new`], [`Guest::boot`]; [`Error::Plugin`] when
    /// the attachment fails.
    pub fn new(options: RigOptions) -> Result<Rig> {
        if let Some(reason) = crate::kvm_unavailable_reason() {
            return Err(Error::KvmUnavailable(reason));
        }
        let server = DeviceServer::start_with(options.device, options.server_cpu)?;
        let vm = TestVm::new(&VmOptions {
            ram_size: options.ram_size,
        })?;
        let sink: Arc<dyn RoutingSink> = vm.vm_fd().clone();
        let router = GsiRouter::new_shared(sink, IrqChip::Full);
        let mut bar_gpas = [None; NUM_BARS];
        bar_gpas[0] = Some(BAR0_GPA);
        bar_gpas[2] = Some(BAR2_GPA);
        bar_gpas[4] = Some(BAR4_GPA);
        let mem = vm.memory();
        let config = AttachConfig {
            intx_gsi: options.intx_pin.map(u32::from),
            bar_gpas,
            bar_base: None,
            guest_ram: vec![GuestRam {
                gpa: mem.gpa(),
                size: mem.size(),
                fd: mem.fd(),
                file_offset: 0,
            }],
            msix: true,
            ioeventfds: options.ioeventfds,
            mmap_bars: true,
            posted_writes: options.posted_writes,
            ..AttachConfig::default()
        };
        let device = AttachedDevice::attach(
            vm.vm_fd().clone(),
            router.clone(),
            server.socket_path(),
            config,
        )
        .map_err(Error::plugin("attach"))?;
        let device = Arc::new(device);
        let errors = Arc::new(AtomicU64::new(0));
        for (bar, base) in [(REGION_BAR0, BAR0_GPA), (REGION_BAR2, BAR2_GPA)] {
            let size = device
                .region(bar)
                .map(|r| r.size)
                .filter(|s| *s > 0)
                .ok_or_else(|| Error::Check(format!("the device has no BAR{bar}")))?;
            vm.add_mmio(
                base,
                size,
                Arc::new(BarHandler {
                    dev: Arc::clone(&device),
                    bar,
                    base,
                    errors: Arc::clone(&errors),
                }),
            )?;
        }
        let mut bars = [0u64; NUM_BARS];
        for (i, b) in bars.iter_mut().enumerate() {
            *b = bar_gpas[i].unwrap_or(0);
        }
        vm.add_mmio(
            CONFIG_GPA,
            CONFIG_WINDOW_SIZE,
            Arc::new(ConfigHandler {
                dev: Arc::clone(&device),
                bars,
                errors: Arc::clone(&errors),
            }),
        )?;
        let regions = device.mapped_regions();
        if regions.is_empty() {
            return Err(Error::Check(
                "the plugin mapped no BAR (BAR4 should be mappable)".into(),
            ));
        }
        for r in regions {
            // SAFETY: the mapping is owned by `device`, which the rig keeps alive until the
            // TestVm (and with it this slot) is gone: `Rig::drop` drops the guest first.
            unsafe { vm.add_memory_slot(r.gpa, r.host_addr as *mut u8, r.size) }?;
        }
        let guest = Guest::boot(vm)?;
        if let Some(cpu) = options.vcpu_cpu {
            guest.vm().pin_vcpu(cpu)?;
        }
        Ok(Rig {
            guest: Some(guest),
            device: Some(device),
            router,
            server,
            options,
            forward_errors: errors,
        })
    }

    /// The guest agent (and through it the [`TestVm`]).
    pub fn guest(&self) -> &Guest {
        match &self.guest {
            Some(g) => g,
            None => unreachable!("the guest is only taken in drop"),
        }
    }

    /// The plugin's attachment.
    pub fn device(&self) -> &AttachedDevice {
        match &self.device {
            Some(d) => d,
            None => unreachable!("the device is only taken in drop"),
        }
    }

    /// The shared GSI router of the VM.
    pub fn router(&self) -> &SharedGsiRouter {
        &self.router
    }

    /// The device server.
    pub fn server(&self) -> &DeviceServer {
        &self.server
    }

    /// The options the rig was built with.
    pub fn options(&self) -> &RigOptions {
        &self.options
    }

    /// The server's message counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.server.metrics().snapshot()
    }

    /// The vCPU's exit counters now.
    pub fn exit_stats(&self) -> ExitStats {
        self.guest().vm().exit_stats()
    }

    /// Trapped accesses the plugin failed to forward so far.
    pub fn forward_errors(&self) -> u64 {
        self.forward_errors.load(Ordering::Relaxed)
    }

    /// Where the MSI-X table and PBA are.
    ///
    /// # Errors
    ///
    /// [`Error::Check`] if the plugin did not wire MSI-X.
    pub fn msix_layout(&self) -> Result<MsixLayout> {
        self.device()
            .msix_layout()
            .ok_or_else(|| Error::Check("the plugin did not wire MSI-X".into()))
    }

    /// Guest 32-bit store to BAR0 register `reg` (a trapped access, or the ioeventfd).
    ///
    /// # Errors
    ///
    /// As [`Guest::command`].
    pub fn write_reg(&self, reg: u64, value: u32) -> Result<()> {
        self.guest().mmio_write32(BAR0_GPA + reg, value)
    }

    /// Guest 32-bit load from BAR0 register `reg`.
    ///
    /// # Errors
    ///
    /// As [`Guest::command`].
    pub fn read_reg(&self, reg: u64) -> Result<u32> {
        self.guest().mmio_read32(BAR0_GPA + reg)
    }

    /// The guest programs MSI-X table entry `index` (BAR2) to deliver `guest_vector` to APIC
    /// ID 0, masked or not: address, data, then vector control.
    ///
    /// # Errors
    ///
    /// As [`Guest::command`], [`Error::Check`] without MSI-X.
    pub fn msix_program(&self, index: u16, guest_vector: u8, masked: bool) -> Result<()> {
        let entry = BAR2_GPA + self.msix_layout()?.table_offset + 16 * u64::from(index);
        let g = self.guest();
        g.mmio_write32(entry, crate::layout::LAPIC_GPA as u32)?;
        g.mmio_write32(entry + 4, 0)?;
        g.mmio_write32(entry + 8, u32::from(guest_vector))?;
        g.mmio_write32(entry + 12, u32::from(masked))
    }

    /// The guest sets or clears the mask bit of MSI-X table entry `index`.
    ///
    /// # Errors
    ///
    /// As [`Rig::msix_program`].
    pub fn msix_set_masked(&self, index: u16, masked: bool) -> Result<()> {
        let entry = BAR2_GPA + self.msix_layout()?.table_offset + 16 * u64::from(index);
        self.guest().mmio_write32(entry + 12, u32::from(masked))
    }

    /// The guest reads vector `index`'s PBA bit (BAR2).
    ///
    /// # Errors
    ///
    /// As [`Rig::msix_program`].
    pub fn msix_pba_bit(&self, index: u16) -> Result<bool> {
        let dword = BAR2_GPA + self.msix_layout()?.pba_offset + 4 * u64::from(index / 32);
        let v = self.guest().mmio_read32(dword)?;
        Ok(v & (1 << (index % 32)) != 0)
    }

    /// The guest writes MSI-X Message Control (Enable, Function Mask) through the config
    /// window: a read-modify-write of the capability's first dword.
    ///
    /// # Errors
    ///
    /// As [`Guest::command`].
    pub fn msix_set_control(&self, enable: bool, function_mask: bool) -> Result<()> {
        let at = CONFIG_GPA + MSIX_CAP_OFFSET;
        let g = self.guest();
        let head = g.mmio_read32(at)?;
        let mut control = (head >> 16) as u16 & !(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        if enable {
            control |= MSIX_CONTROL_ENABLE;
        }
        if function_mask {
            control |= MSIX_CONTROL_FUNCTION_MASK;
        }
        g.mmio_write32(at, (head & 0xffff) | (u32::from(control) << 16))
    }

    /// Where the MSI capability is.
    ///
    /// # Errors
    ///
    /// [`Error::Check`] if the plugin did not wire MSI.
    pub fn msi_layout(&self) -> Result<MsiLayout> {
        self.device()
            .msi_layout()
            .ok_or_else(|| Error::Check("the plugin did not wire MSI".into()))
    }

    /// The guest programs the MSI capability through the config window to deliver
    /// `guest_vector` (+ the vector index, per the multiple-message rule) to APIC ID 0 and sets
    /// the Mask Bits to `mask`: address, upper address, data, mask (dword stores; the plugin
    /// sees every one as a forwarded config write). Message Control is left alone.
    ///
    /// # Errors
    ///
    /// As [`Guest::command`], [`Error::Check`] without MSI.
    pub fn msi_program(&self, guest_vector: u8, mask: u32) -> Result<()> {
        let l = self.msi_layout()?;
        if !l.is_64bit || !l.per_vector_mask {
            return Err(Error::Check(
                "the MSI capability lacks a 64-bit address or per-vector masking".into(),
            ));
        }
        let cap = CONFIG_GPA + l.cap_offset;
        let g = self.guest();
        g.mmio_write32(cap + 0x04, crate::layout::LAPIC_GPA as u32)?;
        g.mmio_write32(cap + 0x08, 0)?;
        g.mmio_write32(cap + 0x0c, u32::from(guest_vector))?;
        g.mmio_write32(cap + 0x10, mask)
    }

    /// The guest writes MSI Message Control (Enable, Multiple Message Enable = log2 of
    /// `vectors`) through the config window: a read-modify-write of the capability's first
    /// dword.
    ///
    /// # Errors
    ///
    /// As [`Rig::msi_program`].
    pub fn msi_set_control(&self, enable: bool, vectors: u32) -> Result<()> {
        let at = CONFIG_GPA + self.msi_layout()?.cap_offset;
        let g = self.guest();
        let head = g.mmio_read32(at)?;
        let mme = vectors.max(1).trailing_zeros().min(5);
        let mut control = (head >> 16) & !0x71;
        control |= (mme << 4) | u32::from(enable);
        g.mmio_write32(at, (head & 0xffff) | (control << 16))
    }

    /// The guest writes the MSI Mask Bits.
    ///
    /// # Errors
    ///
    /// As [`Rig::msi_program`].
    pub fn msi_set_mask(&self, mask: u32) -> Result<()> {
        let at = CONFIG_GPA + self.msi_layout()?.cap_offset + 0x10;
        self.guest().mmio_write32(at, mask)
    }

    /// The guest reads the MSI Pending Bits.
    ///
    /// # Errors
    ///
    /// As [`Rig::msi_program`].
    pub fn msi_pending_bits(&self) -> Result<u32> {
        let at = CONFIG_GPA + self.msi_layout()?.cap_offset + 0x14;
        self.guest().mmio_read32(at)
    }

    /// Sets or clears COMMAND bit 10 (INTx disable) with the plugin's config-space write
    /// (read-modify-write of COMMAND, from the host).
    ///
    /// # Errors
    ///
    /// [`Error::Plugin`].
    pub fn set_intx_disable(&self, disable: bool) -> Result<()> {
        let dev = self.device();
        let mut cmd = [0u8; 2];
        dev.config_read(PCI_COMMAND, &mut cmd)
            .map_err(Error::plugin("config read"))?;
        let mut v = u16::from_le_bytes(cmd);
        if disable {
            v |= PCI_COMMAND_INTX_DISABLE;
        } else {
            v &= !PCI_COMMAND_INTX_DISABLE;
        }
        dev.config_write(PCI_COMMAND, &v.to_le_bytes())
            .map_err(Error::plugin("config write"))
    }

    /// Polls the server's metrics until `f` accepts them, for at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] naming `what`.
    pub fn wait_metrics(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&MetricsSnapshot) -> bool,
    ) -> Result<MetricsSnapshot> {
        let start = Instant::now();
        loop {
            let m = self.metrics();
            if f(&m) {
                return Ok(m);
            }
            if start.elapsed() >= timeout {
                return Err(Error::Timeout {
                    what: format!("{what} (device counters {:?})", m.device),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // vCPU and memory slots first (the BAR4 slot points into the device's mapping), along
        // with the MMIO handlers that hold the device.
        drop(self.guest.take());
        if let Some(dev) = self.device.take() {
            match Arc::try_unwrap(dev) {
                Ok(dev) => {
                    if let Err(e) = dev.detach() {
                        log::warn!("detaching the device: {e}");
                    }
                }
                Err(dev) => {
                    log::warn!("the device is still shared at teardown");
                    drop(dev);
                }
            }
        }
        if let Err(e) = self.server.stop() {
            log::warn!("device server: {e}");
        }
    }
}
