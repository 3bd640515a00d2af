// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test VMM for irqbridge: bare-metal 64-bit guests on `/dev/kvm`, driven from the host.
//!
//! - [`TestVm`] is a one-vCPU KVM VM with the full in-kernel irqchip, guest RAM from a memfd,
//!   long mode set up by the VMM, MMIO dispatch to [`MmioHandler`]s and extra memory slots.
//! - [`Guest`] boots the generic guest agent (`guests/agent.s`) in a [`TestVm`] and drives it
//!   through a mailbox in guest memory: the host writes a command, bumps a sequence number and
//!   injects the doorbell vector; the agent runs the command and writes the result. Interrupt
//!   handlers count every vector in guest memory and run a per-vector [`Action`] (EOI, an MMIO
//!   store from the Nth interrupt on, Xen-style event-channel collection).
//! - [`routing`] builds KVM GSI routing tables that keep the legacy IRQCHIP routes.
//! - [`rig::Rig`] wires the irqbridge device server ([`server::DeviceServer`], in a thread)
//!   into a [`TestVm`] through the irqbridge-kvm plugin; [`scenarios`] are the exact-count
//!   end-to-end checks on it, [`demo::run`] runs them all as a table and [`bench::run`] measures
//!   the interrupt paths against same-run baselines.
//! - [`vhost_rig::VhostRig`] attaches the irqbridge vhost-user backend (in process) to several
//!   [`TestVm`]s through the plugin's vhost-user frontend path; their guests drive the
//!   virtqueues with plain stores and ioeventfd notifies.
//!
//! `integration/README.md` documents the guest memory map and the mailbox ABI ([`layout`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use irqbridge_integration::{Guest, GsiRoutes, MsiMessage};
//! use vmm_sys_util::eventfd::EventFd;
//!
//! let guest = Guest::new()?;
//! let mut routes = GsiRoutes::with_irqchip();
//! routes.add_msi(24, MsiMessage::fixed(0x40))?;
//! routes.apply(guest.vm().vm_fd())?;
//! let irq = EventFd::new(0).unwrap();
//! guest.vm().vm_fd().register_irqfd(&irq, 24).unwrap();
//! irq.write(1).unwrap();
//! assert_eq!(guest.wait_count(0x40, 1, Duration::from_secs(5))?, 1);
//! # Ok::<(), irqbridge_integration::Error>(())
//! ```

#![deny(missing_docs)]

pub mod agent;
pub mod bench;
pub mod bench_socket;
pub mod demo;
mod error;
pub mod layout;
mod memory;
pub mod platform;
pub mod rig;
pub mod routing;
pub mod scenarios;
pub mod server;
pub mod stats;
pub mod vhost_rig;
mod vm;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

pub use error::{Error, Result};
pub use memory::{GuestMemory, MmapRegion};
pub use routing::{GsiRoutes, MsiMessage};
pub use vm::{ExitStats, MmioHandler, RAM_SLOT, STOP_TIMEOUT, TestVm, VcpuStatus, VmOptions};

use agent::{AGENT_IMAGE, AgentInfo};
use layout::{
    ACTION_SIZE, ACTIONS_GPA, AGENT_GPA, AGENT_READY_MAGIC, COUNTS_GPA, DOORBELL_VECTOR,
    FIRST_INTERRUPT_VECTOR, LAPIC_SVR_ENABLED, MAILBOX_GPA, PORT_COUNT_ENTRIES, PORT_COUNTS_GPA,
    SPURIOUS_VECTOR, STACK_TOP, action, command, evtchn, mailbox,
};

/// Default time limit of agent commands and of the boot handshake.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why KVM tests cannot run here, or `None` if `/dev/kvm` can be opened.
pub fn kvm_unavailable_reason() -> Option<String> {
    /// `KVM_API_VERSION` of every KVM since Linux 2.6.22.
    const KVM_API_VERSION: i32 = 12;
    match kvm_ioctls::Kvm::new() {
        Ok(kvm) if kvm.get_api_version() == KVM_API_VERSION => None,
        Ok(kvm) => Some(format!(
            "/dev/kvm reports API version {}",
            kvm.get_api_version()
        )),
        Err(e) => Some(e.to_string()),
    }
}

/// Default busy-wait phase of the waits for the agent ([`Guest::set_poll_spin`]).
pub const DEFAULT_POLL_SPIN: Duration = Duration::from_micros(200);

/// Time limit of the `stop` command in [`Guest::stop`] (and drop) before the vCPU is kicked.
pub const STOP_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// MMIO store done by an [`Action`] from the `n`th interrupt on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioWriteAfter {
    /// First handler invocation (1-based, counted since the action was set) that stores.
    pub n: u64,
    /// Guest physical address of the 32-bit store.
    pub gpa: u64,
    /// Value stored.
    pub value: u32,
}

/// Event-channel collection done by an [`Action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvtchnCollect {
    /// Guest physical address of the event-channel page (`docs/device-abi.md`).
    pub page_gpa: u64,
    /// Upcall block (0..63) whose `upcall_pending` and `selector` the handler consumes.
    pub upcall: u8,
}

/// What the agent's handler does for one vector, in this order: the MMIO store (if any, from
/// the `n`th invocation on), the event-channel collection (if any), the LAPIC EOI (if `eoi`).
/// `count[vector]` is incremented after all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Action {
    /// Write the LAPIC EOI register.
    pub eoi: bool,
    /// MMIO store from the `n`th invocation on.
    pub mmio_write: Option<MmioWriteAfter>,
    /// Event-channel collection.
    pub evtchn: Option<EvtchnCollect>,
}

impl Action {
    /// Do nothing but count (the LAPIC keeps the vector in service).
    pub const fn none() -> Action {
        Action {
            eoi: false,
            mmio_write: None,
            evtchn: None,
        }
    }

    /// Count and EOI (the default of every vector except the spurious vector).
    pub const fn eoi() -> Action {
        Action {
            eoi: true,
            mmio_write: None,
            evtchn: None,
        }
    }

    /// Adds a 32-bit store of `value` at `gpa` from the `n`th invocation on (`n` = 0 acts as 1).
    pub const fn with_mmio_write_after(mut self, n: u64, gpa: u64, value: u32) -> Action {
        self.mmio_write = Some(MmioWriteAfter { n, gpa, value });
        self
    }

    /// Adds event-channel collection on the page at `page_gpa`, upcall block `upcall`.
    pub const fn with_evtchn(mut self, page_gpa: u64, upcall: u8) -> Action {
        self.evtchn = Some(EvtchnCollect { page_gpa, upcall });
        self
    }
}

/// An IOAPIC redirection entry (fixed delivery, physical destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoapicRedirection {
    /// Vector delivered.
    pub vector: u8,
    /// Level-triggered (else edge).
    pub level: bool,
    /// Active low (else active high).
    pub active_low: bool,
    /// Masked.
    pub masked: bool,
    /// Destination APIC ID.
    pub dest_apic_id: u8,
}

impl IoapicRedirection {
    /// Unmasked, active high, to APIC ID 0.
    pub const fn new(vector: u8, level: bool) -> IoapicRedirection {
        IoapicRedirection {
            vector,
            level,
            active_low: false,
            masked: false,
            dest_apic_id: 0,
        }
    }

    /// Low dword of the entry.
    pub const fn low(&self) -> u32 {
        self.vector as u32
            | (self.active_low as u32) << 13
            | (self.level as u32) << 15
            | (self.masked as u32) << 16
    }

    /// High dword of the entry.
    pub const fn high(&self) -> u32 {
        (self.dest_apic_id as u32) << 24
    }
}

/// The guest agent running in a [`TestVm`], driven through its mailbox.
///
/// Commands are serialised (one at a time); counters and action entries are read and written
/// directly in guest memory without VM exits.
#[derive(Debug)]
pub struct Guest {
    vm: TestVm,
    agent: AgentInfo,
    cmd_lock: Mutex<()>,
    timeout: Duration,
    /// Busy-wait phase of [`Guest::poll_until`], in nanoseconds.
    spin_ns: AtomicU64,
}

impl Guest {
    /// Creates a [`TestVm`] with default options and boots the agent in it.
    ///
    /// # Errors
    ///
    /// As [`TestVm::new`] and [`Guest::boot`].
    pub fn new() -> Result<Guest> {
        Guest::boot(TestVm::new(&VmOptions::default())?)
    }

    /// Loads the agent into `vm` (not yet started), fills the IDT and the action table (every
    /// vector EOIs, except the spurious vector), starts the vCPU and waits for the agent to
    /// report ready. The agent masks the 8259 PICs and software-enables the LAPIC.
    ///
    /// # Errors
    ///
    /// [`Error::BadAgent`], [`Error::VcpuState`] if `vm` was started already, the errors of
    /// [`TestVm::start`], or [`Error::Timeout`] / [`Error::GuestFault`] if the agent does not
    /// come up.
    pub fn boot(mut vm: TestVm) -> Result<Guest> {
        let agent = agent::parse(AGENT_IMAGE)?;
        if vm.status() != VcpuStatus::Created {
            return Err(Error::VcpuState("Guest::boot needs a fresh TestVm".into()));
        }
        let mem = vm.memory();
        mem.write_slice(AGENT_GPA, AGENT_IMAGE)?;
        mem.zero(MAILBOX_GPA, 0x1000)?;
        mem.zero(ACTIONS_GPA, 256 * ACTION_SIZE)?;
        mem.zero(COUNTS_GPA, 256 * 8)?;
        mem.zero(PORT_COUNTS_GPA, u64::from(PORT_COUNT_ENTRIES) * 4)?;
        for v in 0..=255u8 {
            vm.set_idt_gate(v, agent.stub_gpa(v))?;
            if v >= FIRST_INTERRUPT_VECTOR && v != SPURIOUS_VECTOR {
                mem.store_u64(action_gpa(v) + action::FLAGS, action::EOI)?;
            }
        }
        vm.start(agent.entry_gpa, STACK_TOP)?;
        let guest = Guest {
            vm,
            agent,
            cmd_lock: Mutex::new(()),
            timeout: DEFAULT_TIMEOUT,
            spin_ns: AtomicU64::new(DEFAULT_POLL_SPIN.as_nanos() as u64),
        };
        guest.poll_until(
            guest.timeout,
            || "the agent to report ready".into(),
            || (guest.mailbox(mailbox::READY) == AGENT_READY_MAGIC).then_some(()),
        )?;
        Ok(guest)
    }

    /// The VM the agent runs in.
    pub fn vm(&self) -> &TestVm {
        &self.vm
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }

    /// Where the agent's entry point and interrupt stubs are.
    pub fn agent_info(&self) -> AgentInfo {
        self.agent
    }

    /// Changes the time limit of commands (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Changes how long waits for the agent busy-spin before they start yielding and then
    /// sleeping (default [`DEFAULT_POLL_SPIN`]; zero: sleep from the start). Spinning gives the lowest latency but takes a
    /// CPU from the vCPU and the device server on a small machine.
    pub fn set_poll_spin(&self, spin: Duration) {
        let ns = u64::try_from(spin.as_nanos()).unwrap_or(u64::MAX);
        self.spin_ns.store(ns, Ordering::Relaxed);
    }

    /// Runs one agent command (see [`layout::command`]) and returns `RESULT`.
    ///
    /// # Errors
    ///
    /// [`Error::Command`] if the agent rejects it, [`Error::Timeout`], [`Error::GuestFault`] or
    /// [`Error::VcpuStopped`] if it does not complete.
    pub fn command(&self, cmd: u64, args: [u64; 4]) -> Result<u64> {
        self.command_within(cmd, args, self.timeout)
    }

    fn command_within(&self, cmd: u64, args: [u64; 4], timeout: Duration) -> Result<u64> {
        let _serial = self.cmd_lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.check_running()?;
        let mem = self.memory();
        mem.store_u64(MAILBOX_GPA + mailbox::CMD, cmd)?;
        for (i, a) in args.iter().enumerate() {
            mem.store_u64(MAILBOX_GPA + mailbox::ARG0 + 8 * i as u64, *a)?;
        }
        let seq = mem.load_u64(MAILBOX_GPA + mailbox::SEQ)?.wrapping_add(1);
        // Release: the command and its arguments are visible before the new sequence number.
        mem.store_u64(MAILBOX_GPA + mailbox::SEQ, seq)?;
        self.vm.signal_msi(MsiMessage::fixed(DOORBELL_VECTOR))?;
        self.poll_until(
            timeout,
            || format!("agent command {cmd}"),
            || (self.mailbox(mailbox::DONE) == seq).then_some(()),
        )?;
        match self.mailbox(mailbox::STATUS) {
            mailbox::STATUS_OK => Ok(self.mailbox(mailbox::RESULT)),
            status => Err(Error::Command { cmd, status }),
        }
    }

    /// A command round trip that does nothing.
    ///
    /// # Errors
    ///
    /// As [`Guest::command`].
    pub fn nop(&self) -> Result<()> {
        self.command(command::NOP, [0; 4]).map(drop)
    }

    /// Guest 32-bit store of `value` at `gpa`.
    ///
    /// # Errors
    ///
    /// As [`Guest::command`].
    pub fn mmio_write32(&self, gpa: u64, value: u32) -> Result<()> {
        self.command(command::WRITE32, [gpa, value.into(), 0, 0])
            .map(drop)
    }

    /// Guest 32-bit load from `gpa`.
    ///
    /// # Errors
    ///
    /// As [`Guest::command`].
    pub fn mmio_read32(&self, gpa: u64) -> Result<u32> {
        self.command(command::READ32, [gpa, 0, 0, 0])
            .map(|v| v as u32)
    }

    /// Guest 64-bit store of `value` at `gpa`.
    ///
    /// # Errors
    ///
    /// As [`Guest::command`].
    pub fn mmio_write64(&self, gpa: u64, value: u64) -> Result<()> {
        self.command(command::WRITE64, [gpa, value, 0, 0]).map(drop)
    }

    /// Guest 64-bit load from `gpa`.
    ///
    /// # Errors
    ///
    /// As [`Guest::command`].
    pub fn mmio_read64(&self, gpa: u64) -> Result<u64> {
        self.command(command::READ64, [gpa, 0, 0, 0])
    }

    /// `count` guest 32-bit stores of `value` at `gpa`, in one command.
    ///
    /// # Errors
    ///
    /// As [`Guest::command`].
    pub fn mmio_write32_repeat(&self, gpa: u64, value: u32, count: u64) -> Result<()> {
        self.command(command::WRITE32_REPEAT, [gpa, value.into(), count, 0])
            .map(drop)
    }

    /// Software-enables the LAPIC (TPR 0, spurious vector 0xff). The agent already does this
    /// at boot, since the doorbell needs it.
    ///
    /// # Errors
    ///
    /// As [`Guest::command`].
    pub fn enable_lapic(&self) -> Result<()> {
        self.command(command::LAPIC_ENABLE, [LAPIC_SVR_ENABLED.into(), 0, 0, 0])
            .map(drop)
    }

    /// Programs IOAPIC pin `pin` to deliver `vector`, level- or edge-triggered, unmasked,
    /// active high, to the vCPU.
    ///
    /// # Errors
    ///
    /// As [`Guest::ioapic_program`].
    pub fn ioapic_route(&self, pin: u8, vector: u8, level: bool) -> Result<()> {
        self.ioapic_program(pin, IoapicRedirection::new(vector, level))
    }

    /// Programs the redirection entry of IOAPIC pin `pin` (high dword first, then the low
    /// dword that holds the mask bit).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a pin above 23, else as [`Guest::command`].
    pub fn ioapic_program(&self, pin: u8, entry: IoapicRedirection) -> Result<()> {
        if u32::from(pin) >= routing::IOAPIC_PINS {
            return Err(Error::InvalidArgument(format!("IOAPIC pin {pin}")));
        }
        let args = [pin.into(), entry.low().into(), entry.high().into(), 0];
        self.command(command::IOAPIC_ROUTE, args).map(drop)
    }

    /// Whether the agent idles with interrupts enabled (`sti; hlt`, the default) or polls the
    /// mailbox with interrupts disabled (interrupts stay pending in the LAPIC until re-enabled).
    ///
    /// # Errors
    ///
    /// As [`Guest::command`].
    pub fn set_interrupts_enabled(&self, enabled: bool) -> Result<()> {
        self.command(command::IRQ_MODE, [enabled.into(), 0, 0, 0])
            .map(drop)
    }

    /// Completed handler invocations of `vector` (read from guest memory, no exit).
    pub fn count(&self, vector: u8) -> u64 {
        self.word(COUNTS_GPA + 8 * u64::from(vector))
    }

    /// Polls `count(vector)` until it reaches `n`; returns the count seen (which may exceed
    /// `n`).
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] after `timeout`, [`Error::GuestFault`] / [`Error::VcpuStopped`] if the
    /// vCPU stops meanwhile.
    pub fn wait_count(&self, vector: u8, n: u64, timeout: Duration) -> Result<u64> {
        self.poll_until(
            timeout,
            || format!("count[{vector:#x}] >= {n} (is {})", self.count(vector)),
            || {
                let c = self.count(vector);
                (c >= n).then_some(c)
            },
        )
    }

    /// Sets the action of `vector`. Set actions while the vector is quiet: an interrupt that
    /// arrives during the update may see a partial entry. Resets the entry's invocation count.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an exception vector (0..31), the doorbell vector, or an
    /// upcall block above 63.
    pub fn set_action(&self, vector: u8, act: Action) -> Result<()> {
        if vector < FIRST_INTERRUPT_VECTOR || vector == DOORBELL_VECTOR {
            return Err(Error::InvalidArgument(format!(
                "vector {vector:#x} is an exception or the agent's doorbell"
            )));
        }
        let mut flags = 0;
        if act.eoi {
            flags |= action::EOI;
        }
        let (mut mmio_gpa, mut mmio_value, mut n) = (0, 0, 0);
        if let Some(w) = act.mmio_write {
            flags |= action::MMIO_WRITE_AFTER_N;
            (mmio_gpa, mmio_value, n) = (w.gpa, w.value, w.n);
        }
        let (mut page, mut upcall) = (0, 0);
        if let Some(e) = act.evtchn {
            if e.upcall >= evtchn::MAX_UPCALLS {
                return Err(Error::InvalidArgument(format!("upcall block {}", e.upcall)));
            }
            flags |= action::EVTCHN_COLLECT;
            (page, upcall) = (e.page_gpa, e.upcall);
        }
        let base = action_gpa(vector);
        let mem = self.memory();
        mem.store_u64(base + action::FLAGS, 0)?;
        mem.store_u64(base + action::MMIO_GPA, mmio_gpa)?;
        mem.store_u64(base + action::MMIO_VALUE, mmio_value.into())?;
        mem.store_u64(base + action::N, n)?;
        mem.store_u64(base + action::EVTCHN_PAGE, page)?;
        mem.store_u64(base + action::EVTCHN_UPCALL, upcall.into())?;
        mem.store_u64(base + action::HITS, 0)?;
        mem.store_u64(base + action::FLAGS, flags)
    }

    /// Handler invocations of `vector` since its action was last set.
    pub fn action_hits(&self, vector: u8) -> u64 {
        self.word(action_gpa(vector) + action::HITS)
    }

    /// Events the agent collected on event-channel `port`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a port above 4095.
    pub fn port_count(&self, port: u32) -> Result<u32> {
        if port >= PORT_COUNT_ENTRIES {
            return Err(Error::InvalidArgument(format!("event-channel port {port}")));
        }
        self.memory()
            .load_u32(PORT_COUNTS_GPA + 4 * u64::from(port))
    }

    /// Number of times the agent woke from `hlt` in its idle loop.
    pub fn wakeups(&self) -> u64 {
        self.mailbox(mailbox::WAKEUPS)
    }

    /// Injects `vector` as an MSI (`KVM_SIGNAL_MSI`); returns whether KVM delivered it.
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`].
    pub fn signal_msi(&self, vector: u8) -> Result<bool> {
        self.vm.signal_msi(MsiMessage::fixed(vector))
    }

    /// The exception the agent reported, if the vCPU stopped on one.
    pub fn fault(&self) -> Option<Error> {
        (self.vm.status() == VcpuStatus::Faulted).then(|| Error::GuestFault {
            vector: self.mailbox(mailbox::FAULT_VECTOR),
            error_code: self.mailbox(mailbox::FAULT_ERROR),
            rip: self.mailbox(mailbox::FAULT_RIP),
            cr2: self.mailbox(mailbox::FAULT_CR2),
        })
    }

    /// Stops the agent with the `stop` command and joins the vCPU thread, kicking it if the
    /// agent does not answer within [`STOP_COMMAND_TIMEOUT`] (then [`TestVm::stop`] bounds the
    /// wait). Returns the final vCPU status ([`VcpuStatus::Exited`] after a clean stop).
    pub fn stop(&mut self) -> VcpuStatus {
        if self.vm.is_running() {
            match self.command_within(command::STOP, [0; 4], STOP_COMMAND_TIMEOUT) {
                Ok(_) => {
                    if let Err(e) = self.vm.wait_for_exit(STOP_COMMAND_TIMEOUT) {
                        log::warn!("agent stop: {e}");
                    }
                }
                Err(e) => log::warn!("agent stop command failed: {e}"),
            }
        }
        self.vm.stop()
    }

    fn mailbox(&self, field: u64) -> u64 {
        self.word(MAILBOX_GPA + field)
    }

    /// A u64 of the agent's fixed layout: always inside guest RAM (at least
    /// [`layout::MIN_RAM_SIZE`]) and aligned, so the access cannot fail.
    fn word(&self, gpa: u64) -> u64 {
        match self.memory().load_u64(gpa) {
            Ok(v) => v,
            Err(e) => {
                debug_assert!(false, "agent layout access failed: {e}");
                0
            }
        }
    }

    fn check_running(&self) -> Result<()> {
        match self.vm.status() {
            VcpuStatus::Running => Ok(()),
            VcpuStatus::Faulted => Err(self
                .fault()
                .unwrap_or_else(|| Error::VcpuStopped("faulted".into()))),
            other => Err(Error::VcpuStopped(format!("{other:?}"))),
        }
    }

    /// Polls `f` until it returns `Some`: spinning first (latency), then yielding, then
    /// sleeping briefly. Checks the vCPU is still alive while waiting.
    fn poll_until<T>(
        &self,
        timeout: Duration,
        what: impl Fn() -> String,
        mut f: impl FnMut() -> Option<T>,
    ) -> Result<T> {
        let spin = Duration::from_nanos(self.spin_ns.load(Ordering::Relaxed));
        const YIELD: Duration = Duration::from_millis(2);
        let start = Instant::now();
        let mut round = 0u32;
        loop {
            if let Some(v) = f() {
                return Ok(v);
            }
            round = round.wrapping_add(1);
            if round % 64 == 0 {
                self.check_running()?;
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                // One last look, so a result that raced with the deadline is not lost.
                if let Some(v) = f() {
                    return Ok(v);
                }
                self.check_running()?;
                return Err(Error::Timeout {
                    what: what(),
                    timeout,
                });
            }
            if elapsed < spin {
                std::hint::spin_loop();
            } else if !spin.is_zero() && elapsed < YIELD {
                thread::yield_now();
            } else {
                thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

fn action_gpa(vector: u8) -> u64 {
    ACTIONS_GPA + u64::from(vector) * ACTION_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Guest>();
        send_sync::<TestVm>();
        send_sync::<GuestMemory>();
        send_sync::<MmapRegion>();
    }

    #[test]
    fn ioapic_redirection_bits() {
        let e = IoapicRedirection::new(0x50, true);
        assert_eq!(e.low(), 0x50 | 1 << 15);
        assert_eq!(e.high(), 0);
        let e = IoapicRedirection {
            vector: 0x31,
            level: false,
            active_low: true,
            masked: true,
            dest_apic_id: 3,
        };
        assert_eq!(e.low(), 0x31 | 1 << 13 | 1 << 16);
        assert_eq!(e.high(), 3 << 24);
    }

    #[test]
    fn action_builders() {
        let a = Action::eoi()
            .with_mmio_write_after(3, 0xd000_0014, 1)
            .with_evtchn(0x40_0000, 2);
        assert!(a.eoi);
        assert_eq!(
            a.mmio_write,
            Some(MmioWriteAfter {
                n: 3,
                gpa: 0xd000_0014,
                value: 1
            })
        );
        assert_eq!(
            a.evtchn,
            Some(EvtchnCollect {
                page_gpa: 0x40_0000,
                upcall: 2
            })
        );
        assert_eq!(Action::none(), Action::default());
    }
}
