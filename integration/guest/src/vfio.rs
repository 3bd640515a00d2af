// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A minimal VFIO user (type1 container, one group, one device) on the guest's vfio-pci.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use crate::bail;
use crate::pci::PciDev;
use crate::regs::Regs;
use crate::report::{Context, Error, Facts, Result};
use crate::sys::{self, Mapping};

const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1_IOMMU: libc::c_ulong = 1;

// _IO(';', 100 + n): VFIO ioctls carry no size in their number.
const VFIO_GET_API_VERSION: u64 = 0x3b64;
const VFIO_CHECK_EXTENSION: u64 = 0x3b65;
const VFIO_SET_IOMMU: u64 = 0x3b66;
const VFIO_GROUP_GET_STATUS: u64 = 0x3b67;
const VFIO_GROUP_SET_CONTAINER: u64 = 0x3b68;
const VFIO_GROUP_GET_DEVICE_FD: u64 = 0x3b6a;
const VFIO_DEVICE_GET_INFO: u64 = 0x3b6b;
const VFIO_DEVICE_GET_REGION_INFO: u64 = 0x3b6c;
const VFIO_DEVICE_GET_IRQ_INFO: u64 = 0x3b6d;
const VFIO_DEVICE_SET_IRQS: u64 = 0x3b6e;
const VFIO_IOMMU_MAP_DMA: u64 = 0x3b71;
const VFIO_IOMMU_UNMAP_DMA: u64 = 0x3b72;

const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// Region flag: mmap-able.
pub const REGION_MMAP: u32 = 1 << 2;

/// IRQ index of INTx.
pub const IRQ_INTX: u32 = 0;
/// IRQ index of MSI (`VFIO_PCI_MSI_IRQ_INDEX`).
pub const IRQ_MSI: u32 = 1;
/// IRQ index of MSI-X.
pub const IRQ_MSIX: u32 = 2;

/// SET_IRQS data: none.
pub const DATA_NONE: u32 = 1 << 0;
/// SET_IRQS data: eventfds.
pub const DATA_EVENTFD: u32 = 1 << 2;
/// SET_IRQS action: unmask.
pub const ACTION_UNMASK: u32 = 1 << 4;
/// SET_IRQS action: trigger.
pub const ACTION_TRIGGER: u32 = 1 << 5;

/// COMMAND bit 1: memory space decoding.
pub const CMD_MEMORY: u16 = 1 << 1;
/// COMMAND bit 2: bus master (the device may write memory, MSI messages included).
pub const CMD_BUS_MASTER: u16 = 1 << 2;

/// Region index of PCI config space.
pub const REGION_CONFIG: u32 = 7;

fn le32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from(le32(b, off)) | (u64::from(le32(b, off + 4)) << 32)
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// One VFIO region (BAR, ROM, config).
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// Region index.
    pub index: u32,
    /// VFIO_REGION_INFO_FLAG_*.
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
}

/// An open VFIO device with its group and container. Dropping it closes all three in order.
#[derive(Debug)]
pub struct VfioDevice {
    dev: File,
    _group: File,
    container: File,
    regions: Vec<Region>,
}

fn open_rw(path: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ctx(format_args!("opening {path}"))
}

impl VfioDevice {
    /// Binds `pci` to vfio-pci and opens it through a type1 container.
    pub fn open(pci: &PciDev, facts: &mut Facts) -> Result<Self> {
        pci.bind("vfio-pci")?;
        let group_no = pci.iommu_group()?;
        facts.set("iommu_group", group_no);

        let container = open_rw("/dev/vfio/vfio")?;
        let api = sys::ioctl_value(container.as_fd(), VFIO_GET_API_VERSION, 0)
            .ctx("VFIO_GET_API_VERSION")?;
        if api != VFIO_API_VERSION {
            bail!("VFIO API version {api}, expected {VFIO_API_VERSION}");
        }
        let has_type1 = sys::ioctl_value(container.as_fd(), VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU)
            .ctx("VFIO_CHECK_EXTENSION")?;
        if has_type1 != 1 {
            bail!("the VFIO container does not support VFIO_TYPE1_IOMMU");
        }

        let group = open_rw(&format!("/dev/vfio/{group_no}"))?;
        let mut status = [0u8; 8];
        put32(&mut status, 0, 8);
        sys::ioctl_buf(group.as_fd(), VFIO_GROUP_GET_STATUS, &mut status)
            .ctx("VFIO_GROUP_GET_STATUS")?;
        if le32(&status, 4) & VFIO_GROUP_FLAGS_VIABLE == 0 {
            bail!(
                "IOMMU group {group_no} is not viable (another device of the group is bound to a host driver)"
            );
        }
        let mut cfd = std::os::fd::AsRawFd::as_raw_fd(&container).to_ne_bytes();
        sys::ioctl_buf(group.as_fd(), VFIO_GROUP_SET_CONTAINER, &mut cfd)
            .ctx("VFIO_GROUP_SET_CONTAINER")?;
        sys::ioctl_value(container.as_fd(), VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU)
            .ctx("VFIO_SET_IOMMU(TYPE1)")?;
        let name = CString::new(pci.bdf.as_str()).map_err(|_| Error::msg("BDF contains NUL"))?;
        let dev = sys::ioctl_cstr_new_fd(group.as_fd(), VFIO_GROUP_GET_DEVICE_FD, &name)
            .ctx("VFIO_GROUP_GET_DEVICE_FD")?;

        let mut info = [0u8; 16];
        put32(&mut info, 0, 16);
        sys::ioctl_buf(dev.as_fd(), VFIO_DEVICE_GET_INFO, &mut info).ctx("VFIO_DEVICE_GET_INFO")?;
        let (flags, num_regions, num_irqs) = (le32(&info, 4), le32(&info, 8), le32(&info, 12));
        facts.set("num_regions", num_regions);
        facts.set("num_irqs", num_irqs);
        if flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            bail!("VFIO device flags {flags:#x} lack VFIO_DEVICE_FLAGS_PCI");
        }
        let mut regions = Vec::new();
        // BARs 0-5, ROM 6 and config 7; the kernel answers EINVAL for the VGA region (8) of a
        // device that is not VGA.
        for index in 0..num_regions.min(REGION_CONFIG + 1) {
            let mut ri = [0u8; 32];
            put32(&mut ri, 0, 32);
            put32(&mut ri, 8, index);
            sys::ioctl_buf(dev.as_fd(), VFIO_DEVICE_GET_REGION_INFO, &mut ri)
                .ctx(format_args!("VFIO_DEVICE_GET_REGION_INFO({index})"))?;
            regions.push(Region {
                index,
                flags: le32(&ri, 4),
                size: le64(&ri, 16),
                offset: le64(&ri, 24),
            });
        }
        Ok(Self {
            dev,
            _group: group,
            container,
            regions,
        })
    }

    /// Region `index`, failing when the device has no such region or it is empty.
    pub fn region(&self, index: u32) -> Result<Region> {
        match self.regions.iter().find(|r| r.index == index) {
            Some(r) if r.size > 0 => Ok(*r),
            _ => bail!("VFIO region {index} is absent"),
        }
    }

    /// `(flags, count)` of IRQ index `index`.
    pub fn irq_info(&self, index: u32) -> Result<(u32, u32)> {
        let mut b = [0u8; 16];
        put32(&mut b, 0, 16);
        put32(&mut b, 8, index);
        sys::ioctl_buf(self.dev.as_fd(), VFIO_DEVICE_GET_IRQ_INFO, &mut b)
            .ctx(format_args!("VFIO_DEVICE_GET_IRQ_INFO({index})"))?;
        Ok((le32(&b, 4), le32(&b, 12)))
    }

    fn set_irqs(&self, flags: u32, index: u32, start: u32, count: u32, fds: &[i32]) -> Result<()> {
        let mut b = vec![0u8; 20 + 4 * fds.len()];
        let argsz = u32::try_from(b.len()).map_err(|_| Error::msg("too many eventfds"))?;
        put32(&mut b, 0, argsz);
        put32(&mut b, 4, flags);
        put32(&mut b, 8, index);
        put32(&mut b, 12, start);
        put32(&mut b, 16, count);
        for (i, fd) in fds.iter().enumerate() {
            put32(&mut b, 20 + 4 * i, *fd as u32);
        }
        sys::ioctl_buf(self.dev.as_fd(), VFIO_DEVICE_SET_IRQS, &mut b).ctx(format_args!(
            "VFIO_DEVICE_SET_IRQS(flags {flags:#x}, index {index}, start {start}, count {count})"
        ))?;
        Ok(())
    }

    /// Binds trigger eventfds to IRQ `index` from vector `start` on (enables the index).
    pub fn set_triggers(&self, index: u32, start: u32, fds: &[i32]) -> Result<()> {
        let count = u32::try_from(fds.len()).map_err(|_| Error::msg("too many eventfds"))?;
        self.set_irqs(DATA_EVENTFD | ACTION_TRIGGER, index, start, count, fds)
    }

    /// Disables IRQ `index` (TRIGGER | DATA_NONE, count 0).
    pub fn disable_irq(&self, index: u32) -> Result<()> {
        self.set_irqs(DATA_NONE | ACTION_TRIGGER, index, 0, 0, &[])
    }

    /// Unmasks INTx (UNMASK | DATA_NONE, start 0, count 1).
    pub fn unmask_intx(&self) -> Result<()> {
        self.set_irqs(DATA_NONE | ACTION_UNMASK, IRQ_INTX, 0, 1, &[])
    }

    fn check_range(&self, r: &Region, off: u64, width: u64) -> Result<u64> {
        if off % width != 0 || off.checked_add(width).is_none_or(|end| end > r.size) {
            bail!(
                "access of {width} bytes at {off:#x} outside region {} ({:#x} bytes)",
                r.index,
                r.size
            );
        }
        Ok(r.offset + off)
    }

    /// Reads 32 bits at `off` of region `index` through the device fd.
    pub fn read32(&self, index: u32, off: u64) -> Result<u32> {
        let r = self.region(index)?;
        let pos = self.check_range(&r, off, 4)?;
        let mut b = [0u8; 4];
        self.dev
            .read_exact_at(&mut b, pos)
            .ctx(format_args!("reading region {index} at {off:#x}"))?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes 32 bits at `off` of region `index` through the device fd.
    pub fn write32(&self, index: u32, off: u64, val: u32) -> Result<()> {
        let r = self.region(index)?;
        let pos = self.check_range(&r, off, 4)?;
        self.dev
            .write_all_at(&val.to_le_bytes(), pos)
            .ctx(format_args!("writing region {index} at {off:#x}"))
    }

    /// Reads `buf.len()` bytes (1, 2 or 4, naturally aligned: one device access) at `off` of
    /// region `index` through the device fd.
    pub fn read_width(&self, index: u32, off: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.region(index)?;
        let pos = self.check_width(&r, off, buf.len())?;
        self.dev
            .read_exact_at(buf, pos)
            .ctx(format_args!("reading region {index} at {off:#x}"))
    }

    /// Writes `data` (1, 2 or 4 bytes, naturally aligned: one device access) at `off` of region
    /// `index` through the device fd.
    pub fn write_width(&self, index: u32, off: u64, data: &[u8]) -> Result<()> {
        let r = self.region(index)?;
        let pos = self.check_width(&r, off, data.len())?;
        self.dev
            .write_all_at(data, pos)
            .ctx(format_args!("writing region {index} at {off:#x}"))
    }

    fn check_width(&self, r: &Region, off: u64, width: usize) -> Result<u64> {
        if !matches!(width, 1 | 2 | 4) {
            bail!("region access of {width} bytes: only 1, 2 or 4 are single accesses");
        }
        self.check_range(r, off, width as u64)
    }

    /// Reads 8 bits at `off` of region `index`.
    pub fn read8(&self, index: u32, off: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read_width(index, off, &mut b)?;
        Ok(b[0])
    }

    /// Reads 16 bits at `off` of region `index`.
    pub fn read16(&self, index: u32, off: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read_width(index, off, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Writes 8 bits at `off` of region `index`.
    pub fn write8(&self, index: u32, off: u64, val: u8) -> Result<()> {
        self.write_width(index, off, &[val])
    }

    /// Writes 16 bits at `off` of region `index`.
    pub fn write16(&self, index: u32, off: u64, val: u16) -> Result<()> {
        self.write_width(index, off, &val.to_le_bytes())
    }

    /// The first `len` bytes of config space, read as 32-bit words through the config region.
    pub fn config_bytes(&self, len: usize) -> Result<Vec<u8>> {
        let mut cfg = Vec::with_capacity(len.next_multiple_of(4));
        for off in (0..len).step_by(4) {
            cfg.extend_from_slice(&self.read32(REGION_CONFIG, off as u64)?.to_le_bytes());
        }
        cfg.truncate(len);
        Ok(cfg)
    }

    /// VFIO_IOMMU_MAP_DMA: makes `size` bytes of this process's memory at `vaddr` readable and
    /// writable for the device at I/O virtual address `iova` (pins the pages).
    pub fn map_dma(&self, vaddr: u64, iova: u64, size: u64) -> Result<()> {
        let mut b = [0u8; 32];
        put32(&mut b, 0, 32);
        put32(&mut b, 4, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE);
        put64(&mut b, 8, vaddr);
        put64(&mut b, 16, iova);
        put64(&mut b, 24, size);
        sys::ioctl_buf(self.container.as_fd(), VFIO_IOMMU_MAP_DMA, &mut b).ctx(format_args!(
            "VFIO_IOMMU_MAP_DMA(vaddr {vaddr:#x}, iova {iova:#x}, size {size:#x})"
        ))?;
        Ok(())
    }

    /// VFIO_IOMMU_UNMAP_DMA of `size` bytes at `iova`; returns the number of bytes unmapped.
    pub fn unmap_dma(&self, iova: u64, size: u64) -> Result<u64> {
        let mut b = [0u8; 24];
        put32(&mut b, 0, 24);
        put64(&mut b, 8, iova);
        put64(&mut b, 16, size);
        sys::ioctl_buf(self.container.as_fd(), VFIO_IOMMU_UNMAP_DMA, &mut b).ctx(format_args!(
            "VFIO_IOMMU_UNMAP_DMA(iova {iova:#x}, size {size:#x})"
        ))?;
        Ok(le64(&b, 16))
    }

    /// Sets COMMAND bits (e.g. Bus Master, which MSI/MSI-X messages need) through the config
    /// region with a 16-bit read-modify-write; returns the new COMMAND value.
    pub fn set_command_bits(&self, bits: u16) -> Result<u16> {
        let r = self.region(REGION_CONFIG)?;
        let pos = self.check_range(&r, 4, 2)?;
        let mut b = [0u8; 2];
        self.dev.read_exact_at(&mut b, pos).ctx("reading COMMAND")?;
        let cmd = u16::from_le_bytes(b) | bits;
        self.dev
            .write_all_at(&cmd.to_le_bytes(), pos)
            .ctx("writing COMMAND")?;
        Ok(cmd)
    }

    /// Maps `len` bytes of region `index` (which must be mmap-able).
    pub fn map(&self, index: u32, len: usize) -> Result<Mapping> {
        let r = self.region(index)?;
        if r.flags & REGION_MMAP == 0 {
            bail!(
                "VFIO region {index} is not mmap-able (flags {:#x})",
                r.flags
            );
        }
        if len as u64 > r.size {
            bail!(
                "region {index} has {:#x} bytes, fewer than {len:#x}",
                r.size
            );
        }
        Mapping::new(self.dev.as_fd(), r.offset, len)
            .ctx(format_args!("mmap of VFIO region {index}"))
    }

    /// Register access to BAR `index` through the device fd.
    pub fn bar(&self, index: u32) -> VfioBar<'_> {
        VfioBar { dev: self, index }
    }
}

/// A BAR accessed with pread/pwrite on the VFIO device fd.
#[derive(Debug)]
pub struct VfioBar<'a> {
    dev: &'a VfioDevice,
    index: u32,
}

impl Regs for VfioBar<'_> {
    fn read32(&self, off: u64) -> Result<u32> {
        self.dev.read32(self.index, off)
    }

    fn write32(&self, off: u64, val: u32) -> Result<()> {
        self.dev.write32(self.index, off, val)
    }
}
