// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `uio-intx`: level-triggered INTx through the guest's uio_pci_generic.
//!
//! uio_pci_generic's handler masks the line with COMMAND bit 10 when STATUS bit 3 is set; the
//! driver has no irqcontrol (a `write` to /dev/uioN fails with ENOSYS), so userspace clears bit 10
//! again through the config space in sysfs. Each round: INTX_ASSERT, wait for the uio event,
//! INTX_DEASSERT, re-enable. The kernel must see exactly N interrupts and never shut the line off.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::AsFd;

use crate::kmsg::{self, Kmsg};
use crate::pci::PciDev;
use crate::regs::{self, Regs};
use crate::report::{Context, Error, Facts, Result};
use crate::sys::poll_readable;
use crate::{EVENT_TIMEOUT, QUIET_TIMEOUT, bail};

fn uio_name(pci: &PciDev) -> Result<String> {
    let dir = pci.path.join("uio");
    for entry in fs::read_dir(&dir).ctx(format_args!("listing {}", dir.display()))? {
        let name = entry
            .ctx("listing uio")?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("uio") {
            return Ok(name);
        }
    }
    bail!("no uio device under {}", dir.display())
}

fn read_u32_file(path: &str) -> Result<u32> {
    fs::read_to_string(path)
        .ctx(format_args!("reading {path}"))?
        .trim()
        .parse()
        .map_err(|_| Error::msg(format!("{path} is not a number")))
}

/// The `unhandled` count of /proc/irq/N/spurious (interrupts no handler claimed).
fn unhandled(irq: u32) -> Result<u64> {
    let path = format!("/proc/irq/{irq}/spurious");
    let text = fs::read_to_string(&path).ctx(format_args!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("unhandled "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::msg(format!("{path} has no unhandled count")))
}

/// Waits for the next uio event and returns the uio interrupt count it reports.
fn wait_event(uio: &mut File) -> Result<Option<u32>> {
    if !poll_readable(uio.as_fd(), EVENT_TIMEOUT).ctx("poll on /dev/uio")? {
        return Ok(None);
    }
    let mut b = [0u8; 4];
    uio.read_exact(&mut b).ctx("reading /dev/uio")?;
    Ok(Some(u32::from_ne_bytes(b)))
}

/// Runs the scenario with `rounds` interrupts.
pub fn run(pci: &PciDev, facts: &mut Facts, rounds: u32) -> Result<()> {
    let mut log = Kmsg::open_at_end()?;
    pci.bind("uio_pci_generic")?;
    let name = uio_name(pci)?;
    let irq = pci.irq()?;
    facts.set("uio", &name);
    facts.set("irq", irq);
    let bar = pci.map_bar(0)?;
    let mut uio = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/{name}"))
        .ctx(format_args!("opening /dev/{name}"))?;
    let unhandled0 = unhandled(irq)?;
    let triggers0 = bar.read32(regs::CNT_INTX_TRIGGERS)?;
    let base = read_u32_file(&format!("/sys/class/uio/{name}/event"))?;

    let mut seen = 0u32;
    for i in 1..=rounds {
        bar.write32(regs::INTX_ASSERT, 1)?;
        let Some(count) = wait_event(&mut uio)? else {
            facts.set("events", seen);
            bail!("interrupt {i} of {rounds} did not arrive within {EVENT_TIMEOUT:?}");
        };
        seen = count.wrapping_sub(base);
        if seen != i {
            facts.set("events", seen);
            bail!("after assert {i} the uio count moved by {seen}, expected {i}");
        }
        let st = bar.read32(regs::INTX_STATUS)?;
        if i == 1 {
            facts.set("status_in_handler", format_args!("{st:#x}"));
        }
        if st & regs::INTX_LEVEL == 0 || st & regs::INTX_CMD_DISABLE == 0 {
            bail!(
                "round {i}: INTX_STATUS {st:#x} after the interrupt, expected level and COMMAND.10 set"
            );
        }
        bar.write32(regs::INTX_DEASSERT, 1)?;
        pci.clear_intx_disable()?;
    }
    facts.set("events", seen);

    // Read back (also a fence for the posted writes), then make sure nothing else arrives.
    let st = bar.read32(regs::INTX_STATUS)?;
    facts.set("status_after", format_args!("{st:#x}"));
    if st != 0 {
        bail!("INTX_STATUS {st:#x} after the last round, expected 0 (low, unmasked, enabled)");
    }
    if poll_readable(uio.as_fd(), QUIET_TIMEOUT).ctx("poll on /dev/uio")? {
        bail!("an extra interrupt arrived after the line was lowered");
    }
    let total = read_u32_file(&format!("/sys/class/uio/{name}/event"))?.wrapping_sub(base);
    facts.expect_eq("uio_total", total, rounds)?;
    let triggers = bar.read32(regs::CNT_INTX_TRIGGERS)?.wrapping_sub(triggers0);
    facts.set("device_triggers", triggers);
    let unhandled_delta = unhandled(irq)?.saturating_sub(unhandled0);
    facts.set("unhandled", unhandled_delta);
    let msgs = log.new_messages()?;
    let bad = kmsg::irq_disabled_messages(&msgs);
    if let Some(m) = bad.first() {
        bail!("the kernel shut the interrupt off: {m}");
    }
    drop(bar);
    Ok(())
}
