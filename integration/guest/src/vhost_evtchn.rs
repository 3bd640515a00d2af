// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-evtchn`: the irqbridge virtio event-channel device (served by the irqbridge vhost-user
//! backend behind QEMU's `vhost-user-test-device-pci`), driven from userspace through vfio-pci.
//!
//! The device ABI is crates/irqbridge-vhost-user/src/abi.rs: queue 0 control (16-byte request
//! `op u32, port u32, arg u64` + 8-byte device-written reply `status u32, value u32`), queue 1
//! doorbell (a readable list of u32 port numbers), queue 2 + v the event queue of upcall v
//! (one 8-byte record `upcall u16, flags u16, seq u32` per upcall); config space `num_ports u32,
//! num_upcalls u16, abi_version u16, features u64, virtio_id u16`. The event-channel page is a
//! 4 KiB page of guest memory with the layout of device-abi.md (pending bits at 0x000, mask bits
//! at 0x200, upcall block v at 0x400 + 16v).
//!
//! Interrupts are INTx through VFIO: QEMU's generic vhost-user PCI proxy has a single MSI-X
//! vector, and this driver leaves MSI-X off, as the kernel's virtio-pci driver does for such a
//! device. One eventfd counts the interrupts; each is acknowledged by reading the ISR byte
//! (which lowers the line) and VFIO_DEVICE_SET_IRQS(UNMASK). The control and doorbell queues
//! set VRING_AVAIL_F_NO_INTERRUPT and are polled, so every interrupt is an upcall and the
//! counts are exact.
//!
//! Events come from the guest itself: the backend links sender ports with the bound ports
//! ([`LINKS`], `--link S:R`), so a SEND request or a doorbell on S is an event on R. The
//! backend processes a control request synchronously: the upcall record of a SEND is in the
//! event queue before the SEND's reply is, which makes "no upcall" checkable without a sleep.

use crate::evtchn::{Page, UPCALL};
use crate::report::{Error, Facts, Reporter, Result};
use crate::sys::EventFd;
use crate::vfio::{CMD_BUS_MASTER, CMD_MEMORY, IRQ_INTX, VfioDevice};
use crate::virtio::{self, Buf, SplitQueue, Transport};
use crate::{EVENT_TIMEOUT, Options, QUIET_TIMEOUT, bail, dma, pci};

/// Queue indices.
const CONTROL_QUEUE: u16 = 0;
const DOORBELL_QUEUE: u16 = 1;
const FIRST_EVENT_QUEUE: u16 = 2;

/// Control opcodes.
const OP_REGISTER_PAGE: u32 = 1;
const OP_BIND: u32 = 2;
const OP_UNMASK: u32 = 5;
const OP_STATUS: u32 = 6;
const OP_SEND: u32 = 7;

/// Reply statuses.
const ST_OK: u32 = 0;
const ST_UNKNOWN_OP: u32 = 2;
const ST_BAD_PORT: u32 = 3;
const ST_NOT_CONNECTED: u32 = 7;

/// STATUS value bits.
const PORT_CLOSED: u32 = 0;
const PORT_BOUND: u32 = 2;
const PORT_F_LINKED: u32 = 1 << 2;
const PORT_F_PENDING: u32 = 1 << 3;
const PORT_F_MASKED: u32 = 1 << 4;

/// Size of the device config space.
const CONFIG_SIZE: usize = 24;
/// ABI version in the config space.
const ABI_VERSION: u16 = 1;
/// Config feature bits: 2-level event channels, doorbell queue, SEND / links.
const EXPECTED_FEATURES: u64 = 0x7;

/// Upcalls the device must have (QEMU's `num_vqs` is 2 + this).
pub const UPCALLS: u16 = 1;
/// The upcall every port is bound to.
const UPCALL0: u16 = 0;

/// `(sender, receiver)`: the backend links each pair (`--link 1:5 --link 2:70 --link 3:700`);
/// receivers are bound to upcall 0 and sit in three different 64-port words.
pub const LINKS: [(u32, u32); 3] = [(1, 5), (2, 70), (3, 700)];
/// A port without a link.
const UNLINKED: u32 = 9;

/// Entries per queue (at most; the device may offer fewer).
const QUEUE_SIZE: u16 = 64;
/// Event buffers kept posted.
const EVENT_BUFFERS: usize = 16;
/// Bytes of an upcall record.
const RECORD_SIZE: u32 = 8;
/// Where the reply goes in a control chain's slot.
const REPLY_OFF: usize = 32;

/// The device, brought up and driven.
struct Dev<'a> {
    vfio: &'a VfioDevice,
    t: Transport<'a>,
    queues: Vec<SplitQueue>,
    intx: Option<EventFd>,
    page: Option<Page>,
    /// Interrupts counted on the INTx eventfd.
    interrupts: u64,
    /// ISR reads with the queue bit set.
    isr_queue: u64,
    /// ISR reads with the config bit set.
    isr_config: u64,
    /// Upcall records taken from the event queue.
    records: u64,
    /// `seq` of the last record.
    last_seq: u32,
}

impl Drop for Dev<'_> {
    fn drop(&mut self) {
        // Stop the device before its rings and the page are freed.
        let _ = self.t.reset();
        if self.intx.is_some() {
            let _ = self.vfio.disable_irq(IRQ_INTX);
        }
    }
}

fn le16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn le32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from(le32(b, off)) | (u64::from(le32(b, off + 4)) << 32)
}

/// A control request's bytes.
fn request(op: u32, port: u32, arg: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&op.to_le_bytes());
    b[4..8].copy_from_slice(&port.to_le_bytes());
    b[8..16].copy_from_slice(&arg.to_le_bytes());
    b
}

impl<'a> Dev<'a> {
    fn q(&mut self, i: u16) -> Result<&mut SplitQueue> {
        self.queues
            .get_mut(usize::from(i))
            .ok_or_else(|| Error::msg(format!("no queue {i}")))
    }

    fn page(&self) -> Result<&Page> {
        self.page
            .as_ref()
            .ok_or_else(|| Error::msg("no event-channel page yet"))
    }

    /// Notifies queue `i` unless the device asked not to be.
    fn kick(&mut self, i: u16) -> Result<()> {
        let q = self.q(i)?;
        if q.wants_notify()? {
            let off = q.notify_offset();
            self.t.notify(off, i)?;
        }
        Ok(())
    }

    /// Sends control requests in one batch (one notification) and returns `(status, value)`
    /// of each, in order. The control queue is polled.
    fn control_batch(&mut self, reqs: &[[u8; 16]]) -> Result<Vec<(u32, u32)>> {
        let q = self.q(CONTROL_QUEUE)?;
        let mut heads = Vec::with_capacity(reqs.len());
        for r in reqs {
            let ids = q.alloc(2)?;
            let head = ids[0];
            q.slot_write(head, 0, r)?;
            q.slot_write(head, REPLY_OFF, &[0xff; 8])?;
            let slot = q.slot_gpa(head);
            let bufs = [
                Buf {
                    addr: slot,
                    len: 16,
                    write: false,
                },
                Buf {
                    addr: slot + REPLY_OFF as u64,
                    len: 8,
                    write: true,
                },
            ];
            heads.push(q.publish(&ids, &bufs)?);
        }
        self.kick(CONTROL_QUEUE)?;
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        let mut lens = vec![None; heads.len()];
        while lens.iter().any(Option::is_none) {
            match self.q(CONTROL_QUEUE)?.pop_used()? {
                Some((head, len)) => match heads.iter().position(|&h| h == head) {
                    Some(i) => lens[i] = Some(len),
                    None => bail!("control queue returned chain {head}, which was not sent"),
                },
                None if std::time::Instant::now() >= deadline => {
                    bail!("control requests got no reply within {EVENT_TIMEOUT:?}")
                }
                None => std::thread::sleep(std::time::Duration::from_micros(200)),
            }
        }
        let q = self.q(CONTROL_QUEUE)?;
        let mut replies = Vec::with_capacity(heads.len());
        for (head, len) in heads.iter().zip(lens) {
            if len != Some(8) {
                bail!("control chain {head}: used length {len:?}, expected an 8-byte reply");
            }
            let mut b = [0u8; 8];
            q.slot_read(*head, REPLY_OFF, &mut b)?;
            replies.push((le32(&b, 0), le32(&b, 4)));
        }
        Ok(replies)
    }

    fn control(&mut self, op: u32, port: u32, arg: u64) -> Result<(u32, u32)> {
        self.control_batch(&[request(op, port, arg)])?
            .pop()
            .ok_or_else(|| Error::msg("no reply"))
    }

    /// A control request that must succeed; returns the reply's value.
    fn control_ok(&mut self, op: u32, port: u32, arg: u64) -> Result<u32> {
        let (st, v) = self.control(op, port, arg)?;
        if st != ST_OK {
            bail!("control op {op} port {port} arg {arg:#x}: status {st}, expected 0 (ok)");
        }
        Ok(v)
    }

    /// Posts `n` empty 8-byte device-writable buffers on the event queue and notifies.
    fn post_event_buffers(&mut self, n: usize) -> Result<()> {
        let q = self.q(FIRST_EVENT_QUEUE + UPCALL0)?;
        for _ in 0..n {
            let ids = q.alloc(1)?;
            q.slot_write(ids[0], 0, &[0u8; 8])?;
            let buf = Buf {
                addr: q.slot_gpa(ids[0]),
                len: RECORD_SIZE,
                write: true,
            };
            q.publish(&ids, &[buf])?;
        }
        self.kick(FIRST_EVENT_QUEUE + UPCALL0)
    }

    /// Rings the doorbell for `ports` with one chain; returns its head.
    fn doorbell(&mut self, ports: &[u32]) -> Result<u16> {
        let q = self.q(DOORBELL_QUEUE)?;
        let bytes: Vec<u8> = ports.iter().flat_map(|p| p.to_le_bytes()).collect();
        let ids = q.alloc(1)?;
        q.slot_write(ids[0], 0, &bytes)?;
        let buf = Buf {
            addr: q.slot_gpa(ids[0]),
            len: u32::try_from(bytes.len()).map_err(|_| Error::msg("too many ports"))?,
            write: false,
        };
        let head = q.publish(&ids, &[buf])?;
        self.kick(DOORBELL_QUEUE)?;
        Ok(head)
    }

    /// Waits until the doorbell chain `head` comes back (the doorbell queue is polled).
    fn doorbell_done(&mut self, head: u16) -> Result<()> {
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            match self.q(DOORBELL_QUEUE)?.pop_used()? {
                Some((h, _)) if h == head => return Ok(()),
                Some((h, _)) => bail!("doorbell queue returned chain {h}, expected {head}"),
                None if std::time::Instant::now() >= deadline => {
                    bail!("the doorbell chain did not come back within {EVENT_TIMEOUT:?}")
                }
                None => std::thread::sleep(std::time::Duration::from_micros(200)),
            }
        }
    }

    /// Waits up to `timeout` for INTx; on an interrupt reads the ISR (lowering the line) and
    /// unmasks. Returns the eventfd count (0: none).
    fn wait_interrupt(&mut self, timeout: std::time::Duration) -> Result<u64> {
        let ev = self
            .intx
            .as_ref()
            .ok_or_else(|| Error::msg("INTx is not enabled"))?;
        let n = ev.wait(timeout)?;
        if n == 0 {
            return Ok(0);
        }
        self.interrupts += n;
        let isr = self.t.read_isr()?;
        if isr & virtio::ISR_QUEUE != 0 {
            self.isr_queue += 1;
        }
        if isr & virtio::ISR_CONFIG != 0 {
            self.isr_config += 1;
        }
        self.vfio.unmask_intx()?;
        if isr & virtio::ISR_QUEUE == 0 {
            bail!("interrupt with ISR {isr:#x}: the queue bit is not set");
        }
        Ok(n)
    }

    /// Takes one upcall record from the event queue (which must hold exactly one), checks it
    /// and posts a fresh buffer for it.
    fn take_record(&mut self) -> Result<()> {
        let eq = FIRST_EVENT_QUEUE + UPCALL0;
        let q = self.q(eq)?;
        let Some((head, len)) = q.pop_used()? else {
            bail!("interrupt without an upcall record in the event queue");
        };
        let mut b = [0u8; 8];
        q.slot_read(head, 0, &mut b)?;
        if let Some((h2, _)) = q.pop_used()? {
            bail!("a second record (chain {h2}) came with the same upcall");
        }
        let (upcall, flags, seq) = (le16(&b, 0), le16(&b, 2), le32(&b, 4));
        self.records += 1;
        let want_seq = self.last_seq.wrapping_add(1);
        self.last_seq = seq;
        if len != RECORD_SIZE || upcall != UPCALL0 || flags != 0 || seq != want_seq {
            bail!(
                "record {{upcall {upcall}, flags {flags:#x}, seq {seq}}} of {len} bytes, expected {{upcall {UPCALL0}, flags 0, seq {want_seq}}} of {RECORD_SIZE}"
            );
        }
        self.post_event_buffers(1)
    }

    /// Exactly one upcall: one interrupt, one record, the upcall flagged in the page, and the
    /// guest handler finds exactly `want` pending.
    fn expect_upcall(&mut self, want: &[u32]) -> Result<()> {
        let n = self.wait_interrupt(EVENT_TIMEOUT)?;
        if n != 1 {
            bail!("INTx eventfd counted {n}, expected one upcall for ports {want:?}");
        }
        self.take_record()?;
        let page = self.page()?;
        let flagged = page.0.atomic64(UPCALL + 16 * usize::from(UPCALL0))?;
        if flagged.load(std::sync::atomic::Ordering::SeqCst) != 1 {
            bail!("upcall_pending of upcall 0 is not set in the page");
        }
        let mut unset = Vec::new();
        for &p in want {
            if !page.pending(p)? {
                unset.push(p);
            }
        }
        let sel = page
            .0
            .atomic64(UPCALL + 16 * usize::from(UPCALL0) + 8)?
            .load(std::sync::atomic::Ordering::SeqCst);
        let ports = page.handle(u32::from(UPCALL0))?;
        if !unset.is_empty() {
            // Tell a late event from a wrong one.
            std::thread::sleep(QUIET_TIMEOUT);
            let late: Vec<u32> = unset
                .iter()
                .copied()
                .filter(|&p| page.pending(p).unwrap_or(false))
                .collect();
            bail!(
                "ports {unset:?} had no pending bit in the page (record seq {}, selector {sel:#x}); the handler found {ports:?}; pending {QUIET_TIMEOUT:?} later: {late:?}",
                self.last_seq
            );
        }
        if ports != want {
            bail!("the handler found ports {ports:?}, expected {want:?}");
        }
        Ok(())
    }

    /// No upcall is outstanding: no record in the event queue, upcall_pending clear, and no
    /// interrupt within the quiet time. Call after the reply of the last request that could
    /// have raised one (the record would precede that reply).
    fn expect_silence(&mut self) -> Result<()> {
        let eq = FIRST_EVENT_QUEUE + UPCALL0;
        if let Some((h, _)) = self.q(eq)?.pop_used()? {
            bail!("unexpected upcall record (chain {h})");
        }
        let flagged = self
            .page()?
            .0
            .atomic64(UPCALL + 16 * usize::from(UPCALL0))?
            .load(std::sync::atomic::Ordering::SeqCst);
        if flagged != 0 {
            bail!("upcall_pending is set in the page, expected no upcall");
        }
        let n = self.wait_interrupt(QUIET_TIMEOUT)?;
        if n != 0 {
            bail!("{n} unexpected interrupt(s)");
        }
        Ok(())
    }

    fn status(&mut self, port: u32) -> Result<u32> {
        self.control_ok(OP_STATUS, port, 0)
    }
}

/// Opens the device: vfio-pci, capabilities, transport.
fn open(pci: &pci::PciDev, f: &mut Facts) -> Result<VfioDevice> {
    f.set("bdf", &pci.bdf);
    let dev = VfioDevice::open(pci, f)?;
    let cfg = dev.config_bytes(256)?;
    let caps = virtio::parse_caps(&cfg);
    f.set("virtio_caps", caps.len());
    let t = Transport::new(&dev, &caps)?;
    f.set("layout", t.describe());
    let (_, intx) = dev.irq_info(IRQ_INTX)?;
    f.expect_eq("intx_count", intx, 1)?;
    let cmd = dev.set_command_bits(CMD_MEMORY | CMD_BUS_MASTER)?;
    f.set("command", format_args!("{cmd:#x}"));
    Ok(dev)
}

/// Reset, features, config space, queues, INTx, DRIVER_OK.
fn init<'a>(dev: &'a VfioDevice, opts: &Options, f: &mut Facts) -> Result<Dev<'a>> {
    let cfg = dev.config_bytes(256)?;
    let t = Transport::new(dev, &virtio::parse_caps(&cfg))?;
    t.reset()?;
    t.add_status(virtio::STATUS_ACKNOWLEDGE)?;
    t.add_status(virtio::STATUS_DRIVER)?;
    let offered = t.device_features()?;
    f.set("device_features", format_args!("{offered:#x}"));
    if offered & virtio::F_VERSION_1 == 0 {
        bail!("the device does not offer VIRTIO_F_VERSION_1 (features {offered:#x})");
    }
    let features = virtio::F_VERSION_1;
    t.set_driver_features(features)?;
    f.set("driver_features", format_args!("{features:#x}"));
    t.add_status(virtio::STATUS_FEATURES_OK)?;

    let c = t.device_config(CONFIG_SIZE)?;
    let num_ports = le32(&c, 0);
    f.set("num_ports", num_ports);
    f.expect_eq("num_upcalls", le16(&c, 4), UPCALLS)?;
    f.expect_eq("abi_version", le16(&c, 6), ABI_VERSION)?;
    f.expect_hex("config_features", le64(&c, 8), EXPECTED_FEATURES)?;
    f.expect_eq("config_virtio_id", le16(&c, 16), opts.virtio_id)?;
    let max_port = LINKS.iter().map(|&(s, r)| s.max(r)).max().unwrap_or(0);
    if num_ports <= max_port.max(UNLINKED) {
        bail!("the device has {num_ports} ports, the test needs more than {max_port}");
    }
    let nq = t.num_queues()?;
    f.expect_eq("num_queues", nq, FIRST_EVENT_QUEUE + UPCALLS)?;

    let mut queues = Vec::with_capacity(usize::from(nq));
    let mut sizes = Vec::new();
    for i in 0..nq {
        let max = t.select_queue(i)?;
        if max == 0 {
            bail!("queue {i} has size 0");
        }
        let size = max.min(QUEUE_SIZE);
        let mut q = SplitQueue::new(dev, i, size)?;
        let (desc, avail, used) = q.ring_gpas();
        let notify_off = t.setup_queue(size, desc, avail, used)?;
        q.set_notify_offset(t.notify_offset(notify_off)?);
        if i < FIRST_EVENT_QUEUE {
            q.set_no_interrupt(true)?;
        }
        sizes.push(format!("{size}@{desc:#x}"));
        queues.push(q);
    }
    f.set("queues", sizes.join(","));

    let mut d = Dev {
        vfio: dev,
        t,
        queues,
        intx: None,
        page: None,
        interrupts: 0,
        isr_queue: 0,
        isr_config: 0,
        records: 0,
        last_seq: 0,
    };
    let ev = EventFd::new()?;
    dev.set_triggers(IRQ_INTX, 0, &[ev.raw()])?;
    d.intx = Some(ev);
    let status = d.t.add_status(virtio::STATUS_DRIVER_OK)?;
    f.set("status", format_args!("{status:#x}"));
    if status & (virtio::STATUS_NEEDS_RESET | virtio::STATUS_FAILED) != 0 {
        bail!("device_status {status:#x} after DRIVER_OK");
    }
    d.post_event_buffers(EVENT_BUFFERS)?;
    Ok(d)
}

fn setup(d: &mut Dev<'_>, f: &mut Facts) -> Result<()> {
    let (map, gpa) = dma::DmaPage::new(d.vfio)?.into_parts();
    f.set("page_gpa", format_args!("{gpa:#x}"));
    d.page = Some(Page(map));
    d.control_ok(OP_REGISTER_PAGE, 0, gpa)?;
    for (_, r) in LINKS {
        d.control_ok(OP_BIND, r, u64::from(UPCALL0))?;
    }
    for (s, r) in LINKS {
        let st = d.status(r)?;
        if st & PORT_F_LINKED == 0 {
            bail!("port {r} has no link (STATUS {st:#x}): start the backend with --link {s}:{r}");
        }
        let want = PORT_BOUND | PORT_F_LINKED | (u32::from(UPCALL0) << 16);
        if st != want {
            bail!("port {r}: STATUS {st:#x}, expected {want:#x} (bound to upcall 0, linked)");
        }
        let st = d.status(s)?;
        if st != PORT_CLOSED | PORT_F_LINKED {
            bail!("sender port {s}: STATUS {st:#x}, expected closed and linked");
        }
    }
    f.set("bound", LINKS.map(|(_, r)| r.to_string()).join(","));
    let (st, _) = d.control(OP_SEND, UNLINKED, 0)?;
    f.expect_eq("send_unlinked", st, ST_NOT_CONNECTED)?;
    let (st, _) = d.control(OP_SEND, 1 << 20, 0)?;
    f.expect_eq("send_bad_port", st, ST_BAD_PORT)?;
    let (st, _) = d.control(99, 0, 0)?;
    f.expect_eq("unknown_op", st, ST_UNKNOWN_OP)?;
    f.expect_eq("page_clean", d.page()?.is_clean()?, true)?;
    d.expect_silence()
}

fn send(d: &mut Dev<'_>, f: &mut Facts) -> Result<()> {
    for (s, r) in LINKS {
        d.control_ok(OP_SEND, s, 0)?;
        d.expect_upcall(&[r])
            .map_err(|e| Error::msg(format!("SEND {s} -> port {r}: {e}")))?;
    }
    f.set("upcalls", LINKS.len());
    d.expect_silence()
}

fn coalesce(d: &mut Dev<'_>, f: &mut Facts) -> Result<()> {
    let (a, b) = (LINKS[0], LINKS[2]);
    let replies = d.control_batch(&[
        request(OP_SEND, a.0, 0),
        request(OP_SEND, b.0, 0),
        request(OP_SEND, a.0, 0),
    ])?;
    if replies.iter().any(|&(st, _)| st != ST_OK) {
        bail!("SEND replies {replies:?}, expected all ok");
    }
    d.expect_upcall(&[a.1, b.1])?;
    f.set("sends", 3);
    f.set("upcalls", 1);
    d.expect_silence()
}

fn doorbell(d: &mut Dev<'_>, f: &mut Facts) -> Result<()> {
    // The device returns a doorbell chain after it has sent on every port in it, but it may
    // raise the upcall (at the first port) earlier: wait for the chain before looking.
    let (s, r) = LINKS[1];
    let h = d.doorbell(&[s])?;
    d.doorbell_done(h)?;
    d.expect_upcall(&[r])?;
    let senders = LINKS.map(|(s, _)| s);
    let h = d.doorbell(&senders)?;
    d.doorbell_done(h)?;
    d.expect_upcall(&LINKS.map(|(_, r)| r))?;
    f.set("doorbells", 2);
    f.set("upcalls", 2);
    d.expect_silence()
}

fn masking(d: &mut Dev<'_>, f: &mut Facts) -> Result<()> {
    let (s, r) = LINKS[0];
    d.page()?.mask(r)?;
    d.control_ok(OP_SEND, s, 0)?;
    d.control_ok(OP_SEND, s, 0)?;
    d.expect_silence()
        .map_err(|e| Error::msg(format!("while port {r} is masked: {e}")))?;
    f.expect_eq("pending_while_masked", d.page()?.pending(r)?, true)?;
    let st = d.status(r)?;
    f.set("status_masked", format_args!("{st:#x}"));
    if st & (PORT_F_PENDING | PORT_F_MASKED) != PORT_F_PENDING | PORT_F_MASKED {
        bail!("STATUS {st:#x} of the masked port lacks PENDING|MASKED");
    }
    d.control_ok(OP_UNMASK, r, 0)?;
    d.expect_upcall(&[r])
        .map_err(|e| Error::msg(format!("after UNMASK: {e}")))?;
    f.expect_eq("mask_after_unmask", d.page()?.masked(r)?, false)?;
    d.expect_silence()?;
    // The port works normally again.
    d.control_ok(OP_SEND, s, 0)?;
    d.expect_upcall(&[r])?;
    f.set("upcalls", 2);
    d.expect_silence()
}

/// Upcalls each step above expects: send 3, coalesce 1, doorbell 2, mask 2.
const EXPECTED_UPCALLS: u64 = 8;

fn totals(d: &mut Dev<'_>, f: &mut Facts, all_ran: bool) -> Result<()> {
    f.set("interrupts", d.interrupts);
    f.set("records", d.records);
    f.set("isr_queue", d.isr_queue);
    f.expect_eq("isr_config", d.isr_config, 0)?;
    f.expect_eq("records_eq_interrupts", d.records, d.interrupts)?;
    f.expect_eq("isr_eq_interrupts", d.isr_queue, d.interrupts)?;
    f.expect_eq("last_seq", u64::from(d.last_seq), d.records)?;
    if all_ran {
        f.expect_eq("upcalls", d.interrupts, EXPECTED_UPCALLS)?;
    }
    d.t.reset()?;
    f.expect_eq("status_after_reset", d.t.status()?, 0)
}

/// Finds the virtio device with ID `virtio_id`.
fn find(virtio_id: u16) -> Result<pci::PciDev> {
    let device = virtio::MODERN_DEVICE_BASE
        .checked_add(virtio_id)
        .ok_or_else(|| Error::msg(format!("virtio ID {virtio_id} is too large")))?;
    pci::find_by_ids(virtio::VENDOR, device)?.ok_or_else(|| {
        Error::msg(format!(
            "no PCI device {:04x}:{device:04x} (virtio ID {virtio_id}): is the vhost-user-test-device-pci attached?",
            virtio::VENDOR
        ))
    })
}

/// Runs the scenario: results `vhost-open`, `vhost-init`, `vhost-evtchn-setup`,
/// `vhost-evtchn-send`, `vhost-evtchn-coalesce`, `vhost-evtchn-doorbell`, `vhost-evtchn-mask`,
/// `vhost-evtchn-totals`.
pub fn run(rep: &mut Reporter, opts: &Options) {
    let mut facts = Facts::default();
    let dev = find(opts.virtio_id).and_then(|pci| open(&pci, &mut facts));
    let dev = match dev {
        Ok(d) => {
            rep.record("vhost-open", &facts, &Ok(()));
            d
        }
        Err(e) => {
            rep.record("vhost-open", &facts, &Err(e));
            return;
        }
    };
    let mut facts = Facts::default();
    let mut d = match init(&dev, opts, &mut facts) {
        Ok(d) => {
            rep.record("vhost-init", &facts, &Ok(()));
            d
        }
        Err(e) => {
            rep.record("vhost-init", &facts, &Err(e));
            return;
        }
    };
    if !rep.run("vhost-evtchn-setup", |f| setup(&mut d, f)) {
        return;
    }
    let mut ok = rep.run("vhost-evtchn-send", |f| send(&mut d, f));
    ok &= rep.run("vhost-evtchn-coalesce", |f| coalesce(&mut d, f));
    ok &= rep.run("vhost-evtchn-doorbell", |f| doorbell(&mut d, f));
    ok &= rep.run("vhost-evtchn-mask", |f| masking(&mut d, f));
    rep.run("vhost-evtchn-totals", |f| totals(&mut d, f, ok));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_encode_little_endian() {
        let r = request(OP_REGISTER_PAGE, 0, 0x1122_3344_5566_7788);
        assert_eq!(&r[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&r[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        let r = request(OP_SEND, 700, 0);
        assert_eq!(&r[0..8], &[7, 0, 0, 0, 0xbc, 0x02, 0, 0]);
    }

    #[test]
    fn test_ports_sit_in_different_words_and_are_distinct() {
        let words: Vec<u32> = LINKS.iter().map(|&(_, r)| r / 64).collect();
        assert_eq!(words, [0, 1, 10]);
        let mut all: Vec<u32> = LINKS.iter().flat_map(|&(s, r)| [s, r]).collect();
        all.push(UNLINKED);
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
