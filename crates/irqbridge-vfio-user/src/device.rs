// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seam between the vfio-user server loop and a device model.
//!
//! The server (see `server.rs`) owns the socket, framing, message validation, the DMA table and
//! the bookkeeping of one client at a time. Everything device-specific goes through
//! [`VfioUserDevice`]. Requests reach the device already validated: indexes are in range for the
//! device's [`DeviceInfo`], `start + count` fits the IRQ index's count, eventfd counts match.

use std::os::fd::{BorrowedFd, OwnedFd};

use vmm_sys_util::eventfd::EventFd;

/// A positive errno value sent back in an error reply.
pub type Errno = i32;

/// What DEVICE_GET_INFO reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*` (RESET 1, PCI 2).
    pub flags: u32,
    /// Number of regions (9 for a PCI device).
    pub num_regions: u32,
    /// Number of IRQ indexes (5 for a PCI device).
    pub num_irqs: u32,
}

/// One sparse-mmap area, relative to the start of its region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseArea {
    /// Offset of the area inside the region.
    pub offset: u64,
    /// Size of the area in bytes.
    pub size: u64,
}

/// What DEVICE_GET_REGION_INFO reports for one region.
#[derive(Debug)]
pub struct RegionInfo<'a> {
    /// `VFIO_REGION_INFO_FLAG_*` (READ 1, WRITE 2, MMAP 4); CAPS is added by the server.
    pub flags: u32,
    /// Region size in bytes (0 for an absent region).
    pub size: u64,
    /// File offset of the region inside `mmap_fd`.
    pub offset: u64,
    /// Areas the client may mmap; sent as a SPARSE_MMAP capability when not empty.
    pub sparse_areas: Vec<SparseArea>,
    /// The file to mmap, sent with the reply when `flags` has MMAP.
    pub mmap_fd: Option<BorrowedFd<'a>>,
}

/// One DEVICE_GET_REGION_IO_FDS entry: an eventfd the VMM registers as a KVM ioeventfd.
#[derive(Debug)]
pub struct IoFd<'a> {
    /// Offset of the register inside the region.
    pub offset: u64,
    /// Access size in bytes that the ioeventfd matches.
    pub size: u64,
    /// The eventfd the server polls.
    pub fd: BorrowedFd<'a>,
    /// Datamatch value, if the ioeventfd only fires on one value.
    pub datamatch: Option<u64>,
}

/// What DEVICE_GET_IRQ_INFO reports for one IRQ index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// `VFIO_IRQ_INFO_*` (EVENTFD 1, MASKABLE 2, AUTOMASKED 4, NORESIZE 8).
    pub flags: u32,
    /// Number of interrupts (sub-indexes) for this index; 0 if absent.
    pub count: u32,
}

/// The action of a DEVICE_SET_IRQS request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqAction {
    /// `VFIO_IRQ_SET_ACTION_MASK`.
    Mask,
    /// `VFIO_IRQ_SET_ACTION_UNMASK`.
    Unmask,
    /// `VFIO_IRQ_SET_ACTION_TRIGGER`.
    Trigger,
}

/// The data of a DEVICE_SET_IRQS request.
#[derive(Debug)]
pub enum IrqData {
    /// `DATA_NONE`: act on every sub-index in `[start, start + count)`.
    None,
    /// `DATA_BOOL`: act on the sub-indexes whose flag is true (`len == count`).
    Bool(Vec<bool>),
    /// `DATA_EVENTFD`: `len == count`; `None` entries (or an empty request: no fds at all) de-assign.
    Eventfds(Vec<Option<EventFd>>),
}

/// A validated DEVICE_SET_IRQS request.
#[derive(Debug)]
pub struct SetIrqs {
    /// IRQ index (INTX 0, MSI 1, MSIX 2, ERR 3, REQ 4).
    pub index: u32,
    /// What to do.
    pub action: IrqAction,
    /// First sub-index.
    pub start: u32,
    /// Number of sub-indexes (0 only with `start == 0`).
    pub count: u32,
    /// Payload.
    pub data: IrqData,
}

/// A device served over vfio-user.
///
/// The server shares the device between two threads behind a mutex (hence `Send`): the
/// connection thread calls the request methods, the device thread
/// [`VfioUserDevice::handle_fd_event`]; never two methods at once. Errors are positive errno
/// values that the server sends back in an error reply; the server keeps serving after any of
/// them.
pub trait VfioUserDevice: Send {
    /// DEVICE_GET_INFO.
    fn device_info(&self) -> DeviceInfo;
    /// DEVICE_GET_REGION_INFO; `index < num_regions`.
    fn region_info(&self, index: u32) -> RegionInfo<'_>;
    /// DEVICE_GET_REGION_IO_FDS; `index < num_regions`. Empty if the region has none.
    fn region_io_fds(&self, index: u32) -> Vec<IoFd<'_>>;
    /// DEVICE_GET_IRQ_INFO; `index < num_irqs`.
    fn irq_info(&self, index: u32) -> IrqInfo;
    /// DEVICE_SET_IRQS, validated against [`VfioUserDevice::irq_info`].
    fn set_irqs(&mut self, req: SetIrqs) -> Result<(), Errno>;
    /// REGION_READ; `offset + data.len()` is inside the region.
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno>;
    /// REGION_WRITE (and each WRITE_MULTI entry); `offset + data.len()` is inside the region.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno>;
    /// DEVICE_RESET: back to the power-on state; eventfd bindings survive.
    fn reset(&mut self) -> Result<(), Errno>;
    /// The client went away: drop every fd it gave (trigger and unmask eventfds); keep state.
    fn client_disconnected(&mut self);
    /// Extra fds the server's device thread polls for readability on the device's behalf
    /// (unmask eventfds, doorbell ioeventfds, a control socket...), each with a token of the
    /// device's choosing. Asked again after every event and after every message except
    /// REGION_READ, REGION_WRITE and WRITE_MULTI (the hot path, which must not change the
    /// set), and after a client leaves.
    fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)>;
    /// One of [`VfioUserDevice::poll_fds`] is readable (or hung up). May come spuriously (an
    /// fd replaced while the device thread was polling it): read the fds without blocking.
    fn handle_fd_event(&mut self, token: u64);
    /// A DMA_MAP was accepted; `fd` is the mapping's file if the client sent one. The server
    /// keeps its own DMA table; a device that does not DMA can ignore this.
    fn dma_map(&mut self, _iova: u64, _size: u64, _fd: Option<&OwnedFd>) {}
    /// A DMA_UNMAP was accepted.
    fn dma_unmap(&mut self, _iova: u64, _size: u64) {}
    /// A DMA_MAP the server accepted into its table, with its flags, file offset and fd. A
    /// device that maps DMA elsewhere (passthrough: into the host IOMMU) may refuse it: the
    /// server then drops the mapping again and replies with the errno. The default calls
    /// [`VfioUserDevice::dma_map`] and accepts.
    fn try_dma_map(&mut self, map: &crate::dma::DmaMapping) -> Result<(), Errno> {
        self.dma_map(map.iova(), map.size(), map.fd());
        Ok(())
    }
}
