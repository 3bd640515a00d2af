// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The server's request handling: the input is a byte stream sent by a client over a socket
//! pair to `Server::serve_stream` with the irqbridge test device (the same code path as a
//! connected client of `Server::run`). The first byte says which descriptors ride on the
//! stream's first byte (none, eventfds, a memfd, or a pipe). The server must not panic, hang or
//! leak; replies are read and thrown away.

#![no_main]

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use irqbridge_vfio_user::conn::Connection;
use irqbridge_vfio_user::pci::{DeviceConfig, IrqbridgeDevice};
use irqbridge_vfio_user::server::{Server, ServerConfig};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

fn memfd(size: i64) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated literal; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a live memfd.
    unsafe { libc::ftruncate(fd.as_raw_fd(), size) };
    fd
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: pipe2 fills two descriptors.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both just created, owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let Ok(mut device) = IrqbridgeDevice::new(DeviceConfig {
        msix_vectors: 4,
        evtchn_ports: 64,
        intx: true,
        msi_vectors: 4,
    }) else {
        return;
    };
    let (client, server_end) = UnixStream::pair().expect("socketpair");
    let config = ServerConfig {
        io_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let server = std::thread::spawn(move || {
        Server::serve_stream(&mut device, server_end, config);
        device
    });
    let efds: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let mem = memfd(0x10000);
    let (pr, pw) = pipe();
    let fds: Vec<BorrowedFd<'_>> = match sel % 5 {
        0 => Vec::new(),
        1 => efds
            .iter()
            // SAFETY: the eventfds outlive the borrows.
            .map(|e| unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) })
            .collect(),
        2 => vec![mem.as_fd()],
        3 => vec![pr.as_fd(), pw.as_fd()],
        _ => vec![mem.as_fd(), pr.as_fd()],
    };
    // Write on one thread, drain replies on another, so neither side can block the other.
    let reader = {
        let mut r = client.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut sink = [0u8; 8192];
            while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
        })
    };
    let conn = Connection::new(client.try_clone().expect("clone"));
    if !stream.is_empty() {
        let _ = conn.send_raw(&stream[..1], &fds);
        let mut w = client.try_clone().expect("clone");
        let _ = w.write_all(&stream[1..]);
    }
    let _ = client.shutdown(std::net::Shutdown::Write);
    let device = server.join().expect("the server panicked");
    let _ = reader.join();
    // The device is still usable after whatever the stream did.
    let _ = device.counters();
});
