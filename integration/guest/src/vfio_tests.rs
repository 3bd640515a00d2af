// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfio`: INTx, MSI-X and MSI through the guest's vfio-pci, with eventfds counted exactly.

use crate::pci::{self, PciDev};
use crate::regs::{self, Regs};
use crate::report::{Error, Facts, Reporter, Result};
use crate::sys::EventFd;
use crate::vfio::{
    CMD_BUS_MASTER, CMD_MEMORY, IRQ_INTX, IRQ_MSI, IRQ_MSIX, REGION_CONFIG, REGION_MMAP, VfioDevice,
};
use crate::{EVENT_TIMEOUT, Options, QUIET_TIMEOUT, bail};

/// INTx bound to an eventfd; disabled again on drop.
struct IntxSession<'a> {
    dev: &'a VfioDevice,
    ev: EventFd,
}

impl<'a> IntxSession<'a> {
    fn enable(dev: &'a VfioDevice) -> Result<Self> {
        let ev = EventFd::new().map_err(Error::from)?;
        dev.set_triggers(IRQ_INTX, 0, &[ev.raw()])?;
        Ok(Self { dev, ev })
    }
}

impl Drop for IntxSession<'_> {
    fn drop(&mut self) {
        let _ = self.dev.disable_irq(IRQ_INTX);
    }
}

/// MSI-X vectors 0..n bound to eventfds; MSI-X disabled again on drop.
pub struct MsixSession<'a> {
    dev: &'a VfioDevice,
    evs: Vec<EventFd>,
}

impl<'a> MsixSession<'a> {
    /// Enables MSI-X with `n` vectors, each signalling its own eventfd. Turns on Bus Master
    /// first: an MSI-X message is a memory write by the device, which a function that is not
    /// bus master does not make (vfio-pci leaves that bit to its user).
    pub fn enable(dev: &'a VfioDevice, n: u32) -> Result<Self> {
        dev.set_command_bits(CMD_MEMORY | CMD_BUS_MASTER)?;
        let (_, count) = dev.irq_info(IRQ_MSIX)?;
        if count < n {
            bail!("the device offers {count} MSI-X vectors, the test needs {n}");
        }
        let evs = bind_triggers(dev, IRQ_MSIX, n)?;
        Ok(Self { dev, evs })
    }

    fn ev(&self, v: u32) -> Result<&EventFd> {
        self.evs
            .get(v as usize)
            .ok_or_else(|| Error::msg(format!("vector {v} has no eventfd")))
    }

    /// Waits for vector `v` and returns its eventfd count (0 on timeout).
    pub fn wait(&self, v: u32) -> Result<u64> {
        Ok(self.ev(v)?.wait(EVENT_TIMEOUT)?)
    }

    /// Waits briefly: for checking that nothing (more) arrives on vector `v`.
    pub fn quiet(&self, v: u32) -> Result<u64> {
        Ok(self.ev(v)?.wait(QUIET_TIMEOUT)?)
    }

    /// Reads and resets vector `v`'s count without waiting.
    pub fn take(&self, v: u32) -> Result<u64> {
        Ok(self.ev(v)?.take()?)
    }

    /// Number of vectors.
    pub fn len(&self) -> u32 {
        self.evs.len() as u32
    }

    /// Fires `v` from the device and fails unless exactly one event arrives on it.
    pub fn fire_and_expect(&self, bar: &impl Regs, v: u32) -> Result<()> {
        bar.write32(regs::MSIX_FIRE, v)?;
        let got = self.wait(v)?;
        if got != 1 {
            bail!("MSIX_FIRE {v}: eventfd counted {got}, expected 1");
        }
        Ok(())
    }
}

impl Drop for MsixSession<'_> {
    fn drop(&mut self) {
        let _ = self.dev.disable_irq(IRQ_MSIX);
    }
}

fn intx(dev: &VfioDevice, facts: &mut Facts, rounds: u32) -> Result<()> {
    let (flags, count) = dev.irq_info(IRQ_INTX)?;
    facts.set("irq_flags", format_args!("{flags:#x}"));
    facts.expect_eq("irq_count", count, 1)?;
    let bar = dev.bar(0);
    let triggers0 = bar.read32(regs::CNT_INTX_TRIGGERS)?;
    let unmasks0 = bar.read32(regs::CNT_INTX_UNMASKS)?;
    let s = IntxSession::enable(dev)?;
    let mut events = 0u64;
    for i in 1..=rounds {
        bar.write32(regs::INTX_ASSERT, 1)?;
        let got = s.ev.wait(EVENT_TIMEOUT)?;
        events += got;
        if got != 1 {
            facts.set("events", events);
            bail!("assert {i} of {rounds}: eventfd counted {got}, expected 1");
        }
        let st = bar.read32(regs::INTX_STATUS)?;
        if i == 1 {
            facts.set("status_in_handler", format_args!("{st:#x}"));
        }
        if st & regs::INTX_LEVEL == 0 {
            bail!("assert {i}: INTX_STATUS {st:#x} has no level bit");
        }
        bar.write32(regs::INTX_DEASSERT, 1)?;
        dev.unmask_intx()?;
    }
    facts.set("events", events);

    // Level semantics: unmasking while the line is still high must deliver it again.
    bar.write32(regs::INTX_ASSERT, 1)?;
    let first = s.ev.wait(EVENT_TIMEOUT)?;
    facts.expect_eq("level_first", first, 1)?;
    dev.unmask_intx()?;
    let again = s.ev.wait(EVENT_TIMEOUT)?;
    facts.expect_eq("level_refire", again, 1)?;
    bar.write32(regs::INTX_DEASSERT, 1)?;
    dev.unmask_intx()?;
    let st = bar.read32(regs::INTX_STATUS)?;
    facts.set("status_after", format_args!("{st:#x}"));
    if st & (regs::INTX_LEVEL | regs::INTX_MASKED) != 0 {
        bail!("INTX_STATUS {st:#x} after the last unmask, expected low and unmasked");
    }
    let extra = s.ev.wait(QUIET_TIMEOUT)?;
    facts.expect_eq("extra", extra, 0)?;
    let triggers = bar.read32(regs::CNT_INTX_TRIGGERS)?.wrapping_sub(triggers0);
    facts.set("device_triggers", triggers);
    let unmasks = bar.read32(regs::CNT_INTX_UNMASKS)?.wrapping_sub(unmasks0);
    facts.set("device_unmasks", unmasks);
    Ok(())
}

fn msix_fire(s: &MsixSession<'_>, dev: &VfioDevice, facts: &mut Facts, rounds: u32) -> Result<()> {
    let bar = dev.bar(0);
    let n = s.len();
    facts.set("vectors", n);
    let triggers0 = bar.read32(regs::CNT_MSIX_TRIGGERS)?;
    for round in 1..=rounds {
        for v in 0..n {
            s.fire_and_expect(&bar, v)
                .map_err(|e| Error::msg(format!("round {round}: {e}")))?;
            for other in (0..n).filter(|&o| o != v) {
                let stray = s.take(other)?;
                if stray != 0 {
                    bail!(
                        "round {round}: firing vector {v} also signalled vector {other} ({stray})"
                    );
                }
            }
        }
    }
    facts.set("per_vector", rounds);
    let triggers = bar.read32(regs::CNT_MSIX_TRIGGERS)?.wrapping_sub(triggers0);
    facts.expect_eq("device_triggers", triggers, rounds * n)?;
    Ok(())
}

fn pba_bit(dev: &VfioDevice, info: &pci::MsixInfo, v: u32) -> Result<bool> {
    let off = u64::from(info.pba_offset) + u64::from(v / 32) * 4;
    let word = dev.read32(u32::from(info.pba_bir), off)?;
    Ok(word & (1 << (v % 32)) != 0)
}

fn msix_mask(s: &MsixSession<'_>, dev: &VfioDevice, facts: &mut Facts) -> Result<()> {
    let bar = dev.bar(0);
    let n = s.len();
    if n < 2 {
        bail!("the mask test needs 2 vectors");
    }
    let (m, fence) = (n - 1, 0);
    facts.set("vector", m);
    let mut cfg = vec![0u8; 256];
    for (i, chunk) in cfg.chunks_mut(4).enumerate() {
        chunk.copy_from_slice(&dev.read32(REGION_CONFIG, i as u64 * 4)?.to_le_bytes());
    }
    let info = pci::msix_info(&cfg).ok_or_else(|| Error::msg("no MSI-X capability"))?;
    facts.set(
        "pba",
        format_args!("bar{}+{:#x}", info.pba_bir, info.pba_offset),
    );
    let pending0 = bar.read32(regs::CNT_MSIX_PENDING)?;

    bar.write32(regs::MSIX_MASK, m)?;
    bar.write32(regs::MSIX_FIRE, m)?;
    bar.write32(regs::MSIX_FIRE, m)?;
    // Fence: a later event on another vector has arrived, so an event on m would have too.
    s.fire_and_expect(&bar, fence)?;
    let masked_events = s.quiet(m)?;
    facts.expect_eq("masked_events", masked_events, 0)?;
    let pba_set = pba_bit(dev, &info, m)?;
    facts.expect_eq("pba_while_masked", pba_set, true)?;
    let pending = bar.read32(regs::CNT_MSIX_PENDING)?.wrapping_sub(pending0);
    facts.set("device_pending", pending);
    if pending == 0 {
        bail!("CNT_MSIX_PENDING did not move while the vector was masked");
    }

    bar.write32(regs::MSIX_UNMASK, m)?;
    let delivered = s.wait(m)?;
    facts.expect_eq("unmask_events", delivered, 1)?;
    let extra = s.quiet(m)?;
    facts.expect_eq("extra", extra, 0)?;
    let pba_after = pba_bit(dev, &info, m)?;
    facts.expect_eq("pba_after_unmask", pba_after, false)?;
    // The vector works normally again.
    s.fire_and_expect(&bar, m)?;
    Ok(())
}

/// MSI vectors the MSI test enables.
const MSI_VECTORS: u32 = 4;
/// PCI capability ID of MSI.
const CAP_ID_MSI: u8 = 0x05;
/// Offset of Mask Bits in a 64-bit MSI capability with per-vector masking.
const MSI_MASK: u64 = 0x10;

/// MSI (`VFIO_PCI_MSI_IRQ_INDEX`) vectors 0..4 bound to eventfds; disabled again on drop.
struct MsiSession<'a> {
    dev: &'a VfioDevice,
    evs: Vec<EventFd>,
    enabled: bool,
}

impl<'a> MsiSession<'a> {
    fn enable(dev: &'a VfioDevice, facts: &mut Facts) -> Result<Self> {
        let bar = dev.bar(0);
        let features = bar.read32(regs::FEATURES)?;
        facts.expect_eq("feature_msi", features & regs::FEATURE_MSI != 0, true)?;
        let (flags, count) = dev.irq_info(IRQ_MSI)?;
        facts.set("irq_flags", format_args!("{flags:#x}"));
        facts.expect_eq("irq_count", count, MSI_VECTORS)?;
        dev.set_command_bits(CMD_MEMORY | CMD_BUS_MASTER)?;
        let evs = bind_triggers(dev, IRQ_MSI, MSI_VECTORS)?;
        Ok(Self {
            dev,
            evs,
            enabled: true,
        })
    }

    fn ev(&self, v: u32) -> Result<&EventFd> {
        self.evs
            .get(v as usize)
            .ok_or_else(|| Error::msg(format!("MSI vector {v} has no eventfd")))
    }

    /// Fires `v` and fails unless exactly one event arrives on it and none on the others.
    fn fire_and_expect(&self, v: u32) -> Result<()> {
        self.dev.bar(0).write32(regs::MSI_FIRE, v)?;
        let got = self.ev(v)?.wait(EVENT_TIMEOUT)?;
        if got != 1 {
            bail!("MSI_FIRE {v}: eventfd counted {got}, expected 1");
        }
        for (o, ev) in self
            .evs
            .iter()
            .enumerate()
            .filter(|(o, _)| *o != v as usize)
        {
            let stray = ev.take()?;
            if stray != 0 {
                bail!("MSI_FIRE {v} also signalled vector {o} ({stray})");
            }
        }
        Ok(())
    }

    fn disable(&mut self) -> Result<()> {
        self.enabled = false;
        self.dev.disable_irq(IRQ_MSI)
    }
}

impl Drop for MsiSession<'_> {
    fn drop(&mut self) {
        if self.enabled {
            let _ = self.dev.disable_irq(IRQ_MSI);
        }
    }
}

/// Every MSI_FIRE arrives exactly once on its own vector's eventfd and nowhere else.
fn msi_fire(s: &MsiSession<'_>, facts: &mut Facts, rounds: u32) -> Result<()> {
    let bar = s.dev.bar(0);
    let triggers0 = bar.read32(regs::CNT_MSI_TRIGGERS)?;
    for round in 1..=rounds {
        for v in 0..MSI_VECTORS {
            s.fire_and_expect(v)
                .map_err(|e| Error::msg(format!("round {round}: {e}")))?;
        }
    }
    facts.set("vectors", MSI_VECTORS);
    facts.set("per_vector", rounds);
    let triggers = bar.read32(regs::CNT_MSI_TRIGGERS)?.wrapping_sub(triggers0);
    facts.expect_eq("device_triggers", triggers, rounds * MSI_VECTORS)?;
    Ok(())
}

/// Per-vector masking through the capability's Mask Bits (vfio-pci passes them through to
/// the device): a masked vector's fires become one pending event, delivered exactly once on
/// unmask.
fn msi_mask(s: &MsiSession<'_>, facts: &mut Facts) -> Result<()> {
    let (dev, bar) = (s.dev, s.dev.bar(0));
    let cfg = dev.config_bytes(256)?;
    let cap = pci::find_capability(&cfg, CAP_ID_MSI)
        .ok_or_else(|| Error::msg("no MSI capability in config space"))?;
    facts.set("msi_cap", format_args!("{cap:#x}"));
    let mask_at = cap as u64 + MSI_MASK;
    let (m, fence) = (MSI_VECTORS - 1, 0);
    facts.set("vector", m);
    let pending0 = bar.read32(regs::CNT_MSI_PENDING)?;
    let mask0 = dev.read32(REGION_CONFIG, mask_at)?;
    dev.write32(REGION_CONFIG, mask_at, mask0 | 1 << m)?;
    bar.write32(regs::MSI_FIRE, m)?;
    bar.write32(regs::MSI_FIRE, m)?;
    // Fence: a later event on another vector has arrived, so an event on m would have too.
    s.fire_and_expect(fence)?;
    let masked_events = s.ev(m)?.wait(QUIET_TIMEOUT)?;
    facts.expect_eq("masked_events", masked_events, 0)?;
    let pending = bar.read32(regs::CNT_MSI_PENDING)?.wrapping_sub(pending0);
    facts.expect_eq("device_pending", pending, 2)?;
    dev.write32(REGION_CONFIG, mask_at, mask0 & !(1 << m))?;
    let delivered = s.ev(m)?.wait(EVENT_TIMEOUT)?;
    facts.expect_eq("unmask_events", delivered, 1)?;
    let extra = s.ev(m)?.wait(QUIET_TIMEOUT)?;
    facts.expect_eq("extra", extra, 0)?;
    s.fire_and_expect(m)?;
    Ok(())
}

/// After the index is disabled nothing arrives, and the device counts the fires as dropped
/// (the guest kernel cleared MSI Enable).
fn msi_disable(s: &mut MsiSession<'_>, facts: &mut Facts) -> Result<()> {
    let bar = s.dev.bar(0);
    let dropped0 = bar.read32(regs::CNT_MSI_DROPPED)?;
    s.disable()?;
    for v in 0..MSI_VECTORS {
        bar.write32(regs::MSI_FIRE, v)?;
    }
    let mut after = 0;
    for ev in &s.evs {
        after += ev.wait(QUIET_TIMEOUT)?;
    }
    facts.expect_eq("events_after_disable", after, 0)?;
    let dropped = bar.read32(regs::CNT_MSI_DROPPED)?.wrapping_sub(dropped0);
    facts.expect_eq("device_dropped", dropped, MSI_VECTORS)?;
    Ok(())
}

/// Binds `n` fresh eventfds as the triggers of vectors 0..n of IRQ `index`; returns them.
fn bind_triggers(dev: &VfioDevice, index: u32, n: u32) -> Result<Vec<EventFd>> {
    let evs = (0..n)
        .map(|_| EventFd::new())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(Error::from)?;
    let fds: Vec<i32> = evs.iter().map(EventFd::raw).collect();
    dev.set_triggers(index, 0, &fds)?;
    Ok(evs)
}

/// Adds what the device and the guest kernel saw to a failed MSI result.
fn msi_diag(dev: &VfioDevice, facts: &mut Facts) {
    if let Ok(v) = dev.read32(REGION_CONFIG, 0x50) {
        facts.set("diag_msi_cap_dword0", format_args!("{v:#x}"));
    }
    if let Ok(v) = dev.read32(REGION_CONFIG, 0x60) {
        facts.set("diag_msi_mask", format_args!("{v:#x}"));
    }
    if let Ok(v) = dev.read32(REGION_CONFIG, 0x64) {
        facts.set("diag_msi_pending", format_args!("{v:#x}"));
    }
    guest_irqs_diag(facts, |l| {
        l.contains("vfio-msi]") || l.contains("vfio-msi[")
    });
}

/// Adds `diag_guest_irqs`: the IRQ number and first CPU's count of each `/proc/interrupts`
/// line that `wanted` picks.
fn guest_irqs_diag(facts: &mut Facts, wanted: impl Fn(&str) -> bool) {
    if let Ok(text) = std::fs::read_to_string("/proc/interrupts") {
        let counts: Vec<String> = text
            .lines()
            .filter(|l| wanted(l))
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let irq = it.next()?;
                let n = it.next()?;
                Some(format!("{irq}{n}"))
            })
            .collect();
        facts.set("diag_guest_irqs", counts.join(","));
    }
}

/// Adds what the device and the guest kernel saw to a failed MSI-X result.
fn msix_diag(dev: &VfioDevice, facts: &mut Facts) {
    let bar = dev.bar(0);
    if let Ok(v) = bar.read32(regs::CNT_MSIX_TRIGGERS) {
        facts.set("diag_device_triggers_total", v);
    }
    if let Ok(v) = bar.read32(regs::CNT_MSIX_PENDING) {
        facts.set("diag_device_pending_total", v);
    }
    if let Ok(cfg) = dev.read32(REGION_CONFIG, 0x40) {
        facts.set("diag_msix_cap_dword0", format_args!("{cfg:#x}"));
    }
    if let Ok(pba) = dev.read32(2, 0x1000) {
        facts.set("diag_pba0", format_args!("{pba:#x}"));
    }
    guest_irqs_diag(facts, |l| l.contains("vfio-msix"));
}

/// Runs the VFIO scenario: results `vfio-open`, `vfio-intx`, `vfio-msix`, `vfio-msix-mask`,
/// `vfio-msi`, `vfio-msi-mask`, `vfio-msi-disable`.
pub fn run(rep: &mut Reporter, pci: &PciDev, opts: &Options) {
    let mut facts = Facts::default();
    let opened = VfioDevice::open(pci, &mut facts).and_then(|dev| {
        for (i, want) in [(0u32, 4096u64), (4, 4096)] {
            let r = dev.region(i)?;
            facts.set(&format!("bar{i}_size"), r.size);
            if r.size != want {
                bail!("BAR{i} region has {:#x} bytes, expected {want:#x}", r.size);
            }
        }
        let r2 = dev.region(2)?;
        facts.set("bar2_size", r2.size);
        let r4 = dev.region(4)?;
        facts.set("bar4_mmap", r4.flags & REGION_MMAP != 0);
        let magic = dev.bar(0).read32(regs::MAGIC)?;
        facts.expect_hex("magic", u64::from(magic), u64::from(regs::MAGIC_VALUE))?;
        Ok(dev)
    });
    let dev = match opened {
        Ok(dev) => {
            rep.record("vfio-open", &facts, &Ok(()));
            dev
        }
        Err(e) => {
            rep.record("vfio-open", &facts, &Err(e));
            return;
        }
    };
    rep.run("vfio-intx", |f| intx(&dev, f, opts.count));
    let session = MsixSession::enable(&dev, opts.vectors);
    match session {
        Ok(s) => {
            rep.run("vfio-msix", |f| {
                msix_fire(&s, &dev, f, opts.rounds).inspect_err(|_| msix_diag(&dev, f))
            });
            rep.run("vfio-msix-mask", |f| {
                msix_mask(&s, &dev, f).inspect_err(|_| msix_diag(&dev, f))
            });
        }
        Err(e) => {
            rep.record("vfio-msix", &Facts::default(), &Err(e));
        }
    }
    // MSI-X is disabled again (the session is gone): vfio-pci allows one index at a time.
    let mut facts = Facts::default();
    match MsiSession::enable(&dev, &mut facts) {
        Ok(mut s) => {
            rep.run("vfio-msi", |f| {
                msi_fire(&s, f, opts.rounds).inspect_err(|_| msi_diag(&dev, f))
            });
            rep.run("vfio-msi-mask", |f| {
                msi_mask(&s, f).inspect_err(|_| msi_diag(&dev, f))
            });
            rep.run("vfio-msi-disable", |f| msi_disable(&mut s, f));
        }
        Err(e) => {
            msi_diag(&dev, &mut facts);
            rep.record("vfio-msi", &facts, &Err(e));
        }
    }
}
