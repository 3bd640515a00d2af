// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A minimal virtio driver for the event-channel device, over a real vhost-user connection.
//!
//! This is the guest side as tests, harnesses and [`crate::bench`] need it: [`GuestRam`] is
//! memfd-backed "guest RAM" mapped in the calling process and shared with the backend through
//! SET_MEM_TABLE; [`SplitQueue`] lays out a split virtqueue (descriptor table, avail and used
//! rings) by hand in that RAM; [`Driver`] connects with vhost's `Frontend`, negotiates, sets up
//! every queue with its own kick and call eventfds, and offers typed helpers for the control,
//! doorbell and event queues. The event-channel page itself is read with
//! [`GuestRam::words`] and [`irqbridge_core::evtchn::guest_collect`].
//!
//! Nothing here is needed to run the backend.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use irqbridge_core::evtchn::{EVTCHN_PAGE_SIZE, EVTCHN_PAGE_WORDS};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::abi::{
    CONFIG_SIZE, CONTROL_QUEUE, ConfigSpace, DOORBELL_QUEUE, Op, REPLY_SIZE, REQUEST_SIZE, Reply,
    Request, Status, UpcallRecord, event_queue, num_queues,
};

/// Default time a helper waits for the device.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Guest RAM: one memfd mapped at guest physical address 0.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    file: File,
    size: u64,
}

impl GuestRam {
    /// `size` bytes (a multiple of 4 KiB) of zeroed RAM.
    ///
    /// # Errors
    ///
    /// memfd creation, sizing or mapping failed.
    pub fn new(size: usize) -> io::Result<GuestRam> {
        if size == 0 || size % EVTCHN_PAGE_SIZE != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "guest RAM size must be a non-zero multiple of 4 KiB",
            ));
        }
        // SAFETY: memfd_create with a valid NUL-terminated name and flags; it returns a new
        // descriptor or -1 and touches no other memory.
        let fd = unsafe { libc::memfd_create(c"irqbridge-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])
        .map_err(other)?;
        Ok(GuestRam {
            mem,
            file,
            size: size as u64,
        })
    }

    /// The memfd behind the RAM (tests shrink it to play a hostile frontend).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The mapping, for reads and writes with [`vm_memory::Bytes`].
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Host (this process's) address of guest address `gpa`.
    ///
    /// # Errors
    ///
    /// `gpa` is outside the RAM.
    pub fn host_addr(&self, gpa: u64) -> io::Result<u64> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(other)
    }

    /// The memory-table entry describing this RAM.
    ///
    /// # Errors
    ///
    /// The mapping has no host address (cannot happen).
    pub fn region(&self) -> io::Result<VhostUserMemoryRegionInfo> {
        Ok(VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_addr(0)?,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        })
    }

    /// The 512 words of the 4 KiB page at `gpa`, as the guest's event-channel handler sees
    /// them. `None` if `gpa` is not 8-byte aligned or the page is not inside the RAM.
    pub fn words(&self, gpa: u64) -> Option<&[AtomicU64]> {
        let end = gpa.checked_add(EVTCHN_PAGE_SIZE as u64)?;
        if gpa % 8 != 0 || end > self.size {
            return None;
        }
        let region = self.mem.find_region(GuestAddress(gpa))?;
        let offset = region.to_region_addr(GuestAddress(gpa))?;
        let ptr = region.get_host_address(offset).ok()?;
        // SAFETY: the 4 KiB at `ptr` are inside the single mapping of this RAM (checked
        // above), which lives as long as `self`, so as long as the returned slice. `gpa` is
        // 8-byte aligned and the mapping is page-aligned, so the words are aligned. The page
        // is shared with the backend, which also accesses it only through atomics.
        Some(unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), EVTCHN_PAGE_WORDS) })
    }
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// Size of the buffer slot each descriptor owns in a [`SplitQueue`] (see [`SplitQueue::slot`]).
pub const SLOT_SIZE: u64 = 64;

const DESC_SIZE: u64 = 16;

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Driver side of one split virtqueue laid out in [`GuestRam`]: descriptor table, avail ring,
/// used ring, then one [`SLOT_SIZE`]-byte buffer slot per descriptor.
#[derive(Debug)]
pub struct SplitQueue {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    slots: u64,
    next_avail: u16,
    last_used: u16,
    free: Vec<u16>,
    in_flight: Vec<bool>,
    event_idx: bool,
    kick: EventFd,
    call: EventFd,
}

impl SplitQueue {
    /// Bytes a queue of `size` entries occupies (rings and slots), 4 KiB aligned.
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        let avail = DESC_SIZE * n;
        let used = align(avail + 6 + 2 * n, 4);
        let slots = align(used + 6 + 8 * n, SLOT_SIZE);
        align(slots + SLOT_SIZE * n, EVTCHN_PAGE_SIZE as u64)
    }

    /// Queue `index` of `size` entries (a power of two) at guest address `base`, zeroed.
    ///
    /// # Errors
    ///
    /// The area is outside the RAM, or an eventfd cannot be created.
    pub fn new(
        ram: &GuestRam,
        index: usize,
        size: u16,
        base: u64,
        event_idx: bool,
    ) -> io::Result<SplitQueue> {
        let n = u64::from(size);
        let len = Self::footprint(size);
        ram.memory()
            .write_slice(&vec![0u8; len as usize], GuestAddress(base))
            .map_err(other)?;
        let avail = base + DESC_SIZE * n;
        let used = align(avail + 6 + 2 * n, 4);
        let slots = align(used + 6 + 8 * n, SLOT_SIZE);
        Ok(SplitQueue {
            index,
            size,
            desc: base,
            avail,
            used,
            slots,
            next_avail: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            in_flight: vec![false; usize::from(size)],
            event_idx,
            kick: EventFd::new(EFD_CLOEXEC)?,
            call: EventFd::new(EFD_CLOEXEC)?,
        })
    }

    /// Queue index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest address of descriptor `id`'s buffer slot.
    pub fn slot(&self, id: u16) -> u64 {
        self.slots + SLOT_SIZE * u64::from(id)
    }

    /// Free descriptors.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// The kick eventfd (the VMM's ioeventfd for this queue).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The call eventfd (the VMM's irqfd for this queue).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Ring addresses for SET_VRING_ADDR (host addresses in this process).
    ///
    /// # Errors
    ///
    /// The rings are outside the RAM (cannot happen after `new`).
    pub fn config_data(&self, ram: &GuestRam) -> io::Result<VringConfigData> {
        Ok(VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: ram.host_addr(self.desc)?,
            used_ring_addr: ram.host_addr(self.used)?,
            avail_ring_addr: ram.host_addr(self.avail)?,
            log_addr: None,
        })
    }

    /// Take `n` free descriptors (the first is the chain head).
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u16>> {
        if n == 0 || n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        Some(self.free.split_off(at).into_iter().rev().collect())
    }

    /// Write descriptors `ids` for `bufs` (same length), chain them and make the chain
    /// available. Returns the head. Does not kick.
    ///
    /// # Errors
    ///
    /// Length mismatch or a guest memory error.
    pub fn publish(&mut self, ram: &GuestRam, ids: &[u16], bufs: &[Buf]) -> io::Result<u16> {
        if ids.is_empty() || ids.len() != bufs.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "one descriptor per buffer",
            ));
        }
        let m = ram.memory();
        for (i, (&id, b)) in ids.iter().zip(bufs).enumerate() {
            let next = ids.get(i + 1).copied();
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 } as u16;
            if next.is_some() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let at = self.desc + DESC_SIZE * u64::from(id);
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&b.addr.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
            m.write_slice(&d, GuestAddress(at)).map_err(other)?;
            if let Some(f) = self.in_flight.get_mut(usize::from(id)) {
                *f = true;
            }
        }
        let head = ids[0];
        let ring = self.avail + 4 + 2 * u64::from(self.next_avail % self.size);
        m.write_obj(head, GuestAddress(ring)).map_err(other)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // Descriptors and ring entry before the index (virtio 1.2 §2.7.13).
        fence(Ordering::SeqCst);
        m.store(
            self.next_avail,
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )
        .map_err(other)?;
        Ok(head)
    }

    /// The avail index published so far.
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// Kick if the device asked for it since avail index `old` (EVENT_IDX `avail_event`, or
    /// the used ring's NO_NOTIFY flag). Returns whether it kicked.
    ///
    /// # Errors
    ///
    /// Guest memory or eventfd error.
    pub fn kick_since(&self, ram: &GuestRam, old: u16) -> io::Result<bool> {
        fence(Ordering::SeqCst);
        let m = ram.memory();
        let need = if self.event_idx {
            let at = self.used + 4 + 8 * u64::from(self.size);
            let avail_event: u16 = m.load(GuestAddress(at), Ordering::Acquire).map_err(other)?;
            let new = self.next_avail;
            new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = m
                .load(GuestAddress(self.used), Ordering::Acquire)
                .map_err(other)?;
            u32::from(flags) & VRING_USED_F_NO_NOTIFY == 0
        };
        if need {
            self.kick.write(1)?;
        }
        Ok(need)
    }

    /// Take the next used entry `(head, len)` and free its chain.
    ///
    /// # Errors
    ///
    /// Guest memory error, or the device returned a head that is not in flight.
    pub fn pop_used(&mut self, ram: &GuestRam) -> io::Result<Option<(u16, u32)>> {
        let m = ram.memory();
        let idx: u16 = m
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .map_err(other)?;
        if idx == self.last_used {
            return Ok(None);
        }
        let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = m.read_obj(GuestAddress(at)).map_err(other)?;
        let len: u32 = m.read_obj(GuestAddress(at + 4)).map_err(other)?;
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            let used_event = self.avail + 4 + 2 * u64::from(self.size);
            m.store(self.last_used, GuestAddress(used_event), Ordering::Release)
                .map_err(other)?;
        }
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| self.in_flight.get(usize::from(h)) == Some(&true))
            .ok_or_else(|| other(format!("queue {}: bogus used id {id}", self.index)))?;
        // Free the chain.
        let mut cur = head;
        for _ in 0..self.size {
            if let Some(f) = self.in_flight.get_mut(usize::from(cur)) {
                *f = false;
            }
            self.free.push(cur);
            let d = self.desc + DESC_SIZE * u64::from(cur);
            let flags: u16 = m.read_obj(GuestAddress(d + 12)).map_err(other)?;
            if u32::from(flags) & VRING_DESC_F_NEXT == 0 {
                break;
            }
            cur = m.read_obj(GuestAddress(d + 14)).map_err(other)?;
        }
        Ok(Some((head, len)))
    }

    /// Set the avail ring's flags (bit 0: VRING_AVAIL_F_NO_INTERRUPT).
    ///
    /// # Errors
    ///
    /// Guest memory error.
    pub fn set_avail_flags(&self, ram: &GuestRam, flags: u16) -> io::Result<()> {
        ram.memory()
            .store(flags, GuestAddress(self.avail), Ordering::Release)
            .map_err(other)
    }

    /// Set the avail ring's `used_event` (EVENT_IDX: signal once the used index passes it).
    /// [`pop_used`](Self::pop_used) sets it to the next used index.
    ///
    /// # Errors
    ///
    /// Guest memory error.
    pub fn set_used_event(&self, ram: &GuestRam, used_event: u16) -> io::Result<()> {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        ram.memory()
            .store(used_event, GuestAddress(at), Ordering::Release)
            .map_err(other)
    }

    /// The next used index the driver expects.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Signals received on the call fd since the last call (non-blocking).
    ///
    /// # Errors
    ///
    /// poll or read failed.
    pub fn take_calls(&self) -> io::Result<u64> {
        if wait_readable(&self.call, Duration::ZERO)? {
            self.call.read()
        } else {
            Ok(0)
        }
    }

    /// Wait up to `timeout` for call signals; returns their count (0 on timeout).
    ///
    /// # Errors
    ///
    /// poll or read failed.
    pub fn wait_calls(&self, timeout: Duration) -> io::Result<u64> {
        if wait_readable(&self.call, timeout)? {
            self.call.read()
        } else {
            Ok(0)
        }
    }
}

/// Wait until `fd` is readable or `timeout` passes (`Duration::MAX`: forever).
///
/// # Errors
///
/// poll failed.
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now().checked_add(timeout);
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
        };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n > 0);
    }
}

/// How a [`Driver`] sets up its queues.
#[derive(Clone, Copy, Debug)]
pub struct DriverConfig {
    /// Entries per queue (a power of two, at most the backend's queue size).
    pub queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Guest address where the queues are laid out, one after the other; a scratch page for
    /// hand-made buffers follows them ([`Driver::scratch`]).
    pub base: u64,
    /// How long helpers wait for the device.
    pub timeout: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            queue_size: 64,
            event_idx: false,
            base: 0x10_0000,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A connected driver: frontend, RAM and every queue of the device.
pub struct Driver {
    frontend: Frontend,
    ram: Arc<GuestRam>,
    queues: Vec<SplitQueue>,
    config: ConfigSpace,
    features: u64,
    scratch: u64,
    timeout: Duration,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("config", &self.config)
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Connect to the backend socket at `path` and bring the device up: features, protocol
    /// features, config, memory table, and every queue started and enabled.
    ///
    /// # Errors
    ///
    /// Any vhost-user request failed, or the device does not fit in `ram`.
    pub fn connect(path: &Path, ram: Arc<GuestRam>, cfg: &DriverConfig) -> io::Result<Driver> {
        let mut fe = Frontend::connect(path, 64).map_err(other)?;
        fe.set_owner().map_err(other)?;
        let offered = fe.get_features().map_err(other)?;
        let mut want =
            (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if cfg.event_idx {
            want |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        let features = want & offered;
        fe.set_features(features).map_err(other)?;
        let pf = fe.get_protocol_features().map_err(other)?;
        let acked = pf
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_protocol_features(acked).map_err(other)?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request waits for the backend's ack: when `connect` returns, every queue
            // is set up and enabled on the backend side.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let nq = usize::try_from(fe.get_queue_num().map_err(other)?).map_err(other)?;
        let (_, bytes) = fe
            .get_config(
                0,
                CONFIG_SIZE as u32,
                VhostUserConfigFlags::empty(),
                &[0; CONFIG_SIZE],
            )
            .map_err(other)?;
        let bytes: [u8; CONFIG_SIZE] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| other("short config space"))?;
        let config = ConfigSpace::from_bytes(&bytes);
        if nq != num_queues(config.num_upcalls) {
            return Err(other(format!(
                "{nq} queues for {} upcalls",
                config.num_upcalls
            )));
        }
        fe.set_mem_table(&[ram.region()?]).map_err(other)?;
        let step = SplitQueue::footprint(cfg.queue_size);
        let mut queues = Vec::with_capacity(nq);
        for i in 0..nq {
            let q = SplitQueue::new(
                &ram,
                i,
                cfg.queue_size,
                cfg.base + step * i as u64,
                cfg.event_idx,
            )?;
            fe.set_vring_num(i, cfg.queue_size).map_err(other)?;
            fe.set_vring_addr(i, &q.config_data(&ram)?).map_err(other)?;
            fe.set_vring_base(i, 0).map_err(other)?;
            fe.set_vring_call(i, &q.call).map_err(other)?;
            fe.set_vring_kick(i, &q.kick).map_err(other)?;
            queues.push(q);
        }
        // Event and doorbell queues first, the control queue last.
        for i in (0..nq).rev() {
            fe.set_vring_enable(i, true).map_err(other)?;
        }
        let scratch = cfg.base + step * nq as u64;
        if scratch + EVTCHN_PAGE_SIZE as u64 > ram.size() {
            return Err(other("the queues do not fit in guest RAM"));
        }
        Ok(Driver {
            frontend: fe,
            ram,
            queues,
            config,
            features,
            scratch,
            timeout: cfg.timeout,
        })
    }

    /// The device's config space.
    pub fn config(&self) -> ConfigSpace {
        self.config
    }

    /// The negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The vhost-user frontend, for raw requests.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Queue `index`, if the device has it.
    pub fn queue(&mut self, index: usize) -> Option<&mut SplitQueue> {
        self.queues.get_mut(index)
    }

    /// A 4 KiB scratch page after the queues, for hand-made buffers.
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    fn q(&mut self, index: usize) -> io::Result<&mut SplitQueue> {
        self.queues
            .get_mut(index)
            .ok_or_else(|| other(format!("no queue {index}")))
    }

    /// Post a hand-made chain on queue `index` and kick. Returns the head.
    ///
    /// # Errors
    ///
    /// No free descriptors, or a memory / eventfd error.
    pub fn post(&mut self, index: usize, bufs: &[Buf]) -> io::Result<u16> {
        let ram = Arc::clone(&self.ram);
        let q = self.q(index)?;
        let ids = q
            .alloc(bufs.len())
            .ok_or_else(|| other("no free descriptors"))?;
        let old = q.avail_idx();
        let head = q.publish(&ram, &ids, bufs)?;
        q.kick_since(&ram, old)?;
        Ok(head)
    }

    /// Wait for the next used entry of queue `index`, polling the used ring and waiting on the
    /// call fd (whose signals are consumed).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::TimedOut`] after the driver's timeout, or a memory error.
    pub fn wait_used(&mut self, index: usize) -> io::Result<(u16, u32)> {
        let ram = Arc::clone(&self.ram);
        let deadline = Instant::now() + self.timeout;
        loop {
            let q = self.q(index)?;
            if let Some(u) = q.pop_used(&ram)? {
                return Ok(u);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("queue {index}: no used buffer"),
                ));
            }
            // Short waits: the device may have suppressed the signal (NO_INTERRUPT).
            q.wait_calls(left.min(Duration::from_millis(20)))?;
        }
    }

    /// Send control requests (as many per kick as the queue holds) and return their replies
    /// in order.
    ///
    /// # Errors
    ///
    /// Timeout, or a chain came back without a full reply.
    pub fn control_batch(&mut self, reqs: &[Request]) -> io::Result<Vec<Reply>> {
        let ram = Arc::clone(&self.ram);
        let mut replies = Vec::with_capacity(reqs.len());
        let per_batch = usize::from(self.q(CONTROL_QUEUE)?.size() / 2).max(1);
        for batch in reqs.chunks(per_batch) {
            let q = self.q(CONTROL_QUEUE)?;
            let old = q.avail_idx();
            let mut heads = Vec::with_capacity(batch.len());
            for r in batch {
                let ids = q.alloc(2).ok_or_else(|| other("no free descriptors"))?;
                let slot = q.slot(ids[0]);
                ram.memory()
                    .write_slice(&r.to_bytes(), GuestAddress(slot))
                    .map_err(other)?;
                ram.memory()
                    .write_slice(&[0xff; REPLY_SIZE], GuestAddress(slot + 32))
                    .map_err(other)?;
                let bufs = [
                    Buf {
                        addr: slot,
                        len: REQUEST_SIZE as u32,
                        write: false,
                    },
                    Buf {
                        addr: slot + 32,
                        len: REPLY_SIZE as u32,
                        write: true,
                    },
                ];
                heads.push(q.publish(&ram, &ids, &bufs)?);
            }
            q.kick_since(&ram, old)?;
            let mut got = std::collections::HashMap::new();
            while got.len() < heads.len() {
                let (head, len) = self.wait_used(CONTROL_QUEUE)?;
                got.insert(head, len);
            }
            let q = self.q(CONTROL_QUEUE)?;
            for head in heads {
                if got.get(&head) != Some(&(REPLY_SIZE as u32)) {
                    return Err(other(format!("control chain {head}: no reply")));
                }
                let mut b = [0u8; REPLY_SIZE];
                ram.memory()
                    .read_slice(&mut b, GuestAddress(q.slot(head) + 32))
                    .map_err(other)?;
                replies.push(Reply::from_bytes(&b));
            }
        }
        Ok(replies)
    }

    /// Send one control request and return its reply.
    ///
    /// # Errors
    ///
    /// As [`control_batch`](Self::control_batch).
    pub fn control(&mut self, req: Request) -> io::Result<Reply> {
        self.control_batch(&[req])?
            .pop()
            .ok_or_else(|| other("no reply"))
    }

    /// Register the event-channel page at guest address `page` and bind each `(port, upcall)`
    /// of `binds`, in one control batch.
    ///
    /// # Errors
    ///
    /// As [`control_batch`](Self::control_batch); a request the device refuses is an error
    /// naming it and the reply.
    pub fn register_and_bind(&mut self, page: u64, binds: &[(u32, u16)]) -> io::Result<()> {
        let mut reqs = vec![Request::new(Op::RegisterPage, 0, page)];
        reqs.extend(
            binds
                .iter()
                .map(|&(p, v)| Request::new(Op::Bind, p, u64::from(v))),
        );
        for (q, r) in reqs.iter().zip(self.control_batch(&reqs)?) {
            if r != Reply::new(Status::Ok, 0) {
                return Err(other(format!("control request {q:?} failed: {r:?}")));
            }
        }
        Ok(())
    }

    /// Post `n` buffers of `len` bytes on the event queue of `upcall` and kick if needed.
    ///
    /// # Errors
    ///
    /// Not enough free descriptors, or a memory / eventfd error.
    pub fn post_event_buffers(&mut self, upcall: u16, n: usize, len: u32) -> io::Result<()> {
        let ram = Arc::clone(&self.ram);
        let q = self.q(event_queue(upcall))?;
        let old = q.avail_idx();
        for _ in 0..n {
            let ids = q.alloc(1).ok_or_else(|| other("no free descriptors"))?;
            ram.memory()
                .write_slice(&[0u8; 8], GuestAddress(q.slot(ids[0])))
                .map_err(other)?;
            let buf = Buf {
                addr: q.slot(ids[0]),
                len,
                write: true,
            };
            q.publish(&ram, &ids, &[buf])?;
        }
        q.kick_since(&ram, old)?;
        Ok(())
    }

    /// Take the next used buffer of the event queue of `upcall`: `(record, used length)`.
    ///
    /// # Errors
    ///
    /// Memory error.
    pub fn pop_record(&mut self, upcall: u16) -> io::Result<Option<(UpcallRecord, u32)>> {
        let ram = Arc::clone(&self.ram);
        let q = self.q(event_queue(upcall))?;
        let Some((head, len)) = q.pop_used(&ram)? else {
            return Ok(None);
        };
        let mut b = [0u8; 8];
        ram.memory()
            .read_slice(&mut b, GuestAddress(q.slot(head)))
            .map_err(other)?;
        Ok(Some((UpcallRecord::from_bytes(&b), len)))
    }

    /// Ring the doorbell for `ports` (at most 16) in one chain. Used doorbell buffers are
    /// reclaimed first; waits (polling) for one if the queue is full.
    ///
    /// # Errors
    ///
    /// More than 16 ports, timeout, or a memory / eventfd error.
    pub fn doorbell(&mut self, ports: &[u32]) -> io::Result<()> {
        if ports.is_empty() || ports.len() as u64 * 4 > SLOT_SIZE {
            return Err(other("1 to 16 ports per doorbell"));
        }
        let ram = Arc::clone(&self.ram);
        let deadline = Instant::now() + self.timeout;
        let q = self.q(DOORBELL_QUEUE)?;
        loop {
            while q.pop_used(&ram)?.is_some() {}
            if q.num_free() > 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "doorbell queue full",
                ));
            }
            std::thread::yield_now();
        }
        let ids = q.alloc(1).ok_or_else(|| other("no free descriptors"))?;
        let slot = q.slot(ids[0]);
        let bytes: Vec<u8> = ports.iter().flat_map(|p| p.to_le_bytes()).collect();
        ram.memory()
            .write_slice(&bytes, GuestAddress(slot))
            .map_err(other)?;
        let old = q.avail_idx();
        q.publish(
            &ram,
            &ids,
            &[Buf {
                addr: slot,
                len: bytes.len() as u32,
                write: false,
            }],
        )?;
        q.kick_since(&ram, old)?;
        Ok(())
    }

    /// Signals on queue `index`'s call fd since the last look (non-blocking).
    ///
    /// # Errors
    ///
    /// No such queue, or poll / read failed.
    pub fn take_calls(&mut self, index: usize) -> io::Result<u64> {
        self.q(index)?.take_calls()
    }
}

/// A non-blocking eventfd, for harness signalling.
///
/// # Errors
///
/// eventfd(2) failed.
pub fn nonblocking_eventfd() -> io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_words_and_region() {
        let ram = GuestRam::new(0x4000).unwrap();
        assert!(GuestRam::new(100).is_err());
        let w = ram.words(0x1000).unwrap();
        w[1].store(0x55, Ordering::SeqCst);
        let v: u64 = ram.memory().read_obj(GuestAddress(0x1008)).unwrap();
        assert_eq!(v, 0x55);
        assert!(ram.words(0x1004).is_none());
        assert!(ram.words(0x3008).is_none());
        assert!(ram.words(0x3000).is_some());
        let r = ram.region().unwrap();
        assert_eq!((r.guest_phys_addr, r.memory_size), (0, 0x4000));
        assert_eq!(r.userspace_addr, ram.host_addr(0).unwrap());
    }

    #[test]
    fn split_queue_layout_and_chains() {
        let ram = GuestRam::new(0x10000).unwrap();
        assert_eq!(SplitQueue::footprint(64) % 4096, 0);
        let mut q = SplitQueue::new(&ram, 3, 8, 0x1000, false).unwrap();
        assert_eq!(q.slot(1) - q.slot(0), SLOT_SIZE);
        let ids = q.alloc(2).unwrap();
        assert_eq!(q.num_free(), 6);
        let bufs = [
            Buf {
                addr: 0x8000,
                len: 16,
                write: false,
            },
            Buf {
                addr: 0x8010,
                len: 8,
                write: true,
            },
        ];
        let head = q.publish(&ram, &ids, &bufs).unwrap();
        assert_eq!(head, ids[0]);
        let m = ram.memory();
        let idx: u16 = m.read_obj(GuestAddress(q.avail + 2)).unwrap();
        assert_eq!(idx, 1);
        let ring0: u16 = m.read_obj(GuestAddress(q.avail + 4)).unwrap();
        assert_eq!(ring0, head);
        let flags: u16 = m
            .read_obj(GuestAddress(q.desc + 16 * u64::from(head) + 12))
            .unwrap();
        assert_eq!(u32::from(flags), VRING_DESC_F_NEXT);
        // Pretend the device used it.
        assert_eq!(q.pop_used(&ram).unwrap(), None);
        m.write_obj(u32::from(head), GuestAddress(q.used + 4))
            .unwrap();
        m.write_obj(8u32, GuestAddress(q.used + 8)).unwrap();
        m.write_obj(1u16, GuestAddress(q.used + 2)).unwrap();
        assert_eq!(q.pop_used(&ram).unwrap(), Some((head, 8)));
        assert_eq!(q.num_free(), 8);
        // A bogus id is an error, not a panic.
        m.write_obj(77u32, GuestAddress(q.used + 12)).unwrap();
        m.write_obj(2u16, GuestAddress(q.used + 2)).unwrap();
        assert!(q.pop_used(&ram).is_err());
        // Kick decision without EVENT_IDX follows NO_NOTIFY.
        assert!(q.kick_since(&ram, 0).unwrap());
        assert_eq!(q.kick_fd().read().unwrap(), 1);
        m.write_obj(1u16, GuestAddress(q.used)).unwrap();
        assert!(!q.kick_since(&ram, 0).unwrap());
    }
}
