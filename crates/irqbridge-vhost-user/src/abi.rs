// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-visible ABI of the virtio event-channel device (docs/evtchn-virtio.md).
//!
//! Everything here is plain data: queue numbering, the control request and reply formats, the
//! upcall record written into event-vring buffers, the doorbell descriptor format and the
//! config space. All multi-byte fields are little-endian; encoding and decoding go through
//! explicit byte arrays, so nothing depends on host layout.

use std::fmt;

/// Default virtio device ID: 21, the specification's "signal distribution" device, which no
/// Linux or QEMU driver claims. An unassigned ID would be cleaner, but QEMU's generic
/// `vhost-user-test-device` aborts on IDs it has no name for (docs/evtchn-virtio.md); choose
/// another with [`BackendConfig::virtio_id`](crate::BackendConfig::virtio_id) where 21 is taken.
pub const DEFAULT_VIRTIO_ID: u16 = 21;

/// Version of this ABI, reported in the config space.
pub const ABI_VERSION: u16 = 1;

/// Index of the control queue (driver → device requests with a device-written status reply).
pub const CONTROL_QUEUE: usize = 0;
/// Index of the doorbell queue (driver → device port numbers to send on).
pub const DOORBELL_QUEUE: usize = 1;
/// Index of the event queue of upcall 0; upcall `v` uses queue `FIRST_EVENT_QUEUE + v`.
pub const FIRST_EVENT_QUEUE: usize = 2;

/// Most upcalls (event queues) a device can have. vhost-user-backend maps queues to worker
/// threads through a 64-bit mask, so control + doorbell + event queues must fit in 64.
pub const MAX_UPCALLS: u16 = 62;

/// Number of virtqueues of a device with `upcalls` upcalls.
pub const fn num_queues(upcalls: u16) -> usize {
    FIRST_EVENT_QUEUE + upcalls as usize
}

/// Queue index of the event queue of upcall `upcall`.
pub const fn event_queue(upcall: u16) -> usize {
    FIRST_EVENT_QUEUE + upcall as usize
}

/// Size of a control request in bytes.
pub const REQUEST_SIZE: usize = 16;
/// Size of a control reply in bytes.
pub const REPLY_SIZE: usize = 8;
/// Size of an upcall record in bytes.
pub const RECORD_SIZE: usize = 8;
/// Size of one port number in a doorbell buffer.
pub const DOORBELL_ENTRY_SIZE: usize = 4;
/// Most port numbers one doorbell chain may carry (longer chains are rejected whole).
pub const MAX_DOORBELL_PORTS: usize = 1024;

/// Control request opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Op {
    /// Register the event-channel page: `arg` = guest physical address, `port` = 0.
    RegisterPage = 1,
    /// Bind `port` to upcall `arg` (opening it if closed).
    Bind = 2,
    /// Keep `port` open without an upcall.
    Unbind = 3,
    /// Close `port`.
    Close = 4,
    /// Clear the mask bit of `port` and raise its upcall if it is pending (EVTCHNOP_unmask).
    Unmask = 5,
    /// Report the state of `port` in the reply's `value`.
    Status = 6,
    /// Send an event to the peer of `port` (interdomain or loopback link).
    Send = 7,
    /// Close every port and zero the current page (EVTCHNOP_reset).
    Reset = 8,
}

impl TryFrom<u32> for Op {
    type Error = u32;

    fn try_from(v: u32) -> Result<Self, u32> {
        Ok(match v {
            1 => Op::RegisterPage,
            2 => Op::Bind,
            3 => Op::Unbind,
            4 => Op::Close,
            5 => Op::Unmask,
            6 => Op::Status,
            7 => Op::Send,
            8 => Op::Reset,
            other => return Err(other),
        })
    }
}

/// Status codes of a control reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// The request is shorter than 16 bytes, unreadable, or a field the op does not use is
    /// not zero.
    BadRequest = 1,
    /// Unknown opcode.
    UnknownOp = 2,
    /// The port number is not below the port count.
    BadPort = 3,
    /// The upcall number is not below the upcall count.
    BadUpcall = 4,
    /// REGISTER_PAGE: the address is not 8-byte aligned, or the 4 KiB page is not inside one
    /// memory region.
    BadAddress = 5,
    /// UNMASK before any page was registered.
    NoPage = 6,
    /// SEND on a port without a link.
    NotConnected = 7,
}

impl Status {
    /// Decode a status value (unknown values give `None`).
    pub fn from_u32(v: u32) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::BadRequest,
            2 => Status::UnknownOp,
            3 => Status::BadPort,
            4 => Status::BadUpcall,
            5 => Status::BadAddress,
            6 => Status::NoPage,
            7 => Status::NotConnected,
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A control request: `op u32 @0, port u32 @4, arg u64 @8`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Opcode ([`Op`]).
    pub op: u32,
    /// Port number (0 for ops without a port).
    pub port: u32,
    /// Op-specific argument (0 for ops without one).
    pub arg: u64,
}

impl Request {
    /// A request for `op` on `port` with argument `arg`.
    pub fn new(op: Op, port: u32, arg: u64) -> Request {
        Request {
            op: op as u32,
            port,
            arg,
        }
    }

    /// Little-endian encoding.
    pub fn to_bytes(&self) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.port.to_le_bytes());
        b[8..16].copy_from_slice(&self.arg.to_le_bytes());
        b
    }

    /// Decode the request at the start of `b` (the readable part of a control chain); `None`
    /// if it is shorter than [`REQUEST_SIZE`] (answered with [`Status::BadRequest`]). Bytes
    /// after the first 16 are ignored.
    pub fn parse(b: &[u8]) -> Option<Request> {
        let head: &[u8; REQUEST_SIZE] = b.get(..REQUEST_SIZE)?.try_into().ok()?;
        Some(Request::from_bytes(head))
    }

    /// Decode a request.
    pub fn from_bytes(b: &[u8; REQUEST_SIZE]) -> Request {
        let [
            o0,
            o1,
            o2,
            o3,
            p0,
            p1,
            p2,
            p3,
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
        ] = *b;
        Request {
            op: u32::from_le_bytes([o0, o1, o2, o3]),
            port: u32::from_le_bytes([p0, p1, p2, p3]),
            arg: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        }
    }
}

/// A control reply: `status u32 @0, value u32 @4`, written into the first 8 device-writable
/// bytes of the request's chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// Status code ([`Status`]).
    pub status: u32,
    /// Op-specific result (STATUS: the port state word), otherwise 0.
    pub value: u32,
}

impl Reply {
    /// A reply with `status` and `value`.
    pub fn new(status: Status, value: u32) -> Reply {
        Reply {
            status: status as u32,
            value,
        }
    }

    /// The decoded status, if known.
    pub fn status(&self) -> Option<Status> {
        Status::from_u32(self.status)
    }

    /// Little-endian encoding.
    pub fn to_bytes(&self) -> [u8; REPLY_SIZE] {
        let mut b = [0u8; REPLY_SIZE];
        b[0..4].copy_from_slice(&self.status.to_le_bytes());
        b[4..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Decode a reply.
    pub fn from_bytes(b: &[u8; REPLY_SIZE]) -> Reply {
        let [s0, s1, s2, s3, v0, v1, v2, v3] = *b;
        Reply {
            status: u32::from_le_bytes([s0, s1, s2, s3]),
            value: u32::from_le_bytes([v0, v1, v2, v3]),
        }
    }
}

/// STATUS value, bits 1:0: the port is closed.
pub const PORT_CLOSED: u32 = 0;
/// STATUS value, bits 1:0: the port is open without an upcall.
pub const PORT_UNBOUND: u32 = 1;
/// STATUS value, bits 1:0: the port is bound to the upcall in bits 31:16.
pub const PORT_BOUND: u32 = 2;
/// STATUS value bit: the port has an interdomain or loopback link (SEND works).
pub const PORT_F_LINKED: u32 = 1 << 2;
/// STATUS value bit: the port's pending bit is set in the current page.
pub const PORT_F_PENDING: u32 = 1 << 3;
/// STATUS value bit: the port's mask bit is set in the current page.
pub const PORT_F_MASKED: u32 = 1 << 4;
/// STATUS value: shift of the upcall number (bits 31:16).
pub const PORT_UPCALL_SHIFT: u32 = 16;

/// Upcall record flag: the upcall was raised while no buffer was posted (or the queue was not
/// running) and is delivered late.
pub const RECORD_F_DEFERRED: u16 = 1;

/// The 8-byte record the device writes into one event-queue buffer per upcall:
/// `upcall u16 @0, flags u16 @2, seq u32 @4`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpcallRecord {
    /// The upcall (event queue) number.
    pub upcall: u16,
    /// [`RECORD_F_DEFERRED`] or 0.
    pub flags: u16,
    /// Records written on this queue since the frontend connected, starting at 1 (wrapping).
    pub seq: u32,
}

impl UpcallRecord {
    /// Little-endian encoding.
    pub fn to_bytes(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0..2].copy_from_slice(&self.upcall.to_le_bytes());
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..8].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Decode a record.
    pub fn from_bytes(b: &[u8; RECORD_SIZE]) -> UpcallRecord {
        let [u0, u1, f0, f1, s0, s1, s2, s3] = *b;
        UpcallRecord {
            upcall: u16::from_le_bytes([u0, u1]),
            flags: u16::from_le_bytes([f0, f1]),
            seq: u32::from_le_bytes([s0, s1, s2, s3]),
        }
    }
}

/// The port numbers of a doorbell buffer (the readable part of a doorbell chain): 1 to
/// [`MAX_DOORBELL_PORTS`] little-endian u32. `None` for an empty buffer, a length that is not a
/// multiple of 4 or one that is too long (the chain is rejected whole).
pub fn parse_doorbell(b: &[u8]) -> Option<Vec<u32>> {
    if b.is_empty()
        || b.len() % DOORBELL_ENTRY_SIZE != 0
        || b.len() > MAX_DOORBELL_PORTS * DOORBELL_ENTRY_SIZE
    {
        return None;
    }
    Some(
        b.chunks_exact(DOORBELL_ENTRY_SIZE)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Config-space feature bit: Xen 2-level event channels over a registered page.
pub const FEATURE_EVTCHN_2L: u64 = 1 << 0;
/// Config-space feature bit: the doorbell queue (queue 1) is served.
pub const FEATURE_DOORBELL: u64 = 1 << 1;
/// Config-space feature bit: SEND and interdomain / loopback links.
pub const FEATURE_INTERDOMAIN: u64 = 1 << 2;
/// Every feature bit this backend implements.
pub const FEATURES: u64 = FEATURE_EVTCHN_2L | FEATURE_DOORBELL | FEATURE_INTERDOMAIN;

/// Size of the defined config space in bytes.
pub const CONFIG_SIZE: usize = 24;
/// Most config bytes a frontend may read (QEMU's limit); bytes past [`CONFIG_SIZE`] read 0.
pub const MAX_CONFIG_READ: usize = 256;

/// The read-only device config space:
/// `num_ports u32 @0, num_upcalls u16 @4, abi_version u16 @6, features u64 @8,
/// virtio_id u16 @16, reserved (0) @18..24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigSpace {
    /// Number of ports.
    pub num_ports: u32,
    /// Number of upcalls (event queues).
    pub num_upcalls: u16,
    /// [`ABI_VERSION`].
    pub abi_version: u16,
    /// Feature bits ([`FEATURES`]).
    pub features: u64,
    /// The virtio device ID the backend expects the frontend to present.
    pub virtio_id: u16,
}

impl ConfigSpace {
    /// Little-endian encoding of the [`CONFIG_SIZE`] bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..4].copy_from_slice(&self.num_ports.to_le_bytes());
        b[4..6].copy_from_slice(&self.num_upcalls.to_le_bytes());
        b[6..8].copy_from_slice(&self.abi_version.to_le_bytes());
        b[8..16].copy_from_slice(&self.features.to_le_bytes());
        b[16..18].copy_from_slice(&self.virtio_id.to_le_bytes());
        b
    }

    /// Decode the config space.
    pub fn from_bytes(b: &[u8; CONFIG_SIZE]) -> ConfigSpace {
        let mut f = [0u8; 8];
        f.copy_from_slice(&b[8..16]);
        ConfigSpace {
            num_ports: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            num_upcalls: u16::from_le_bytes([b[4], b[5]]),
            abi_version: u16::from_le_bytes([b[6], b[7]]),
            features: u64::from_le_bytes(f),
            virtio_id: u16::from_le_bytes([b[16], b[17]]),
        }
    }

    /// The bytes a GET_CONFIG of `size` bytes at `offset` returns: config bytes, zero past
    /// [`CONFIG_SIZE`]. `None` when the range ends past [`MAX_CONFIG_READ`] (the request fails).
    pub fn read(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        if end > MAX_CONFIG_READ || size == 0 {
            return None;
        }
        let bytes = self.to_bytes();
        Some(
            (start..end)
                .map(|i| bytes.get(i).copied().unwrap_or(0))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_reply_record_round_trip() {
        let r = Request::new(Op::RegisterPage, 0, 0x1122_3344_5566_7788);
        let b = r.to_bytes();
        assert_eq!(b[0], 1);
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(Request::from_bytes(&b), r);

        let rep = Reply::new(Status::BadPort, 0xdead_beef);
        assert_eq!(rep.to_bytes(), [3, 0, 0, 0, 0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(Reply::from_bytes(&rep.to_bytes()), rep);
        assert_eq!(rep.status(), Some(Status::BadPort));
        assert_eq!(
            Reply {
                status: 99,
                value: 0
            }
            .status(),
            None
        );

        let rec = UpcallRecord {
            upcall: 5,
            flags: RECORD_F_DEFERRED,
            seq: 7,
        };
        assert_eq!(rec.to_bytes(), [5, 0, 1, 0, 7, 0, 0, 0]);
        assert_eq!(UpcallRecord::from_bytes(&rec.to_bytes()), rec);
    }

    #[test]
    fn ops_and_statuses_decode() {
        for v in 1..=8u32 {
            assert_eq!(Op::try_from(v).map(|o| o as u32), Ok(v));
        }
        assert_eq!(Op::try_from(0), Err(0));
        assert_eq!(Op::try_from(9), Err(9));
        for v in 0..=7u32 {
            assert_eq!(Status::from_u32(v).map(|s| s as u32), Some(v));
        }
        assert_eq!(Status::from_u32(8), None);
    }

    #[test]
    fn config_space_reads() {
        let c = ConfigSpace {
            num_ports: 4096,
            num_upcalls: 3,
            abi_version: ABI_VERSION,
            features: FEATURES,
            virtio_id: DEFAULT_VIRTIO_ID,
        };
        assert_eq!(ConfigSpace::from_bytes(&c.to_bytes()), c);
        let all = c.read(0, CONFIG_SIZE as u32).unwrap();
        assert_eq!(&all[..], &c.to_bytes()[..]);
        assert_eq!(c.read(4, 2).unwrap(), [3, 0]);
        // Past the defined fields: zeros, up to the 256-byte limit.
        assert_eq!(c.read(20, 8).unwrap(), [0; 8]);
        assert_eq!(c.read(0, 256).unwrap().len(), 256);
        assert_eq!(c.read(1, 256), None);
        assert_eq!(c.read(0, 0), None);
        assert_eq!(c.read(u32::MAX, u32::MAX), None);
    }

    #[test]
    fn queue_numbering() {
        assert_eq!(num_queues(1), 3);
        assert_eq!(num_queues(MAX_UPCALLS), 64);
        assert_eq!(event_queue(0), 2);
        assert_eq!(event_queue(61), 63);
    }
}
