// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Benchmarks of the interrupt paths, each a p50 ratio against a baseline measured in the same
//! run ([`run`]).
//!
//! | row | measured | baseline (same run) | goal |
//! |---|---|---|---|
//! | [`Row::MsixFire`] | the server fires an MSI-X vector (device model + its eventfd write) → guest handler done | the VMM writes the same irqfd itself | ≤ 1.10× |
//! | [`Row::IntxLoop`] | INTx assert → guest handler → EOI → resample → server unmask → line ready | the same loop with the VMM acting as the device (own irqfd + resamplefd on another pin) | ≤ 1.25× |
//! | [`Row::Doorbell`] | guest doorbell → server notified, through the ioeventfd | the same doorbell trapped and forwarded as a REGION_WRITE (posted, like QEMU) | ≥ 3× faster |
//! | [`Row::RegionRead`] | vfio-user REGION_READ of 4 bytes, round trip, on the `irqbridge vfio-user` process | a two-process AF_UNIX ping-pong of the same sizes | ≤ 1.10× |
//! | [`Row::RegionWritePosted`] | posted REGION_WRITEs at pipeline depth 16 (+ one REGION_READ), per write | the same bytes through a forked echo | ≤ 1.25× |
//!
//! How each is timed:
//!
//! - **MSI-X**: both paths start on a timestamp taken by the thread that writes the eventfd,
//!   just before it acts: the server thread (a [`HookRequest::MsixFire`] runs the device model,
//!   which writes the vector's irqfd) or the benchmark thread (which writes the duplicate of the
//!   same irqfd the plugin gave the device). Both end when the benchmark thread sees the
//!   guest's handler count move (the agent increments it after its EOI). The wake-up of the
//!   server thread is not part of the path and is not measured.
//! - **INTx**: both loops start just before the trigger write and end when the "device" has
//!   read the resample eventfd and found the line ready, on the device's own thread: the server
//!   thread running the real INTx model ([`HookRequest::IntxPulse`]: assert, de-assert, then
//!   wait for the resample-driven unmask in the server's poll loop), or a plain thread that
//!   writes its trigger eventfd and blocks in `poll` on its resample eventfd.
//! - **Doorbell**: one agent command makes `burst` back-to-back 32-bit writes to DOORBELL;
//!   the server thread timestamps every change of its doorbell count, and a sample is the time
//!   from the first change of the burst to the change that completes it, divided by the
//!   doorbells in between ([`doorbell_burst`]): the steady-state cost of one doorbell from the
//!   guest's store to the server having counted it, without the agent command's dispatch and
//!   the server's first wake-up (the same on both paths). The trapped path is a second rig
//!   without the ioeventfd, whose writes are forwarded as posted REGION_WRITEs (like QEMU; the
//!   fastest trapped variant).
//! - **REGION_READ** and **posted REGION_WRITE**: see [`crate::bench_socket`] (the server in
//!   its own process, a forked echo as the baseline, everything pinned to one CPU).
//!
//! Samples of the two paths of a row are taken alternately, after a warm-up, so that drift and
//! background load hit both alike. Goals are judged on p50.

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::error::{Error, Result};
use crate::rig::{Rig, RigOptions};
use crate::scenarios::{INTX_VECTOR, doorbell_burst};
use crate::server::{HookEventKind, HookRequest};
use crate::stats::{LatencyStats, cdf_of_durations, progress_advance, progress_begin};
use crate::{Action, Guest};

/// Settings of [`run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchOptions {
    /// Samples per path and row.
    pub iterations: usize,
    /// Unrecorded rounds per path before sampling.
    pub warmup: usize,
    /// Guest writes per doorbell sample.
    pub doorbell_burst: u64,
    /// CPU for the pinned REGION_READ row; `None` picks the last CPU this process may use.
    pub pin_cpu: Option<usize>,
    /// Time limit of each wait.
    pub timeout: Duration,
    /// Rows on a VM (MSI-X, INTx, doorbell): pin the vCPU thread and the device server thread
    /// to these CPUs (vCPU, server). `None` picks the first and the last CPU this process may
    /// use when they differ, and pins nothing on a single CPU.
    pub rig_cpus: Option<(usize, usize)>,
    /// Whether to pin the VM rows at all.
    pub pin_rigs: bool,
    /// Run only this row.
    pub only: Option<Row>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            iterations: 1000,
            warmup: 100,
            doorbell_burst: 64,
            pin_cpu: None,
            timeout: Duration::from_secs(10),
            rig_cpus: None,
            pin_rigs: true,
            only: None,
        }
    }
}

/// A benchmark row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Row {
    /// Server fires an MSI-X vector → guest handler.
    MsixFire,
    /// INTx assert → handler → EOI → resample → server unmask → ready.
    IntxLoop,
    /// Guest doorbell → server notified.
    Doorbell,
    /// vfio-user REGION_READ of 4 bytes.
    RegionRead,
    /// Posted REGION_WRITE throughput at pipeline depth 16.
    RegionWritePosted,
}

impl Row {
    /// Every row, in report order.
    pub const ALL: [Row; 5] = [
        Row::MsixFire,
        Row::IntxLoop,
        Row::Doorbell,
        Row::RegionRead,
        Row::RegionWritePosted,
    ];

    /// The row's name on the command line: `msix`, `intx`, `doorbell`, `region-read`,
    /// `region-write`.
    pub fn name(self) -> &'static str {
        match self {
            Row::MsixFire => "msix",
            Row::IntxLoop => "intx",
            Row::Doorbell => "doorbell",
            Row::RegionRead => "region-read",
            Row::RegionWritePosted => "region-write",
        }
    }

    /// The row named `name` (see [`Row::name`]).
    pub fn from_name(name: &str) -> Option<Row> {
        Row::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// The goal of a row, on p50.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "factor", rename_all = "snake_case")]
pub enum Goal {
    /// measured / baseline ≤ this.
    AtMost(f64),
    /// baseline / measured ≥ this (the measured path is this many times faster).
    FasterBy(f64),
}

impl fmt::Display for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Goal::AtMost(x) => write!(f, "<= {x:.2}x"),
            Goal::FasterBy(x) => write!(f, ">= {x:.1}x faster"),
        }
    }
}

/// One measured row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchRow {
    /// Which row.
    pub row: Row,
    /// What the measured path is.
    pub path: String,
    /// What the baseline is.
    pub baseline: String,
    /// The measured path.
    pub measured_stats: LatencyStats,
    /// The baseline.
    pub baseline_stats: LatencyStats,
    /// The goal.
    pub goal: Goal,
    /// measured p50 / baseline p50 for [`Goal::AtMost`], baseline p50 / measured p50 for
    /// [`Goal::FasterBy`].
    pub ratio: f64,
    /// Whether the goal is met.
    pub met: bool,
    /// CDF of the measured path: `[fraction, µs]` at [`crate::stats::CDF_FRACTIONS`].
    pub measured_cdf: Vec<[f64; 2]>,
    /// CDF of the baseline, likewise.
    pub baseline_cdf: Vec<[f64; 2]>,
}

impl BenchRow {
    pub(crate) fn new(
        row: Row,
        path: &str,
        baseline: &str,
        goal: Goal,
        measured: &[Duration],
        base: &[Duration],
    ) -> Result<BenchRow> {
        let (Some(m), Some(b)) = (
            LatencyStats::from_durations(measured),
            LatencyStats::from_durations(base),
        ) else {
            return Err(Error::InvalidArgument("a benchmark needs samples".into()));
        };
        let (ratio, met) = match goal {
            Goal::AtMost(x) => {
                let r = m.p50_us / b.p50_us;
                (r, r <= x)
            }
            Goal::FasterBy(x) => {
                let r = b.p50_us / m.p50_us;
                (r, r >= x)
            }
        };
        Ok(BenchRow {
            row,
            path: path.into(),
            baseline: baseline.into(),
            measured_stats: m,
            baseline_stats: b,
            goal,
            ratio,
            met,
            measured_cdf: cdf_of_durations(measured),
            baseline_cdf: cdf_of_durations(base),
        })
    }
}

/// The result of [`run`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// Options used.
    pub iterations: usize,
    /// Warm-up rounds per path.
    pub warmup: usize,
    /// Writes per doorbell sample.
    pub doorbell_burst: u64,
    /// CPU of the pinned REGION_READ row.
    pub pinned_cpu: usize,
    /// CPUs of the vCPU and the server thread in the VM rows, if pinned.
    pub rig_cpus: Option<(usize, usize)>,
    /// The rows.
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    /// Whether every row meets its goal.
    pub fn all_met(&self) -> bool {
        self.rows.iter().all(|r| r.met)
    }

    /// Prints [`BenchReport`]'s table (its `Display`) to stdout.
    pub fn print_table(&self) {
        print!("{self}");
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "irqbridge bench: {} samples per path after {} warm-up rounds (p50 / p99 in µs)",
            self.iterations, self.warmup
        )?;
        writeln!(
            f,
            "{:<44} {:>9} {:>9} | {:<44} {:>9} {:>9} | {:>6} {:<16} met",
            "path", "p50", "p99", "baseline", "p50", "p99", "ratio", "goal"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<44} {:>9.1} {:>9.1} | {:<44} {:>9.1} {:>9.1} | {:>5.2}x {:<16} {}",
                r.path,
                r.measured_stats.p50_us,
                r.measured_stats.p99_us,
                r.baseline,
                r.baseline_stats.p50_us,
                r.baseline_stats.p99_us,
                r.ratio,
                r.goal.to_string(),
                if r.met { "yes" } else { "NO" }
            )?;
        }
        Ok(())
    }
}

/// Runs the four benchmarks; see the [module documentation](self).
///
/// Progress (one phase per row, one step per pair of samples) goes to the sink installed with
/// [`crate::stats::set_progress_sink`], if any.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for `iterations` 0 (no samples, no goal can be judged);
/// [`Error::KvmUnavailable`] without `/dev/kvm`; any failure of the rigs or the paths.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    if opts.iterations == 0 {
        return Err(Error::InvalidArgument(
            "the benchmark needs at least one sample per path".into(),
        ));
    }
    if let Some(reason) = crate::kvm_unavailable_reason() {
        return Err(Error::KvmUnavailable(reason));
    }
    let opts = *opts;
    let cpu = match opts.pin_cpu {
        Some(c) => c,
        None => last_allowed_cpu()?,
    };
    let rig_cpus = match (opts.pin_rigs, opts.rig_cpus) {
        (false, _) => None,
        (true, Some(c)) => Some(c),
        (true, None) => {
            let (first, last) = (first_allowed_cpu()?, cpu);
            (first != last).then_some((first, last))
        }
    };
    let opts = BenchOptions { rig_cpus, ..opts };
    let want = |r: Row| opts.only.is_none_or(|o| o == r);
    let wanted = Row::ALL.iter().filter(|&&r| want(r)).count();
    let mut started = 0;
    let mut phase = |row: Row| {
        started += 1;
        let rounds = (opts.warmup + opts.iterations) as u64;
        progress_begin(&format!("[{started}/{wanted}] {}", row.name()), rounds);
    };
    let mut rows = Vec::new();
    if want(Row::MsixFire) || want(Row::IntxLoop) {
        let rig = Rig::new(rig_options(&opts))?;
        if want(Row::MsixFire) {
            phase(Row::MsixFire);
            rows.push(msix_fire(&rig, &opts)?);
        }
        if want(Row::IntxLoop) {
            phase(Row::IntxLoop);
            rows.push(intx_loop(&rig, &opts)?);
        }
    }
    if want(Row::Doorbell) {
        phase(Row::Doorbell);
        rows.push(doorbell(&opts)?);
    }
    if want(Row::RegionRead) {
        phase(Row::RegionRead);
        rows.push(crate::bench_socket::region_read_row(&opts, cpu)?);
    }
    if want(Row::RegionWritePosted) {
        phase(Row::RegionWritePosted);
        rows.push(crate::bench_socket::region_write_posted_row(&opts, cpu)?);
    }
    Ok(BenchReport {
        rig_cpus,
        iterations: opts.iterations,
        warmup: opts.warmup,
        doorbell_burst: opts.doorbell_burst,
        pinned_cpu: cpu,
        rows,
    })
}

/// The rig of the VM rows.
fn rig_options(opts: &BenchOptions) -> RigOptions {
    RigOptions {
        vcpu_cpu: opts.rig_cpus.map(|c| c.0),
        server_cpu: opts.rig_cpus.map(|c| c.1),
        ..RigOptions::default()
    }
}

/// Pins the calling thread to `cpu`.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for a CPU number out of range, [`Error::Io`] if the kernel
/// refuses.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(Error::InvalidArgument(format!("CPU {cpu}")));
    }
    // SAFETY: `cpu` is within the set (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The highest CPU number the calling thread may run on.
///
/// # Errors
///
/// [`Error::Io`] if the affinity cannot be read.
pub fn last_allowed_cpu() -> Result<usize> {
    allowed_cpus()?
        .last()
        .copied()
        .ok_or_else(|| Error::InvalidArgument("the affinity mask is empty".into()))
}

/// The lowest CPU number the calling thread may run on.
///
/// # Errors
///
/// [`Error::Io`] if the affinity cannot be read.
pub fn first_allowed_cpu() -> Result<usize> {
    allowed_cpus()?
        .first()
        .copied()
        .ok_or_else(|| Error::InvalidArgument("the affinity mask is empty".into()))
}

/// The CPUs the calling thread may run on, in increasing order.
///
/// # Errors
///
/// [`Error::Io`] if the affinity cannot be read.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: as in `pin_current_thread`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: every index is below the set's size.
    Ok((0..max)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Spins (yielding) until `count(vector)` exceeds `from`; returns when it saw it.
fn wait_past(g: &Guest, vector: u8, from: u64, timeout: Duration) -> Result<Instant> {
    let start = Instant::now();
    loop {
        if g.count(vector) > from {
            return Ok(Instant::now());
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout {
                what: format!("count[{vector:#x}] > {from}"),
                timeout,
            });
        }
        thread::yield_now();
    }
}

/// Runs `a` and `b` alternately, `warmup` unrecorded rounds then `iterations` recorded ones,
/// advancing the progress phase once a round.
pub(crate) fn alternate(
    opts: &BenchOptions,
    mut a: impl FnMut() -> Result<Duration>,
    mut b: impl FnMut() -> Result<Duration>,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    for _ in 0..opts.warmup {
        a()?;
        b()?;
        progress_advance(1);
    }
    let mut sa = Vec::with_capacity(opts.iterations);
    let mut sb = Vec::with_capacity(opts.iterations);
    for _ in 0..opts.iterations {
        sa.push(a()?);
        sb.push(b()?);
        progress_advance(1);
    }
    Ok((sa, sb))
}

/// Row 1: the server fires an MSI-X vector vs. the VMM writing the same irqfd.
fn msix_fire(rig: &Rig, opts: &BenchOptions) -> Result<BenchRow> {
    const INDEX: u16 = 0;
    const VECTOR: u8 = 0x60;
    let g = rig.guest();
    rig.msix_program(INDEX, VECTOR, false)?;
    rig.msix_set_control(true, false)?;
    g.set_action(VECTOR, Action::eoi())?;
    let group = rig
        .device()
        .msix()
        .ok_or_else(|| Error::Check("the plugin did not wire MSI-X".into()))?;
    let irqfd = group
        .notifiers()
        .map_err(Error::plugin("MSI-X notifiers"))?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Check("no MSI-X vector 0".into()))?;
    let server = rig.server();
    server.drain_events();
    let via_server = || -> Result<Duration> {
        let c = g.count(VECTOR);
        server.hook(HookRequest::MsixFire { vector: INDEX })?;
        let done = wait_past(g, VECTOR, c, opts.timeout)?;
        let ev = server.next_event(opts.timeout)?;
        match ev.kind {
            HookEventKind::MsixFired { sent: true, .. } => {
                Ok(done.saturating_duration_since(ev.started))
            }
            other => Err(Error::Check(format!("MSI-X hook reported {other:?}"))),
        }
    };
    let via_vmm = || -> Result<Duration> {
        let c = g.count(VECTOR);
        let t0 = Instant::now();
        irqfd.write(1).map_err(Error::Io)?;
        let done = wait_past(g, VECTOR, c, opts.timeout)?;
        Ok(done.saturating_duration_since(t0))
    };
    let before = g.count(VECTOR);
    let (m, b) = alternate(opts, via_server, via_vmm)?;
    let rounds = 2 * (opts.warmup + opts.iterations) as u64;
    thread::sleep(Duration::from_millis(20));
    crate::scenarios::expect_eq(
        "MSI-X handler runs in the benchmark",
        g.count(VECTOR) - before,
        rounds,
    )?;
    BenchRow::new(
        Row::MsixFire,
        "server fires MSI-X vector -> guest handler",
        "VMM writes the same irqfd",
        Goal::AtMost(1.10),
        &m,
        &b,
    )
}

/// The VMM acting as an INTx device: a thread with its own level irqfd and resamplefd.
struct VmmIntx {
    cmd: EventFd,
    results: mpsc::Receiver<Result<Duration>>,
    thread: Option<thread::JoinHandle<()>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl VmmIntx {
    fn start(rig: &Rig, gsi: u32, timeout: Duration) -> Result<VmmIntx> {
        let trigger = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Io)?;
        let resample = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Io)?;
        rig.guest()
            .vm()
            .vm_fd()
            .register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(Error::kvm("KVM_IRQFD(RESAMPLE)"))?;
        let cmd = EventFd::new(EFD_CLOEXEC).map_err(Error::Io)?;
        let cmd2 = cmd.try_clone().map_err(Error::Io)?;
        let (tx, rx) = mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = std::sync::Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("vmm-intx".into())
            .spawn(move || {
                let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
                loop {
                    // Blocking read: wait for the next round.
                    if cmd2.read().is_err() || stop2.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    let t0 = Instant::now();
                    let r = trigger
                        .write(1)
                        .map_err(Error::Io)
                        .and_then(|()| poll_in(&resample, ms))
                        .and_then(|()| resample.read().map(drop).map_err(Error::Io))
                        .map(|()| t0.elapsed());
                    if tx.send(r).is_err() {
                        return;
                    }
                }
            })
            .map_err(Error::Io)?;
        Ok(VmmIntx {
            cmd,
            results: rx,
            thread: Some(thread),
            stop,
        })
    }

    fn round(&self, timeout: Duration) -> Result<Duration> {
        self.cmd.write(1).map_err(Error::Io)?;
        match self.results.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                what: "the VMM INTx loop".into(),
                timeout,
            }),
        }
    }
}

impl Drop for VmmIntx {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.cmd.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until `fd` is readable, for at most `ms` milliseconds.
fn poll_in(fd: &EventFd, ms: i32) -> Result<()> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        match r {
            1 => return Ok(()),
            0 => {
                return Err(Error::Timeout {
                    what: "the resample eventfd".into(),
                    timeout: Duration::from_millis(ms as u64),
                });
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::Io(e));
                }
            }
        }
    }
}

/// Row 2: the INTx loop through the server vs. the VMM acting as the device.
fn intx_loop(rig: &Rig, opts: &BenchOptions) -> Result<BenchRow> {
    const VMM_PIN: u8 = 12;
    const VMM_VECTOR: u8 = 0x51;
    let g = rig.guest();
    let pin = rig
        .options()
        .intx_pin
        .ok_or_else(|| Error::Check("the rig has no INTx pin".into()))?;
    // The benchmark's MSI-X row enabled MSI-X, which suppresses INTx: turn it off.
    rig.msix_set_control(false, false)?;
    g.ioapic_route(pin, INTX_VECTOR, true)?;
    g.ioapic_route(VMM_PIN, VMM_VECTOR, true)?;
    g.set_action(INTX_VECTOR, Action::eoi())?;
    g.set_action(VMM_VECTOR, Action::eoi())?;
    let vmm = VmmIntx::start(rig, u32::from(VMM_PIN), opts.timeout)?;
    let server = rig.server();
    server.drain_events();
    let via_server = || -> Result<Duration> {
        server.hook(HookRequest::IntxPulse)?;
        let ev = server.next_event(opts.timeout)?;
        match ev.kind {
            HookEventKind::IntxReady => Ok(ev.finished.saturating_duration_since(ev.started)),
            other => Err(Error::Check(format!("INTx hook reported {other:?}"))),
        }
    };
    let via_vmm = || vmm.round(opts.timeout);
    let (c0, v0) = (g.count(INTX_VECTOR), g.count(VMM_VECTOR));
    let (m, b) = alternate(opts, via_server, via_vmm)?;
    let rounds = (opts.warmup + opts.iterations) as u64;
    thread::sleep(Duration::from_millis(20));
    crate::scenarios::expect_eq(
        "INTx handler runs (server, VMM) in the benchmark",
        (g.count(INTX_VECTOR) - c0, g.count(VMM_VECTOR) - v0),
        (rounds, rounds),
    )?;
    BenchRow::new(
        Row::IntxLoop,
        "INTx assert->handler->EOI->resample->unmask",
        "same loop, VMM acting as the device",
        Goal::AtMost(1.25),
        &m,
        &b,
    )
}

/// Row 3: doorbells through the ioeventfd vs. trapped REGION_WRITEs.
fn doorbell(opts: &BenchOptions) -> Result<BenchRow> {
    let burst = opts.doorbell_burst.max(1);
    let pinned = rig_options(opts);
    let fast = Rig::new(pinned)?;
    let trapped = Rig::new(RigOptions {
        ioeventfds: false,
        posted_writes: true,
        ..pinned
    })?;
    // Neither path needs the benchmark thread to spin: the end time is the server's.
    fast.guest().set_poll_spin(Duration::ZERO);
    trapped.guest().set_poll_spin(Duration::ZERO);
    let per = |rig: &Rig| -> Result<Duration> { doorbell_burst(rig, burst, opts.timeout) };
    let trapped_before = trapped.metrics().doorbell_writes;
    let fast_before = fast.metrics().doorbell_writes;
    let (m, b) = alternate(opts, || per(&fast), || per(&trapped))?;
    let rounds = (opts.warmup + opts.iterations) as u64 * burst;
    crate::scenarios::expect_eq(
        "REGION_WRITEs to DOORBELL (ioeventfd rig, trapped rig)",
        (
            fast.metrics().doorbell_writes - fast_before,
            trapped.metrics().doorbell_writes - trapped_before,
        ),
        (0, rounds),
    )?;
    BenchRow::new(
        Row::Doorbell,
        &format!("guest doorbell -> server, ioeventfd (x{burst})"),
        "trapped, posted REGION_WRITE",
        Goal::FasterBy(3.0),
        &m,
        &b,
    )
}
