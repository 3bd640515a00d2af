// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Cloud Hypervisor end to end: `irqbridge vfio-user` behind Cloud Hypervisor's
//! `--user-device`, driven by the bare-metal PVH guest of `integration/pvh/`.
//!
//! The guest checks exact interrupt counts itself and reports `RESULT <scenario> PASS|FAIL`
//! lines on COM1, boots twice (it asks for an ACPI reset after the first pass) and ends with
//! `DONE` and an ACPI shutdown. This test builds the guest with gcc, runs the server and Cloud
//! Hypervisor, and fails on any FAIL line, a missing scenario, a missing DONE, a timeout, a
//! Cloud Hypervisor or server that does not exit cleanly, a panic in either log, or device
//! counters (read through the control socket) that disagree with what the guest did.
//!
//! Cloud Hypervisor is taken from `CH_BIN`, then `PATH`, then the cache that
//! `ci/setup-cloud-hypervisor.sh` fills; without one the test prints
//! `SKIPPED: no cloud-hypervisor` and passes. See docs/cloud-hypervisor.md.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use irqbridge_vfio_user::control::ControlClient;
use serde_json::json;

use common::{BIN, Proc, wait_exit_within, wait_for_within};

const GUEST_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../integration/pvh");
/// How long the server may take to create its sockets.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// The whole run (two boots) normally takes 3-5 s; this is the hard limit.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// Scenarios every boot reports, besides the boot-specific one.
const SCENARIOS: &[&str] = &[
    "enumerate",
    "intx",
    "intx-refire",
    "intx-unmask-on-access",
    "intx-disable",
    "msix",
    "msix-table-mask",
    "msix-function-mask",
    "msix-device-mask",
    "evtchn",
    "evtchn-mask",
    "evtchn-mapped",
    "doorbell",
    "intx-after-msix",
    "no-stray",
];
/// Per boot, what the guest does to the device counters (integration/pvh/guest.c).
const DOORBELLS_PER_BOOT: u64 = 1000;
const EVTCHN_SENDS_PER_BOOT: u64 = 4 + 2;
const EVTCHN_UPCALLS_PER_BOOT: u64 = 4 + 1;
/// msix: 16 vectors x 3; table mask, function mask, device mask, after re-enable: 1 each;
/// upcalls.
const MSIX_TRIGGERS_PER_BOOT: u64 = 16 * 3 + 4 + EVTCHN_UPCALLS_PER_BOOT;
/// Function mask: 1 event held; device mask: 2 events held.
const MSIX_PENDING_PER_BOOT: u64 = 3;

fn cache_dir() -> PathBuf {
    std::env::var_os("IRQBRIDGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/irqbridge"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `CH_BIN` (which must then exist), `cloud-hypervisor` on PATH, or the cache.
fn find_cloud_hypervisor() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CH_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            is_executable(&p),
            "CH_BIN={} is not an executable file",
            p.display()
        );
        return Some(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("cloud-hypervisor");
            if is_executable(&p) {
                return Some(p);
            }
        }
    }
    let p = cache_dir().join("cloud-hypervisor/bin/cloud-hypervisor");
    is_executable(&p).then_some(p)
}

fn skip(reason: &str) {
    eprintln!("\n*** SKIPPED: {reason} ***\n");
    println!("SKIPPED: {reason}");
}

/// Builds integration/pvh into `out` with gcc (`CC` overrides): a static ELF at 1 MiB with
/// the PVH entry note.
fn build_guest(out: &Path) -> PathBuf {
    let src = Path::new(GUEST_SRC);
    let elf = out.join("guest.elf");
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".to_owned());
    let output = Command::new(&cc)
        .args([
            "-m64",
            "-std=gnu11",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-ffreestanding",
            "-fno-pic",
            "-no-pie",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-nostdlib",
            "-static",
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
        ])
        .arg(format!("-Wl,-T,{}", src.join("guest.ld").display()))
        .arg("-o")
        .arg(&elf)
        .arg(src.join("entry.S"))
        .arg(src.join("guest.c"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{cc}` ({e}): the PVH guest is built with gcc (package gcc)")
        });
    assert!(
        output.status.success(),
        "building the PVH guest failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    elf
}

/// One `RESULT` line.
#[derive(Debug)]
struct Outcome {
    pass: bool,
    line: String,
}

/// What the serial log says.
#[derive(Debug, Default)]
struct Report {
    /// (boot, scenario) -> outcomes (more than one is an error).
    results: BTreeMap<(u32, String), Vec<Outcome>>,
    infos: Vec<String>,
    reboots: usize,
    done: Option<String>,
    other_failures: Vec<String>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

impl Report {
    fn add(&mut self, line: &str) {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("RESULT ") {
            let mut words = rest.split_whitespace();
            let scenario = words.next().unwrap_or("").to_owned();
            let verdict = words.next().unwrap_or("");
            let boot = field(line, "boot")
                .and_then(|b| b.parse().ok())
                .unwrap_or(0);
            self.results
                .entry((boot, scenario))
                .or_default()
                .push(Outcome {
                    pass: verdict == "PASS",
                    line: line.to_owned(),
                });
        } else if let Some(rest) = line.strip_prefix("INFO ") {
            self.infos.push(rest.to_owned());
        } else if line.starts_with("REBOOT") {
            self.reboots += 1;
        } else if line.starts_with("DONE") {
            self.done = Some(line.to_owned());
        } else if line.starts_with("FAULT") {
            self.other_failures.push(line.to_owned());
        }
    }

    /// Every problem with the run, empty when it passed.
    fn problems(&self) -> Vec<String> {
        let mut p = self.other_failures.clone();
        for ((boot, scenario), outcomes) in &self.results {
            if outcomes.len() != 1 {
                p.push(format!(
                    "boot {boot} {scenario}: {} results",
                    outcomes.len()
                ));
            }
            p.extend(outcomes.iter().filter(|o| !o.pass).map(|o| o.line.clone()));
        }
        for boot in [1u32, 2] {
            let extra = if boot == 1 { "boot-state" } else { "reboot" };
            for s in SCENARIOS.iter().copied().chain([extra]) {
                if !self.results.contains_key(&(boot, s.to_owned())) {
                    p.push(format!("boot {boot}: no result for {s}"));
                }
            }
        }
        let expected = self.results.len();
        if self.results.keys().any(|(b, _)| *b != 1 && *b != 2) {
            p.push("results outside boots 1 and 2".to_owned());
        }
        if self.reboots != 1 {
            p.push(format!("{} REBOOT lines, expected 1", self.reboots));
        }
        match &self.done {
            None => p.push("no DONE line".to_owned()),
            Some(d) => {
                let per_boot = SCENARIOS.len() + 1;
                if field(d, "boot") != Some("2")
                    || field(d, "fail") != Some("0")
                    || field(d, "pass") != Some(&per_boot.to_string())
                {
                    p.push(format!(
                        "bad DONE line: {d} (expected boot=2 pass={per_boot} fail=0)"
                    ));
                }
            }
        }
        if expected != 2 * (SCENARIOS.len() + 1) {
            p.push(format!("{expected} distinct results"));
        }
        p
    }
}

fn count_lines(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn cloud_hypervisor_pvh_guest() {
    let Some(ch) = find_cloud_hypervisor() else {
        skip(
            "no cloud-hypervisor (set CH_BIN, put it on PATH, or build it with \
             CH_SRC=... ci/setup-cloud-hypervisor.sh)",
        );
        return;
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        skip(&format!("/dev/kvm not available ({e})"));
        return;
    }

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cloud-hypervisor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test directory");
    let guest = build_guest(&dir);
    let sock = dir.join("vfio-user.sock");
    let ctl = dir.join("control.sock");
    let server_log = dir.join("server.log");
    let ch_log = dir.join("cloud-hypervisor.log");
    let serial_log = dir.join("serial.log");

    let mut server = Proc(
        Command::new(BIN)
            .arg("vfio-user")
            .arg("--socket-path")
            .arg(&sock)
            .arg("--control-socket")
            .arg(&ctl)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&server_log).expect("server log"))
            .spawn()
            .expect("start irqbridge"),
    );
    wait_for_within(&sock, &mut server.0, SOCKET_TIMEOUT);
    wait_for_within(&ctl, &mut server.0, SOCKET_TIMEOUT);

    // The serial port goes to Cloud Hypervisor's stdout, a pipe: `--serial file=PATH` would be
    // truncated when Cloud Hypervisor re-creates the VM for the guest's reboot.
    let ch_args: Vec<String> = vec![
        "-v".into(),
        "--kernel".into(),
        guest.display().to_string(),
        "--cpus".into(),
        "boot=1".into(),
        "--memory".into(),
        "size=256M,shared=on".into(),
        "--serial".into(),
        "file=/dev/stdout".into(),
        "--console".into(),
        "off".into(),
        "--user-device".into(),
        format!("socket={}", sock.display()),
    ];
    println!("{} {}", ch.display(), ch_args.join(" "));
    let started = Instant::now();
    let mut vmm = Proc(
        Command::new(&ch)
            .args(&ch_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&ch_log).expect("cloud-hypervisor log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", ch.display())),
    );
    let stdout = vmm.0.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut serial = File::create(&serial_log).expect("serial log");
    let mut report = Report::default();
    let deadline = started + RUN_TIMEOUT;
    let mut timed_out = false;
    while report.done.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                let _ = writeln!(serial, "{line}");
                report.add(&line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let ch_status = wait_exit_within(&mut vmm.0, Duration::from_secs(30));
    let elapsed = started.elapsed();
    if ch_status.is_none() {
        let _ = vmm.0.kill();
    }
    let _ = vmm.0.wait();
    let _ = reader.join();
    for line in rx.try_iter() {
        let _ = writeln!(serial, "{line}");
        report.add(&line);
    }
    drop(serial);

    // Device counters, then a clean server shutdown.
    let counters = ControlClient::connect(&ctl)
        .and_then(|mut c| {
            c.set_timeout(Some(Duration::from_secs(10)))?;
            c.request(&json!({"cmd": "counters"}))
        })
        .map_err(|e| format!("{e}"));
    let pid = libc::pid_t::try_from(server.0.id()).expect("pid");
    // SAFETY: signals our own child process, which is still running or not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let server_status = wait_exit_within(&mut server.0, Duration::from_secs(20));

    let serial_text = std::fs::read_to_string(&serial_log).unwrap_or_default();
    let server_text = std::fs::read_to_string(&server_log).unwrap_or_default();
    let ch_text = std::fs::read_to_string(&ch_log).unwrap_or_default();
    println!("---- guest serial ----\n{serial_text}----");

    let mut problems = report.problems();
    if timed_out {
        problems.push(format!("timed out after {RUN_TIMEOUT:?}"));
    }
    match ch_status {
        None => problems.push("cloud-hypervisor did not exit after the guest's shutdown".into()),
        Some(s) if !s.success() => problems.push(format!("cloud-hypervisor exited with {s}")),
        Some(_) => {}
    }
    match server_status {
        None => problems.push("irqbridge did not exit on SIGTERM".into()),
        Some(s) if !s.success() => problems.push(format!("irqbridge exited with {s}")),
        Some(_) => {}
    }
    for (name, text) in [("irqbridge", &server_text), ("cloud-hypervisor", &ch_text)] {
        for needle in ["panicked", "Aborted", "SIGSEGV"] {
            if text.contains(needle) {
                problems.push(format!("{name} log contains {needle:?}"));
            }
        }
    }

    // The device's own counters agree with what the guest did in two boots.
    let connects = count_lines(&server_text, "vfio-user: client connected");
    let resets = count_lines(&server_text, "irqbridge-pci: device reset");
    let unmasks = count_lines(&server_text, "SET_IRQS index 0 Unmask");
    match &counters {
        Ok(reply) => {
            let c = &reply["counters"];
            let want = [
                ("doorbells", 2 * DOORBELLS_PER_BOOT),
                ("evtchn_sends", 2 * EVTCHN_SENDS_PER_BOOT),
                ("evtchn_upcalls", 2 * EVTCHN_UPCALLS_PER_BOOT),
                ("msix_triggers", 2 * MSIX_TRIGGERS_PER_BOOT),
                ("msix_pending", 2 * MSIX_PENDING_PER_BOOT),
                ("bad_accesses", 0),
            ];
            for (name, value) in want {
                if c[name].as_u64() != Some(value) {
                    problems.push(format!(
                        "device counter {name} = {}, expected {value}",
                        c[name]
                    ));
                }
            }
            println!("device counters: {c}");
        }
        Err(e) => problems.push(format!("control socket: {e}")),
    }
    if connects != 2 {
        problems.push(format!(
            "{connects} vfio-user connections, expected 2 (one per boot)"
        ));
    }
    let kept = report
        .infos
        .iter()
        .any(|i| i.contains("without DEVICE_RESET"));
    if kept != (resets == 0) {
        problems.push(format!(
            "the guest saw the device state {} but the server logged {resets} DEVICE_RESETs",
            if kept { "kept" } else { "reset" }
        ));
    }

    println!("Cloud Hypervisor behaviours recorded:");
    let infos: std::collections::BTreeSet<&String> = report.infos.iter().collect();
    for info in infos {
        println!("  {info}");
    }
    println!(
        "  vfio-user connections: {connects}; DEVICE_RESETs: {resets}; \
         SET_IRQS(INTx, UNMASK) messages: {unmasks}; run time {elapsed:.1?}"
    );

    if problems.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("---- irqbridge log (tail) ----");
        for l in server_text
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            println!("{l}");
        }
        println!("---- cloud-hypervisor log ----\n{ch_text}----");
        panic!(
            "Cloud Hypervisor run failed (logs kept in {}):\n  {}",
            dir.display(),
            problems.join("\n  ")
        );
    }
}
