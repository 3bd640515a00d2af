// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the tests of the `irqbridge` binary: temporary directories, the process
//! under test, waiting for its sockets and for its exit.

#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use irqbridge_vfio_user::conn::Connection;
use irqbridge_vfio_user::proto::{Capabilities, Command, DeviceInfoMsg, Version};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_irqbridge");

/// How long the process may take to create a socket or to exit.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(20);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, empty directory named after `tag`, this process and a counter.
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "irqbridge-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// `name` inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process, killed and reaped if a test fails before it exits.
pub struct Proc(pub Child);

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        signal(&self.0, sig);
    }

    /// Number of open descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// VmRSS in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `sig` to `child`.
pub fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running then.
pub fn wait_exit_within(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` to exit; panics after [`PROCESS_TIMEOUT`].
pub fn wait_exit(child: &mut Child) -> ExitStatus {
    wait_exit_within(child, PROCESS_TIMEOUT).expect("irqbridge did not exit")
}

/// Waits up to `timeout` for `path` to appear; panics if `child` exits first or time runs out.
pub fn wait_for_within(path: &Path, child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("irqbridge exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `path` to appear; panics if `child` exits first or after [`PROCESS_TIMEOUT`].
pub fn wait_for(path: &Path, child: &mut Child) {
    wait_for_within(path, child, PROCESS_TIMEOUT);
}

/// VERSION 0.0 with default capabilities, as a vfio-user client opens a session.
pub fn vfio_user_version(conn: &mut Connection) {
    let v = Version {
        major: 0,
        minor: 0,
        capabilities: Capabilities::default(),
    };
    conn.request(Command::Version, &v.encode(), &[]).unwrap();
}

/// VERSION, then DEVICE_GET_INFO, on a fresh vfio-user connection over `stream` (10 s reply
/// timeout).
pub fn vfio_user_hello(stream: UnixStream) -> DeviceInfoMsg {
    let mut conn = Connection::new(stream);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    vfio_user_version(&mut conn);
    let r = conn
        .request(
            Command::DeviceGetInfo,
            &DeviceInfoMsg::request().encode(),
            &[],
        )
        .unwrap();
    DeviceInfoMsg::parse(&r.body).unwrap()
}
