// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Interrupt source groups: eventfds wired to KVM GSIs.
//!
//! The trait has the shape of Cloud Hypervisor's `vm-device` `InterruptSourceGroup`, so a VMM
//! written against that interface can take these groups with a thin adapter (our methods
//! return this crate's [`Result`]; [`Error`] converts into `std::io::Error`).
//!
//! Two implementations:
//!
//! - [`MsiInterruptGroup`]: one eventfd and one MSI-routed GSI per vector. An unmasked vector's
//!   eventfd is a registered irqfd, so a device writing it interrupts the guest with no VMM
//!   involvement. Masking deassigns the irqfd; events that arrive while masked stay in the
//!   eventfd counter, which the group drains into a pending flag and delivers exactly once on
//!   unmask.
//! - [`LegacyInterruptGroup`]: a level-triggered INTx line. With the full in-kernel irqchip the
//!   trigger eventfd is registered with `KVM_IRQFD_FLAG_RESAMPLE`: a write *asserts* the GSI, and
//!   when the guest EOIs the pin KVM de-asserts it and signals the resample eventfd, which the
//!   device takes as its INTx UNMASK eventfd. With a split irqchip KVM refuses resample; the
//!   trigger is a plain irqfd and the VMM reports EOIs itself.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::routing::{IrqChip, Route, SharedGsiRouter};
use crate::{Error, Result};

/// Index of an interrupt inside its group (vector number, or 0 for INTx).
pub type InterruptIndex = u32;

/// Route of a legacy interrupt: a pin of an in-kernel interrupt controller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LegacyIrqSourceConfig {
    /// `KVM_IRQCHIP_PIC_MASTER` 0, `KVM_IRQCHIP_PIC_SLAVE` 1 or `KVM_IRQCHIP_IOAPIC` 2.
    pub irqchip: u32,
    /// Pin of that controller.
    pub pin: u32,
}

/// Route of a message-signalled interrupt, as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiIrqSourceConfig {
    /// Upper 32 bits of the message address.
    pub high_addr: u32,
    /// Lower 32 bits of the message address.
    pub low_addr: u32,
    /// Message data.
    pub data: u32,
    /// Requester ID for interrupt translation; 0 when not needed (x86).
    pub devid: u32,
}

impl MsiIrqSourceConfig {
    /// The full 64-bit message address.
    pub fn address(&self) -> u64 {
        (u64::from(self.high_addr) << 32) | u64::from(self.low_addr)
    }
}

/// How an interrupt source reaches the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptSourceConfig {
    /// An irqchip pin.
    LegacyIrq(LegacyIrqSourceConfig),
    /// An MSI message.
    MsiIrq(MsiIrqSourceConfig),
}

/// A group of interrupt sources of one device (all MSI-X vectors, or its INTx line).
///
/// Ordering rules the implementations follow (and a caller composing the lower-level methods
/// must follow too):
/// - **routing before irqfd assign**: a route must be committed before an irqfd on its GSI is
///   expected to fire (older kernels also crashed when an irqfd raced a routing update);
/// - **deassign before masking**: an irqfd is deassigned before its route is removed or changed
///   for a masked source, so no event is injected through a stale route.
pub trait InterruptSourceGroup: Send + Sync + fmt::Debug {
    /// Lets every unmasked source of the group reach the guest (registers their irqfds).
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] if an irqfd cannot be registered.
    fn enable(&self) -> Result<()>;

    /// Stops every source from reaching the guest (deassigns their irqfds); events that
    /// arrive meanwhile are kept as pending where the group supports it.
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] if an irqfd cannot be deassigned.
    fn disable(&self) -> Result<()>;

    /// Raises source `index` from the VMM, exactly as the device would (writes its eventfd).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIndex`] for a bad index, [`Error::EventFd`] if the write fails.
    fn trigger(&self, index: InterruptIndex) -> Result<()>;

    /// A duplicate of source `index`'s eventfd, e.g. to hand to a device; `None` for a bad
    /// index or if `dup` fails.
    fn notifier(&self, index: InterruptIndex) -> Option<EventFd>;

    /// Sets source `index`'s route to `config` and its mask to `masked`; with `set_gsi` the
    /// routing table is committed as part of the call (in the right order).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIndex`], [`Error::InvalidArgument`] for a config kind the group cannot
    /// route, [`Error::Kvm`] for a failed ioctl.
    fn update(
        &self,
        index: InterruptIndex,
        config: InterruptSourceConfig,
        masked: bool,
        set_gsi: bool,
    ) -> Result<()>;

    /// Commits the (shared) GSI routing table.
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] if `KVM_SET_GSI_ROUTING` fails.
    fn set_gsi(&self) -> Result<()>;
}

fn new_eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd)
}

/// Reads (and so zeroes) a non-blocking eventfd's counter; 0 if it was already 0.
fn drain(fd: &EventFd) -> Result<u64> {
    match fd.read() {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(Error::EventFd(e)),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of our locks leaves plain bookkeeping behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn kvm_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

struct MsiVector {
    gsi: u32,
    fd: EventFd,
    route: Option<MsiIrqSourceConfig>,
    /// Per-vector mask (vector control bit, or `update(masked)`).
    masked: bool,
    /// The eventfd is currently a KVM irqfd on `gsi`.
    registered: bool,
    /// An event arrived while the vector was not registered.
    pending: bool,
}

struct MsiState {
    /// Group-level enable (MSI-X Enable and not Function Mask).
    enabled: bool,
    vectors: Vec<MsiVector>,
}

/// MSI/MSI-X vectors: one eventfd and one MSI-routed GSI per vector.
///
/// A vector is *live* (its eventfd is a registered irqfd) while the group is enabled and the
/// vector is unmasked. New groups are enabled with every vector masked.
///
/// # Pending events
///
/// KVM reads the eventfd counter when a write wakes a live irqfd, but not when an irqfd is
/// registered on an eventfd that is already signalled: it injects once and leaves the count,
/// which would then look like a fresh event at the next mask. So the group keeps the
/// bookkeeping itself:
/// - *going live*: drain the counter (events of the masked period) into `pending`, register the
///   irqfd, then, if pending, write the eventfd once: exactly one interrupt for any number of
///   masked events;
/// - *going dead*: drain the counter, then deassign. A kernel that consumes on wakeup leaves
///   nothing to drain (an event before the deassign was delivered, one after it stays in the
///   counter as pending); on a kernel that does not, the counter holds delivered events, and
///   an event landing between drain and deassign is delivered and also counted: at worst one
///   spurious interrupt on the next unmask, never a lost one;
/// - while dead, [`MsiInterruptGroup::is_pending`] drains the counter into `pending` (the PBA
///   bit a VMM-emulated MSI-X table reports).
pub struct MsiInterruptGroup {
    vm: Arc<VmFd>,
    router: SharedGsiRouter,
    state: Mutex<MsiState>,
}

impl fmt::Debug for MsiInterruptGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("MsiInterruptGroup")
            .field("enabled", &state.enabled)
            .field("vectors", &state.vectors.len())
            .field(
                "gsis",
                &state.vectors.iter().map(|v| v.gsi).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl MsiInterruptGroup {
    /// Creates `count` vectors, each with a new non-blocking eventfd and a GSI allocated from
    /// `router` (no route yet, masked, not registered).
    ///
    /// # Errors
    ///
    /// [`Error::NoFreeGsi`] or [`Error::EventFd`]; GSIs allocated so far are released.
    pub fn new(vm: Arc<VmFd>, router: SharedGsiRouter, count: u32) -> Result<Self> {
        let group = MsiInterruptGroup {
            vm,
            router,
            state: Mutex::new(MsiState {
                enabled: true,
                vectors: Vec::new(),
            }),
        };
        {
            let mut state = lock(&group.state);
            for _ in 0..count {
                // Create the fd first so a failure leaves no GSI behind.
                let fd = new_eventfd()?;
                let gsi = lock(&group.router).allocate()?;
                state.vectors.push(MsiVector {
                    gsi,
                    fd,
                    route: None,
                    masked: true,
                    registered: false,
                    pending: false,
                });
            }
        }
        Ok(group)
    }

    /// Number of vectors.
    pub fn len(&self) -> u32 {
        lock(&self.state).vectors.len() as u32
    }

    /// True if the group has no vectors.
    pub fn is_empty(&self) -> bool {
        lock(&self.state).vectors.is_empty()
    }

    /// The GSI of vector `index`.
    pub fn gsi(&self, index: InterruptIndex) -> Option<u32> {
        lock(&self.state).vectors.get(index as usize).map(|v| v.gsi)
    }

    /// Duplicates of every vector's eventfd, in vector order (to bind them to a device).
    ///
    /// # Errors
    ///
    /// [`Error::EventFd`] if `dup` fails.
    pub fn notifiers(&self) -> Result<Vec<EventFd>> {
        lock(&self.state)
            .vectors
            .iter()
            .map(|v| v.fd.try_clone().map_err(Error::EventFd))
            .collect()
    }

    /// Stages vector `index`'s MSI route (`None` removes it) in the shared router. Nothing
    /// reaches KVM until the router is committed ([`InterruptSourceGroup::set_gsi`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIndex`], or the router's errors.
    pub fn set_route(
        &self,
        index: InterruptIndex,
        config: Option<MsiIrqSourceConfig>,
    ) -> Result<()> {
        let mut state = lock(&self.state);
        let v = vector(&mut state, index)?;
        self.stage_route(v, config)
    }

    /// The route last staged for vector `index`.
    pub fn route(&self, index: InterruptIndex) -> Option<MsiIrqSourceConfig> {
        lock(&self.state)
            .vectors
            .get(index as usize)
            .and_then(|v| v.route)
    }

    /// Masks or unmasks vector `index` (see [pending events](Self#pending-events)).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIndex`], [`Error::Kvm`], [`Error::EventFd`].
    pub fn set_masked(&self, index: InterruptIndex, masked: bool) -> Result<()> {
        let mut state = lock(&self.state);
        let enabled = state.enabled;
        let v = vector(&mut state, index)?;
        v.masked = masked;
        if masked || !enabled {
            self.go_dead(v)
        } else {
            self.go_live(v)
        }
    }

    /// Whether vector `index` is masked (per vector; see also [`Self::is_enabled`]).
    pub fn is_masked(&self, index: InterruptIndex) -> Option<bool> {
        lock(&self.state)
            .vectors
            .get(index as usize)
            .map(|v| v.masked)
    }

    /// Whether the group is enabled.
    pub fn is_enabled(&self) -> bool {
        lock(&self.state).enabled
    }

    /// Whether vector `index`'s eventfd is currently a registered irqfd.
    pub fn is_registered(&self, index: InterruptIndex) -> Option<bool> {
        lock(&self.state)
            .vectors
            .get(index as usize)
            .map(|v| v.registered)
    }

    /// Whether vector `index` has an event waiting for its unmask (its PBA bit). Drains the
    /// eventfd of a masked vector into the pending flag; a live vector is never pending.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIndex`], [`Error::EventFd`].
    pub fn is_pending(&self, index: InterruptIndex) -> Result<bool> {
        let mut state = lock(&self.state);
        let v = vector(&mut state, index)?;
        if !v.registered && drain(&v.fd)? > 0 {
            v.pending = true;
        }
        Ok(v.pending)
    }

    /// Forgets a pending event of vector `index` (e.g. on device reset).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIndex`], [`Error::EventFd`].
    pub fn clear_pending(&self, index: InterruptIndex) -> Result<()> {
        let mut state = lock(&self.state);
        let v = vector(&mut state, index)?;
        if !v.registered {
            drain(&v.fd)?;
        }
        v.pending = false;
        Ok(())
    }

    fn stage_route(&self, v: &mut MsiVector, config: Option<MsiIrqSourceConfig>) -> Result<()> {
        let mut router = lock(&self.router);
        match config {
            Some(c) => router.set_route(
                v.gsi,
                Route::Msi {
                    address: c.address(),
                    data: c.data,
                    devid: (c.devid != 0).then_some(c.devid),
                },
            )?,
            None => router.remove(v.gsi),
        }
        v.route = config;
        Ok(())
    }

    fn go_live(&self, v: &mut MsiVector) -> Result<()> {
        if v.registered {
            return Ok(());
        }
        // Events of the masked period: drain so KVM sees a zero counter on registration and
        // does not inject by itself; we inject once below.
        if drain(&v.fd)? > 0 {
            v.pending = true;
        }
        self.vm
            .register_irqfd(&v.fd, v.gsi)
            .map_err(kvm_err("KVM_IRQFD"))?;
        v.registered = true;
        if v.pending {
            v.pending = false;
            // Through the irqfd: one injection on the (already committed) route.
            v.fd.write(1).map_err(Error::EventFd)?;
        }
        Ok(())
    }

    fn go_dead(&self, v: &mut MsiVector) -> Result<()> {
        if !v.registered {
            return Ok(());
        }
        // Drain before deassigning: whatever is in the counter now was delivered by KVM.
        drain(&v.fd)?;
        self.vm
            .unregister_irqfd(&v.fd, v.gsi)
            .map_err(kvm_err("KVM_IRQFD(DEASSIGN)"))?;
        v.registered = false;
        Ok(())
    }
}

fn vector(state: &mut MsiState, index: InterruptIndex) -> Result<&mut MsiVector> {
    state
        .vectors
        .get_mut(index as usize)
        .ok_or(Error::InvalidIndex {
            what: "MSI vector",
            index,
        })
}

impl InterruptSourceGroup for MsiInterruptGroup {
    fn enable(&self) -> Result<()> {
        let mut state = lock(&self.state);
        state.enabled = true;
        for v in state.vectors.iter_mut().filter(|v| !v.masked) {
            self.go_live(v)?;
        }
        Ok(())
    }

    fn disable(&self) -> Result<()> {
        let mut state = lock(&self.state);
        state.enabled = false;
        for v in state.vectors.iter_mut() {
            self.go_dead(v)?;
        }
        Ok(())
    }

    fn trigger(&self, index: InterruptIndex) -> Result<()> {
        let mut state = lock(&self.state);
        vector(&mut state, index)?
            .fd
            .write(1)
            .map_err(Error::EventFd)
    }

    fn notifier(&self, index: InterruptIndex) -> Option<EventFd> {
        lock(&self.state)
            .vectors
            .get(index as usize)
            .and_then(|v| v.fd.try_clone().ok())
    }

    fn update(
        &self,
        index: InterruptIndex,
        config: InterruptSourceConfig,
        masked: bool,
        set_gsi: bool,
    ) -> Result<()> {
        let InterruptSourceConfig::MsiIrq(config) = config else {
            return Err(Error::InvalidArgument(
                "an MSI group takes only MSI routes".into(),
            ));
        };
        let mut state = lock(&self.state);
        let enabled = state.enabled;
        let v = vector(&mut state, index)?;
        v.masked = masked;
        // Deassign before the route changes under a masked vector.
        if masked || !enabled {
            self.go_dead(v)?;
        }
        self.stage_route(v, Some(config))?;
        if set_gsi {
            lock(&self.router).commit()?;
        }
        // Assign only after the route is committed.
        if !masked && enabled {
            self.go_live(v)?;
        }
        Ok(())
    }

    fn set_gsi(&self) -> Result<()> {
        lock(&self.router).commit()
    }
}

impl Drop for MsiInterruptGroup {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        let mut router = lock(&self.router);
        let had_routes = state.vectors.iter().any(|v| v.route.is_some());
        for v in state.vectors.iter_mut() {
            // Deassign before the route goes away.
            if v.registered {
                if let Err(e) = self.vm.unregister_irqfd(&v.fd, v.gsi) {
                    log::warn!(
                        "irqbridge-kvm: deassigning irqfd on GSI {} failed: {e}",
                        v.gsi
                    );
                }
                v.registered = false;
            }
            router.free(v.gsi);
        }
        if had_routes && let Err(e) = router.commit() {
            log::warn!("irqbridge-kvm: committing routes after freeing MSI GSIs failed: {e}");
        }
    }
}

/// A level-triggered INTx line on one GSI.
///
/// - [`IrqChip::Full`]: the trigger eventfd is an irqfd registered with
///   `KVM_IRQFD_FLAG_RESAMPLE` together with a resample eventfd. A trigger write *asserts* the
///   GSI (it stays asserted, it is not a pulse); on the guest's EOI of the pin KVM first
///   de-asserts it, then signals the resample eventfd. Whoever owns the line (the device, via
///   its INTx UNMASK eventfd) re-triggers if it still needs service. One resampler is shared
///   by every resample irqfd on the GSI, so with shared lines resample signals are spurious
///   for all but one device: the device must tolerate them.
/// - [`IrqChip::Split`]: KVM refuses resample (EINVAL), the trigger is a plain irqfd on the
///   GSI's route (an MSI route the VMM's userspace IOAPIC maintains) and the VMM reports EOIs
///   to the device itself.
pub struct LegacyInterruptGroup {
    vm: Arc<VmFd>,
    router: SharedGsiRouter,
    gsi: u32,
    chip: IrqChip,
    trigger: EventFd,
    resample: Option<EventFd>,
    registered: Mutex<bool>,
}

impl fmt::Debug for LegacyInterruptGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LegacyInterruptGroup")
            .field("gsi", &self.gsi)
            .field("chip", &self.chip)
            .field("trigger", &self.trigger.as_raw_fd())
            .field("resample", &self.resample.as_ref().map(|r| r.as_raw_fd()))
            .field("registered", &*lock(&self.registered))
            .finish()
    }
}

impl LegacyInterruptGroup {
    /// Creates the trigger (and, with the full irqchip, resample) eventfds for `gsi`. Nothing
    /// is registered until [`InterruptSourceGroup::enable`].
    ///
    /// # Errors
    ///
    /// [`Error::EventFd`].
    pub fn new(vm: Arc<VmFd>, router: SharedGsiRouter, gsi: u32) -> Result<Self> {
        let chip = lock(&router).irqchip();
        let resample = match chip {
            IrqChip::Full => Some(new_eventfd()?),
            IrqChip::Split => None,
        };
        Ok(LegacyInterruptGroup {
            vm,
            router,
            gsi,
            chip,
            trigger: new_eventfd()?,
            resample,
            registered: Mutex::new(false),
        })
    }

    /// The GSI of the line.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The irqchip model (decides resample or not).
    pub fn irqchip(&self) -> IrqChip {
        self.chip
    }

    /// A duplicate of the resample eventfd, signalled by KVM after the guest EOIs the line
    /// (full irqchip only). Hand it to the device as its INTx UNMASK eventfd.
    pub fn resample_notifier(&self) -> Option<EventFd> {
        self.resample.as_ref().and_then(|r| r.try_clone().ok())
    }

    /// Whether the trigger eventfd is currently a registered irqfd.
    pub fn is_registered(&self) -> bool {
        *lock(&self.registered)
    }

    fn register(&self, registered: &mut bool) -> Result<()> {
        if *registered {
            return Ok(());
        }
        match &self.resample {
            // Resample needs the full in-kernel irqchip; KVM checks that and fails with EINVAL.
            Some(resample) => self
                .vm
                .register_irqfd_with_resample(&self.trigger, resample, self.gsi)
                .map_err(kvm_err("KVM_IRQFD(RESAMPLE)"))?,
            None => self
                .vm
                .register_irqfd(&self.trigger, self.gsi)
                .map_err(kvm_err("KVM_IRQFD"))?,
        }
        *registered = true;
        Ok(())
    }

    fn unregister(&self, registered: &mut bool) -> Result<()> {
        if !*registered {
            return Ok(());
        }
        // DEASSIGN with the same fd and GSI also drops the resampler of a resample irqfd
        // (and de-asserts the line it held).
        self.vm
            .unregister_irqfd(&self.trigger, self.gsi)
            .map_err(kvm_err("KVM_IRQFD(DEASSIGN)"))?;
        *registered = false;
        Ok(())
    }

    fn check_index(index: InterruptIndex) -> Result<()> {
        if index == 0 {
            Ok(())
        } else {
            Err(Error::InvalidIndex {
                what: "INTx source",
                index,
            })
        }
    }
}

impl InterruptSourceGroup for LegacyInterruptGroup {
    fn enable(&self) -> Result<()> {
        self.register(&mut lock(&self.registered))
    }

    fn disable(&self) -> Result<()> {
        self.unregister(&mut lock(&self.registered))
    }

    fn trigger(&self, index: InterruptIndex) -> Result<()> {
        Self::check_index(index)?;
        self.trigger.write(1).map_err(Error::EventFd)
    }

    fn notifier(&self, index: InterruptIndex) -> Option<EventFd> {
        if index != 0 {
            return None;
        }
        self.trigger.try_clone().ok()
    }

    /// With the full irqchip the GSI's IRQCHIP routes are fixed: `LegacyIrq` must name one of
    /// them. With a split irqchip the VMM's IOAPIC passes the pin's `MsiIrq` route.
    fn update(
        &self,
        index: InterruptIndex,
        config: InterruptSourceConfig,
        masked: bool,
        set_gsi: bool,
    ) -> Result<()> {
        Self::check_index(index)?;
        let mut registered = lock(&self.registered);
        if masked {
            // Deassign before the route changes.
            self.unregister(&mut registered)?;
        }
        {
            let mut router = lock(&self.router);
            match config {
                InterruptSourceConfig::LegacyIrq(c) => {
                    let wanted = Route::Irqchip {
                        irqchip: c.irqchip,
                        pin: c.pin,
                    };
                    if !router.routes(self.gsi).contains(&wanted) {
                        return Err(Error::InvalidArgument(format!(
                            "GSI {} has no route to irqchip {} pin {}",
                            self.gsi, c.irqchip, c.pin
                        )));
                    }
                }
                InterruptSourceConfig::MsiIrq(c) => router.set_route(
                    self.gsi,
                    Route::Msi {
                        address: c.address(),
                        data: c.data,
                        devid: (c.devid != 0).then_some(c.devid),
                    },
                )?,
            }
            if set_gsi {
                router.commit()?;
            }
        }
        if !masked {
            self.register(&mut registered)?;
        }
        Ok(())
    }

    fn set_gsi(&self) -> Result<()> {
        lock(&self.router).commit()
    }
}

impl Drop for LegacyInterruptGroup {
    fn drop(&mut self) {
        let mut registered = lock(&self.registered);
        if let Err(e) = self.unregister(&mut registered) {
            log::warn!(
                "irqbridge-kvm: deassigning INTx irqfd on GSI {} failed: {e}",
                self.gsi
            );
        }
    }
}
