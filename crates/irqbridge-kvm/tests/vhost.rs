// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Attaching the real irqbridge vhost-user backend (in-process `Server`) to a KVM VM with
//! `VhostUserAttachment`. No guest code runs: the host plays the guest driver by writing the
//! virtqueues into the shared RAM file, stands in for KVM's ioeventfd by writing the kick
//! eventfd, and observes the MSIs the backend's call signals inject in a (never run) vCPU's
//! LAPIC IRR.

mod common;

use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{irr_has, poll_until, vcpu_with_lapic, vm};
use irqbridge_kvm::mmap::RegionMapping;
use irqbridge_kvm::routing::{GsiRouter, IrqChip, Route, SharedGsiRouter};
use irqbridge_kvm::vhost::{
    Datamatch, Error, GuestRam, KickConfig, Msi, QueueConfig, VIRTIO_F_VERSION_1,
    VhostAttachConfig, VhostUserAttachment,
};
use irqbridge_vhost_user::abi::{
    CONFIG_SIZE, ConfigSpace, Op, REPLY_SIZE, Reply, Request, Status, UpcallRecord,
};
use irqbridge_vhost_user::{BackendConfig, ConnId, Server};
use kvm_ioctls::{IoEventAddress, VcpuFd, VmFd};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const RAM_SIZE: u64 = 1 << 20;
const NOTIFY: u64 = 0xd000_0000;
const PAGE: u64 = 0x8000;
const QSIZE: u16 = 16;
const LAPIC_MSI: u64 = 0xfee0_0000;
const CONTROL_VECTOR: u8 = 0x41;
const EVENT_VECTOR: u8 = 0x42;
/// Default routes of the full irqchip (IOAPIC 24, PIC master 7, PIC slave 8).
const DEFAULT_ROUTES: usize = 39;

/// Forget every requested interrupt (as if the guest had taken them).
fn clear_irr(vcpu: &VcpuFd) {
    let mut lapic = vcpu.get_lapic().expect("KVM_GET_LAPIC");
    for b in &mut lapic.regs[0x200..0x280] {
        *b = 0;
    }
    vcpu.set_lapic(&lapic).expect("KVM_SET_LAPIC");
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "irqbridge-kvm-vhost-{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Guest RAM: a memfd mapped shared in this process with the plugin's own mapping type (its
/// address goes into the memory table); the test reads and writes it through the file, which
/// is coherent with every mapping of it.
struct Ram {
    file: File,
    map: RegionMapping,
}

impl Ram {
    fn new() -> Ram {
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"vhost-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0, "memfd_create");
        // SAFETY: a fresh descriptor nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        file.set_len(RAM_SIZE).unwrap();
        let map = RegionMapping::new(file.as_fd(), 0, 0, 0, RAM_SIZE, true).expect("mmap");
        Ram { file, map }
    }

    fn region(&self) -> GuestRam<'_> {
        GuestRam {
            gpa: 0,
            size: RAM_SIZE,
            fd: self.file.as_fd(),
            file_offset: 0,
            host_addr: self.map.host_addr(),
        }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        self.file.write_all_at(bytes, gpa).unwrap();
    }

    fn read<const N: usize>(&self, gpa: u64) -> [u8; N] {
        let mut b = [0u8; N];
        self.file.read_exact_at(&mut b, gpa).unwrap();
        b
    }

    fn u16(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa))
    }

    fn u64(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.read(gpa))
    }
}

/// Driver side of a split queue of `QSIZE` entries in one page: descriptors at +0, avail ring
/// at +0x100, used ring at +0x200, 64-byte buffer slots at +0x400. Descriptors are never
/// reused (the tests post fewer than `QSIZE`).
struct Ring {
    index: u16,
    base: u64,
    next_desc: u16,
    avail: u16,
}

impl Ring {
    fn new(index: u16) -> Ring {
        Ring {
            index,
            base: 0x10000 + 0x1000 * u64::from(index),
            next_desc: 0,
            avail: 0,
        }
    }

    fn avail_gpa(&self) -> u64 {
        self.base + 0x100
    }

    fn used_gpa(&self) -> u64 {
        self.base + 0x200
    }

    fn slot(&self, id: u16) -> u64 {
        self.base + 0x400 + 64 * u64::from(id)
    }

    fn config(&self, kick: bool, msi: Option<u8>) -> QueueConfig {
        QueueConfig {
            index: self.index,
            size: QSIZE,
            desc_gpa: self.base,
            avail_gpa: self.avail_gpa(),
            used_gpa: self.used_gpa(),
            base: 0,
            kick: kick.then_some(KickConfig {
                mmio_gpa: NOTIFY + 4 * u64::from(self.index),
                datamatch: Some(Datamatch::U32(u32::from(self.index))),
            }),
            msi: msi.map(|v| Msi {
                address: LAPIC_MSI,
                data: u32::from(v),
            }),
        }
    }

    /// Post a chain of `(len, device-writable)` buffers, each in its descriptor's slot.
    /// Returns the head.
    fn post(&mut self, ram: &Ram, bufs: &[(u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(len, write)) in bufs.iter().enumerate() {
            let id = self.next_desc;
            self.next_desc += 1;
            let last = i + 1 == bufs.len();
            let flags: u16 = if write { 2 } else { 0 } | if last { 0 } else { 1 };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&self.slot(id).to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&(id + 1).to_le_bytes());
            ram.write(self.base + 16 * u64::from(id), &d);
        }
        let entry = self.avail_gpa() + 4 + 2 * u64::from(self.avail % QSIZE);
        ram.write(entry, &head.to_le_bytes());
        self.avail += 1;
        ram.write(self.avail_gpa() + 2, &self.avail.to_le_bytes());
        head
    }

    fn used_idx(&self, ram: &Ram) -> u16 {
        ram.u16(self.used_gpa() + 2)
    }

    /// Used entry `n`: (id, len).
    fn used(&self, ram: &Ram, n: u16) -> (u32, u32) {
        let at = self.used_gpa() + 4 + 8 * u64::from(n % QSIZE);
        let b: [u8; 8] = ram.read(at);
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    }
}

/// The backend on one socket in a private directory; stopped on drop.
struct Backend {
    server: Option<Server>,
    dir: PathBuf,
    path: PathBuf,
}

impl Backend {
    fn start(name: &str) -> Backend {
        let dir = temp_dir(name);
        let path = dir.join("vu.sock");
        let server = Server::start(BackendConfig {
            sockets: vec![path.clone()],
            ports: 64,
            upcalls: 1,
            ..BackendConfig::default()
        })
        .expect("start the vhost-user backend");
        Backend {
            server: Some(server),
            dir,
            path,
        }
    }

    fn api(&self) -> &irqbridge_vhost_user::Backend {
        self.server.as_ref().unwrap().backend()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop_handle().stop();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Setup {
    vm: Arc<VmFd>,
    router: SharedGsiRouter,
    ram: Ram,
    rings: Vec<Ring>,
}

fn setup() -> Option<Setup> {
    let vm = vm(IrqChip::Full)?;
    let router = GsiRouter::new_shared(vm.clone(), IrqChip::Full);
    Some(Setup {
        vm,
        router,
        ram: Ram::new(),
        rings: (0..3).map(Ring::new).collect(),
    })
}

impl Setup {
    /// Control (kick, MSI 0x41), doorbell (kick, no MSI), event queue 0 (kick, MSI 0x42).
    fn config(&self) -> VhostAttachConfig<'_> {
        VhostAttachConfig {
            guest_ram: vec![self.ram.region()],
            queues: vec![
                self.rings[0].config(true, Some(CONTROL_VECTOR)),
                self.rings[1].config(true, None),
                self.rings[2].config(true, Some(EVENT_VECTOR)),
            ],
            timeout: Duration::from_secs(5),
            ..VhostAttachConfig::default()
        }
    }

    fn attach(&self, path: &Path) -> VhostUserAttachment {
        VhostUserAttachment::attach(self.vm.clone(), self.router.clone(), path, self.config())
            .expect("attach")
    }

    /// A control request through the control queue; waits for its used entry.
    fn control(&mut self, att: &VhostUserAttachment, req: Request) -> Reply {
        let ring = &mut self.rings[0];
        let head = ring.post(&self.ram, &[(16, false), (REPLY_SIZE as u32, true)]);
        self.ram.write(ring.slot(head), &req.to_bytes());
        let n = ring.avail - 1;
        // What KVM does for the guest's notify write.
        att.kick(0).unwrap();
        let ram = &self.ram;
        poll_until("the control reply", || ring.used_idx(ram) > n);
        assert_eq!(ring.used(ram, n), (u32::from(head), REPLY_SIZE as u32));
        Reply::from_bytes(&ram.read(ring.slot(head + 1)))
    }
}

fn kvm_errno<T: std::fmt::Debug>(r: Result<T, vmm_sys_util::errno::Error>) -> i32 {
    r.expect_err("the ioctl should fail").errno()
}

#[test]
fn attach_wires_kicks_and_calls_into_kvm() {
    let Some(mut s) = setup() else { return };
    let backend = Backend::start("wiring");
    let vcpu = vcpu_with_lapic(&s.vm);
    let att = s.attach(&backend.path);

    // Negotiation.
    assert_eq!(att.features() & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
    assert_ne!(att.features() & (1 << 30), 0, "PROTOCOL_FEATURES acked");
    assert_eq!(att.features() & (1 << 29), 0, "EVENT_IDX not asked for");
    let pf = att.protocol_features();
    assert!(pf.contains(
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
    ));
    assert_eq!(att.queue_num(), Some(3));

    // GET_CONFIG passthrough.
    let mut cfg = [0u8; CONFIG_SIZE];
    att.config_read(0, &mut cfg).unwrap();
    let cfg = ConfigSpace::from_bytes(&cfg);
    assert_eq!((cfg.num_ports, cfg.num_upcalls), (64, 1));
    let mut two = [0u8; 2];
    att.config_read(4, &mut two).unwrap();
    assert_eq!(u16::from_le_bytes(two), 1);
    assert!(matches!(
        att.config_read(0, &mut []),
        Err(Error::InvalidArgument(_))
    ));

    // Routes: one MSI route per queue with a vector, committed, none for the doorbell queue.
    let control_gsi = att.gsi(0).expect("control GSI");
    let event_gsi = att.gsi(2).expect("event GSI");
    assert_eq!(att.gsi(1), None);
    assert!(control_gsi >= 24 && event_gsi >= 24 && control_gsi != event_gsi);
    {
        let r = s.router.lock().unwrap();
        assert!(!r.is_dirty(), "routes committed");
        assert_eq!(r.route_count(), DEFAULT_ROUTES + 2);
        for (gsi, vector) in [(control_gsi, CONTROL_VECTOR), (event_gsi, EVENT_VECTOR)] {
            assert_eq!(
                r.routes(gsi),
                &[Route::Msi {
                    address: LAPIC_MSI,
                    data: u32::from(vector),
                    devid: None
                }]
            );
        }
    }

    // Kicks are KVM ioeventfds: the same address, length and datamatch collides; another
    // datamatch on the same address does not.
    for q in 0..3u32 {
        let other = EventFd::new(EFD_NONBLOCK).unwrap();
        let addr = IoEventAddress::Mmio(NOTIFY + 4 * u64::from(q));
        assert_eq!(
            kvm_errno(s.vm.register_ioevent(&other, &addr, q)),
            libc::EEXIST,
            "queue {q}"
        );
        s.vm.register_ioevent(&other, &addr, q + 100).unwrap();
        s.vm.unregister_ioevent(&other, &addr, q + 100).unwrap();
    }
    assert!(att.queue_infos().iter().all(|q| q.ioeventfd && q.started));

    // Calls are irqfds: the same eventfd cannot become an irqfd again.
    let control_call = att.call_notifier(0).unwrap();
    let event_call = att.call_notifier(2).unwrap();
    assert_eq!(
        kvm_errno(s.vm.register_irqfd(&control_call, control_gsi)),
        libc::EBUSY
    );
    assert_eq!(
        kvm_errno(s.vm.register_irqfd(&event_call, event_gsi)),
        libc::EBUSY
    );

    // Control queue: the backend completes, its call is an MSI in the LAPIC.
    assert!(!irr_has(&vcpu, CONTROL_VECTOR));
    let r = s.control(&att, Request::new(Op::RegisterPage, 0, PAGE));
    assert_eq!(r.status(), Some(Status::Ok));
    poll_until("the control MSI", || irr_has(&vcpu, CONTROL_VECTOR));
    let r = s.control(&att, Request::new(Op::Bind, 5, 0));
    assert_eq!(r.status(), Some(Status::Ok));
    assert!(!irr_has(&vcpu, EVENT_VECTOR));

    // Event queue: an event from the backend API is one record and one MSI.
    for _ in 0..4 {
        s.rings[2].post(&s.ram, &[(8, true)]);
    }
    att.kick(2).unwrap();
    let api = backend.api();
    assert_eq!(
        api.send(ConnId(0), 5).unwrap(),
        irqbridge_core::SendOutcome::Upcall { vector: 0 }
    );
    let ram = &s.ram;
    poll_until("the upcall record", || s.rings[2].used_idx(ram) == 1);
    let (id, len) = s.rings[2].used(ram, 0);
    assert_eq!(len, 8);
    let rec = UpcallRecord::from_bytes(&ram.read(s.rings[2].slot(id as u16)));
    assert_eq!((rec.upcall, rec.seq), (0, 1));
    poll_until("the event MSI", || irr_has(&vcpu, EVENT_VECTOR));
    assert_eq!(ram.u64(PAGE) & (1 << 5), 1 << 5, "pending bit in the page");

    // Doorbell queue without a vector: the VMM polls its call eventfd. Port 5 has no link,
    // the chain is still returned and signalled.
    let door_call = att.call_notifier(1).unwrap();
    assert!(door_call.read().is_err(), "not signalled yet");
    let head = s.rings[1].post(&s.ram, &[(4, false)]);
    s.ram.write(s.rings[1].slot(head), &5u32.to_le_bytes());
    att.kick_notifier(1).unwrap().write(1).unwrap();
    poll_until("the doorbell call", || door_call.read().is_ok());
    assert_eq!(s.rings[1].used_idx(&s.ram), 1);
    let c = api.counters(ConnId(0)).unwrap();
    assert_eq!((c.doorbells, c.doorbell_errors), (1, 1));
    assert_eq!(c.control_requests, 2);

    // Masking the event vector: the next upcall's signal is held as pending, then delivered
    // once on unmask.
    clear_irr(&vcpu);
    // The guest's handler: clear the pending bit and the upcall block (0x400).
    s.ram.write(PAGE, &[0; 8]);
    s.ram.write(PAGE + 0x400, &[0; 16]);
    att.set_queue_masked(2, true).unwrap();
    assert_eq!(
        api.send(ConnId(0), 5).unwrap(),
        irqbridge_core::SendOutcome::Upcall { vector: 0 }
    );
    let ram = &s.ram;
    poll_until("the second record", || s.rings[2].used_idx(ram) == 2);
    let group = att.interrupt_group().expect("MSI group");
    poll_until("the masked signal to be pending", || {
        group.is_pending(1).unwrap()
    });
    assert!(!irr_has(&vcpu, EVENT_VECTOR));
    att.set_queue_masked(2, false).unwrap();
    poll_until("the event MSI after unmask", || {
        irr_has(&vcpu, EVENT_VECTOR)
    });
    assert!(!group.is_pending(1).unwrap());
    assert!(!irr_has(&vcpu, CONTROL_VECTOR), "nothing else fired");

    // Detach: rings stopped with their next avail indices, KVM side undone.
    let mut stopped = att.detach().unwrap();
    stopped.sort_by_key(|q| q.index);
    let bases: Vec<(u16, u16)> = stopped.iter().map(|q| (q.index, q.next_avail)).collect();
    assert_eq!(bases, [(0, 2), (1, 1), (2, 2)]);
    {
        let r = s.router.lock().unwrap();
        assert_eq!(r.route_count(), DEFAULT_ROUTES, "routes removed");
        assert!(r.routes(control_gsi).is_empty() && r.routes(event_gsi).is_empty());
        assert!(!r.is_dirty());
    }
    for q in 0..3u32 {
        let other = EventFd::new(EFD_NONBLOCK).unwrap();
        let addr = IoEventAddress::Mmio(NOTIFY + 4 * u64::from(q));
        s.vm.register_ioevent(&other, &addr, q).unwrap();
        s.vm.unregister_ioevent(&other, &addr, q).unwrap();
    }
    // The old call eventfds are no longer irqfds.
    s.vm.register_irqfd(&event_call, event_gsi).unwrap();
    s.vm.unregister_irqfd(&event_call, event_gsi).unwrap();
    poll_until("the backend to see the frontend go", || {
        !api.is_attached(ConnId(0)).unwrap()
    });
}

#[test]
fn attach_waits_for_the_socket_and_times_out() {
    let Some(s) = setup() else { return };
    let dir = temp_dir("late");
    let path = dir.join("vu.sock");

    // No socket at all: a Connect error after the (short) deadline.
    let start = Instant::now();
    let err = VhostUserAttachment::attach(
        s.vm.clone(),
        s.router.clone(),
        &path,
        VhostAttachConfig {
            timeout: Duration::from_millis(200),
            ..s.config()
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(s.router.lock().unwrap().route_count(), DEFAULT_ROUTES);

    // The backend binds its socket only after the frontend started waiting for it.
    let late_path = path.clone();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        Server::start(BackendConfig {
            sockets: vec![late_path],
            ports: 64,
            upcalls: 1,
            ..BackendConfig::default()
        })
        .unwrap()
    });
    let att = VhostUserAttachment::attach(s.vm.clone(), s.router.clone(), &path, s.config())
        .expect("attach once the socket appears");
    let server = starter.join().unwrap();
    assert_eq!(att.queue_num(), Some(3));
    att.detach().unwrap();
    server.stop_handle().stop();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_configurations_fail_cleanly() {
    let Some(s) = setup() else { return };
    let backend = Backend::start("bad");
    let attach = |cfg: VhostAttachConfig<'_>| {
        VhostUserAttachment::attach(s.vm.clone(), s.router.clone(), &backend.path, cfg).unwrap_err()
    };

    // Checked before connecting.
    let e = attach(VhostAttachConfig {
        protocol_features: VhostUserProtocolFeatures::BACKEND_REQ,
        ..s.config()
    });
    assert!(matches!(e, Error::UnsupportedProtocolFeatures(0x20)), "{e}");
    let mut cfg = s.config();
    cfg.queues[2].used_gpa = RAM_SIZE - 8;
    assert!(matches!(attach(cfg), Error::NotInRam { .. }));
    let mut cfg = s.config();
    cfg.queues[1].index = 0;
    assert!(matches!(attach(cfg), Error::InvalidQueue { index: 0, .. }));

    // Checked against the backend.
    let e = attach(VhostAttachConfig {
        required_features: VIRTIO_F_VERSION_1 | 1 << 40,
        ..s.config()
    });
    assert!(
        matches!(e, Error::MissingFeatures { missing, .. } if missing == 1 << 40),
        "{e}"
    );
    let mut cfg = s.config();
    cfg.queues.push(Ring::new(3).config(true, Some(0x43)));
    assert!(matches!(
        attach(cfg),
        Error::NoSuchQueue {
            index: 3,
            available: 3
        }
    ));

    // A queue larger than the backend accepts fails after the routes, irqfds and the first
    // queue's ioeventfd were set up: all of it is undone.
    let mut cfg = s.config();
    cfg.queues[1].size = 512;
    cfg.queues[1].avail_gpa = 0x30000;
    cfg.queues[1].used_gpa = 0x34000;
    cfg.queues[1].desc_gpa = 0x32000;
    let e = attach(cfg);
    assert!(matches!(e, Error::Vhost { .. }), "{e}");
    assert_eq!(s.router.lock().unwrap().route_count(), DEFAULT_ROUTES);
    let other = EventFd::new(EFD_NONBLOCK).unwrap();
    let addr = IoEventAddress::Mmio(NOTIFY);
    s.vm.register_ioevent(&other, &addr, 0u32).unwrap();
    s.vm.unregister_ioevent(&other, &addr, 0u32).unwrap();

    // The backend is still usable.
    let att = s.attach(&backend.path);
    assert!(att.queue_infos().iter().all(|q| q.started));
    att.detach().unwrap();
}
