// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Randomised garbage against the real server and the PCI device: thousands of messages with
//! random commands, flags, sizes, bodies and fds, and random guest accesses to every region.
//! Nothing may panic, every message must leave the stream in step (a probe request after each
//! one gets its own reply) or end only that connection, no fd may leak, and the device must
//! still answer correctly afterwards. The generator is seeded, so a failure reproduces.

mod device_util;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use irqbridge_vfio_user::conn::Connection;
use irqbridge_vfio_user::device::VfioUserDevice;
use irqbridge_vfio_user::pci::regs::{MAGIC, REG_MAGIC};
use irqbridge_vfio_user::pci::{DeviceConfig, IrqbridgeDevice};
use irqbridge_vfio_user::proto::{
    Capabilities, Command, DeviceInfoMsg, FLAGS_NO_REPLY, HEADER_SIZE, Header, Version,
};
use vmm_sys_util::eventfd::EventFd;

use device_util::*;

/// xorshift64*: small, deterministic, good enough to shake a parser.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// The fd count is process-wide: the tests of this file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn connect(path: &std::path::Path) -> Connection {
    let stream = UnixStream::connect(path).unwrap();
    let conn = Connection::new(stream);
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    conn
}

/// VERSION, as every client must send first.
fn hello(conn: &mut Connection) {
    let v = Version {
        major: 0,
        minor: 0,
        capabilities: Capabilities {
            max_msg_fds: 16,
            ..Default::default()
        },
    };
    conn.request(Command::Version, &v.encode(), &[]).unwrap();
}

/// A body that is partly well formed: the first words of most requests are argsz, flags,
/// index, start, count, so small values there reach deeper validation paths.
fn body(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(4) {
        0 => 0,
        1 => rng.below(24) as usize,
        _ => rng.below(200) as usize,
    };
    let mut b = rng.bytes(len);
    for word in b.chunks_mut(4).take(5) {
        if rng.below(2) == 0 {
            let small = (rng.below(40) as u32).to_le_bytes();
            word.copy_from_slice(&small[..word.len()]);
        }
    }
    b
}

/// Sends one random message; returns false if the connection must be replaced (the message
/// claimed more bytes than it carried, or the server dropped it).
fn send_garbage(
    conn: &Connection,
    rng: &mut Rng,
    fds: &[EventFd],
    devnull: BorrowedFd<'_>,
) -> bool {
    let command = rng.below(21) as u16;
    let flags = match rng.below(6) {
        0 => FLAGS_NO_REPLY,
        1 => rng.next() as u32,
        2 => 1, // a "reply" from the client
        _ => 0,
    };
    let body = body(rng);
    let mut bytes = Header {
        msg_id: rng.next() as u16,
        command,
        msg_size: (HEADER_SIZE + body.len()) as u32,
        flags,
        error: 0,
    }
    .encode()
    .to_vec();
    bytes.extend_from_slice(&body);
    let mut keep = true;
    match rng.below(12) {
        // msg_size below the header size.
        0 => bytes[4..8].copy_from_slice(&(rng.below(16) as u32).to_le_bytes()),
        // More than is sent, or absurdly large: the connection cannot stay in step.
        1 => {
            let claim = (bytes.len() as u32).saturating_add(1 + rng.next() as u32 % (1 << 26));
            bytes[4..8].copy_from_slice(&claim.to_le_bytes());
            keep = false;
        }
        _ => {}
    }
    let n = rng.below(4) as usize;
    let mut attached: Vec<BorrowedFd<'_>> = fds
        .iter()
        .take(n)
        // SAFETY: the eventfds outlive this call (they belong to the test); vmm-sys-util's
        // EventFd has no AsFd of its own.
        .map(|f| unsafe { BorrowedFd::borrow_raw(f.as_raw_fd()) })
        .collect();
    if rng.below(4) == 0 {
        attached.push(devnull);
    }
    if bytes.len() >= 8 && u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) < 16 {
        bytes.truncate(HEADER_SIZE);
    }
    conn.send_raw(&bytes, &attached).is_ok() && keep
}

/// DEVICE_GET_INFO with a fresh id; skips any replies still owed to the garbage before it.
/// Returns false if the server ended the connection.
fn probe(conn: &mut Connection) -> bool {
    let id = conn.next_msg_id();
    let header = Header::command(id, Command::DeviceGetInfo, 16);
    if conn
        .send(&header, &DeviceInfoMsg::request().encode(), &[])
        .is_err()
    {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match conn.recv() {
            Ok(m)
                if m.header.msg_id == id
                    && m.header.command == u16::from(Command::DeviceGetInfo) =>
            {
                assert!(!m.header.is_error(), "probe failed: {:?}", m.header);
                let info = DeviceInfoMsg::parse(&m.body).unwrap();
                assert_eq!(info.num_regions, 9);
                return true;
            }
            Ok(_) => assert!(Instant::now() < deadline, "probe reply never came"),
            Err(e) => {
                assert!(e.is_fatal(), "probe failed without a hang-up: {e}");
                return false;
            }
        }
    }
}

#[test]
fn random_messages_never_panic_desync_or_leak() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Running::start(DeviceConfig::default(), false);
    let eventfds: Vec<EventFd> = (0..3).map(|_| EventFd::new(0).unwrap()).collect();
    let devnull = std::fs::File::open("/dev/null").unwrap();
    // Everything the server holds between clients: listener, stop eventfd, the device's page
    // memfd and doorbell eventfd. A client's fds must all be gone once it has disconnected.
    let baseline = open_fds();

    let mut rng = Rng(0x1bb1_d6e5_0c0f_fee1);
    let mut conn = connect(&server.path);
    hello(&mut conn);
    let (mut messages, mut reconnects) = (0, 0);
    while messages < 3000 {
        messages += 1;
        let keep = send_garbage(&conn, &mut rng, &eventfds, devnull.as_fd());
        if !keep || !probe(&mut conn) {
            reconnects += 1;
            conn = connect(&server.path);
            hello(&mut conn);
        }
    }
    drop(conn);
    eprintln!("{messages} garbage messages, {reconnects} connections ended by the server");
    assert!(
        reconnects < messages / 4,
        "{reconnects} reconnects in {messages}"
    );

    // The device still works for a well-behaved client.
    let mut client = RawClient::connect(&server.path);
    assert_eq!(client.read(0, REG_MAGIC, 4), u64::from(MAGIC));
    assert_eq!(client.read(7, 0, 4), 0x7162_6972);
    drop(client);

    // Every fd the garbage brought in was closed (the server drops them asynchronously).
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds() != baseline {
        assert!(
            Instant::now() < deadline,
            "fd leak: {} open, {baseline} before",
            open_fds()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server thread ends cleanly (it would have panicked or returned an error otherwise).
    server.finish();
}

#[test]
fn random_guest_accesses_to_every_region_are_harmless() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut dev = IrqbridgeDevice::new(DeviceConfig::default()).unwrap();
    let mut rng = Rng(0x5eed_0000_0bad_cafe);
    let regions: Vec<(u32, u64)> = [0u32, 2, 4, 7]
        .iter()
        .map(|&i| (i, dev.region_info(i).size))
        .collect();
    for _ in 0..200_000 {
        let &(index, size) = &regions[rng.below(regions.len() as u64) as usize];
        let len = [1usize, 2, 3, 4, 8][rng.below(5) as usize];
        let offset = rng.below(size - len as u64 + 1);
        if rng.below(3) == 0 {
            let mut data = vec![0u8; len];
            let _ = dev.region_read(index, offset, &mut data);
        } else {
            let data = rng.bytes(len);
            let _ = dev.region_write(index, offset, &data);
        }
    }
    // Whatever the guest wrote, identity registers still read right and reset restores order.
    dev.reset().unwrap();
    let mut b = [0u8; 4];
    dev.region_read(0, REG_MAGIC, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), MAGIC);
    dev.region_read(7, 0, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x7162_6972);
    let snapshot = dev.snapshot();
    let json = serde_json::to_string(&snapshot).unwrap();
    assert!(json.contains("\"msix\""));
}
