// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest physical memory map, I/O ports and the guest agent's mailbox ABI.
//!
//! These constants are shared with `guests/agent.s`; the agent's header repeats the addresses it
//! was assembled with and [`crate::Guest::boot`] refuses an agent whose header disagrees.
//! `integration/README.md` describes the same map in prose.

/// Guest physical address of guest RAM (RAM starts at 0).
pub const RAM_GPA: u64 = 0;
/// Default guest RAM size: 32 MiB.
pub const DEFAULT_RAM_SIZE: u64 = 32 << 20;
/// Smallest accepted guest RAM size: everything below [`FREE_RAM_GPA`] plus 2 MiB.
pub const MIN_RAM_SIZE: u64 = FREE_RAM_GPA + (2 << 20);
/// Largest accepted guest RAM size: RAM must end below [`DEVICE_MMIO_GPA`].
pub const MAX_RAM_SIZE: u64 = DEVICE_MMIO_GPA;

/// GDT written by the VMM: null, 64-bit code (selector [`CODE_SELECTOR`]), data
/// (selector [`DATA_SELECTOR`]).
pub const GDT_GPA: u64 = 0x1000;
/// IDT written by the VMM: 256 64-bit interrupt gates (16 bytes each).
pub const IDT_GPA: u64 = 0x2000;
/// PML4 of the identity map.
pub const PML4_GPA: u64 = 0x3000;
/// PDPT of the identity map (4 entries, 1 GiB each).
pub const PDPT_GPA: u64 = 0x4000;
/// First of the four page directories (2 MiB pages covering 0..4 GiB).
pub const PD_GPA: u64 = 0x5000;
/// Code segment selector.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// Task register selector (the TSS descriptor lives only in the hidden segment state).
pub const TSS_SELECTOR: u16 = 0x18;

/// The agent's mailbox page (see [`mailbox`]).
pub const MAILBOX_GPA: u64 = 0x1_0000;
/// The per-vector action table: 256 entries of [`ACTION_SIZE`] bytes (see [`action`]).
pub const ACTIONS_GPA: u64 = 0x1_1000;
/// Size of one action-table entry.
pub const ACTION_SIZE: u64 = 64;
/// `count[256]`: u64 per vector, incremented by the agent when a handler has finished.
pub const COUNTS_GPA: u64 = 0x1_5000;
/// `port_count[4096]`: u32 per event-channel port, incremented by `EVTCHN_COLLECT`.
pub const PORT_COUNTS_GPA: u64 = 0x1_6000;
/// Number of entries in `port_count`.
pub const PORT_COUNT_ENTRIES: u32 = 4096;
/// Initial stack pointer of the vCPU (the stack grows down from here to 0x20000).
pub const STACK_TOP: u64 = 0x3_0000;
/// Where the agent binary is loaded.
pub const AGENT_GPA: u64 = 0x10_0000;
/// Largest agent image accepted (it must end below [`FREE_RAM_GPA`]).
pub const AGENT_MAX_SIZE: u64 = FREE_RAM_GPA - AGENT_GPA;
/// First guest RAM address that the harness never touches: free for test data (for example an
/// event-channel page in RAM).
pub const FREE_RAM_GPA: u64 = 0x20_0000;

/// Start of the window for device BARs (identity-mapped, uncached, not backed by RAM).
pub const DEVICE_MMIO_GPA: u64 = 0xd000_0000;
/// Size of the device BAR window.
pub const DEVICE_MMIO_SIZE: u64 = 0x1000_0000;
/// IOAPIC base (handled by KVM's in-kernel IOAPIC).
pub const IOAPIC_GPA: u64 = 0xfec0_0000;
/// Local APIC base (handled by KVM's in-kernel LAPIC).
pub const LAPIC_GPA: u64 = 0xfee0_0000;
/// LAPIC end-of-interrupt register.
pub const LAPIC_EOI_GPA: u64 = LAPIC_GPA + 0xb0;
/// Default LAPIC spurious-vector register value: APIC enabled, spurious vector 0xff.
pub const LAPIC_SVR_ENABLED: u32 = 0x1ff;

/// I/O port the agent writes to when it stops (`stop` command): the vCPU thread ends.
pub const EXIT_PORT: u16 = 0x510;
/// I/O port the agent writes to after an exception (vectors 0..31): the vCPU thread ends and
/// the fault is described in the mailbox.
pub const FAULT_PORT: u16 = 0x511;

/// Vector the host injects (with `KVM_SIGNAL_MSI`) to wake the agent for a new command.
pub const DOORBELL_VECTOR: u8 = 0xf0;
/// LAPIC spurious-interrupt vector; its action is "none" (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// First vector that is an interrupt rather than an exception.
pub const FIRST_INTERRUPT_VECTOR: u8 = 32;

/// The agent's ABI version (header field, checked at boot).
pub const AGENT_ABI_VERSION: u32 = 1;
/// Value the agent stores in [`mailbox::READY`] once it is initialised ("AGTREADY").
pub const AGENT_READY_MAGIC: u64 = u64::from_le_bytes(*b"AGTREADY");

/// Mailbox fields: byte offsets from [`MAILBOX_GPA`], all u64.
///
/// Protocol: the host writes `CMD` and `ARG0..ARG3`, then stores `SEQ + 1` into `SEQ` (release)
/// and injects [`DOORBELL_VECTOR`]. The agent, when `SEQ != DONE`, runs the command, writes
/// `STATUS` and `RESULT`, then stores `SEQ` into `DONE`. One command at a time.
pub mod mailbox {
    /// Host: command sequence number.
    pub const SEQ: u64 = 0x00;
    /// Agent: sequence number of the last completed command.
    pub const DONE: u64 = 0x08;
    /// Host: command code (see [`super::command`]).
    pub const CMD: u64 = 0x10;
    /// Host: first argument.
    pub const ARG0: u64 = 0x18;
    /// Host: second argument.
    pub const ARG1: u64 = 0x20;
    /// Host: third argument.
    pub const ARG2: u64 = 0x28;
    /// Host: fourth argument.
    pub const ARG3: u64 = 0x30;
    /// Agent: 0 ok, 1 unknown command.
    pub const STATUS: u64 = 0x38;
    /// Agent: command result (reads).
    pub const RESULT: u64 = 0x40;
    /// Agent: [`super::AGENT_READY_MAGIC`] once initialised.
    pub const READY: u64 = 0x48;
    /// Agent: number of `hlt` wake-ups in the idle loop.
    pub const WAKEUPS: u64 = 0x50;
    /// Agent: 1 = idle with interrupts enabled (`sti; hlt`), 0 = idle polling with IF clear.
    pub const IRQ_MODE: u64 = 0x58;
    /// Agent: exception vector after a fault.
    pub const FAULT_VECTOR: u64 = 0x60;
    /// Agent: exception error code (0 when the CPU pushes none).
    pub const FAULT_ERROR: u64 = 0x68;
    /// Agent: faulting RIP.
    pub const FAULT_RIP: u64 = 0x70;
    /// Agent: CR2 at the fault.
    pub const FAULT_CR2: u64 = 0x78;
    /// Agent status: command completed.
    pub const STATUS_OK: u64 = 0;
    /// Agent status: unknown command code.
    pub const STATUS_UNKNOWN: u64 = 1;
}

/// Agent command codes (mailbox `CMD`).
pub mod command {
    /// Do nothing (a round trip).
    pub const NOP: u64 = 0;
    /// 32-bit store of `ARG1` at GPA `ARG0`.
    pub const WRITE32: u64 = 1;
    /// 32-bit load from GPA `ARG0` into `RESULT`.
    pub const READ32: u64 = 2;
    /// 64-bit store of `ARG1` at GPA `ARG0`.
    pub const WRITE64: u64 = 3;
    /// 64-bit load from GPA `ARG0` into `RESULT`.
    pub const READ64: u64 = 4;
    /// `ARG2` 32-bit stores of `ARG1` at GPA `ARG0`.
    pub const WRITE32_REPEAT: u64 = 5;
    /// LAPIC: TPR = 0, spurious-vector register = `ARG0`.
    pub const LAPIC_ENABLE: u64 = 6;
    /// IOAPIC redirection entry of pin `ARG0`: high dword `ARG2` first, then low dword `ARG1`.
    pub const IOAPIC_ROUTE: u64 = 7;
    /// Idle mode: `ARG0` = 1 idles with `sti; hlt`, 0 polls with interrupts disabled.
    pub const IRQ_MODE: u64 = 8;
    /// Complete the command, then `out` to [`super::EXIT_PORT`] and halt with IF clear.
    pub const STOP: u64 = 9;
}

/// Action-table entry fields: byte offsets within an entry, all u64.
///
/// The host fills an entry directly in guest memory; the agent's handler for that vector reads
/// it on every interrupt, in this order: increment `HITS`; if `MMIO_WRITE_AFTER_N` and
/// `HITS >= N`, 32-bit store of `MMIO_VALUE` at `MMIO_GPA`; if `EVTCHN_COLLECT`, run the 2-level
/// event-channel handler on the page at `EVTCHN_PAGE` for upcall block `EVTCHN_UPCALL`; if `EOI`,
/// write 0 to the LAPIC EOI register; finally increment `count[vector]`.
pub mod action {
    /// Flags (below).
    pub const FLAGS: u64 = 0x00;
    /// GPA of the MMIO store.
    pub const MMIO_GPA: u64 = 0x08;
    /// Value of the MMIO store (low 32 bits).
    pub const MMIO_VALUE: u64 = 0x10;
    /// The handler invocation (1-based `HITS`) from which on the store is done.
    pub const N: u64 = 0x18;
    /// GPA of the event-channel page.
    pub const EVTCHN_PAGE: u64 = 0x20;
    /// Upcall block index (0..63) on that page.
    pub const EVTCHN_UPCALL: u64 = 0x28;
    /// Agent: handler invocations since the host last reset it.
    pub const HITS: u64 = 0x30;
    /// Flag: write the LAPIC EOI register.
    pub const EOI: u64 = 1 << 0;
    /// Flag: MMIO store from the `N`th invocation on.
    pub const MMIO_WRITE_AFTER_N: u64 = 1 << 1;
    /// Flag: collect event channels.
    pub const EVTCHN_COLLECT: u64 = 1 << 2;
}

/// Event-channel page layout (`docs/device-abi.md`, "Event channels").
pub mod evtchn {
    /// `pending[64]` u64 words.
    pub const PENDING_OFFSET: u64 = 0x000;
    /// `mask[64]` u64 words.
    pub const MASK_OFFSET: u64 = 0x200;
    /// Upcall blocks: `upcall_pending` u64 at +0, `selector` u64 at +8, 16 bytes each.
    pub const UPCALL_OFFSET: u64 = 0x400;
    /// Size of one upcall block.
    pub const UPCALL_STRIDE: u64 = 16;
    /// Number of upcall blocks.
    pub const MAX_UPCALLS: u8 = 64;
    /// Number of ports (64 words of 64 bits).
    pub const MAX_PORTS: u32 = 4096;
    /// Size of the page.
    pub const PAGE_SIZE: u64 = 4096;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_do_not_overlap() {
        let regions = [
            (GDT_GPA, 0x1000),
            (IDT_GPA, 256 * 16),
            (PML4_GPA, 0x1000),
            (PDPT_GPA, 0x1000),
            (PD_GPA, 4 * 0x1000),
            (MAILBOX_GPA, 0x1000),
            (ACTIONS_GPA, 256 * ACTION_SIZE),
            (COUNTS_GPA, 256 * 8),
            (PORT_COUNTS_GPA, u64::from(PORT_COUNT_ENTRIES) * 4),
            (STACK_TOP - 0x1_0000, 0x1_0000),
            (AGENT_GPA, AGENT_MAX_SIZE),
        ];
        for (i, &(a, alen)) in regions.iter().enumerate() {
            assert!(a + alen <= FREE_RAM_GPA, "region {i} reaches free RAM");
            for &(b, blen) in &regions[i + 1..] {
                assert!(a + alen <= b || b + blen <= a, "{a:#x} overlaps {b:#x}");
            }
        }
    }

    #[test]
    fn ready_magic_matches_the_agent_source() {
        // agent.s: .equ READY_MAGIC, 0x5944414552544741
        assert_eq!(AGENT_READY_MAGIC, 0x5944_4145_5254_4741);
    }
}
