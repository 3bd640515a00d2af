// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Error type of the test VMM.

use std::io;
use std::time::Duration;

/// Errors of the test VMM and the guest agent driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM operation {op} failed")]
    Kvm {
        /// The operation (ioctl wrapper) that failed.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest RAM file could not be created or sized.
    #[error("cannot create the guest memory file")]
    Memfd(#[source] io::Error),
    /// A host mapping could not be created.
    #[error("cannot map {len:#x} bytes of memory")]
    Mmap {
        /// Requested length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A guest access falls outside guest RAM.
    #[error("guest range {gpa:#x}+{len:#x} is outside guest RAM")]
    OutOfRange {
        /// Start of the access.
        gpa: u64,
        /// Length of the access.
        len: u64,
    },
    /// A guest access is not naturally aligned.
    #[error("guest address {gpa:#x} is not aligned to {align} bytes")]
    Unaligned {
        /// The address.
        gpa: u64,
        /// The required alignment.
        align: u64,
    },
    /// An argument is out of range or inconsistent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An MMIO range overlaps one that is already registered.
    #[error("MMIO range {start:#x}+{len:#x} overlaps a registered range")]
    MmioOverlap {
        /// Start of the rejected range.
        start: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The guest agent binary does not match this crate's memory map.
    #[error("the guest agent image is invalid: {0}")]
    BadAgent(&'static str),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread could not be spawned.
    #[error("cannot spawn the vCPU thread")]
    SpawnVcpu(#[source] io::Error),
    /// The vCPU was already started, or was never started.
    #[error("the vCPU is in the wrong state for this operation ({0})")]
    VcpuState(String),
    /// The vCPU thread has ended.
    #[error("the vCPU is no longer running: {0}")]
    VcpuStopped(String),
    /// The guest took an exception (vectors 0..31) and stopped.
    #[error("guest exception {vector} (error code {error_code:#x}) at rip {rip:#x}, cr2 {cr2:#x}")]
    GuestFault {
        /// Exception vector.
        vector: u64,
        /// Error code (0 when the CPU pushes none).
        error_code: u64,
        /// Faulting instruction.
        rip: u64,
        /// CR2 (page-fault address).
        cr2: u64,
    },
    /// A wait did not finish in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The time limit.
        timeout: Duration,
    },
    /// A file, socket or eventfd operation failed.
    #[error("I/O operation failed")]
    Io(#[source] io::Error),
    /// The irqbridge device could not be created.
    #[error("cannot create the irqbridge device")]
    Device(#[source] irqbridge_vfio_user::pci::DeviceError),
    /// The vfio-user server failed.
    #[error("the vfio-user device server failed")]
    Server(#[source] irqbridge_vfio_user::error::Error),
    /// The VMM plugin (vfio-user client, KVM wiring) failed.
    #[error("the irqbridge VMM plugin failed: {op}")]
    Plugin {
        /// What the plugin was doing.
        op: &'static str,
        /// The plugin's error.
        #[source]
        source: irqbridge_kvm::Error,
    },
    /// An end-to-end check saw something other than what it expected.
    #[error("check failed: {0}")]
    Check(String),
    /// `/dev/kvm` cannot be used here.
    #[error("/dev/kvm is not available: {0}")]
    KvmUnavailable(String),
    /// The agent rejected a command.
    #[error("the guest agent rejected command {cmd} with status {status}")]
    Command {
        /// Command code.
        cmd: u64,
        /// Agent status.
        status: u64,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Also takes the client's errors (`irqbridge_kvm::client::Error`).
    pub(crate) fn plugin<E: Into<irqbridge_kvm::Error>>(
        op: &'static str,
    ) -> impl FnOnce(E) -> Error {
        move |source| Error::Plugin {
            op,
            source: source.into(),
        }
    }

    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}
