// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user end to end: the irqbridge vhost-user backend, the irqbridge-kvm vhost-user
//! frontend path and the guest agent in several [`TestVm`]s of one process: [`VhostRig`].
//!
//! [`VhostRig::new`]:
//! 1. starts the irqbridge vhost-user backend in process ([`irqbridge_vhost_user::Server`]),
//!    one socket per VM in a private directory, so VM `i` is connection [`ConnId`]`(i)`;
//! 2. per VM: creates a [`TestVm`]; as its firmware, lays out the device's virtqueues in guest
//!    RAM (see [the layout](#guest-memory-layout)); attaches the device with
//!    [`VhostUserAttachment::attach`]: guest RAM in the memory table, each queue's kick an
//!    ioeventfd at its notify register (datamatch = queue index, 32 bits), the control queue's
//!    and every event queue's call an irqfd on an MSI route, the doorbell queue's call left
//!    to the VMM (its avail ring asks for no interrupts); boots the guest agent and sets its
//!    actions: EOI for [`CONTROL_VECTOR`], event-channel collection on [`PAGE_GPA`] for the
//!    event vector of each upcall ([`event_vector`]).
//!
//! From then on the **guest** drives the device with plain stores, through agent commands:
//! request bytes into a buffer, the avail index, and a 32-bit store of the queue index to the
//! queue's notify register. The store matches the ioeventfd, so KVM signals the backend's
//! kick eventfd without a VM exit, and the backend's call signals come back as MSIs the
//! agent's handlers count. [`VhostGuest`] wraps those sequences (control requests, doorbells,
//! masking a port in the page); the host only reads guest memory to observe.
//!
//! # Guest memory layout
//!
//! | GPA | what | written by |
//! |---|---|---|
//! | [`PAGE_GPA`] | the event-channel page (REGISTER_PAGE) | guest, backend |
//! | [`QUEUES_GPA`] + [`QUEUE_STRIDE`] × q | queue q: descriptors @0, avail ring @0x400, used ring @0x800, [`SLOT_SIZE`]-byte buffer slots @0x1000 | firmware (host), guest, backend |
//! | [`NOTIFY_GPA`] + 4 × q | notify register of queue q (ioeventfd, no RAM) | guest |
//!
//! The firmware fills every descriptor table once and never changes it, and fills every avail
//! ring entry: avail index `j` always names the same chain, so the guest publishes a request
//! by writing its buffer and the new avail index only.
//! - control queue (0): chain `2k → 2k + 1` = 16-byte request, 8-byte device-writable reply;
//!   avail entry `j` = chain `2 (j mod QUEUE_SIZE/2)`;
//! - doorbell queue (1): descriptor `k` = a 4-byte port number; avail entry `j` = `j mod
//!   QUEUE_SIZE`; avail flags `VRING_AVAIL_F_NO_INTERRUPT`;
//! - event queue of upcall `u` (2 + u): descriptor `k` = an 8-byte device-writable record
//!   buffer; avail entry `j` = `j mod QUEUE_SIZE`, all [`QUEUE_SIZE`] buffers posted at boot
//!   ([`VhostGuest::refill_events`] re-posts the used ones).
//!
//! Drop order: every attachment is detached (rings stopped, ioeventfds and irqfds removed),
//! then the vCPUs stop, then the backend.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use irqbridge_kvm::routing::{GsiRouter, IrqChip, RoutingSink};
use irqbridge_kvm::vhost::{
    Datamatch, GuestRam, KickConfig, Msi, QueueConfig, VhostAttachConfig, VhostUserAttachment,
};
use irqbridge_vhost_user::abi::{
    CONTROL_QUEUE, DOORBELL_QUEUE, Op, REPLY_SIZE, REQUEST_SIZE, Reply, Request, event_queue,
    num_queues,
};
use irqbridge_vhost_user::{Backend, BackendConfig, ConnId, Server};

use crate::error::{Error, Result};
use crate::layout::{FREE_RAM_GPA, LAPIC_GPA};
use crate::server::TempDir;
use crate::{Action, ExitStats, Guest, TestVm, VmOptions};

/// Guest address of each VM's event-channel page.
pub const PAGE_GPA: u64 = FREE_RAM_GPA;
/// Guest address of queue 0; queue `q` starts at `QUEUES_GPA + QUEUE_STRIDE * q`.
pub const QUEUES_GPA: u64 = FREE_RAM_GPA + 0x1_0000;
/// Guest memory per queue.
pub const QUEUE_STRIDE: u64 = 0x2000;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 64;
/// Bytes of the buffer slot each descriptor owns.
pub const SLOT_SIZE: u64 = 64;
/// Notify register of queue 0; queue `q`'s is at `NOTIFY_GPA + 4 q` (write the 32-bit queue
/// index there).
pub const NOTIFY_GPA: u64 = crate::layout::DEVICE_MMIO_GPA;
/// Vector of the control queue's MSI.
pub const CONTROL_VECTOR: u8 = 0x50;
/// Vector of upcall 0's event queue; upcall `u` uses `FIRST_EVENT_VECTOR + u`.
pub const FIRST_EVENT_VECTOR: u8 = 0x60;
/// Most upcalls the rig wires (vectors 0x60..0x80).
pub const MAX_RIG_UPCALLS: u16 = 32;

const DESC_OFFSET: u64 = 0;
const AVAIL_OFFSET: u64 = 0x400;
const USED_OFFSET: u64 = 0x800;
const SLOTS_OFFSET: u64 = 0x1000;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Time limit of waits for the device.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(5);

// The layout fits: rings and slots inside a queue's stride, every queue below the smallest
// RAM, every notify register inside the device MMIO window, every vector an interrupt.
const _: () = {
    let n = QUEUE_SIZE as u64;
    let queues = num_queues(MAX_RIG_UPCALLS);
    assert!(PAGE_GPA + 0x1000 <= QUEUES_GPA);
    assert!(DESC_OFFSET + 16 * n <= AVAIL_OFFSET);
    assert!(AVAIL_OFFSET + 6 + 2 * n <= USED_OFFSET);
    assert!(USED_OFFSET + 6 + 8 * n <= SLOTS_OFFSET);
    assert!(SLOTS_OFFSET + SLOT_SIZE * n <= QUEUE_STRIDE);
    assert!(queue_gpa(queues) <= crate::layout::MIN_RAM_SIZE);
    assert!(notify_gpa(queues) < crate::layout::DEVICE_MMIO_GPA + crate::layout::DEVICE_MMIO_SIZE);
    assert!(CONTROL_VECTOR < FIRST_EVENT_VECTOR);
    assert!(event_vector(MAX_RIG_UPCALLS - 1) < crate::layout::DOORBELL_VECTOR);
};

/// The MSI vector of upcall `upcall`'s event queue.
pub const fn event_vector(upcall: u16) -> u8 {
    FIRST_EVENT_VECTOR + upcall as u8
}

/// Guest address of queue `q`.
pub const fn queue_gpa(q: usize) -> u64 {
    QUEUES_GPA + QUEUE_STRIDE * q as u64
}

/// Guest address of queue `q`'s avail ring.
pub const fn avail_gpa(q: usize) -> u64 {
    queue_gpa(q) + AVAIL_OFFSET
}

/// Guest address of queue `q`'s used ring.
pub const fn used_gpa(q: usize) -> u64 {
    queue_gpa(q) + USED_OFFSET
}

/// Guest address of descriptor `id`'s buffer slot in queue `q`.
pub const fn slot_gpa(q: usize, id: u16) -> u64 {
    queue_gpa(q) + SLOTS_OFFSET + SLOT_SIZE * id as u64
}

/// Guest address of queue `q`'s notify register.
pub const fn notify_gpa(q: usize) -> u64 {
    NOTIFY_GPA + 4 * q as u64
}

fn vhost_err(e: irqbridge_kvm::vhost::Error) -> Error {
    Error::Io(e.into())
}

fn backend_err(e: irqbridge_vhost_user::Error) -> Error {
    Error::Io(std::io::Error::other(e))
}

/// What [`VhostRig::new`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhostRigOptions {
    /// Number of VMs (backend connections), at least 1.
    pub vms: usize,
    /// Event-channel ports per connection.
    pub ports: u32,
    /// Upcalls (event queues) per connection, 1..=[`MAX_RIG_UPCALLS`].
    pub upcalls: u16,
    /// Guest RAM size of each VM.
    pub ram_size: u64,
}

impl Default for VhostRigOptions {
    fn default() -> Self {
        VhostRigOptions {
            vms: 2,
            ports: 1024,
            upcalls: 2,
            ram_size: VmOptions::default().ram_size,
        }
    }
}

/// The guest driver's ring positions (the guest's own state; kept host-side because the agent
/// only runs single commands).
#[derive(Debug, Default)]
struct DriverState {
    /// Control requests published.
    control_avail: u16,
    /// Doorbell chains published (the avail index).
    doorbell_avail: u16,
    /// Doorbell chains published in all.
    doorbells: u64,
    /// Control completions seen (control MSIs the agent handled).
    control_done: u64,
}

/// One VM of a [`VhostRig`]: its guest agent, its attachment, and the guest-side driver.
pub struct VhostGuest {
    conn: ConnId,
    upcalls: u16,
    attachment: Option<VhostUserAttachment>,
    guest: Option<Guest>,
    driver: Mutex<DriverState>,
}

impl fmt::Debug for VhostGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VhostGuest")
            .field("conn", &self.conn)
            .field("upcalls", &self.upcalls)
            .field("attachment", &self.attachment)
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

/// Writes the firmware's virtqueue layout into `vm`'s RAM (see the module documentation).
fn lay_out_queues(vm: &TestVm, upcalls: u16) -> Result<()> {
    let mem = vm.memory();
    let n = usize::from(QUEUE_SIZE);
    mem.zero(PAGE_GPA, 0x1000)?;
    for q in 0..num_queues(upcalls) {
        mem.zero(queue_gpa(q), QUEUE_STRIDE)?;
        let mut descs = Vec::with_capacity(n * 16);
        for id in 0..QUEUE_SIZE {
            let (len, flags, next) = match q {
                CONTROL_QUEUE if id % 2 == 0 => (REQUEST_SIZE as u32, VRING_DESC_F_NEXT, id + 1),
                CONTROL_QUEUE => (REPLY_SIZE as u32, VRING_DESC_F_WRITE, 0),
                DOORBELL_QUEUE => (4, 0, 0),
                _ => (8, VRING_DESC_F_WRITE, 0),
            };
            descs.extend_from_slice(&slot_gpa(q, id).to_le_bytes());
            descs.extend_from_slice(&len.to_le_bytes());
            descs.extend_from_slice(&flags.to_le_bytes());
            descs.extend_from_slice(&next.to_le_bytes());
        }
        mem.write_slice(queue_gpa(q) + DESC_OFFSET, &descs)?;
        let mut ring = Vec::with_capacity(n * 2);
        for j in 0..QUEUE_SIZE {
            let head = if q == CONTROL_QUEUE {
                2 * (j % (QUEUE_SIZE / 2))
            } else {
                j
            };
            ring.extend_from_slice(&head.to_le_bytes());
        }
        mem.write_slice(avail_gpa(q) + 4, &ring)?;
        let (flags, idx) = match q {
            CONTROL_QUEUE => (0u16, 0u16),
            DOORBELL_QUEUE => (VRING_AVAIL_F_NO_INTERRUPT, 0),
            _ => (0, QUEUE_SIZE),
        };
        mem.store_u32(avail_gpa(q), u32::from(flags) | u32::from(idx) << 16)?;
    }
    Ok(())
}

impl VhostGuest {
    fn new(conn: ConnId, socket: &Path, options: &VhostRigOptions) -> Result<VhostGuest> {
        let vm = TestVm::new(&VmOptions {
            ram_size: options.ram_size,
        })?;
        lay_out_queues(&vm, options.upcalls)?;
        let sink: std::sync::Arc<dyn RoutingSink> = vm.vm_fd().clone();
        let router = GsiRouter::new_shared(sink, IrqChip::Full);
        let mem = vm.memory();
        let queues = (0..num_queues(options.upcalls))
            .map(|q| {
                let index = q as u16;
                let vector = match q {
                    CONTROL_QUEUE => Some(CONTROL_VECTOR),
                    DOORBELL_QUEUE => None,
                    _ => Some(event_vector(index - event_queue(0) as u16)),
                };
                QueueConfig {
                    index,
                    size: QUEUE_SIZE,
                    desc_gpa: queue_gpa(q) + DESC_OFFSET,
                    avail_gpa: avail_gpa(q),
                    used_gpa: used_gpa(q),
                    base: 0,
                    kick: Some(KickConfig {
                        mmio_gpa: notify_gpa(q),
                        datamatch: Some(Datamatch::U32(u32::from(index))),
                    }),
                    msi: vector.map(|v| Msi {
                        address: LAPIC_GPA,
                        data: u32::from(v),
                    }),
                }
            })
            .collect();
        let attachment = VhostUserAttachment::attach(
            vm.vm_fd().clone(),
            router,
            socket,
            VhostAttachConfig {
                guest_ram: vec![GuestRam {
                    gpa: mem.gpa(),
                    size: mem.size(),
                    fd: mem.fd(),
                    file_offset: 0,
                    host_addr: mem.host_addr() as u64,
                }],
                queues,
                timeout: DEVICE_TIMEOUT,
                ..VhostAttachConfig::default()
            },
        )
        .map_err(vhost_err)?;
        let guest = Guest::boot(vm)?;
        guest.set_action(CONTROL_VECTOR, Action::eoi())?;
        for u in 0..options.upcalls {
            guest.set_action(
                event_vector(u),
                Action::eoi().with_evtchn(PAGE_GPA, u as u8),
            )?;
        }
        Ok(VhostGuest {
            conn,
            upcalls: options.upcalls,
            attachment: Some(attachment),
            guest: Some(guest),
            driver: Mutex::new(DriverState::default()),
        })
    }

    /// The backend connection this VM is attached to.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// The guest agent (and through it the [`TestVm`]).
    pub fn guest(&self) -> &Guest {
        match &self.guest {
            Some(g) => g,
            None => unreachable!("the guest is only taken in drop"),
        }
    }

    /// The plugin's attachment.
    pub fn attachment(&self) -> &VhostUserAttachment {
        match &self.attachment {
            Some(a) => a,
            None => unreachable!("the attachment is only taken in drop"),
        }
    }

    /// The vCPU's exit counters now.
    pub fn exit_stats(&self) -> ExitStats {
        self.guest().vm().exit_stats()
    }

    fn driver(&self) -> std::sync::MutexGuard<'_, DriverState> {
        self.driver.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The guest sends one control request and returns the device's reply: it writes the
    /// request and a poisoned reply into the chain's buffers, publishes the avail index and
    /// writes the notify register (no exit); the completion is the control MSI, after which
    /// the guest checks the used index and reads the reply.
    ///
    /// # Errors
    ///
    /// Agent command errors, [`Error::Timeout`] without a completion, [`Error::Check`] if the
    /// used ring does not show exactly this completion.
    pub fn control(&self, req: Request) -> Result<Reply> {
        let g = self.guest();
        let mut d = self.driver();
        let q = CONTROL_QUEUE;
        let n = d.control_avail;
        let head = 2 * (n % (QUEUE_SIZE / 2));
        let bytes = req.to_bytes();
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&bytes[..8]);
        hi.copy_from_slice(&bytes[8..]);
        g.mmio_write64(slot_gpa(q, head), u64::from_le_bytes(lo))?;
        g.mmio_write64(slot_gpa(q, head) + 8, u64::from_le_bytes(hi))?;
        g.mmio_write64(slot_gpa(q, head + 1), u64::MAX)?;
        let next = n.wrapping_add(1);
        g.mmio_write32(avail_gpa(q), u32::from(next) << 16)?;
        d.control_avail = next;
        g.mmio_write32(notify_gpa(q), q as u32)?;
        d.control_done += 1;
        g.wait_count(CONTROL_VECTOR, d.control_done, DEVICE_TIMEOUT)?;
        let used = (g.mmio_read32(used_gpa(q))? >> 16) as u16;
        if used != next {
            return Err(Error::Check(format!(
                "control queue: used index {used} after request {next}"
            )));
        }
        let reply = g.mmio_read64(slot_gpa(q, head + 1))?;
        Ok(Reply::from_bytes(&reply.to_le_bytes()))
    }

    /// REGISTER_PAGE of [`PAGE_GPA`].
    ///
    /// # Errors
    ///
    /// As [`VhostGuest::control`].
    pub fn register_page(&self) -> Result<Reply> {
        self.control(Request::new(Op::RegisterPage, 0, PAGE_GPA))
    }

    /// BIND `port` to `upcall`.
    ///
    /// # Errors
    ///
    /// As [`VhostGuest::control`].
    pub fn bind(&self, port: u32, upcall: u16) -> Result<Reply> {
        self.control(Request::new(Op::Bind, port, upcall.into()))
    }

    /// UNMASK `port` (clears its mask bit and raises its upcall if it is pending).
    ///
    /// # Errors
    ///
    /// As [`VhostGuest::control`].
    pub fn unmask(&self, port: u32) -> Result<Reply> {
        self.control(Request::new(Op::Unmask, port, 0))
    }

    /// STATUS of `port`.
    ///
    /// # Errors
    ///
    /// As [`VhostGuest::control`].
    pub fn status(&self, port: u32) -> Result<Reply> {
        self.control(Request::new(Op::Status, port, 0))
    }

    /// The guest rings the doorbell for `port`: port number into the next doorbell buffer,
    /// avail index, notify write (no exit). Fire and forget (the doorbell queue asks for no
    /// interrupt); when all [`QUEUE_SIZE`] buffers are in flight the guest polls the used
    /// index until one is back.
    ///
    /// # Errors
    ///
    /// Agent command errors, [`Error::Timeout`] if the device never returns a buffer.
    pub fn doorbell(&self, port: u32) -> Result<()> {
        let g = self.guest();
        let mut d = self.driver();
        let q = DOORBELL_QUEUE;
        let n = d.doorbell_avail;
        let deadline = std::time::Instant::now() + DEVICE_TIMEOUT;
        // Until the ring wraps, every buffer is free.
        while d.doorbells >= u64::from(QUEUE_SIZE) {
            let used = (g.mmio_read32(used_gpa(q))? >> 16) as u16;
            if n.wrapping_sub(used) < QUEUE_SIZE {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "a free doorbell buffer".into(),
                    timeout: DEVICE_TIMEOUT,
                });
            }
        }
        g.mmio_write32(slot_gpa(q, n % QUEUE_SIZE), port)?;
        let next = n.wrapping_add(1);
        g.mmio_write32(
            avail_gpa(q),
            u32::from(VRING_AVAIL_F_NO_INTERRUPT) | u32::from(next) << 16,
        )?;
        d.doorbell_avail = next;
        d.doorbells += 1;
        g.mmio_write32(notify_gpa(q), q as u32)
    }

    /// The guest sets or clears `port`'s mask bit in its event-channel page: a read and a
    /// write of the mask word, plain memory, no exit and no message.
    ///
    /// # Errors
    ///
    /// Agent command errors; [`Error::InvalidArgument`] for a port above 4095.
    pub fn set_port_masked(&self, port: u32, masked: bool) -> Result<()> {
        if port >= crate::layout::evtchn::MAX_PORTS {
            return Err(Error::InvalidArgument(format!("event-channel port {port}")));
        }
        let g = self.guest();
        let word = PAGE_GPA + crate::layout::evtchn::MASK_OFFSET + 8 * u64::from(port / 64);
        let v = g.mmio_read64(word)?;
        let bit = 1u64 << (port % 64);
        g.mmio_write64(word, if masked { v | bit } else { v & !bit })
    }

    /// Whether the guest sees `port`'s mask bit set in its page.
    ///
    /// # Errors
    ///
    /// As [`VhostGuest::set_port_masked`].
    pub fn port_masked(&self, port: u32) -> Result<bool> {
        if port >= crate::layout::evtchn::MAX_PORTS {
            return Err(Error::InvalidArgument(format!("event-channel port {port}")));
        }
        let word = PAGE_GPA + crate::layout::evtchn::MASK_OFFSET + 8 * u64::from(port / 64);
        Ok(self.guest().mmio_read64(word)? & (1 << (port % 64)) != 0)
    }

    /// The guest re-posts every used buffer of upcall `upcall`'s event queue (avail index =
    /// used index + [`QUEUE_SIZE`]) and notifies the queue.
    ///
    /// # Errors
    ///
    /// Agent command errors; [`Error::InvalidArgument`] for a bad upcall.
    pub fn refill_events(&self, upcall: u16) -> Result<()> {
        if upcall >= self.upcalls {
            return Err(Error::InvalidArgument(format!("upcall {upcall}")));
        }
        let g = self.guest();
        let q = event_queue(upcall);
        let used = (g.mmio_read32(used_gpa(q))? >> 16) as u16;
        g.mmio_write32(avail_gpa(q), u32::from(used.wrapping_add(QUEUE_SIZE)) << 16)?;
        g.mmio_write32(notify_gpa(q), q as u32)
    }

    /// Upcalls the guest handled on `upcall` (handler runs of its event vector).
    pub fn upcalls(&self, upcall: u16) -> u64 {
        self.guest().count(event_vector(upcall))
    }

    /// Waits until the guest handled at least `n` upcalls on `upcall`; returns the count.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`].
    pub fn wait_upcalls(&self, upcall: u16, n: u64) -> Result<u64> {
        self.guest()
            .wait_count(event_vector(upcall), n, DEVICE_TIMEOUT)
    }

    /// Control completions the guest handled (control MSIs).
    pub fn control_interrupts(&self) -> u64 {
        self.guest().count(CONTROL_VECTOR)
    }

    /// Events the guest collected on `port`.
    ///
    /// # Errors
    ///
    /// As [`Guest::port_count`].
    pub fn port_count(&self, port: u32) -> Result<u32> {
        self.guest().port_count(port)
    }
}

/// The vhost-user backend and several guests attached to it; see the
/// [module documentation](self).
pub struct VhostRig {
    vms: Vec<VhostGuest>,
    server: Option<Server>,
    backend: Backend,
    options: VhostRigOptions,
    _dir: TempDir,
}

impl fmt::Debug for VhostRig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VhostRig")
            .field("options", &self.options)
            .field("vms", &self.vms)
            .finish_non_exhaustive()
    }
}

impl VhostRig {
    /// Builds the rig; see the [module documentation](self).
    ///
    /// # Errors
    ///
    /// [`Error::KvmUnavailable`] without a usable `/dev/kvm`; [`Error::InvalidArgument`] for
    /// bad options; [`Error::Io`] when the backend cannot start or an attachment fails (the
    /// cause chain names the step); the errors of [`TestVm::new`] and [`Guest::boot`].
    pub fn new(options: VhostRigOptions) -> Result<VhostRig> {
        if let Some(reason) = crate::kvm_unavailable_reason() {
            return Err(Error::KvmUnavailable(reason));
        }
        if options.vms == 0 || options.upcalls == 0 || options.upcalls > MAX_RIG_UPCALLS {
            return Err(Error::InvalidArgument(format!(
                "{} VMs, {} upcalls (1..={MAX_RIG_UPCALLS})",
                options.vms, options.upcalls
            )));
        }
        let dir = TempDir::new("vhost-rig")?;
        let sockets: Vec<PathBuf> = (0..options.vms)
            .map(|i| dir.0.join(format!("vm{i}.sock")))
            .collect();
        let server = Server::start(BackendConfig {
            sockets: sockets.clone(),
            ports: options.ports,
            upcalls: options.upcalls,
            ..BackendConfig::default()
        })
        .map_err(backend_err)?;
        let backend = server.backend().clone();
        let mut rig = VhostRig {
            vms: Vec::with_capacity(options.vms),
            server: Some(server),
            backend,
            options,
            _dir: dir,
        };
        for (i, path) in sockets.iter().enumerate() {
            let vm = VhostGuest::new(ConnId(i as u32), path, &options)?;
            rig.vms.push(vm);
        }
        Ok(rig)
    }

    /// The backend's shared state (send events, link ports, counters).
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The VMs, VM `i` on connection `i`.
    pub fn vms(&self) -> &[VhostGuest] {
        &self.vms
    }

    /// VM `i`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if there is no VM `i`.
    pub fn vm(&self, i: usize) -> Result<&VhostGuest> {
        self.vms
            .get(i)
            .ok_or_else(|| Error::InvalidArgument(format!("VM {i}")))
    }

    /// The options the rig was built with.
    pub fn options(&self) -> &VhostRigOptions {
        &self.options
    }
}

impl Drop for VhostRig {
    fn drop(&mut self) {
        // Rings stopped first (the backend stops touching guest RAM), then the vCPUs, then
        // the backend.
        for vm in &mut self.vms {
            if let Some(att) = vm.attachment.take()
                && let Err(e) = att.detach()
            {
                log::warn!("detaching {}: {e}", vm.conn);
            }
            drop(vm.guest.take());
        }
        if let Some(server) = self.server.take() {
            server.stop_handle().stop();
            if let Err(e) = server.wait() {
                log::warn!("vhost-user backend: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rig_types_are_shareable() {
        fn check<T: Send + Sync>() {}
        check::<VhostGuest>();
    }
}
