// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The MSI capability as the plugin sees it: a shadow of the guest-programmed registers,
//! updated from forwarded config-space writes, and the ordered steps that bring KVM and the
//! device in line with it.
//!
//! PCI Local Bus 3.0 §6.8.1 layout (offsets from the capability):
//!
//! | offset | 32-bit address | 64-bit address |
//! |---|---|---|
//! | 0x02 | Message Control | Message Control |
//! | 0x04 | Message Address | Message Address |
//! | 0x08 | Message Data | Message Upper Address |
//! | 0x0c | Mask Bits (per-vector masking) | Message Data |
//! | 0x10 | Pending Bits | Mask Bits |
//! | 0x14 | | Pending Bits |
//!
//! Message Control: bit 0 MSI Enable, bits 3:1 Multiple Message Capable (log2 of the vectors
//! the function asks for), bits 6:4 Multiple Message Enable (log2 of the vectors the guest
//! granted), bit 7 64-bit address, bit 8 per-vector masking.
//!
//! With `n` vectors enabled the function sends vector `i` by replacing the low `log2(n)` bits
//! of Message Data with `i` (§6.8.3.4; the guest aligns Message Data, so this is data + i).
//! A masked vector's message is held as pending and sent once on unmask (§6.8.3.5): the
//! plugin masks in KVM ([`MsiInterruptGroup`](crate::MsiInterruptGroup): deassign the irqfd,
//! keep the event pending, inject it once on unmask) and also forwards the mask write, so a
//! device that masks by itself keeps its own pending bits too.

use crate::interrupt::MsiIrqSourceConfig;

/// PCI capability id of MSI.
pub const PCI_CAP_ID_MSI: u8 = 0x05;

/// Message Control: MSI Enable.
const CTRL_ENABLE: u16 = 1 << 0;
/// Message Control: Multiple Message Capable (log2), bits 3:1.
const CTRL_MMC_SHIFT: u16 = 1;
/// Message Control: Multiple Message Enable (log2), bits 6:4.
const CTRL_MME_SHIFT: u16 = 4;
const CTRL_MME_MASK: u16 = 0x7 << CTRL_MME_SHIFT;
/// Message Control: 64-bit address capable.
const CTRL_64BIT: u16 = 1 << 7;
/// Message Control: per-vector masking capable.
const CTRL_PVM: u16 = 1 << 8;

/// Most vectors MSI can have (MMC/MME 5).
pub const MSI_MAX_VECTORS: u32 = 32;

/// Bytes of the largest MSI capability (64-bit address with mask and pending bits).
pub const MSI_CAP_MAX_SIZE: usize = 24;

/// Where the MSI capability is and what it offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiLayout {
    /// Config-space offset of the capability.
    pub cap_offset: u64,
    /// The address has an upper dword.
    pub is_64bit: bool,
    /// Mask and Pending Bits are present.
    pub per_vector_mask: bool,
    /// Vectors the function can use: 2^MMC, capped by DEVICE_GET_IRQ_INFO(MSI).count.
    pub vectors: u32,
}

impl MsiLayout {
    /// The layout from the capability's Message Control, with at most `irq_count` vectors
    /// (the IRQ index's count). `None` if the device offers no vector.
    pub fn new(cap_offset: u64, control: u16, irq_count: u32) -> Option<Self> {
        let mmc = (control >> CTRL_MMC_SHIFT) & 0x7;
        // MMC values above 5 are reserved; treat them as the 32-vector maximum.
        let capable = (1u32 << mmc.min(5)).min(MSI_MAX_VECTORS);
        let vectors = capable.min(irq_count);
        (vectors > 0).then_some(MsiLayout {
            cap_offset,
            is_64bit: control & CTRL_64BIT != 0,
            per_vector_mask: control & CTRL_PVM != 0,
            vectors,
        })
    }

    /// Size of the capability in bytes.
    pub fn size(&self) -> usize {
        match (self.is_64bit, self.per_vector_mask) {
            (false, false) => 10,
            (true, false) => 14,
            (false, true) => 20,
            (true, true) => 24,
        }
    }

    /// Offset of Message Data inside the capability.
    fn data_at(&self) -> usize {
        if self.is_64bit { 0x0c } else { 0x08 }
    }

    /// Offset of the Mask Bits inside the capability (with per-vector masking).
    fn mask_at(&self) -> Option<usize> {
        self.per_vector_mask.then_some(self.data_at() + 4)
    }

    /// Offset of the Pending Bits inside the capability (with per-vector masking).
    pub fn pending_at(&self) -> Option<usize> {
        self.mask_at().map(|m| m + 4)
    }

    /// Config-space range of the capability.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.cap_offset..self.cap_offset + self.size() as u64
    }

    /// The guest-writable bits of byte `at` of the capability.
    fn writable(&self, at: usize) -> u8 {
        let data = self.data_at();
        match at {
            // Enable and Multiple Message Enable.
            2 => 0x71,
            // Message Address: dword aligned.
            4 => 0xfc,
            5..=7 => 0xff,
            8..=11 if self.is_64bit => 0xff,
            _ if at == data || at == data + 1 => 0xff,
            _ => match self.mask_at() {
                // One mask bit per vector the function can use; the rest are reserved.
                Some(m) if (m..m + 4).contains(&at) => {
                    let first = ((at - m) * 8) as u32;
                    let bits = self.vectors.saturating_sub(first).min(8);
                    ((1u16 << bits) - 1) as u8
                }
                _ => 0,
            },
        }
    }
}

/// The guest-programmed registers of the MSI capability (a byte image of it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiRegs {
    bytes: [u8; MSI_CAP_MAX_SIZE],
}

impl MsiRegs {
    /// The registers as read from the device (`image` starts at the capability).
    pub fn from_image(image: &[u8]) -> Self {
        let mut r = MsiRegs::default();
        for (d, s) in r.bytes.iter_mut().zip(image) {
            *d = *s;
        }
        r
    }

    fn u16_at(&self, at: usize) -> u16 {
        match self.bytes.get(at..at + 2) {
            Some(&[a, b]) => u16::from_le_bytes([a, b]),
            _ => 0,
        }
    }

    fn u32_at(&self, at: usize) -> u32 {
        match self.bytes.get(at..at + 4) {
            Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]),
            _ => 0,
        }
    }

    /// Message Control.
    pub fn control(&self) -> u16 {
        self.u16_at(2)
    }

    /// MSI Enable.
    pub fn enabled(&self) -> bool {
        self.control() & CTRL_ENABLE != 0
    }

    /// Vectors the guest enabled (2^MME, capped by the layout); 0 while MSI is disabled.
    pub fn enabled_vectors(&self, layout: &MsiLayout) -> u32 {
        if !self.enabled() {
            return 0;
        }
        let mme = (self.control() & CTRL_MME_MASK) >> CTRL_MME_SHIFT;
        (1u32 << mme.min(5)).min(layout.vectors)
    }

    /// The Mask Bits (0 without per-vector masking).
    pub fn mask_bits(&self, layout: &MsiLayout) -> u32 {
        layout.mask_at().map_or(0, |m| self.u32_at(m))
    }

    /// Whether vector `i` must not reach the guest: MSI disabled, `i` beyond the enabled
    /// vectors, or its mask bit set.
    pub fn masked(&self, layout: &MsiLayout, i: u32) -> bool {
        i >= self.enabled_vectors(layout) || (self.mask_bits(layout) >> i) & 1 != 0
    }

    /// Vector `i`'s message with `n` vectors enabled; `None` for an unprogrammed (zero)
    /// address.
    pub fn route(&self, layout: &MsiLayout, i: u32, n: u32) -> Option<MsiIrqSourceConfig> {
        let low_addr = self.u32_at(4);
        let high_addr = if layout.is_64bit { self.u32_at(8) } else { 0 };
        let base = u32::from(self.u16_at(layout.data_at()));
        // n is a power of two: the function owns the low log2(n) bits of the data.
        let data = (base & !(n.max(1) - 1)) | (i & (n.max(1) - 1));
        let cfg = MsiIrqSourceConfig {
            high_addr,
            low_addr,
            data,
            devid: 0,
        };
        (cfg.address() != 0).then_some(cfg)
    }

    /// Applies a guest config-space write of `data` at `offset` (config-space offset) to the
    /// writable bits; returns false if it does not touch the capability.
    pub fn write(&mut self, layout: &MsiLayout, offset: u64, data: &[u8]) -> bool {
        let mut touched = false;
        for (k, byte) in data.iter().enumerate() {
            let Some(at) = offset
                .checked_add(k as u64)
                .and_then(|a| a.checked_sub(layout.cap_offset))
                .and_then(|a| usize::try_from(a).ok())
                .filter(|a| *a < layout.size())
            else {
                continue;
            };
            touched = true;
            let w = layout.writable(at);
            if let Some(b) = self.bytes.get_mut(at) {
                *b = (*b & !w) | (byte & w);
            }
        }
        touched
    }
}

/// One step of bringing KVM and the device in line with a new [`MsiRegs`], in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Stage vector `.0`'s route (`None` removes it).
    Route(u32, Option<MsiIrqSourceConfig>),
    /// Commit the routing table (`KVM_SET_GSI_ROUTING`).
    Commit,
    /// Mask (`true`: deassign the irqfd, events stay pending) or unmask (assign it; one
    /// injection if an event is pending) vector `.0`.
    Mask(u32, bool),
    /// Forget vector `.0`'s pending event (MSI disabled: nothing is delivered later).
    ClearPending(u32),
    /// SET_IRQS(INTx, DATA_NONE|ACTION_TRIGGER, 0, 0): the kernel's rule is that MSI can only
    /// be bound while no other index is.
    DisableIntx,
    /// Bind INTx again (trigger, and resample/unmask eventfds) after MSI is disabled.
    EnableIntx,
    /// SET_IRQS(MSI, DATA_EVENTFD|ACTION_TRIGGER, 0, `.0`, the first `.0` vector eventfds).
    Bind(u32),
    /// SET_IRQS(MSI, DATA_NONE|ACTION_TRIGGER, 0, 0).
    Unbind,
    /// Forward the guest's config write to the device.
    Forward,
}

/// The steps from `old` to `new` for a group of `layout.vectors` vectors. The orders follow
/// the kernel rules (routing committed before an irqfd is assigned; irqfd deassigned before
/// a masked vector's route changes) and QEMU's (`vfio_msi_enable`: INTx off, vectors wired,
/// then SET_IRQS(MSI)); the config write reaches the device after it has its eventfds, as in
/// Cloud Hypervisor, so the device never sees MSI enabled without a way to signal.
pub fn plan(layout: &MsiLayout, old: &MsiRegs, new: &MsiRegs) -> Vec<Step> {
    let mut steps = Vec::new();
    let (n_old, n_new) = (old.enabled_vectors(layout), new.enabled_vectors(layout));
    let all = 0..layout.vectors;
    let wire = |steps: &mut Vec<Step>| {
        for i in 0..n_new {
            steps.push(Step::Route(i, new.route(layout, i, n_new)));
        }
        steps.push(Step::Commit);
        for i in 0..n_new {
            steps.push(Step::Mask(i, new.masked(layout, i)));
        }
    };
    match (old.enabled(), new.enabled()) {
        (false, false) => steps.push(Step::Forward),
        (false, true) => {
            // Whatever reached the eventfds while MSI was off is not an interrupt.
            for i in all {
                steps.push(Step::ClearPending(i));
            }
            wire(&mut steps);
            steps.push(Step::DisableIntx);
            steps.push(Step::Bind(n_new));
            steps.push(Step::Forward);
        }
        (true, false) => {
            for i in all.clone() {
                steps.push(Step::Mask(i, true));
                steps.push(Step::ClearPending(i));
            }
            for i in all {
                steps.push(Step::Route(i, None));
            }
            steps.push(Step::Commit);
            steps.push(Step::Unbind);
            steps.push(Step::Forward);
            steps.push(Step::EnableIntx);
        }
        (true, true) if n_old != n_new => {
            // A new vector count is a new binding (the kernel and QEMU tear MSI down and set
            // it up again); INTx stays off.
            for i in all.clone() {
                steps.push(Step::Mask(i, true));
                steps.push(Step::ClearPending(i));
            }
            for i in n_new..layout.vectors {
                steps.push(Step::Route(i, None));
            }
            steps.push(Step::Unbind);
            wire(&mut steps);
            steps.push(Step::Bind(n_new));
            steps.push(Step::Forward);
        }
        (true, true) => {
            for i in 0..n_new {
                if new.masked(layout, i) && !old.masked(layout, i) {
                    steps.push(Step::Mask(i, true));
                }
            }
            let moved: Vec<u32> = (0..n_new)
                .filter(|&i| new.route(layout, i, n_new) != old.route(layout, i, n_old))
                .collect();
            for &i in &moved {
                steps.push(Step::Route(i, new.route(layout, i, n_new)));
            }
            if !moved.is_empty() {
                steps.push(Step::Commit);
            }
            for i in 0..n_new {
                if !new.masked(layout, i) && old.masked(layout, i) {
                    steps.push(Step::Mask(i, false));
                }
            }
            steps.push(Step::Forward);
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 0x50;

    /// 64-bit, per-vector masking, MMC = 2 (4 vectors): the irqbridge test device's cap.
    fn layout() -> MsiLayout {
        MsiLayout::new(CAP, CTRL_64BIT | CTRL_PVM | (2 << CTRL_MMC_SHIFT), 4).unwrap()
    }

    fn regs_with(layout: &MsiLayout, writes: &[(u64, &[u8])]) -> MsiRegs {
        let mut r = MsiRegs::from_image(&[PCI_CAP_ID_MSI, 0, 0x84, 0x01]);
        for (off, data) in writes {
            assert!(r.write(layout, *off, data));
        }
        r
    }

    /// Address 0xfee0_0000 (upper 0), data 0x40, enable with MME = log2(n).
    fn programmed(layout: &MsiLayout, n: u32, mask: u32) -> MsiRegs {
        let mme = n.trailing_zeros() as u8;
        regs_with(
            layout,
            &[
                (CAP + 4, &0xfee0_0000u32.to_le_bytes()),
                (CAP + 8, &0u32.to_le_bytes()),
                (CAP + 0xc, &0x40u16.to_le_bytes()),
                (CAP + 0x10, &mask.to_le_bytes()),
                (CAP + 2, &[1 | (mme << 4), 0]),
            ],
        )
    }

    #[test]
    fn layouts_follow_message_control() {
        let l = layout();
        assert_eq!((l.size(), l.vectors), (24, 4));
        assert_eq!(l.pending_at(), Some(0x14));
        assert_eq!(l.range(), 0x50..0x68);
        let small = MsiLayout::new(0x40, 0, 1).unwrap();
        assert_eq!(
            (small.size(), small.is_64bit, small.pending_at()),
            (10, false, None)
        );
        let pvm32 = MsiLayout::new(0x40, CTRL_PVM | (5 << CTRL_MMC_SHIFT), 32).unwrap();
        assert_eq!(
            (pvm32.size(), pvm32.vectors, pvm32.pending_at()),
            (20, 32, Some(0x10))
        );
        // The IRQ index caps what the capability claims; no vector, no MSI.
        assert_eq!(
            MsiLayout::new(0x40, 5 << CTRL_MMC_SHIFT, 2)
                .unwrap()
                .vectors,
            2
        );
        assert_eq!(MsiLayout::new(0x40, 5 << CTRL_MMC_SHIFT, 0), None);
    }

    #[test]
    fn writes_change_only_writable_bits() {
        let l = layout();
        let mut r = MsiRegs::from_image(&[PCI_CAP_ID_MSI, 0x60, 0x84, 0x01, 0, 0, 0, 0]);
        // Control: only Enable and MME stick; id/next/MMC/64-bit/PVM are read-only.
        assert!(r.write(&l, CAP, &[0xff; 4]));
        assert_eq!(r.bytes[..4], [PCI_CAP_ID_MSI, 0x60, 0x84 | 0x71, 0x01]);
        // Address low bits 1:0 are reserved.
        r.write(&l, CAP + 4, &[0xff; 4]);
        assert_eq!(r.u32_at(4), 0xffff_fffc);
        // Data is 16 bits; the extended half is not writable.
        r.write(&l, CAP + 0xc, &[0xff; 4]);
        assert_eq!(r.u32_at(0xc), 0xffff);
        // One mask bit per vector; pending bits are the device's.
        r.write(&l, CAP + 0x10, &[0xff; 8]);
        assert_eq!((r.u32_at(0x10), r.u32_at(0x14)), (0xf, 0));
        // Outside the capability: untouched, reported as such.
        assert!(!r.write(&l, CAP + 24, &[0xff; 4]));
        assert!(!r.write(&l, CAP - 4, &[0xff; 4]));
        // A dword write straddling the start touches it.
        let mut r2 = MsiRegs::default();
        assert!(r2.write(&l, CAP - 2, &[0xaa, 0xbb, 0, 0]));
    }

    #[test]
    fn vector_data_replaces_the_low_bits() {
        let l = layout();
        let r = programmed(&l, 4, 0);
        assert_eq!(r.enabled_vectors(&l), 4);
        for i in 0..4 {
            let c = r.route(&l, i, 4).unwrap();
            assert_eq!((c.address(), c.data), (0xfee0_0000, 0x40 + i));
        }
        // Unaligned data: the function owns the low bits (PCI 3.0 §6.8.3.4).
        let odd = regs_with(
            &l,
            &[
                (CAP + 4, &0xfee0_0000u32.to_le_bytes()),
                (CAP + 0xc, &[0x43, 0]),
            ],
        );
        assert_eq!(odd.route(&l, 1, 4).unwrap().data, 0x41);
        assert_eq!(odd.route(&l, 0, 1).unwrap().data, 0x43);
        // No address, no route.
        assert_eq!(MsiRegs::default().route(&l, 0, 1), None);
        // MME above the layout is capped.
        let big = regs_with(&l, &[(CAP + 2, &[1 | (5 << 4), 0])]);
        assert_eq!(big.enabled_vectors(&l), 4);
    }

    #[test]
    fn masked_covers_disable_mme_and_mask_bits() {
        let l = layout();
        let r = programmed(&l, 2, 0b10);
        assert!(!r.masked(&l, 0));
        assert!(r.masked(&l, 1), "mask bit");
        assert!(r.masked(&l, 2), "beyond MME");
        let mut off = r;
        off.write(&l, CAP + 2, &[0, 0]);
        assert!(off.masked(&l, 0), "MSI disabled");
    }

    #[test]
    fn enabling_wires_routes_then_masks_then_intx_off_then_binds_then_forwards() {
        let l = layout();
        let new = programmed(&l, 4, 0b0100);
        let mut old = new;
        old.write(&l, CAP + 2, &[0, 0]);
        let route = |i| Step::Route(i, new.route(&l, i, 4));
        assert_eq!(
            plan(&l, &old, &new),
            vec![
                Step::ClearPending(0),
                Step::ClearPending(1),
                Step::ClearPending(2),
                Step::ClearPending(3),
                route(0),
                route(1),
                route(2),
                route(3),
                Step::Commit,
                Step::Mask(0, false),
                Step::Mask(1, false),
                Step::Mask(2, true),
                Step::Mask(3, false),
                Step::DisableIntx,
                Step::Bind(4),
                Step::Forward,
            ]
        );
    }

    #[test]
    fn disabling_masks_forgets_pending_unbinds_then_brings_intx_back() {
        let l = layout();
        let old = programmed(&l, 4, 0);
        let mut new = old;
        new.write(&l, CAP + 2, &[0, 0]);
        let steps = plan(&l, &old, &new);
        let pos = |s: Step| steps.iter().position(|x| *x == s).unwrap();
        for i in 0..4 {
            assert!(pos(Step::Mask(i, true)) < pos(Step::ClearPending(i)));
            assert!(pos(Step::Mask(i, true)) < pos(Step::Route(i, None)));
        }
        assert!(pos(Step::Route(3, None)) < pos(Step::Commit));
        assert_eq!(
            steps[steps.len() - 3..],
            [Step::Unbind, Step::Forward, Step::EnableIntx]
        );
    }

    #[test]
    fn mask_and_unmask_while_enabled_touch_only_that_vector() {
        let l = layout();
        let old = programmed(&l, 4, 0);
        let mut masked = old;
        masked.write(&l, CAP + 0x10, &2u32.to_le_bytes());
        assert_eq!(
            plan(&l, &old, &masked),
            vec![Step::Mask(1, true), Step::Forward]
        );
        assert_eq!(
            plan(&l, &masked, &old),
            vec![Step::Mask(1, false), Step::Forward]
        );
        // Writing the same value again changes nothing in KVM.
        assert_eq!(plan(&l, &old, &old), vec![Step::Forward]);
        // Address/data writes while disabled only reach the device.
        let mut off = old;
        off.write(&l, CAP + 2, &[0, 0]);
        let mut off2 = off;
        off2.write(&l, CAP + 0xc, &0x50u16.to_le_bytes());
        assert_eq!(plan(&l, &off, &off2), vec![Step::Forward]);
    }

    #[test]
    fn moving_a_live_vector_masks_before_and_unmasks_after_the_commit() {
        let l = layout();
        let old = programmed(&l, 4, 0);
        let mut new = old;
        new.write(&l, CAP + 0xc, &0x80u16.to_le_bytes());
        new.write(&l, CAP + 0x10, &1u32.to_le_bytes());
        let steps = plan(&l, &old, &new);
        assert_eq!(steps.first(), Some(&Step::Mask(0, true)));
        let commit = steps.iter().position(|s| *s == Step::Commit).unwrap();
        for i in 0..4 {
            let r = steps
                .iter()
                .position(|s| *s == Step::Route(i, new.route(&l, i, 4)));
            assert!(r.unwrap() < commit);
            assert_eq!(new.route(&l, i, 4).unwrap().data, 0x80 + i);
        }
        assert_eq!(steps.last(), Some(&Step::Forward));
    }

    #[test]
    fn a_new_vector_count_rebinds() {
        let l = layout();
        let old = programmed(&l, 4, 0);
        let new = programmed(&l, 2, 0);
        let steps = plan(&l, &old, &new);
        let pos = |s: Step| steps.iter().position(|x| *x == s).unwrap();
        assert!(pos(Step::Mask(3, true)) < pos(Step::Unbind));
        assert!(pos(Step::ClearPending(3)) < pos(Step::Unbind));
        assert!(pos(Step::ClearPending(0)) < pos(Step::Mask(0, false)));
        assert!(pos(Step::Unbind) < pos(Step::Commit));
        assert!(pos(Step::Commit) < pos(Step::Mask(0, false)));
        assert!(pos(Step::Mask(1, false)) < pos(Step::Bind(2)));
        assert!(!steps.contains(&Step::DisableIntx));
        assert_eq!(steps.last(), Some(&Step::Forward));
    }
}
