// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! MSI (IRQ index 1) through the plugin, against a fake vfio-user device served by the real
//! server: the device has only a config space with an MSI capability (64-bit address,
//! per-vector masking, 4 vectors), records every SET_IRQS and config write in order and
//! refuses to bind MSI while INTx is bound (the kernel's rule). Interrupts are observed in
//! the LAPIC IRR KVM reports; no guest code runs.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ServerRig, irr_has, poll_until, vcpu_with_lapic, vm};
use irqbridge_kvm::attach::{AttachConfig, AttachedDevice};
use irqbridge_kvm::routing::{GsiRouter, IrqChip, SharedGsiRouter};
use irqbridge_vfio_user::device::{
    DeviceInfo, Errno, IoFd, IrqAction, IrqData, IrqInfo, RegionInfo, SetIrqs, VfioUserDevice,
};
use irqbridge_vfio_user::proto;
use kvm_ioctls::{VcpuFd, VmFd};
use std::os::fd::{BorrowedFd, OwnedFd};
use vmm_sys_util::eventfd::EventFd;

const CAP: usize = 0x50;
/// Message Control: 64-bit, per-vector masking, MMC = 2 (4 vectors).
const CONTROL: u16 = 0x0184;

/// What the fake saw, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// SET_IRQS(index, action, start, count) with this many eventfds (None: DATA_NONE).
    SetIrqs(u32, IrqAction, u32, u32, Option<usize>),
    /// A config-space write.
    Config(u64, Vec<u8>),
}

#[derive(Default)]
struct Shared {
    seen: Vec<Seen>,
    msi_fds: Vec<Option<EventFd>>,
    intx_bound: bool,
}

struct FakeMsiDevice {
    config: [u8; 256],
    shared: Arc<Mutex<Shared>>,
}

impl FakeMsiDevice {
    fn new(shared: Arc<Mutex<Shared>>) -> Self {
        let mut config = [0u8; 256];
        config[0x06] = 0x10; // capability list
        config[0x34] = CAP as u8;
        config[CAP] = 0x05; // MSI, last capability
        config[CAP + 2..CAP + 4].copy_from_slice(&CONTROL.to_le_bytes());
        config[0x3d] = 1; // INTA#
        FakeMsiDevice { config, shared }
    }
}

impl VfioUserDevice for FakeMsiDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: proto::VFIO_DEVICE_FLAGS_PCI | proto::VFIO_DEVICE_FLAGS_RESET,
            num_regions: proto::VFIO_PCI_NUM_REGIONS,
            num_irqs: proto::VFIO_PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> RegionInfo<'_> {
        let size = if index == proto::VFIO_PCI_CONFIG_REGION_INDEX {
            256
        } else {
            0
        };
        RegionInfo {
            flags: if size > 0 {
                proto::VFIO_REGION_INFO_FLAG_READ | proto::VFIO_REGION_INFO_FLAG_WRITE
            } else {
                0
            },
            size,
            offset: 0,
            sparse_areas: Vec::new(),
            mmap_fd: None,
        }
    }

    fn region_io_fds(&self, _index: u32) -> Vec<IoFd<'_>> {
        Vec::new()
    }

    fn irq_info(&self, index: u32) -> IrqInfo {
        let eventfd = proto::VFIO_IRQ_INFO_EVENTFD;
        match index {
            proto::VFIO_PCI_INTX_IRQ_INDEX => IrqInfo {
                flags: eventfd | proto::VFIO_IRQ_INFO_MASKABLE | proto::VFIO_IRQ_INFO_AUTOMASKED,
                count: 1,
            },
            proto::VFIO_PCI_MSI_IRQ_INDEX => IrqInfo {
                flags: eventfd | proto::VFIO_IRQ_INFO_NORESIZE,
                count: 4,
            },
            _ => IrqInfo { flags: 0, count: 0 },
        }
    }

    fn set_irqs(&mut self, req: SetIrqs) -> Result<(), Errno> {
        let mut s = self.shared.lock().unwrap();
        let fds = match &req.data {
            IrqData::Eventfds(f) => Some(f.len()),
            _ => None,
        };
        s.seen.push(Seen::SetIrqs(
            req.index, req.action, req.start, req.count, fds,
        ));
        match (req.index, req.action, req.data) {
            (proto::VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Trigger, IrqData::Eventfds(_)) => {
                s.intx_bound = true
            }
            (proto::VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Trigger, IrqData::None)
                if req.count == 0 =>
            {
                s.intx_bound = false
            }
            (proto::VFIO_PCI_MSI_IRQ_INDEX, IrqAction::Trigger, IrqData::Eventfds(fds)) => {
                // The kernel binds MSI only while no other index is bound.
                if s.intx_bound {
                    return Err(libc::EINVAL);
                }
                s.msi_fds = fds;
            }
            (proto::VFIO_PCI_MSI_IRQ_INDEX, IrqAction::Trigger, IrqData::None)
                if req.count == 0 =>
            {
                s.msi_fds.clear()
            }
            _ => {}
        }
        Ok(())
    }

    fn region_read(&mut self, _index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        let at = offset as usize;
        data.copy_from_slice(self.config.get(at..at + data.len()).ok_or(libc::EINVAL)?);
        Ok(())
    }

    fn region_write(&mut self, _index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let at = offset as usize;
        self.config
            .get_mut(at..at + data.len())
            .ok_or(libc::EINVAL)?
            .copy_from_slice(data);
        // Message Control's read-only bits stay.
        let c = u16::from_le_bytes([self.config[CAP + 2], self.config[CAP + 3]]);
        let c = (c & 0x71) | CONTROL;
        self.config[CAP + 2..CAP + 4].copy_from_slice(&c.to_le_bytes());
        self.shared
            .lock()
            .unwrap()
            .seen
            .push(Seen::Config(offset, data.to_vec()));
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        // MSI back to its reset state (Enable, MME, address, data, mask 0); bindings stay.
        self.config[CAP + 2..CAP + 4].copy_from_slice(&CONTROL.to_le_bytes());
        self.config[CAP + 4..CAP + 0x18].fill(0);
        Ok(())
    }

    fn client_disconnected(&mut self) {
        let mut s = self.shared.lock().unwrap();
        s.msi_fds.clear();
        s.intx_bound = false;
    }

    fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
        Vec::new()
    }

    fn handle_fd_event(&mut self, _token: u64) {}

    fn dma_map(&mut self, _iova: u64, _size: u64, _fd: Option<&OwnedFd>) {}
}

/// The fake device served in a thread, and what it saw.
struct Rig {
    server: ServerRig,
    shared: Arc<Mutex<Shared>>,
}

impl Rig {
    fn start(name: &str) -> Rig {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let device_shared = shared.clone();
        let server = ServerRig::start(&format!("msi-{name}"), move || {
            FakeMsiDevice::new(device_shared)
        });
        Rig { server, shared }
    }

    /// Attaches with INTx on GSI 5.
    fn attach(&self, vm: &Arc<VmFd>, router: &SharedGsiRouter) -> AttachedDevice {
        let config = AttachConfig {
            intx_gsi: Some(5),
            ..AttachConfig::default()
        };
        AttachedDevice::attach(vm.clone(), router.clone(), self.server.path(), config)
            .expect("attach")
    }

    /// Takes what the device saw so far.
    fn seen(&self) -> Vec<Seen> {
        std::mem::take(&mut self.shared.lock().unwrap().seen)
    }

    /// The device fires MSI vector `v` (writes the eventfd it was given).
    fn fire(&self, v: usize) {
        let s = self.shared.lock().unwrap();
        s.msi_fds[v].as_ref().expect("bound").write(1).unwrap();
    }

    /// An eventfd the device holds for vector `v`, duplicated (to fire after an unbind).
    fn fd(&self, v: usize) -> EventFd {
        let s = self.shared.lock().unwrap();
        s.msi_fds[v].as_ref().expect("bound").try_clone().unwrap()
    }
}

fn clear_irr(vcpu: &VcpuFd) {
    let mut lapic = vcpu.get_lapic().unwrap();
    for b in &mut lapic.regs[0x200..0x280] {
        *b = 0;
    }
    vcpu.set_lapic(&lapic).unwrap();
}

/// Gives a wrongly delivered interrupt time to show up.
fn settle() {
    std::thread::sleep(Duration::from_millis(20));
}

fn pending_bits(dev: &AttachedDevice) -> u32 {
    let mut b = [0u8; 4];
    dev.config_read((CAP + 0x14) as u64, &mut b).unwrap();
    u32::from_le_bytes(b)
}

const INTX: u32 = proto::VFIO_PCI_INTX_IRQ_INDEX;
const MSI: u32 = proto::VFIO_PCI_MSI_IRQ_INDEX;

#[test]
fn msi_follows_config_writes_with_masking_and_intx_handover() {
    let Some(vm) = vm(IrqChip::Full) else { return };
    let vcpu = vcpu_with_lapic(&vm);
    let rig = Rig::start("full");
    let router = GsiRouter::new_shared(vm.clone(), IrqChip::Full);
    let dev = rig.attach(&vm, &router);
    let layout = dev.msi_layout().expect("MSI wired");
    assert_eq!((layout.cap_offset, layout.vectors), (CAP as u64, 4));
    assert!(layout.is_64bit && layout.per_vector_mask);
    let group = dev.msi().unwrap();
    assert_eq!(group.len(), 4);
    let seen = rig.seen();
    assert!(
        seen.iter().all(|s| !matches!(s, Seen::SetIrqs(MSI, ..))),
        "MSI bound before the guest enabled it: {seen:?}"
    );
    assert!(rig.shared.lock().unwrap().intx_bound);

    // The guest programs address, data and masks vector 2, then enables 4 vectors.
    let cap = CAP as u64;
    dev.config_write(cap + 4, &0xfee0_0000u32.to_le_bytes())
        .unwrap();
    dev.config_write(cap + 8, &0u32.to_le_bytes()).unwrap();
    dev.config_write(cap + 0xc, &0x40u16.to_le_bytes()).unwrap();
    dev.config_write(cap + 0x10, &0b0100u32.to_le_bytes())
        .unwrap();
    assert_eq!(rig.seen().len(), 4, "plain forwards while MSI is off");
    dev.config_write(cap + 2, &0x0021u16.to_le_bytes()).unwrap();
    assert_eq!(
        rig.seen(),
        vec![
            Seen::SetIrqs(INTX, IrqAction::Trigger, 0, 0, None),
            Seen::SetIrqs(MSI, IrqAction::Trigger, 0, 4, Some(4)),
            Seen::Config(cap + 2, vec![0x21, 0]),
        ]
    );
    for v in 0..4 {
        let route = group.route(v).expect("route");
        assert_eq!((route.address(), route.data), (0xfee0_0000, 0x40 + v));
        assert_eq!(group.is_registered(v), Some(v != 2));
    }

    // Each unmasked vector reaches the guest with its own data.
    for v in [0usize, 1, 3] {
        rig.fire(v);
        poll_until("MSI in the IRR", || irr_has(&vcpu, 0x40 + v as u8));
    }
    // The masked one is held as pending (in the Pending Bits the guest reads), however often
    // it fires, and delivered once on unmask.
    clear_irr(&vcpu);
    rig.fire(2);
    rig.fire(2);
    settle();
    assert!(!irr_has(&vcpu, 0x42));
    assert_eq!(pending_bits(&dev), 0b0100);
    dev.config_write(cap + 0x10, &0u32.to_le_bytes()).unwrap();
    poll_until("unmasked MSI 0x42", || irr_has(&vcpu, 0x42));
    assert_eq!(pending_bits(&dev), 0);
    clear_irr(&vcpu);
    settle();
    assert!(!irr_has(&vcpu, 0x42), "a second injection on unmask");
    assert_eq!(rig.seen(), vec![Seen::Config(cap + 0x10, vec![0; 4])]);

    // Masked and pending when the guest disables MSI: dropped, never delivered.
    dev.config_write(cap + 0x10, &1u32.to_le_bytes()).unwrap();
    let held = rig.fd(0);
    rig.fire(0);
    let _ = rig.seen();
    dev.config_write(cap + 2, &0u16.to_le_bytes()).unwrap();
    let seen = rig.seen();
    assert_eq!(
        seen[..3],
        [
            Seen::SetIrqs(MSI, IrqAction::Trigger, 0, 0, None),
            Seen::Config(cap + 2, vec![0, 0]),
            Seen::SetIrqs(INTX, IrqAction::Trigger, 0, 1, Some(1)),
        ]
    );
    assert!(rig.shared.lock().unwrap().intx_bound, "INTx back: {seen:?}");
    for v in 0..4 {
        assert_eq!(group.is_registered(v), Some(false));
        assert_eq!(group.route(v), None);
    }
    held.write(1).unwrap();
    settle();
    assert!(!irr_has(&vcpu, 0x40), "an MSI after disable");
    assert_eq!(pending_bits(&dev), 0);

    // Enabled again with one vector: a new binding, vector 0 only, nothing stale delivered.
    dev.config_write(cap + 0x10, &0u32.to_le_bytes()).unwrap();
    dev.config_write(cap + 2, &0x0001u16.to_le_bytes()).unwrap();
    let seen = rig.seen();
    assert!(seen.contains(&Seen::SetIrqs(MSI, IrqAction::Trigger, 0, 1, Some(1))));
    settle();
    assert!(
        !irr_has(&vcpu, 0x40),
        "a stale event delivered on re-enable"
    );
    rig.fire(0);
    poll_until("MSI 0x40 after re-enable", || irr_has(&vcpu, 0x40));
    assert_eq!(group.is_registered(1), Some(false));

    dev.detach().unwrap();
    assert_eq!(
        rig.seen().last(),
        Some(&Seen::SetIrqs(INTX, IrqAction::Trigger, 0, 0, None))
    );
}

#[test]
fn device_reset_turns_msi_off_in_kvm_and_brings_intx_back() {
    let Some(vm) = vm(IrqChip::Full) else { return };
    let vcpu = vcpu_with_lapic(&vm);
    let rig = Rig::start("reset");
    let router = GsiRouter::new_shared(vm.clone(), IrqChip::Full);
    let dev = rig.attach(&vm, &router);
    let cap = CAP as u64;
    dev.config_write(cap + 4, &0xfee0_0000u32.to_le_bytes())
        .unwrap();
    dev.config_write(cap + 0xc, &0x60u16.to_le_bytes()).unwrap();
    dev.config_write(cap + 2, &0x0001u16.to_le_bytes()).unwrap();
    let group = dev.msi().unwrap();
    assert_eq!(group.is_registered(0), Some(true));
    let held = rig.fd(0);
    let _ = rig.seen();

    dev.reset().unwrap();
    let seen = rig.seen();
    assert!(
        seen.contains(&Seen::SetIrqs(MSI, IrqAction::Trigger, 0, 0, None)),
        "{seen:?}"
    );
    assert!(rig.shared.lock().unwrap().intx_bound, "INTx back: {seen:?}");
    assert!(
        !seen.iter().any(|s| matches!(s, Seen::Config(..))),
        "nothing forwarded"
    );
    assert_eq!(group.is_registered(0), Some(false));
    assert_eq!(group.route(0), None);
    held.write(1).unwrap();
    settle();
    assert!(!irr_has(&vcpu, 0x60), "an MSI after reset");
    dev.detach().unwrap();
}

#[test]
fn msi_enabled_before_a_reattach_is_wired_again() {
    let Some(vm) = vm(IrqChip::Full) else { return };
    let vcpu = vcpu_with_lapic(&vm);
    let rig = Rig::start("reattach");
    let router = GsiRouter::new_shared(vm.clone(), IrqChip::Full);
    let attach = || rig.attach(&vm, &router);
    let dev = attach();
    let cap = CAP as u64;
    dev.config_write(cap + 4, &0xfee0_0000u32.to_le_bytes())
        .unwrap();
    dev.config_write(cap + 0xc, &0x50u16.to_le_bytes()).unwrap();
    dev.config_write(cap + 2, &0x0011u16.to_le_bytes()).unwrap();
    drop(dev); // the connection goes; the device keeps its registers, drops our fds
    poll_until("the server to drop the fds", || {
        rig.shared.lock().unwrap().msi_fds.is_empty()
    });
    let _ = rig.seen();

    let dev = attach();
    let seen = rig.seen();
    let bind = seen
        .iter()
        .position(|s| *s == Seen::SetIrqs(MSI, IrqAction::Trigger, 0, 2, Some(2)))
        .expect("MSI bound again");
    let intx_off = seen
        .iter()
        .rposition(|s| *s == Seen::SetIrqs(INTX, IrqAction::Trigger, 0, 0, None))
        .expect("INTx off");
    assert!(intx_off < bind);
    assert!(
        !seen.iter().any(|s| matches!(s, Seen::Config(..))),
        "nothing forwarded"
    );
    rig.fire(1);
    poll_until("MSI 0x51 after reattach", || irr_has(&vcpu, 0x51));
    dev.detach().unwrap();
}
