// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! irqbridge-guest: runs inside a Linux guest (QEMU, TCG) and drives the irqbridge test device
//! (docs/device-abi.md) through the guest's own drivers: sysfs, uio_pci_generic and vfio-pci.
//!
//! Usage: `irqbridge-guest [--count=N] [--vectors=N] [--rounds=N] [--doorbells=N]
//! [--virtio-id=N] SCENARIO...` with scenarios `boot`, `enum`, `doorbell`, `uio-intx`, `vfio`,
//! `evtchn`, or `all` (all of these but `boot`), and `vhost-evtchn`, which drives the virtio
//! event-channel device (QEMU's vhost-user-test-device-pci with virtio ID `--virtio-id`, default
//! 63, served by the irqbridge vhost-user backend) instead of the vfio-user test device.
//!
//! Prints one `IRQBRIDGE-RESULT name=... status=PASS|FAIL key=value...` line per result and a
//! final `IRQBRIDGE-DONE pass=N fail=M`; exits non-zero when anything failed.

mod dma;
mod evtchn;
mod kmsg;
mod passthrough;
mod pci;
mod regs;
mod report;
mod sys;
mod uio;
mod vfio;
mod vfio_tests;
mod vhost_evtchn;
mod virtio;

use std::process::ExitCode;
use std::time::Duration;

use pci::PciDev;
use regs::Regs;
use report::{Error, Facts, Reporter, Result};

/// How long to wait for an interrupt that must come (TCG is slow; this is a hang detector).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to watch for an interrupt that must not come, after a fence.
pub const QUIET_TIMEOUT: Duration = Duration::from_millis(200);

const ALL: &[&str] = &["enum", "doorbell", "uio-intx", "vfio", "evtchn"];
/// The scenario of the virtio event-channel device (not part of `all`: another device).
const VHOST_EVTCHN: &str = "vhost-evtchn";
/// QEMU's edu device passed through by `irqbridge passthrough` in the guest (not part of `all`).
const PASSTHROUGH: &str = "passthrough";
/// Interrupts raised through the mmapped BAR in the passthrough wakeup count.
const PASSTHROUGH_IRQS: u32 = 1000;
/// Default virtio device ID of the event-channel device (the backend's `DEFAULT_VIRTIO_ID`).
pub const DEFAULT_VIRTIO_ID: u16 = 63;

/// Command-line options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// INTx rounds (uio-intx, vfio-intx).
    pub count: u32,
    /// MSI-X vectors to enable.
    pub vectors: u32,
    /// MSI-X rounds per vector.
    pub rounds: u32,
    /// Doorbell writes.
    pub doorbells: u32,
    /// Virtio device ID of the event-channel device (vhost-evtchn).
    pub virtio_id: u16,
    /// Scenarios in order.
    pub scenarios: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            count: 16,
            vectors: 4,
            rounds: 3,
            doorbells: 100,
            virtio_id: DEFAULT_VIRTIO_ID,
            scenarios: Vec::new(),
        }
    }
}

fn parse_args(args: impl IntoIterator<Item = String>) -> std::result::Result<Options, String> {
    let mut o = Options::default();
    for a in args {
        if let Some((key, val)) = a.strip_prefix("--").and_then(|r| r.split_once('=')) {
            let n: u32 = val
                .parse()
                .map_err(|_| format!("option --{key} needs a number, got {val:?}"))?;
            match key {
                "count" => o.count = n,
                "vectors" => o.vectors = n,
                "rounds" => o.rounds = n,
                "doorbells" => o.doorbells = n,
                "virtio-id" => {
                    o.virtio_id = u16::try_from(n)
                        .ok()
                        .filter(|&id| id != 0)
                        .ok_or_else(|| format!("--virtio-id must be in 1..=65535, got {n}"))?
                }
                _ => return Err(format!("unknown option --{key}")),
            }
        } else if a == "all" {
            o.scenarios.extend(ALL.iter().map(|s| s.to_string()));
        } else if a == "boot" || a == VHOST_EVTCHN || a == PASSTHROUGH || ALL.contains(&a.as_str())
        {
            o.scenarios.push(a);
        } else {
            return Err(format!("unknown scenario or option {a:?}"));
        }
    }
    if o.vectors < 3 {
        return Err("--vectors must be at least 3 (event channels use vectors 0-2)".into());
    }
    if o.scenarios.is_empty() {
        return Err("no scenario given".into());
    }
    Ok(o)
}

/// Runs `f` on BAR0 mapped through sysfs, enabling memory decoding for the duration if needed.
/// sysfs `enable` refuses (EBUSY) while a driver is bound, so an idle driver (vfio-pci after its
/// user closed the device) is unbound first.
fn with_bar0<T>(pci: &PciDev, f: impl FnOnce(&pci::MmioBar) -> Result<T>) -> Result<T> {
    let was_enabled = pci.enabled()?;
    if !was_enabled {
        pci.unbind()?;
        pci.set_enabled(true)?;
    }
    let result = pci.map_bar(0).and_then(|bar| f(&bar));
    if !was_enabled {
        pci.set_enabled(false)?;
    }
    result
}

fn scenario_boot(facts: &mut Facts) -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    facts.set("kernel", release.trim());
    let cmdline = std::fs::read_to_string("/proc/cmdline")?;
    facts.set("intel_iommu", cmdline.contains("intel_iommu=on"));
    Ok(())
}

fn scenario_enum(pci: &PciDev, f: &mut Facts) -> Result<()> {
    f.set("bdf", &pci.bdf);
    let c = pci.config()?;
    let b = |off: usize| c.get(off).copied().map(u64::from).unwrap_or(0x1_0000);
    let w = |off: usize| pci::cfg16(&c, off).map(u64::from).unwrap_or(0x1_0000);
    let d = |off: usize| pci::cfg32(&c, off).map(u64::from).unwrap_or(0x1_0000_0000);
    f.expect_hex("vendor", w(0), u64::from(pci::VENDOR))?;
    f.expect_hex("device", w(2), u64::from(pci::DEVICE))?;
    f.expect_hex("subsys_vendor", w(0x2c), 0x6972)?;
    f.expect_hex("subsys_device", w(0x2e), 0x0001)?;
    f.expect_hex("revision", b(8), 1)?;
    f.expect_hex("class", d(8) >> 8, 0xff_0000)?;
    f.expect_hex("header_type", b(0x0e) & 0x7f, 0)?;
    f.expect_eq("interrupt_pin", b(0x3d), 1)?;
    f.expect_eq("status_caplist", w(6) & 0x10 != 0, true)?;
    for (i, want) in [(0, 4096), (1, 0), (3, 0), (4, 4096), (5, 0)] {
        f.expect_eq(&format!("bar{i}"), pci.bar_size(i)?, want)?;
    }
    let bar2 = pci.bar_size(2)?;
    f.set("bar2", bar2);
    if bar2 < 8192 || !bar2.is_power_of_two() {
        bail!("BAR2 is {bar2:#x} bytes, expected a power of two >= 8 KiB");
    }
    let m = pci::msix_info(&c).ok_or_else(|| Error::msg("no MSI-X capability in config space"))?;
    f.expect_hex("msix_cap", m.cap as u64, 0x40)?;
    f.set("msix_vectors", m.vectors);
    f.expect_eq("table_bir", m.table_bir, 2)?;
    f.expect_hex("table_offset", u64::from(m.table_offset), 0)?;
    f.expect_eq("pba_bir", m.pba_bir, 2)?;
    let pba_want = (u64::from(m.vectors) * 16).next_multiple_of(4096);
    f.expect_hex("pba_offset", u64::from(m.pba_offset), pba_want)?;
    if pba_want + u64::from(m.vectors).div_ceil(64) * 8 > bar2 {
        bail!("the PBA does not fit in BAR2 ({bar2:#x} bytes)");
    }
    with_bar0(pci, |bar| {
        f.expect_hex(
            "magic",
            u64::from(bar.read32(regs::MAGIC)?),
            u64::from(regs::MAGIC_VALUE),
        )?;
        f.expect_eq("abi_version", bar.read32(regs::ABI_VERSION)?, 1)?;
        f.expect_hex("features", u64::from(bar.read32(regs::FEATURES)?), 0xf)?;
        f.expect_eq(
            "msix_vectors_reg",
            bar.read32(regs::MSIX_VECTORS)?,
            m.vectors,
        )?;
        f.set("evtchn_ports", bar.read32(regs::EVTCHN_PORTS)?);
        Ok(())
    })
}

fn scenario_doorbell(pci: &PciDev, f: &mut Facts, k: u32) -> Result<()> {
    with_bar0(pci, |bar| {
        let before = bar.read32(regs::DOORBELL_COUNT)?;
        let bad0 = bar.read32(regs::CNT_BAD_ACCESSES)?;
        for i in 0..k {
            bar.write32(regs::DOORBELL, i)?;
        }
        let after = bar.read32(regs::DOORBELL_COUNT)?;
        f.set("before", before);
        f.expect_eq("delta", after.wrapping_sub(before), k)?;
        f.expect_eq(
            "bad_accesses",
            bar.read32(regs::CNT_BAD_ACCESSES)?.wrapping_sub(bad0),
            0,
        )
    })
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("irqbridge-guest: {e}");
            println!("IRQBRIDGE-RESULT name=args status=FAIL error=\"{e}\"");
            println!("IRQBRIDGE-DONE pass=0 fail=1");
            return ExitCode::from(2);
        }
    };
    let mut rep = Reporter::default();
    let device = pci::find_device();
    for name in &opts.scenarios {
        if name == "boot" {
            rep.run("boot", scenario_boot);
            continue;
        }
        if name == VHOST_EVTCHN {
            vhost_evtchn::run(&mut rep, &opts);
            continue;
        }
        if name == PASSTHROUGH {
            passthrough::run(&mut rep, opts.count, PASSTHROUGH_IRQS);
            passthrough::run_e1000e(&mut rep, opts.rounds);
            passthrough::run_nested(&mut rep, opts.rounds);
            continue;
        }
        let pci = match &device {
            Ok(p) => p,
            Err(e) => {
                rep.record(name, &Facts::default(), &Err(Error::msg(e.to_string())));
                continue;
            }
        };
        match name.as_str() {
            "enum" => {
                rep.run("enum", |f| scenario_enum(pci, f));
            }
            "doorbell" => {
                rep.run("doorbell", |f| scenario_doorbell(pci, f, opts.doorbells));
            }
            "uio-intx" => {
                rep.run("uio-intx", |f| uio::run(pci, f, opts.count));
            }
            "vfio" => vfio_tests::run(&mut rep, pci, &opts),
            "evtchn" => evtchn::run(&mut rep, pci, &opts),
            _ => rep.record(
                name,
                &Facts::default(),
                &Err(Error::msg("unknown scenario")),
            ),
        }
    }
    rep.done();
    if rep.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn all_expands_in_order_and_options_parse() {
        let o = parse_args(args(&["--count=5", "all", "--vectors=6"])).expect("valid");
        assert_eq!(o.count, 5);
        assert_eq!(o.vectors, 6);
        assert_eq!(o.scenarios, args(ALL));
    }

    #[test]
    fn bad_arguments_are_rejected() {
        assert!(parse_args(args(&["nope"])).is_err());
        assert!(parse_args(args(&["--count=x", "enum"])).is_err());
        assert!(parse_args(args(&["--vectors=2", "evtchn"])).is_err());
        assert!(parse_args(args(&[])).is_err());
        assert!(parse_args(args(&["--bogus=1", "enum"])).is_err());
        assert!(parse_args(args(&["--virtio-id=0", "vhost-evtchn"])).is_err());
        assert!(parse_args(args(&["--virtio-id=65536", "vhost-evtchn"])).is_err());
    }

    #[test]
    fn vhost_evtchn_is_its_own_scenario() {
        let o = parse_args(args(&["vhost-evtchn"])).expect("valid");
        assert_eq!(o.scenarios, args(&["vhost-evtchn"]));
        assert_eq!(o.virtio_id, DEFAULT_VIRTIO_ID);
        let o = parse_args(args(&["--virtio-id=77", "boot", "vhost-evtchn"])).expect("valid");
        assert_eq!(o.virtio_id, 77);
        assert!(!ALL.contains(&VHOST_EVTCHN));
    }
}
