// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `evtchn`: 2-level event channels on BAR4, upcalls on MSI-X vectors, through vfio-pci.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use crate::regs::{self, Regs};
use crate::report::{Facts, Reporter, Result};
use crate::sys::Mapping;
use crate::vfio::VfioDevice;
use crate::vfio_tests::MsixSession;
use crate::{Options, bail};

const PENDING: usize = 0x000;
const MASK: usize = 0x200;
pub(crate) const UPCALL: usize = 0x400;
const PAGE: usize = 4096;

/// Upcall vectors used by the test; vector 0 serves as a fence.
const V1: u32 = 1;
const V2: u32 = 2;
const FENCE: u32 = 0;

/// The shared event-channel page (the layout of device-abi.md, shared by the virtio
/// event-channel device of `vhost_evtchn`).
pub(crate) struct Page(pub(crate) Mapping);

impl Page {
    pub(crate) fn word(&self, base: usize, port: u32) -> Result<(&AtomicU64, u64)> {
        let w = (port / 64) as usize;
        Ok((self.0.atomic64(base + 8 * w)?, 1u64 << (port % 64)))
    }

    pub(crate) fn pending(&self, port: u32) -> Result<bool> {
        let (w, bit) = self.word(PENDING, port)?;
        Ok(w.load(SeqCst) & bit != 0)
    }

    pub(crate) fn clear_pending(&self, port: u32) -> Result<()> {
        let (w, bit) = self.word(PENDING, port)?;
        w.fetch_and(!bit, SeqCst);
        Ok(())
    }

    pub(crate) fn masked(&self, port: u32) -> Result<bool> {
        let (w, bit) = self.word(MASK, port)?;
        Ok(w.load(SeqCst) & bit != 0)
    }

    pub(crate) fn mask(&self, port: u32) -> Result<()> {
        let (w, bit) = self.word(MASK, port)?;
        w.fetch_or(bit, SeqCst);
        Ok(())
    }

    /// Whether every word of the page is zero.
    pub(crate) fn is_clean(&self) -> Result<bool> {
        for off in (0..PAGE).step_by(8) {
            if self.0.atomic64(off)?.load(SeqCst) != 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The guest upcall handler of device-abi.md for vector `v`: returns the ports it handled.
    pub(crate) fn handle(&self, v: u32) -> Result<Vec<u32>> {
        let base = UPCALL + 16 * v as usize;
        self.0.atomic64(base)?.store(0, SeqCst);
        let sel = self.0.atomic64(base + 8)?.swap(0, SeqCst);
        let mut ports = Vec::new();
        for w in 0..64u32 {
            if sel & (1 << w) == 0 {
                continue;
            }
            let pend = self.0.atomic64(PENDING + 8 * w as usize)?;
            let mask = self.0.atomic64(MASK + 8 * w as usize)?;
            loop {
                let ready = pend.load(SeqCst) & !mask.load(SeqCst);
                if ready == 0 {
                    break;
                }
                let b = ready.trailing_zeros();
                pend.fetch_and(!(1u64 << b), SeqCst);
                ports.push(w * 64 + b);
            }
        }
        ports.sort_unstable();
        Ok(ports)
    }
}

struct Ctx<'a> {
    bar: crate::vfio::VfioBar<'a>,
    page: Page,
    s: MsixSession<'a>,
    upcalls_seen: u64,
}

impl Ctx<'_> {
    fn send(&self, port: u32) -> Result<()> {
        self.bar.write32(regs::EVTCHN_SEND, port)
    }

    /// Waits for exactly one upcall on `v`, runs the handler, and checks the ports it found.
    fn expect_upcall(&mut self, v: u32, want: &[u32]) -> Result<()> {
        let got = self.s.wait(v)?;
        if got != 1 {
            bail!("vector {v}: eventfd counted {got}, expected one upcall for ports {want:?}");
        }
        self.upcalls_seen += got;
        let ports = self.page.handle(v)?;
        if ports != want {
            bail!("vector {v}: the handler found ports {ports:?}, expected {want:?}");
        }
        Ok(())
    }

    /// Proves that no upcall is outstanding on `v`: fire the fence vector, wait for it, then
    /// give `v` a moment.
    fn expect_silence(&self, v: u32) -> Result<()> {
        self.s.fire_and_expect(&self.bar, FENCE)?;
        let got = self.s.quiet(v)?;
        if got != 0 {
            bail!("vector {v} signalled {got} times, expected no upcall");
        }
        Ok(())
    }

    fn status(&self, port: u32) -> Result<(u32, u32)> {
        self.bar.write32(regs::EVTCHN_QUERY, port)?;
        let st = self.bar.read32(regs::EVTCHN_STATUS)?;
        Ok((st & 3, st >> 16))
    }
}

fn basic(c: &mut Ctx<'_>, f: &mut Facts) -> Result<()> {
    c.send(5)?;
    c.expect_upcall(V1, &[5])?;
    c.send(130)?;
    c.expect_upcall(V2, &[130])?;
    c.send(0)?;
    c.send(191)?;
    c.expect_upcall(V1, &[0])?;
    c.expect_upcall(V2, &[191])?;
    f.set("upcalls", 4);
    Ok(())
}

fn coalesce(c: &mut Ctx<'_>, f: &mut Facts, far: u32) -> Result<()> {
    let sends0 = c.bar.read32(regs::CNT_EVTCHN_SENDS)?;
    let ups0 = c.bar.read32(regs::CNT_EVTCHN_UPCALLS)?;
    c.send(64)?;
    c.send(far)?;
    c.send(64)?;
    c.expect_upcall(V1, &[64, far])?;
    c.expect_silence(V1)?;
    let sends = c.bar.read32(regs::CNT_EVTCHN_SENDS)?.wrapping_sub(sends0);
    let ups = c.bar.read32(regs::CNT_EVTCHN_UPCALLS)?.wrapping_sub(ups0);
    f.expect_eq("device_sends", sends, 3)?;
    f.expect_eq("device_upcalls", ups, 1)?;
    Ok(())
}

fn masking(c: &mut Ctx<'_>, f: &mut Facts) -> Result<()> {
    let ups0 = c.bar.read32(regs::CNT_EVTCHN_UPCALLS)?;
    c.page.mask(5)?;
    c.send(5)?;
    c.send(5)?;
    c.expect_silence(V1)?;
    f.expect_eq("pending_while_masked", c.page.pending(5)?, true)?;
    let ups = c.bar.read32(regs::CNT_EVTCHN_UPCALLS)?.wrapping_sub(ups0);
    f.expect_eq("device_upcalls_while_masked", ups, 0)?;
    c.bar.write32(regs::EVTCHN_UNMASK, 5)?;
    c.expect_upcall(V1, &[5])?;
    f.expect_eq("mask_after_unmask", c.page.masked(5)?, false)?;
    c.expect_silence(V1)?;
    Ok(())
}

fn unbind_close(c: &mut Ctx<'_>, f: &mut Facts, far: u32, ports: u32) -> Result<()> {
    c.bar.write32(regs::EVTCHN_UNBIND, far)?;
    f.expect_eq("unbound_state", c.status(far)?.0, regs::PORT_UNBOUND)?;
    c.send(far)?;
    c.expect_silence(V1)?;
    f.expect_eq("unbound_pending", c.page.pending(far)?, true)?;
    c.page.clear_pending(far)?;

    c.bar.write32(regs::EVTCHN_CLOSE, 64)?;
    f.expect_eq("closed_state", c.status(64)?.0, regs::PORT_CLOSED)?;
    c.send(64)?;
    c.expect_silence(V1)?;
    f.expect_eq("closed_pending", c.page.pending(64)?, false)?;

    let bad0 = c.bar.read32(regs::CNT_BAD_ACCESSES)?;
    c.send(ports)?;
    let bad = c.bar.read32(regs::CNT_BAD_ACCESSES)?.wrapping_sub(bad0);
    f.expect_eq("bad_port_counted", bad, 1)?;
    c.expect_silence(V1)?;
    c.expect_silence(V2)?;
    Ok(())
}

fn setup<'a>(
    dev: &'a VfioDevice,
    facts: &mut Facts,
    opts: &Options,
    far: &mut u32,
) -> Result<Ctx<'a>> {
    let bar = dev.bar(0);
    let ports = bar.read32(regs::EVTCHN_PORTS)?;
    facts.set("ports", ports);
    if ports < 256 {
        bail!("EVTCHN_PORTS is {ports}, the test needs at least 256");
    }
    *far = (*far).min(ports - 1);
    let far = *far;
    let page = Page(dev.map(4, PAGE)?);
    facts.expect_eq("page_clean", page.is_clean()?, true)?;
    let s = MsixSession::enable(dev, opts.vectors.max(3))?;
    // A handler scans whole 64-port words: ports of different vectors sit in different words.
    let binds = [(5, V1), (64, V1), (far, V1), (0, V1), (130, V2), (191, V2)];
    for (port, v) in binds {
        bar.write32(regs::EVTCHN_BIND, port | (v << 16))?;
    }
    for (port, v) in binds {
        bar.write32(regs::EVTCHN_QUERY, port)?;
        let st = bar.read32(regs::EVTCHN_STATUS)?;
        if st != regs::PORT_BOUND | (v << 16) {
            bail!("port {port}: EVTCHN_STATUS {st:#x}, expected bound to vector {v}");
        }
    }
    Ok(Ctx {
        bar,
        page,
        s,
        upcalls_seen: 0,
    })
}

/// Runs the event-channel scenario: results `evtchn-setup`, `evtchn-basic`, `evtchn-coalesce`,
/// `evtchn-mask`, `evtchn-unbind-close`, `evtchn-totals`.
pub fn run(rep: &mut Reporter, pci: &crate::pci::PciDev, opts: &Options) {
    let mut facts = Facts::default();
    let dev = match VfioDevice::open(pci, &mut facts) {
        Ok(d) => d,
        Err(e) => {
            rep.record("evtchn-setup", &facts, &Err(e));
            return;
        }
    };
    let mut far = 700;
    let setup = setup(&dev, &mut facts, opts, &mut far);
    let mut c = match setup {
        Ok(c) => {
            rep.record("evtchn-setup", &facts, &Ok(()));
            c
        }
        Err(e) => {
            rep.record("evtchn-setup", &facts, &Err(e));
            return;
        }
    };
    let ports = match c.bar.read32(regs::EVTCHN_PORTS) {
        Ok(p) => p,
        Err(e) => {
            rep.record("evtchn-basic", &Facts::default(), &Err(e));
            return;
        }
    };
    let ups0 = c.bar.read32(regs::CNT_EVTCHN_UPCALLS);
    rep.run("evtchn-basic", |f| basic(&mut c, f));
    rep.run("evtchn-coalesce", |f| coalesce(&mut c, f, far));
    rep.run("evtchn-mask", |f| masking(&mut c, f));
    rep.run("evtchn-unbind-close", |f| {
        unbind_close(&mut c, f, far, ports)
    });
    rep.run("evtchn-totals", |f| {
        let ups = c.bar.read32(regs::CNT_EVTCHN_UPCALLS)?.wrapping_sub(ups0?);
        f.expect_eq("device_upcalls", u64::from(ups), c.upcalls_seen)
    });
}
