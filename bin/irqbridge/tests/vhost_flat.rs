// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! 1000 hostile connections against the real `irqbridge vhost-user` process: its descriptor
//! count and RSS stay flat, a fresh frontend is served after every kind of hostile
//! connection, and the frontend on the other socket keeps working throughout.

mod vhost_common;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use irqbridge_vhost_user::abi::DOORBELL_QUEUE;
use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vmm_sys_util::eventfd::EventFd;

use vhost_common::{Proc, TempDir, frontend, round_trip, serve, served, wait_until};

fn memfd(len: i64) -> OwnedFd {
    // SAFETY: memfd_create with a valid name; checked below.
    let fd = unsafe { libc::memfd_create(c"flat".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own memfd.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len) };
    assert_eq!(r, 0);
    fd
}

/// The hostile connection kinds, one per call, cycling through `kind`.
fn hostile(kind: usize, sock: &Path) -> &'static str {
    match kind {
        0 => {
            let mut s = UnixStream::connect(sock).unwrap();
            let _ = s.write_all(&[0xff; 64]);
            "garbage"
        }
        1 => {
            let mut s = UnixStream::connect(sock).unwrap();
            let _ = s.write_all(&[1, 0, 0]);
            "truncated header"
        }
        2 => {
            drop(UnixStream::connect(sock).unwrap());
            "connect and close"
        }
        3 => {
            let mut b = frontend(sock, &[]);
            let mut fds = [0; 2];
            // SAFETY: pipe(2) writes two new descriptors into `fds`.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: the write end is ours; one byte from a local buffer.
            assert_eq!(unsafe { libc::write(fds[1], [1u8].as_ptr().cast(), 1) }, 1);
            // SAFETY: the read end is ours; EventFd only sends, reads or closes it here.
            let pipe = unsafe { EventFd::from_raw_fd(fds[0]) };
            assert!(b.frontend().set_vring_kick(DOORBELL_QUEUE, &pipe).is_err());
            // SAFETY: closing our own write end.
            unsafe { libc::close(fds[1]) };
            "pipe as kick fd"
        }
        4 => {
            let fe = Frontend::connect(sock, 64).unwrap();
            fe.set_owner().unwrap();
            let fd = memfd(4096);
            let region = VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: 1 << 20,
                userspace_addr: 0x7000_0000_0000,
                mmap_offset: 0,
                mmap_handle: fd.as_raw_fd(),
            };
            assert!(fe.set_mem_table(&[region]).is_err() || fe.get_features().is_err());
            "1 MiB region over a 4 KiB file"
        }
        5 => {
            let mut b = frontend(sock, &[]);
            b.ram().file().set_len(0).unwrap();
            b.queue(DOORBELL_QUEUE).unwrap().kick_fd().write(1).unwrap();
            wait_until("the SIGBUS'd connection to end", 10, || {
                b.frontend().get_features().is_err()
            });
            "memory file truncated, then a kick"
        }
        6 => {
            let fe = Frontend::connect(sock, 64).unwrap();
            fe.set_owner().unwrap();
            let bad = EventFd::new(0).unwrap();
            bad.write(0xffff_ffff_ffff_fffe).unwrap();
            let _ = fe.set_vring_call(0, &bad);
            let _ = fe.set_vring_kick(0, &bad);
            let fd = bad.into_raw_fd();
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(fd) };
            "saturated call fd, then gone"
        }
        _ => {
            let b = frontend(sock, &[(3, 0)]);
            drop(b);
            "set up and vanished"
        }
    }
}

const KINDS: usize = 8;

fn threads(server: &Proc) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .unwrap()
        .count()
}

fn settle(server: &Proc, sock: &Path) -> (usize, u64, usize) {
    assert!(served(sock));
    // Retired memory covers are pruned by the SIGBUS watcher once a second.
    std::thread::sleep(Duration::from_millis(2500));
    (server.fd_count(), server.rss_kib(), threads(server))
}

#[test]
fn vhost_user_fds_and_rss_flat_over_1000_hostile_connections() {
    let dir = TempDir::new("flat");
    let a_sock = dir.join("a.sock");
    let b_sock = dir.join("b.sock");
    let mut server = serve(&dir, &[&a_sock, &b_sock], &["--link", "0.1:0.2"]);
    let mut a = frontend(&a_sock, &[(2, 0)]);
    a.post_event_buffers(0, 16, 8).unwrap();
    round_trip(&mut a, &[1]);

    // Warm-up: every kind once, each followed by a fresh frontend.
    for kind in 0..KINDS {
        let what = hostile(kind, &b_sock);
        assert!(served(&b_sock), "a fresh frontend is served after: {what}");
        round_trip(&mut a, &[1]);
    }
    for i in 0..KINDS * 4 {
        hostile(i % KINDS, &b_sock);
    }
    let (fds0, rss0, th0) = settle(&server, &b_sock);

    let n = 1000;
    for i in 0..n {
        hostile(i % KINDS, &b_sock);
        if i % 50 == 49 {
            assert!(
                served(&b_sock),
                "served after {} hostile connections",
                i + 1
            );
            round_trip(&mut a, &[1]);
            assert!(server.alive());
        }
    }
    let (fds1, rss1, th1) = settle(&server, &b_sock);
    eprintln!(
        "after {n} hostile connections: fds {fds0} -> {fds1}, VmRSS {rss0} -> {rss1} KiB, \
         threads {th0} -> {th1}"
    );
    assert!(th1 <= th0, "threads grew from {th0} to {th1}");
    assert!(
        fds1 <= fds0,
        "descriptor count grew from {fds0} to {fds1}: {}",
        server.fd_kinds()
    );
    let tolerance = (rss0 / 10).max(4096);
    assert!(
        rss1 <= rss0 + tolerance,
        "VmRSS grew from {rss0} to {rss1} KiB"
    );
    round_trip(&mut a, &[1]);
    drop(a);
    server.stop();
}
