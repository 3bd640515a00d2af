// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `irqbridge vhost-user` never takes over a live socket, refuses a path given twice, replaces
//! a stale socket file, and at exit removes only the socket inode it created.

mod vhost_common;

use std::os::unix::net::UnixListener;
use std::time::Duration;

use vhost_common::{TempDir, serve, served, spawn};

/// Waits for the exit of a process that must fail on its own.
fn fails(mut child: std::process::Child) -> bool {
    for _ in 0..1000 {
        if let Some(s) = child.try_wait().unwrap() {
            return !s.success();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the process kept running");
}

#[test]
fn vhost_user_refuses_a_live_socket_and_keeps_it() {
    let dir = TempDir::new("live");
    let p = dir.join("p.sock");
    let first = serve(&dir, &[&p], &[]);
    assert!(served(&p));
    // A second backend on the same path: refused, and the first keeps its socket.
    let second = spawn(&dir, &["-s", p.to_str().unwrap()]);
    assert!(fails(second), "a live socket must be refused");
    assert!(p.exists());
    assert!(served(&p), "the first backend is still reachable");
    // The same with the live path as the second of two sockets: the first path of the
    // refused process is not left behind either.
    let q = dir.join("q.sock");
    let third = spawn(
        &dir,
        &["-s", q.to_str().unwrap(), "-s", p.to_str().unwrap()],
    );
    assert!(fails(third));
    assert!(!q.exists(), "the refused process cleaned up its own socket");
    assert!(served(&p));
    first.stop();
    assert!(!p.exists(), "its own socket is removed at exit");
}

#[test]
fn vhost_user_refuses_a_path_given_twice() {
    let dir = TempDir::new("twice");
    let p = dir.join("p.sock");
    let s = p.to_str().unwrap();
    assert!(fails(spawn(&dir, &["-s", s, "-s", s])));
    let dotted = dir.0.join(".").join("p.sock");
    assert!(fails(spawn(
        &dir,
        &["-s", s, "-s", dotted.to_str().unwrap()]
    )));
    assert!(!p.exists());
}

#[test]
fn vhost_user_replaces_a_stale_socket_and_removes_only_its_own_inode() {
    let dir = TempDir::new("stale");
    let p = dir.join("p.sock");
    // A socket file nobody listens on (std does not unlink on drop).
    drop(UnixListener::bind(&p).unwrap());
    assert!(p.exists());
    let server = serve(&dir, &[&p], &[]);
    assert!(served(&p), "the stale file was replaced by a live socket");
    // Someone else takes the path over while the server runs.
    std::fs::remove_file(&p).unwrap();
    let theirs = UnixListener::bind(&p).unwrap();
    server.stop();
    assert!(p.exists(), "another process's socket is not removed");
    drop(theirs);
}
