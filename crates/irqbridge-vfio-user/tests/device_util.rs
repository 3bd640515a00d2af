// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the device tests (also built as an empty test target of its own).

#![allow(dead_code)]

use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use irqbridge_vfio_user::device::{IrqAction, IrqData, SetIrqs, VfioUserDevice};
use irqbridge_vfio_user::pci::IrqbridgeDevice;
use irqbridge_vfio_user::pci::regs::{REGION_BAR0, REGION_CONFIG};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Our end of an eventfd handed to the device, plus the fd number the device holds.
#[derive(Debug)]
pub struct Efd {
    /// Our end.
    pub fd: EventFd,
    /// The fd number of the device's copy.
    pub raw: RawFd,
}

impl Deref for Efd {
    type Target = EventFd;
    fn deref(&self) -> &EventFd {
        &self.fd
    }
}

/// A non-blocking eventfd and a dup of it (same counter) for the device.
pub fn eventfd_pair() -> (EventFd, EventFd) {
    let ours = EventFd::new(EFD_NONBLOCK).unwrap();
    let theirs = ours.try_clone().unwrap();
    (ours, theirs)
}

/// Reads (and so resets) an eventfd counter; 0 if nothing was written.
pub fn take(fd: &EventFd) -> u64 {
    match fd.read() {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("eventfd read failed: {e}"),
    }
}

/// Same as [`take`].
pub fn read_count(fd: &EventFd) -> u64 {
    take(fd)
}

/// Reads an eventfd, waiting up to 5 s for a count to appear; 0 on timeout.
pub fn wait_count(fd: &EventFd) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = take(fd);
        if n != 0 || Instant::now() >= deadline {
            return n;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; bounded timeout.
        unsafe { libc::poll(&mut pfd, 1, 50) };
    }
}

/// A new `EventFd` on a dup of `fd`.
pub fn dup_eventfd(fd: BorrowedFd<'_>) -> EventFd {
    let owned = fd.try_clone_to_owned().unwrap();
    // SAFETY: `owned` is a valid eventfd that we own; ownership moves into the EventFd.
    unsafe { EventFd::from_raw_fd(owned.into_raw_fd()) }
}

/// A shared mapping of a region's mmap fd, unmapped on drop.
#[derive(Debug)]
pub struct SharedMap {
    ptr: *mut libc::c_void,
    len: usize,
}

impl SharedMap {
    /// Maps `len` bytes of `fd` at `offset`, read-write, shared.
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Self {
        // SAFETY: a fresh shared mapping of a file we hold; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap failed: {}",
            io::Error::last_os_error()
        );
        SharedMap { ptr, len }
    }

    /// The mapping as atomic words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: page-aligned live mapping of `len` bytes that outlives the borrow; the
        // memory is shared with the device and only accessed atomically.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<AtomicU64>(), self.len / 8) }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no borrows left.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("irqbridge-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads `len` (at most 4) bytes of config space at `off`, little-endian.
pub fn cfg_read(d: &mut IrqbridgeDevice, off: u64, len: usize) -> u32 {
    let mut b = vec![0u8; len];
    d.region_read(REGION_CONFIG, off, &mut b).unwrap();
    let mut w = [0u8; 4];
    w[..len].copy_from_slice(&b);
    u32::from_le_bytes(w)
}

/// Writes the low `len` bytes of `v` to config space at `off`.
pub fn cfg_write(d: &mut IrqbridgeDevice, off: u64, len: usize, v: u32) {
    d.region_write(REGION_CONFIG, off, &v.to_le_bytes()[..len])
        .unwrap();
}

/// Reads the BAR0 register at `off`.
pub fn bar0(d: &mut IrqbridgeDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.region_read(REGION_BAR0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Writes the BAR0 register at `off`.
pub fn bar0_write(d: &mut IrqbridgeDevice, off: u64, v: u32) {
    d.region_write(REGION_BAR0, off, &v.to_le_bytes()).unwrap();
}

/// SET_IRQS on the device directly; `Err(errno)` if it refuses.
pub fn set(
    d: &mut IrqbridgeDevice,
    index: u32,
    action: IrqAction,
    start: u32,
    count: u32,
    data: IrqData,
) -> Result<(), i32> {
    d.set_irqs(SetIrqs {
        index,
        action,
        start,
        count,
        data,
    })
}

/// Runs the device's fd handlers (what the server loop does for `poll_fds`) until `done`
/// returns true or 10 s pass; returns whether `done` became true.
pub fn pump(d: &mut IrqbridgeDevice, done: &dyn Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        let fds = d.poll_fds();
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|(fd, _)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let tokens: Vec<u64> = fds.iter().map(|(_, t)| *t).collect();
        drop(fds);
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds; bounded timeout.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 20) };
        if n <= 0 {
            continue;
        }
        for (p, t) in pfds.iter().zip(tokens) {
            if p.revents != 0 {
                d.handle_fd_event(t);
            }
        }
    }
    true
}

/// A vfio-user client built on the crate's own `proto` / `conn`.
#[derive(Debug)]
pub struct RawClient {
    /// The connection.
    pub conn: irqbridge_vfio_user::conn::Connection,
}

impl RawClient {
    /// Connects and negotiates VERSION (0.0, 16 fds per message).
    pub fn connect(path: &std::path::Path) -> Self {
        use irqbridge_vfio_user::proto::{Capabilities, Command, Version};
        let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        let mut conn = irqbridge_vfio_user::conn::Connection::new(stream);
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let v = Version {
            major: 0,
            minor: 0,
            capabilities: Capabilities {
                max_msg_fds: 16,
                ..Default::default()
            },
        };
        let r = conn.request(Command::Version, &v.encode(), &[]).unwrap();
        let reply = Version::parse(&r.body).unwrap();
        assert_eq!((reply.major, reply.minor), (0, 0));
        RawClient { conn }
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&mut self) -> irqbridge_vfio_user::proto::DeviceInfoMsg {
        use irqbridge_vfio_user::proto::{Command, DeviceInfoMsg};
        let r = self
            .conn
            .request(
                Command::DeviceGetInfo,
                &DeviceInfoMsg::request().encode(),
                &[],
            )
            .unwrap();
        DeviceInfoMsg::parse(&r.body).unwrap()
    }

    /// DEVICE_GET_REGION_INFO, retried with the size the server asks for; returns the reply
    /// and the fds that came with it.
    pub fn region_info(
        &mut self,
        index: u32,
    ) -> (
        irqbridge_vfio_user::proto::RegionInfoReply,
        Vec<std::os::fd::OwnedFd>,
    ) {
        use irqbridge_vfio_user::proto::{Command, RegionInfoReply, RegionInfoRequest};
        let mut argsz = 32;
        loop {
            let r = self
                .conn
                .request(
                    Command::DeviceGetRegionInfo,
                    &RegionInfoRequest::new(index, argsz).encode(),
                    &[],
                )
                .unwrap();
            let reply = RegionInfoReply::parse(&r.body).unwrap();
            if reply.argsz > argsz {
                argsz = reply.argsz;
                continue;
            }
            return (reply, r.fds);
        }
    }

    /// DEVICE_GET_REGION_IO_FDS.
    pub fn io_fds(
        &mut self,
        index: u32,
    ) -> (
        irqbridge_vfio_user::proto::RegionIoFdsReply,
        Vec<std::os::fd::OwnedFd>,
    ) {
        use irqbridge_vfio_user::proto::{Command, RegionIoFdsReply, RegionIoFdsRequest};
        let r = self
            .conn
            .request(
                Command::DeviceGetRegionIoFds,
                &RegionIoFdsRequest::new(index, 4096).encode(),
                &[],
            )
            .unwrap();
        (RegionIoFdsReply::parse(&r.body).unwrap(), r.fds)
    }

    /// DEVICE_GET_IRQ_INFO: (flags, count).
    pub fn irq_info(&mut self, index: u32) -> (u32, u32) {
        use irqbridge_vfio_user::proto::{Command, IrqInfoMsg};
        let r = self
            .conn
            .request(
                Command::DeviceGetIrqInfo,
                &IrqInfoMsg::request(index).encode(),
                &[],
            )
            .unwrap();
        let m = IrqInfoMsg::parse(&r.body).unwrap();
        (m.flags, m.count)
    }

    /// DEVICE_SET_IRQS with DATA_NONE or DATA_EVENTFD (`fds` go in SCM_RIGHTS).
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[&EventFd],
    ) -> Result<(), irqbridge_vfio_user::error::Error> {
        use irqbridge_vfio_user::proto::{Command, SetIrqsRequest};
        let borrowed: Vec<BorrowedFd<'_>> = fds
            .iter()
            // SAFETY: the EventFds outlive the request.
            .map(|f| unsafe { BorrowedFd::borrow_raw(f.as_raw_fd()) })
            .collect();
        self.conn
            .request(
                Command::DeviceSetIrqs,
                &SetIrqsRequest::new(index, flags, start, count).encode(),
                &borrowed,
            )
            .map(|_| ())
    }

    /// DEVICE_SET_IRQS with DATA_BOOL.
    pub fn set_irqs_bool(&mut self, index: u32, action: u32, start: u32, bools: &[bool]) {
        use irqbridge_vfio_user::proto::{Command, SetIrqsRequest};
        self.conn
            .request(
                Command::DeviceSetIrqs,
                &SetIrqsRequest::with_bools(index, action, start, bools).encode(),
                &[],
            )
            .unwrap();
    }

    /// REGION_READ.
    pub fn try_read(
        &mut self,
        region: u32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, irqbridge_vfio_user::error::Error> {
        use irqbridge_vfio_user::proto::{Command, RegionAccess, RegionData};
        let req = RegionAccess {
            offset,
            region,
            count: len,
        };
        let r = self.conn.request(Command::RegionRead, &req.encode(), &[])?;
        let d = RegionData::parse(&r.body).unwrap();
        assert_eq!(
            (d.offset, d.region, d.data.len()),
            (offset, region, len as usize)
        );
        Ok(d.data)
    }

    /// REGION_READ of a little-endian value of `len` (1, 2, 4 or 8) bytes.
    pub fn read(&mut self, region: u32, offset: u64, len: u32) -> u64 {
        let d = self.try_read(region, offset, len).unwrap();
        let mut b = [0u8; 8];
        b[..d.len()].copy_from_slice(&d);
        u64::from_le_bytes(b)
    }

    /// REGION_WRITE (with a reply).
    pub fn try_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), irqbridge_vfio_user::error::Error> {
        use irqbridge_vfio_user::proto::{Command, RegionData};
        let req = RegionData {
            offset,
            region,
            data: data.to_vec(),
        };
        self.conn
            .request(Command::RegionWrite, &req.encode(), &[])
            .map(|_| ())
    }

    /// REGION_WRITE of the low `len` bytes of `value`.
    pub fn write(&mut self, region: u32, offset: u64, len: usize, value: u64) {
        self.try_write(region, offset, &value.to_le_bytes()[..len])
            .unwrap();
    }

    /// REGION_WRITE posted with NO_REPLY, as QEMU sends MMIO writes.
    pub fn post_write(&mut self, region: u32, offset: u64, len: usize, value: u64) {
        use irqbridge_vfio_user::proto::{Command, RegionData};
        let req = RegionData {
            offset,
            region,
            data: value.to_le_bytes()[..len].to_vec(),
        };
        self.conn
            .post(Command::RegionWrite, &req.encode(), &[])
            .unwrap();
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) {
        use irqbridge_vfio_user::proto::Command;
        self.conn.request(Command::DeviceReset, &[], &[]).unwrap();
    }
}

/// An `IrqbridgeDevice` served by a `Server` on its own thread, on a socket in a temp dir.
#[derive(Debug)]
pub struct Running {
    /// The vfio-user socket.
    pub path: std::path::PathBuf,
    /// The control socket, if one was attached.
    pub control_path: Option<std::path::PathBuf>,
    stop: irqbridge_vfio_user::server::StopHandle,
    thread: Option<std::thread::JoinHandle<irqbridge_vfio_user::pci::IrqbridgeDevice>>,
    /// Keeps the directory alive.
    pub dir: TempDir,
}

impl Running {
    /// Builds the device (with a control socket if `control`) and serves it.
    pub fn start(cfg: irqbridge_vfio_user::pci::DeviceConfig, control: bool) -> Self {
        use irqbridge_vfio_user::control::ControlServer;
        use irqbridge_vfio_user::pci::IrqbridgeDevice;
        use irqbridge_vfio_user::server::Server;
        let dir = TempDir::new("e2e");
        let path = dir.join("vfio-user.sock");
        let mut device = IrqbridgeDevice::new(cfg).unwrap();
        let control_path = control.then(|| dir.join("control.sock"));
        if let Some(p) = &control_path {
            device.attach_control(ControlServer::bind(p).unwrap());
        }
        let mut server = Server::bind(&path).unwrap();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || {
            server.run(&mut device).unwrap();
            device
        });
        Running {
            path,
            control_path,
            stop,
            thread: Some(thread),
            dir,
        }
    }

    /// Stops the server and returns the device.
    pub fn finish(mut self) -> irqbridge_vfio_user::pci::IrqbridgeDevice {
        self.stop.stop().unwrap();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.stop();
            let _ = t.join();
        }
    }
}

/// Runs `f` on a thread and fails the test if it does not finish within 20 s (for clients
/// that may block forever on an unexpected reply).
pub fn with_timeout<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("client thread timed out or panicked")
}
