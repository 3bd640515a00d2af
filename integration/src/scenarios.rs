// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end scenarios on a [`Rig`]: the device server, the irqbridge-kvm plugin and the guest
//! agent on `/dev/kvm`. Every check counts exactly: a lost or an extra interrupt fails.
//!
//! | scenario | what is checked |
//! |---|---|
//! | [`Scenario::Intx`] | guest `INTX_ASSERT` → handler → EOI without de-assert → the line fires again; from the Nth run the handler writes `INTX_DEASSERT` before its EOI → exactly N runs and N trigger writes, then silence |
//! | [`Scenario::IntxDisable`] | COMMAND bit 10 (plugin config write) holds an asserted line back; clearing it delivers it exactly once |
//! | [`Scenario::Msix`] | table programmed by the guest through the plugin (routes mirrored), MSI-X enabled in config; each vector fires once; a masked vector sets its PBA bit and is delivered once on unmask; same with the function mask |
//! | [`Scenario::Msi`] | the MSI capability programmed by the guest through the config window (the plugin turns the writes into routes, irqfds and SET_IRQS(MSI)); 4 vectors, each fired once and run once on its own guest vector; a masked vector shows its pending bit and runs exactly once on unmask; after the guest disables MSI no vector runs and the device drops and counts every event |
//! | [`Scenario::EventChannels`] | a port masked by the guest in the shared page (no exit) stays pending; `EVTCHN_UNMASK` delivers it; every port of the device on one vector, each sent once and collected exactly once |
//! | [`Scenario::Doorbells`] | N guest doorbell writes cause no MMIO exit and no REGION_WRITE, and the server counts exactly N |
//!
//! "Silence" is checked by waiting [`ScenarioOptions::quiet`] and looking again.
//!
//! On a KVM that acks level interrupts when it injects them (the nested kvm-pvm of the
//! development machines, see [`crate::platform`]) the resample of the interrupt whose handler
//! de-asserts is signalled before the handler runs, and races with the de-assert: the server
//! handles its device fds on a thread of its own, beside the one serving the VMM's messages.
//! When the resample wins, the device re-fires once while the line is still high, so the INTx
//! scenarios accept one more handler run there, and still count exactly: every run has its
//! trigger write, and nothing runs once the line is settled.

use std::fmt::Debug;
use std::thread;
use std::time::{Duration, Instant};

use irqbridge_vfio_user::pci::DeviceConfig;
use irqbridge_vfio_user::pci::regs::{
    EVTCHN_STATUS_BOUND, INTX_STATUS_DISABLED, INTX_STATUS_LEVEL, INTX_STATUS_MASKED, REG_DOORBELL,
    REG_DOORBELL_COUNT, REG_EVTCHN_BIND, REG_EVTCHN_PORTS, REG_EVTCHN_QUERY, REG_EVTCHN_SEND,
    REG_EVTCHN_STATUS, REG_EVTCHN_UNMASK, REG_INTX_ASSERT, REG_INTX_DEASSERT, REG_INTX_STATUS,
    REG_MAGIC, REG_MSIX_FIRE, REGION_BAR0,
};
use irqbridge_vfio_user::pci::regs::{
    REG_CNT_MSI_DROPPED, REG_CNT_MSI_PENDING, REG_CNT_MSI_TRIGGERS, REG_MSI_FIRE,
};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::layout::{PORT_COUNTS_GPA, evtchn};
use crate::platform::level_ack_at_injection;
use crate::rig::{BAR0_GPA, BAR4_GPA, Rig, RigOptions};
use crate::stats::LatencyStats;
use crate::{Action, Guest};

/// Guest vector of the device's INTx line.
pub const INTX_VECTOR: u8 = 0x50;
/// Guest vector of MSI-X table entry `i` in [`Scenario::Msix`] is `MSIX_VECTOR_BASE + i`.
pub const MSIX_VECTOR_BASE: u8 = 0x60;
/// MSI-X vector (table entry) that event-channel ports are bound to.
pub const EVTCHN_MSIX_INDEX: u16 = 3;
/// Guest vector of that table entry.
pub const EVTCHN_VECTOR: u8 = 0x70;

/// Guest vector of MSI vector `i` in [`Scenario::Msi`] is `MSI_VECTOR_BASE + i` (Message
/// Data = the base, aligned to 32 so the device's multiple-message rule adds `i`).
pub const MSI_VECTOR_BASE: u8 = 0x80;

/// Settings of the scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScenarioOptions {
    /// How long "no further interrupt" is watched.
    pub quiet: Duration,
    /// Time limit of each wait for an expected event.
    pub timeout: Duration,
    /// INTx: the handler run from which on the handler de-asserts (N).
    pub intx_rounds: u64,
    /// MSI-X: table entries programmed and fired (at least 3).
    pub msix_vectors: u16,
    /// MSI: vectors enabled and fired (a power of two, at least 2).
    pub msi_vectors: u32,
    /// Event channels: ports of the device (all of them are bound and sent once).
    pub evtchn_ports: u32,
    /// Doorbells: guest writes.
    pub doorbells: u64,
    /// Latency samples per scenario (0: none).
    pub latency_samples: usize,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        ScenarioOptions {
            quiet: Duration::from_millis(50),
            timeout: Duration::from_secs(10),
            intx_rounds: 5,
            msix_vectors: 4,
            msi_vectors: 4,
            evtchn_ports: evtchn::MAX_PORTS,
            doorbells: 1000,
            latency_samples: 0,
        }
    }
}

/// One scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scenario {
    /// INTx level re-fire and de-assert.
    Intx,
    /// INTx held back by COMMAND bit 10.
    IntxDisable,
    /// MSI-X vectors, per-vector mask, function mask, PBA.
    Msix,
    /// MSI vectors from the guest's capability writes, per-vector mask, pending bits, disable.
    Msi,
    /// Event channels over the shared page.
    EventChannels,
    /// Doorbells through the ioeventfd.
    Doorbells,
}

impl Scenario {
    /// Every scenario, in demo order.
    pub const ALL: [Scenario; 6] = [
        Scenario::Intx,
        Scenario::IntxDisable,
        Scenario::Msix,
        Scenario::Msi,
        Scenario::EventChannels,
        Scenario::Doorbells,
    ];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Intx => "INTx level re-fire",
            Scenario::IntxDisable => "INTx COMMAND.10",
            Scenario::Msix => "MSI-X",
            Scenario::Msi => "MSI",
            Scenario::EventChannels => "event channels",
            Scenario::Doorbells => "doorbells",
        }
    }

    /// The rig this scenario needs.
    pub fn rig_options(self, opts: &ScenarioOptions) -> RigOptions {
        let mut device = DeviceConfig::default();
        if self == Scenario::EventChannels {
            device.evtchn_ports = opts.evtchn_ports;
        }
        RigOptions {
            device,
            ..RigOptions::default()
        }
    }

    /// Builds a fresh rig and runs the scenario on it.
    ///
    /// # Errors
    ///
    /// [`Error::Check`] when a count or state differs from the expected one, else the errors
    /// of [`Rig::new`] and of the guest commands.
    pub fn run(self, opts: &ScenarioOptions) -> Result<ScenarioOutcome> {
        let rig = Rig::new(self.rig_options(opts))?;
        self.run_on(&rig, opts)
    }

    /// Runs the scenario on `rig` (built with [`Scenario::rig_options`]).
    ///
    /// # Errors
    ///
    /// As [`Scenario::run`].
    pub fn run_on(self, rig: &Rig, opts: &ScenarioOptions) -> Result<ScenarioOutcome> {
        let (detail, latency) = match self {
            Scenario::Intx => intx(rig, opts)?,
            Scenario::IntxDisable => intx_disable(rig, opts)?,
            Scenario::Msix => msix(rig, opts)?,
            Scenario::Msi => msi(rig, opts)?,
            Scenario::EventChannels => event_channels(rig, opts)?,
            Scenario::Doorbells => doorbells(rig, opts)?,
        };
        expect_eq("plugin forwarding errors", rig.forward_errors(), 0)?;
        expect_eq("device bad accesses", rig.metrics().device.bad_accesses, 0)?;
        Ok(ScenarioOutcome {
            scenario: self,
            detail,
            latency,
        })
    }
}

/// What a passing scenario reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioOutcome {
    /// The scenario.
    pub scenario: Scenario,
    /// What was checked, with the counts seen.
    pub detail: String,
    /// Latency of the scenario's basic operation, if sampled (see each scenario).
    pub latency: Option<(String, LatencyStats)>,
}

type Checked = (String, Option<(String, LatencyStats)>);

/// [`Error::Check`] unless `got == want`.
///
/// # Errors
///
/// [`Error::Check`] naming `what`.
pub fn expect_eq<T: PartialEq + Debug>(what: &str, got: T, want: T) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Check(format!(
            "{what}: got {got:?}, expected {want:?}"
        )))
    }
}

/// Waits [`ScenarioOptions::quiet`] and checks that `count(vector)` is still `want`.
fn expect_quiet(
    g: &Guest,
    vector: u8,
    want: u64,
    opts: &ScenarioOptions,
    what: &str,
) -> Result<()> {
    expect_eq(what, g.count(vector), want)?;
    thread::sleep(opts.quiet);
    expect_eq(
        &format!("{what} after {:?}", opts.quiet),
        g.count(vector),
        want,
    )
}

/// Waits until `count(vector)` reaches `want`, then checks it stays there.
fn expect_exactly(
    g: &Guest,
    vector: u8,
    want: u64,
    opts: &ScenarioOptions,
    what: &str,
) -> Result<()> {
    g.wait_count(vector, want, opts.timeout)?;
    expect_quiet(g, vector, want, opts, what)
}

fn sample(
    what: &str,
    n: usize,
    mut one: impl FnMut() -> Result<Duration>,
) -> Result<Option<(String, LatencyStats)>> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(one()?);
    }
    Ok(LatencyStats::from_durations(&samples).map(|s| (what.to_string(), s)))
}

/// What the detail says about a KVM that acks level interrupts at injection.
fn ack_note(extra: u64) -> &'static str {
    if extra > 0 {
        "; this KVM acks at injection, so the resample of the de-asserting run re-fires once"
    } else {
        ""
    }
}

/// Waits until the INTx line has settled (every trigger write since `trig0` has had its
/// handler run since `count0`, and INTX_STATUS shows the line low and unmasked), checks that
/// it stays so for [`ScenarioOptions::quiet`], and that the handler ran between `lo` and `hi`
/// times. Returns the runs.
fn settle_intx(
    rig: &Rig,
    (count0, trig0): (u64, u64),
    (lo, hi): (u64, u64),
    opts: &ScenarioOptions,
    what: &str,
) -> Result<u64> {
    let g = rig.guest();
    g.wait_count(INTX_VECTOR, count0 + lo, opts.timeout)?;
    let deadline = Instant::now() + opts.timeout;
    loop {
        let runs = g.count(INTX_VECTOR) - count0;
        let trig = rig.metrics().device.intx_triggers - trig0;
        let status = rig.read_reg(REG_INTX_STATUS)?;
        if runs == trig && status & (INTX_STATUS_LEVEL | INTX_STATUS_MASKED) == 0 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(Error::Check(format!(
                "{what}: INTx never settled ({runs} runs, {trig} triggers, status {status:#x})"
            )));
        }
        thread::sleep(Duration::from_micros(200));
    }
    let runs = g.count(INTX_VECTOR) - count0;
    expect_quiet(g, INTX_VECTOR, count0 + runs, opts, what)?;
    expect_eq(
        &format!("{what}: trigger writes"),
        rig.metrics().device.intx_triggers - trig0,
        runs,
    )?;
    if !(lo..=hi).contains(&runs) {
        return Err(Error::Check(format!(
            "{what}: {runs} runs, expected {lo}..={hi}"
        )));
    }
    Ok(runs)
}

/// Waits (without the quiet period) until every INTx trigger has had its handler run and the
/// line is low and unmasked; `count0` is the handler count before the round.
fn wait_intx_settled(rig: &Rig, count0: u64, opts: &ScenarioOptions) -> Result<()> {
    let g = rig.guest();
    let runs0 = g.count(INTX_VECTOR);
    let trig0 = rig.metrics().device.intx_triggers;
    let deadline = Instant::now() + opts.timeout;
    loop {
        // Triggers and runs since this round's first run (which has happened).
        let runs = g.count(INTX_VECTOR) - runs0;
        let trig = rig.metrics().device.intx_triggers - trig0;
        let status = rig.read_reg(REG_INTX_STATUS)?;
        if runs >= trig && status & (INTX_STATUS_LEVEL | INTX_STATUS_MASKED) == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Check(format!(
                "INTx never settled after the round from count {count0}"
            )));
        }
        thread::sleep(Duration::from_micros(200));
    }
}

fn intx_pin(rig: &Rig) -> Result<u8> {
    rig.options()
        .intx_pin
        .ok_or_else(|| Error::Check("the rig has no INTx pin".into()))
}

/// INTx: level re-fire until the handler de-asserts.
fn intx(rig: &Rig, opts: &ScenarioOptions) -> Result<Checked> {
    let g = rig.guest();
    let n = opts.intx_rounds.max(1);
    expect_eq(
        "BAR0 MAGIC",
        rig.read_reg(REG_MAGIC)?,
        irqbridge_vfio_user::pci::regs::MAGIC,
    )?;
    g.ioapic_route(intx_pin(rig)?, INTX_VECTOR, true)?;
    let deassert = BAR0_GPA + REG_INTX_DEASSERT;
    g.set_action(
        INTX_VECTOR,
        Action::eoi().with_mmio_write_after(n, deassert, 1),
    )?;
    // Maybe one more run where KVM acks at injection (see `platform` and the module doc).
    let extra = u64::from(level_ack_at_injection()?);
    let before = rig.metrics().device;
    let hits0 = g.action_hits(INTX_VECTOR);
    let count0 = g.count(INTX_VECTOR);
    rig.write_reg(REG_INTX_ASSERT, 1)?;
    let runs = settle_intx(
        rig,
        (count0, before.intx_triggers),
        (n, n + extra),
        opts,
        "INTx handler runs",
    )?;
    expect_eq("INTx action hits", g.action_hits(INTX_VECTOR) - hits0, runs)?;
    let after = rig.metrics().device;
    expect_eq(
        "INTx unmasks that reached a masked line",
        after.intx_unmasks - before.intx_unmasks,
        runs,
    )?;
    let status = rig.read_reg(REG_INTX_STATUS)?;
    expect_eq("INTX_STATUS after the de-assert", status, 0)?;

    // Latency: guest INTX_ASSERT command → handler (which de-asserts, then EOIs) done.
    g.set_action(
        INTX_VECTOR,
        Action::eoi().with_mmio_write_after(1, deassert, 1),
    )?;
    let latency = sample(
        "guest INTX_ASSERT → handler done",
        opts.latency_samples,
        || {
            let c = g.count(INTX_VECTOR);
            let t0 = Instant::now();
            rig.write_reg(REG_INTX_ASSERT, 1)?;
            g.wait_count(INTX_VECTOR, c + 1, opts.timeout)?;
            let t = t0.elapsed();
            wait_intx_settled(rig, c, opts)?;
            Ok(t)
        },
    )?;
    let total = g.count(INTX_VECTOR) - count0;
    expect_quiet(
        g,
        INTX_VECTOR,
        count0 + total,
        opts,
        "INTx handler runs after the latency rounds",
    )?;
    expect_eq(
        "INTx trigger writes after the latency rounds",
        rig.metrics().device.intx_triggers - before.intx_triggers,
        total,
    )?;
    Ok((
        format!(
            "{runs} handler runs and {runs} trigger writes for one assert (EOI without \
             de-assert re-fires; de-assert from run {n}{}), then silent",
            ack_note(runs - n)
        ),
        latency,
    ))
}

/// INTx held back by COMMAND bit 10.
fn intx_disable(rig: &Rig, opts: &ScenarioOptions) -> Result<Checked> {
    let g = rig.guest();
    g.ioapic_route(intx_pin(rig)?, INTX_VECTOR, true)?;
    let deassert = BAR0_GPA + REG_INTX_DEASSERT;
    g.set_action(
        INTX_VECTOR,
        Action::eoi().with_mmio_write_after(1, deassert, 1),
    )?;
    rig.set_intx_disable(true)?;
    let before = rig.metrics().device;
    rig.write_reg(REG_INTX_ASSERT, 1)?;
    expect_quiet(g, INTX_VECTOR, 0, opts, "INTx runs while COMMAND.10 is set")?;
    let status = rig.read_reg(REG_INTX_STATUS)?;
    expect_eq(
        "INTX_STATUS level and COMMAND.10 bits while disabled",
        status & (INTX_STATUS_LEVEL | INTX_STATUS_DISABLED),
        INTX_STATUS_LEVEL | INTX_STATUS_DISABLED,
    )?;
    expect_eq(
        "INTx trigger writes while disabled",
        rig.metrics().device.intx_triggers - before.intx_triggers,
        0,
    )?;
    let extra = u64::from(level_ack_at_injection()?);
    let count0 = g.count(INTX_VECTOR);
    rig.set_intx_disable(false)?;
    let runs = settle_intx(
        rig,
        (count0, before.intx_triggers),
        (1, 1 + extra),
        opts,
        "INTx runs after clearing COMMAND.10",
    )?;
    let status = rig.read_reg(REG_INTX_STATUS)?;
    expect_eq(
        "INTX_STATUS after delivery",
        status & (INTX_STATUS_LEVEL | INTX_STATUS_MASKED | INTX_STATUS_DISABLED),
        0,
    )?;

    // Latency: COMMAND.10 cleared by the plugin's config write → pending INTx handler done.
    let latency = sample(
        "COMMAND.10 cleared → held INTx handler done",
        opts.latency_samples,
        || {
            rig.set_intx_disable(true)?;
            rig.write_reg(REG_INTX_ASSERT, 1)?;
            let c = g.count(INTX_VECTOR);
            let t0 = Instant::now();
            rig.set_intx_disable(false)?;
            g.wait_count(INTX_VECTOR, c + 1, opts.timeout)?;
            let t = t0.elapsed();
            wait_intx_settled(rig, c, opts)?;
            Ok(t)
        },
    )?;
    let total = g.count(INTX_VECTOR) - count0;
    expect_quiet(
        g,
        INTX_VECTOR,
        count0 + total,
        opts,
        "INTx runs after the latency rounds",
    )?;
    expect_eq(
        "INTx trigger writes after the latency rounds",
        rig.metrics().device.intx_triggers - before.intx_triggers,
        total,
    )?;
    Ok((
        format!(
            "asserted line held back while COMMAND.10 is set (STATUS level 1, no trigger); \
             delivered when cleared: {runs} run(s), {runs} trigger(s){}",
            ack_note(runs - 1)
        ),
        latency,
    ))
}

fn msix_vector(i: u16) -> u8 {
    MSIX_VECTOR_BASE.wrapping_add(i as u8)
}

/// MSI-X: fire, per-vector mask, function mask.
fn msix(rig: &Rig, opts: &ScenarioOptions) -> Result<Checked> {
    let g = rig.guest();
    let k = opts
        .msix_vectors
        .max(3)
        .min(rig.options().device.msix_vectors);
    if k < 3 {
        return Err(Error::Check("the MSI-X scenario needs 3 vectors".into()));
    }
    for i in 0..k {
        rig.msix_program(i, msix_vector(i), false)?;
    }
    rig.msix_set_control(true, false)?;
    let group = rig
        .device()
        .msix()
        .ok_or_else(|| Error::Check("the plugin did not wire MSI-X".into()))?;
    for i in 0..k {
        let route = group.route(u32::from(i));
        expect_eq(
            &format!("MSI route of vector {i} mirrored by the plugin"),
            route.map(|r| (r.address(), r.data)),
            Some((crate::layout::LAPIC_GPA, u32::from(msix_vector(i)))),
        )?;
    }
    let before = rig.metrics().device;
    for i in 0..k {
        rig.write_reg(REG_MSIX_FIRE, u32::from(i))?;
        g.wait_count(msix_vector(i), 1, opts.timeout)?;
    }
    thread::sleep(opts.quiet);
    for i in 0..k {
        expect_eq(&format!("runs of vector {i}"), g.count(msix_vector(i)), 1)?;
    }
    expect_eq(
        "MSI-X eventfd writes",
        rig.metrics().device.msix_triggers - before.msix_triggers,
        u64::from(k),
    )?;

    // Per-vector mask in the table.
    let v1 = msix_vector(1);
    rig.msix_set_masked(1, true)?;
    rig.write_reg(REG_MSIX_FIRE, 1)?;
    expect_quiet(g, v1, 1, opts, "runs of masked vector 1")?;
    expect_eq("PBA bit of masked vector 1", rig.msix_pba_bit(1)?, true)?;
    rig.msix_set_masked(1, false)?;
    expect_exactly(g, v1, 2, opts, "runs of vector 1 after unmask")?;
    expect_eq(
        "PBA bit of vector 1 after unmask",
        rig.msix_pba_bit(1)?,
        false,
    )?;

    // Function mask.
    let v2 = msix_vector(2);
    rig.msix_set_control(true, true)?;
    rig.write_reg(REG_MSIX_FIRE, 2)?;
    expect_quiet(g, v2, 1, opts, "runs of vector 2 under the function mask")?;
    expect_eq(
        "PBA bit of vector 2 under the function mask",
        rig.msix_pba_bit(2)?,
        true,
    )?;
    rig.msix_set_control(true, false)?;
    expect_exactly(g, v2, 2, opts, "runs of vector 2 after the function unmask")?;
    expect_eq(
        "PBA bit of vector 2 after the function unmask",
        rig.msix_pba_bit(2)?,
        false,
    )?;
    for i in (0..k).filter(|i| *i != 1 && *i != 2) {
        expect_eq(
            &format!("runs of vector {i} at the end"),
            g.count(msix_vector(i)),
            1,
        )?;
    }
    let after = rig.metrics().device;
    expect_eq("PBA sets", after.msix_pending - before.msix_pending, 2)?;
    expect_eq(
        "MSI-X eventfd writes at the end",
        after.msix_triggers - before.msix_triggers,
        u64::from(k) + 2,
    )?;

    // Latency: guest MSIX_FIRE command → handler done.
    let v0 = msix_vector(0);
    let latency = sample(
        "guest MSIX_FIRE → handler done",
        opts.latency_samples,
        || {
            let c = g.count(v0);
            let t0 = Instant::now();
            rig.write_reg(REG_MSIX_FIRE, 0)?;
            g.wait_count(v0, c + 1, opts.timeout)?;
            Ok(t0.elapsed())
        },
    )?;
    expect_quiet(
        g,
        v0,
        1 + opts.latency_samples as u64,
        opts,
        "runs of vector 0 after the latency rounds",
    )?;
    Ok((
        format!(
            "{k} vectors programmed through BAR2 (routes mirrored), each fired once and run once; \
             masked vector: PBA set, no run, one run on unmask; same with the function mask"
        ),
        latency,
    ))
}

fn msi_vector(i: u32) -> u8 {
    MSI_VECTOR_BASE.wrapping_add(i as u8)
}

/// MSI counters of the device (BAR0, read by the guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MsiCounters {
    triggers: u32,
    pending: u32,
    dropped: u32,
}

fn msi_counters(rig: &Rig) -> Result<MsiCounters> {
    Ok(MsiCounters {
        triggers: rig.read_reg(REG_CNT_MSI_TRIGGERS)?,
        pending: rig.read_reg(REG_CNT_MSI_PENDING)?,
        dropped: rig.read_reg(REG_CNT_MSI_DROPPED)?,
    })
}

/// MSI: enable through config writes, fire, per-vector mask and pending bits, disable.
fn msi(rig: &Rig, opts: &ScenarioOptions) -> Result<Checked> {
    let g = rig.guest();
    let layout = rig.msi_layout()?;
    let n = opts.msi_vectors.max(2).next_power_of_two();
    if layout.vectors < n {
        return Err(Error::Check(format!(
            "the MSI scenario needs {n} vectors, the device offers {}",
            layout.vectors
        )));
    }
    let group = rig
        .device()
        .msi()
        .ok_or_else(|| Error::Check("the plugin did not wire MSI".into()))?;
    rig.msi_program(MSI_VECTOR_BASE, 0)?;
    for i in 0..n {
        expect_eq(
            &format!("MSI vector {i} registered before the enable"),
            group.is_registered(i),
            Some(false),
        )?;
    }
    let before = msi_counters(rig)?;
    let set_irqs = rig.metrics().set_irqs;
    rig.msi_set_control(true, n)?;
    // INTx off, then SET_IRQS(MSI) with the vectors' eventfds.
    expect_eq(
        "SET_IRQS messages for the enable",
        rig.metrics().set_irqs - set_irqs,
        2,
    )?;
    for i in 0..n {
        expect_eq(
            &format!("MSI route of vector {i} set by the plugin"),
            group.route(i).map(|r| (r.address(), r.data)),
            Some((crate::layout::LAPIC_GPA, u32::from(MSI_VECTOR_BASE) + i)),
        )?;
    }
    for i in 0..n {
        rig.write_reg(REG_MSI_FIRE, i)?;
        g.wait_count(msi_vector(i), 1, opts.timeout)?;
    }
    thread::sleep(opts.quiet);
    for i in 0..n {
        expect_eq(
            &format!("runs of MSI vector {i}"),
            g.count(msi_vector(i)),
            1,
        )?;
    }
    let fired = msi_counters(rig)?;
    expect_eq("MSI eventfd writes", fired.triggers - before.triggers, n)?;

    // Per-vector mask: the event is held (pending bit), delivered exactly once on unmask.
    let v1 = msi_vector(1);
    rig.msi_set_mask(0b10)?;
    rig.write_reg(REG_MSI_FIRE, 1)?;
    rig.write_reg(REG_MSI_FIRE, 1)?;
    expect_quiet(g, v1, 1, opts, "runs of masked MSI vector 1")?;
    expect_eq(
        "MSI pending bits while masked",
        rig.msi_pending_bits()?,
        0b10,
    )?;
    rig.msi_set_mask(0)?;
    expect_exactly(g, v1, 2, opts, "runs of MSI vector 1 after unmask")?;
    expect_eq("MSI pending bits after unmask", rig.msi_pending_bits()?, 0)?;
    let unmasked = msi_counters(rig)?;
    expect_eq(
        "MSI eventfd writes after the unmask",
        unmasked.triggers - before.triggers,
        n + 1,
    )?;
    expect_eq(
        "MSI events held by the mask",
        unmasked.pending - before.pending,
        2,
    )?;

    // Disable: nothing runs, the device drops and counts every event; INTx is bound again.
    let set_irqs = rig.metrics().set_irqs;
    rig.msi_set_control(false, n)?;
    if rig.options().intx_pin.is_some() {
        expect_eq(
            "SET_IRQS messages for the disable (MSI off, INTx trigger/mask/unmask fd/unmask)",
            rig.metrics().set_irqs - set_irqs,
            5,
        )?;
    }
    for i in 0..n {
        rig.write_reg(REG_MSI_FIRE, i)?;
    }
    thread::sleep(opts.quiet);
    for i in 0..n {
        let want = if i == 1 { 2 } else { 1 };
        expect_eq(
            &format!("runs of MSI vector {i} after the disable"),
            g.count(msi_vector(i)),
            want,
        )?;
    }
    let after = msi_counters(rig)?;
    expect_eq(
        "MSI eventfd writes after the disable",
        after.triggers - before.triggers,
        n + 1,
    )?;
    expect_eq(
        "MSI events dropped while disabled",
        after.dropped - before.dropped,
        n,
    )?;

    // Latency: enabled again with one vector; guest MSI_FIRE → handler done.
    let v0 = msi_vector(0);
    let latency = if opts.latency_samples > 0 {
        rig.msi_set_control(true, 1)?;
        let l = sample(
            "guest MSI_FIRE → handler done",
            opts.latency_samples,
            || {
                let c = g.count(v0);
                let t0 = Instant::now();
                rig.write_reg(REG_MSI_FIRE, 0)?;
                g.wait_count(v0, c + 1, opts.timeout)?;
                Ok(t0.elapsed())
            },
        )?;
        rig.msi_set_control(false, 1)?;
        l
    } else {
        None
    };
    expect_quiet(
        g,
        v0,
        1 + opts.latency_samples as u64,
        opts,
        "runs of MSI vector 0 after the latency rounds",
    )?;
    Ok((
        format!(
            "{n} vectors enabled by guest config writes (INTx off, SET_IRQS(MSI), routes \
             data+i), each fired once and run once; masked vector: pending bit, no run, one \
             run on unmask; after disable {n} events dropped, no run"
        ),
        latency,
    ))
}

/// The host's view of a u64 of the event-channel page, read through the guest (a memory slot:
/// no exit).
fn page_word(g: &Guest, offset: u64) -> Result<u64> {
    g.mmio_read64(BAR4_GPA + offset)
}

/// Event channels: guest mask, unmask, and every port once.
fn event_channels(rig: &Rig, opts: &ScenarioOptions) -> Result<Checked> {
    let g = rig.guest();
    let ports = rig.read_reg(REG_EVTCHN_PORTS)?;
    expect_eq("EVTCHN_PORTS", ports, rig.options().device.evtchn_ports)?;
    rig.msix_program(EVTCHN_MSIX_INDEX, EVTCHN_VECTOR, false)?;
    rig.msix_set_control(true, false)?;
    let upcall = EVTCHN_MSIX_INDEX as u8;
    g.set_action(EVTCHN_VECTOR, Action::eoi().with_evtchn(BAR4_GPA, upcall))?;
    let bind = |p: u32| rig.write_reg(REG_EVTCHN_BIND, p | u32::from(EVTCHN_MSIX_INDEX) << 16);

    // Masking in the shared page: no exit; the send stays pending; EVTCHN_UNMASK delivers.
    let port = 5u32.min(ports - 1);
    let (word, bit) = (u64::from(port / 64) * 8, 1u64 << (port % 64));
    bind(port)?;
    rig.write_reg(REG_EVTCHN_QUERY, port)?;
    expect_eq(
        "EVTCHN_STATUS of the bound port",
        rig.read_reg(REG_EVTCHN_STATUS)?,
        EVTCHN_STATUS_BOUND | u32::from(EVTCHN_MSIX_INDEX) << 16,
    )?;
    let exits = rig.exit_stats();
    g.mmio_write64(BAR4_GPA + evtchn::MASK_OFFSET + word, bit)?;
    let mask = page_word(g, evtchn::MASK_OFFSET + word)?;
    let exits2 = rig.exit_stats();
    expect_eq(
        "MMIO exits of the guest's mask write and read-back",
        (exits2.mmio_reads + exits2.mmio_writes) - (exits.mmio_reads + exits.mmio_writes),
        0,
    )?;
    expect_eq("mask word read back", mask, bit)?;
    rig.write_reg(REG_EVTCHN_SEND, port)?;
    expect_quiet(g, EVTCHN_VECTOR, 0, opts, "upcalls for a masked port")?;
    expect_eq(
        "pending bit of the masked port",
        page_word(g, evtchn::PENDING_OFFSET + word)? & bit,
        bit,
    )?;
    expect_eq(
        "events collected on the masked port",
        g.port_count(port)?,
        0,
    )?;
    rig.write_reg(REG_EVTCHN_UNMASK, port)?;
    expect_exactly(g, EVTCHN_VECTOR, 1, opts, "upcalls after EVTCHN_UNMASK")?;
    expect_eq(
        "events collected after EVTCHN_UNMASK",
        g.port_count(port)?,
        1,
    )?;
    expect_eq(
        "mask and pending bits after collection",
        (
            page_word(g, evtchn::MASK_OFFSET + word)? & bit,
            page_word(g, evtchn::PENDING_OFFSET + word)? & bit,
        ),
        (0, 0),
    )?;

    // Every port on one vector, each sent once.
    rig.guest()
        .memory()
        .zero(PORT_COUNTS_GPA, u64::from(evtchn::MAX_PORTS) * 4)?;
    for p in 0..ports {
        bind(p)?;
    }
    let before = rig.metrics().device;
    let upcalls_before = g.count(EVTCHN_VECTOR);
    for p in 0..ports {
        rig.write_reg(REG_EVTCHN_SEND, p)?;
    }
    let deadline = Instant::now() + opts.timeout;
    loop {
        let mut seen = 0u64;
        for p in 0..ports {
            seen += u64::from(g.port_count(p)?.min(1));
        }
        if seen == u64::from(ports) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(Error::Check(format!(
                "{seen} of {ports} ports collected after {:?}",
                opts.timeout
            )));
        }
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(opts.quiet);
    for p in 0..ports {
        expect_eq(
            &format!("events collected on port {p}"),
            g.port_count(p)?,
            1,
        )?;
    }
    let after = rig.metrics().device;
    expect_eq(
        "event-channel sends",
        after.evtchn_sends - before.evtchn_sends,
        u64::from(ports),
    )?;
    let upcalls = g.count(EVTCHN_VECTOR) - upcalls_before;
    expect_eq(
        "upcall handler runs vs. upcalls the device fired",
        upcalls,
        after.evtchn_upcalls - before.evtchn_upcalls,
    )?;
    expect_eq(
        "handler runs vs. MSI-X eventfd writes (all time)",
        g.count(EVTCHN_VECTOR),
        after.msix_triggers,
    )?;

    // Latency: guest EVTCHN_SEND command → port collected by the upcall handler.
    let lport = port;
    let latency = sample(
        "guest EVTCHN_SEND → port collected",
        opts.latency_samples,
        || {
            let c = g.port_count(lport)?;
            let t0 = Instant::now();
            rig.write_reg(REG_EVTCHN_SEND, lport)?;
            loop {
                if g.port_count(lport)? > c {
                    return Ok(t0.elapsed());
                }
                if t0.elapsed() > opts.timeout {
                    return Err(Error::Check(format!("port {lport} not collected")));
                }
                std::hint::spin_loop();
            }
        },
    )?;
    Ok((
        format!(
            "masked port: pending, no upcall, no exit for the mask write; EVTCHN_UNMASK → 1 upcall; \
             {ports} ports on one vector each collected exactly once in {upcalls} upcalls"
        ),
        latency,
    ))
}

/// Doorbells: no exit, no message, exact count.
fn doorbells(rig: &Rig, opts: &ScenarioOptions) -> Result<Checked> {
    let g = rig.guest();
    let n = opts.doorbells;
    let ioevents = rig.device().ioevents();
    let wanted = Some(BAR0_GPA + REG_DOORBELL);
    if !ioevents
        .iter()
        .any(|e| e.bar == REGION_BAR0 && e.address == wanted)
    {
        return Err(Error::Check(format!(
            "no doorbell ioeventfd registered at {:#x}: {ioevents:?}",
            BAR0_GPA + REG_DOORBELL
        )));
    }
    let exits = rig.exit_stats();
    let before = rig.metrics();
    g.mmio_write32_repeat(BAR0_GPA + REG_DOORBELL, 1, n)?;
    let exits2 = rig.exit_stats();
    expect_eq(
        "MMIO exits for the doorbell writes",
        exits2.mmio_writes - exits.mmio_writes,
        0,
    )?;
    let target = before.device.doorbells + n;
    rig.wait_metrics("the server to count the doorbells", opts.timeout, |m| {
        m.device.doorbells >= target
    })?;
    thread::sleep(opts.quiet);
    let after = rig.metrics();
    expect_eq(
        "doorbells counted by the server",
        after.device.doorbells,
        target,
    )?;
    expect_eq(
        "REGION_WRITE messages to DOORBELL",
        after.doorbell_writes - before.doorbell_writes,
        0,
    )?;
    expect_eq(
        "REGION_WRITE messages to BAR0",
        after.region_writes[0] - before.region_writes[0],
        0,
    )?;
    expect_eq(
        "DOORBELL_COUNT read by the guest",
        u64::from(rig.read_reg(REG_DOORBELL_COUNT)?),
        target & 0xffff_ffff,
    )?;

    // Latency: per doorbell, in bursts (command start → server counted the whole burst).
    const BURST: u64 = 16;
    let latency = sample(
        "per doorbell in bursts of 16, as the server saw them arrive",
        opts.latency_samples,
        || doorbell_burst(rig, BURST, opts.timeout),
    )?;
    Ok((
        format!(
            "{n} guest writes: 0 MMIO exits, 0 REGION_WRITE messages, server and DOORBELL_COUNT \
             read {n}"
        ),
        latency,
    ))
}

/// One burst of `burst` back-to-back guest doorbell writes (one agent command); returns the
/// time per doorbell as the server saw them arrive: from the first change of its doorbell
/// count to the change that completed the burst, divided by the doorbells in between. This
/// leaves out the agent command's dispatch and the server's first wake-up, which are the same
/// on every path. If the server saw the whole burst at once, the time from issuing the command
/// is used instead (which overstates it).
///
/// # Errors
///
/// As [`Guest::command`]; [`Error::Timeout`] if the server does not count them in time.
pub fn doorbell_burst(rig: &Rig, burst: u64, timeout: Duration) -> Result<Duration> {
    let metrics = rig.server().metrics();
    let target = metrics.doorbells() + burst.max(1);
    metrics.arm_doorbell_mark();
    let t0 = Instant::now();
    rig.guest()
        .mmio_write32_repeat(BAR0_GPA + REG_DOORBELL, 1, burst.max(1))?;
    loop {
        if metrics.doorbells() >= target {
            let end = metrics.doorbell_changed_at().unwrap_or_else(Instant::now);
            return Ok(match metrics.doorbell_mark() {
                Some((first, count)) if count < target => {
                    let n = u32::try_from(target - count).unwrap_or(u32::MAX);
                    end.saturating_duration_since(first) / n
                }
                _ => end.saturating_duration_since(t0) / u32::try_from(burst.max(1)).unwrap_or(1),
            });
        }
        if t0.elapsed() > timeout {
            return Err(Error::Timeout {
                what: format!("the server to count {burst} doorbells"),
                timeout,
            });
        }
        // The end time is the server's: waiting here need not be fast, only out of the way.
        thread::sleep(Duration::from_micros(20));
    }
}
