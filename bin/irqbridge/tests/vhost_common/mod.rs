// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers of the `vhost_*` tests: the real `irqbridge vhost-user` process, frontends on the
//! test device, /proc probes (temporary directories and the process guard come from
//! `tests/common`).

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use irqbridge_core::evtchn::guest_collect;
use irqbridge_vhost_user::abi::{Op, Request, Status, event_queue};
use irqbridge_vhost_user::driver::{Driver, DriverConfig, GuestRam};

#[path = "../common/mod.rs"]
mod common;
pub use common::{BIN, Proc, TempDir};

/// Guest address of the event-channel page.
pub const PAGE: u64 = 0x1000;
/// Guest RAM of every test frontend.
pub const RAM: usize = 2 << 20;

impl Proc {
    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let s = common::wait_exit(&mut self.0);
        assert!(s.success(), "irqbridge exited with {s}");
    }

    /// What the open descriptors are, with counts (for failure messages).
    pub fn fd_kinds(&self) -> String {
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        for e in std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .flatten()
        {
            let t = std::fs::read_link(e.path())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kind = t.split(':').next().unwrap_or("").to_string();
            let kind = if t.starts_with("anon_inode") { t } else { kind };
            *kinds.entry(kind).or_default() += 1;
        }
        format!("{kinds:?}")
    }

    /// Names of the threads of the process that are not blocked in an interruptible sleep, for
    /// failure messages.
    pub fn threads(&self) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) {
            for t in dir.flatten() {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
                out.push_str(&format!("{}:{} ", comm.trim(), wchan.trim()));
            }
        }
        out
    }
}

/// Start `irqbridge vhost-user` with `args` (stderr to `log` in `dir`).
pub fn spawn(dir: &TempDir, args: &[&str]) -> Child {
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    Command::new(BIN)
        .arg("vhost-user")
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Start a server on `sockets` (each with `--ports 64 --upcalls 1` plus `extra`) and wait
/// until every socket exists.
pub fn serve(dir: &TempDir, sockets: &[&Path], extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "--ports".into(),
        "64".into(),
        "--upcalls".into(),
        "1".into(),
    ];
    for s in sockets {
        args.push("-s".into());
        args.push(s.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = Proc(spawn(dir, &refs));
    for s in sockets {
        wait_for(s, &mut p);
    }
    p
}

pub fn log(dir: &TempDir) -> String {
    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
}

pub fn wait_for(path: &Path, p: &mut Proc) {
    common::wait_for(path, &mut p.0);
}

/// Poll `cond` until it holds; panics after `secs` seconds.
pub fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A frontend on `path` with fresh RAM; page registered and `binds` made.
pub fn frontend(path: &Path, binds: &[(u32, u16)]) -> Driver {
    frontend_ram(path, Arc::new(GuestRam::new(RAM).unwrap()), binds)
}

/// A frontend on `path` with `ram`; page registered and `binds` made.
pub fn frontend_ram(path: &Path, ram: Arc<GuestRam>, binds: &[(u32, u16)]) -> Driver {
    let cfg = DriverConfig {
        queue_size: 64,
        timeout: Duration::from_secs(10),
        ..DriverConfig::default()
    };
    let mut drv = Driver::connect(path, ram, &cfg).unwrap();
    drv.register_and_bind(PAGE, binds).unwrap();
    drv
}

/// One doorbell on `ports` of `drv` and the wait for the upcall record it causes on upcall 0
/// (port 2 must be linked from the first port). Returns the round-trip time.
pub fn round_trip(drv: &mut Driver, ports: &[u32]) -> Duration {
    let t = Instant::now();
    drv.doorbell(ports).unwrap();
    loop {
        if let Some((_, len)) = drv.pop_record(0).unwrap() {
            assert_eq!(len, 8);
            break;
        }
        let q = drv.queue(event_queue(0)).unwrap();
        q.wait_calls(Duration::from_millis(50)).unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the event never arrived"
        );
    }
    let dt = t.elapsed();
    let ram = drv.ram().clone();
    assert_eq!(guest_collect(ram.words(PAGE).unwrap(), 0), [2]);
    drv.post_event_buffers(0, 1, 8).unwrap();
    dt
}

/// A fresh frontend on `path` is served: STATUS of port 0 answers Ok.
pub fn served(path: &Path) -> bool {
    let cfg = DriverConfig {
        queue_size: 64,
        timeout: Duration::from_secs(10),
        ..DriverConfig::default()
    };
    let Ok(mut drv) = Driver::connect(path, Arc::new(GuestRam::new(RAM).unwrap()), &cfg) else {
        return false;
    };
    drv.control(Request::new(Op::Status, 0, 0))
        .is_ok_and(|r| r.status() == Some(Status::Ok))
}
