// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! KVM helpers shared by the plugin's integration tests: a VM with an irqchip (or a loud
//! SKIPPED without /dev/kvm), a vCPU whose LAPIC is software-enabled, IRR probes and polling;
//! and a vfio-user server serving a device in a thread.
#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use irqbridge_kvm::routing::IrqChip;
use irqbridge_vfio_user::device::VfioUserDevice;
use irqbridge_vfio_user::server::{Server, StopHandle};
use kvm_bindings::{KVM_CAP_SPLIT_IRQCHIP, KVM_IRQCHIP_IOAPIC, kvm_enable_cap, kvm_irqchip};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

/// A VM with the given irqchip, or `None` (after printing SKIPPED) without /dev/kvm.
pub fn vm(chip: IrqChip) -> Option<Arc<VmFd>> {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm not available ({e})");
            return None;
        }
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    match chip {
        IrqChip::Full => vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP"),
        IrqChip::Split => {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = 24;
            vm.enable_cap(&cap).expect("KVM_ENABLE_CAP(SPLIT_IRQCHIP)");
        }
    }
    Some(Arc::new(vm))
}

/// vCPU 0 with its LAPIC software-enabled, so fixed MSIs land in its IRR.
pub fn vcpu_with_lapic(vm: &VmFd) -> VcpuFd {
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut lapic = vcpu.get_lapic().expect("KVM_GET_LAPIC");
    // Spurious-interrupt vector register (0xF0): bit 8 = APIC software enable.
    let svr = 0x1ffu32.to_le_bytes();
    for (i, b) in svr.iter().enumerate() {
        lapic.regs[0xf0 + i] = *b as std::os::raw::c_char;
    }
    vcpu.set_lapic(&lapic).expect("KVM_SET_LAPIC");
    vcpu
}

/// Whether `vector` is set in vCPU's LAPIC IRR (0x200 + 0x10 * (vector / 32)).
pub fn irr_has(vcpu: &VcpuFd, vector: u8) -> bool {
    let lapic = vcpu.get_lapic().expect("KVM_GET_LAPIC");
    let off = 0x200 + 0x10 * usize::from(vector / 32);
    let word = u32::from_le_bytes([
        lapic.regs[off] as u8,
        lapic.regs[off + 1] as u8,
        lapic.regs[off + 2] as u8,
        lapic.regs[off + 3] as u8,
    ]);
    word & (1 << (vector % 32)) != 0
}

pub fn poll_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn ioapic_irr(vm: &VmFd) -> u32 {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).expect("KVM_GET_IRQCHIP");
    // SAFETY: KVM filled the IOAPIC variant, as chip_id asked.
    unsafe { chip.chip.ioapic.irr }
}

/// A vfio-user server on a socket in a private directory, serving one device in a thread;
/// stopped and its directory removed on drop.
pub struct ServerRig {
    dir: PathBuf,
    path: PathBuf,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
}

impl ServerRig {
    /// Serves the device `make` builds (in the server thread) on `irqbridge-kvm-TAG-PID/dev.sock`.
    pub fn start<D: VfioUserDevice + 'static>(
        tag: &str,
        make: impl FnOnce() -> D + Send + 'static,
    ) -> ServerRig {
        let dir = std::env::temp_dir().join(format!("irqbridge-kvm-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dev.sock");
        let mut server = Server::bind(&path).expect("bind");
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || {
            let mut device = make();
            server.run(&mut device).expect("server run");
        });
        ServerRig {
            dir,
            path,
            stop,
            thread: Some(thread),
        }
    }

    /// The server's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ServerRig {
    fn drop(&mut self) {
        let _ = self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
