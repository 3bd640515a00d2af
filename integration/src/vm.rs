// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`TestVm`]: a one-vCPU KVM virtual machine for bare-metal 64-bit guests.
//!
//! Life cycle:
//! 1. [`TestVm::new`] creates the VM with KVM's full in-kernel irqchip (PIC, IOAPIC, LAPIC),
//!    guest RAM from a memfd, the GDT and identity page tables, and the vCPU in 64-bit long mode
//!    (not running yet). The caller may now register MMIO handlers, memory slots, irqfds,
//!    ioeventfds and routes through [`TestVm::vm_fd`], load code and fill the IDT.
//! 2. [`TestVm::start`] runs the vCPU on its own thread (with an in-kernel irqchip `hlt` does
//!    not exit to userspace, so the vCPU must not block the caller). MMIO exits go to the
//!    [`MmioHandler`] registered for the address; I/O port writes to [`EXIT_PORT`] or
//!    [`FAULT_PORT`] end the thread.
//! 3. [`TestVm::stop`] (also run on drop) kicks the vCPU out of `KVM_RUN` with a signal and
//!    joins it, with a deadline so that drop never hangs.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, kvm_dtable, kvm_regs, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::error::{Error, Result};
use crate::layout::{
    CODE_SELECTOR, DATA_SELECTOR, DEFAULT_RAM_SIZE, EXIT_PORT, FAULT_PORT, GDT_GPA, IDT_GPA,
    MAX_RAM_SIZE, MIN_RAM_SIZE, PD_GPA, PDPT_GPA, PML4_GPA, RAM_GPA, TSS_SELECTOR,
};
use crate::memory::{GuestMemory, MmapRegion};
use crate::routing::MsiMessage;

/// Handles guest MMIO accesses to a registered range (one call per vCPU exit).
///
/// Called on the vCPU thread; the vCPU waits until the call returns.
pub trait MmioHandler: Send + Sync {
    /// A guest load of `data.len()` bytes at `gpa`: fill `data`.
    fn read(&self, gpa: u64, data: &mut [u8]);
    /// A guest store of `data` at `gpa`.
    fn write(&self, gpa: u64, data: &[u8]);
}

/// Options of [`TestVm::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmOptions {
    /// Guest RAM size in bytes (a multiple of 2 MiB between [`MIN_RAM_SIZE`] and
    /// [`MAX_RAM_SIZE`]).
    pub ram_size: u64,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            ram_size: DEFAULT_RAM_SIZE,
        }
    }
}

/// State of the vCPU thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStatus {
    /// Created, [`TestVm::start`] not called yet.
    Created,
    /// In the run loop.
    Running,
    /// The guest wrote to [`EXIT_PORT`].
    Exited,
    /// The guest wrote to [`FAULT_PORT`] (it took an exception).
    Faulted,
    /// Stopped by [`TestVm::stop`].
    Stopped,
    /// Ended on an unexpected exit or error (triple fault, internal error, ...).
    Failed(String),
}

/// Counters of the vCPU's exits to userspace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// MMIO read exits (handled or not).
    pub mmio_reads: u64,
    /// MMIO write exits (handled or not).
    pub mmio_writes: u64,
    /// MMIO reads outside every registered range (answered with all-ones).
    pub unhandled_mmio_reads: u64,
    /// MMIO writes outside every registered range (dropped).
    pub unhandled_mmio_writes: u64,
    /// Port reads (answered with all-ones).
    pub pio_reads: u64,
    /// Port writes other than [`EXIT_PORT`] / [`FAULT_PORT`] (dropped).
    pub pio_writes: u64,
    /// `KVM_RUN` calls interrupted by a signal.
    pub interrupted: u64,
}

#[derive(Debug, Default)]
struct Counters {
    mmio_reads: AtomicU64,
    mmio_writes: AtomicU64,
    unhandled_mmio_reads: AtomicU64,
    unhandled_mmio_writes: AtomicU64,
    pio_reads: AtomicU64,
    pio_writes: AtomicU64,
    interrupted: AtomicU64,
}

struct MmioRange {
    start: u64,
    len: u64,
    handler: Arc<dyn MmioHandler>,
}

impl MmioRange {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.start && gpa - self.start < self.len && len <= self.len - (gpa - self.start)
    }
}

impl fmt::Debug for MmioRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MmioRange({:#x}+{:#x})", self.start, self.len)
    }
}

#[derive(Debug)]
struct Shared {
    mmio: RwLock<Vec<MmioRange>>,
    counters: Counters,
    status: Mutex<VcpuStatus>,
    stop: AtomicBool,
}

impl Shared {
    fn set_status(&self, status: VcpuStatus) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }

    fn handler(&self, gpa: u64, len: usize) -> Option<Arc<dyn MmioHandler>> {
        let ranges = self.mmio.read().unwrap_or_else(PoisonError::into_inner);
        ranges
            .iter()
            .find(|r| r.contains(gpa, len as u64))
            .map(|r| Arc::clone(&r.handler))
    }

    fn mmio_read(&self, gpa: u64, data: &mut [u8]) {
        self.counters.mmio_reads.fetch_add(1, Ordering::Relaxed);
        match self.handler(gpa, data.len()) {
            Some(h) => h.read(gpa, data),
            None => {
                self.counters
                    .unhandled_mmio_reads
                    .fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }

    fn mmio_write(&self, gpa: u64, data: &[u8]) {
        self.counters.mmio_writes.fetch_add(1, Ordering::Relaxed);
        match self.handler(gpa, data.len()) {
            Some(h) => h.write(gpa, data),
            None => {
                self.counters
                    .unhandled_mmio_writes
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[derive(Debug)]
struct ExtraSlot {
    slot: u32,
    gpa: u64,
    len: u64,
    // Keeps an owned mapping alive while KVM uses it.
    _region: Option<MmapRegion>,
}

#[derive(Debug)]
struct Slots {
    next: u32,
    extra: Vec<ExtraSlot>,
}

/// Memory slot of guest RAM.
pub const RAM_SLOT: u32 = 0;

/// How long [`TestVm::stop`] keeps kicking the vCPU thread before giving up on it.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// A KVM VM with one vCPU in 64-bit long mode and an in-kernel irqchip. See the module docs.
pub struct TestVm {
    thread: Option<JoinHandle<()>>,
    vcpu: Option<VcpuFd>,
    shared: Arc<Shared>,
    slots: Mutex<Slots>,
    vm: Arc<VmFd>,
    kvm: Kvm,
    memory: Arc<GuestMemory>,
}

impl fmt::Debug for TestVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestVm")
            .field("memory", &self.memory)
            .field("status", &self.status())
            .field("exits", &self.exit_stats())
            .finish_non_exhaustive()
    }
}

/// The real-time signal used to kick the vCPU out of `KVM_RUN`.
fn kick_signal() -> Result<libc::c_int> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    static INSTALLED: OnceLock<std::result::Result<libc::c_int, vmm_sys_util::errno::Error>> =
        OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        let sig = SIGRTMIN();
        // No SA_RESTART: a KVM_RUN interrupted by this signal returns EINTR.
        register_signal_handler(sig, noop).map(|()| sig)
    });
    installed.map_err(Error::Signal)
}

impl TestVm {
    /// Creates the VM, its RAM, GDT, page tables and the (not yet running) vCPU.
    ///
    /// # Errors
    ///
    /// [`Error::OpenKvm`] when `/dev/kvm` cannot be opened (tests skip on it),
    /// [`Error::InvalidArgument`] for a bad RAM size, [`Error::Kvm`] when an ioctl fails.
    pub fn new(options: &VmOptions) -> Result<TestVm> {
        let size = options.ram_size;
        if !(MIN_RAM_SIZE..=MAX_RAM_SIZE).contains(&size) || size % (2 << 20) != 0 {
            return Err(Error::InvalidArgument(format!(
                "RAM size {size:#x} must be a multiple of 2 MiB in {MIN_RAM_SIZE:#x}..={MAX_RAM_SIZE:#x}"
            )));
        }
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        vm.create_irq_chip()
            .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;

        let memory = GuestMemory::new(RAM_GPA, size)?;
        let region = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags: 0,
            guest_phys_addr: RAM_GPA,
            memory_size: size,
            userspace_addr: memory.host_addr() as u64,
        };
        // SAFETY: the region describes `memory`'s mapping, which stays mapped until drop
        // deletes this slot first (see `Drop for TestVm`).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;

        write_gdt(&memory)?;
        write_page_tables(&memory)?;
        memory.zero(IDT_GPA, 256 * 16)?;

        let vcpu = vm.create_vcpu(0).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(Error::kvm("KVM_SET_CPUID2"))?;
        setup_long_mode(&vcpu)?;

        Ok(TestVm {
            thread: None,
            vcpu: Some(vcpu),
            shared: Arc::new(Shared {
                mmio: RwLock::new(Vec::new()),
                counters: Counters::default(),
                status: Mutex::new(VcpuStatus::Created),
                stop: AtomicBool::new(false),
            }),
            slots: Mutex::new(Slots {
                next: RAM_SLOT + 1,
                extra: Vec::new(),
            }),
            vm: Arc::new(vm),
            kvm,
            memory: Arc::new(memory),
        })
    }

    /// The VM fd, for irqfds, ioeventfds, routes and the VMM plugin.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The `/dev/kvm` handle the VM was created from.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Guest RAM (fd, size and GPA for DMA mapping; atomic/volatile accessors).
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Routes guest MMIO accesses inside `start..start + len` to `handler`.
    ///
    /// An access is dispatched to a range only if it lies entirely inside it. Ranges may be
    /// added while the vCPU runs. Accesses outside every range read all-ones and drop writes
    /// (counted in [`ExitStats`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an empty or wrapping range, [`Error::MmioOverlap`] if it
    /// overlaps a registered range.
    pub fn add_mmio(&self, start: u64, len: u64, handler: Arc<dyn MmioHandler>) -> Result<()> {
        let end = start
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| Error::InvalidArgument(format!("MMIO range {start:#x}+{len:#x}")))?;
        let mut ranges = self
            .shared
            .mmio
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if ranges
            .iter()
            .any(|r| start < r.start + r.len && r.start < end)
        {
            return Err(Error::MmioOverlap { start, len });
        }
        ranges.push(MmioRange {
            start,
            len,
            handler,
        });
        Ok(())
    }

    /// Removes the MMIO range that starts at `start`; returns whether one was registered.
    pub fn remove_mmio(&self, start: u64) -> bool {
        let mut ranges = self
            .shared
            .mmio
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let before = ranges.len();
        ranges.retain(|r| r.start != start);
        ranges.len() != before
    }

    /// Maps `len` bytes of host memory at `host_addr` into the guest at `gpa` as a new memory
    /// slot (for example a device BAR the device lets the VMM mmap). Returns the slot number.
    ///
    /// # Safety
    ///
    /// `host_addr..host_addr + len` must be a page-aligned read/write mapping of this process
    /// that stays mapped until [`TestVm::remove_memory_slot`] removes the slot or this `TestVm`
    /// is dropped. The guest may read and write it at any time.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an unaligned, empty or overlapping range, [`Error::Kvm`]
    /// when KVM refuses the slot.
    pub unsafe fn add_memory_slot(&self, gpa: u64, host_addr: *mut u8, len: u64) -> Result<u32> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.add_slot(gpa, host_addr, len, None) }
    }

    /// Maps an owned host mapping into the guest at `gpa` as a new memory slot; the `TestVm`
    /// keeps the mapping alive until the slot is removed. Returns the slot number.
    ///
    /// # Errors
    ///
    /// As [`TestVm::add_memory_slot`].
    pub fn add_mapped_region(&self, gpa: u64, region: MmapRegion) -> Result<u32> {
        let (ptr, len) = (region.as_ptr(), region.len());
        // SAFETY: `region` is a page-aligned read/write mapping that `add_slot` stores with the
        // slot, so it stays mapped until the slot is deleted.
        unsafe { self.add_slot(gpa, ptr, len, Some(region)) }
    }

    /// # Safety
    ///
    /// As [`TestVm::add_memory_slot`]; `region`, if any, is the mapping itself.
    unsafe fn add_slot(
        &self,
        gpa: u64,
        host_addr: *mut u8,
        len: u64,
        region: Option<MmapRegion>,
    ) -> Result<u32> {
        let end = gpa.checked_add(len).filter(|_| len > 0);
        let Some(end) = end.filter(|_| gpa % 4096 == 0 && len % 4096 == 0) else {
            return Err(Error::InvalidArgument(format!(
                "memory slot {gpa:#x}+{len:#x} must be non-empty and page aligned"
            )));
        };
        if (host_addr as usize) % 4096 != 0 {
            return Err(Error::InvalidArgument(format!(
                "host address {host_addr:p} of a memory slot must be page aligned"
            )));
        }
        let ram_end = self.memory.gpa() + self.memory.size();
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let overlaps_ram = gpa < ram_end && self.memory.gpa() < end;
        if overlaps_ram
            || slots
                .extra
                .iter()
                .any(|s| gpa < s.gpa + s.len && s.gpa < end)
        {
            return Err(Error::InvalidArgument(format!(
                "memory slot {gpa:#x}+{len:#x} overlaps guest RAM or another slot"
            )));
        }
        let slot = slots.next;
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the caller guarantees the mapping outlives the slot; drop and
        // `remove_memory_slot` delete the slot before releasing `region`.
        unsafe { self.vm.set_user_memory_region(r) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        slots.next += 1;
        slots.extra.push(ExtraSlot {
            slot,
            gpa,
            len,
            _region: region,
        });
        Ok(slot)
    }

    /// Deletes a slot added by [`TestVm::add_memory_slot`] or [`TestVm::add_mapped_region`]
    /// (and releases its owned mapping, if any).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an unknown slot, [`Error::Kvm`] when KVM refuses.
    pub fn remove_memory_slot(&self, slot: u32) -> Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let idx = slots
            .extra
            .iter()
            .position(|s| s.slot == slot)
            .ok_or_else(|| Error::InvalidArgument(format!("no memory slot {slot}")))?;
        delete_slot(&self.vm, slot, slots.extra[idx].gpa)?;
        slots.extra.remove(idx);
        Ok(())
    }

    /// Points IDT gate `vector` at `handler_gpa` (a 64-bit interrupt gate: IF cleared on entry,
    /// DPL 0, no IST).
    ///
    /// # Errors
    ///
    /// Only if the IDT lies outside guest RAM (it cannot).
    pub fn set_idt_gate(&self, vector: u8, handler_gpa: u64) -> Result<()> {
        let gpa = IDT_GPA + u64::from(vector) * 16;
        let (low, high) = idt_gate(handler_gpa);
        self.memory.store_u64(gpa, low)?;
        self.memory.store_u64(gpa + 8, high)
    }

    /// Starts the vCPU at `entry_gpa` with `rsp = stack_top`, interrupts disabled.
    ///
    /// # Errors
    ///
    /// [`Error::VcpuState`] if already started, [`Error::Kvm`], [`Error::Signal`] or
    /// [`Error::SpawnVcpu`] on failure.
    pub fn start(&mut self, entry_gpa: u64, stack_top: u64) -> Result<()> {
        let sig = kick_signal()?;
        let Some(mut vcpu) = self.vcpu.take() else {
            return Err(Error::VcpuState("the vCPU was already started".into()));
        };
        let regs = kvm_regs {
            rip: entry_gpa,
            rsp: stack_top,
            rflags: 0x2,
            ..Default::default()
        };
        if let Err(e) = vcpu.set_regs(&regs) {
            self.vcpu = Some(vcpu);
            return Err(Error::Kvm {
                op: "KVM_SET_REGS",
                source: e,
            });
        }
        let shared = Arc::clone(&self.shared);
        shared.set_status(VcpuStatus::Running);
        let handle = thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let end = run_vcpu(&mut vcpu, &shared);
                shared.set_status(end);
            })
            .map_err(|e| {
                self.shared
                    .set_status(VcpuStatus::Failed("spawn failed".into()));
                Error::SpawnVcpu(e)
            })?;
        log::debug!("vcpu0 started at {entry_gpa:#x}, kick signal {sig}");
        self.thread = Some(handle);
        Ok(())
    }

    /// Pins the (running) vCPU thread to host CPU `cpu`.
    ///
    /// # Errors
    ///
    /// [`Error::VcpuState`] if the vCPU thread is not running or the kernel refuses,
    /// [`Error::InvalidArgument`] for a CPU number out of range.
    pub fn pin_vcpu(&self, cpu: usize) -> Result<()> {
        use std::os::unix::thread::JoinHandleExt;
        let Some(handle) = &self.thread else {
            return Err(Error::VcpuState("the vCPU thread is not running".into()));
        };
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return Err(Error::InvalidArgument(format!("CPU {cpu}")));
        }
        // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is within the set (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: the pthread_t belongs to a thread this TestVm has not joined or detached
        // yet (`self.thread` is Some), and `set` is a valid cpu_set_t of the size passed.
        let r = unsafe {
            libc::pthread_setaffinity_np(
                handle.as_pthread_t(),
                std::mem::size_of::<libc::cpu_set_t>(),
                &set,
            )
        };
        if r != 0 {
            return Err(Error::VcpuState(format!(
                "pinning the vCPU to CPU {cpu} failed: {}",
                std::io::Error::from_raw_os_error(r)
            )));
        }
        Ok(())
    }

    /// The vCPU thread's state.
    pub fn status(&self) -> VcpuStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the vCPU thread is in its run loop.
    pub fn is_running(&self) -> bool {
        self.status() == VcpuStatus::Running
    }

    /// Exit counters so far.
    pub fn exit_stats(&self) -> ExitStats {
        let c = &self.shared.counters;
        ExitStats {
            mmio_reads: c.mmio_reads.load(Ordering::Relaxed),
            mmio_writes: c.mmio_writes.load(Ordering::Relaxed),
            unhandled_mmio_reads: c.unhandled_mmio_reads.load(Ordering::Relaxed),
            unhandled_mmio_writes: c.unhandled_mmio_writes.load(Ordering::Relaxed),
            pio_reads: c.pio_reads.load(Ordering::Relaxed),
            pio_writes: c.pio_writes.load(Ordering::Relaxed),
            interrupted: c.interrupted.load(Ordering::Relaxed),
        }
    }

    /// Injects an MSI with `KVM_SIGNAL_MSI`; returns whether KVM delivered it (false when the
    /// guest's LAPIC blocks it, for example while software-disabled).
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] when the ioctl fails.
    pub fn signal_msi(&self, msg: MsiMessage) -> Result<bool> {
        let n = self
            .vm
            .signal_msi(msg.to_kvm_msi())
            .map_err(Error::kvm("KVM_SIGNAL_MSI"))?;
        Ok(n > 0)
    }

    /// Waits until the vCPU thread ends by itself (for example after the guest wrote to
    /// [`EXIT_PORT`]) and joins it; returns its final status.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if it is still running after `timeout` (it keeps running).
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<VcpuStatus> {
        let deadline = Instant::now() + timeout;
        if let Some(handle) = self.thread.take() {
            while !handle.is_finished() {
                if Instant::now() >= deadline {
                    self.thread = Some(handle);
                    return Err(Error::Timeout {
                        what: "the vCPU thread to exit".into(),
                        timeout,
                    });
                }
                thread::sleep(Duration::from_millis(1));
            }
            if handle.join().is_err() {
                self.shared
                    .set_status(VcpuStatus::Failed("the vCPU thread panicked".into()));
            }
        }
        Ok(self.status())
    }

    /// Stops the vCPU thread: asks it to leave its run loop and interrupts `KVM_RUN` with a
    /// signal until it does, for at most [`STOP_TIMEOUT`]. A thread that does not stop in time
    /// (stuck in an [`MmioHandler`]) is detached. Returns the final status.
    pub fn stop(&mut self) -> VcpuStatus {
        let Some(handle) = self.thread.take() else {
            return self.status();
        };
        self.shared.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let sig = kick_signal().ok();
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                log::warn!("vcpu0 did not stop within {STOP_TIMEOUT:?}; detaching it");
                self.shared
                    .set_status(VcpuStatus::Failed("did not stop in time".into()));
                return self.status();
            }
            if let Some(sig) = sig {
                // A kick that lands between the stop-flag check and KVM_RUN is lost: repeat.
                if let Err(e) = handle.kill(sig) {
                    log::debug!("kicking vcpu0: {e}");
                }
            }
            thread::sleep(Duration::from_micros(500));
        }
        if handle.join().is_err() {
            self.shared
                .set_status(VcpuStatus::Failed("the vCPU thread panicked".into()));
        }
        if self.status() == VcpuStatus::Running {
            self.shared.set_status(VcpuStatus::Stopped);
        }
        self.status()
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.stop();
        // Delete the slots before their host mappings go away.
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        for s in slots.extra.drain(..) {
            if let Err(e) = delete_slot(&self.vm, s.slot, s.gpa) {
                log::warn!("{e}");
            }
        }
        if let Err(e) = delete_slot(&self.vm, RAM_SLOT, self.memory.gpa()) {
            log::warn!("{e}");
        }
    }
}

fn delete_slot(vm: &VmFd, slot: u32, gpa: u64) -> Result<()> {
    let r = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: 0,
        userspace_addr: 0,
    };
    // SAFETY: a zero-sized region deletes the slot; KVM stops using its host mapping.
    unsafe { vm.set_user_memory_region(r) }.map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))
}

/// The vCPU run loop; returns the final status.
fn run_vcpu(vcpu: &mut VcpuFd, shared: &Shared) -> VcpuStatus {
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return VcpuStatus::Stopped;
        }
        match vcpu.run() {
            Ok(VcpuExit::MmioRead(gpa, data)) => shared.mmio_read(gpa, data),
            Ok(VcpuExit::MmioWrite(gpa, data)) => shared.mmio_write(gpa, data),
            Ok(VcpuExit::IoOut(EXIT_PORT, _)) => return VcpuStatus::Exited,
            Ok(VcpuExit::IoOut(FAULT_PORT, _)) => return VcpuStatus::Faulted,
            Ok(VcpuExit::IoOut(port, _)) => {
                shared.counters.pio_writes.fetch_add(1, Ordering::Relaxed);
                log::trace!("vcpu0: dropped write to port {port:#x}");
            }
            Ok(VcpuExit::IoIn(_, data)) => {
                shared.counters.pio_reads.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
            Ok(VcpuExit::Intr) => {
                shared.counters.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::Shutdown) => {
                return VcpuStatus::Failed("triple fault (KVM_EXIT_SHUTDOWN)".into());
            }
            Ok(other) => return VcpuStatus::Failed(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                shared.counters.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return VcpuStatus::Failed(format!("KVM_RUN failed: {e}")),
        }
    }
}

/// GDT: null, 64-bit code, data, 64-bit TSS (two slots) describing a zeroed TSS.
fn write_gdt(mem: &GuestMemory) -> Result<()> {
    const TSS_GPA: u64 = GDT_GPA + 0x800;
    const TSS_LIMIT: u64 = 0x67;
    let tss_low = TSS_LIMIT
        | ((TSS_GPA & 0xff_ffff) << 16)
        | (0x8b << 40) // present, type 0xb (busy 64-bit TSS)
        | (((TSS_GPA >> 24) & 0xff) << 56);
    let entries: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff, // code: G, L, P, DPL 0, execute/read, accessed
        0x00cf_9300_0000_ffff, // data: G, D/B, P, DPL 0, read/write, accessed
        tss_low,
        TSS_GPA >> 32,
    ];
    for (i, e) in entries.iter().enumerate() {
        mem.store_u64(GDT_GPA + 8 * i as u64, *e)?;
    }
    mem.zero(TSS_GPA, TSS_LIMIT + 1)
}

/// Identity map of 0..4 GiB with 2 MiB pages; the top GiB (device BARs, IOAPIC, LAPIC) is
/// uncached.
fn write_page_tables(mem: &GuestMemory) -> Result<()> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    const PCD_PWT: u64 = 0x18;
    mem.zero(PML4_GPA, 0x1000)?;
    mem.zero(PDPT_GPA, 0x1000)?;
    mem.store_u64(PML4_GPA, PDPT_GPA | PRESENT_RW)?;
    for gib in 0..4u64 {
        let pd = PD_GPA + gib * 0x1000;
        mem.store_u64(PDPT_GPA + gib * 8, pd | PRESENT_RW)?;
        let cache = if gib == 3 { PCD_PWT } else { 0 };
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.store_u64(pd + i * 8, addr | PRESENT_RW | PAGE_SIZE_2M | cache)?;
        }
    }
    Ok(())
}

/// The two quadwords of a 64-bit interrupt gate to `handler`.
fn idt_gate(handler: u64) -> (u64, u64) {
    let low = (handler & 0xffff)
        | (u64::from(CODE_SELECTOR) << 16)
        | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
        | (((handler >> 16) & 0xffff) << 48);
    (low, handler >> 32)
}

fn setup_long_mode(vcpu: &VcpuFd) -> Result<()> {
    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_WP: u64 = 1 << 16;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;

    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: DATA_SELECTOR,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: GDT_GPA + 0x800,
        limit: 0x67,
        selector: TSS_SELECTOR,
        type_: 0xb,
        s: 0,
        l: 0,
        g: 0,
        db: 0,
        ..code
    };
    sregs.gdt = kvm_dtable {
        base: GDT_GPA,
        limit: 5 * 8 - 1,
        padding: [0; 3],
    };
    sregs.idt = kvm_dtable {
        base: IDT_GPA,
        limit: 256 * 16 - 1,
        padding: [0; 3],
    };
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idt_gate_encoding() {
        let (low, high) = idt_gate(0x1234_5678_9abc_def0);
        assert_eq!(low & 0xffff, 0xdef0);
        assert_eq!((low >> 16) & 0xffff, u64::from(CODE_SELECTOR));
        assert_eq!((low >> 40) & 0xff, 0x8e);
        assert_eq!(low >> 48, 0x9abc);
        assert_eq!(high, 0x1234_5678);
    }

    #[test]
    fn page_tables_identity_map_with_uncached_top() {
        let mem = GuestMemory::new(0, 0x10_0000).unwrap();
        write_page_tables(&mem).unwrap();
        assert_eq!(mem.load_u64(PML4_GPA).unwrap(), PDPT_GPA | 3);
        assert_eq!(
            mem.load_u64(PDPT_GPA + 3 * 8).unwrap(),
            (PD_GPA + 0x3000) | 3
        );
        // 0xfee00000: GiB 3, entry (0x3ee00000 >> 21) = 0x1f7.
        let lapic = mem.load_u64(PD_GPA + 0x3000 + 0x1f7 * 8).unwrap();
        assert_eq!(lapic, 0xfee0_0000 | 0x83 | 0x18);
        assert_eq!(mem.load_u64(PD_GPA + 8).unwrap(), 0x20_0000 | 0x83);
    }

    #[test]
    fn mmio_range_containment() {
        struct Nop;
        impl MmioHandler for Nop {
            fn read(&self, _: u64, _: &mut [u8]) {}
            fn write(&self, _: u64, _: &[u8]) {}
        }
        let r = MmioRange {
            start: 0x1000,
            len: 0x10,
            handler: Arc::new(Nop),
        };
        assert!(r.contains(0x1000, 4));
        assert!(r.contains(0x100c, 4));
        assert!(!r.contains(0x100d, 4));
        assert!(!r.contains(0xffc, 8));
        assert!(!r.contains(0x1010, 1));
        assert!(!r.contains(u64::MAX, 8));
    }
}
