//! vfio-user wire format: constants, the message header and every message body, for both
//! directions.
//!
//! Everything is little-endian and parsed with `from_le_bytes` (no unsafe, no packed structs).
//! Each body type has `parse(&[u8]) -> Result<Self>` and `encode(&self) -> Vec<u8>`, so a server
//! parses requests and encodes replies, and a client (the KVM plugin) encodes requests and parses
//! replies with the same types:
//!
//! ```
//! use irqbridge_vfio_user::proto::{self, SetIrqsRequest};
//!
//! let req = SetIrqsRequest::new(
//!     proto::VFIO_PCI_INTX_IRQ_INDEX,
//!     proto::VFIO_IRQ_SET_DATA_EVENTFD | proto::VFIO_IRQ_SET_ACTION_TRIGGER,
//!     0,
//!     1,
//! );
//! let body = req.encode();
//! assert_eq!(body.len(), SetIrqsRequest::SIZE);
//! assert_eq!(SetIrqsRequest::parse(&body).unwrap(), req);
//! ```
//!
//! `parse` checks syntax only: the exact body length of fixed-size messages, that `argsz`
//! covers the fixed part, that variable parts fit the body. Semantic checks (index ranges,
//! flag combinations, fd counts) are the server's (`crate::server`).
//!
//! Layouts follow QEMU `docs/interop/vfio-user.rst` and Linux `include/uapi/linux/vfio.h`; the
//! offsets below are from the start of the body (byte 16 of the message).

#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;
/// Protocol major version spoken here.
pub const VERSION_MAJOR: u16 = 0;
/// Protocol minor version spoken here (QEMU rejects a reply minor above its own 0).
pub const VERSION_MINOR: u16 = 0;

/// Header flags: message type mask (bits 0-3).
pub const FLAGS_TYPE_MASK: u32 = 0xf;
/// Header flags: type "command".
pub const FLAGS_TYPE_COMMAND: u32 = 0;
/// Header flags: type "reply".
pub const FLAGS_TYPE_REPLY: u32 = 1;
/// Header flags: the sender wants no reply (never reply, not even an error).
pub const FLAGS_NO_REPLY: u32 = 1 << 4;
/// Header flags: the reply is an error; `error` holds a positive errno.
pub const FLAGS_ERROR: u32 = 1 << 5;

/// Most file descriptors accepted in one message (QEMU offers and accepts at most 16).
pub const MAX_MSG_FDS: usize = 16;
/// Default `max_data_xfer_size` (spec default, also what this server offers).
pub const DEFAULT_MAX_DATA_XFER_SIZE: u32 = 1 << 20;
/// Default `max_dma_maps` (spec default; QEMU only accepts values up to this).
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// Default `max_msg_fds` a peer accepts when it does not say (spec).
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Default DMA page sizes.
pub const DEFAULT_PGSIZES: u64 = 4096;
/// Most entries in one REGION_WRITE_MULTI.
pub const WRITE_MULTI_MAX_ENTRIES: usize = 200;
/// Most data bytes in one REGION_WRITE_MULTI entry.
pub const WRITE_MULTI_DATA_SIZE: usize = 8;

/// DEVICE_GET_INFO flags: the device supports DEVICE_RESET.
pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// DEVICE_GET_INFO flags: PCI device.
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// Region flags: readable.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// Region flags: writable.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// Region flags: mmap-able (the reply carries one fd).
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// Region flags: a capability chain follows the structure.
pub const VFIO_REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// Region capability id: sparse mmap areas.
pub const VFIO_REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
/// Region capability id: region type/subtype.
pub const VFIO_REGION_INFO_CAP_TYPE: u16 = 2;
/// Region capability id: MSI-X table may be mmapped.
pub const VFIO_REGION_INFO_CAP_MSIX_MAPPABLE: u16 = 3;

/// IRQ info flags: eventfds can be bound.
pub const VFIO_IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// IRQ info flags: MASK/UNMASK supported.
pub const VFIO_IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// IRQ info flags: the interrupt masks itself when it fires (level semantics).
pub const VFIO_IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// IRQ info flags: sub-indexes are enabled as a set.
pub const VFIO_IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// SET_IRQS data: none.
pub const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// SET_IRQS data: `count` bytes of booleans follow.
pub const VFIO_IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// SET_IRQS data: eventfds in SCM_RIGHTS.
pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// SET_IRQS: mask of the data bits.
pub const VFIO_IRQ_SET_DATA_TYPE_MASK: u32 = 0x7;
/// SET_IRQS action: mask.
pub const VFIO_IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// SET_IRQS action: unmask.
pub const VFIO_IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// SET_IRQS action: trigger.
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// SET_IRQS: mask of the action bits.
pub const VFIO_IRQ_SET_ACTION_TYPE_MASK: u32 = 0x38;

/// PCI region index of BAR0 (BARn = n).
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// PCI region index of the expansion ROM.
pub const VFIO_PCI_ROM_REGION_INDEX: u32 = 6;
/// PCI region index of config space.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// PCI region index of VGA.
pub const VFIO_PCI_VGA_REGION_INDEX: u32 = 8;
/// Number of standard PCI regions.
pub const VFIO_PCI_NUM_REGIONS: u32 = 9;
/// PCI IRQ index: INTx.
pub const VFIO_PCI_INTX_IRQ_INDEX: u32 = 0;
/// PCI IRQ index: MSI.
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
/// PCI IRQ index: MSI-X.
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;
/// PCI IRQ index: AER error notification.
pub const VFIO_PCI_ERR_IRQ_INDEX: u32 = 3;
/// PCI IRQ index: device request.
pub const VFIO_PCI_REQ_IRQ_INDEX: u32 = 4;
/// Number of PCI IRQ indexes.
pub const VFIO_PCI_NUM_IRQS: u32 = 5;

/// DMA_MAP flags: the server may read.
pub const VFIO_USER_F_DMA_REGION_READ: u32 = 1 << 0;
/// DMA_MAP flags: the server may write.
pub const VFIO_USER_F_DMA_REGION_WRITE: u32 = 1 << 1;
/// DMA_UNMAP flags: return a dirty bitmap (not supported here).
pub const VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// DMA_UNMAP flags: unmap everything (address and size must be 0).
pub const VFIO_DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// REGION_IO_FDS entry type: ioeventfd.
pub const VFIO_USER_IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// REGION_IO_FDS entry type: ioregionfd.
pub const VFIO_USER_IO_FD_TYPE_IOREGIONFD: u32 = 1;
/// REGION_IO_FDS ioeventfd flag: only fire on `datamatch` (KVM_IOEVENTFD_FLAG_DATAMATCH).
pub const KVM_IOEVENTFD_FLAG_DATAMATCH: u32 = 1 << 0;
/// REGION_IO_FDS ioeventfd flag: port I/O (KVM_IOEVENTFD_FLAG_PIO).
pub const KVM_IOEVENTFD_FLAG_PIO: u32 = 1 << 1;

/// vfio-user command numbers.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// VFIO_USER_VERSION.
    Version = 1,
    /// VFIO_USER_DMA_MAP.
    DmaMap = 2,
    /// VFIO_USER_DMA_UNMAP.
    DmaUnmap = 3,
    /// VFIO_USER_DEVICE_GET_INFO.
    DeviceGetInfo = 4,
    /// VFIO_USER_DEVICE_GET_REGION_INFO.
    DeviceGetRegionInfo = 5,
    /// VFIO_USER_DEVICE_GET_REGION_IO_FDS.
    DeviceGetRegionIoFds = 6,
    /// VFIO_USER_DEVICE_GET_IRQ_INFO.
    DeviceGetIrqInfo = 7,
    /// VFIO_USER_DEVICE_SET_IRQS.
    DeviceSetIrqs = 8,
    /// VFIO_USER_REGION_READ.
    RegionRead = 9,
    /// VFIO_USER_REGION_WRITE.
    RegionWrite = 10,
    /// VFIO_USER_DMA_READ (server to client).
    DmaRead = 11,
    /// VFIO_USER_DMA_WRITE (server to client).
    DmaWrite = 12,
    /// VFIO_USER_DEVICE_RESET.
    DeviceReset = 13,
    /// VFIO_USER_DIRTY_PAGES (obsolete).
    DirtyPages = 14,
    /// VFIO_USER_REGION_WRITE_MULTI.
    RegionWriteMulti = 15,
    /// VFIO_USER_DEVICE_FEATURE.
    DeviceFeature = 16,
    /// VFIO_USER_MIG_DATA_READ.
    MigDataRead = 17,
    /// VFIO_USER_MIG_DATA_WRITE.
    MigDataWrite = 18,
}

impl TryFrom<u16> for Command {
    type Error = Error;

    fn try_from(v: u16) -> Result<Self> {
        Ok(match v {
            1 => Command::Version,
            2 => Command::DmaMap,
            3 => Command::DmaUnmap,
            4 => Command::DeviceGetInfo,
            5 => Command::DeviceGetRegionInfo,
            6 => Command::DeviceGetRegionIoFds,
            7 => Command::DeviceGetIrqInfo,
            8 => Command::DeviceSetIrqs,
            9 => Command::RegionRead,
            10 => Command::RegionWrite,
            11 => Command::DmaRead,
            12 => Command::DmaWrite,
            13 => Command::DeviceReset,
            14 => Command::DirtyPages,
            15 => Command::RegionWriteMulti,
            16 => Command::DeviceFeature,
            17 => Command::MigDataRead,
            18 => Command::MigDataWrite,
            other => return Err(Error::UnknownCommand(other)),
        })
    }
}

impl From<Command> for u16 {
    fn from(c: Command) -> u16 {
        c as u16
    }
}

// Little-endian field access. Callers check lengths first; these still never panic and read
// missing bytes as zero, which the length checks make unreachable.
fn le_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Converts a length to the u32 of an `argsz` or `msg_size`, saturating (such a length cannot
/// be sent anyway; [`crate::conn::Connection::send`] rejects it).
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn check_exact(command: Command, body: &[u8], expected: usize) -> Result<()> {
    if body.len() != expected {
        return Err(Error::BadBodyLength {
            command: command.into(),
            len: body.len(),
            expected,
        });
    }
    Ok(())
}

fn check_min(command: Command, body: &[u8], min: usize) -> Result<()> {
    if body.len() < min {
        return Err(Error::ShortBody {
            command: command.into(),
            len: body.len(),
            min,
        });
    }
    Ok(())
}

fn check_argsz(command: Command, argsz: u32, min: usize) -> Result<()> {
    let min = len_u32(min);
    if argsz < min {
        return Err(Error::BadArgsz {
            command: command.into(),
            argsz,
            min,
        });
    }
    Ok(())
}

/// The 16-byte header of every message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Message id, chosen by the sender of a command and echoed in its reply.
    pub msg_id: u16,
    /// Command number (see [`Command`]), echoed in the reply.
    pub command: u16,
    /// Size of the whole message including this header.
    pub msg_size: u32,
    /// Type (bits 0-3), [`FLAGS_NO_REPLY`], [`FLAGS_ERROR`].
    pub flags: u32,
    /// Positive errno of an error reply, else 0.
    pub error: u32,
}

impl Header {
    /// Encoded size.
    pub const SIZE: usize = HEADER_SIZE;

    /// Decodes a header.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Header {
        Header {
            msg_id: le_u16(b, 0),
            command: le_u16(b, 2),
            msg_size: le_u32(b, 4),
            flags: le_u32(b, 8),
            error: le_u32(b, 12),
        }
    }

    /// Decodes a header from the first 16 bytes of `b`.
    ///
    /// # Errors
    /// [`Error::ShortBody`] if `b` is shorter than 16 bytes.
    pub fn from_slice(b: &[u8]) -> Result<Header> {
        let arr: &[u8; HEADER_SIZE] =
            b.get(..HEADER_SIZE)
                .and_then(|s| s.try_into().ok())
                .ok_or(Error::ShortBody {
                    command: 0,
                    len: b.len(),
                    min: HEADER_SIZE,
                })?;
        Ok(Header::parse(arr))
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.msg_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    /// A command header for a body of `body_len` bytes.
    pub fn command(msg_id: u16, command: Command, body_len: usize) -> Header {
        Header {
            msg_id,
            command: command.into(),
            msg_size: len_u32(HEADER_SIZE.saturating_add(body_len)),
            flags: FLAGS_TYPE_COMMAND,
            error: 0,
        }
    }

    /// The header of a successful reply to `self` with a body of `body_len` bytes.
    pub fn reply(&self, body_len: usize) -> Header {
        Header {
            msg_id: self.msg_id,
            command: self.command,
            msg_size: len_u32(HEADER_SIZE.saturating_add(body_len)),
            flags: FLAGS_TYPE_REPLY,
            error: 0,
        }
    }

    /// The header of an error reply to `self` (a whole message: no body follows).
    pub fn error_reply(&self, errno: i32) -> Header {
        Header {
            msg_id: self.msg_id,
            command: self.command,
            msg_size: len_u32(HEADER_SIZE),
            flags: FLAGS_TYPE_REPLY | FLAGS_ERROR,
            error: u32::try_from(errno)
                .ok()
                .filter(|&e| e != 0)
                .unwrap_or(libc::EIO as u32),
        }
    }

    /// The message type (bits 0-3 of `flags`).
    pub fn message_type(&self) -> u32 {
        self.flags & FLAGS_TYPE_MASK
    }

    /// True for a command.
    pub fn is_command(&self) -> bool {
        self.message_type() == FLAGS_TYPE_COMMAND
    }

    /// True for a reply.
    pub fn is_reply(&self) -> bool {
        self.message_type() == FLAGS_TYPE_REPLY
    }

    /// True if the sender wants no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAGS_NO_REPLY != 0
    }

    /// True for an error reply.
    pub fn is_error(&self) -> bool {
        self.flags & FLAGS_ERROR != 0
    }

    /// Body length announced by `msg_size`, or `None` if `msg_size < 16`.
    pub fn body_len(&self) -> Option<usize> {
        usize::try_from(self.msg_size)
            .ok()?
            .checked_sub(HEADER_SIZE)
    }
}

/// `migration` capability (legacy).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrationCapability {
    /// Migration page size.
    pub pgsize: u64,
    /// Maximum dirty bitmap size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bitmap_size: Option<u64>,
}

/// `twin_socket` capability.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TwinSocketCapability {
    /// Whether twin sockets are supported.
    pub supported: bool,
    /// In a reply: index of the twin socket in the reply's fds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd_index: Option<u32>,
}

/// The capabilities object of VERSION (`{"capabilities":{...}}`). Missing keys take the spec
/// defaults; unknown keys are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    /// File descriptors the sender of this object accepts per message.
    pub max_msg_fds: u32,
    /// Largest `count` of REGION/DMA read/write the sender of this object accepts.
    pub max_data_xfer_size: u64,
    /// Whether the sender of this object accepts REGION_WRITE_MULTI.
    pub write_multiple: bool,
    /// OR of supported DMA page sizes.
    pub pgsizes: u64,
    /// Most DMA mappings the sender of this object accepts.
    pub max_dma_maps: u64,
    /// Legacy migration capability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationCapability>,
    /// Twin-socket capability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub twin_socket: Option<TwinSocketCapability>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_data_xfer_size: u64::from(DEFAULT_MAX_DATA_XFER_SIZE),
            write_multiple: false,
            pgsizes: DEFAULT_PGSIZES,
            max_dma_maps: u64::from(DEFAULT_MAX_DMA_MAPS),
            migration: None,
            twin_socket: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CapabilitiesDoc {
    #[serde(default)]
    capabilities: Capabilities,
}

impl Capabilities {
    /// Parses the JSON text of a VERSION message. A missing JSON (empty slice, or just a NUL)
    /// means all defaults; a trailing NUL is optional.
    ///
    /// # Errors
    /// [`Error::CapabilitiesNotText`] for non-UTF-8 text or an embedded NUL,
    /// [`Error::BadCapabilities`] for malformed JSON or wrongly typed values.
    pub fn from_json(raw: &[u8]) -> Result<Capabilities> {
        let text = raw.strip_suffix(&[0]).unwrap_or(raw);
        if text.contains(&0) {
            return Err(Error::CapabilitiesNotText);
        }
        let text = std::str::from_utf8(text).map_err(|_| Error::CapabilitiesNotText)?;
        if text.trim().is_empty() {
            return Ok(Capabilities::default());
        }
        let doc: CapabilitiesDoc = serde_json::from_str(text).map_err(Error::BadCapabilities)?;
        Ok(doc.capabilities)
    }

    /// Encodes `{"capabilities":{...}}` followed by a NUL.
    pub fn to_json(&self) -> Vec<u8> {
        let doc = CapabilitiesDoc {
            capabilities: self.clone(),
        };
        // Serialising plain integers, booleans and options cannot fail; an empty document
        // (all defaults) is the harmless fallback.
        let mut v = serde_json::to_vec(&doc).unwrap_or_default();
        v.push(0);
        v
    }
}

/// VERSION body, both directions: `major u16 @0, minor u16 @2, JSON @4` (NUL-terminated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// Capabilities (defaults if the JSON was absent).
    pub capabilities: Capabilities,
}

/// VERSION request.
pub type VersionRequest = Version;
/// VERSION reply.
pub type VersionReply = Version;

impl Version {
    /// Size of the fixed part.
    pub const FIXED_SIZE: usize = 4;

    /// Parses a VERSION body.
    ///
    /// # Errors
    /// [`Error::ShortBody`] under 4 bytes, or a capabilities error (see
    /// [`Capabilities::from_json`]).
    pub fn parse(body: &[u8]) -> Result<Version> {
        check_min(Command::Version, body, Self::FIXED_SIZE)?;
        Ok(Version {
            major: le_u16(body, 0),
            minor: le_u16(body, 2),
            capabilities: Capabilities::from_json(body.get(Self::FIXED_SIZE..).unwrap_or(&[]))?,
        })
    }

    /// Encodes a VERSION body with NUL-terminated JSON.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(128);
        v.extend_from_slice(&self.major.to_le_bytes());
        v.extend_from_slice(&self.minor.to_le_bytes());
        v.extend_from_slice(&self.capabilities.to_json());
        v
    }
}

/// DMA_MAP request: `argsz u32 @0, flags u32 @4, offset u64 @8, address u64 @16, size u64 @24`;
/// 0 or 1 fd. The reply has no body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMapRequest {
    /// Size of the structure (32).
    pub argsz: u32,
    /// [`VFIO_USER_F_DMA_REGION_READ`] | [`VFIO_USER_F_DMA_REGION_WRITE`].
    pub flags: u32,
    /// Offset of the region in the fd.
    pub offset: u64,
    /// DMA (guest physical / IO virtual) address.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
}

impl DmaMapRequest {
    /// Encoded size.
    pub const SIZE: usize = 32;

    /// A request with `argsz` filled in.
    pub fn new(flags: u32, offset: u64, address: u64, size: u64) -> Self {
        DmaMapRequest {
            argsz: len_u32(Self::SIZE),
            flags,
            offset,
            address,
            size,
        }
    }

    /// Parses a DMA_MAP body (exactly 32 bytes, `argsz >= 32`).
    ///
    /// # Errors
    /// [`Error::BadBodyLength`], [`Error::BadArgsz`].
    pub fn parse(body: &[u8]) -> Result<Self> {
        check_exact(Command::DmaMap, body, Self::SIZE)?;
        let argsz = le_u32(body, 0);
        check_argsz(Command::DmaMap, argsz, Self::SIZE)?;
        Ok(DmaMapRequest {
            argsz,
            flags: le_u32(body, 4),
            offset: le_u64(body, 8),
            address: le_u64(body, 16),
            size: le_u64(body, 24),
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.argsz.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.address.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v
    }
}

/// DMA_UNMAP request and reply (the reply echoes the request):
/// `argsz u32 @0, flags u32 @4, address u64 @8, size u64 @16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmapRequest {
    /// Size of the structure (24); may be larger in a request (reply capacity).
    pub argsz: u32,
    /// [`VFIO_DMA_UNMAP_FLAG_ALL`], [`VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`].
    pub flags: u32,
    /// DMA address of the mapping.
    pub address: u64,
    /// Size of the mapping.
    pub size: u64,
}

/// DMA_UNMAP reply (echo of the request).
pub type DmaUnmapReply = DmaUnmapRequest;

impl DmaUnmapRequest {
    /// Encoded size.
    pub const SIZE: usize = 24;

    /// A request with `argsz` filled in.
    pub fn new(flags: u32, address: u64, size: u64) -> Self {
        DmaUnmapRequest {
            argsz: len_u32(Self::SIZE),
            flags,
            address,
            size,
        }
    }

    /// Parses a DMA_UNMAP body (exactly 24 bytes, `argsz >= 24`).
    ///
    /// # Errors
    /// [`Error::BadBodyLength`], [`Error::BadArgsz`].
    pub fn parse(body: &[u8]) -> Result<Self> {
        check_exact(Command::DmaUnmap, body, Self::SIZE)?;
        let argsz = le_u32(body, 0);
        check_argsz(Command::DmaUnmap, argsz, Self::SIZE)?;
        Ok(DmaUnmapRequest {
            argsz,
            flags: le_u32(body, 4),
            address: le_u64(body, 8),
            size: le_u64(body, 16),
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.argsz.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.address.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v
    }
}

/// DEVICE_GET_INFO, both directions:
/// `argsz u32 @0, flags u32 @4, num_regions u32 @8, num_irqs u32 @12`. A request sets only
/// `argsz` (the rust-vmm client sends 32, QEMU 16); the reply has `argsz` 16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfoMsg {
    /// Structure size.
    pub argsz: u32,
    /// [`VFIO_DEVICE_FLAGS_RESET`] | [`VFIO_DEVICE_FLAGS_PCI`].
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indexes.
    pub num_irqs: u32,
}

/// DEVICE_GET_INFO request.
pub type DeviceInfoRequest = DeviceInfoMsg;
/// DEVICE_GET_INFO reply.
pub type DeviceInfoReply = DeviceInfoMsg;

impl DeviceInfoMsg {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// A request.
    pub fn request() -> Self {
        Self::reply(0, 0, 0)
    }

    /// A reply.
    pub fn reply(flags: u32, num_regions: u32, num_irqs: u32) -> Self {
        DeviceInfoMsg {
            argsz: len_u32(Self::SIZE),
            flags,
            num_regions,
            num_irqs,
        }
    }

    /// Parses the body (exactly 16 bytes, `argsz >= 16`).
    ///
    /// # Errors
    /// [`Error::BadBodyLength`], [`Error::BadArgsz`].
    pub fn parse(body: &[u8]) -> Result<Self> {
        check_exact(Command::DeviceGetInfo, body, Self::SIZE)?;
        let argsz = le_u32(body, 0);
        check_argsz(Command::DeviceGetInfo, argsz, Self::SIZE)?;
        Ok(DeviceInfoMsg {
            argsz,
            flags: le_u32(body, 4),
            num_regions: le_u32(body, 8),
            num_irqs: le_u32(body, 12),
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        for x in [self.argsz, self.flags, self.num_regions, self.num_irqs] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }
}

/// DEVICE_GET_REGION_INFO request: the 32-byte `struct vfio_region_info` with only `argsz`
/// (reply capacity) and `index` meaningful.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfoRequest {
    /// Largest reply body the client accepts (at least 32).
    pub argsz: u32,
    /// Region index.
    pub index: u32,
}

impl RegionInfoRequest {
    /// Encoded size.
    pub const SIZE: usize = 32;

    /// A request accepting a reply of up to `argsz` bytes.
    pub fn new(index: u32, argsz: u32) -> Self {
        RegionInfoRequest { argsz, index }
    }

    /// Parses the body (exactly 32 bytes, `argsz >= 32`).
    ///
    /// # Errors
    /// [`Error::BadBodyLength`], [`Error::BadArgsz`].
    pub fn parse(body: &[u8]) -> Result<Self> {
        check_exact(Command::DeviceGetRegionInfo, body, Self::SIZE)?;
        let argsz = le_u32(body, 0);
        check_argsz(Command::DeviceGetRegionInfo, argsz, Self::SIZE)?;
        Ok(RegionInfoRequest {
            argsz,
            index: le_u32(body, 8),
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; Self::SIZE];
        v[0..4].copy_from_slice(&self.argsz.to_le_bytes());
        v[8..12].copy_from_slice(&self.index.to_le_bytes());
        v
    }
}

/// One area of a SPARSE_MMAP capability, relative to the region start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseMmapArea {
    /// Offset in the region.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A region-info capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionCap {
    /// `VFIO_REGION_INFO_CAP_SPARSE_MMAP` (id 1, version 1).
    SparseMmap(Vec<SparseMmapArea>),
    /// `VFIO_REGION_INFO_CAP_TYPE` (id 2, version 1).
    Type {
        /// Region type.
        kind: u32,
        /// Region subtype.
        subtype: u32,
    },
    /// `VFIO_REGION_INFO_CAP_MSIX_MAPPABLE` (id 3, header only).
    MsixMappable,
    /// A capability this crate does not decode (kept for completeness when parsing).
    Other {
        /// Capability id.
        id: u16,
        /// Capability version.
        version: u16,
        /// Bytes after the 8-byte capability header, up to the next capability.
        data: Vec<u8>,
    },
}

impl RegionCap {
    fn encoded_len(&self) -> usize {
        match self {
            RegionCap::SparseMmap(areas) => 16usize.saturating_add(areas.len().saturating_mul(16)),
            RegionCap::Type { .. } => 16,
            RegionCap::MsixMappable => 8,
            RegionCap::Other { data, .. } => 8usize.saturating_add(data.len()),
        }
    }

    fn encode_into(&self, v: &mut Vec<u8>, next: u32) {
        let (id, version) = match self {
            RegionCap::SparseMmap(_) => (VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1u16),
            RegionCap::Type { .. } => (VFIO_REGION_INFO_CAP_TYPE, 1),
            RegionCap::MsixMappable => (VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1),
            RegionCap::Other { id, version, .. } => (*id, *version),
        };
        v.extend_from_slice(&id.to_le_bytes());
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&next.to_le_bytes());
        match self {
            RegionCap::SparseMmap(areas) => {
                v.extend_from_slice(&len_u32(areas.len()).to_le_bytes());
                v.extend_from_slice(&0u32.to_le_bytes());
                for a in areas {
                    v.extend_from_slice(&a.offset.to_le_bytes());
                    v.extend_from_slice(&a.size.to_le_bytes());
                }
            }
            RegionCap::Type { kind, subtype } => {
                v.extend_from_slice(&kind.to_le_bytes());
                v.extend_from_slice(&subtype.to_le_bytes());
            }
            RegionCap::MsixMappable => {}
            RegionCap::Other { data, .. } => v.extend_from_slice(data),
        }
    }
}

/// DEVICE_GET_REGION_INFO reply: `argsz u32 @0, flags u32 @4, index u32 @8, cap_offset u32 @12,
/// size u64 @16, offset u64 @24`, then the capability chain (offsets relative to byte 0 of the
/// body). The reply carries one fd when `flags` has MMAP and the reply is complete.
///
/// When the request's `argsz` is too small for the capabilities, the reply is the bare 32-byte
/// structure with `argsz` = the size needed, no CAPS flag, `cap_offset` 0 and no capabilities
/// (see [`RegionInfoReply::truncated`]); the client retries with a larger `argsz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfoReply {
    /// Full size of the reply body (32 + capabilities).
    pub argsz: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability, 0 if none.
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// Offset of the region in the mmap fd.
    pub offset: u64,
    /// Capability chain.
    pub caps: Vec<RegionCap>,
}

impl RegionInfoReply {
    /// Size of the fixed part.
    pub const FIXED_SIZE: usize = 32;

    /// A complete reply: `argsz`, `cap_offset` and the CAPS flag are derived from `caps`.
    pub fn new(index: u32, flags: u32, size: u64, offset: u64, caps: Vec<RegionCap>) -> Self {
        let needed = Self::FIXED_SIZE.saturating_add(caps.iter().map(RegionCap::encoded_len).sum());
        let (flags, cap_offset) = if caps.is_empty() {
            (flags & !VFIO_REGION_INFO_FLAG_CAPS, 0)
        } else {
            (
                flags | VFIO_REGION_INFO_FLAG_CAPS,
                len_u32(Self::FIXED_SIZE),
            )
        };
        RegionInfoReply {
            argsz: len_u32(needed),
            flags,
            index,
            cap_offset,
            size,
            offset,
            caps,
        }
    }

    /// Size of the complete reply body.
    pub fn needed(&self) -> usize {
        Self::FIXED_SIZE.saturating_add(self.caps.iter().map(RegionCap::encoded_len).sum())
    }

    /// The bare 32-byte reply for a request whose `argsz` is too small: `argsz` = size needed,
    /// no capabilities, and the CAPS flag kept if the full reply has capabilities, as vfio-pci
    /// does (it sets CAPS whenever capabilities exist, so a client such as vfio-ioctls learns
    /// that it must ask again with the larger `argsz`).
    ///
    /// `cap_offset` is where the capabilities start in the full reply (32), not 0 as in
    /// vfio-pci: QEMU's vfio-user client (11.1) refuses a reply with CAPS whose `cap_offset` is
    /// below 32 before it looks at `argsz`, and a client that checks `argsz` first (as it
    /// must: the capabilities are not in this reply) never reads `cap_offset` here.
    pub fn truncated(&self) -> Self {
        let (caps, cap_offset) = if self.caps.is_empty() {
            (0, 0)
        } else {
            (VFIO_REGION_INFO_FLAG_CAPS, len_u32(Self::FIXED_SIZE))
        };
        RegionInfoReply {
            argsz: len_u32(self.needed()),
            flags: (self.flags & !VFIO_REGION_INFO_FLAG_CAPS) | caps,
            index: self.index,
            cap_offset,
            size: self.size,
            offset: self.offset,
            caps: Vec::new(),
        }
    }

    /// True if this reply is the truncated form of a reply that has capabilities.
    pub fn is_truncated(&self) -> bool {
        self.caps.is_empty() && usize::try_from(self.argsz).is_ok_and(|a| a > Self::FIXED_SIZE)
    }

    /// The sparse-mmap areas, if the reply has that capability.
    pub fn sparse_areas(&self) -> Option<&[SparseMmapArea]> {
        self.caps.iter().find_map(|c| match c {
            RegionCap::SparseMmap(a) => Some(a.as_slice()),
            _ => None,
        })
    }

    /// Parses a reply body. Capabilities are walked from `cap_offset` only if the CAPS flag is
    /// set and the body holds them (a truncated reply parses with `caps` empty).
    ///
    /// # Errors
    /// [`Error::ShortBody`] under 32 bytes; [`Error::InvalidField`] for a capability chain that
    /// points outside the body, does not advance, or holds a truncated capability.
    pub fn parse(body: &[u8]) -> Result<Self> {
        const CMD: Command = Command::DeviceGetRegionInfo;
        check_min(CMD, body, Self::FIXED_SIZE)?;
        let argsz = le_u32(body, 0);
        let flags = le_u32(body, 4);
        let cap_offset = le_u32(body, 12);
        let mut caps = Vec::new();
        if flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && body.len() > Self::FIXED_SIZE {
            let mut next = usize::try_from(cap_offset).unwrap_or(usize::MAX);
            let mut prev = Self::FIXED_SIZE - 1;
            while next != 0 {
                let bad = |v: usize| Error::InvalidField {
                    what: "region capability offset",
                    value: v as u64,
                };
                if next <= prev {
                    return Err(bad(next));
                }
                let hdr = body
                    .get(next..next.checked_add(8).ok_or(bad(next))?)
                    .ok_or(bad(next))?;
                let id = le_u16(hdr, 0);
                let version = le_u16(hdr, 2);
                let following = usize::try_from(le_u32(hdr, 4)).unwrap_or(usize::MAX);
                let end = if following == 0 {
                    body.len()
                } else {
                    following.min(body.len())
                };
                let data = body.get(next + 8..end).ok_or(bad(next))?;
                let cap = match id {
                    VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
                        let nr = usize::try_from(le_u32(data, 0)).unwrap_or(usize::MAX);
                        let need = nr
                            .checked_mul(16)
                            .and_then(|n| n.checked_add(8))
                            .ok_or(bad(next))?;
                        if data.len() < need {
                            return Err(bad(next));
                        }
                        let areas = (0..nr)
                            .map(|i| SparseMmapArea {
                                offset: le_u64(data, 8 + 16 * i),
                                size: le_u64(data, 16 + 16 * i),
                            })
                            .collect();
                        RegionCap::SparseMmap(areas)
                    }
                    VFIO_REGION_INFO_CAP_TYPE => {
                        if data.len() < 8 {
                            return Err(bad(next));
                        }
                        RegionCap::Type {
                            kind: le_u32(data, 0),
                            subtype: le_u32(data, 4),
                        }
                    }
                    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE => RegionCap::MsixMappable,
                    _ => RegionCap::Other {
                        id,
                        version,
                        data: data.to_vec(),
                    },
                };
                caps.push(cap);
                prev = next;
                next = following;
            }
        }
        Ok(RegionInfoReply {
            argsz,
            flags,
            index: le_u32(body, 8),
            cap_offset,
            size: le_u64(body, 16),
            offset: le_u64(body, 24),
            caps,
        })
    }

    /// Encodes the body. Capabilities are laid out back to back from byte 32 in `caps` order;
    /// `cap_offset` is written as stored (use [`RegionInfoReply::new`] to derive it).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.needed());
        v.extend_from_slice(&self.argsz.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.cap_offset.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.offset.to_le_bytes());
        let mut pos = Self::FIXED_SIZE;
        let n = self.caps.len();
        for (i, cap) in self.caps.iter().enumerate() {
            pos = pos.saturating_add(cap.encoded_len());
            let next = if i + 1 == n { 0 } else { len_u32(pos) };
            cap.encode_into(&mut v, next);
        }
        v
    }
}

/// DEVICE_GET_REGION_IO_FDS request: `argsz u32 @0, flags u32 @4 (0), index u32 @8,
/// count u32 @12 (0)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionIoFdsRequest {
    /// Largest reply body accepted.
    pub argsz: u32,
    /// Must be 0.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Must be 0.
    pub count: u32,
}

impl RegionIoFdsRequest {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// A request accepting up to `argsz` bytes of reply.
    pub fn new(index: u32, argsz: u32) -> Self {
        RegionIoFdsRequest {
            argsz,
            flags: 0,
            index,
            count: 0,
        }
    }

    /// Parses the body (exactly 16 bytes, `argsz >= 16`).
    ///
    /// # Errors
    /// [`Error::BadBodyLength`], [`Error::BadArgsz`].
    pub fn parse(body: &[u8]) -> Result<Self> {
        check_exact(Command::DeviceGetRegionIoFds, body, Self::SIZE)?;
        let argsz = le_u32(body, 0);
        check_argsz(Command::DeviceGetRegionIoFds, argsz, Self::SIZE)?;
        Ok(RegionIoFdsRequest {
            argsz,
            flags: le_u32(body, 4),
            index: le_u32(body, 8),
            count: le_u32(body, 12),
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        for x in [self.argsz, self.flags, self.index, self.count] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }
}

/// One 40-byte REGION_IO_FDS entry (spec layout): `offset u64 @0, size u64 @8, fd_index u32 @16,
/// type u32 @20, flags u32 @24, pad @28, datamatch u64 @32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoFdEntry {
    /// Offset in the region.
    pub offset: u64,
    /// Access size.
    pub size: u64,
    /// Index of the fd in the reply's SCM_RIGHTS.
    pub fd_index: u32,
    /// [`VFIO_USER_IO_FD_TYPE_IOEVENTFD`] or [`VFIO_USER_IO_FD_TYPE_IOREGIONFD`].
    pub kind: u32,
    /// [`KVM_IOEVENTFD_FLAG_DATAMATCH`], [`KVM_IOEVENTFD_FLAG_PIO`].
    pub flags: u32,
    /// Datamatch value (ioeventfd) or user data (ioregionfd).
    pub datamatch: u64,
}

impl IoFdEntry {
    /// Encoded size.
    pub const SIZE: usize = 40;
}

/// DEVICE_GET_REGION_IO_FDS reply: the 16-byte head (`argsz` = full size needed, `count` =
/// number of entries) then `count` entries when `argsz` of the request was large enough. The
/// reply carries the entries' fds. A truncated reply has the head only and no fds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionIoFdsReply {
    /// Full size needed (16 + 40 × count).
    pub argsz: u32,
    /// 0.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Number of entries the region has.
    pub count: u32,
    /// Entries (empty in a truncated reply).
    pub entries: Vec<IoFdEntry>,
}

impl RegionIoFdsReply {
    /// Size of the head.
    pub const FIXED_SIZE: usize = 16;

    /// A complete reply for `entries`.
    pub fn new(index: u32, entries: Vec<IoFdEntry>) -> Self {
        let needed = Self::FIXED_SIZE.saturating_add(entries.len().saturating_mul(IoFdEntry::SIZE));
        RegionIoFdsReply {
            argsz: len_u32(needed),
            flags: 0,
            index,
            count: len_u32(entries.len()),
            entries,
        }
    }

    /// The head-only reply for a request whose `argsz` is too small.
    pub fn truncated(&self) -> Self {
        RegionIoFdsReply {
            entries: Vec::new(),
            ..self.clone()
        }
    }

    /// Parses a reply body. Entries are read when the body holds them; the entry stride is
    /// derived from the body length (libvfio-user uses 48-byte entries) and must be at least 40.
    ///
    /// # Errors
    /// [`Error::ShortBody`], or [`Error::InvalidField`] if the entries do not divide evenly.
    pub fn parse(body: &[u8]) -> Result<Self> {
        check_min(Command::DeviceGetRegionIoFds, body, Self::FIXED_SIZE)?;
        let count = le_u32(body, 12);
        let rest = body.len() - Self::FIXED_SIZE;
        let mut entries = Vec::new();
        if rest > 0 {
            let n = usize::try_from(count).unwrap_or(usize::MAX);
            let bad = Error::InvalidField {
                what: "io fds entry area",
                value: rest as u64,
            };
            if n == 0 || rest % n != 0 || rest / n < IoFdEntry::SIZE {
                return Err(bad);
            }
            let stride = rest / n;
            for e in body
                .get(Self::FIXED_SIZE..)
                .unwrap_or(&[])
                .chunks_exact(stride)
            {
                entries.push(IoFdEntry {
                    offset: le_u64(e, 0),
                    size: le_u64(e, 8),
                    fd_index: le_u32(e, 16),
                    kind: le_u32(e, 20),
                    flags: le_u32(e, 24),
                    datamatch: le_u64(e, 32),
                });
            }
        }
        Ok(RegionIoFdsReply {
            argsz: le_u32(body, 0),
            flags: le_u32(body, 4),
            index: le_u32(body, 8),
            count,
            entries,
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(
            Self::FIXED_SIZE.saturating_add(self.entries.len().saturating_mul(IoFdEntry::SIZE)),
        );
        for x in [self.argsz, self.flags, self.index, self.count] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        for e in &self.entries {
            v.extend_from_slice(&e.offset.to_le_bytes());
            v.extend_from_slice(&e.size.to_le_bytes());
            v.extend_from_slice(&e.fd_index.to_le_bytes());
            v.extend_from_slice(&e.kind.to_le_bytes());
            v.extend_from_slice(&e.flags.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes());
            v.extend_from_slice(&e.datamatch.to_le_bytes());
        }
        v
    }
}

/// DEVICE_GET_IRQ_INFO, both directions: `argsz u32 @0, flags u32 @4, index u32 @8,
/// count u32 @12`. A request sets `argsz` and `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfoMsg {
    /// Structure size (16).
    pub argsz: u32,
    /// `VFIO_IRQ_INFO_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// Number of sub-indexes.
    pub count: u32,
}

/// DEVICE_GET_IRQ_INFO request.
pub type IrqInfoRequest = IrqInfoMsg;
/// DEVICE_GET_IRQ_INFO reply.
pub type IrqInfoReply = IrqInfoMsg;

impl IrqInfoMsg {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// A request for `index`.
    pub fn request(index: u32) -> Self {
        Self::reply(index, 0, 0)
    }

    /// A reply.
    pub fn reply(index: u32, flags: u32, count: u32) -> Self {
        IrqInfoMsg {
            argsz: len_u32(Self::SIZE),
            flags,
            index,
            count,
        }
    }

    /// Parses the body (exactly 16 bytes, `argsz >= 16`).
    ///
    /// # Errors
    /// [`Error::BadBodyLength`], [`Error::BadArgsz`].
    pub fn parse(body: &[u8]) -> Result<Self> {
        check_exact(Command::DeviceGetIrqInfo, body, Self::SIZE)?;
        let argsz = le_u32(body, 0);
        check_argsz(Command::DeviceGetIrqInfo, argsz, Self::SIZE)?;
        Ok(IrqInfoMsg {
            argsz,
            flags: le_u32(body, 4),
            index: le_u32(body, 8),
            count: le_u32(body, 12),
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        for x in [self.argsz, self.flags, self.index, self.count] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }
}

/// DEVICE_SET_IRQS request: `argsz u32 @0, flags u32 @4, index u32 @8, start u32 @12,
/// count u32 @16, data @20` (`count` bytes for DATA_BOOL, nothing otherwise; eventfds travel in
/// SCM_RIGHTS). The reply has no body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetIrqsRequest {
    /// 20 + data length.
    pub argsz: u32,
    /// `VFIO_IRQ_SET_DATA_*` | `VFIO_IRQ_SET_ACTION_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First sub-index.
    pub start: u32,
    /// Number of sub-indexes.
    pub count: u32,
    /// Bytes after the fixed part (the DATA_BOOL array).
    pub data: Vec<u8>,
}

impl SetIrqsRequest {
    /// Size of the fixed part.
    pub const SIZE: usize = 20;

    /// A request without data (DATA_NONE, or DATA_EVENTFD with the fds sent alongside).
    pub fn new(index: u32, flags: u32, start: u32, count: u32) -> Self {
        SetIrqsRequest {
            argsz: len_u32(Self::SIZE),
            flags,
            index,
            start,
            count,
            data: Vec::new(),
        }
    }

    /// A DATA_BOOL request: `count` = `bools.len()`.
    pub fn with_bools(index: u32, action: u32, start: u32, bools: &[bool]) -> Self {
        SetIrqsRequest {
            argsz: len_u32(Self::SIZE.saturating_add(bools.len())),
            flags: action | VFIO_IRQ_SET_DATA_BOOL,
            index,
            start,
            count: len_u32(bools.len()),
            data: bools.iter().map(|&b| u8::from(b)).collect(),
        }
    }

    /// Parses the body (at least 20 bytes, `argsz >= 20`).
    ///
    /// # Errors
    /// [`Error::ShortBody`], [`Error::BadArgsz`].
    pub fn parse(body: &[u8]) -> Result<Self> {
        check_min(Command::DeviceSetIrqs, body, Self::SIZE)?;
        let argsz = le_u32(body, 0);
        check_argsz(Command::DeviceSetIrqs, argsz, Self::SIZE)?;
        Ok(SetIrqsRequest {
            argsz,
            flags: le_u32(body, 4),
            index: le_u32(body, 8),
            start: le_u32(body, 12),
            count: le_u32(body, 16),
            data: body.get(Self::SIZE..).unwrap_or(&[]).to_vec(),
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE.saturating_add(self.data.len()));
        for x in [self.argsz, self.flags, self.index, self.start, self.count] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(&self.data);
        v
    }
}

/// The 16-byte head of REGION_READ/REGION_WRITE requests and replies:
/// `offset u64 @0, region u32 @8, count u32 @12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Byte count.
    pub count: u32,
}

/// REGION_READ request.
pub type RegionReadRequest = RegionAccess;
/// REGION_WRITE reply (echo of the request head, no data).
pub type RegionWriteReply = RegionAccess;

impl RegionAccess {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Parses a body of exactly 16 bytes (REGION_READ request, REGION_WRITE reply).
    ///
    /// # Errors
    /// [`Error::BadBodyLength`].
    pub fn parse(body: &[u8]) -> Result<Self> {
        check_exact(Command::RegionRead, body, Self::SIZE)?;
        Ok(Self::parse_head(body))
    }

    fn parse_head(body: &[u8]) -> Self {
        RegionAccess {
            offset: le_u64(body, 0),
            region: le_u32(body, 8),
            count: le_u32(body, 12),
        }
    }

    /// Encodes the 16-byte head.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        self.encode_into(&mut v);
        v
    }

    fn encode_into(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.region.to_le_bytes());
        v.extend_from_slice(&self.count.to_le_bytes());
    }
}

/// REGION_READ reply and REGION_WRITE request: the head then `count` bytes of data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionData {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// The data (`count` = its length).
    pub data: Vec<u8>,
}

/// REGION_READ reply.
pub type RegionReadReply = RegionData;
/// REGION_WRITE request.
pub type RegionWriteRequest = RegionData;

impl RegionData {
    /// The head of this message.
    pub fn head(&self) -> RegionAccess {
        RegionAccess {
            offset: self.offset,
            region: self.region,
            count: len_u32(self.data.len()),
        }
    }

    /// Parses the body; `count` must equal the data length.
    ///
    /// # Errors
    /// [`Error::ShortBody`] under 16 bytes, [`Error::BadBodyLength`] if `count` disagrees with
    /// the data that follows.
    pub fn parse(body: &[u8]) -> Result<Self> {
        check_min(Command::RegionWrite, body, RegionAccess::SIZE)?;
        let head = RegionAccess::parse_head(body);
        let data = body.get(RegionAccess::SIZE..).unwrap_or(&[]);
        let count = usize::try_from(head.count).unwrap_or(usize::MAX);
        if data.len() != count {
            return Err(Error::BadBodyLength {
                command: Command::RegionWrite.into(),
                len: body.len(),
                expected: RegionAccess::SIZE.saturating_add(count),
            });
        }
        Ok(RegionData {
            offset: head.offset,
            region: head.region,
            data: data.to_vec(),
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(RegionAccess::SIZE.saturating_add(self.data.len()));
        self.head().encode_into(&mut v);
        v.extend_from_slice(&self.data);
        v
    }
}

/// One REGION_WRITE_MULTI entry (24 bytes): `offset u64 @0, region u32 @8, count u32 @12,
/// data [u8; 8] @16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteMultiEntry {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes of `data` used (at most 8).
    pub count: u32,
    /// Data, padded.
    pub data: [u8; WRITE_MULTI_DATA_SIZE],
}

impl WriteMultiEntry {
    /// Encoded size.
    pub const SIZE: usize = 24;

    /// An entry writing `bytes` (at most 8; longer input is cut to 8 bytes).
    pub fn new(region: u32, offset: u64, bytes: &[u8]) -> Self {
        let n = bytes.len().min(WRITE_MULTI_DATA_SIZE);
        let mut data = [0u8; WRITE_MULTI_DATA_SIZE];
        data[..n].copy_from_slice(&bytes[..n]);
        WriteMultiEntry {
            offset,
            region,
            count: len_u32(n),
            data,
        }
    }

    /// The used data bytes, or `None` if `count > 8`.
    pub fn bytes(&self) -> Option<&[u8]> {
        self.data.get(..usize::try_from(self.count).ok()?)
    }
}

/// REGION_WRITE_MULTI request: `wr_cnt u64 @0` then `wr_cnt` entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteMultiRequest {
    /// The writes, in order.
    pub entries: Vec<WriteMultiEntry>,
}

impl WriteMultiRequest {
    /// Parses the body: `wr_cnt <= 200` and exactly `wr_cnt` entries.
    ///
    /// # Errors
    /// [`Error::ShortBody`], [`Error::InvalidField`] for `wr_cnt` > 200,
    /// [`Error::BadBodyLength`].
    pub fn parse(body: &[u8]) -> Result<Self> {
        const CMD: Command = Command::RegionWriteMulti;
        check_min(CMD, body, 8)?;
        let wr_cnt = le_u64(body, 0);
        let n = usize::try_from(wr_cnt)
            .ok()
            .filter(|&n| n <= WRITE_MULTI_MAX_ENTRIES)
            .ok_or(Error::InvalidField {
                what: "wr_cnt",
                value: wr_cnt,
            })?;
        check_exact(CMD, body, 8 + n * WriteMultiEntry::SIZE)?;
        let entries = body
            .get(8..)
            .unwrap_or(&[])
            .chunks_exact(WriteMultiEntry::SIZE)
            .map(|e| {
                let mut data = [0u8; WRITE_MULTI_DATA_SIZE];
                if let Some(d) = e.get(16..24) {
                    data.copy_from_slice(d);
                }
                WriteMultiEntry {
                    offset: le_u64(e, 0),
                    region: le_u32(e, 8),
                    count: le_u32(e, 12),
                    data,
                }
            })
            .collect();
        Ok(WriteMultiRequest { entries })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + self.entries.len() * WriteMultiEntry::SIZE);
        v.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            v.extend_from_slice(&e.offset.to_le_bytes());
            v.extend_from_slice(&e.region.to_le_bytes());
            v.extend_from_slice(&e.count.to_le_bytes());
            v.extend_from_slice(&e.data);
        }
        v
    }
}

/// REGION_WRITE_MULTI reply: `wr_cnt u64 @0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteMultiReply {
    /// Number of writes done.
    pub wr_cnt: u64,
}

impl WriteMultiReply {
    /// Encoded size.
    pub const SIZE: usize = 8;

    /// Parses the body (exactly 8 bytes).
    ///
    /// # Errors
    /// [`Error::BadBodyLength`].
    pub fn parse(body: &[u8]) -> Result<Self> {
        check_exact(Command::RegionWriteMulti, body, Self::SIZE)?;
        Ok(WriteMultiReply {
            wr_cnt: le_u64(body, 0),
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        self.wr_cnt.to_le_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        let h = Header {
            msg_id: 0x1234,
            command: 8,
            msg_size: 0x24,
            flags: FLAGS_NO_REPLY,
            error: 0,
        };
        let b = h.encode();
        assert_eq!(
            b,
            [0x34, 0x12, 8, 0, 0x24, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(Header::parse(&b), h);
        assert!(h.no_reply());
        assert!(h.is_command());
        assert_eq!(h.body_len(), Some(20));
        let e = h.error_reply(libc::EINVAL);
        assert_eq!(e.flags, FLAGS_TYPE_REPLY | FLAGS_ERROR);
        assert_eq!(e.error, libc::EINVAL as u32);
        assert_eq!(e.msg_size, 16);
        assert_eq!(h.error_reply(0).error, libc::EIO as u32);
        assert_eq!(Header { msg_size: 3, ..h }.body_len(), None);
        assert!(Header::from_slice(&b[..15]).is_err());
    }

    #[test]
    fn command_numbers() {
        for n in 1u16..=18 {
            let c = Command::try_from(n).unwrap();
            assert_eq!(u16::from(c), n);
        }
        assert!(matches!(
            Command::try_from(0),
            Err(Error::UnknownCommand(0))
        ));
        assert!(matches!(
            Command::try_from(19),
            Err(Error::UnknownCommand(19))
        ));
    }

    #[test]
    fn version_json_variants() {
        let mut body = vec![0, 0, 1, 0];
        let v = Version::parse(&body).unwrap();
        assert_eq!((v.major, v.minor), (0, 1));
        assert_eq!(v.capabilities, Capabilities::default());

        body.extend_from_slice(br#"{"capabilities":{"max_msg_fds":16,"write_multiple":true,"migration":{"pgsize":4096,"max_bitmap_size":268435456},"unknown":[1]}}"#);
        let with_nul = [body.clone(), vec![0]].concat();
        for b in [&body, &with_nul] {
            let v = Version::parse(b).unwrap();
            assert_eq!(v.capabilities.max_msg_fds, 16);
            assert!(v.capabilities.write_multiple);
            assert_eq!(v.capabilities.max_data_xfer_size, 1 << 20);
            assert_eq!(
                v.capabilities.migration,
                Some(MigrationCapability {
                    pgsize: 4096,
                    max_bitmap_size: Some(268435456)
                })
            );
        }
        assert!(matches!(
            Version::parse(&[0, 0, 0, 0, b'{', 0]),
            Err(Error::BadCapabilities(_))
        ));
        assert!(matches!(
            Version::parse(&[0, 0, 0, 0, b'{', 0, b'}', 0]),
            Err(Error::CapabilitiesNotText)
        ));
        assert!(matches!(
            Version::parse(br#"    {"capabilities":{"max_msg_fds":"x"}}"#),
            Err(Error::BadCapabilities(_))
        ));
        assert!(matches!(
            Version::parse(&[0, 0, 0]),
            Err(Error::ShortBody { .. })
        ));
        // Only a NUL: defaults.
        assert_eq!(
            Version::parse(&[0, 0, 0, 0, 0]).unwrap().capabilities,
            Capabilities::default()
        );
    }

    #[test]
    fn version_encode_is_nul_terminated_json() {
        let v = Version {
            major: 0,
            minor: 0,
            capabilities: Capabilities {
                max_msg_fds: 16,
                max_data_xfer_size: 1 << 20,
                write_multiple: true,
                pgsizes: 4096,
                max_dma_maps: 1024,
                migration: None,
                twin_socket: None,
            },
        };
        let b = v.encode();
        assert_eq!(&b[..4], &[0, 0, 0, 0]);
        assert_eq!(b.last(), Some(&0));
        assert_eq!(
            std::str::from_utf8(&b[4..b.len() - 1]).unwrap(),
            r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"write_multiple":true,"pgsizes":4096,"max_dma_maps":1024}}"#
        );
        assert_eq!(Version::parse(&b).unwrap(), v);
    }

    #[test]
    fn fixed_structs_round_trip_and_reject_bad_sizes() {
        let m = DmaMapRequest::new(3, 0x1000, 0x8000_0000, 0x20_0000);
        assert_eq!(DmaMapRequest::parse(&m.encode()).unwrap(), m);
        assert!(matches!(
            DmaMapRequest::parse(&m.encode()[..31]),
            Err(Error::BadBodyLength { .. })
        ));
        let mut bad = m.encode();
        bad[0] = 31;
        assert!(matches!(
            DmaMapRequest::parse(&bad),
            Err(Error::BadArgsz { argsz: 31, .. })
        ));

        let u = DmaUnmapRequest::new(0, 0x8000_0000, 0x1000);
        assert_eq!(DmaUnmapRequest::parse(&u.encode()).unwrap(), u);

        let i = DeviceInfoMsg::reply(3, 9, 5);
        assert_eq!(DeviceInfoMsg::parse(&i.encode()).unwrap(), i);
        // The rust-vmm client sends argsz 32 with a 16-byte body: accepted.
        let mut big = DeviceInfoMsg::request().encode();
        big[0] = 32;
        assert_eq!(DeviceInfoMsg::parse(&big).unwrap().argsz, 32);

        let q = IrqInfoMsg::reply(2, 9, 16);
        assert_eq!(IrqInfoMsg::parse(&q.encode()).unwrap(), q);

        let r = RegionInfoRequest::new(7, 32);
        let rb = r.encode();
        assert_eq!(rb.len(), 32);
        assert_eq!(RegionInfoRequest::parse(&rb).unwrap(), r);
        assert!(matches!(
            RegionInfoRequest::parse(&RegionInfoRequest::new(7, 16).encode()),
            Err(Error::BadArgsz { .. })
        ));

        let f = RegionIoFdsRequest::new(0, 16);
        assert_eq!(RegionIoFdsRequest::parse(&f.encode()).unwrap(), f);

        let a = RegionAccess {
            offset: 0x40,
            region: 7,
            count: 4,
        };
        assert_eq!(RegionAccess::parse(&a.encode()).unwrap(), a);
    }

    #[test]
    fn region_info_reply_with_sparse_mmap() {
        let caps = vec![RegionCap::SparseMmap(vec![
            SparseMmapArea {
                offset: 0,
                size: 0x1000,
            },
            SparseMmapArea {
                offset: 0x3000,
                size: 0x1000,
            },
        ])];
        let r = RegionInfoReply::new(
            4,
            VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP,
            0x4000,
            0,
            caps,
        );
        assert_eq!(r.argsz, 32 + 16 + 32);
        assert_eq!(r.cap_offset, 32);
        assert_ne!(r.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
        let b = r.encode();
        assert_eq!(b.len(), 80);
        // Cap header: id 1, version 1, next 0, nr_areas 2.
        assert_eq!(&b[32..44], &[1, 0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0]);
        let p = RegionInfoReply::parse(&b).unwrap();
        assert_eq!(p, r);
        assert_eq!(p.sparse_areas().unwrap().len(), 2);

        let t = r.truncated();
        let tb = t.encode();
        assert_eq!(tb.len(), 32);
        let tp = RegionInfoReply::parse(&tb).unwrap();
        assert_eq!(tp.argsz, 80);
        assert_ne!(tp.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
        assert_eq!(tp.cap_offset, 32);
        assert!(tp.is_truncated());
        assert!(!p.is_truncated());
    }

    #[test]
    fn region_info_reply_multiple_caps_chain() {
        let r = RegionInfoReply::new(
            0,
            0,
            0x1000,
            0,
            vec![
                RegionCap::Type {
                    kind: 1 << 31 | 0x6972,
                    subtype: 1,
                },
                RegionCap::MsixMappable,
                RegionCap::SparseMmap(vec![SparseMmapArea {
                    offset: 0,
                    size: 0x1000,
                }]),
            ],
        );
        let b = r.encode();
        assert_eq!(b.len(), r.argsz as usize);
        assert_eq!(RegionInfoReply::parse(&b).unwrap(), r);
    }

    #[test]
    fn region_info_reply_rejects_bad_chains() {
        let r = RegionInfoReply::new(
            0,
            0,
            0x1000,
            0,
            vec![RegionCap::SparseMmap(vec![SparseMmapArea {
                offset: 0,
                size: 0x1000,
            }])],
        );
        let good = r.encode();
        // cap_offset inside the fixed part.
        let mut b = good.clone();
        b[12] = 8;
        assert!(RegionInfoReply::parse(&b).is_err());
        // cap_offset past the end.
        let mut b = good.clone();
        b[12] = 200;
        assert!(RegionInfoReply::parse(&b).is_err());
        // next pointing back at itself.
        let mut b = good.clone();
        b[36] = 32;
        assert!(RegionInfoReply::parse(&b).is_err());
        // nr_areas larger than the data.
        let mut b = good.clone();
        b[40] = 5;
        assert!(RegionInfoReply::parse(&b).is_err());
        // A huge nr_areas must not overflow or allocate.
        let mut b = good;
        b[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(RegionInfoReply::parse(&b).is_err());
    }

    #[test]
    fn io_fds_reply_round_trip_and_stride() {
        let e = IoFdEntry {
            offset: 0x40,
            size: 4,
            fd_index: 0,
            kind: VFIO_USER_IO_FD_TYPE_IOEVENTFD,
            flags: KVM_IOEVENTFD_FLAG_DATAMATCH,
            datamatch: 7,
        };
        let r = RegionIoFdsReply::new(0, vec![e, IoFdEntry { fd_index: 1, ..e }]);
        assert_eq!(r.argsz, 16 + 80);
        let b = r.encode();
        assert_eq!(b.len(), 96);
        assert_eq!(RegionIoFdsReply::parse(&b).unwrap(), r);
        let t = r.truncated().encode();
        assert_eq!(t.len(), 16);
        let tp = RegionIoFdsReply::parse(&t).unwrap();
        assert_eq!((tp.argsz, tp.count, tp.entries.len()), (96, 2, 0));

        // libvfio-user's 48-byte entries.
        let mut wide = b[..16].to_vec();
        for chunk in b[16..].chunks(40) {
            wide.extend_from_slice(chunk);
            wide.extend_from_slice(&[0xee; 8]);
        }
        assert_eq!(RegionIoFdsReply::parse(&wide).unwrap().entries, r.entries);
        assert!(RegionIoFdsReply::parse(&b[..50]).is_err());
    }

    #[test]
    fn set_irqs_round_trip() {
        let r = SetIrqsRequest::new(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            3,
            2,
        );
        let b = r.encode();
        assert_eq!(b.len(), 20);
        assert_eq!(SetIrqsRequest::parse(&b).unwrap(), r);
        let bools = SetIrqsRequest::with_bools(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_MASK,
            0,
            &[true, false, true],
        );
        assert_eq!(bools.argsz, 23);
        assert_eq!(bools.count, 3);
        assert_eq!(bools.data, vec![1, 0, 1]);
        assert_eq!(SetIrqsRequest::parse(&bools.encode()).unwrap(), bools);
        assert!(SetIrqsRequest::parse(&b[..19]).is_err());
    }

    #[test]
    fn region_data_checks_count() {
        let w = RegionData {
            offset: 4,
            region: 0,
            data: vec![1, 2, 3, 4],
        };
        let b = w.encode();
        assert_eq!(RegionData::parse(&b).unwrap(), w);
        assert!(matches!(
            RegionData::parse(&b[..19]),
            Err(Error::BadBodyLength { .. })
        ));
        let mut lying = b.clone();
        lying[12] = 0xff;
        assert!(RegionData::parse(&lying).is_err());
    }

    #[test]
    fn write_multi_round_trip_and_limits() {
        let req = WriteMultiRequest {
            entries: vec![
                WriteMultiEntry::new(0, 0x10, &[1, 0, 0, 0]),
                WriteMultiEntry::new(2, 0x800, &[9; 8]),
            ],
        };
        let b = req.encode();
        assert_eq!(b.len(), 8 + 48);
        let p = WriteMultiRequest::parse(&b).unwrap();
        assert_eq!(p, req);
        assert_eq!(p.entries[0].bytes(), Some(&[1u8, 0, 0, 0][..]));
        assert!(WriteMultiRequest::parse(&b[..30]).is_err());
        let mut too_many = 201u64.to_le_bytes().to_vec();
        too_many.resize(8 + 201 * 24, 0);
        assert!(matches!(
            WriteMultiRequest::parse(&too_many),
            Err(Error::InvalidField { what: "wr_cnt", .. })
        ));
        let e = WriteMultiEntry {
            count: 9,
            ..WriteMultiEntry::new(0, 0, &[])
        };
        assert_eq!(e.bytes(), None);
        let reply = WriteMultiReply { wr_cnt: 2 };
        assert_eq!(WriteMultiReply::parse(&reply.encode()).unwrap(), reply);
    }
}
