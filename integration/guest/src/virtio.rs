// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A modern (virtio 1.x) virtio-pci driver in userspace, on a device opened through vfio-pci.
//!
//! [`Transport`] finds the virtio vendor capabilities in config space (common, notify, ISR and
//! device config), and accesses those structures in their BARs with single 1/2/4-byte
//! accesses through the VFIO device fd (QEMU's virtio-pci accepts nothing wider, so 64-bit
//! fields are written as two 32-bit halves). [`SplitQueue`] is a split virtqueue whose rings
//! and buffers live in [`DmaPage`]s: descriptors carry guest physical addresses (the device
//! bypasses the IOMMU unless `iommu_platform=on`, see [`crate::dma`]).

use std::sync::atomic::{Ordering::SeqCst, fence};

use crate::bail;
use crate::dma::{DmaPage, PAGE_SIZE};
use crate::pci;
use crate::report::{Error, Result};
use crate::sys::Mapping;
use crate::vfio::VfioDevice;

/// PCI vendor ID of virtio devices.
pub const VENDOR: u16 = 0x1af4;
/// PCI device ID of a modern virtio device is this plus the virtio device ID.
pub const MODERN_DEVICE_BASE: u16 = 0x1040;

/// Capability ID of vendor-specific capabilities, which virtio uses.
pub const CAP_ID_VENDOR: u8 = 0x09;
/// `cfg_type` of the common configuration structure.
pub const CAP_COMMON: u8 = 1;
/// `cfg_type` of the notification structure.
pub const CAP_NOTIFY: u8 = 2;
/// `cfg_type` of the ISR status byte.
pub const CAP_ISR: u8 = 3;
/// `cfg_type` of the device-specific configuration.
pub const CAP_DEVICE: u8 = 4;

/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status: the guest has a driver for it.
pub const STATUS_DRIVER: u8 = 2;
/// Device status: the driver is ready.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status: the device hit an error and needs a reset.
pub const STATUS_NEEDS_RESET: u8 = 0x40;
/// Device status: the driver gave up.
pub const STATUS_FAILED: u8 = 0x80;

/// Feature bit 32: VIRTIO_F_VERSION_1 (a modern device).
pub const F_VERSION_1: u64 = 1 << 32;

/// ISR bit 0: a virtqueue has used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit 1: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

// struct virtio_pci_common_cfg.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
/// Bytes of the common structure this driver uses.
const COMMON_LEN: u64 = 0x38;

/// Split ring flags.
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// One virtio vendor capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCap {
    /// Offset of the capability in config space.
    pub cap: usize,
    /// Structure type ([`CAP_COMMON`], ...).
    pub cfg_type: u8,
    /// BAR holding the structure.
    pub bar: u8,
    /// Offset of the structure in the BAR.
    pub offset: u32,
    /// Length of the structure.
    pub length: u32,
    /// `notify_off_multiplier` (notify capability only, else 0).
    pub notify_mult: u32,
}

/// Every virtio vendor capability of a config-space image, in list order.
pub fn parse_caps(config: &[u8]) -> Vec<VirtioCap> {
    let mut caps = Vec::new();
    let status = pci::cfg16(config, 6).unwrap_or(0);
    if status & 0x10 == 0 {
        return caps;
    }
    let mut ptr = usize::from(config.get(pci::CFG_CAP_PTR).copied().unwrap_or(0) & 0xfc);
    // At most 48 capabilities fit in 256 bytes: a longer walk is a loop.
    for _ in 0..48 {
        if ptr < 0x40 {
            break;
        }
        let (Some(&id), Some(&next)) = (config.get(ptr), config.get(ptr + 1)) else {
            break;
        };
        let len = config.get(ptr + 2).copied().unwrap_or(0);
        if id == CAP_ID_VENDOR && len >= 16 {
            let cfg_type = config.get(ptr + 3).copied().unwrap_or(0);
            let notify_mult = if cfg_type == CAP_NOTIFY && len >= 20 {
                pci::cfg32(config, ptr + 16).unwrap_or(0)
            } else {
                0
            };
            if let (Some(&bar), Some(offset), Some(length)) = (
                config.get(ptr + 4),
                pci::cfg32(config, ptr + 8),
                pci::cfg32(config, ptr + 12),
            ) {
                caps.push(VirtioCap {
                    cap: ptr,
                    cfg_type,
                    bar,
                    offset,
                    length,
                    notify_mult,
                });
            }
        }
        ptr = usize::from(next & 0xfc);
    }
    caps
}

/// Where one structure lives: BAR (VFIO region index), offset and length.
#[derive(Debug, Clone, Copy)]
struct Loc {
    bar: u32,
    offset: u64,
    length: u64,
}

impl Loc {
    fn at(&self, off: u64, width: u64) -> Result<u64> {
        if off.checked_add(width).is_none_or(|end| end > self.length) {
            bail!(
                "access of {width} bytes at {off:#x} is outside the {:#x}-byte structure in BAR{}",
                self.length,
                self.bar
            );
        }
        Ok(self.offset + off)
    }
}

/// The virtio-pci modern transport of a device opened through VFIO.
#[derive(Debug)]
pub struct Transport<'a> {
    dev: &'a VfioDevice,
    common: Loc,
    notify: Loc,
    notify_mult: u32,
    isr: Loc,
    device: Loc,
}

impl<'a> Transport<'a> {
    /// Finds the four structures from the virtio capabilities in `dev`'s config space (the
    /// first capability of each type, as the specification asks) and checks that each lies
    /// inside its BAR.
    pub fn new(dev: &'a VfioDevice, caps: &[VirtioCap]) -> Result<Self> {
        let loc = |t: u8, name: &str| -> Result<(Loc, u32)> {
            let c = caps
                .iter()
                .find(|c| c.cfg_type == t)
                .ok_or_else(|| Error::msg(format!("no virtio {name} capability")))?;
            if c.bar > 5 {
                bail!("virtio {name} capability names BAR {}", c.bar);
            }
            let r = dev.region(u32::from(c.bar))?;
            if u64::from(c.offset) + u64::from(c.length) > r.size {
                bail!(
                    "virtio {name} structure ({:#x} bytes at {:#x}) exceeds BAR{} ({:#x} bytes)",
                    c.length,
                    c.offset,
                    c.bar,
                    r.size
                );
            }
            Ok((
                Loc {
                    bar: u32::from(c.bar),
                    offset: u64::from(c.offset),
                    length: u64::from(c.length),
                },
                c.notify_mult,
            ))
        };
        let (common, _) = loc(CAP_COMMON, "common")?;
        let (notify, notify_mult) = loc(CAP_NOTIFY, "notify")?;
        let (isr, _) = loc(CAP_ISR, "ISR")?;
        let (device, _) = loc(CAP_DEVICE, "device config")?;
        if common.length < COMMON_LEN {
            bail!("the common structure has {:#x} bytes", common.length);
        }
        Ok(Self {
            dev,
            common,
            notify,
            notify_mult,
            isr,
            device,
        })
    }

    fn c8(&self, off: u64) -> Result<u8> {
        self.dev.read8(self.common.bar, self.common.at(off, 1)?)
    }

    fn c16(&self, off: u64) -> Result<u16> {
        self.dev.read16(self.common.bar, self.common.at(off, 2)?)
    }

    fn c32(&self, off: u64) -> Result<u32> {
        self.dev.read32(self.common.bar, self.common.at(off, 4)?)
    }

    fn w8(&self, off: u64, v: u8) -> Result<()> {
        self.dev.write8(self.common.bar, self.common.at(off, 1)?, v)
    }

    fn w16(&self, off: u64, v: u16) -> Result<()> {
        self.dev
            .write16(self.common.bar, self.common.at(off, 2)?, v)
    }

    fn w32(&self, off: u64, v: u32) -> Result<()> {
        self.dev
            .write32(self.common.bar, self.common.at(off, 4)?, v)
    }

    /// A 64-bit common field as two 32-bit writes, low half first.
    fn w64(&self, off: u64, v: u64) -> Result<()> {
        self.w32(off, v as u32)?;
        self.w32(off + 4, (v >> 32) as u32)
    }

    fn r64(&self, off: u64) -> Result<u64> {
        Ok(u64::from(self.c32(off)?) | (u64::from(self.c32(off + 4)?) << 32))
    }

    /// `device_status`.
    pub fn status(&self) -> Result<u8> {
        self.c8(DEVICE_STATUS)
    }

    /// Writes `device_status`.
    pub fn set_status(&self, s: u8) -> Result<()> {
        self.w8(DEVICE_STATUS, s)
    }

    /// Adds status bits and checks that the device kept them all.
    pub fn add_status(&self, bits: u8) -> Result<u8> {
        let s = self.status()? | bits;
        self.set_status(s)?;
        let got = self.status()?;
        if got != s {
            bail!("device_status reads {got:#x} after writing {s:#x}");
        }
        Ok(got)
    }

    /// Resets the device: writes 0 and waits until `device_status` reads 0.
    pub fn reset(&self) -> Result<()> {
        self.set_status(0)?;
        let deadline = std::time::Instant::now() + crate::EVENT_TIMEOUT;
        loop {
            let s = self.status()?;
            if s == 0 {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!("device_status still reads {s:#x} after the reset");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// The 64 device feature bits.
    pub fn device_features(&self) -> Result<u64> {
        self.w32(DEVICE_FEATURE_SELECT, 0)?;
        let lo = self.c32(DEVICE_FEATURE)?;
        self.w32(DEVICE_FEATURE_SELECT, 1)?;
        let hi = self.c32(DEVICE_FEATURE)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }

    /// Writes the 64 driver feature bits.
    pub fn set_driver_features(&self, f: u64) -> Result<()> {
        self.w32(DRIVER_FEATURE_SELECT, 0)?;
        self.w32(DRIVER_FEATURE, f as u32)?;
        self.w32(DRIVER_FEATURE_SELECT, 1)?;
        self.w32(DRIVER_FEATURE, (f >> 32) as u32)
    }

    /// `num_queues`.
    pub fn num_queues(&self) -> Result<u16> {
        self.c16(NUM_QUEUES)
    }

    /// `config_generation`.
    pub fn config_generation(&self) -> Result<u8> {
        self.c8(CONFIG_GENERATION)
    }

    /// Selects queue `q` and returns its maximum size (0: the queue does not exist).
    pub fn select_queue(&self, q: u16) -> Result<u16> {
        self.w16(QUEUE_SELECT, q)?;
        self.c16(QUEUE_SIZE)
    }

    /// Configures the selected queue: size and ring addresses (GPAs), then enables it.
    /// Returns its `queue_notify_off`.
    pub fn setup_queue(&self, size: u16, desc: u64, driver: u64, device: u64) -> Result<u16> {
        self.w16(QUEUE_SIZE, size)?;
        self.w64(QUEUE_DESC, desc)?;
        self.w64(QUEUE_DRIVER, driver)?;
        self.w64(QUEUE_DEVICE, device)?;
        let got = (
            self.c16(QUEUE_SIZE)?,
            self.r64(QUEUE_DESC)?,
            self.r64(QUEUE_DRIVER)?,
            self.r64(QUEUE_DEVICE)?,
        );
        if got != (size, desc, driver, device) {
            bail!(
                "queue registers read back {got:x?}, written {:x?}",
                (size, desc, driver, device)
            );
        }
        self.w16(QUEUE_ENABLE, 1)?;
        if self.c16(QUEUE_ENABLE)? != 1 {
            bail!("queue_enable does not read 1 after enabling");
        }
        self.c16(QUEUE_NOTIFY_OFF)
    }

    /// Byte offset in the notify BAR of the doorbell for a queue with `notify_off`.
    pub fn notify_offset(&self, notify_off: u16) -> Result<u64> {
        let off = u64::from(notify_off) * u64::from(self.notify_mult);
        self.notify.at(off, 2)
    }

    /// Notifies queue `q` (a 16-bit write of its index at `offset` of the notify BAR).
    pub fn notify(&self, offset: u64, q: u16) -> Result<()> {
        self.dev.write16(self.notify.bar, offset, q)
    }

    /// Reads (and so clears) the ISR status byte, which also lowers INTx.
    pub fn read_isr(&self) -> Result<u8> {
        self.dev.read8(self.isr.bar, self.isr.at(0, 1)?)
    }

    /// `len` bytes of device config, read as 32-bit words, retried until `config_generation`
    /// is the same before and after.
    pub fn device_config(&self, len: usize) -> Result<Vec<u8>> {
        for _ in 0..8 {
            let g0 = self.config_generation()?;
            let mut out = Vec::with_capacity(len.next_multiple_of(4));
            for off in (0..len as u64).step_by(4) {
                let v = self.dev.read32(self.device.bar, self.device.at(off, 4)?)?;
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.truncate(len);
            if self.config_generation()? == g0 {
                return Ok(out);
            }
        }
        bail!("config_generation kept changing while reading the device config")
    }

    /// Human-readable locations of the structures, for the result line.
    pub fn describe(&self) -> String {
        let l = |x: &Loc| format!("bar{}+{:#x}/{:#x}", x.bar, x.offset, x.length);
        format!(
            "common={},notify={}*{},isr={},device={}",
            l(&self.common),
            l(&self.notify),
            self.notify_mult,
            l(&self.isr),
            l(&self.device)
        )
    }
}

/// One buffer of a descriptor chain: guest physical address, length, device-writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else it reads it).
    pub write: bool,
}

/// Bytes of the buffer slot each descriptor owns.
pub const SLOT_SIZE: usize = 64;
/// Largest queue this driver sets up: the descriptor table, both rings and all slots fit in
/// two pages.
pub const MAX_QUEUE_SIZE: u16 = (PAGE_SIZE / SLOT_SIZE) as u16;

/// Offsets of the three parts of a split ring of `n` entries in one page:
/// `(avail, used, end)`; the descriptor table is at 0.
pub fn ring_layout(n: u16) -> (usize, usize, usize) {
    let n = usize::from(n);
    let avail = 16 * n;
    let used = (avail + 6 + 2 * n).next_multiple_of(4);
    (avail, used, used + 6 + 8 * n)
}

/// The driver side of a split virtqueue: rings in one DMA page, one [`SLOT_SIZE`]-byte buffer
/// slot per descriptor in another.
#[derive(Debug)]
pub struct SplitQueue {
    index: u16,
    size: u16,
    ring: Mapping,
    ring_gpa: u64,
    slots: Mapping,
    slots_gpa: u64,
    avail: usize,
    used: usize,
    next_avail: u16,
    last_used: u16,
    free: Vec<u16>,
    in_flight: Vec<bool>,
    notify_offset: u64,
}

impl SplitQueue {
    /// Queue `index` of `size` entries (a power of two up to [`MAX_QUEUE_SIZE`]) in fresh DMA
    /// pages of `dev`.
    pub fn new(dev: &VfioDevice, index: u16, size: u16) -> Result<Self> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            bail!("queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}");
        }
        let (avail, used, end) = ring_layout(size);
        if end > PAGE_SIZE {
            bail!("a ring of {size} entries does not fit in a page");
        }
        let (ring, ring_gpa) = DmaPage::new(dev)?.into_parts();
        let (slots, slots_gpa) = DmaPage::new(dev)?.into_parts();
        Ok(Self {
            index,
            size,
            ring,
            ring_gpa,
            slots,
            slots_gpa,
            avail,
            used,
            next_avail: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            in_flight: vec![false; usize::from(size)],
            notify_offset: 0,
        })
    }

    /// GPAs of the descriptor table, the avail (driver) ring and the used (device) ring.
    pub fn ring_gpas(&self) -> (u64, u64, u64) {
        (
            self.ring_gpa,
            self.ring_gpa + self.avail as u64,
            self.ring_gpa + self.used as u64,
        )
    }

    /// Records where this queue's doorbell is (from [`Transport::notify_offset`]).
    pub fn set_notify_offset(&mut self, off: u64) {
        self.notify_offset = off;
    }

    /// The offset of this queue's doorbell in the notify BAR.
    pub fn notify_offset(&self) -> u64 {
        self.notify_offset
    }

    /// GPA of descriptor `id`'s buffer slot.
    pub fn slot_gpa(&self, id: u16) -> u64 {
        self.slots_gpa + (SLOT_SIZE * usize::from(id)) as u64
    }

    /// Writes `data` at `off` of descriptor `id`'s slot.
    pub fn slot_write(&self, id: u16, off: usize, data: &[u8]) -> Result<()> {
        if off + data.len() > SLOT_SIZE {
            bail!(
                "{} bytes at {off} overflow a {SLOT_SIZE}-byte slot",
                data.len()
            );
        }
        Ok(self
            .slots
            .write_bytes(SLOT_SIZE * usize::from(id) + off, data)?)
    }

    /// Reads `buf.len()` bytes at `off` of descriptor `id`'s slot.
    pub fn slot_read(&self, id: u16, off: usize, buf: &mut [u8]) -> Result<()> {
        if off + buf.len() > SLOT_SIZE {
            bail!(
                "{} bytes at {off} overflow a {SLOT_SIZE}-byte slot",
                buf.len()
            );
        }
        Ok(self
            .slots
            .read_bytes(SLOT_SIZE * usize::from(id) + off, buf)?)
    }

    /// Takes `n` free descriptors (the first is the chain head).
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u16>> {
        if n == 0 || n > self.free.len() {
            bail!(
                "queue {}: {n} descriptors wanted, {} free",
                self.index,
                self.free.len()
            );
        }
        let at = self.free.len() - n;
        Ok(self.free.split_off(at).into_iter().rev().collect())
    }

    fn write_desc(&self, id: u16, b: &Buf, next: Option<u16>) -> Result<()> {
        let at = 16 * usize::from(id);
        let mut flags = if b.write { DESC_F_WRITE } else { 0 };
        if next.is_some() {
            flags |= DESC_F_NEXT;
        }
        self.ring.atomic64(at)?.store(b.addr, SeqCst);
        self.ring.atomic32(at + 8)?.store(b.len, SeqCst);
        self.ring.atomic16(at + 12)?.store(flags, SeqCst);
        self.ring
            .atomic16(at + 14)?
            .store(next.unwrap_or(0), SeqCst);
        Ok(())
    }

    /// Writes descriptors `ids` for `bufs`, chains them and makes the chain available (does
    /// not notify). Returns the head.
    pub fn publish(&mut self, ids: &[u16], bufs: &[Buf]) -> Result<u16> {
        let Some(&head) = ids.first() else {
            bail!("an empty chain");
        };
        if ids.len() != bufs.len() {
            bail!("{} descriptors for {} buffers", ids.len(), bufs.len());
        }
        for (i, (&id, b)) in ids.iter().zip(bufs).enumerate() {
            self.write_desc(id, b, ids.get(i + 1).copied())?;
            if let Some(f) = self.in_flight.get_mut(usize::from(id)) {
                *f = true;
            }
        }
        let slot = self.avail + 4 + 2 * usize::from(self.next_avail % self.size);
        self.ring.atomic16(slot)?.store(head, SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        // Descriptors and ring entry before the index (virtio 1.2 §2.7.13).
        fence(SeqCst);
        self.ring
            .atomic16(self.avail + 2)?
            .store(self.next_avail, SeqCst);
        Ok(head)
    }

    /// Whether the device wants a notification (the used ring's NO_NOTIFY flag is clear).
    pub fn wants_notify(&self) -> Result<bool> {
        // The avail index must be visible before the flags are read.
        fence(SeqCst);
        Ok(self.ring.atomic16(self.used)?.load(SeqCst) & USED_F_NO_NOTIFY == 0)
    }

    /// Sets or clears VRING_AVAIL_F_NO_INTERRUPT (the device then does not interrupt for this
    /// queue; the driver polls it).
    pub fn set_no_interrupt(&self, on: bool) -> Result<()> {
        let v = if on { AVAIL_F_NO_INTERRUPT } else { 0 };
        self.ring.atomic16(self.avail)?.store(v, SeqCst);
        Ok(())
    }

    /// The used index the device has published.
    pub fn used_idx(&self) -> Result<u16> {
        Ok(self.ring.atomic16(self.used + 2)?.load(SeqCst))
    }

    /// Takes the next used entry `(head, len)` and frees its chain.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>> {
        if self.used_idx()? == self.last_used {
            return Ok(None);
        }
        // The index before the entry it covers.
        fence(SeqCst);
        let at = self.used + 4 + 8 * usize::from(self.last_used % self.size);
        let id = self.ring.atomic32(at)?.load(SeqCst);
        let len = self.ring.atomic32(at + 4)?.load(SeqCst);
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| self.in_flight.get(usize::from(h)) == Some(&true))
            .ok_or_else(|| Error::msg(format!("queue {}: bogus used id {id}", self.index)))?;
        let mut cur = head;
        for _ in 0..self.size {
            if let Some(f) = self.in_flight.get_mut(usize::from(cur)) {
                *f = false;
            }
            self.free.push(cur);
            let d = 16 * usize::from(cur);
            let flags = self.ring.atomic16(d + 12)?.load(SeqCst);
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            cur = self.ring.atomic16(d + 14)?.load(SeqCst);
        }
        Ok(Some((head, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Config space as QEMU lays out a modern virtio-pci device: MSI-X, then the vendor
    /// capabilities (common, ISR, device, notify, PCI cfg) all in BAR 4.
    fn image() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[6] = 0x10;
        c[pci::CFG_CAP_PTR] = 0x98;
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x98, &[0x11, 0x88, 0x0c, 0x00]); // MSI-X -> 0x88
        let vcap = |next: u8, len: u8, t: u8, off: u32, size: u32| {
            let mut v = vec![CAP_ID_VENDOR, next, len, t, 4, 0, 0, 0];
            v.extend_from_slice(&off.to_le_bytes());
            v.extend_from_slice(&size.to_le_bytes());
            v
        };
        put(0x88, &vcap(0x78, 16, CAP_COMMON, 0, 0x1000));
        put(0x78, &vcap(0x68, 16, CAP_ISR, 0x1000, 0x1000));
        put(0x68, &vcap(0x54, 16, CAP_DEVICE, 0x2000, 0x1000));
        let mut notify = vcap(0x40, 20, CAP_NOTIFY, 0x3000, 0x1000);
        notify.extend_from_slice(&4u32.to_le_bytes());
        put(0x54, &notify);
        let mut pci_cfg = vcap(0x00, 20, 5, 0, 0);
        pci_cfg.extend_from_slice(&[0; 4]);
        put(0x40, &pci_cfg);
        c
    }

    #[test]
    fn virtio_capabilities_are_found_in_list_order() {
        let caps = parse_caps(&image());
        let types: Vec<u8> = caps.iter().map(|c| c.cfg_type).collect();
        assert_eq!(types, [CAP_COMMON, CAP_ISR, CAP_DEVICE, CAP_NOTIFY, 5]);
        let n = caps
            .iter()
            .find(|c| c.cfg_type == CAP_NOTIFY)
            .expect("notify");
        assert_eq!(
            *n,
            VirtioCap {
                cap: 0x54,
                cfg_type: CAP_NOTIFY,
                bar: 4,
                offset: 0x3000,
                length: 0x1000,
                notify_mult: 4
            }
        );
    }

    #[test]
    fn capability_walk_survives_loops_and_truncation() {
        let mut c = image();
        c[0x41] = 0x88; // PCI cfg cap points back at common: a loop
        assert!(parse_caps(&c).len() <= 48);
        assert!(parse_caps(&image()[..0x60]).is_empty());
        let mut c = image();
        c[6] = 0;
        assert!(parse_caps(&c).is_empty());
    }

    #[test]
    fn rings_fit_their_page() {
        assert_eq!(ring_layout(64), (1024, 1160, 1678));
        assert_eq!(ring_layout(2), (32, 44, 66));
        let (_, used, end) = ring_layout(MAX_QUEUE_SIZE);
        assert_eq!(used % 4, 0);
        assert!(end <= PAGE_SIZE);
    }
}
