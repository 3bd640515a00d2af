// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hostile vhost-user frontends against the real `irqbridge vhost-user` process: each costs at
//! most its own connection. Frontends on the other sockets keep their latency, and a fresh
//! frontend is served on the hostile one's socket afterwards.

mod vhost_common;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use irqbridge_core::evtchn::guest_collect;
use irqbridge_vhost_user::abi::{CONTROL_QUEUE, DOORBELL_QUEUE, event_queue};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vmm_sys_util::eventfd::EventFd;

use vhost_common::{PAGE, Proc, TempDir, frontend, round_trip, serve, served};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn nonblocking(fd: i32) -> bool {
    // SAFETY: F_GETFL on a descriptor the caller owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    flags >= 0 && flags & libc::O_NONBLOCK != 0
}

/// Socket 0 (frontend A) measures doorbell -> event round trips on its loopback link 1 <-> 2
/// while socket 1's frontend (B) has a saturated, blocking call fd on the event queue that A's
/// doorbells keep raising (link 0.5 <-> 1.5), and socket 2's peer floods requests without
/// reading a reply. A's latency stays, every event arrives.
#[test]
fn vhost_user_saturated_call_fd_and_deaf_peer_cost_only_their_connection() {
    let dir = TempDir::new("sat");
    let socks: Vec<_> = (0..3).map(|i| dir.join(&format!("{i}.sock"))).collect();
    let refs: Vec<&std::path::Path> = socks.iter().map(|p| p.as_path()).collect();
    let server = serve(&dir, &refs, &["--link", "0.1:0.2", "--link", "0.5:1.5"]);

    let mut a = frontend(&socks[0], &[(2, 0)]);
    a.post_event_buffers(0, 16, 8).unwrap();
    let rounds = 300;
    for _ in 0..20 {
        round_trip(&mut a, &[1]);
    }
    let before: Vec<Duration> = (0..rounds).map(|_| round_trip(&mut a, &[1])).collect();

    // B: a blocking call eventfd pushed to 0xfffffffffffffffe on its event queue.
    let mut b = frontend(&socks[1], &[(5, 0)]);
    b.post_event_buffers(0, 32, 8).unwrap();
    let bad = EventFd::new(0).unwrap();
    bad.write(0xffff_ffff_ffff_fffe).unwrap();
    b.frontend().set_vring_call(event_queue(0), &bad).unwrap();
    assert!(
        nonblocking(bad.as_raw_fd()),
        "the backend made the call fd non-blocking"
    );
    // B's guest keeps collecting and reposting, so that every doorbell of A on port 5 is an
    // upcall whose signal finds the counter saturated.
    let stop = Arc::new(AtomicBool::new(false));
    let b_records = Arc::new(AtomicU64::new(0));
    let b_thread = {
        let stop = Arc::clone(&stop);
        let n = Arc::clone(&b_records);
        std::thread::spawn(move || {
            let ram = b.ram().clone();
            while !stop.load(Ordering::SeqCst) {
                let mut got = 0;
                while b.pop_record(0).unwrap().is_some() {
                    got += 1;
                }
                if got > 0 {
                    n.fetch_add(got, Ordering::SeqCst);
                    b.post_event_buffers(0, got as usize, 8).unwrap();
                }
                guest_collect(ram.words(PAGE).unwrap(), 0);
                std::thread::sleep(Duration::from_micros(200));
            }
            b
        })
    };
    // And B keeps making its call fd blocking again (the flag is shared with the backend's
    // copy), racing the backend's check before each write.
    let clearer = {
        let stop = Arc::clone(&stop);
        let fd = bad.as_raw_fd();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                // SAFETY: F_GETFL / F_SETFL on a descriptor the test keeps open until the
                // thread is joined.
                unsafe {
                    let flags = libc::fcntl(fd, libc::F_GETFL);
                    libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
                }
            }
        })
    };
    // C: floods GET_FEATURES (with NEED_REPLY) and never reads a reply.
    let mut c = UnixStream::connect(&socks[2]).unwrap();
    c.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut hdr = [0u8; 12];
    hdr[0] = 1; // GET_FEATURES
    hdr[4] = 0x1 | 0x8; // version 1, NEED_REPLY
    let mut flooded = 0usize;
    while c.write_all(&hdr).is_ok() && flooded < 1 << 20 {
        flooded += 1;
    }
    assert!(flooded > 100, "the flood was written ({flooded} requests)");

    let during: Vec<Duration> = (0..rounds).map(|_| round_trip(&mut a, &[5, 1])).collect();
    stop.store(true, Ordering::SeqCst);
    let b = b_thread.join().unwrap();
    clearer.join().unwrap();
    let (mb, md) = (median(before.clone()), median(during.clone()));
    eprintln!(
        "round trip median before {:?}, during {:?}; B got {} records",
        mb,
        md,
        b_records.load(Ordering::SeqCst)
    );
    assert!(
        b_records.load(Ordering::SeqCst) > 0,
        "B's upcalls were delivered (their signals found the counter saturated)"
    );
    assert_eq!(
        bad.read().unwrap(),
        0xffff_ffff_ffff_fffe,
        "never waited on"
    );
    assert!(
        md <= mb * 5 + Duration::from_millis(2),
        "A's latency kept: median {mb:?} before, {md:?} during"
    );
    drop(a);
    drop(b);
    drop(c);
    for s in &socks {
        assert!(served(s), "{} serves a fresh frontend", s.display());
    }
    server.stop();
}

/// A pipe holding one byte, its read end.
fn pipe_with_byte() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both are new descriptors owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut w = std::fs::File::from(w);
    w.write_all(&[1]).unwrap();
    std::mem::forget(w); // keep the write end open: a read after the byte would block
    r
}

fn memfd() -> OwnedFd {
    // SAFETY: memfd_create with a valid name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"not-an-eventfd".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// An `EventFd` value that actually holds `fd` (the vhost frontend API takes `&EventFd`).
fn as_eventfd(fd: OwnedFd) -> EventFd {
    use std::os::fd::IntoRawFd;
    // SAFETY: EventFd only reads, writes and closes its descriptor; the frontend only sends it.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

/// Kick, call and err descriptors that are not eventfds (a pipe holding a byte, a memfd, a
/// socket): that frontend loses its connection at once, nothing blocks, the other socket's
/// frontend keeps working, and the socket serves a fresh frontend.
#[test]
fn vhost_user_non_eventfd_vring_fds_end_only_that_connection() {
    let dir = TempDir::new("kinds");
    let socks: Vec<_> = (0..2).map(|i| dir.join(&format!("{i}.sock"))).collect();
    let refs: Vec<&std::path::Path> = socks.iter().map(|p| p.as_path()).collect();
    let server = serve(&dir, &refs, &["--link", "0.1:0.2"]);
    let mut a = frontend(&socks[0], &[(2, 0)]);
    a.post_event_buffers(0, 16, 8).unwrap();
    round_trip(&mut a, &[1]);

    type Make = fn() -> OwnedFd;
    let kinds: [(&str, Make); 3] = [
        ("pipe", pipe_with_byte),
        ("memfd", memfd),
        ("socket", || OwnedFd::from(UnixStream::pair().unwrap().0)),
    ];
    for (kind, make) in kinds {
        for which in ["kick", "call", "err"] {
            for queue in [CONTROL_QUEUE, DOORBELL_QUEUE, event_queue(0)] {
                let mut b = frontend(&socks[1], &[]);
                let fd = as_eventfd(make());
                let t = Instant::now();
                let r = match which {
                    "kick" => b.frontend().set_vring_kick(queue, &fd),
                    "call" => b.frontend().set_vring_call(queue, &fd),
                    _ => b.frontend().set_vring_err(queue, &fd),
                };
                assert!(r.is_err(), "{kind} as {which} fd of queue {queue} refused");
                // The connection is gone, not merely the request refused.
                assert!(
                    b.frontend().get_features().is_err(),
                    "{kind} {which}: connection ended"
                );
                assert!(t.elapsed() < Duration::from_secs(5));
                round_trip(&mut a, &[1]);
            }
        }
    }
    assert!(served(&socks[1]), "a fresh frontend is served");
    round_trip(&mut a, &[1]);
    drop(a);
    server.stop();
}

/// Guest RAM region on a memfd of `file_len` bytes, declared `region_len` long.
fn short_region(file_len: u64, region_len: u64) -> (OwnedFd, VhostUserMemoryRegionInfo, usize) {
    let fd = memfd();
    // SAFETY: ftruncate on our own memfd.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), file_len as i64) };
    assert_eq!(r, 0);
    // SAFETY: mmap of our own memfd; the mapping is only used for its address here.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            region_len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let info = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: region_len,
        userspace_addr: addr as u64,
        mmap_offset: 0,
        mmap_handle: fd.as_raw_fd(),
    };
    (fd, info, addr as usize)
}

/// SET_MEM_TABLE of 1 MiB over a 4 KiB memfd is refused: the frontend gets an error, the
/// process lives, the socket serves a fresh frontend.
#[test]
fn vhost_user_refuses_a_region_larger_than_its_file() {
    let dir = TempDir::new("short");
    let sock = dir.join("0.sock");
    let mut server: Proc = serve(&dir, &[&sock], &[]);
    let fe = vhost::vhost_user::Frontend::connect(&sock, 64).unwrap();
    fe.set_owner().unwrap();
    let (_fd, region, _) = short_region(4096, 1 << 20);
    assert!(fe.set_mem_table(&[region]).is_err() || fe.get_features().is_err());
    assert!(server.alive());
    assert!(served(&sock));
    let log = vhost_common::log(&dir);
    assert!(
        log.contains("larger than its file"),
        "a clear error in the log:\n{log}"
    );
    server.stop();
}
