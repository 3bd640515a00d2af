// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The host VFIO layer: container, group and device open, region and IRQ info, region
//! pread/pwrite, `VFIO_DEVICE_SET_IRQS`, `VFIO_IOMMU_MAP_DMA` / `UNMAP_DMA` and
//! `VFIO_DEVICE_RESET`, with the `vfio-bindings` structures and the ioctls in this one module.
//!
//! The rust-vmm `vfio-ioctls` crate is not used: it cannot set one vector of an index, pass −1
//! entries or MASK (the passthrough needs all three), its region accesses and reset swallow
//! errors, and its `Drop` can panic (`/work/shared/reference/crates.md`).
//!
//! Linux 6.1 (the guest kernel of the tests) has no iommufd and no VFIO cdev, so the device is
//! opened the classic way: `/dev/vfio/vfio` → `/dev/vfio/<group>` → `GROUP_GET_DEVICE_FD`.
//!
//! [`VfioBackend`] is the seam the passthrough device runs on: [`VfioDevice`] is the real one,
//! the unit tests use a fake.

use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::{
    VFIO_API_VERSION, VFIO_BASE, VFIO_GROUP_FLAGS_VIABLE, VFIO_TYPE, VFIO_TYPE1v2_IOMMU,
    vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_irq_info, vfio_irq_set, vfio_region_info,
};

use crate::proto::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
};

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`: every VFIO ioctl is a plain `_IO` number.
const fn vfio_ioctl(nr: u32) -> libc::Ioctl {
    (((VFIO_TYPE as u32) << 8) | (VFIO_BASE + nr)) as libc::Ioctl
}

const VFIO_GET_API_VERSION: libc::Ioctl = vfio_ioctl(0);
const VFIO_CHECK_EXTENSION: libc::Ioctl = vfio_ioctl(1);
const VFIO_SET_IOMMU: libc::Ioctl = vfio_ioctl(2);
const VFIO_GROUP_GET_STATUS: libc::Ioctl = vfio_ioctl(3);
const VFIO_GROUP_SET_CONTAINER: libc::Ioctl = vfio_ioctl(4);
const VFIO_GROUP_GET_DEVICE_FD: libc::Ioctl = vfio_ioctl(6);
const VFIO_DEVICE_GET_INFO: libc::Ioctl = vfio_ioctl(7);
const VFIO_DEVICE_GET_REGION_INFO: libc::Ioctl = vfio_ioctl(8);
const VFIO_DEVICE_GET_IRQ_INFO: libc::Ioctl = vfio_ioctl(9);
const VFIO_DEVICE_SET_IRQS: libc::Ioctl = vfio_ioctl(10);
const VFIO_DEVICE_RESET: libc::Ioctl = vfio_ioctl(11);
const VFIO_IOMMU_MAP_DMA: libc::Ioctl = vfio_ioctl(13);
const VFIO_IOMMU_UNMAP_DMA: libc::Ioctl = vfio_ioctl(14);

/// `VFIO_DMA_MAP_FLAG_READ` / `_WRITE` (the same bits as vfio-user's DMA_MAP flags).
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
/// See [`VFIO_DMA_MAP_FLAG_READ`].
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 2;

/// Errors opening a host device for passthrough. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The `--device` argument is not a PCI address.
    #[error("{0:?} is not a PCI address (expected DDDD:BB:SS.F, e.g. 0000:00:04.0).")]
    BadAddress(String),
    /// No such PCI device.
    #[error("There is no PCI device {bdf} ({path} does not exist).")]
    NoSuchDevice {
        /// The device.
        bdf: String,
        /// The sysfs path looked at.
        path: String,
    },
    /// The device is not bound to vfio-pci.
    #[error(
        "PCI device {bdf} is {}, not bound to vfio-pci (bind it: echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; echo {bdf} > /sys/bus/pci/drivers_probe).",
        driver_text(.driver)
    )]
    NotVfioPci {
        /// The device.
        bdf: String,
        /// The driver it is bound to, if any.
        driver: Option<String>,
    },
    /// The device has no IOMMU group (no IOMMU, or it is off).
    #[error("PCI device {bdf} has no IOMMU group (is the IOMMU on? intel_iommu=on).")]
    NoIommuGroup {
        /// The device.
        bdf: String,
    },
    /// A VFIO node could not be opened.
    #[error("Cannot open {path}{}.", hint_for_open(.source))]
    Open {
        /// The node.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The container speaks another VFIO API.
    #[error("/dev/vfio/vfio reports VFIO API version {0}, expected 0.")]
    ApiVersion(i32),
    /// The kernel lacks the type1v2 IOMMU backend.
    #[error("The kernel's VFIO has no type1v2 IOMMU (load vfio_iommu_type1).")]
    NoType1v2,
    /// Another member of the device's IOMMU group is bound to a host driver.
    #[error(
        "IOMMU group {group} is not viable: another device of the group is bound to a host driver (bind every device of /sys/kernel/iommu_groups/{group}/devices to vfio-pci or unbind it)."
    )]
    GroupNotViable {
        /// The group number.
        group: u32,
    },
    /// A VFIO ioctl failed while setting up.
    #[error("{what} failed{}.", hint_for_ioctl(.what, .source))]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The device is not a PCI device.
    #[error("VFIO device {0} is not a PCI device.")]
    NotPci(String),
}

fn driver_text(d: &Option<String>) -> String {
    match d {
        Some(d) => format!("bound to {d}"),
        None => "bound to no driver".to_string(),
    }
}

fn hint_for_open(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) => " (is the vfio / vfio-pci module loaded?)",
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (permission denied: run as root or give this user the group node)"
        }
        Some(libc::EBUSY) => " (the group is already open, in this or another process)",
        _ => "",
    }
}

fn hint_for_ioctl(what: &str, e: &io::Error) -> &'static str {
    match (what, e.raw_os_error()) {
        ("VFIO_SET_IOMMU", Some(libc::EPERM)) => {
            " (no interrupt remapping: enable it, e.g. intel-iommu,intremap=on, or vfio_iommu_type1 allow_unsafe_interrupts=1)"
        }
        ("VFIO_GROUP_SET_CONTAINER", Some(libc::EPERM)) => " (the group is not viable)",
        ("VFIO_GROUP_GET_DEVICE_FD", Some(libc::ENODEV)) => {
            " (the device is not in the group or not bound to vfio-pci)"
        }
        _ => "",
    }
}

/// A PCI address `DDDD:BB:SS.F` in its canonical lowercase form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bdf(String);

impl Bdf {
    /// Parses `DDDD:BB:SS.F` (or `BB:SS.F`, domain 0).
    ///
    /// # Errors
    /// [`OpenError::BadAddress`] for anything else.
    pub fn parse(s: &str) -> Result<Bdf, OpenError> {
        let bad = || OpenError::BadAddress(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [d, b, df] => (*d, *b, *df),
            [b, df] => ("0000", *b, *df),
            _ => return Err(bad()),
        };
        let (slot, func) = devfn.split_once('.').ok_or_else(bad)?;
        let hex = |t: &str, max_len: usize, max: u32| -> Result<u32, OpenError> {
            if t.is_empty() || t.len() > max_len || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(t, 16)
                .ok()
                .filter(|v| *v <= max)
                .ok_or_else(bad)
        };
        let d = hex(domain, 4, 0xffff)?;
        let b = hex(bus, 2, 0xff)?;
        let sl = hex(slot, 2, 0x1f)?;
        let f = hex(func, 1, 7)?;
        Ok(Bdf(format!("{d:04x}:{b:02x}:{sl:02x}.{f:x}")))
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where [`VfioDevice::open`] looks (overridable for tests).
#[derive(Clone, Debug)]
pub struct HostPaths {
    /// `/sys/bus/pci/devices`.
    pub sysfs_devices: PathBuf,
    /// `/dev/vfio`.
    pub dev_vfio: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            sysfs_devices: PathBuf::from("/sys/bus/pci/devices"),
            dev_vfio: PathBuf::from("/dev/vfio"),
        }
    }
}

/// One region of the host device, as `VFIO_DEVICE_GET_REGION_INFO` reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostRegion {
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0: absent).
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
}

/// One IRQ index of the host device, as `VFIO_DEVICE_GET_IRQ_INFO` reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostIrq {
    /// `VFIO_IRQ_INFO_*`.
    pub flags: u32,
    /// Number of vectors (0: absent).
    pub count: u32,
}

/// One `VFIO_DEVICE_SET_IRQS` request: one action with DATA_NONE, or with DATA_EVENTFD and one
/// fd per sub-index (−1 de-assigns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqSet<'a> {
    /// IRQ index.
    pub index: u32,
    /// `VFIO_IRQ_SET_DATA_*` | `VFIO_IRQ_SET_ACTION_*`.
    pub flags: u32,
    /// First sub-index.
    pub start: u32,
    /// Number of sub-indexes.
    pub count: u32,
    /// With DATA_EVENTFD, `count` fds; empty otherwise.
    pub fds: &'a [RawFd],
}

impl<'a> IrqSet<'a> {
    /// `action` with DATA_EVENTFD: `fds` for the sub-indexes from `start`.
    pub fn eventfds(index: u32, action: u32, start: u32, fds: &'a [RawFd]) -> Self {
        IrqSet {
            index,
            flags: VFIO_IRQ_SET_DATA_EVENTFD | action,
            start,
            count: fds.len() as u32,
            fds,
        }
    }

    /// `action` with DATA_NONE on `count` sub-indexes from `start`.
    pub fn none(index: u32, action: u32, start: u32, count: u32) -> Self {
        IrqSet {
            index,
            flags: VFIO_IRQ_SET_DATA_NONE | action,
            start,
            count,
            fds: &[],
        }
    }

    /// TRIGGER with DATA_NONE and count 0: the index off, its eventfds released.
    pub fn disable(index: u32) -> Self {
        Self::none(index, VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)
    }
}

/// What the passthrough device needs from a VFIO device. Implemented by [`VfioDevice`] and by
/// the fakes of the unit tests. Errors are the kernel's.
pub trait VfioBackend: Send + fmt::Debug {
    /// `VFIO_DEVICE_FLAGS_*` of the device.
    fn device_flags(&self) -> u32;
    /// Region `index` (None: no such region).
    fn region(&self, index: u32) -> Option<HostRegion>;
    /// IRQ index `index` (None: no such index).
    fn irq(&self, index: u32) -> Option<HostIrq>;
    /// pread of `data.len()` bytes at `offset` inside region `index`.
    fn read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;
    /// pwrite of `data` at `offset` inside region `index`.
    fn write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;
    /// `VFIO_DEVICE_SET_IRQS`.
    fn set_irqs(&self, set: &IrqSet<'_>) -> io::Result<()>;
    /// `VFIO_IOMMU_MAP_DMA` of `size` bytes at process address `vaddr` to `iova`.
    fn dma_map(&self, vaddr: u64, iova: u64, size: u64, flags: u32) -> io::Result<()>;
    /// `VFIO_IOMMU_UNMAP_DMA` of exactly one earlier mapping.
    fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()>;
    /// `VFIO_DEVICE_RESET`.
    fn reset(&self) -> io::Result<()>;
    /// The device fd, for clients that mmap BARs (None: mmap not offered).
    fn mmap_fd(&self) -> Option<BorrowedFd<'_>>;
}

/// An open VFIO PCI device: its container, group and device fds and the region and IRQ
/// info read at open.
#[derive(Debug)]
pub struct VfioDevice {
    bdf: Bdf,
    group: u32,
    // Field order is drop order: the device fd first, then the group, then the container
    // (closing the container's last group unmaps and unpins everything).
    device: File,
    _group_file: File,
    _container: File,
    flags: u32,
    regions: Vec<HostRegion>,
    irqs: Vec<HostIrq>,
}

fn ioctl_err(what: &'static str) -> impl FnOnce(io::Error) -> OpenError {
    move |source| OpenError::Ioctl { what, source }
}

/// `ioctl(fd, req, arg)` returning the non-negative result or the errno.
///
/// # Safety
/// `arg` must be what `req` expects: a value, or a pointer to a live structure of the size and
/// layout the kernel reads and writes for `req`.
unsafe fn ioctl(fd: BorrowedFd<'_>, req: libc::Ioctl, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: forwarded from the caller.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `req` on `fd` with `arg` (argsz set), which the kernel fills in; the filled structure.
///
/// # Safety
/// `req` must be an ioctl that reads and writes exactly a `T`.
unsafe fn filled<T>(fd: BorrowedFd<'_>, req: libc::Ioctl, mut arg: T) -> io::Result<T> {
    // SAFETY: `arg` is a live T, which is what `req` reads and writes (the caller's promise).
    unsafe { ioctl(fd, req, &mut arg as *mut T as libc::c_ulong) }?;
    Ok(arg)
}

/// The per-index infos of the device fd for indexes `0..count`: `arg(index)` is the
/// structure to fill (argsz and index set), `keep` what is kept of a filled one. vfio-pci
/// answers EINVAL for an index the device lacks (ERR without PCIe, an absent BAR): that one
/// is `H::default()`.
///
/// # Safety
/// `req` must be an ioctl that reads and writes exactly a `T`.
unsafe fn index_infos<T, H: Default>(
    device: &File,
    req: libc::Ioctl,
    what: &'static str,
    count: u32,
    arg: impl Fn(u32) -> T,
    keep: impl Fn(&T) -> H,
) -> Result<Vec<H>, OpenError> {
    (0..count)
        .map(|index| {
            // SAFETY: `req` reads and writes exactly a `T` (the caller's promise).
            match unsafe { filled(device.as_fd(), req, arg(index)) } {
                Ok(a) => Ok(keep(&a)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(H::default()),
                Err(e) => Err(ioctl_err(what)(e)),
            }
        })
        .collect()
}

/// [`index_infos`] for a VFIO info structure `$ty` with `argsz` and `index` fields, filled by
/// `$req`.
macro_rules! infos {
    ($device:expr, $req:ident, $ty:ident, $count:expr, |$r:ident| $keep:expr) => {
        // SAFETY: `$req` reads and writes exactly a `$ty` (the uapi pairs them).
        unsafe {
            index_infos(
                &$device,
                $req,
                stringify!($req),
                $count,
                |index| $ty {
                    argsz: std::mem::size_of::<$ty>() as u32,
                    index,
                    ..Default::default()
                },
                |$r: &$ty| $keep,
            )
        }
    };
}

fn open_rw(path: &Path) -> Result<File, OpenError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| OpenError::Open {
            path: path.display().to_string(),
            source,
        })
}

impl VfioDevice {
    /// Opens `bdf` through VFIO: checks sysfs (exists, bound to vfio-pci, has an IOMMU group),
    /// opens the container and the group, checks the group is viable, attaches it with the
    /// type1v2 IOMMU, gets the device fd and reads its region and IRQ info.
    ///
    /// # Errors
    /// An [`OpenError`] that says which step failed and what to do about it.
    pub fn open(bdf: &Bdf, paths: &HostPaths) -> Result<VfioDevice, OpenError> {
        let sys = paths.sysfs_devices.join(bdf.as_str());
        if !sys.exists() {
            return Err(OpenError::NoSuchDevice {
                bdf: bdf.to_string(),
                path: sys.display().to_string(),
            });
        }
        let driver = std::fs::read_link(sys.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            return Err(OpenError::NotVfioPci {
                bdf: bdf.to_string(),
                driver,
            });
        }
        let group: u32 = std::fs::read_link(sys.join("iommu_group"))
            .ok()
            .and_then(|p| p.file_name().and_then(|n| n.to_str()?.parse().ok()))
            .ok_or_else(|| OpenError::NoIommuGroup {
                bdf: bdf.to_string(),
            })?;

        let container = open_rw(&paths.dev_vfio.join("vfio"))?;
        // SAFETY: GET_API_VERSION takes no argument.
        let v = unsafe { ioctl(container.as_fd(), VFIO_GET_API_VERSION, 0) }
            .map_err(ioctl_err("VFIO_GET_API_VERSION"))?;
        if v != VFIO_API_VERSION as i32 {
            return Err(OpenError::ApiVersion(v));
        }
        // SAFETY: CHECK_EXTENSION takes the extension number by value.
        let ext = unsafe {
            ioctl(
                container.as_fd(),
                VFIO_CHECK_EXTENSION,
                libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
            )
        }
        .map_err(ioctl_err("VFIO_CHECK_EXTENSION"))?;
        if ext != 1 {
            return Err(OpenError::NoType1v2);
        }

        let group_file = open_rw(&paths.dev_vfio.join(group.to_string()))?;
        let status = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: GET_STATUS fills the flags of a vfio_group_status.
        let status = unsafe { filled(group_file.as_fd(), VFIO_GROUP_GET_STATUS, status) }
            .map_err(ioctl_err("VFIO_GROUP_GET_STATUS"))?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(OpenError::GroupNotViable { group });
        }
        let cfd: i32 = container.as_raw_fd();
        // SAFETY: SET_CONTAINER reads one int (the container fd) from the pointer.
        unsafe {
            ioctl(
                group_file.as_fd(),
                VFIO_GROUP_SET_CONTAINER,
                &cfd as *const i32 as libc::c_ulong,
            )
        }
        .map_err(ioctl_err("VFIO_GROUP_SET_CONTAINER"))?;
        // SAFETY: SET_IOMMU takes the IOMMU type by value.
        unsafe {
            ioctl(
                container.as_fd(),
                VFIO_SET_IOMMU,
                libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
            )
        }
        .map_err(ioctl_err("VFIO_SET_IOMMU"))?;
        let name =
            CString::new(bdf.as_str()).map_err(|_| OpenError::BadAddress(bdf.to_string()))?;
        // SAFETY: GET_DEVICE_FD reads a NUL-terminated string; `name` outlives the call.
        let dfd = unsafe {
            ioctl(
                group_file.as_fd(),
                VFIO_GROUP_GET_DEVICE_FD,
                name.as_ptr() as libc::c_ulong,
            )
        }
        .map_err(ioctl_err("VFIO_GROUP_GET_DEVICE_FD"))?;
        // SAFETY: the ioctl returned a new descriptor that nothing else owns.
        let device = unsafe { File::from_raw_fd(dfd) };

        let info = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: GET_INFO fills a vfio_device_info.
        let info = unsafe { filled(device.as_fd(), VFIO_DEVICE_GET_INFO, info) }
            .map_err(ioctl_err("VFIO_DEVICE_GET_INFO"))?;
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(OpenError::NotPci(bdf.to_string()));
        }
        // With argsz 32 the kernel writes no region capability data past the structure.
        let regions = infos!(
            device,
            VFIO_DEVICE_GET_REGION_INFO,
            vfio_region_info,
            info.num_regions.min(VFIO_PCI_NUM_REGIONS),
            |r| HostRegion {
                flags: r.flags,
                size: r.size,
                offset: r.offset,
            }
        )?;
        let irqs = infos!(
            device,
            VFIO_DEVICE_GET_IRQ_INFO,
            vfio_irq_info,
            info.num_irqs.min(VFIO_PCI_NUM_IRQS),
            |q| HostIrq {
                flags: q.flags,
                count: q.count,
            }
        )?;
        Ok(VfioDevice {
            bdf: bdf.clone(),
            group,
            device,
            _group_file: group_file,
            _container: container,
            flags: info.flags,
            regions,
            irqs,
        })
    }

    /// The device's address.
    pub fn bdf(&self) -> &Bdf {
        &self.bdf
    }

    /// The device's IOMMU group.
    pub fn group(&self) -> u32 {
        self.group
    }

    fn region_at(&self, index: u32, offset: u64, len: usize) -> io::Result<u64> {
        let r = self
            .regions
            .get(index as usize)
            .filter(|r| r.size > 0)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        match offset.checked_add(len as u64) {
            Some(end) if end <= r.size => r
                .offset
                .checked_add(offset)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

impl VfioBackend for VfioDevice {
    fn device_flags(&self) -> u32 {
        self.flags
    }

    fn region(&self, index: u32) -> Option<HostRegion> {
        self.regions.get(index as usize).copied()
    }

    fn irq(&self, index: u32) -> Option<HostIrq> {
        self.irqs.get(index as usize).copied()
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let at = self.region_at(index, offset, data.len())?;
        self.device.read_exact_at(data, at)
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let at = self.region_at(index, offset, data.len())?;
        self.device.write_all_at(data, at)
    }

    fn set_irqs(&self, set: &IrqSet<'_>) -> io::Result<()> {
        let fds = set.fds;
        let data_len = if set.flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 {
            if fds.len() != set.count as usize {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            std::mem::size_of_val(fds)
        } else {
            0
        };
        let head = std::mem::size_of::<vfio_irq_set>();
        // A vector of headers gives a buffer aligned for vfio_irq_set, long enough for the
        // header and the fd array behind it.
        let n = (head + data_len).div_ceil(head);
        let mut buf: Vec<vfio_irq_set> = Vec::with_capacity(n);
        buf.resize_with(n, Default::default);
        let argsz = u32::try_from(head + data_len)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        if let Some(h) = buf.first_mut() {
            (h.argsz, h.flags, h.index) = (argsz, set.flags, set.index);
            (h.start, h.count) = (set.start, set.count);
        }
        // SAFETY: the buffer holds `n * head >= head + data_len` bytes; the fd array is
        // written right after the header, inside it, as unaligned i32s.
        unsafe {
            let base = buf.as_mut_ptr().cast::<u8>().add(head);
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(base.add(i * 4).cast::<i32>(), *fd);
            }
        }
        // SAFETY: `buf` holds a vfio_irq_set with argsz covering the fd array that follows.
        unsafe {
            ioctl(
                self.device.as_fd(),
                VFIO_DEVICE_SET_IRQS,
                buf.as_mut_ptr() as libc::c_ulong,
            )
        }
        .map(|_| ())
    }

    fn dma_map(&self, vaddr: u64, iova: u64, size: u64, flags: u32) -> io::Result<()> {
        let m = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags,
            vaddr,
            iova,
            size,
        };
        // SAFETY: `m` is a live vfio_iommu_type1_dma_map; the caller keeps `vaddr..+size`
        // mapped until the matching unmap.
        unsafe {
            ioctl(
                self._container.as_fd(),
                VFIO_IOMMU_MAP_DMA,
                &m as *const _ as libc::c_ulong,
            )
        }
        .map(|_| ())
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        let mut u = vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size,
            ..Default::default()
        };
        // SAFETY: `u` is a live vfio_iommu_type1_dma_unmap without a bitmap; the kernel
        // writes back the unmapped size.
        unsafe {
            ioctl(
                self._container.as_fd(),
                VFIO_IOMMU_UNMAP_DMA,
                &mut u as *mut _ as libc::c_ulong,
            )
        }?;
        if u.size != size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    fn reset(&self) -> io::Result<()> {
        // SAFETY: DEVICE_RESET takes no argument.
        unsafe { ioctl(self.device.as_fd(), VFIO_DEVICE_RESET, 0) }.map(|_| ())
    }

    fn mmap_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.device.as_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        // _IO(';', 100 + n): ';' is 0x3b.
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
    }

    #[test]
    fn bdf_parsing() {
        assert_eq!(Bdf::parse("0000:00:04.0").unwrap().as_str(), "0000:00:04.0");
        assert_eq!(Bdf::parse("00:1F.7").unwrap().as_str(), "0000:00:1f.7");
        assert_eq!(Bdf::parse("abcd:ff:1f.7").unwrap().as_str(), "abcd:ff:1f.7");
        for bad in [
            "",
            "0000:00:20.0",
            "0000:00:04.8",
            "0000:00:04",
            "00000:00:04.0",
            "0000:000:04.0",
            "x:00:04.0",
            "0000:00:04.0:1",
            "0000:00:+4.0",
            "../../etc",
        ] {
            assert!(
                matches!(Bdf::parse(bad), Err(OpenError::BadAddress(_))),
                "{bad:?} accepted"
            );
        }
    }

    fn fake_sysfs(name: &str) -> (PathBuf, HostPaths) {
        let root = std::env::temp_dir().join(format!("irqbridge-pt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("devices")).unwrap();
        std::fs::create_dir_all(root.join("dev-vfio")).unwrap();
        let paths = HostPaths {
            sysfs_devices: root.join("devices"),
            dev_vfio: root.join("dev-vfio"),
        };
        (root, paths)
    }

    #[test]
    fn open_errors_name_the_problem() {
        let (root, paths) = fake_sysfs("open");
        let bdf = Bdf::parse("0000:00:04.0").unwrap();
        let e = VfioDevice::open(&bdf, &paths).unwrap_err();
        assert!(matches!(e, OpenError::NoSuchDevice { .. }), "{e}");

        let dev = paths.sysfs_devices.join("0000:00:04.0");
        std::fs::create_dir_all(&dev).unwrap();
        let e = VfioDevice::open(&bdf, &paths).unwrap_err();
        assert!(
            matches!(e, OpenError::NotVfioPci { driver: None, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("bound to no driver"), "{e}");

        std::os::unix::fs::symlink("../../drivers/virtio-pci", dev.join("driver")).unwrap();
        let e = VfioDevice::open(&bdf, &paths).unwrap_err();
        assert!(e.to_string().contains("bound to virtio-pci"), "{e}");

        std::fs::remove_file(dev.join("driver")).unwrap();
        std::os::unix::fs::symlink("../../drivers/vfio-pci", dev.join("driver")).unwrap();
        let e = VfioDevice::open(&bdf, &paths).unwrap_err();
        assert!(matches!(e, OpenError::NoIommuGroup { .. }), "{e}");

        std::os::unix::fs::symlink("../../kernel/iommu_groups/7", dev.join("iommu_group")).unwrap();
        let e = VfioDevice::open(&bdf, &paths).unwrap_err();
        match &e {
            OpenError::Open { path, source } => {
                assert!(path.ends_with("dev-vfio/vfio"), "{path}");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("unexpected {other}"),
        }
        assert!(e.to_string().contains("module loaded"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// On the real host: a nonexistent BDF, and an existing device that is not bound to
    /// vfio-pci (if the host has PCI devices).
    #[test]
    fn open_errors_on_this_host() {
        let paths = HostPaths::default();
        let bdf = Bdf::parse("ffff:ff:1f.7").unwrap();
        let e = VfioDevice::open(&bdf, &paths).unwrap_err();
        assert!(matches!(e, OpenError::NoSuchDevice { .. }), "{e}");
        let Ok(dir) = std::fs::read_dir(&paths.sysfs_devices) else {
            println!("SKIPPED: no /sys/bus/pci/devices");
            return;
        };
        let mut tried = 0;
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let driver = std::fs::read_link(entry.path().join("driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            if driver.as_deref() == Some("vfio-pci") {
                continue;
            }
            let bdf = Bdf::parse(&name).unwrap();
            let e = VfioDevice::open(&bdf, &paths).unwrap_err();
            assert!(
                matches!(&e, OpenError::NotVfioPci { driver: d, .. } if *d == driver),
                "{e}"
            );
            tried += 1;
        }
        if tried == 0 {
            println!("SKIPPED: no PCI device outside vfio-pci on this host");
        }
    }
}
