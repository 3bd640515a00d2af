// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared helpers: a backend on temporary sockets, drivers, polling with a deadline.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use irqbridge_vhost_user::abi::{Request, Status};
use irqbridge_vhost_user::driver::{Driver, DriverConfig, GuestRam};
use irqbridge_vhost_user::{Backend, BackendConfig, Server};

/// Guest address of the event-channel page in every test guest.
pub const PAGE: u64 = 0x1000;
/// Guest RAM size of every test guest.
pub const RAM: usize = 4 << 20;

/// A backend serving temporary sockets; stopped and cleaned up on drop.
pub struct Env {
    pub server: Option<Server>,
    pub dir: PathBuf,
    pub paths: Vec<PathBuf>,
    pub backend: Backend,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique, empty temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "irqbridge-vu-{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Env {
    /// `sockets` sockets with `ports` ports and `upcalls` upcalls each.
    pub fn new(name: &str, sockets: usize, ports: u32, upcalls: u16) -> Env {
        let dir = temp_dir(name);
        let paths: Vec<PathBuf> = (0..sockets)
            .map(|i| dir.join(format!("{i}.sock")))
            .collect();
        let server = Server::start(BackendConfig {
            sockets: paths.clone(),
            ports,
            upcalls,
            ..BackendConfig::default()
        })
        .unwrap();
        let backend = server.backend().clone();
        Env {
            server: Some(server),
            dir,
            paths,
            backend,
        }
    }

    /// Connect a driver to socket `i` with fresh RAM.
    pub fn connect(&self, i: usize, event_idx: bool) -> Driver {
        self.connect_ram(i, Arc::new(GuestRam::new(RAM).unwrap()), event_idx)
    }

    /// Connect a driver to socket `i` with `ram`.
    pub fn connect_ram(&self, i: usize, ram: Arc<GuestRam>, event_idx: bool) -> Driver {
        let cfg = DriverConfig {
            queue_size: 64,
            event_idx,
            ..DriverConfig::default()
        };
        Driver::connect(&self.paths[i], ram, &cfg).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop_handle().stop();
            s.wait().unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Poll `cond` until it holds; panics after 5 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Send `req` and check that it succeeds; returns the reply value.
pub fn ok(drv: &mut Driver, req: Request) -> u32 {
    let r = drv.control(req).unwrap();
    assert_eq!(r.status(), Some(Status::Ok), "{req:?} -> {r:?}");
    r.value
}

/// The status of `req`.
pub fn status(drv: &mut Driver, req: Request) -> Option<Status> {
    drv.control(req).unwrap().status()
}

/// Register the page at [`PAGE`] and bind `(port, upcall)` pairs.
pub fn setup(drv: &mut Driver, binds: &[(u32, u16)]) {
    drv.register_and_bind(PAGE, binds).unwrap();
}
