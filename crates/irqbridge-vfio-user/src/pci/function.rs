// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`PciFunction`]: a [`PciDevice`] inside the standard parts of a PCI function, served over
//! vfio-user by the one generic [`VfioUserDevice`] implementation.

use std::io;
use std::os::fd::BorrowedFd;

use irqbridge_core::{IntxState, MsiState, MsixState};
use log::{debug, warn};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config::Owner;
use super::consts::*;
use super::irq::PciCore;
use super::layout::{BarKind, Layout};
use super::parts::{MsixHit, apply_msi_write, msix_hit};
use super::{BarIndex, ConfigEffect, DEVICE_TOKEN_LIMIT, Error, PciDevice, eventfd_fd};
use crate::device::{
    DeviceInfo, Errno, IoFd, IrqInfo, RegionInfo, SetIrqs, SparseArea, VfioUserDevice,
};
use crate::proto::{
    VFIO_REGION_INFO_FLAG_MMAP as REGION_MMAP, VFIO_REGION_INFO_FLAG_READ as REGION_READ,
    VFIO_REGION_INFO_FLAG_WRITE as REGION_WRITE,
};

/// Poll token of the INTx unmask (resample) eventfd.
const TOKEN_INTX_UNMASK: u64 = DEVICE_TOKEN_LIMIT;
/// Poll token of ioeventfd `i`: `TOKEN_IOEVENTFD + i`.
const TOKEN_IOEVENTFD: u64 = DEVICE_TOKEN_LIMIT + 1;

/// The values of a function's standard parts (config image, interrupt models); the layout and
/// the write masks come from the builder, never from a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciState {
    /// The config-space image (without the bits owned by the interrupt models).
    pub config_space: Vec<u8>,
    /// INTx line state.
    pub intx: IntxState,
    /// MSI state, if the function has MSI.
    pub msi: Option<MsiState>,
    /// MSI-X state, if the function has MSI-X.
    pub msix: Option<MsixState>,
    /// The device's own state ([`PciDevice::save`]), if it was taken with the function.
    #[serde(default)]
    pub device: Option<serde_json::Value>,
}

/// One ioeventfd the function owns.
#[derive(Debug)]
struct IoEvent {
    bar: BarIndex,
    area: usize,
    offset: u64,
    size: u64,
    datamatch: Option<u64>,
    fd: EventFd,
}

/// A PCI function: a [`PciDevice`] plus config space, interrupts and vfio-user plumbing.
/// Built with [`PciFunctionBuilder`](super::PciFunctionBuilder).
#[derive(Debug)]
pub struct PciFunction<D> {
    core: PciCore,
    ioevents: Vec<IoEvent>,
    device: D,
}

impl<D: PciDevice> PciFunction<D> {
    pub(crate) fn from_layout(layout: Layout, device: D) -> Result<Self, Error> {
        let mut ioevents = Vec::new();
        for (i, bar) in layout.bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            for (area, e) in bar.ioeventfds.iter().enumerate() {
                ioevents.push(IoEvent {
                    bar: i as BarIndex,
                    area,
                    offset: e.offset,
                    size: e.size,
                    datamatch: e.datamatch,
                    fd: EventFd::new(EFD_NONBLOCK).map_err(Error::Io)?,
                });
            }
        }
        Ok(PciFunction {
            core: PciCore::new(layout)?,
            ioevents,
            device,
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The standard parts (config space and interrupt models).
    pub fn core(&self) -> &PciCore {
        &self.core
    }

    /// The standard parts, mutably (to raise interrupts from outside a callback).
    pub fn core_mut(&mut self) -> &mut PciCore {
        &mut self.core
    }

    /// The device and the standard parts at once, to call device methods that raise
    /// interrupts.
    pub fn split_mut(&mut self) -> (&mut D, &mut PciCore) {
        (&mut self.device, &mut self.core)
    }

    /// The layout the function was built with.
    pub fn layout(&self) -> &Layout {
        &self.core.layout
    }

    /// Back to the power-on state: config image, interrupt registers, then
    /// [`PciDevice::reset`]. Eventfd bindings survive.
    pub fn reset_function(&mut self) {
        self.core.reset();
        self.device.reset(&mut self.core);
    }

    /// The values of the standard parts, plus the device's state if `with_device`.
    ///
    /// # Errors
    ///
    /// What [`PciDevice::save`] returns (only with `with_device`).
    pub fn save_state(&self, with_device: bool) -> Result<PciState, Error> {
        let mut s = self.core.state();
        if with_device {
            s.device = Some(self.device.save()?);
        }
        Ok(s)
    }

    /// Loads a state taken with [`save_state`](Self::save_state) on a function with the same
    /// layout; the device part (if present) goes to [`PciDevice::load`]. Eventfd bindings are
    /// kept; nothing is signalled.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotMismatch`] if the config image (size or read-only bits) or the MSI /
    /// MSI-X sizes differ from this layout; the function is then unchanged. Errors of
    /// [`PciDevice::load`] (checked before anything else changes).
    pub fn load_state(&mut self, state: &PciState) -> Result<(), Error> {
        self.check_state(state)?;
        if let Some(d) = &state.device {
            self.device.load(d)?;
        }
        self.apply_state(state)
    }

    /// Checks that `state` fits the layout without changing anything.
    pub(crate) fn check_state(&self, state: &PciState) -> Result<(), Error> {
        let mismatch = |s: &str| Err(Error::SnapshotMismatch(s.into()));
        if !self.core.config.fits(&state.config_space) {
            return mismatch("the config space has another size or other read-only bits");
        }
        match (&self.core.msi, &state.msi) {
            (None, None) => {}
            (Some(m), Some(s)) if m.num_vectors() == s.vectors => {}
            _ => return mismatch("the MSI capability differs"),
        }
        match (&self.core.msix, &state.msix) {
            (None, None) => {}
            (Some(m), Some(s))
                if s.entries.len() == usize::from(m.num_vectors())
                    && s.host_masked.len() == s.entries.len()
                    && s.pba.len() == usize::from(m.num_vectors()).div_ceil(64) => {}
            _ => return mismatch("the MSI-X capability differs"),
        }
        Ok(())
    }

    /// Applies a state that [`check_state`](Self::check_state) accepted.
    pub(crate) fn apply_state(&mut self, state: &PciState) -> Result<(), Error> {
        if let (Some(m), Some(s)) = (&mut self.core.msi, &state.msi) {
            m.restore(s)?;
        }
        if let (Some(m), Some(s)) = (&mut self.core.msix, &state.msix) {
            m.restore(s)?;
        }
        self.core.intx.restore(&state.intx)?;
        self.core.config.restore(&state.config_space);
        Ok(())
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) {
        let core = &self.core;
        let msix_ctl = core.msix.as_ref().map_or(0, |m| m.message_control());
        for (i, out) in data.iter_mut().enumerate() {
            let Some(off) = offset.checked_add(i as u64) else {
                *out = 0;
                continue;
            };
            *out = match core.config.owner(off) {
                Some(Owner::MsixControl(b)) => msix_ctl.to_le_bytes()[(b & 1) as usize],
                // Filled in below.
                Some(Owner::Msi(_)) => 0,
                None => {
                    let mut b = core.config.byte(off);
                    if off == PCI_STATUS && core.intx.level() {
                        b |= PCI_STATUS_INTERRUPT as u8;
                    }
                    b
                }
            };
        }
        if let (Some(w), Some(m)) = (core.msi_window(), &core.msi) {
            w.read(m, offset, data);
        }
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        let core = &mut self.core;
        let old_command = core.config.word(PCI_COMMAND);
        let mut msix_ctl: Option<[u8; 2]> = None;
        let msi = match (core.msi_window(), &core.msi) {
            (Some(w), Some(m)) => w.collect(m, offset, data),
            _ => None,
        };
        let mut bars = 0u8;
        let mut image = false;
        for (i, &value) in data.iter().enumerate() {
            let Some(off) = offset.checked_add(i as u64) else {
                break;
            };
            match core.config.owner(off) {
                Some(Owner::MsixControl(b)) => {
                    let cur = core.msix.as_ref().map_or(0, |m| m.message_control());
                    let regs = msix_ctl.get_or_insert(cur.to_le_bytes());
                    if let Some(r) = regs.get_mut((b & 1) as usize) {
                        *r = value;
                    }
                }
                // Collected above.
                Some(Owner::Msi(_)) => {}
                None => {
                    core.config.write_byte(off, value);
                    if (PCI_BAR0..PCI_BAR0 + 24).contains(&off) {
                        bars |= 1 << ((off - PCI_BAR0) / 4);
                    } else if !(PCI_COMMAND..PCI_COMMAND + 2).contains(&off) {
                        image = true;
                    }
                }
            }
        }
        let mut effects = Vec::new();
        let new_command = core.config.word(PCI_COMMAND);
        if old_command != new_command {
            effects.push(ConfigEffect::Command {
                old: old_command,
                new: new_command,
            });
        }
        if (old_command ^ new_command) & PCI_COMMAND_INTX_DISABLE != 0 {
            let disable = new_command & PCI_COMMAND_INTX_DISABLE != 0;
            debug!("pci: COMMAND.10 = {disable}");
            if let Err(e) = core.intx.set_intx_disable(disable) {
                warn!("pci: COMMAND write: {}", super::error_chain(&e));
            }
        }
        let msi_shape = core.msi_shape();
        if let (Some((regs, written)), Some(m)) = (msi, core.msi.as_mut()) {
            // Suppress INTx before MSI can fire; release it after MSI is off.
            let control = u16::from_le_bytes([regs[2], regs[3]]);
            if written & 0b1100 != 0 && control & MSI_CONTROL_ENABLE != 0 {
                let _ = core.intx.set_suppressed(true);
            }
            apply_msi_write(m, msi_shape, &regs, written);
            core.update_intx_suppression();
            effects.push(ConfigEffect::Msi);
        }
        if let (Some(regs), Some(m)) = (msix_ctl, core.msix.as_mut()) {
            let new = u16::from_le_bytes(regs);
            let enable = new & MSIX_CONTROL_ENABLE != 0;
            let fmask = new & MSIX_CONTROL_FUNCTION_MASK != 0;
            if enable != m.enabled() || fmask != m.function_masked() {
                debug!("pci: MSI-X enable={enable} function_mask={fmask}");
                // Suppress INTx before MSI-X can fire; release it after MSI-X is off.
                if enable {
                    let _ = core.intx.set_suppressed(true);
                }
                if let Err(e) = m.write_control(enable, fmask) {
                    warn!(
                        "pci: MSI-X Message Control write: {}",
                        super::error_chain(&e)
                    );
                }
                core.update_intx_suppression();
            }
            effects.push(ConfigEffect::Msix);
        }
        for index in 0..6u32 {
            if bars & (1 << index) != 0 {
                // The upper half of a 64-bit BAR reports the BAR below it.
                let index = match index.checked_sub(1) {
                    Some(lo)
                        if core.layout.bar(index).is_none()
                            && core
                                .layout
                                .bar(lo)
                                .is_some_and(|b| b.kind == BarKind::Mem64) =>
                    {
                        lo
                    }
                    _ => index,
                };
                if let Some(address) = core.bar_address(index) {
                    if !effects.contains(&ConfigEffect::Bar { index, address }) {
                        effects.push(ConfigEffect::Bar { index, address });
                    }
                }
            }
        }
        if image {
            effects.push(ConfigEffect::Write {
                offset,
                len: data.len(),
            });
        }
        for e in effects {
            self.device.config_written(e, &mut self.core);
        }
    }

    /// The MSI-X BAR, table and PBA ranges: `Some(true)` for an honoured table access,
    /// `Some(false)` for an honoured PBA access, `None` for anything else.
    fn msix_target(&self, bar: u32, offset: u64, len: usize) -> Option<(bool, u64)> {
        let x = self.core.layout.msix.as_ref()?;
        if u32::from(x.bar) != bar {
            return None;
        }
        if let MsixHit::Inside(rel) = msix_hit(x.table_offset, x.table_size(), offset, len) {
            return Some((true, rel));
        }
        match msix_hit(x.pba_offset, x.pba_size(), offset, len) {
            MsixHit::Inside(rel) => Some((false, rel)),
            _ => None,
        }
    }

    fn handle_ioevent(&mut self, i: usize) {
        let Some(ev) = self.ioevents.get(i) else {
            return;
        };
        match ev.fd.read() {
            Ok(n) => {
                let (bar, area) = (ev.bar, ev.area);
                self.device.ioeventfd(bar, area, n, &mut self.core);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => warn!("pci: reading an ioeventfd failed: {e}"),
        }
    }
}

impl<D: PciDevice> VfioUserDevice for PciFunction<D> {
    fn device_info(&self) -> DeviceInfo {
        super::parts::pci_device_info()
    }

    fn region_info(&self, index: u32) -> RegionInfo<'_> {
        let absent = super::parts::absent_region();
        if index == REGION_CONFIG {
            return RegionInfo {
                flags: REGION_READ | REGION_WRITE,
                size: self.core.layout.config_size,
                ..absent
            };
        }
        let Some(bar) = self.core.layout.bar(index) else {
            return absent;
        };
        let fd = if bar.mmap_areas.is_empty() {
            None
        } else {
            self.device.bar_mmap_fd(index)
        };
        let mut flags = REGION_READ | REGION_WRITE;
        if fd.is_some() {
            flags |= REGION_MMAP;
        }
        RegionInfo {
            flags,
            size: bar.size,
            offset: 0,
            sparse_areas: if fd.is_some() {
                bar.mmap_areas.clone()
            } else {
                Vec::<SparseArea>::new()
            },
            mmap_fd: fd,
        }
    }

    fn region_io_fds(&self, index: u32) -> Vec<IoFd<'_>> {
        self.ioevents
            .iter()
            .filter(|e| e.bar == index)
            .map(|e| IoFd {
                offset: e.offset,
                size: e.size,
                fd: eventfd_fd(&e.fd),
                datamatch: e.datamatch,
            })
            .collect()
    }

    fn irq_info(&self, index: u32) -> IrqInfo {
        self.core.irq_info(index)
    }

    fn set_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        self.core.set_irqs(req)
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        if index == REGION_CONFIG {
            self.config_read(offset, data);
            return Ok(());
        }
        if self.core.layout.bar(index).is_none() {
            return Err(libc::EINVAL);
        }
        match self.msix_target(index, offset, data.len()) {
            Some((true, rel)) => self.core.msix.iter().for_each(|m| m.table_read(rel, data)),
            Some((false, rel)) => self.core.msix.iter().for_each(|m| m.pba_read(rel, data)),
            None => self.device.bar_read(index, offset, data, &mut self.core),
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if index == REGION_CONFIG {
            self.config_write(offset, data);
            return Ok(());
        }
        if self.core.layout.bar(index).is_none() {
            return Err(libc::EINVAL);
        }
        match (
            self.msix_target(index, offset, data.len()),
            self.core.msix.as_mut(),
        ) {
            (Some((true, rel)), Some(m)) => {
                if let Err(e) = m.table_write(rel, data) {
                    warn!("pci: MSI-X table write: {}", super::error_chain(&e));
                }
            }
            // PBA writes (read-only) and everything else go to the device.
            _ => self.device.bar_write(index, offset, data, &mut self.core),
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        debug!("pci: device reset");
        self.reset_function();
        Ok(())
    }

    fn client_disconnected(&mut self) {
        debug!("pci: client gone, dropping its eventfds");
        // Like closing a VFIO device fd: the interrupt index is disabled and every eventfd of
        // the client dropped; the guest-visible state stays.
        self.core.drop_client_fds();
        self.device.client_disconnected(&mut self.core);
    }

    fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
        let mut fds: Vec<_> = self
            .ioevents
            .iter()
            .enumerate()
            .map(|(i, e)| (eventfd_fd(&e.fd), TOKEN_IOEVENTFD + i as u64))
            .collect();
        if let Some(fd) = &self.core.intx_unmask {
            fds.push((eventfd_fd(fd), TOKEN_INTX_UNMASK));
        }
        fds.extend(
            self.device
                .poll_fds()
                .into_iter()
                .filter(|(_, t)| *t < DEVICE_TOKEN_LIMIT),
        );
        fds
    }

    fn handle_fd_event(&mut self, token: u64) {
        match token {
            TOKEN_INTX_UNMASK => self.core.handle_intx_unmask_fd(),
            t if t >= TOKEN_IOEVENTFD => {
                if let Ok(i) = usize::try_from(t - TOKEN_IOEVENTFD) {
                    self.handle_ioevent(i);
                }
            }
            t => self.device.handle_fd_event(t, &mut self.core),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{IrqAction, IrqData};
    use crate::pci::{Bar, Identity, PciFunctionBuilder};

    /// A device with one register: BAR0 offset 0 written with v fires MSI vector v.
    #[derive(Debug, Default)]
    struct Dev {
        reads: u64,
        writes: u64,
        resets: u64,
        doorbells: u64,
        effects: Vec<ConfigEffect>,
    }

    impl PciDevice for Dev {
        fn bar_read(&mut self, _bar: BarIndex, _offset: u64, data: &mut [u8], _pci: &mut PciCore) {
            self.reads += 1;
            data.fill(0xab);
        }
        fn bar_write(&mut self, _bar: BarIndex, offset: u64, data: &[u8], pci: &mut PciCore) {
            self.writes += 1;
            if offset == 0 {
                if let Some(&v) = data.first() {
                    let _ = pci.msi_fire(v);
                }
            }
        }
        fn reset(&mut self, _pci: &mut PciCore) {
            self.resets += 1;
        }
        fn ioeventfd(&mut self, _bar: BarIndex, _area: usize, count: u64, _pci: &mut PciCore) {
            self.doorbells += count;
        }
        fn config_written(&mut self, effect: ConfigEffect, _pci: &mut PciCore) {
            self.effects.push(effect);
        }
        fn save(&self) -> Result<serde_json::Value, Error> {
            Ok(serde_json::json!(self.writes))
        }
        fn load(&mut self, state: &serde_json::Value) -> Result<(), Error> {
            self.writes = state
                .as_u64()
                .ok_or_else(|| Error::SnapshotMismatch("not a number".into()))?;
            Ok(())
        }
    }

    fn function(msi: u8) -> PciFunction<Dev> {
        PciFunctionBuilder::new(Identity {
            vendor_id: 0x1af4,
            device_id: 0x1234,
            ..Identity::default()
        })
        .bar(0, Bar::mem64(4096).ioeventfd(8, 4, Some(7)))
        .bar(2, Bar::mem32(8192))
        .msix(8, 2, 0, 0x1000)
        .msi(msi)
        .vendor_cap_rw1c(&[8, 0, 0, 0, 0, 0], &[0, 0xff], &[0, 0, 0xff])
        .build(Dev::default())
        .unwrap()
    }

    fn efd() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    fn take(fd: &EventFd) -> u64 {
        fd.read().unwrap_or(0)
    }

    fn set(
        f: &mut PciFunction<Dev>,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), Errno> {
        f.set_irqs(SetIrqs {
            index,
            action,
            start,
            count,
            data,
        })
    }

    fn bind_msi(f: &mut PciFunction<Dev>, start: u32, fds: &[&EventFd]) -> Result<(), Errno> {
        let fds = fds
            .iter()
            .map(|e| Some(e.try_clone().unwrap()))
            .collect::<Vec<_>>();
        let count = fds.len() as u32;
        set(
            f,
            IRQ_MSI,
            IrqAction::Trigger,
            start,
            count,
            IrqData::Eventfds(fds),
        )
    }

    fn cfg_write(f: &mut PciFunction<Dev>, off: u64, bytes: &[u8]) {
        f.region_write(REGION_CONFIG, off, bytes).unwrap();
    }

    fn cfg_read(f: &mut PciFunction<Dev>, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        f.region_read(REGION_CONFIG, off, &mut b[..len]).unwrap();
        u64::from_le_bytes(b)
    }

    #[test]
    fn msi_capability_registers() {
        let mut f = function(8);
        let cap = f.layout().cap_offset(PCI_CAP_ID_MSI).unwrap();
        assert_eq!(cap, 0x50);
        assert_eq!(cfg_read(&mut f, cap, 4), 0x0186_7005);
        // Address (bits 1:0 read 0), upper address, data, mask; pending is read-only.
        cfg_write(&mut f, cap + 4, &0x1234_5677u32.to_le_bytes());
        cfg_write(&mut f, cap + 8, &0xaabb_ccddu32.to_le_bytes());
        cfg_write(&mut f, cap + 0xc, &0xffff_4321u32.to_le_bytes());
        cfg_write(&mut f, cap + 0x10, &u32::MAX.to_le_bytes());
        cfg_write(&mut f, cap + 0x14, &u32::MAX.to_le_bytes());
        assert_eq!(cfg_read(&mut f, cap + 4, 8), 0xaabb_ccdd_1234_5674);
        assert_eq!(cfg_read(&mut f, cap + 0xc, 4), 0x4321);
        assert_eq!(cfg_read(&mut f, cap + 0x10, 8), 0xff);
        // Enable with MME 7: clamped to MMC 3. Byte-wise write of the control low byte.
        cfg_write(&mut f, cap + 2, &[0x71]);
        assert_eq!(cfg_read(&mut f, cap + 2, 2), 0x1b7);
        let m = f.core().msi().unwrap();
        assert_eq!(
            (m.enabled(), m.enabled_vectors(), m.address()),
            (true, 8, 0xaabb_ccdd_1234_5674)
        );
        // MSI enabled suppresses INTx.
        assert!(f.core().intx().suppressed());
        cfg_write(&mut f, cap + 2, &[0]);
        assert!(!f.core().intx().suppressed());
    }

    #[test]
    fn msi_delivery_mask_pending_and_exclusion_with_msix() {
        let mut f = function(4);
        let fds: Vec<_> = (0..4).map(|_| efd()).collect();
        bind_msi(&mut f, 0, &fds.iter().collect::<Vec<_>>()).unwrap();
        let fire = |f: &mut PciFunction<Dev>, v: u8| f.region_write(0, 0, &[v]).unwrap();
        // Disabled: dropped.
        fire(&mut f, 0);
        cfg_write(&mut f, 0x52, &[0x21]); // Enable, MME 2
        for v in 0..4 {
            fire(&mut f, v);
        }
        assert_eq!(fds.iter().map(take).collect::<Vec<_>>(), vec![1, 1, 1, 1]);
        // Mask vector 2, fire twice, unmask: exactly one.
        cfg_write(&mut f, 0x60, &[0b100]);
        fire(&mut f, 2);
        fire(&mut f, 2);
        assert_eq!(cfg_read(&mut f, 0x64, 4), 0b100);
        assert_eq!(take(&fds[2]), 0);
        cfg_write(&mut f, 0x60, &[0]);
        assert_eq!(take(&fds[2]), 1);
        assert_eq!(cfg_read(&mut f, 0x64, 4), 0);
        cfg_write(&mut f, 0x60, &[0]);
        assert_eq!(take(&fds[2]), 0);
        // MME 0: only vector 0.
        cfg_write(&mut f, 0x52, &[0x01]);
        fire(&mut f, 1);
        assert_eq!(take(&fds[1]), 0);
        // MSI-X enabled too: MSI events are dropped.
        cfg_write(&mut f, 0x43, &[0x80]);
        fire(&mut f, 0);
        assert_eq!(take(&fds[0]), 0);
        let s = f.core().msi().unwrap().stats();
        assert_eq!(
            (
                s.triggers,
                s.pending_sets,
                s.dropped_disabled,
                s.dropped_mme
            ),
            (5, 2, 2, 1)
        );
        // Disabling MSI-X alone keeps INTx suppressed while MSI is on.
        cfg_write(&mut f, 0x43, &[0]);
        assert!(f.core().intx().suppressed());
    }

    #[test]
    fn set_irqs_msi_kernel_rules() {
        let mut f = function(4);
        let a = efd();
        let b = efd();
        // Loopback on an idle index: EINVAL. MASK / UNMASK: ENOTTY.
        assert_eq!(
            set(&mut f, IRQ_MSI, IrqAction::Trigger, 0, 1, IrqData::None),
            Err(libc::EINVAL)
        );
        assert_eq!(
            set(&mut f, IRQ_MSI, IrqAction::Mask, 0, 1, IrqData::None),
            Err(libc::ENOTTY)
        );
        assert_eq!(
            set(&mut f, IRQ_MSI, IrqAction::Unmask, 0, 1, IrqData::None),
            Err(libc::ENOTTY)
        );
        // First bind allocates start + count = 2 vectors; growing past that is EINVAL.
        bind_msi(&mut f, 1, &[&a]).unwrap();
        assert_eq!(bind_msi(&mut f, 2, &[&b]), Err(libc::EINVAL));
        bind_msi(&mut f, 0, &[&b]).unwrap();
        // Loopback with DATA_NONE and DATA_BOOL signals the bound fds, masks untouched.
        cfg_write(&mut f, 0x60, &[0xf]);
        set(&mut f, IRQ_MSI, IrqAction::Trigger, 0, 2, IrqData::None).unwrap();
        assert_eq!((take(&b), take(&a)), (1, 1));
        set(
            &mut f,
            IRQ_MSI,
            IrqAction::Trigger,
            0,
            2,
            IrqData::Bool(vec![false, true]),
        )
        .unwrap();
        assert_eq!((take(&b), take(&a)), (0, 1));
        // Disable, then a bigger enable works.
        set(&mut f, IRQ_MSI, IrqAction::Trigger, 0, 0, IrqData::None).unwrap();
        assert!(!f.core().msi().unwrap().has_notifiers());
        bind_msi(&mut f, 2, &[&a, &b]).unwrap();
        // No MSI capability: only the disable request.
        let mut g = function(0);
        assert_eq!(g.irq_info(IRQ_MSI).count, 0);
        assert!(set(&mut g, IRQ_MSI, IrqAction::Trigger, 0, 0, IrqData::None).is_ok());
        assert_eq!(bind_msi(&mut g, 0, &[&a]), Err(libc::EINVAL));
        assert_eq!(g.layout().cap_offset(PCI_CAP_ID_MSI), None);
    }

    #[test]
    fn msix_loopback_signals_the_eventfd() {
        let mut f = function(1);
        let v3 = efd();
        set(
            &mut f,
            IRQ_MSIX,
            IrqAction::Trigger,
            3,
            1,
            IrqData::Eventfds(vec![Some(v3.try_clone().unwrap())]),
        )
        .unwrap();
        // MSI-X disabled: a fire only sets the PBA bit, the loopback writes the fd anyway.
        f.core_mut().msix_fire(3).unwrap();
        assert_eq!(take(&v3), 0);
        set(&mut f, IRQ_MSIX, IrqAction::Trigger, 3, 1, IrqData::None).unwrap();
        assert_eq!(take(&v3), 1);
        set(
            &mut f,
            IRQ_MSIX,
            IrqAction::Trigger,
            2,
            2,
            IrqData::Bool(vec![true, true]),
        )
        .unwrap();
        assert_eq!(take(&v3), 1);
        assert!(f.core().msix().unwrap().pending(3).unwrap());
        // Through the BAR: the PBA shows it; a PBA write reaches the device.
        let mut pba = [0u8; 8];
        f.region_read(2, 0x1000, &mut pba).unwrap();
        assert_eq!(u64::from_le_bytes(pba), 1 << 3);
        f.region_write(2, 0x1000, &[0; 8]).unwrap();
        assert_eq!(f.device().writes, 1);
        let mut odd = [0u8; 2];
        f.region_read(2, 0, &mut odd).unwrap();
        assert_eq!((odd, f.device().reads), ([0xab, 0xab], 1));
    }

    #[test]
    fn regions_ioeventfds_and_bar_sizing() {
        let mut f = function(1);
        assert_eq!(f.region_info(0).size, 4096);
        assert_eq!(f.region_info(1).size, 0);
        assert_eq!(f.region_info(7).size, 4096);
        let io = f.region_io_fds(0);
        assert_eq!(
            (io.len(), io[0].offset, io[0].size, io[0].datamatch),
            (1, 8, 4, Some(7))
        );
        // 64-bit BAR0: low dword carries the type bits, the upper dword is all address.
        cfg_write(&mut f, PCI_BAR0, &[0xff; 8]);
        assert_eq!(cfg_read(&mut f, PCI_BAR0, 8), 0xffff_ffff_ffff_f004);
        assert_eq!(f.region_read(3, 0, &mut [0; 4]), Err(libc::EINVAL));
        // The ioeventfd is polled by the function and reported to the device.
        let (fd, token) = f
            .poll_fds()
            .into_iter()
            .next()
            .map(|(fd, t)| (fd.try_clone_to_owned().unwrap(), t))
            .unwrap();
        let e = std::fs::File::from(fd);
        std::io::Write::write_all(&mut &e, &3u64.to_ne_bytes()).unwrap();
        f.handle_fd_event(token);
        assert_eq!(f.device().doorbells, 3);
    }

    #[test]
    fn save_load_and_layout_mismatch() {
        let mut f = function(4);
        cfg_write(&mut f, PCI_COMMAND, &[0x06, 0x04]);
        cfg_write(&mut f, 0x52, &[0x21]);
        cfg_write(&mut f, 0x60, &[0x2]);
        f.region_write(0, 0, &[1]).unwrap();
        let s = f.save_state(true).unwrap();
        assert_eq!(s.device, Some(serde_json::json!(1)));
        let json = serde_json::to_string(&s).unwrap();
        let mut g = function(4);
        g.load_state(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(g.save_state(true).unwrap(), s);
        assert!(g.core().intx().intx_disabled());
        assert_eq!(g.core().msi().unwrap().pending_bits(), 0b10);
        // Another MSI size or another identity: rejected, nothing changes.
        let mut h = function(8);
        let before = h.save_state(true).unwrap();
        assert!(h.load_state(&s).is_err());
        assert_eq!(h.save_state(true).unwrap(), before);
        let mut other = s.clone();
        other.config_space[0] ^= 1;
        assert!(g.load_state(&other).is_err());
        // Reset: registers to power-on, device told, bindings kept.
        let a = efd();
        bind_msi(&mut g, 0, &[&a]).unwrap();
        g.reset_function();
        assert_eq!(g.device().resets, 1);
        assert_eq!(cfg_read(&mut g, PCI_COMMAND, 2), 0);
        assert!(!g.core().msi().unwrap().enabled());
        assert!(g.core().msi().unwrap().has_notifier(0));
    }

    #[test]
    fn config_effects_rw1c_and_device_side_bytes() {
        let mut f = function(1);
        let vcap = f.layout().cap_offset(PCI_CAP_ID_VNDR).unwrap();
        assert_eq!(vcap, 0x70);
        // 64-bit BAR0 at 0x1_2345_6000: one effect per written dword, for BAR0.
        cfg_write(&mut f, PCI_BAR0, &0x2345_6000u32.to_le_bytes());
        cfg_write(&mut f, PCI_BAR0 + 4, &1u32.to_le_bytes());
        cfg_write(&mut f, PCI_COMMAND, &[0x06, 0x04]);
        cfg_write(&mut f, 0x52, &[0x01]);
        cfg_write(&mut f, 0x42, &[0, 0xc0]);
        cfg_write(&mut f, PCI_INTERRUPT_LINE, &[9]);
        assert_eq!(
            f.device().effects,
            vec![
                ConfigEffect::Bar {
                    index: 0,
                    address: 0x2345_6000
                },
                ConfigEffect::Bar {
                    index: 0,
                    address: 0x1_2345_6000
                },
                ConfigEffect::Command { old: 0, new: 0x406 },
                ConfigEffect::Msi,
                ConfigEffect::Msix,
                ConfigEffect::Write {
                    offset: PCI_INTERRUPT_LINE,
                    len: 1
                },
            ]
        );
        assert_eq!(f.core().bar_address(0), Some(0x1_2345_6000));
        assert_eq!(f.core().bar_address(1), None);
        // Device-side bytes: an rw1c vendor bit and a STATUS error bit; the guest clears them
        // by writing 1, a 0 leaves them.
        f.core_mut().set_config_bytes(vcap + 4, &[0b1010]);
        f.core_mut().set_config_bytes(PCI_STATUS + 1, &[0x20]);
        cfg_write(&mut f, vcap + 4, &[0b0010]);
        cfg_write(&mut f, PCI_STATUS + 1, &[0x00]);
        assert_eq!(cfg_read(&mut f, vcap + 4, 1), 0b1000);
        assert_eq!(cfg_read(&mut f, PCI_STATUS, 2), 0x2010);
        cfg_write(&mut f, PCI_STATUS + 1, &[0x20]);
        assert_eq!(cfg_read(&mut f, PCI_STATUS, 2), 0x0010);
        // Plain rw byte, read-only byte; model-owned bytes ignore device-side writes.
        cfg_write(&mut f, vcap + 3, &[0x5a]);
        cfg_write(&mut f, vcap + 5, &[0x5a]);
        assert_eq!(cfg_read(&mut f, vcap + 2, 4), 0x0008_5a08);
        f.core_mut().set_config_bytes(0x42, &[0xff, 0xff]);
        assert_eq!(cfg_read(&mut f, 0x42, 2), 0xc007);
        let mut buf = [0u8; 2];
        f.core().config_bytes(vcap, &mut buf);
        assert_eq!(buf, [PCI_CAP_ID_VNDR, 0]);
    }

    #[test]
    fn msi_without_per_vector_mask() {
        let mut f = PciFunctionBuilder::new(Identity::default())
            .msi_with(2, false)
            .build(Dev::default())
            .unwrap();
        assert_eq!(cfg_read(&mut f, 0x40, 4), 0x0082_0005);
        cfg_write(&mut f, 0x4c, &[0x41, 0x40, 0xff, 0xff]);
        cfg_write(&mut f, 0x50, &u32::MAX.to_le_bytes());
        assert_eq!(cfg_read(&mut f, 0x4c, 4), 0x4041);
        assert_eq!(cfg_read(&mut f, 0x50, 4), 0);
        assert_eq!(f.core().msi().unwrap().mask_bits(), 0);
        let a = efd();
        bind_msi(&mut f, 0, &[&a]).unwrap();
        cfg_write(&mut f, 0x42, &[0x11]);
        f.region_write(0, 0, &[1]).unwrap_err();
        f.core_mut().msi_fire(1).unwrap();
        assert_eq!(take(&a), 0);
        f.core_mut().msi_fire(0).unwrap();
        assert_eq!(take(&a), 1);
    }
}
