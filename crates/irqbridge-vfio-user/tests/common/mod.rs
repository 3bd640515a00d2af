// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared pieces of the protocol tests: a fake device that records every call, a server
//! running on a thread, and a raw client built on `conn::Connection`.

#![allow(dead_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use irqbridge_vfio_user::conn::{Connection, Message};
use irqbridge_vfio_user::device::{
    DeviceInfo, Errno, IoFd, IrqAction, IrqData, IrqInfo, RegionInfo, SetIrqs, SparseArea,
    VfioUserDevice,
};
use irqbridge_vfio_user::error::Error;
use irqbridge_vfio_user::proto::{self, Command, Header, Version};
use irqbridge_vfio_user::server::{Server, ServerConfig, StopHandle};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Tests in one binary share the process's fd table: they take this lock so fd counts are
/// exact.
static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises the tests of this binary.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Number of open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Size of the fake BAR0 (plain memory, with io fds).
pub const BAR0_SIZE: u64 = 0x1000;
/// Size of the fake BAR2 (plain memory).
pub const BAR2_SIZE: u64 = 0x2000;
/// Size of BAR4 and BAR5 (memfd-backed, mmap-able).
pub const MMAP_BAR_SIZE: u64 = 0x1000;
/// File offset of BAR4 inside its memfd.
pub const BAR4_FILE_OFFSET: u64 = 0x1000;
/// Config space size.
pub const CONFIG_SIZE: u64 = 256;
/// MSI-X vectors of the fake device.
pub const MSIX_COUNT: u32 = 8;
/// Reading BAR0 here fails with EIO.
pub const BAR0_FAIL_OFFSET: u64 = 0xf00;
/// Writing BAR2 here fails with errno 0 (the server must send EIO instead).
pub const BAR2_ZERO_ERRNO_OFFSET: u64 = 0x1ff0;
/// Poll token of the BAR0 doorbell ioeventfd.
pub const DOORBELL_TOKEN: u64 = 1;
/// Poll token of the BAR0 datamatch ioeventfd.
pub const DATAMATCH_TOKEN: u64 = 2;

/// What the device received, as far as the tests care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IrqDataSeen {
    /// DATA_NONE.
    None,
    /// DATA_BOOL.
    Bool(Vec<bool>),
    /// DATA_EVENTFD: `true` where an eventfd was given.
    Eventfds(Vec<bool>),
}

/// One recorded device call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// set_irqs.
    SetIrqs {
        /// IRQ index.
        index: u32,
        /// Action.
        action: IrqAction,
        /// First sub-index.
        start: u32,
        /// Count.
        count: u32,
        /// Data.
        data: IrqDataSeen,
    },
    /// region_read.
    Read {
        /// Region.
        region: u32,
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
    },
    /// region_write.
    Write {
        /// Region.
        region: u32,
        /// Offset.
        offset: u64,
        /// Bytes.
        data: Vec<u8>,
    },
    /// reset.
    Reset,
    /// client_disconnected.
    Disconnected,
    /// dma_map.
    DmaMap {
        /// Address.
        iova: u64,
        /// Size.
        size: u64,
        /// Whether a file came with it.
        fd: bool,
    },
    /// dma_unmap.
    DmaUnmap {
        /// Address.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// handle_fd_event.
    FdEvent(u64),
}

/// The log shared between the device (server thread) and the test.
pub type Log = Arc<Mutex<Vec<Call>>>;

fn memfd(name: &std::ffi::CStr, size: u64) -> OwnedFd {
    // SAFETY: `name` is NUL-terminated.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate of a live memfd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
    fd
}

fn pwrite_all(fd: &OwnedFd, data: &[u8], offset: u64) {
    // SAFETY: writing from a live buffer to a live descriptor.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            offset as i64,
        )
    };
    assert_eq!(n, data.len() as isize);
}

/// Reads `len` bytes at `offset` from a descriptor.
pub fn pread(fd: RawFd, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: reading into a live buffer from a live descriptor.
    let n = unsafe { libc::pread(fd.as_raw_fd(), v.as_mut_ptr().cast(), len, offset as i64) };
    assert_eq!(n, len as isize, "pread: {}", io::Error::last_os_error());
    v
}

/// A small PCI-like device: BAR0/BAR2/config are memory, BAR4/BAR5 are memfds (BAR4 with a
/// sparse-mmap area at a file offset, BAR5 mmap-able as a whole), BAR0 offers two ioeventfds.
#[derive(Debug)]
pub struct FakeDevice {
    log: Log,
    mem: Vec<Vec<u8>>,
    bar4: OwnedFd,
    bar5: OwnedFd,
    doorbell: EventFd,
    datamatch: EventFd,
    bound: Vec<EventFd>,
}

impl FakeDevice {
    /// A device and its call log.
    pub fn new() -> (FakeDevice, Log) {
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let bar4 = memfd(c"bar4", BAR4_FILE_OFFSET + MMAP_BAR_SIZE);
        let pattern: Vec<u8> = (0..MMAP_BAR_SIZE).map(|i| (i % 251) as u8).collect();
        pwrite_all(&bar4, &pattern, BAR4_FILE_OFFSET);
        let bar5 = memfd(c"bar5", MMAP_BAR_SIZE);
        pwrite_all(&bar5, b"bar5", 0);
        let mut mem = vec![Vec::new(); 9];
        mem[0] = vec![0; BAR0_SIZE as usize];
        mem[2] = vec![0; BAR2_SIZE as usize];
        mem[7] = vec![0; CONFIG_SIZE as usize];
        let dev = FakeDevice {
            log: Arc::clone(&log),
            mem,
            bar4,
            bar5,
            doorbell: EventFd::new(EFD_NONBLOCK).unwrap(),
            datamatch: EventFd::new(EFD_NONBLOCK).unwrap(),
            bound: Vec::new(),
        };
        (dev, log)
    }

    fn record(&self, c: Call) {
        self.log.lock().unwrap().push(c);
    }
}

impl VfioUserDevice for FakeDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: proto::VFIO_DEVICE_FLAGS_PCI | proto::VFIO_DEVICE_FLAGS_RESET,
            num_regions: proto::VFIO_PCI_NUM_REGIONS,
            num_irqs: proto::VFIO_PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> RegionInfo<'_> {
        let rw = proto::VFIO_REGION_INFO_FLAG_READ | proto::VFIO_REGION_INFO_FLAG_WRITE;
        let mmap = rw | proto::VFIO_REGION_INFO_FLAG_MMAP;
        let (flags, size, offset, sparse_areas, mmap_fd) = match index {
            0 => (rw, BAR0_SIZE, 0, Vec::new(), None),
            2 => (rw, BAR2_SIZE, 0, Vec::new(), None),
            4 => (
                mmap,
                MMAP_BAR_SIZE,
                BAR4_FILE_OFFSET,
                vec![SparseArea {
                    offset: 0,
                    size: MMAP_BAR_SIZE,
                }],
                Some(self.bar4.as_fd()),
            ),
            5 => (mmap, MMAP_BAR_SIZE, 0, Vec::new(), Some(self.bar5.as_fd())),
            7 => (rw, CONFIG_SIZE, 0, Vec::new(), None),
            _ => (0, 0, 0, Vec::new(), None),
        };
        RegionInfo {
            flags,
            size,
            offset,
            sparse_areas,
            mmap_fd,
        }
    }

    fn region_io_fds(&self, index: u32) -> Vec<IoFd<'_>> {
        if index != 0 {
            return Vec::new();
        }
        vec![
            IoFd {
                offset: 0x40,
                size: 4,
                fd: bfd(&self.doorbell),
                datamatch: None,
            },
            IoFd {
                offset: 0x44,
                size: 4,
                fd: bfd(&self.datamatch),
                datamatch: Some(0xabcd),
            },
        ]
    }

    fn irq_info(&self, index: u32) -> IrqInfo {
        let ev = proto::VFIO_IRQ_INFO_EVENTFD;
        match index {
            0 => IrqInfo {
                flags: ev | proto::VFIO_IRQ_INFO_MASKABLE | proto::VFIO_IRQ_INFO_AUTOMASKED,
                count: 1,
            },
            1 => IrqInfo {
                flags: ev | proto::VFIO_IRQ_INFO_NORESIZE,
                count: 1,
            },
            2 => IrqInfo {
                flags: ev | proto::VFIO_IRQ_INFO_MASKABLE,
                count: MSIX_COUNT,
            },
            3 | 4 => IrqInfo {
                flags: ev | proto::VFIO_IRQ_INFO_NORESIZE,
                count: 1,
            },
            _ => IrqInfo { flags: 0, count: 0 },
        }
    }

    fn set_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        let data = match req.data {
            IrqData::None => IrqDataSeen::None,
            IrqData::Bool(b) => IrqDataSeen::Bool(b),
            IrqData::Eventfds(fds) => {
                let seen = fds.iter().map(Option::is_some).collect();
                for fd in fds.into_iter().flatten() {
                    // Prove the descriptor is the client's eventfd.
                    fd.write(1).map_err(|_| libc::EIO)?;
                    self.bound.push(fd);
                }
                IrqDataSeen::Eventfds(seen)
            }
        };
        self.record(Call::SetIrqs {
            index: req.index,
            action: req.action,
            start: req.start,
            count: req.count,
            data,
        });
        Ok(())
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        self.record(Call::Read {
            region: index,
            offset,
            len: data.len(),
        });
        if index == 0 && offset == BAR0_FAIL_OFFSET {
            return Err(libc::EIO);
        }
        let region = self.mem.get(index as usize).ok_or(libc::EFAULT)?;
        let src = region
            .get(offset as usize..offset as usize + data.len())
            .ok_or(libc::EFAULT)?;
        data.copy_from_slice(src);
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.record(Call::Write {
            region: index,
            offset,
            data: data.to_vec(),
        });
        if index == 2 && offset == BAR2_ZERO_ERRNO_OFFSET {
            return Err(0);
        }
        let region = self.mem.get_mut(index as usize).ok_or(libc::EFAULT)?;
        let dst = region
            .get_mut(offset as usize..offset as usize + data.len())
            .ok_or(libc::EFAULT)?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        self.record(Call::Reset);
        Ok(())
    }

    fn client_disconnected(&mut self) {
        self.bound.clear();
        self.record(Call::Disconnected);
    }

    fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
        vec![
            (bfd(&self.doorbell), DOORBELL_TOKEN),
            (bfd(&self.datamatch), DATAMATCH_TOKEN),
        ]
    }

    fn handle_fd_event(&mut self, token: u64) {
        let fd = if token == DOORBELL_TOKEN {
            &self.doorbell
        } else {
            &self.datamatch
        };
        let _ = fd.read();
        self.record(Call::FdEvent(token));
    }

    fn dma_map(&mut self, iova: u64, size: u64, fd: Option<&OwnedFd>) {
        self.record(Call::DmaMap {
            iova,
            size,
            fd: fd.is_some(),
        });
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) {
        self.record(Call::DmaUnmap { iova, size });
    }
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A unique scratch directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates it.
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "irqbridge-vfu-{tag}-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server with a [`FakeDevice`] running on its own thread.
#[derive(Debug)]
pub struct Harness {
    /// Socket path.
    pub path: PathBuf,
    /// The device's call log.
    pub log: Log,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl Harness {
    /// Starts a server with the default configuration.
    pub fn start() -> Harness {
        Self::start_with(ServerConfig::default())
    }

    /// Starts a server with `config`.
    pub fn start_with(config: ServerConfig) -> Harness {
        let dir = TempDir::new("srv");
        let path = dir.0.join("vfio-user.sock");
        let server = Server::bind(&path).unwrap().with_config(config);
        Self::spawn(server, path, dir)
    }

    /// Starts a server on an already listening socket (`--fd` style).
    pub fn start_from_listener() -> Harness {
        let dir = TempDir::new("lst");
        let path = dir.0.join("vfio-user.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = Server::from_listener(l).unwrap();
        Self::spawn(server, path, dir)
    }

    fn spawn(mut server: Server, path: PathBuf, dir: TempDir) -> Harness {
        let (mut dev, log) = FakeDevice::new();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || {
            server.run(&mut dev).unwrap();
        });
        Harness {
            path,
            log,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// A raw client connected to the server (no VERSION sent yet).
    pub fn connect(&self) -> RawClient {
        RawClient::connect(&self.path)
    }

    /// A raw client that has negotiated VERSION like QEMU does.
    pub fn client(&self) -> RawClient {
        let mut c = self.connect();
        c.version_qemu();
        c
    }

    /// A copy of the device log.
    pub fn calls(&self) -> Vec<Call> {
        self.log.lock().unwrap().clone()
    }

    /// Clears the device log.
    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }

    /// Waits up to 5 s for `pred` to hold on the log.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[Call]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if pred(&self.log.lock().unwrap()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log: {:?}",
                self.calls()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Number of `client_disconnected` calls so far.
    pub fn disconnects(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| **c == Call::Disconnected)
            .count()
    }

    /// Stops the server and joins its thread.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.stop().unwrap();
            t.join().unwrap();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.stop();
            if !std::thread::panicking() {
                t.join().unwrap();
            }
        }
    }
}

/// The VERSION capabilities QEMU 10.1+ sends.
pub const QEMU_CAPS: &str = r#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#;

/// A hand-written client on `Connection`.
#[derive(Debug)]
pub struct RawClient {
    /// The connection.
    pub conn: Connection,
}

impl RawClient {
    /// Connects (with a 5 s read timeout so a missing reply fails the test).
    pub fn connect(path: &Path) -> RawClient {
        let conn = Connection::new(UnixStream::connect(path).unwrap());
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        RawClient { conn }
    }

    /// VERSION as QEMU sends it; returns the reply.
    pub fn version_qemu(&mut self) -> Version {
        let mut body = vec![0, 0, 0, 0];
        body.extend_from_slice(QEMU_CAPS.as_bytes());
        body.push(0);
        let r = self.call(Command::Version, &body, &[]);
        Version::parse(&r.body).unwrap()
    }

    /// A successful request.
    pub fn call(&mut self, cmd: Command, body: &[u8], fds: &[BorrowedFd<'_>]) -> Message {
        match self.conn.request(cmd, body, fds) {
            Ok(m) => m,
            Err(e) => panic!("{cmd:?} failed: {e}"),
        }
    }

    /// A request that must fail with `errno`.
    pub fn expect_errno(&mut self, cmd: Command, body: &[u8], fds: &[BorrowedFd<'_>], errno: i32) {
        match self.conn.request(cmd, body, fds) {
            Err(Error::Peer { errno: e, .. }) => {
                assert_eq!(e, errno as u32, "{cmd:?}: errno {e}, expected {errno}")
            }
            Ok(m) => panic!("{cmd:?} succeeded ({:?}), expected errno {errno}", m.header),
            Err(e) => panic!("{cmd:?} failed with {e}, expected errno {errno}"),
        }
    }

    /// Sends raw bytes and expects an error reply with `errno` (and message id `id`).
    pub fn raw_expect_errno(&self, bytes: &[u8], fds: &[BorrowedFd<'_>], id: u16, errno: i32) {
        self.conn.send_raw(bytes, fds).unwrap();
        let m = self.conn.recv().unwrap();
        assert_eq!(m.header.msg_id, id);
        assert_eq!(
            m.header.flags,
            proto::FLAGS_TYPE_REPLY | proto::FLAGS_ERROR,
            "{:?}",
            m.header
        );
        assert_eq!(m.header.error, errno as u32, "{:?}", m.header);
        assert_eq!(m.header.msg_size, 16);
        assert!(m.body.is_empty());
        assert!(m.fds.is_empty());
    }

    /// Sends a command with NO_REPLY.
    pub fn post(&mut self, cmd: Command, body: &[u8], fds: &[BorrowedFd<'_>]) {
        self.conn.post(cmd, body, fds).unwrap();
    }

    /// A cheap valid request proving the stream is in step.
    pub fn in_step(&mut self) {
        let r = self.call(
            Command::DeviceGetInfo,
            &proto::DeviceInfoMsg::request().encode(),
            &[],
        );
        let info = proto::DeviceInfoMsg::parse(&r.body).unwrap();
        assert_eq!(info.num_regions, 9);
        assert_eq!(info.num_irqs, 5);
    }

    /// REGION_READ.
    pub fn read(&mut self, region: u32, offset: u64, count: u32) -> Vec<u8> {
        let req = proto::RegionAccess {
            offset,
            region,
            count,
        };
        let r = self.call(Command::RegionRead, &req.encode(), &[]);
        let d = proto::RegionData::parse(&r.body).unwrap();
        assert_eq!((d.region, d.offset), (region, offset));
        d.data
    }

    /// REGION_WRITE.
    pub fn write(&mut self, region: u32, offset: u64, data: &[u8]) {
        let req = proto::RegionData {
            offset,
            region,
            data: data.to_vec(),
        };
        let r = self.call(Command::RegionWrite, &req.encode(), &[]);
        assert_eq!(proto::RegionAccess::parse(&r.body).unwrap(), req.head());
    }

    /// SET_IRQS without data.
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), u32> {
        let body = proto::SetIrqsRequest::new(index, flags, start, count).encode();
        match self.conn.request(Command::DeviceSetIrqs, &body, fds) {
            Ok(m) => {
                assert!(m.body.is_empty());
                Ok(())
            }
            Err(Error::Peer { errno, .. }) => Err(errno),
            Err(e) => panic!("SET_IRQS transport failure: {e}"),
        }
    }
}

/// A header for a raw message with an explicit `msg_size`.
pub fn raw_header(id: u16, command: u16, msg_size: u32, flags: u32) -> [u8; 16] {
    Header {
        msg_id: id,
        command,
        msg_size,
        flags,
        error: 0,
    }
    .encode()
}

/// A raw message: header with `msg_size` = 16 + body.
pub fn raw_msg(id: u16, command: u16, body: &[u8]) -> Vec<u8> {
    let mut v = raw_header(id, command, 16 + body.len() as u32, 0).to_vec();
    v.extend_from_slice(body);
    v
}

/// A non-blocking eventfd.
pub fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// Borrows an eventfd as a `BorrowedFd`.
pub fn bfd(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

/// Reads an eventfd counter, waiting up to 5 s; 0 on timeout.
pub fn wait_count(e: &EventFd) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match e.read() {
            Ok(n) => return n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("eventfd read: {err}"),
        }
        if Instant::now() >= deadline {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Raw fd of a borrowed descriptor (for messages).
pub fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}
