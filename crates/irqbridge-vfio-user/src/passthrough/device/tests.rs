// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of the passthrough device on a fake VFIO backend that behaves like the kernel's
//! vfio-pci where it matters: one IRQ index at a time, per-vector rebinding inside the enabled
//! range, and a "device" that signals whatever eventfd is bound to a vector.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::*;
use crate::device::{IrqAction, IrqData};
use crate::dma::DmaTable;
use crate::passthrough::config::tests::image;
use crate::passthrough::vfio::IrqSet;
use crate::passthrough::vfio::{HostIrq, HostRegion, VfioDevice};
use crate::proto::{
    DmaMapRequest, VFIO_DEVICE_FLAGS_PCI, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
};

#[derive(Debug, Default)]
struct FakeState {
    config: Vec<u8>,
    bars: Vec<Vec<u8>>,
    /// The enabled index and the fds bound to its vectors.
    enabled: Option<(u32, Vec<RawFd>)>,
    intx_unmask: Option<RawFd>,
    /// Every SET_IRQS: (index, flags, start, count, fds).
    calls: Vec<(u32, u32, u32, u32, Vec<RawFd>)>,
    config_writes: Vec<(u64, Vec<u8>)>,
    bar_writes: Vec<(u32, u64, Vec<u8>)>,
    dma: Vec<(u64, u64, u64, u32)>,
    unmaps: Vec<(u64, u64)>,
    resets: u32,
}

#[derive(Debug, Clone)]
struct FakeVfio {
    st: Arc<Mutex<FakeState>>,
    flags: u32,
}

const REGION_SIZES: [u64; 9] = [0x4000, 0, 32, 0x10_0000, 0, 0, 0, 256, 0];

impl FakeVfio {
    fn new() -> FakeVfio {
        let (cfg, _) = image();
        FakeVfio {
            st: Arc::new(Mutex::new(FakeState {
                config: cfg,
                bars: REGION_SIZES[..6]
                    .iter()
                    .map(|s| vec![0u8; *s as usize])
                    .collect(),
                ..Default::default()
            })),
            flags: VFIO_DEVICE_FLAGS_PCI,
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.st.lock().unwrap()
    }

    /// The device raises vector `v` of the enabled index: the kernel signals the bound fd.
    fn fire(&self, v: usize) {
        let fd = self
            .st()
            .enabled
            .as_ref()
            .and_then(|(_, fds)| fds.get(v).copied())
            .unwrap_or(-1);
        if fd >= 0 {
            signal(fd);
        }
    }

    fn bound(&self, v: usize) -> RawFd {
        self.st()
            .enabled
            .as_ref()
            .and_then(|(_, fds)| fds.get(v).copied())
            .unwrap_or(-1)
    }

    fn enabled_index(&self) -> Option<u32> {
        self.st().enabled.as_ref().map(|(i, _)| *i)
    }
}

fn signal(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a live buffer to an eventfd the test keeps open.
    let r = unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
    assert_eq!(r, 8, "eventfd write");
}

fn einval() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EINVAL)
}

impl VfioBackend for FakeVfio {
    fn device_flags(&self) -> u32 {
        self.flags
    }
    fn region(&self, index: u32) -> Option<HostRegion> {
        let size = *REGION_SIZES.get(index as usize)?;
        let mmap = if index == 0 || index == 3 {
            VFIO_REGION_INFO_FLAG_MMAP
        } else {
            0
        };
        Some(HostRegion {
            flags: if size > 0 {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | mmap
            } else {
                0
            },
            size,
            offset: u64::from(index) << 40,
        })
    }
    fn irq(&self, index: u32) -> Option<HostIrq> {
        let (flags, count) = match index {
            0 => (VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | 4, 1),
            1 => (VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE, 4),
            2 => (VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE, 5),
            3 | 4 => (VFIO_IRQ_INFO_EVENTFD, 1),
            _ => return None,
        };
        Some(HostIrq { flags, count })
    }
    fn read(&self, index: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let st = self.st();
        let src = if index == 7 {
            &st.config
        } else {
            st.bars.get(index as usize).ok_or_else(einval)?
        };
        let o = offset as usize;
        data.copy_from_slice(src.get(o..o + data.len()).ok_or_else(einval)?);
        Ok(())
    }
    fn write(&self, index: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut st = self.st();
        let o = offset as usize;
        if index == 7 {
            st.config_writes.push((offset, data.to_vec()));
            // Only COMMAND reaches the fake's config (enough for these tests).
            if o >= 4 && o + data.len() <= 6 {
                st.config[o..o + data.len()].copy_from_slice(data);
            }
            return Ok(());
        }
        st.bar_writes.push((index, offset, data.to_vec()));
        let bar = st.bars.get_mut(index as usize).ok_or_else(einval)?;
        bar.get_mut(o..o + data.len())
            .ok_or_else(einval)?
            .copy_from_slice(data);
        Ok(())
    }
    fn set_irqs(&self, set: &IrqSet<'_>) -> std::io::Result<()> {
        let IrqSet {
            index,
            flags,
            start,
            count,
            fds,
        } = *set;
        let mut st = self.st();
        st.calls.push((index, flags, start, count, fds.to_vec()));
        let data = flags & 7;
        let action = flags & 0x38;
        let (s, c) = (start as usize, count as usize);
        match (action, data) {
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) if count == 0 => {
                if st.enabled.as_ref().is_some_and(|(i, _)| *i == index) {
                    st.enabled = None;
                    if index == 0 {
                        st.intx_unmask = None;
                    }
                }
                Ok(())
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD) => match &mut st.enabled {
                None => {
                    let mut v = vec![-1; s];
                    v.extend_from_slice(fds);
                    st.enabled = Some((index, v));
                    Ok(())
                }
                Some((i, _)) if *i != index => Err(einval()),
                Some((_, bound)) => {
                    let dst = bound.get_mut(s..s + c).ok_or_else(einval)?;
                    dst.copy_from_slice(fds);
                    Ok(())
                }
            },
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) => {
                let Some((i, bound)) = &st.enabled else {
                    return Err(einval());
                };
                if *i != index {
                    return Err(einval());
                }
                for fd in bound.get(s..s + c).ok_or_else(einval)? {
                    if *fd >= 0 {
                        signal(*fd);
                    }
                }
                Ok(())
            }
            (VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD) if index == 0 => {
                if !matches!(st.enabled, Some((0, _))) {
                    return Err(einval());
                }
                st.intx_unmask = fds.first().copied().filter(|f| *f >= 0);
                Ok(())
            }
            (_, VFIO_IRQ_SET_DATA_NONE) if index == 0 => {
                if !matches!(st.enabled, Some((0, _))) {
                    return Err(einval());
                }
                Ok(())
            }
            _ => Err(std::io::Error::from_raw_os_error(libc::ENOTTY)),
        }
    }
    fn dma_map(&self, vaddr: u64, iova: u64, size: u64, flags: u32) -> std::io::Result<()> {
        self.st().dma.push((vaddr, iova, size, flags));
        Ok(())
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> std::io::Result<()> {
        self.st().unmaps.push((iova, size));
        Ok(())
    }
    fn reset(&self) -> std::io::Result<()> {
        self.st().resets += 1;
        Ok(())
    }
    fn mmap_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

fn device(opts: PassthroughOptions) -> (PassthroughDevice<FakeVfio>, FakeVfio) {
    let fake = FakeVfio::new();
    let dev = PassthroughDevice::new(fake.clone(), opts).unwrap();
    (dev, fake)
}

fn efd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

fn count(e: &EventFd) -> u64 {
    e.read().unwrap_or(0)
}

fn bind(dev: &mut PassthroughDevice<FakeVfio>, index: u32, fds: &[&EventFd]) {
    dev.set_irqs(SetIrqs {
        index,
        action: IrqAction::Trigger,
        start: 0,
        count: fds.len() as u32,
        data: IrqData::Eventfds(fds.iter().map(|e| Some(e.try_clone().unwrap())).collect()),
    })
    .unwrap();
}

/// Runs the server loop's part: every catcher that is readable is handed to the device.
fn poll_once(dev: &mut PassthroughDevice<FakeVfio>) -> usize {
    let tokens: Vec<u64> = dev
        .poll_fds()
        .iter()
        .filter(|(fd, _)| {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one live pollfd, no wait.
            unsafe { libc::poll(&mut p, 1, 0) == 1 }
        })
        .map(|(_, t)| *t)
        .collect();
    for t in &tokens {
        dev.handle_fd_event(*t);
    }
    tokens.len()
}

const MSIX_BAR: u32 = 3;

fn table_ctrl(dev: &mut PassthroughDevice<FakeVfio>, v: u64, masked: bool) {
    dev.region_write(MSIX_BAR, v * 16 + 12, &u32::from(masked).to_le_bytes())
        .unwrap();
}

fn pba(dev: &mut PassthroughDevice<FakeVfio>) -> u64 {
    let mut b = [0u8; 8];
    dev.region_read(MSIX_BAR, 0x2000, &mut b).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn device_is_send() {
    fn send<T: Send>() {}
    send::<PassthroughDevice<VfioDevice>>();
    send::<PassthroughDevice<FakeVfio>>();
}

#[test]
fn msix_vectors_go_straight_to_the_client_and_the_server_sleeps() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    let fds: Vec<EventFd> = (0..5).map(|_| efd()).collect();
    bind(&mut dev, 2, &fds.iter().collect::<Vec<_>>());
    assert_eq!(fake.enabled_index(), Some(2));
    for v in 0..5 {
        let client = dev.msix_vectors[v].client.as_ref().unwrap().as_raw_fd();
        assert_eq!(
            fake.bound(v),
            client,
            "the kernel signals the client's eventfd"
        );
    }
    // 1000 unmasked interrupts: all reach the client fds, the server has nothing to poll.
    for i in 0..1000 {
        fake.fire(i % 5);
    }
    assert!(
        dev.poll_fds().is_empty(),
        "no server fd while every vector is unmasked"
    );
    assert_eq!(fds.iter().map(count).sum::<u64>(), 1000);
    assert_eq!(dev.stats().caught, 0);
}

#[test]
fn masked_vector_goes_pending_and_delivers_exactly_once_on_unmask() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    let fds: Vec<EventFd> = (0..5).map(|_| efd()).collect();
    bind(&mut dev, 2, &fds.iter().collect::<Vec<_>>());
    let client1 = fake.bound(1);

    table_ctrl(&mut dev, 1, true);
    assert_ne!(
        fake.bound(1),
        client1,
        "masked: the kernel signals a server fd"
    );
    assert_eq!(dev.poll_fds().len(), 1);
    for _ in 0..3 {
        fake.fire(1);
    }
    fake.fire(0);
    assert_eq!(count(&fds[1]), 0, "nothing reaches the client while masked");
    assert_eq!(count(&fds[0]), 1, "other vectors unaffected");
    assert_eq!(poll_once(&mut dev), 1);
    assert_eq!(pba(&mut dev), 1 << 1, "pending bit set");
    // More events while masked, not yet seen by the loop: still one pending bit.
    fake.fire(1);
    fake.fire(1);
    table_ctrl(&mut dev, 1, false);
    assert_eq!(fake.bound(1), client1, "unmasked: the client's fd is back");
    assert_eq!(count(&fds[1]), 1, "exactly one delivery on unmask");
    assert_eq!(pba(&mut dev), 0);
    assert!(dev.poll_fds().is_empty());
    fake.fire(1);
    assert_eq!(count(&fds[1]), 1);
    // Mask and unmask with nothing in between: nothing delivered.
    table_ctrl(&mut dev, 1, true);
    table_ctrl(&mut dev, 1, false);
    assert_eq!(count(&fds[1]), 0);
    assert_eq!(
        dev.stats().pending_delivered,
        0,
        "MSI-X deliveries are the model's"
    );
}

#[test]
fn function_mask_catches_every_vector() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    let fds: Vec<EventFd> = (0..5).map(|_| efd()).collect();
    bind(&mut dev, 2, &fds.iter().collect::<Vec<_>>());
    // MSI-X cap at 0x70: Message Control at 0x72; Enable | Function Mask.
    dev.region_write(7, 0x72, &0xc000u16.to_le_bytes()).unwrap();
    assert_eq!(dev.poll_fds().len(), 5);
    assert!(
        fake.st().config_writes.is_empty(),
        "MSI-X control never reaches the host"
    );
    fake.fire(0);
    fake.fire(2);
    fake.fire(2);
    assert_eq!(fds.iter().map(count).sum::<u64>(), 0);
    let mut b = [0u8; 2];
    dev.region_read(7, 0x72, &mut b).unwrap();
    assert_eq!(u16::from_le_bytes(b), 0xc004);
    dev.region_write(7, 0x72, &0x8000u16.to_le_bytes()).unwrap();
    let got: Vec<u64> = fds.iter().map(count).collect();
    assert_eq!(got, vec![1, 0, 1, 0, 0]);
    assert!(dev.poll_fds().is_empty());
}

#[test]
fn host_mask_and_unmask_messages() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    let fds: Vec<EventFd> = (0..5).map(|_| efd()).collect();
    bind(&mut dev, 2, &fds.iter().collect::<Vec<_>>());
    let req = |action| SetIrqs {
        index: 2,
        action,
        start: 3,
        count: 1,
        data: IrqData::None,
    };
    dev.set_irqs(req(IrqAction::Mask)).unwrap();
    fake.fire(3);
    assert_eq!(count(&fds[3]), 0);
    dev.set_irqs(req(IrqAction::Unmask)).unwrap();
    assert_eq!(count(&fds[3]), 1);
    // MSI has no MASK.
    let e = dev.set_irqs(SetIrqs {
        index: 1,
        action: IrqAction::Mask,
        start: 0,
        count: 1,
        data: IrqData::None,
    });
    assert_eq!(e, Err(libc::ENOTTY));
}

#[test]
fn loopback_triggers_reach_the_kernel_in_runs() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    let fds: Vec<EventFd> = (0..5).map(|_| efd()).collect();
    bind(&mut dev, 2, &fds.iter().collect::<Vec<_>>());
    let before = fake.st().calls.len();
    dev.set_irqs(SetIrqs {
        index: 2,
        action: IrqAction::Trigger,
        start: 0,
        count: 5,
        data: IrqData::Bool(vec![true, false, true, true, false]),
    })
    .unwrap();
    let calls: Vec<(u32, u32)> = fake.st().calls[before..]
        .iter()
        .map(|c| (c.2, c.3))
        .collect();
    assert_eq!(calls, vec![(0, 1), (2, 2)]);
    assert_eq!(
        fds.iter().map(count).collect::<Vec<_>>(),
        vec![1, 0, 1, 1, 0]
    );
    // Past the table: refused before anything reaches the kernel.
    let e = dev.set_irqs(SetIrqs {
        index: 2,
        action: IrqAction::Trigger,
        start: 4,
        count: 2,
        data: IrqData::None,
    });
    assert_eq!(e, Err(libc::EINVAL));
    assert_eq!(fake.st().calls.len(), before + 2);
    // ERR: a DATA_BOOL loopback that selects nothing reaches nothing.
    dev.set_irqs(SetIrqs {
        index: 3,
        action: IrqAction::Trigger,
        start: 0,
        count: 1,
        data: IrqData::Bool(vec![false]),
    })
    .unwrap();
    assert_eq!(fake.st().calls.len(), before + 2, "nothing selected");
}

#[test]
fn rebinding_while_masked_keeps_the_server_fd_in_the_kernel() {
    // QEMU masks by swapping its fd; a swap on a vector the table masks must not unmask it.
    let (mut dev, fake) = device(PassthroughOptions::default());
    let fds: Vec<EventFd> = (0..5).map(|_| efd()).collect();
    bind(&mut dev, 2, &fds.iter().collect::<Vec<_>>());
    dev.set_irqs(SetIrqs {
        index: 2,
        action: IrqAction::Mask,
        start: 4,
        count: 1,
        data: IrqData::None,
    })
    .unwrap();
    let other = efd();
    dev.set_irqs(SetIrqs {
        index: 2,
        action: IrqAction::Trigger,
        start: 4,
        count: 1,
        data: IrqData::Eventfds(vec![Some(other.try_clone().unwrap())]),
    })
    .unwrap();
    fake.fire(4);
    assert_eq!(count(&other), 0);
    assert_eq!(poll_once(&mut dev), 1);
    dev.set_irqs(SetIrqs {
        index: 2,
        action: IrqAction::Unmask,
        start: 4,
        count: 1,
        data: IrqData::None,
    })
    .unwrap();
    assert_eq!(count(&other), 1);
    assert_eq!(count(&fds[4]), 0);
}

#[test]
fn intx_fds_go_to_the_kernel_and_exclude_msi() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    let trigger = efd();
    let unmask = efd();
    dev.set_irqs(SetIrqs {
        index: 0,
        action: IrqAction::Trigger,
        start: 0,
        count: 1,
        data: IrqData::Eventfds(vec![Some(trigger.try_clone().unwrap())]),
    })
    .unwrap();
    dev.set_irqs(SetIrqs {
        index: 0,
        action: IrqAction::Unmask,
        start: 0,
        count: 1,
        data: IrqData::Eventfds(vec![Some(unmask.try_clone().unwrap())]),
    })
    .unwrap();
    for action in [IrqAction::Mask, IrqAction::Unmask] {
        dev.set_irqs(SetIrqs {
            index: 0,
            action,
            start: 0,
            count: 1,
            data: IrqData::None,
        })
        .unwrap();
    }
    {
        let st = fake.st();
        let calls: Vec<(u32, u32)> = st.calls.iter().map(|c| (c.0, c.1)).collect();
        assert_eq!(
            calls,
            vec![(0, 0x24), (0, 0x14), (0, 0x09), (0, 0x11)],
            "TRIGGER|EVENTFD, UNMASK|EVENTFD, MASK|NONE, UNMASK|NONE"
        );
        assert_eq!(
            st.calls[0].4[0],
            dev.intx_trigger.as_ref().unwrap().as_raw_fd()
        );
        assert!(st.intx_unmask.is_some());
    }
    assert!(
        dev.poll_fds().is_empty(),
        "the server polls nothing for INTx"
    );
    // MSI-X while INTx is on: EINVAL, like the kernel; after disabling INTx it works.
    let v = efd();
    let e = dev.set_irqs(SetIrqs {
        index: 2,
        action: IrqAction::Trigger,
        start: 0,
        count: 1,
        data: IrqData::Eventfds(vec![Some(v.try_clone().unwrap())]),
    });
    assert_eq!(e, Err(libc::EINVAL));
    dev.set_irqs(SetIrqs {
        index: 0,
        action: IrqAction::Trigger,
        start: 0,
        count: 0,
        data: IrqData::None,
    })
    .unwrap();
    assert_eq!(fake.enabled_index(), None);
    bind(&mut dev, 2, &[&v]);
    assert_eq!(fake.enabled_index(), Some(2));
    assert_eq!(
        fake.st().enabled.as_ref().unwrap().1.len(),
        5,
        "MSI-X is enabled with the whole table"
    );
    // MASK with an eventfd is not a thing for INTx.
    let e = dev.set_irqs(SetIrqs {
        index: 0,
        action: IrqAction::Mask,
        start: 0,
        count: 1,
        data: IrqData::Eventfds(vec![Some(efd())]),
    });
    assert_eq!(e, Err(libc::ENOTTY));
}

#[test]
fn msi_mask_bits_are_virtual_with_exactly_once_pending() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    let m = efd();
    bind(&mut dev, 1, &[&m]);
    assert_eq!(fake.enabled_index(), Some(1));
    fake.fire(0);
    assert_eq!(count(&m), 1);
    // MSI cap at 0x50 (64-bit, PVM): mask bits at 0x60, pending at 0x64.
    dev.region_write(7, 0x60, &1u32.to_le_bytes()).unwrap();
    fake.fire(0);
    fake.fire(0);
    assert_eq!(count(&m), 0);
    let mut b = [0u8; 4];
    dev.region_read(7, 0x64, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 1, "pending bit");
    dev.region_write(7, 0x60, &0u32.to_le_bytes()).unwrap();
    assert_eq!(count(&m), 1, "exactly once");
    dev.region_read(7, 0x64, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0);
    assert_eq!(dev.stats().pending_delivered, 1);
    // Binding a second vector grows the enabled range: disable + enable with 2.
    let m2 = efd();
    dev.set_irqs(SetIrqs {
        index: 1,
        action: IrqAction::Trigger,
        start: 1,
        count: 1,
        data: IrqData::Eventfds(vec![Some(m2.try_clone().unwrap())]),
    })
    .unwrap();
    assert_eq!(fake.st().enabled.as_ref().unwrap().1.len(), 2);
    fake.fire(1);
    assert_eq!(count(&m2), 1);
}

#[test]
fn msi_registers_have_the_models_write_masks() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    let rd = |dev: &mut PassthroughDevice<FakeVfio>, off: u64| {
        let mut b = [0u8; 4];
        dev.region_read(7, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    // MSI cap at 0x50: 64-bit, PVM, 4 vectors. Address bits 1:0 read 0, the upper
    // address is whole, data is 16 bits, 4 mask bits exist, pending bits are read-only.
    for (off, v) in [
        (0x54, 0x1234_5677u32),
        (0x58, 0xaabb_ccdd),
        (0x5c, 0xffff_4321),
        (0x60, u32::MAX),
        (0x64, u32::MAX),
    ] {
        dev.region_write(7, off, &v.to_le_bytes()).unwrap();
    }
    assert_eq!(
        [0x54, 0x58, 0x5c, 0x60, 0x64].map(|o| rd(&mut dev, o)),
        [0x1234_5674, 0xaabb_ccdd, 0x4321, 0xf, 0]
    );
    // Message Control: the host's bits, Enable and MME as the guest wrote them.
    dev.region_write(7, 0x52, &[0x21]).unwrap();
    assert_eq!(rd(&mut dev, 0x50) >> 16, 0x180 | (2 << 1) | 0x21);
    assert!(fake.st().config_writes.is_empty());
    // Reset: all of it back to power-on.
    dev.reset().unwrap();
    assert_eq!(
        [0x50, 0x54, 0x58, 0x5c, 0x60].map(|o| rd(&mut dev, o)),
        [0x0184_7005, 0, 0, 0, 0]
    );
}

#[test]
fn config_space_virtual_and_host_parts() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    let rd = |dev: &mut PassthroughDevice<FakeVfio>, off: u64| {
        let mut b = [0u8; 4];
        dev.region_read(7, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    assert_eq!(rd(&mut dev, 0), 0x11e8_1234);
    // BAR sizing from the virtual copy; nothing reaches the host.
    dev.region_write(7, 0x1c, &u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(rd(&mut dev, 0x1c), 0xfff0_0000);
    assert!(fake.st().config_writes.is_empty());
    // COMMAND reaches the host.
    dev.region_write(7, 4, &0x0406u16.to_le_bytes()).unwrap();
    assert_eq!(fake.st().config_writes, vec![(4, vec![0x06, 0x04])]);
    assert_eq!(rd(&mut dev, 4) & 0xffff, 0x0406);
    // A dword over the PM cap header (virtual) and PMC (host): split.
    dev.region_write(7, 0x40, &0xffff_ffffu32.to_le_bytes())
        .unwrap();
    assert_eq!(
        fake.st().config_writes.last().unwrap(),
        &(0x42, vec![0xff, 0xff])
    );
    assert_eq!(rd(&mut dev, 0x40) & 0xffff, 0x5001);
    // Past the end of config space.
    let mut b = [0u8; 4];
    assert_eq!(dev.region_read(7, 254, &mut b), Err(libc::EINVAL));
}

#[test]
fn bar_accesses_are_trapped_and_checked() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    dev.region_write(0, 0x10, &0xdead_beefu32.to_le_bytes())
        .unwrap();
    let mut b = [0u8; 4];
    dev.region_read(0, 0x10, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
    assert_eq!(fake.st().bar_writes.len(), 1);
    // Past the BAR.
    assert_eq!(dev.region_read(0, 0x3ffe, &mut b), Err(libc::EINVAL));
    assert_eq!(dev.region_write(0, u64::MAX - 1, &b), Err(libc::EINVAL));
    // Table: virtual, 4/8-byte aligned only.
    dev.region_write(MSIX_BAR, 16 + 8, &0x1234u32.to_le_bytes())
        .unwrap();
    dev.region_read(MSIX_BAR, 16 + 8, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x1234);
    assert_eq!(
        fake.st().bar_writes.len(),
        1,
        "table writes stay in the server"
    );
    assert_eq!(dev.region_write(MSIX_BAR, 2, &[0, 0]), Err(libc::EINVAL));
    assert_eq!(dev.region_read(MSIX_BAR, 0x4e, &mut b), Err(libc::EINVAL));
    // PBA: read-only.
    assert_eq!(
        dev.region_write(MSIX_BAR, 0x2000, &[0; 8]),
        Err(libc::EINVAL)
    );
    // Past the table, inside the BAR: host.
    dev.region_write(MSIX_BAR, 0x100, &[1, 2, 3, 4]).unwrap();
    assert_eq!(fake.st().bar_writes.len(), 2);
    // ROM and VGA are absent.
    assert_eq!(dev.region_read(6, 0, &mut b), Err(libc::EINVAL));
    assert_eq!(dev.region_read(8, 0, &mut b), Err(libc::EINVAL));
}

#[test]
fn sparse_mmap_areas_leave_out_the_msix_pages() {
    let areas = mmap_areas(0x4000, (Some((0, 80)), Some((0x2000, 8))));
    assert_eq!(
        areas,
        vec![
            SparseArea {
                offset: 0x1000,
                size: 0x1000
            },
            SparseArea {
                offset: 0x3000,
                size: 0x1000
            }
        ]
    );
    assert_eq!(
        mmap_areas(0x10_0000, (None, None)),
        vec![SparseArea {
            offset: 0,
            size: 0x10_0000
        }]
    );
    // Table and PBA on one page at the end.
    assert_eq!(
        mmap_areas(0x4000, (Some((0x3000, 16)), Some((0x3800, 8)))),
        vec![SparseArea {
            offset: 0,
            size: 0x3000
        }]
    );
    // Holes past the end of the BAR (a bogus capability) change nothing and do not underflow.
    assert_eq!(
        mmap_areas(0x2000, (Some((0x1000, 16)), Some((0x9000, 8)))),
        vec![SparseArea {
            offset: 0,
            size: 0x1000
        }]
    );
    let (dev, _) = device(PassthroughOptions { mmap_bars: true });
    // The fake offers no fd, so no MMAP is advertised.
    assert_eq!(dev.region_info(0).flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    let (dev, _) = device(PassthroughOptions::default());
    assert!(dev.region_info(3).sparse_areas.is_empty());
    assert_eq!(dev.region_info(3).size, 0x10_0000);
    assert_eq!(dev.region_info(7).size, 256);
    assert_eq!(dev.region_info(8).size, 0);
    let msix = dev.irq_info(2);
    assert_eq!(
        (msix.count, msix.flags & VFIO_IRQ_INFO_MASKABLE != 0),
        (5, true)
    );
}

fn memfd(len: u64) -> OwnedFd {
    // SAFETY: memfd_create with a static name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"pt-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a live memfd.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(r, 0);
    fd
}

#[test]
fn dma_maps_are_mirrored_and_checked() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    let mut table = DmaTable::new(16);
    let fd = memfd(0x4000);
    let mut try_map = |dev: &mut PassthroughDevice<FakeVfio>, off, iova, size| {
        let req = DmaMapRequest::new(3, off, iova, size);
        if table
            .map(&req, Some(fd.as_fd().try_clone_to_owned().unwrap()))
            .is_err()
        {
            // The server's DMA table refuses a range outside its file before any device
            // sees it (the device checks again).
            return Err(libc::EINVAL);
        }
        let r = dev.try_dma_map(table.get(iova).unwrap());
        drop(table.unmap(iova, size));
        r
    };
    assert_eq!(
        try_map(&mut dev, 0, 0x10_0000, 0x8000),
        Err(libc::EINVAL),
        "past the file"
    );
    assert_eq!(
        try_map(&mut dev, 0, 0x10_0800, 0x1000),
        Err(libc::EINVAL),
        "unaligned"
    );
    assert!(fake.st().dma.is_empty());
    assert_eq!(try_map(&mut dev, 0x1000, 0x10_0000, 0x2000), Ok(()));
    {
        let st = fake.st();
        let (vaddr, iova, size, flags) = st.dma[0];
        assert!(vaddr != 0 && vaddr % 4096 == 0);
        assert_eq!((iova, size, flags), (0x10_0000, 0x2000, 3));
    }
    assert_eq!(dev.stats().dma_maps, 1);
    dev.dma_unmap(0x10_0000, 0x2000);
    assert_eq!(fake.st().unmaps, vec![(0x10_0000, 0x2000)]);
    assert_eq!(dev.stats().dma_maps, 0);
}

#[test]
fn disconnect_quiesces_and_reset_resets_the_virtual_state() {
    let (mut dev, fake) = device(PassthroughOptions::default());
    let fds: Vec<EventFd> = (0..5).map(|_| efd()).collect();
    bind(&mut dev, 2, &fds.iter().collect::<Vec<_>>());
    dev.region_write(7, 0x1c, &0xd000_0000u32.to_le_bytes())
        .unwrap();
    dev.region_write(7, 4, &0x0006u16.to_le_bytes()).unwrap();
    table_ctrl(&mut dev, 0, true);
    fake.fire(0);
    poll_once(&mut dev);
    assert_eq!(pba(&mut dev), 1);

    dev.reset().unwrap();
    assert_eq!(fake.enabled_index(), None, "MSI-X off after reset");
    let mut b = [0u8; 4];
    dev.region_read(7, 0x1c, &mut b).unwrap();
    assert_eq!(
        u32::from_le_bytes(b),
        0xfd00_0000,
        "BAR back to its value at open"
    );
    assert_eq!(pba(&mut dev), 0);
    assert_eq!(fake.st().resets, 0, "no host reset method");
    assert_eq!(
        fake.st().config[4] & 7,
        0,
        "COMMAND I/O, memory, master cleared instead"
    );

    let mut fake2 = FakeVfio::new();
    fake2.flags |= VFIO_DEVICE_FLAGS_RESET;
    let mut dev2 = PassthroughDevice::new(fake2.clone(), PassthroughOptions::default()).unwrap();
    dev2.reset().unwrap();
    assert_eq!(fake2.st().resets, 1);

    bind(&mut dev, 2, &fds.iter().collect::<Vec<_>>());
    dev.region_write(7, 4, &0x0006u16.to_le_bytes()).unwrap();
    dev.client_disconnected();
    assert_eq!(fake.enabled_index(), None, "interrupts off");
    assert_eq!(fake.st().config[4] & 4, 0, "bus master off");
    assert!(dev.poll_fds().is_empty());
    fake.fire(0);
    assert_eq!(fds.iter().map(count).sum::<u64>(), 0);
}

/// Seeded random accesses and SET_IRQS against the device: no panic, every error is a
/// positive errno, and the device ends quiesced.
#[test]
fn random_input_never_panics() {
    let (mut ok, mut refused) = (0u32, 0u32);
    {
        let (mut dev, fake) = device(PassthroughOptions { mmap_bars: true });
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = [0u8; 16];
        for i in 0..20_000u32 {
            let r = next();
            let index = (r % 10) as u32;
            let len = 1 + ((r >> 8) % 16) as usize;
            let size = dev.region_info(index.min(8)).size.max(1);
            let offset = if r & (1 << 40) != 0 {
                (r >> 16) % (size + 64)
            } else {
                ((r >> 16) % size) & !3
            };
            if r & (1 << 41) != 0 {
                let data: Vec<u8> = (0..len).map(|k| (r >> (k % 8 * 8)) as u8).collect();
                match dev.region_write(index, offset, &data) {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        assert!(e > 0);
                        refused += 1;
                    }
                }
            } else {
                match dev.region_read(index, offset, &mut buf[..len]) {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        assert!(e > 0);
                        refused += 1;
                    }
                }
            }
            if i % 16 == 0 {
                let irq = ((r >> 44) % 5) as u32;
                let n = dev.irq_info(irq).count;
                if n == 0 {
                    continue;
                }
                let start = ((r >> 48) % u64::from(n)) as u32;
                let count = 1 + ((r >> 52) % u64::from(n - start)) as u32;
                let action = match (r >> 56) % 3 {
                    0 => IrqAction::Mask,
                    1 => IrqAction::Unmask,
                    _ => IrqAction::Trigger,
                };
                let data = match (r >> 58) % 4 {
                    0 => IrqData::None,
                    1 => IrqData::Bool((0..count).map(|k| (r >> k) & 1 == 1).collect()),
                    2 => IrqData::Eventfds((0..count).map(|_| Some(efd())).collect()),
                    _ => IrqData::Eventfds((0..count).map(|_| None).collect()),
                };
                let (start, count) = if (r >> 60) % 8 == 0 {
                    (0, 0)
                } else {
                    (start, count)
                };
                let data = if count == 0 { IrqData::None } else { data };
                let res = dev.set_irqs(SetIrqs {
                    index: irq,
                    action,
                    start,
                    count,
                    data,
                });
                assert!(res.is_ok() || res.unwrap_err() > 0);
                fake.fire(((r >> 62) % 5) as usize);
                poll_once(&mut dev);
            }
        }
        dev.client_disconnected();
        assert!(dev.poll_fds().is_empty());
        assert_eq!(
            fake.enabled_index(),
            None,
            "interrupts off after the client left"
        );
    }
    assert!(ok > 1000 && refused > 1000, "ok {ok}, refused {refused}");
}
