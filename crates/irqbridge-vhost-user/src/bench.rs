// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Event delivery benchmark over real vhost-user connections, against eventfd baselines.
//!
//! One backend process (this one) serves two sockets, A and B, each with a [`Driver`]
//! connected (EVENT_IDX negotiated, 256-entry queues, 4096 ports bound to upcall 0 on B).
//! The *guest* of B runs on its own thread: it waits on B's event-queue call fd, takes the
//! upcall records, re-posts their buffers and runs the guest handler
//! ([`guest_collect`]) on B's page. Every measurement is paired with a baseline between the
//! same two threads where the event is a plain eventfd write, waited for the same way (the
//! guest thread polls both fds), measured in the same run with evtchn and eventfd rounds
//! alternating, so that both see the same host conditions (on a nested-virtualised host,
//! thread wake-up latency drifts by an order of magnitude over seconds):
//!
//! - **latency N**: the main thread sends one event to each of N ports of B
//!   ([`Router::send`](crate::Router::send), one router lock per burst); the guest thread
//!   collects until it has all N and writes an ack eventfd; the main thread waits for the ack.
//!   Median round trip. Baseline: N eventfd writes, the guest thread reads until the counter
//!   sum is N, ack.
//! - **throughput N**: the same bursts back to back, the main thread spinning on a counter of
//!   collected events instead of waiting for an ack. Events per second.
//! - **doorbell A → B**: the main thread, as A's guest, rings A's doorbell queue for port 0,
//!   which is linked to B's port 0; B's guest collects it and acks. Median round trip.
//!   Baseline: an eventfd write from the main thread to B's guest thread, ack.
//!
//! The latency rows keep their CDFs ([`BenchRow::value_cdf`], [`BenchRow::baseline_cdf`]) for
//! plots, the report serializes to JSON ([`BenchReport::to_json`]), and [`run_observed`]
//! reports progress to a [`BenchProgress`].

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use irqbridge_core::evtchn::guest_collect;
use serde::Serialize;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EventFd};

use crate::abi::event_queue;
use crate::driver::{Driver, DriverConfig, GuestRam, wait_readable};
use crate::error::{Error, Result};
use crate::router::ConnId;
use crate::server::{Backend, BackendConfig, Server};

/// Guest address of the event-channel page in both guests.
const PAGE_GPA: u64 = 0x1000;
const QUEUE_SIZE: u16 = 256;
const PORTS: u32 = 4096;
const A: ConnId = ConnId(0);
const B: ConnId = ConnId(1);

/// Benchmark sizes.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// Latency rounds with 64 active ports; fewer with more ports, more with fewer.
    pub latency_rounds: u32,
    /// Events per throughput measurement (rounds = events / ports).
    pub throughput_events: u32,
    /// Doorbell round trips.
    pub doorbell_rounds: u32,
    /// Round trips of each kind run before measuring.
    pub warm_up_rounds: u32,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            latency_rounds: 1000,
            throughput_events: 200_000,
            doorbell_rounds: 2000,
            warm_up_rounds: 3000,
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchRow {
    /// What was measured.
    pub test: String,
    /// Unit of `value` and `baseline`.
    pub unit: &'static str,
    /// The event-channel measurement.
    pub value: f64,
    /// The eventfd baseline between the same threads, same run.
    pub baseline: f64,
    /// Latency rows: the CDF of the event-channel round trips as `[fraction, µs]` points at
    /// [`CDF_FRACTIONS`]; empty for throughput rows.
    pub value_cdf: Vec<[f64; 2]>,
    /// Latency rows: the CDF of the baseline round trips, likewise.
    pub baseline_cdf: Vec<[f64; 2]>,
}

impl BenchRow {
    /// `value / baseline` (latency: above 1 is slower; throughput: below 1 is slower).
    pub fn ratio(&self) -> f64 {
        if self.baseline == 0.0 {
            f64::NAN
        } else {
            self.value / self.baseline
        }
    }
}

/// The benchmark results.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BenchReport {
    /// Measurements.
    pub rows: Vec<BenchRow>,
    /// Setup notes.
    pub notes: Vec<String>,
}

impl BenchReport {
    /// Print the table to stdout.
    pub fn print_table(&self) {
        print!("{self}");
    }

    /// The report as JSON (`{"rows": [...], "notes": [...]}`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }
}

/// The fractions at which the latency CDFs are sampled: every percent, then 99.5 %, 99.9 % and
/// the maximum.
pub const CDF_FRACTIONS: [f64; 103] = {
    let mut f = [0.0; 103];
    let mut i = 0;
    while i < 100 {
        f[i] = i as f64 / 100.0;
        i += 1;
    }
    f[100] = 0.995;
    f[101] = 0.999;
    f[102] = 1.0;
    f
};

/// The empirical CDF (nearest rank) of `samples` in µs at [`CDF_FRACTIONS`]; empty for none.
pub fn cdf(samples: &[Duration]) -> Vec<[f64; 2]> {
    let us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    cdf_us(&us)
}

/// The empirical CDF of `samples_us` as `[fraction, latency µs]` points at [`CDF_FRACTIONS`]
/// (nearest rank; fraction 0 is the minimum). Empty for no samples; NaNs are ignored.
pub fn cdf_us(samples_us: &[f64]) -> Vec<[f64; 2]> {
    let mut v: Vec<f64> = samples_us.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return Vec::new();
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    CDF_FRACTIONS
        .iter()
        .map(|&p| {
            let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
            [p, v.get(rank - 1).copied().unwrap_or(f64::NAN)]
        })
        .collect()
}

/// Receives the progress of [`run_observed`].
pub trait BenchProgress {
    /// `done` of `total` steps of the phase `label` are complete; a new label is a new phase.
    fn step(&self, label: &str, done: u64, total: u64);
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl BenchProgress for NoProgress {
    fn step(&self, _: &str, _: u64, _: u64) {}
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<44} {:>14} {:>14} {:>8}",
            "test", "evtchn", "eventfd", "ratio"
        )?;
        for r in &self.rows {
            let (v, b) = match r.unit {
                "events/s" => (format!("{:.0}", r.value), format!("{:.0}", r.baseline)),
                _ => (format!("{:.2}", r.value), format!("{:.2}", r.baseline)),
            };
            writeln!(
                f,
                "{:<44} {:>14} {:>14} {:>8.2}",
                format!("{} ({})", r.test, r.unit),
                v,
                b,
                r.ratio()
            )?;
        }
        for n in &self.notes {
            writeln!(f, "# {n}")?;
        }
        Ok(())
    }
}

/// What the guest thread does next: handle `evtchn` event-channel events and `eventfd`
/// baseline counts, in any interleaving; after every `per_ack` events of one kind, write the
/// ack eventfd if `ack`.
#[derive(Clone, Copy)]
struct Phase {
    per_ack: u64,
    ack: bool,
    evtchn: u64,
    eventfd: u64,
}

const EVTCHN: usize = 0;
const EVENTFD: usize = 1;

struct Guest {
    tx: mpsc::Sender<Phase>,
    ack: Arc<EventFd>,
    baseline: Arc<EventFd>,
    collected: [Arc<AtomicU64>; 2],
    thread: JoinHandle<std::io::Result<Driver>>,
}

fn io(e: std::io::Error) -> Error {
    Error::Io(e)
}

/// Wait for the eventfd and return its counter.
fn wait_fd(fd: &EventFd) -> std::io::Result<u64> {
    wait_readable(fd, Duration::MAX)?;
    fd.read()
}

/// Wait until `a` or `b` is readable; returns which.
fn wait_either(a: &EventFd, b: &EventFd) -> std::io::Result<[bool; 2]> {
    let mut fds = [a.as_raw_fd(), b.as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structures for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            return Ok(fds.map(|p| p.revents != 0));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// B's guest: serves phases until the channel closes.
fn guest_thread(
    mut drv: Driver,
    rx: mpsc::Receiver<Phase>,
    ack: Arc<EventFd>,
    baseline: Arc<EventFd>,
    collected: [Arc<AtomicU64>; 2],
) -> std::io::Result<Driver> {
    let ram = Arc::clone(drv.ram());
    let words = ram
        .words(PAGE_GPA)
        .ok_or_else(|| std::io::Error::other("page outside guest RAM"))?;
    let no_queue = || std::io::Error::other("no event queue");
    while let Ok(p) = rx.recv() {
        let totals = [p.evtchn, p.eventfd];
        let mut done = [0u64; 2];
        let mut since_ack = [0u64; 2];
        while done[EVTCHN] < totals[EVTCHN] || done[EVENTFD] < totals[EVENTFD] {
            let ready = wait_either(
                drv.queue(event_queue(0)).ok_or_else(no_queue)?.call_fd(),
                &baseline,
            )?;
            let mut got = [0u64; 2];
            if ready[EVTCHN] {
                drv.queue(event_queue(0))
                    .ok_or_else(no_queue)?
                    .call_fd()
                    .read()?;
                let mut used = 0;
                while drv.pop_record(0)?.is_some() {
                    used += 1;
                }
                if used > 0 {
                    drv.post_event_buffers(0, used, 8)?;
                }
                got[EVTCHN] = guest_collect(words, 0).len() as u64;
            }
            if ready[EVENTFD] {
                got[EVENTFD] = baseline.read()?;
            }
            for k in [EVTCHN, EVENTFD] {
                if got[k] == 0 {
                    continue;
                }
                done[k] += got[k];
                since_ack[k] += got[k];
                collected[k].fetch_add(got[k], Ordering::SeqCst);
                if p.ack && since_ack[k] >= p.per_ack {
                    since_ack[k] = 0;
                    ack.write(1)?;
                }
            }
        }
    }
    Ok(drv)
}

impl Guest {
    fn start(drv: Driver) -> Result<Guest> {
        let (tx, rx) = mpsc::channel();
        let ack = Arc::new(EventFd::new(EFD_CLOEXEC).map_err(io)?);
        let baseline = Arc::new(EventFd::new(EFD_CLOEXEC).map_err(io)?);
        let collected = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
        let (a, b) = (Arc::clone(&ack), Arc::clone(&baseline));
        let c = collected.clone();
        let thread = std::thread::Builder::new()
            .name("bench-guest-b".into())
            .spawn(move || guest_thread(drv, rx, a, b, c))
            .map_err(io)?;
        Ok(Guest {
            tx,
            ack,
            baseline,
            collected,
            thread,
        })
    }

    fn phase(&self, phase: Phase) -> Result<()> {
        self.tx
            .send(phase)
            .map_err(|_| Error::Io(std::io::Error::other("the guest thread ended")))
    }

    fn wait_ack(&self) -> Result<()> {
        wait_fd(&self.ack).map(|_| ()).map_err(io)
    }

    /// The baseline event: `n` eventfd writes.
    fn poke(&self, n: u32) -> Result<()> {
        for _ in 0..n {
            self.baseline.write(1).map_err(io)?;
        }
        Ok(())
    }

    fn collected(&self, kind: usize) -> u64 {
        self.collected[kind].load(Ordering::SeqCst)
    }

    fn wait_collected(&self, kind: usize, target: u64) {
        while self.collected(kind) < target {
            std::hint::spin_loop();
        }
    }

    fn stop(self) -> Result<Driver> {
        drop(self.tx);
        self.thread
            .join()
            .map_err(|_| Error::Io(std::io::Error::other("the guest thread panicked")))?
            .map_err(io)
    }
}

fn median_us(mut v: Vec<Duration>) -> f64 {
    v.sort_unstable();
    v.get(v.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

fn setup_driver(path: &std::path::Path, bind_all: bool) -> Result<Driver> {
    let ram = Arc::new(GuestRam::new(4 << 20).map_err(io)?);
    let cfg = DriverConfig {
        queue_size: QUEUE_SIZE,
        event_idx: true,
        ..DriverConfig::default()
    };
    let mut drv = Driver::connect(path, ram, &cfg).map_err(io)?;
    let bound = if bind_all { PORTS } else { 1 };
    let binds: Vec<(u32, u16)> = (0..bound).map(|p| (p, 0)).collect();
    drv.register_and_bind(PAGE_GPA, &binds).map_err(io)?;
    drv.post_event_buffers(0, usize::from(QUEUE_SIZE) - 1, 8)
        .map_err(io)?;
    Ok(drv)
}

/// Run the benchmark with the default sizes.
///
/// # Errors
///
/// Setting up the sockets, drivers or threads failed.
pub fn run() -> Result<BenchReport> {
    run_with(&BenchOptions::default())
}

/// Run the benchmark with `opts`.
///
/// # Errors
///
/// Setting up the sockets, drivers or threads failed.
pub fn run_with(opts: &BenchOptions) -> Result<BenchReport> {
    run_observed(opts, &NoProgress)
}

/// Run the benchmark with `opts`, reporting progress (one phase per measurement) to
/// `progress`.
///
/// # Errors
///
/// Setting up the sockets, drivers or threads failed.
pub fn run_observed(opts: &BenchOptions, progress: &dyn BenchProgress) -> Result<BenchReport> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir =
        std::env::temp_dir().join(format!("irqbridge-vu-bench-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let result = run_in(&dir, opts, progress);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(
    dir: &std::path::Path,
    opts: &BenchOptions,
    progress: &dyn BenchProgress,
) -> Result<BenchReport> {
    let (pa, pb) = (dir.join("a.sock"), dir.join("b.sock"));
    let server = Server::start(BackendConfig {
        sockets: vec![pa.clone(), pb.clone()],
        ports: PORTS,
        upcalls: 1,
        queue_size: QUEUE_SIZE,
        ..BackendConfig::default()
    })?;
    let backend = server.backend().clone();
    let mut drv_a = setup_driver(&pa, false)?;
    let drv_b = setup_driver(&pb, true)?;
    backend.connect_interdomain((A, 0), (B, 0))?;
    let guest = Guest::start(drv_b)?;
    let mut report = BenchReport::default();
    let measured = measure(&backend, &guest, &mut drv_a, opts, &mut report, progress);
    let drv_b = guest.stop();
    let counters = backend.counters(B)?;
    report.notes.push(format!(
        "{PORTS} ports, 1 upcall, {QUEUE_SIZE}-entry queues, EVENT_IDX; B counters: {} records, {} signals, {} suppressed, {} deferred",
        counters.records, counters.signals, counters.suppressed, counters.deferred
    ));
    drop(drv_a);
    drop(drv_b);
    server.stop_handle().stop();
    server.wait()?;
    measured.map(|()| report)
}

fn send_burst(backend: &Backend, n: u32) -> Result<()> {
    let r = backend
        .router()
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for p in 0..n {
        r.send(B, p)?;
    }
    Ok(())
}

/// Time `rounds` round trips of each kind, alternating evtchn and eventfd rounds so that both
/// see the same conditions; returns the round trips of each kind, after dropping a tenth of
/// the rounds as warm-up. Progress goes to `progress` as phase `label`.
fn alternate(
    guest: &Guest,
    rounds: u64,
    per_ack: u64,
    (progress, label): (&dyn BenchProgress, &str),
    mut evtchn: impl FnMut() -> Result<()>,
    mut eventfd: impl FnMut() -> Result<()>,
) -> Result<[Vec<Duration>; 2]> {
    let warm = rounds / 10 + 1;
    guest.phase(Phase {
        per_ack,
        ack: true,
        evtchn: per_ack * (rounds + warm),
        eventfd: per_ack * (rounds + warm),
    })?;
    let mut times = [Vec::new(), Vec::new()];
    let total = rounds + warm;
    progress.step(label, 0, total);
    for i in 0..total {
        let t0 = Instant::now();
        evtchn()?;
        guest.wait_ack()?;
        let t1 = Instant::now();
        eventfd()?;
        guest.wait_ack()?;
        if i >= warm {
            times[EVTCHN].push(t1 - t0);
            times[EVENTFD].push(t1.elapsed());
        }
        if (i + 1) % 16 == 0 || i + 1 == total {
            progress.step(label, i + 1, total);
        }
    }
    Ok(times)
}

/// A latency row from the round trips of [`alternate`].
fn latency_row(test: String, [evtchn, eventfd]: [Vec<Duration>; 2]) -> BenchRow {
    BenchRow {
        test,
        unit: "us",
        value_cdf: cdf(&evtchn),
        baseline_cdf: cdf(&eventfd),
        value: median_us(evtchn),
        baseline: median_us(eventfd),
    }
}

fn measure(
    backend: &Backend,
    guest: &Guest,
    drv_a: &mut Driver,
    opts: &BenchOptions,
    report: &mut BenchReport,
    progress: &dyn BenchProgress,
) -> Result<()> {
    // Warm up every path first: thread wake-ups are much slower for the first few thousand
    // round trips on a virtualised host (its halt polling adapts).
    let warm = u64::from(opts.warm_up_rounds);
    alternate(
        guest,
        warm,
        1,
        (progress, "warm-up: doorbell"),
        || drv_a.doorbell(&[0]).map_err(io),
        || guest.poke(1),
    )?;
    alternate(
        guest,
        warm,
        1,
        (progress, "warm-up: send"),
        || send_burst(backend, 1),
        || guest.poke(1),
    )?;
    for n in [1u32, 64, 4096] {
        let per = u64::from(n);
        let rounds = (u64::from(opts.latency_rounds) * 64 / (64 + per)).max(20);
        let label = format!("latency, {n} port(s)");
        let times = alternate(
            guest,
            rounds,
            per,
            (progress, &label),
            || send_burst(backend, n),
            || guest.poke(n),
        )?;
        report.rows.push(latency_row(
            format!("latency, {n} port(s) per burst, median"),
            times,
        ));

        // Throughput: blocks of rounds back to back, the sender spinning on the count of
        // collected events; evtchn and eventfd blocks alternate.
        const BLOCK: u64 = 10;
        let blocks = (u64::from(opts.throughput_events) / (per * BLOCK)).max(4);
        let total = per * BLOCK * blocks;
        guest.phase(Phase {
            per_ack: per,
            ack: false,
            evtchn: total,
            eventfd: total,
        })?;
        let mut elapsed = [Duration::ZERO; 2];
        let label = format!("throughput, {n} port(s)");
        progress.step(&label, 0, blocks);
        for block in 0..blocks {
            for kind in [EVTCHN, EVENTFD] {
                let start = guest.collected(kind);
                let t0 = Instant::now();
                for r in 1..=BLOCK {
                    if kind == EVTCHN {
                        send_burst(backend, n)?;
                    } else {
                        guest.poke(n)?;
                    }
                    guest.wait_collected(kind, start + r * per);
                }
                elapsed[kind] += t0.elapsed();
            }
            progress.step(&label, block + 1, blocks);
        }
        let rate = |d: Duration| total as f64 / d.as_secs_f64();
        report.rows.push(BenchRow {
            test: format!("throughput, {n} port(s) per burst"),
            unit: "events/s",
            value: rate(elapsed[EVTCHN]),
            baseline: rate(elapsed[EVENTFD]),
            value_cdf: Vec::new(),
            baseline_cdf: Vec::new(),
        });
    }

    // Interdomain doorbell A → B against an eventfd write from the same thread.
    let times = alternate(
        guest,
        u64::from(opts.doorbell_rounds),
        1,
        (progress, "doorbell A -> B"),
        || drv_a.doorbell(&[0]).map_err(io),
        || guest.poke(1),
    )?;
    report.rows.push(latency_row(
        "doorbell A -> B round trip, median".into(),
        times,
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn cdf_points() {
        let samples: Vec<Duration> = (1..=200).rev().map(Duration::from_micros).collect();
        let c = cdf(&samples);
        assert_eq!(c.len(), CDF_FRACTIONS.len());
        assert_eq!(c[0], [0.0, 1.0]);
        assert_eq!(c[50], [0.5, 100.0]);
        assert_eq!(c[102], [1.0, 200.0]);
        assert!(c.windows(2).all(|w| w[0][1] <= w[1][1]));
        assert!(cdf(&[]).is_empty());
        assert!(cdf_us(&[f64::NAN]).is_empty());
    }

    #[derive(Default)]
    struct Record(Mutex<Vec<(String, u64, u64)>>);

    impl BenchProgress for Record {
        fn step(&self, label: &str, done: u64, total: u64) {
            self.0
                .lock()
                .unwrap()
                .push((label.to_string(), done, total));
        }
    }

    #[test]
    fn tiny_run_reports_cdfs_json_and_progress() {
        let progress = Record::default();
        let report = run_observed(
            &BenchOptions {
                latency_rounds: 20,
                throughput_events: 200,
                doorbell_rounds: 20,
                warm_up_rounds: 10,
            },
            &progress,
        )
        .unwrap();
        for r in &report.rows {
            let latency = r.unit == "us";
            assert_eq!(!r.value_cdf.is_empty(), latency, "{}", r.test);
            assert_eq!(!r.baseline_cdf.is_empty(), latency, "{}", r.test);
        }
        let json = report.to_json();
        assert_eq!(json["rows"].as_array().unwrap().len(), report.rows.len());
        assert!(json["rows"][0]["value_cdf"].is_array(), "{json}");
        let steps = progress.0.into_inner().unwrap();
        for phase in [
            "warm-up: doorbell",
            "latency, 4096 port(s)",
            "throughput, 64 port(s)",
            "doorbell A -> B",
        ] {
            let last = steps.iter().rfind(|s| s.0 == phase).unwrap();
            assert_eq!(last.1, last.2, "{phase} completes: {last:?}");
        }
    }
}
