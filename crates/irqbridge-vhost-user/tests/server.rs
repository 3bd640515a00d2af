// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The socket server: inherited listening fd, stop with a frontend connected, bad frontends.

mod common;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use common::{PAGE, RAM, setup, temp_dir, wait_until};
use irqbridge_core::SendOutcome;
use irqbridge_vhost_user::abi::event_queue;
use irqbridge_vhost_user::driver::{Driver, DriverConfig, GuestRam};
use irqbridge_vhost_user::{BackendConfig, ConnId, Server};

fn driver(path: &std::path::Path) -> Driver {
    Driver::connect(
        path,
        Arc::new(GuestRam::new(RAM).unwrap()),
        &DriverConfig::default(),
    )
    .unwrap()
}

/// `server.wait()` on another thread, with a deadline.
fn wait_with_deadline(server: Server) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(server.wait().map_err(|e| e.to_string()));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the server did not stop");
    r.unwrap();
}

#[test]
fn inherited_fd_is_connection_zero_and_sockets_follow() {
    let dir = temp_dir("fd");
    let fd_path = dir.join("inherited.sock");
    let listener = UnixListener::bind(&fd_path).unwrap();
    let sock_path = dir.join("named.sock");
    let server = Server::start(BackendConfig {
        sockets: vec![sock_path.clone()],
        listen_fd: Some(OwnedFd::from(listener)),
        ports: 64,
        upcalls: 1,
        ..BackendConfig::default()
    })
    .unwrap();
    let backend = server.backend().clone();
    let mut a = driver(&fd_path);
    let mut b = driver(&sock_path);
    setup(&mut a, &[(1, 0)]);
    setup(&mut b, &[(2, 0)]);
    a.post_event_buffers(0, 2, 8).unwrap();
    b.post_event_buffers(0, 2, 8).unwrap();
    assert_eq!(
        backend.send(ConnId(0), 1).unwrap(),
        SendOutcome::Upcall { vector: 0 }
    );
    assert_eq!(a.take_calls(event_queue(0)).unwrap(), 1);
    assert_eq!(b.take_calls(event_queue(0)).unwrap(), 0);
    backend.send(ConnId(1), 2).unwrap();
    assert_eq!(b.take_calls(event_queue(0)).unwrap(), 1);
    assert_eq!(backend.page_gpa(ConnId(1)).unwrap(), Some(PAGE));
    assert_eq!(server.socket_paths(), std::slice::from_ref(&sock_path));
    server.stop_handle().stop();
    wait_with_deadline(server);
    assert!(!sock_path.exists(), "the created socket is removed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stop_drops_connected_frontends() {
    let dir = temp_dir("stop");
    let path = dir.join("s.sock");
    let server = Server::start(BackendConfig {
        sockets: vec![path.clone()],
        ports: 16,
        upcalls: 1,
        ..BackendConfig::default()
    })
    .unwrap();
    let backend = server.backend().clone();
    let mut drv = driver(&path);
    setup(&mut drv, &[(3, 0)]);
    assert!(backend.is_attached(ConnId(0)).unwrap());
    let stop = server.stop_handle();
    stop.stop();
    stop.stop();
    assert!(stop.is_stopped());
    wait_with_deadline(server);
    assert!(!backend.is_attached(ConnId(0)).unwrap());
    // The backend closed the vhost-user socket.
    assert!(vhost::VhostBackend::get_features(drv.frontend()).is_err());
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_broken_frontend_loses_only_its_connection() {
    let dir = temp_dir("broken");
    let path = dir.join("s.sock");
    let server = Server::start(BackendConfig {
        sockets: vec![path.clone()],
        ports: 16,
        upcalls: 1,
        ..BackendConfig::default()
    })
    .unwrap();
    let backend = server.backend().clone();
    // Garbage instead of vhost-user messages, then a truncated header.
    for junk in [&[0xffu8; 64][..], &[1, 0, 0][..]] {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(junk).unwrap();
        drop(s);
    }
    // A frontend that sets up half a device and vanishes.
    let mut drv = driver(&path);
    setup(&mut drv, &[(1, 0)]);
    drop(drv);
    wait_until("the detach", || !backend.is_attached(ConnId(0)).unwrap());
    // The next frontend is served normally and finds the port bound.
    let mut drv = driver(&path);
    drv.post_event_buffers(0, 2, 8).unwrap();
    setup(&mut drv, &[]);
    backend.send(ConnId(0), 1).unwrap();
    assert_eq!(drv.take_calls(event_queue(0)).unwrap(), 1);
    server.stop_handle().stop();
    wait_with_deadline(server);
    let _ = std::fs::remove_dir_all(&dir);
}
