// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Attaching a vhost-user device to a KVM VM: [`VhostUserAttachment`].
//!
//! The VMM is the vhost-user *frontend*: it owns guest RAM and the virtqueue layout, and hands
//! the backend (another process, or a thread) everything it needs to run the queues without
//! the VMM: the RAM's file descriptors, the rings' addresses, one kick eventfd and one call
//! eventfd per queue. The two eventfds are also wired into KVM:
//!
//! | per queue | eventfd | KVM side |
//! |---|---|---|
//! | guest → backend (notify) | kick, `SET_VRING_KICK` | `KVM_IOEVENTFD` at the queue's notify address: a guest write signals it in the kernel, with no exit to the VMM |
//! | backend → guest (used buffers) | call, `SET_VRING_CALL` | `KVM_IRQFD` on a GSI with an MSI route (the queue's MSI-X vector): a backend write interrupts the guest in the kernel |
//!
//! # Attach, in order
//!
//! [`VhostUserAttachment::attach`]:
//!
//! 1. **connect**: the socket file is waited for until the deadline (vhost's
//!    `Frontend::connect` retries only on `ECONNREFUSED`, so a backend that has not bound its
//!    socket yet, `ENOENT`, would fail at once); the socket gets read and write timeouts, so no
//!    request blocks longer than [`VhostAttachConfig::timeout`];
//! 2. `SET_OWNER`;
//! 3. `GET_FEATURES`, then `SET_FEATURES` with the offered features the VMM asked for
//!    ([`VhostAttachConfig::features`]), plus `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30)
//!    whenever it is offered; a missing [`VhostAttachConfig::required_features`] bit fails the
//!    attach;
//! 4. with bit 30: `GET_PROTOCOL_FEATURES` / `SET_PROTOCOL_FEATURES` (offered ∩ asked; this
//!    frontend implements [`SUPPORTED_PROTOCOL_FEATURES`]). With `REPLY_ACK` every later
//!    request carries `NEED_REPLY`, so each step below is *done* in the backend before the
//!    next one starts, and attach returns only once every ring is running. With `MQ`,
//!    `GET_QUEUE_NUM` bounds the queue indices;
//! 5. `SET_MEM_TABLE` with every guest RAM region: GPA, size, file descriptor and offset, and
//!    the VMM's own virtual address of the region. It must precede `SET_VRING_ADDR`: the
//!    backend translates ring addresses through this table;
//! 6. MSI routes for every queue with a vector: a GSI allocated from the VM's
//!    [`GsiRouter`](crate::GsiRouter), its MSI route staged, **the table committed, then the
//!    irqfd assigned** (an irqfd must never fire into a GSI without its route);
//! 7. per queue, in list order: `SET_VRING_NUM`; `SET_VRING_ADDR` with the rings' GPAs
//!    translated into the **VMM's virtual addresses** (vhost-user's `SET_VRING_ADDR` carries
//!    frontend addresses, not GPAs); `SET_VRING_BASE`; `SET_VRING_CALL` with the irqfd's
//!    eventfd (its route and irqfd are in place, so the first signal already reaches the
//!    guest); then **`KVM_IOEVENTFD` assigned before `SET_VRING_KICK`**: the kick fd starts
//!    the ring, and from then on a guest notify write must land in the eventfd rather than
//!    exit to a VMM that no longer expects it. A kick written before the backend polls the fd
//!    stays in the counter and is seen when it does;
//! 8. with bit 30, `SET_VRING_ENABLE(1)` for every queue in **reverse** list order, so the
//!    first listed queue (typically the one that makes the device do work, e.g. a control
//!    queue) is enabled last, when every queue it may complete into is running. Without bit
//!    30, `SET_FEATURES` already enabled every ring.
//!
//! # Detach, in reverse
//!
//! [`VhostUserAttachment::detach`]: `SET_VRING_ENABLE(0)` for every started queue (with bit
//! 30); `GET_VRING_BASE` for each (stops the ring; the backend drops its kick and call fds and
//! reports the next avail index, [`StoppedQueue::next_avail`], which a later attach passes as
//! [`QueueConfig::base`]); the ioeventfds are deassigned (guest notify writes exit to the VMM
//! again); the irqfds are deassigned **before** their routes are removed and their GSIs freed,
//! in one commit; the socket is closed. If the connection is already broken, the messages are
//! skipped and only the KVM side is undone. Dropping an attachment without `detach` does the
//! same as a broken connection.
//!
//! # MSI-X masking
//!
//! The call eventfds belong to an [`MsiInterruptGroup`], one vector per queue with
//! [`QueueConfig::msi`]. A VMM emulating the MSI-X table masks a queue's vector with
//! [`VhostUserAttachment::set_queue_masked`] (irqfd deassigned, events held as pending and
//! delivered once on unmask) and follows guest reprogramming with
//! [`VhostUserAttachment::set_queue_msi`]; the backend keeps its call fd throughout, as with
//! QEMU's generic vhost-user device.
//!
//! # Config space
//!
//! With the `CONFIG` protocol feature, [`VhostUserAttachment::config_read`] and
//! [`VhostUserAttachment::config_write`] pass device config-space accesses through as
//! `GET_CONFIG` / `SET_CONFIG`.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, VmFd};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::interrupt::{
    InterruptSourceConfig, InterruptSourceGroup, MsiInterruptGroup, MsiIrqSourceConfig,
};
use crate::routing::SharedGsiRouter;

/// Default time limit of the connect wait and of every vhost-user request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Virtio feature bit 32, `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// `VHOST_USER_F_PROTOCOL_FEATURES`, virtio feature bit 30.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Protocol features this frontend implements: `MQ` (queue count), `REPLY_ACK` (every request
/// acknowledged) and `CONFIG` (config-space passthrough). Features that need a backend
/// channel, in-band notifications or memory-slot messages are not implemented.
pub const SUPPORTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG);

/// Largest split virtqueue (virtio 1.2 §2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Largest vring index: kick and call messages carry it in 8 bits.
pub const MAX_QUEUE_INDEX: u16 = 0xff;

/// Most bytes one config-space access may move (QEMU's limit).
pub const MAX_CONFIG_ACCESS: usize = 256;

/// How often the connect loop retries while the socket is missing or refuses.
const CONNECT_RETRY: Duration = Duration::from_millis(10);

/// Errors of [`VhostUserAttachment`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend's socket could not be connected to before the deadline.
    #[error("could not connect to the vhost-user backend at {path} within {timeout:?}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// How long the frontend kept trying.
        timeout: Duration,
        /// The last connect error.
        #[source]
        source: io::Error,
    },
    /// The socket's timeouts could not be set.
    #[error("cannot configure the vhost-user socket")]
    Socket(#[source] io::Error),
    /// A vhost-user request failed (refused, timed out, or the connection failed).
    #[error("vhost-user request {request} failed")]
    Vhost {
        /// The request.
        request: &'static str,
        /// vhost's error.
        #[source]
        source: vhost::Error,
    },
    /// An earlier transport failure left the connection out of step; attach again.
    #[error("the vhost-user connection is broken by an earlier failure ({request} not sent)")]
    ConnectionBroken {
        /// The request that was not sent.
        request: &'static str,
    },
    /// The backend does not offer a required virtio feature.
    #[error("the backend lacks required virtio features {missing:#x} (it offers {offered:#x})")]
    MissingFeatures {
        /// Required bits that are not offered.
        missing: u64,
        /// Everything the backend offers.
        offered: u64,
    },
    /// The configuration asks for protocol features this frontend does not implement.
    #[error("protocol features {0:#x} are not implemented by this frontend")]
    UnsupportedProtocolFeatures(u64),
    /// A queue index is beyond the backend's queue count.
    #[error("queue {index} does not exist: the backend has {available} queues")]
    NoSuchQueue {
        /// The queue index.
        index: u16,
        /// The backend's queue count.
        available: u64,
    },
    /// A queue configuration is not acceptable.
    #[error("queue {index} is misconfigured: {reason}")]
    InvalidQueue {
        /// The queue index.
        index: u16,
        /// What is wrong.
        reason: String,
    },
    /// A guest RAM region is not acceptable.
    #[error("guest RAM region is misconfigured: {0}")]
    InvalidRam(String),
    /// A guest range is not inside one guest RAM region.
    #[error("guest range {gpa:#x}+{len:#x} is not inside one guest RAM region")]
    NotInRam {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
    /// The operation needs something the backend did not negotiate.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An argument of a call is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A KVM ioctl or the GSI router failed.
    #[error("the KVM wiring failed")]
    Kvm(#[from] crate::Error),
    /// Creating, duplicating or writing an eventfd failed.
    #[error("eventfd operation failed")]
    EventFd(#[source] io::Error),
}

impl From<Error> for io::Error {
    /// For callers whose error types wrap `std::io::Error`.
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Connect { .. } => io::ErrorKind::NotConnected,
            Error::ConnectionBroken { .. } => io::ErrorKind::ConnectionReset,
            Error::InvalidQueue { .. }
            | Error::InvalidRam(_)
            | Error::NotInRam { .. }
            | Error::InvalidArgument(_)
            | Error::NoSuchQueue { .. } => io::ErrorKind::InvalidInput,
            Error::Unsupported(_)
            | Error::UnsupportedProtocolFeatures(_)
            | Error::MissingFeatures { .. } => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A guest RAM region the backend maps, shared through its file.
#[derive(Clone, Copy, Debug)]
pub struct GuestRam<'a> {
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The file backing the region (a memfd or hugetlbfs file the VMM maps `MAP_SHARED`).
    pub fd: BorrowedFd<'a>,
    /// Offset of the region in `fd`.
    pub file_offset: u64,
    /// Where the VMM (this process) maps the region: vhost-user ring addresses are expressed
    /// in this address space.
    pub host_addr: u64,
}

/// Datamatch of a kick ioeventfd: only guest writes of exactly this size and value signal it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datamatch {
    /// A 1-byte write of this value.
    U8(u8),
    /// A 2-byte write of this value (virtio-pci writes the queue index as 16 bits).
    U16(u16),
    /// A 4-byte write of this value.
    U32(u32),
    /// An 8-byte write of this value.
    U64(u64),
}

/// Where the guest notifies a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KickConfig {
    /// Guest physical address of the notify register (an MMIO address not backed by RAM).
    pub mmio_gpa: u64,
    /// Match only writes of this size and value; `None`: any write there kicks.
    pub datamatch: Option<Datamatch>,
}

/// An MSI message (x86: address `0xFEE00000 | dest << 12`, data = vector | delivery mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msi {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

impl Msi {
    fn source_config(self) -> MsiIrqSourceConfig {
        MsiIrqSourceConfig {
            high_addr: (self.address >> 32) as u32,
            low_addr: self.address as u32,
            data: self.data,
            devid: 0,
        }
    }
}

/// One split virtqueue the VMM (or its guest's driver) laid out in guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// vring index (0..=255).
    pub index: u16,
    /// Number of entries, a power of two (1..=32768).
    pub size: u16,
    /// GPA of the descriptor table (16-byte aligned, `16 * size` bytes).
    pub desc_gpa: u64,
    /// GPA of the avail ring (2-byte aligned, `6 + 2 * size` bytes).
    pub avail_gpa: u64,
    /// GPA of the used ring (4-byte aligned, `6 + 8 * size` bytes).
    pub used_gpa: u64,
    /// First avail index the backend processes (`SET_VRING_BASE`): 0 for a fresh queue, or
    /// [`StoppedQueue::next_avail`] to resume.
    pub base: u16,
    /// Notify register wired as an ioeventfd; `None`: the VMM kicks with
    /// [`VhostUserAttachment::kick`] (e.g. from a trapped notify write).
    pub kick: Option<KickConfig>,
    /// MSI message of the queue's vector; `None`: the call eventfd is not an irqfd and the VMM
    /// polls it ([`VhostUserAttachment::call_notifier`]).
    pub msi: Option<Msi>,
}

/// What [`VhostUserAttachment::attach`] sets up.
#[derive(Clone, Debug)]
pub struct VhostAttachConfig<'a> {
    /// Guest RAM, all of it shared with the backend (`SET_MEM_TABLE`).
    pub guest_ram: Vec<GuestRam<'a>>,
    /// The queues to start.
    pub queues: Vec<QueueConfig>,
    /// Virtio features the VMM's guest driver accepts; the offered subset is acked (bit 30 is
    /// added whenever offered). Default: `VIRTIO_F_VERSION_1` only (no `EVENT_IDX`).
    pub features: u64,
    /// Virtio features the backend must offer. Default: `VIRTIO_F_VERSION_1`.
    pub required_features: u64,
    /// Protocol features to ack if offered (a subset of [`SUPPORTED_PROTOCOL_FEATURES`], which
    /// is the default).
    pub protocol_features: VhostUserProtocolFeatures,
    /// Time limit of the connect wait and of every request.
    pub timeout: Duration,
}

impl Default for VhostAttachConfig<'_> {
    fn default() -> Self {
        VhostAttachConfig {
            guest_ram: Vec::new(),
            queues: Vec::new(),
            features: VIRTIO_F_VERSION_1,
            required_features: VIRTIO_F_VERSION_1,
            protocol_features: SUPPORTED_PROTOCOL_FEATURES,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A queue as [`VhostUserAttachment::detach`] left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoppedQueue {
    /// vring index.
    pub index: u16,
    /// `GET_VRING_BASE`: the next avail index the backend would have processed.
    pub next_avail: u16,
}

/// Public view of one attached queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    /// The configuration it was attached with.
    pub config: QueueConfig,
    /// GSI of its MSI route (when [`QueueConfig::msi`] was given).
    pub gsi: Option<u32>,
    /// Whether the kick ioeventfd is registered with KVM.
    pub ioeventfd: bool,
    /// Whether `SET_VRING_KICK` was sent (the ring runs).
    pub started: bool,
}

/// An owned copy of a [`GuestRam`] without the fd (for translations after attach).
#[derive(Clone, Copy, Debug)]
struct RamMap {
    gpa: u64,
    size: u64,
    host_addr: u64,
}

/// Host address of `gpa..gpa + len`, which must lie inside one region.
fn translate(ram: &[RamMap], gpa: u64, len: u64) -> Result<u64> {
    let end = gpa.checked_add(len).ok_or(Error::NotInRam { gpa, len })?;
    ram.iter()
        .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)
        .map(|r| r.host_addr + (gpa - r.gpa))
        .ok_or(Error::NotInRam { gpa, len })
}

/// Checks the RAM regions: non-empty, no wrap, no overlap (in GPA or host address space).
fn check_ram(ram: &[GuestRam<'_>]) -> Result<Vec<RamMap>> {
    if ram.is_empty() {
        return Err(Error::InvalidRam(
            "the backend needs at least one guest RAM region".into(),
        ));
    }
    let mut maps: Vec<RamMap> = Vec::with_capacity(ram.len());
    for r in ram {
        if r.size == 0
            || r.gpa.checked_add(r.size).is_none()
            || r.host_addr == 0
            || r.host_addr.checked_add(r.size).is_none()
            || r.file_offset.checked_add(r.size).is_none()
        {
            return Err(Error::InvalidRam(format!(
                "region at GPA {:#x} (size {:#x}, host address {:#x}) is empty or wraps",
                r.gpa, r.size, r.host_addr
            )));
        }
        let overlaps = |a: u64, alen: u64, b: u64, blen: u64| a < b + blen && b < a + alen;
        if let Some(o) = maps.iter().find(|m| {
            overlaps(m.gpa, m.size, r.gpa, r.size)
                || overlaps(m.host_addr, m.size, r.host_addr, r.size)
        }) {
            return Err(Error::InvalidRam(format!(
                "region at GPA {:#x} overlaps the region at GPA {:#x}",
                r.gpa, o.gpa
            )));
        }
        maps.push(RamMap {
            gpa: r.gpa,
            size: r.size,
            host_addr: r.host_addr,
        });
    }
    Ok(maps)
}

/// Checks one queue and computes its `SET_VRING_ADDR` payload (host addresses).
fn vring_config(ram: &[RamMap], q: &QueueConfig) -> Result<VringConfigData> {
    let bad = |reason: String| Error::InvalidQueue {
        index: q.index,
        reason,
    };
    if q.index > MAX_QUEUE_INDEX {
        return Err(bad(format!("the index is above {MAX_QUEUE_INDEX}")));
    }
    if q.size == 0 || q.size > MAX_QUEUE_SIZE || !q.size.is_power_of_two() {
        return Err(bad(format!(
            "size {} is not a power of two up to {MAX_QUEUE_SIZE}",
            q.size
        )));
    }
    let n = u64::from(q.size);
    let rings = [
        ("descriptor table", q.desc_gpa, 16, 16 * n),
        ("avail ring", q.avail_gpa, 2, 6 + 2 * n),
        ("used ring", q.used_gpa, 4, 6 + 8 * n),
    ];
    let mut host = [0u64; 3];
    for (slot, (what, gpa, align, len)) in host.iter_mut().zip(rings) {
        if gpa % align != 0 {
            return Err(bad(format!(
                "the {what} at {gpa:#x} is not {align}-byte aligned"
            )));
        }
        *slot = translate(ram, gpa, len)?;
    }
    if let Some(k) = q.kick
        && translate(ram, k.mmio_gpa, 1).is_ok()
    {
        return Err(bad(format!(
            "notify address {:#x} is guest RAM, not MMIO",
            k.mmio_gpa
        )));
    }
    let [desc, avail, used] = host;
    Ok(VringConfigData {
        queue_max_size: q.size,
        queue_size: q.size,
        flags: 0,
        desc_table_addr: desc,
        used_ring_addr: used,
        avail_ring_addr: avail,
        log_addr: None,
    })
}

/// Connects to `path`, waiting for the socket to appear and to accept, until `timeout`.
fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(source) => {
                return Err(Error::Connect {
                    path: path.to_owned(),
                    timeout,
                    source,
                });
            }
        }
    }
}

/// Whether a vhost error leaves the stream out of step (or dead).
fn is_transport_error(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as U;
    match e {
        vhost::Error::VhostUserProtocol(u) => matches!(
            u,
            U::SocketError(_)
                | U::SocketBroken(_)
                | U::SocketRetry(_)
                | U::SocketConnect(_)
                | U::PartialMessage
                | U::Disconnected
                | U::InvalidMessage
                | U::OversizedMsg
                | U::IncorrectFds
        ),
        vhost::Error::IOError(_) => true,
        _ => false,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd)
}

/// Assigns or deassigns the kick ioeventfd of a queue.
fn ioevent(vm: &VmFd, fd: &EventFd, kick: &KickConfig, assign: bool) -> Result<()> {
    let addr = IoEventAddress::Mmio(kick.mmio_gpa);
    // The datamatch type's size is the access length KVM matches.
    let r = match (kick.datamatch, assign) {
        (None, true) => vm.register_ioevent(fd, &addr, kvm_ioctls::NoDatamatch),
        (None, false) => vm.unregister_ioevent(fd, &addr, kvm_ioctls::NoDatamatch),
        (Some(Datamatch::U8(d)), true) => vm.register_ioevent(fd, &addr, d),
        (Some(Datamatch::U8(d)), false) => vm.unregister_ioevent(fd, &addr, d),
        (Some(Datamatch::U16(d)), true) => vm.register_ioevent(fd, &addr, d),
        (Some(Datamatch::U16(d)), false) => vm.unregister_ioevent(fd, &addr, d),
        (Some(Datamatch::U32(d)), true) => vm.register_ioevent(fd, &addr, d),
        (Some(Datamatch::U32(d)), false) => vm.unregister_ioevent(fd, &addr, d),
        (Some(Datamatch::U64(d)), true) => vm.register_ioevent(fd, &addr, d),
        (Some(Datamatch::U64(d)), false) => vm.unregister_ioevent(fd, &addr, d),
    };
    r.map_err(|source| {
        Error::Kvm(crate::Error::Kvm {
            op: if assign {
                "KVM_IOEVENTFD"
            } else {
                "KVM_IOEVENTFD(DEASSIGN)"
            },
            source,
        })
    })
}

struct Queue {
    config: QueueConfig,
    kick: EventFd,
    /// The kick ioeventfd is assigned in KVM.
    ioeventfd: bool,
    /// The call eventfd: a duplicate of the MSI group's vector eventfd, or our own.
    call: EventFd,
    /// Vector of the queue in the MSI group.
    vector: Option<u32>,
    /// `SET_VRING_KICK` was sent.
    started: bool,
}

/// A vhost-user device's queues wired into a KVM VM; see the [module documentation](self).
pub struct VhostUserAttachment {
    vm: Arc<VmFd>,
    frontend: Mutex<Frontend>,
    broken: AtomicBool,
    path: PathBuf,
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    queue_num: Option<u64>,
    ram: Vec<RamMap>,
    queues: Vec<Queue>,
    msi: Option<MsiInterruptGroup>,
}

impl fmt::Debug for VhostUserAttachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VhostUserAttachment")
            .field("path", &self.path)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol_features", &self.protocol_features)
            .field("queue_num", &self.queue_num)
            .field("broken", &self.broken.load(Ordering::Relaxed))
            .field("queues", &self.queue_infos())
            .field("msi", &self.msi)
            .finish()
    }
}

impl VhostUserAttachment {
    /// Connects to the vhost-user backend at `socket_path` and starts `config`'s queues in
    /// `vm`; see the [module documentation](self) for the steps and their order.
    ///
    /// On failure everything done so far is undone on the KVM side (ioeventfds and irqfds
    /// deassigned, GSIs freed) and the connection is closed (the backend forgets the session).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRam`], [`Error::InvalidQueue`], [`Error::NotInRam`] or
    /// [`Error::UnsupportedProtocolFeatures`] for a bad configuration (checked before
    /// connecting); [`Error::Connect`]; [`Error::MissingFeatures`]; [`Error::NoSuchQueue`];
    /// [`Error::Vhost`] when a request fails or times out; [`Error::Kvm`] when an ioeventfd,
    /// irqfd or route cannot be set; [`Error::EventFd`].
    pub fn attach(
        vm: Arc<VmFd>,
        router: SharedGsiRouter,
        socket_path: &Path,
        config: VhostAttachConfig<'_>,
    ) -> Result<Self> {
        // Everything that can be checked without the backend, first.
        let ram = check_ram(&config.guest_ram)?;
        let unsupported = config.protocol_features.bits() & !SUPPORTED_PROTOCOL_FEATURES.bits();
        if unsupported != 0 {
            return Err(Error::UnsupportedProtocolFeatures(unsupported));
        }
        let mut vrings = Vec::with_capacity(config.queues.len());
        for (i, q) in config.queues.iter().enumerate() {
            if config.queues[..i].iter().any(|p| p.index == q.index) {
                return Err(Error::InvalidQueue {
                    index: q.index,
                    reason: "listed twice".into(),
                });
            }
            if let Some(k) = q.kick
                && config.queues[..i]
                    .iter()
                    .any(|p| p.kick.is_some_and(|pk| pk == k))
            {
                return Err(Error::InvalidQueue {
                    index: q.index,
                    reason: format!("notify register {:#x} is shared", k.mmio_gpa),
                });
            }
            vrings.push(vring_config(&ram, q)?);
        }
        let regions: Vec<VhostUserMemoryRegionInfo> = config
            .guest_ram
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.host_addr,
                mmap_offset: r.file_offset,
                mmap_handle: r.fd.as_raw_fd(),
            })
            .collect();

        // 1. Connect.
        let stream = connect_socket(socket_path, config.timeout)?;
        stream
            .set_read_timeout(Some(config.timeout))
            .map_err(Error::Socket)?;
        stream
            .set_write_timeout(Some(config.timeout))
            .map_err(Error::Socket)?;
        let max_index = config
            .queues
            .iter()
            .map(|q| u64::from(q.index) + 1)
            .max()
            .unwrap_or(0);
        let mut att = VhostUserAttachment {
            vm,
            frontend: Mutex::new(Frontend::from_stream(stream, max_index)),
            broken: AtomicBool::new(false),
            path: socket_path.to_owned(),
            features: 0,
            protocol_features: VhostUserProtocolFeatures::empty(),
            queue_num: None,
            ram,
            queues: Vec::with_capacity(config.queues.len()),
            msi: None,
        };
        // From here on, `att`'s Drop undoes what was done if a step fails.

        // 2-3. Owner and features.
        att.request("SET_OWNER", |fe| fe.set_owner())?;
        let offered = att.request("GET_FEATURES", |fe| fe.get_features())?;
        let missing = config.required_features & !offered;
        if missing != 0 {
            return Err(Error::MissingFeatures { missing, offered });
        }
        let acked = (offered & config.features) | (offered & VHOST_USER_F_PROTOCOL_FEATURES);
        att.request("SET_FEATURES", |fe| fe.set_features(acked))?;
        att.features = acked;

        // 4. Protocol features.
        if acked & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let pf = att.request("GET_PROTOCOL_FEATURES", |fe| fe.get_protocol_features())?;
            let pf = pf & config.protocol_features;
            att.request("SET_PROTOCOL_FEATURES", |fe| fe.set_protocol_features(pf))?;
            att.protocol_features = pf;
            if pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                lock(&att.frontend).set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if pf.contains(VhostUserProtocolFeatures::MQ) {
                let n = att.request("GET_QUEUE_NUM", |fe| fe.get_queue_num())?;
                att.queue_num = Some(n);
                if let Some(q) = config.queues.iter().find(|q| u64::from(q.index) >= n) {
                    return Err(Error::NoSuchQueue {
                        index: q.index,
                        available: n,
                    });
                }
            }
        }

        // 5. Memory table.
        att.request("SET_MEM_TABLE", |fe| fe.set_mem_table(&regions).map(drop))?;

        // 6. MSI routes, committed, then the irqfds.
        let with_msi: Vec<(usize, Msi)> = config
            .queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.msi.map(|m| (i, m)))
            .collect();
        let mut vector_of = vec![None; config.queues.len()];
        if !with_msi.is_empty() {
            let count = u32::try_from(with_msi.len()).unwrap_or(u32::MAX);
            let group = MsiInterruptGroup::new(att.vm.clone(), router, count)?;
            for (v, (i, msi)) in (0u32..).zip(&with_msi) {
                group.set_route(v, Some(msi.source_config()))?;
                if let Some(slot) = vector_of.get_mut(*i) {
                    *slot = Some(v);
                }
            }
            att.msi = Some(group);
            if let Some(group) = &att.msi {
                group.set_gsi()?;
                for v in 0..count {
                    group.set_masked(v, false)?;
                }
            }
        }

        // 7. The queues.
        for ((q, vring), vector) in config.queues.iter().zip(&vrings).zip(vector_of) {
            let call = match (vector, &att.msi) {
                (Some(v), Some(group)) => group.notifier(v).ok_or_else(|| {
                    Error::EventFd(io::Error::other("cannot duplicate a call eventfd"))
                })?,
                _ => new_eventfd()?,
            };
            att.queues.push(Queue {
                config: *q,
                kick: new_eventfd()?,
                ioeventfd: false,
                call,
                vector,
                started: false,
            });
            let slot = att.queues.len() - 1;
            let index = usize::from(q.index);
            att.request("SET_VRING_NUM", |fe| fe.set_vring_num(index, q.size))?;
            att.request("SET_VRING_ADDR", |fe| fe.set_vring_addr(index, vring))?;
            att.request("SET_VRING_BASE", |fe| fe.set_vring_base(index, q.base))?;
            {
                let call = &att.queues[slot].call;
                let fe = &att.frontend;
                Self::request_on(&att.broken, fe, "SET_VRING_CALL", |fe| {
                    fe.set_vring_call(index, call)
                })?;
            }
            if let Some(kick) = &q.kick {
                ioevent(&att.vm, &att.queues[slot].kick, kick, true)?;
                att.queues[slot].ioeventfd = true;
            }
            {
                let kick = &att.queues[slot].kick;
                Self::request_on(&att.broken, &att.frontend, "SET_VRING_KICK", |fe| {
                    fe.set_vring_kick(index, kick)
                })?;
            }
            att.queues[slot].started = true;
        }

        // 8. Enable, the first listed queue last.
        if acked & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            for q in config.queues.iter().rev() {
                let index = usize::from(q.index);
                att.request("SET_VRING_ENABLE", |fe| fe.set_vring_enable(index, true))?;
            }
        }
        Ok(att)
    }

    fn request<T>(
        &self,
        name: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T> {
        Self::request_on(&self.broken, &self.frontend, name, f)
    }

    fn request_on<T>(
        broken: &AtomicBool,
        frontend: &Mutex<Frontend>,
        name: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T> {
        if broken.load(Ordering::SeqCst) {
            return Err(Error::ConnectionBroken { request: name });
        }
        let mut fe = lock(frontend);
        f(&mut fe).map_err(|source| {
            if is_transport_error(&source) {
                broken.store(true, Ordering::SeqCst);
            }
            Error::Vhost {
                request: name,
                source,
            }
        })
    }

    /// The socket path the attachment connected to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// The acked virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The acked protocol features (empty without bit 30).
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// The backend's queue count (`GET_QUEUE_NUM`, with `MQ`).
    pub fn queue_num(&self) -> Option<u64> {
        self.queue_num
    }

    /// True once a transport failure broke the connection (attach again to recover).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    fn queue(&self, index: u16) -> Result<&Queue> {
        self.queues
            .iter()
            .find(|q| q.config.index == index)
            .ok_or_else(|| Error::InvalidArgument(format!("queue {index} is not attached")))
    }

    fn info(&self, q: &Queue) -> QueueInfo {
        QueueInfo {
            config: q.config,
            gsi: q
                .vector
                .and_then(|v| self.msi.as_ref().and_then(|g| g.gsi(v))),
            ioeventfd: q.ioeventfd,
            started: q.started,
        }
    }

    /// Every attached queue, in configuration order.
    pub fn queue_infos(&self) -> Vec<QueueInfo> {
        self.queues.iter().map(|q| self.info(q)).collect()
    }

    /// Queue `index`, if attached.
    pub fn queue_info(&self, index: u16) -> Option<QueueInfo> {
        self.queue(index).ok().map(|q| self.info(q))
    }

    /// The GSI of queue `index`'s MSI route.
    pub fn gsi(&self, index: u16) -> Option<u32> {
        self.queue_info(index).and_then(|i| i.gsi)
    }

    /// Host address of guest range `gpa..gpa + len` in the VMM's mapping (the translation
    /// `SET_VRING_ADDR` used).
    ///
    /// # Errors
    ///
    /// [`Error::NotInRam`].
    pub fn host_addr(&self, gpa: u64, len: u64) -> Result<u64> {
        translate(&self.ram, gpa, len)
    }

    /// Kicks queue `index` from the VMM (writes its kick eventfd), as a guest notify write to
    /// the ioeventfd does; for queues without [`QueueConfig::kick`] this is the VMM's notify
    /// path.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a queue that is not attached, [`Error::EventFd`].
    pub fn kick(&self, index: u16) -> Result<()> {
        self.queue(index)?.kick.write(1).map_err(Error::EventFd)
    }

    /// A duplicate of queue `index`'s kick eventfd.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`], [`Error::EventFd`].
    pub fn kick_notifier(&self, index: u16) -> Result<EventFd> {
        self.queue(index)?.kick.try_clone().map_err(Error::EventFd)
    }

    /// A duplicate of queue `index`'s call eventfd (the irqfd, when the queue has an MSI
    /// vector; read it to poll a queue without one).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`], [`Error::EventFd`].
    pub fn call_notifier(&self, index: u16) -> Result<EventFd> {
        self.queue(index)?.call.try_clone().map_err(Error::EventFd)
    }

    /// The MSI group of the call eventfds (vector `v` is the `v`th queue with an MSI).
    pub fn interrupt_group(&self) -> Option<&MsiInterruptGroup> {
        self.msi.as_ref()
    }

    fn vector(&self, index: u16) -> Result<(u32, &MsiInterruptGroup)> {
        let q = self.queue(index)?;
        match (q.vector, &self.msi) {
            (Some(v), Some(g)) => Ok((v, g)),
            _ => Err(Error::InvalidArgument(format!(
                "queue {index} has no MSI vector"
            ))),
        }
    }

    /// Masks or unmasks queue `index`'s MSI vector (MSI-X vector control). While masked its
    /// irqfd is deassigned; backend signals stay pending and are delivered once on unmask.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a queue without a vector; [`Error::Kvm`].
    pub fn set_queue_masked(&self, index: u16, masked: bool) -> Result<()> {
        let (v, g) = self.vector(index)?;
        g.set_masked(v, masked)?;
        Ok(())
    }

    /// Reroutes queue `index`'s vector to `msi` (the guest reprogrammed its MSI-X entry); the
    /// route is committed before the irqfd can fire on it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a queue without a vector; [`Error::Kvm`].
    pub fn set_queue_msi(&self, index: u16, msi: Msi) -> Result<()> {
        let (v, g) = self.vector(index)?;
        let masked = g.is_masked(v).unwrap_or(false);
        g.update(
            v,
            InterruptSourceConfig::MsiIrq(msi.source_config()),
            masked,
            true,
        )?;
        Ok(())
    }

    fn check_config_access(&self, len: usize) -> Result<()> {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return Err(Error::Unsupported(
                "config-space access needs the CONFIG protocol feature".into(),
            ));
        }
        if len == 0 || len > MAX_CONFIG_ACCESS {
            return Err(Error::InvalidArgument(format!(
                "config access of {len} bytes (1..={MAX_CONFIG_ACCESS})"
            )));
        }
        Ok(())
    }

    /// Reads `data.len()` bytes (1..=256) of the device's config space at `offset`
    /// (`GET_CONFIG`).
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] without the `CONFIG` protocol feature;
    /// [`Error::InvalidArgument`] for a bad length; [`Error::Vhost`] when the backend refuses.
    pub fn config_read(&self, offset: u32, data: &mut [u8]) -> Result<()> {
        self.check_config_access(data.len())?;
        let size = data.len() as u32;
        let zeros = vec![0u8; data.len()];
        let (_, bytes) = self.request("GET_CONFIG", |fe| {
            fe.get_config(offset, size, VhostUserConfigFlags::empty(), &zeros)
        })?;
        // vhost checked that the reply has the requested size.
        let n = bytes.len().min(data.len());
        data[..n].copy_from_slice(&bytes[..n]);
        Ok(())
    }

    /// Writes `data` (1..=256 bytes) to the device's config space at `offset` (`SET_CONFIG`).
    ///
    /// # Errors
    ///
    /// As [`config_read`](Self::config_read).
    pub fn config_write(&self, offset: u32, data: &[u8]) -> Result<()> {
        self.check_config_access(data.len())?;
        self.request("SET_CONFIG", |fe| {
            fe.set_config(offset, VhostUserConfigFlags::empty(), data)
        })
    }

    /// Stops every queue and undoes the wiring in reverse (see the
    /// [module documentation](self)), then closes the connection. Returns each stopped
    /// queue's next avail index. Every step is attempted; the first error is returned (the
    /// KVM side is undone regardless).
    ///
    /// # Errors
    ///
    /// The first failing step's error.
    pub fn detach(mut self) -> Result<Vec<StoppedQueue>> {
        let (stopped, first) = self.teardown(true);
        first.map_or(Ok(stopped), Err)
    }

    fn teardown(&mut self, polite: bool) -> (Vec<StoppedQueue>, Option<Error>) {
        let mut first: Option<Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                log::warn!("irqbridge-kvm: vhost-user detach: {e}");
                first.get_or_insert(e);
            }
        };
        let mut stopped = Vec::new();
        let started: Vec<u16> = self
            .queues
            .iter()
            .filter(|q| q.started)
            .map(|q| q.config.index)
            .collect();
        if polite && !started.is_empty() {
            if self.features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
                for &index in &started {
                    note(self.request("SET_VRING_ENABLE", |fe| {
                        fe.set_vring_enable(usize::from(index), false)
                    }));
                }
            }
            for &index in &started {
                match self.request("GET_VRING_BASE", |fe| fe.get_vring_base(usize::from(index))) {
                    Ok(base) => stopped.push(StoppedQueue {
                        index,
                        // The split-ring avail index is 16 bits; vhost-user carries it in 32.
                        next_avail: base as u16,
                    }),
                    Err(e) => note(Err(e)),
                }
            }
        }
        for q in &mut self.queues {
            q.started = false;
            if q.ioeventfd
                && let Some(kick) = &q.config.kick
            {
                note(ioevent(&self.vm, &q.kick, kick, false));
                q.ioeventfd = false;
            }
        }
        // Deassigns every irqfd, then frees the GSIs and commits once.
        drop(self.msi.take());
        for q in &mut self.queues {
            q.vector = None;
        }
        (stopped, first)
    }
}

impl Drop for VhostUserAttachment {
    fn drop(&mut self) {
        // Without detach(): undo the KVM side; the backend ends the session when the socket
        // closes.
        let _ = self.teardown(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn map(gpa: u64, size: u64, host_addr: u64) -> RamMap {
        RamMap {
            gpa,
            size,
            host_addr,
        }
    }

    fn queue(index: u16, size: u16, base: u64) -> QueueConfig {
        QueueConfig {
            index,
            size,
            desc_gpa: base,
            avail_gpa: base + 16 * u64::from(size),
            used_gpa: base + 0x1000,
            base: 0,
            kick: None,
            msi: None,
        }
    }

    #[test]
    fn attachment_is_shareable() {
        fn check<T: Send + Sync>() {}
        check::<VhostUserAttachment>();
    }

    #[test]
    fn translation_stays_inside_one_region() {
        let ram = [
            map(0, 0x10000, 0x7f00_0000_0000),
            map(0x20000, 0x1000, 0x1000),
        ];
        assert_eq!(translate(&ram, 0x100, 16).unwrap(), 0x7f00_0000_0100);
        assert_eq!(translate(&ram, 0x20010, 0x10).unwrap(), 0x1010);
        assert!(matches!(
            translate(&ram, 0xfff0, 0x20),
            Err(Error::NotInRam { gpa: 0xfff0, .. })
        ));
        assert!(translate(&ram, 0x18000, 1).is_err());
        assert!(translate(&ram, u64::MAX, 2).is_err());
    }

    #[test]
    fn queue_checks() {
        let ram = [map(0, 0x10000, 0x10_0000)];
        let v = vring_config(&ram, &queue(2, 64, 0x2000)).unwrap();
        assert_eq!(v.desc_table_addr, 0x10_2000);
        assert_eq!(v.avail_ring_addr, 0x10_2400);
        assert_eq!(v.used_ring_addr, 0x10_3000);
        assert_eq!((v.queue_size, v.queue_max_size), (64, 64));
        let bad =
            |q: QueueConfig| matches!(vring_config(&ram, &q), Err(Error::InvalidQueue { .. }));
        assert!(bad(queue(256, 64, 0x2000)));
        assert!(bad(queue(0, 0, 0x2000)));
        assert!(bad(queue(0, 48, 0x2000)));
        assert!(bad(QueueConfig {
            desc_gpa: 0x2008,
            ..queue(0, 64, 0x2000)
        }));
        assert!(bad(QueueConfig {
            used_gpa: 0x3002,
            ..queue(0, 64, 0x2000)
        }));
        // Notify address inside RAM.
        assert!(bad(QueueConfig {
            kick: Some(KickConfig {
                mmio_gpa: 0x8000,
                datamatch: None
            }),
            ..queue(0, 64, 0x2000)
        }));
        // Rings past the end of RAM.
        assert!(matches!(
            vring_config(&ram, &queue(0, 64, 0xf000)),
            Err(Error::NotInRam { .. })
        ));
    }

    #[test]
    fn ram_checks() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let r = |gpa, size, host_addr| GuestRam {
            gpa,
            size,
            fd: f.as_fd(),
            file_offset: 0,
            host_addr,
        };
        assert!(check_ram(&[]).is_err());
        assert!(check_ram(&[r(0, 0, 0x1000)]).is_err());
        assert!(check_ram(&[r(0, 0x1000, 0)]).is_err());
        assert!(check_ram(&[r(u64::MAX, 2, 0x1000)]).is_err());
        assert!(check_ram(&[r(0, 0x2000, 0x10000), r(0x1000, 0x1000, 0x40000)]).is_err());
        assert!(check_ram(&[r(0, 0x2000, 0x10000), r(0x4000, 0x1000, 0x11000)]).is_err());
        assert_eq!(
            check_ram(&[r(0, 0x2000, 0x10000), r(0x4000, 0x1000, 0x40000)])
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn io_error_kinds() {
        let e: io::Error = Error::InvalidArgument("x".into()).into();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e: io::Error = Error::ConnectionBroken {
            request: "GET_CONFIG",
        }
        .into();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        let e: io::Error = Error::UnsupportedProtocolFeatures(0x20).into();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    }

    #[test]
    fn supported_protocol_features() {
        assert_eq!(SUPPORTED_PROTOCOL_FEATURES.bits(), 0x1 | 0x8 | 0x200);
        assert_eq!(VHOST_USER_F_PROTOCOL_FEATURES, 1 << 30);
    }
}
