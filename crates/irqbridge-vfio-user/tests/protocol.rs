// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vfio-user protocol tests: a hand-written client (and the rust-vmm `vfio_user::Client`)
//! against the server with a fake device, over a real socket.

mod common;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use irqbridge_vfio_user::device::IrqAction;
use irqbridge_vfio_user::proto::*;
use irqbridge_vfio_user::server::ServerConfig;

const EINVAL: u32 = libc::EINVAL as u32;
const ENOTTY: u32 = libc::ENOTTY as u32;

fn memfd(size: u64) -> OwnedFd {
    // SAFETY: NUL-terminated literal name.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor owned by nobody else.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ftruncate of a live memfd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
    fd
}

fn region_info(c: &mut RawClient, index: u32, argsz: u32) -> (RegionInfoReply, Vec<OwnedFd>) {
    let r = c.call(
        Command::DeviceGetRegionInfo,
        &RegionInfoRequest::new(index, argsz).encode(),
        &[],
    );
    (RegionInfoReply::parse(&r.body).unwrap(), r.fds)
}

fn irq_calls(h: &Harness) -> Vec<Call> {
    h.calls()
        .into_iter()
        .filter(|c| matches!(c, Call::SetIrqs { .. }))
        .collect()
}

#[test]
fn version_reply_is_what_qemu_accepts() {
    let _g = serial();
    let h = Harness::start();
    let mut c = h.connect();
    let mut body = vec![0, 0, 0, 0];
    body.extend_from_slice(QEMU_CAPS.as_bytes());
    body.push(0);
    let r = c.call(Command::Version, &body, &[]);
    assert_eq!(r.header.msg_id, 0);
    assert_eq!(&r.body[..4], &[0, 0, 0, 0], "major 0 minor 0");
    assert_eq!(r.body.last(), Some(&0), "NUL-terminated");
    let json = std::str::from_utf8(&r.body[4..r.body.len() - 1]).unwrap();
    assert_eq!(
        json,
        r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"write_multiple":true,"pgsizes":4096,"max_dma_maps":1024}}"#
    );
    c.in_step();
}

#[test]
fn version_rules() {
    let _g = serial();
    let h = Harness::start();

    // A command before VERSION is refused, then VERSION works.
    let mut c = h.connect();
    c.expect_errno(
        Command::DeviceGetInfo,
        &DeviceInfoMsg::request().encode(),
        &[],
        libc::EINVAL,
    );
    // No JSON at all; the rust-vmm client's 0.1 gets 0.0.
    let r = c.call(Command::Version, &[0, 0, 1, 0], &[]);
    let v = Version::parse(&r.body).unwrap();
    assert_eq!((v.major, v.minor), (0, 0));
    // VERSION twice.
    c.expect_errno(Command::Version, &[0, 0, 0, 0], &[], libc::EINVAL);
    c.in_step();
    drop(c);

    // JSON without NUL; a lower max_dma_maps offer is honoured and enforced.
    let mut c = h.connect();
    let mut body = vec![0, 0, 0, 0];
    body.extend_from_slice(br#"{"capabilities":{"max_dma_maps":2}}"#);
    let v = Version::parse(&c.call(Command::Version, &body, &[]).body).unwrap();
    assert_eq!(v.capabilities.max_dma_maps, 2);
    for i in 0..2u64 {
        c.call(
            Command::DmaMap,
            &DmaMapRequest::new(3, 0, i << 20, 0x1000).encode(),
            &[],
        );
    }
    c.expect_errno(
        Command::DmaMap,
        &DmaMapRequest::new(3, 0, 5 << 20, 0x1000).encode(),
        &[],
        libc::ENOSPC,
    );
    drop(c);

    // Malformed JSON, embedded NUL, major 1, short body: EINVAL, and VERSION still works.
    let mut c = h.connect();
    for bad in [
        &b"\0\0\0\0{\"capabilities\":\0"[..],
        &b"\0\0\0\0{}\0{}\0"[..],
        &b"\0\0\0\0{\"capabilities\":{\"max_msg_fds\":-1}}\0"[..],
        &b"\0\0\0\0[1,2]\0"[..],
        &[1, 0, 0, 0][..],
        &[0, 0][..],
    ] {
        c.expect_errno(Command::Version, bad, &[], libc::EINVAL);
    }
    c.version_qemu();
    c.in_step();
}

#[test]
fn every_command() {
    let _g = serial();
    let h = Harness::start();
    let mut c = h.client();

    // DEVICE_GET_INFO with QEMU's argsz 16 and the rust-vmm client's 32.
    c.in_step();
    let mut req = DeviceInfoMsg::request();
    req.argsz = 32;
    let r = c.call(Command::DeviceGetInfo, &req.encode(), &[]);
    let info = DeviceInfoMsg::parse(&r.body).unwrap();
    assert_eq!(info.argsz, 16);
    assert_eq!(info.flags, VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);

    // REGION_INFO, plain region: complete at argsz 32, no fd.
    let (r0, fds) = region_info(&mut c, 0, 32);
    assert_eq!((r0.argsz, r0.size, r0.cap_offset), (32, 0x1000, 0));
    assert_eq!(
        r0.flags,
        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
    );
    assert!(fds.is_empty());

    // Sparse-mmap region: argsz 32 gets the bare struct with argsz needed, CAPS set (as
    // vfio-pci does) with cap_offset 32 (QEMU's vfio-user client refuses CAPS with a smaller
    // one), no capabilities, no fd.
    let (t, fds) = region_info(&mut c, 4, 32);
    assert_eq!(t.argsz, 32 + 16 + 16);
    assert_ne!(t.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert_ne!(t.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert_eq!(t.cap_offset, 32);
    assert!(t.caps.is_empty());
    assert!(fds.is_empty(), "no fd with the truncated reply");
    // Retry with the size asked for: capabilities and the fd.
    let (full, fds) = region_info(&mut c, 4, t.argsz);
    assert_eq!(full.argsz, 64);
    assert_ne!(full.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(full.cap_offset, 32);
    assert_eq!(full.offset, BAR4_FILE_OFFSET);
    assert_eq!(
        full.sparse_areas().unwrap(),
        &[SparseMmapArea {
            offset: 0,
            size: MMAP_BAR_SIZE
        }]
    );
    assert_eq!(fds.len(), 1);
    let bytes = pread(fds[0].as_raw_fd(), full.offset + 5, 3);
    assert_eq!(bytes, vec![5, 6, 7], "the fd is the BAR4 file");
    // A larger argsz than needed is fine too.
    let (again, fds) = region_info(&mut c, 4, 4096);
    assert_eq!(again, full);
    assert_eq!(fds.len(), 1);

    // MMAP region without sparse areas: fd with the first (complete) reply.
    let (r5, fds) = region_info(&mut c, 5, 32);
    assert_eq!(r5.argsz, 32);
    assert_ne!(r5.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert_eq!(fds.len(), 1);
    assert_eq!(pread(fds[0].as_raw_fd(), 0, 4), b"bar5");
    drop(fds);

    // Absent region: size 0.
    let (r1, _) = region_info(&mut c, 1, 32);
    assert_eq!((r1.size, r1.flags), (0, 0));

    // REGION_IO_FDS: head only when argsz is too small, then entries and fds.
    let r = c.call(
        Command::DeviceGetRegionIoFds,
        &RegionIoFdsRequest::new(0, 16).encode(),
        &[],
    );
    let head = RegionIoFdsReply::parse(&r.body).unwrap();
    assert_eq!((head.argsz, head.count, head.entries.len()), (96, 2, 0));
    assert!(r.fds.is_empty());
    let r = c.call(
        Command::DeviceGetRegionIoFds,
        &RegionIoFdsRequest::new(0, 96).encode(),
        &[],
    );
    let full = RegionIoFdsReply::parse(&r.body).unwrap();
    assert_eq!(full.entries.len(), 2);
    assert_eq!(r.fds.len(), 2);
    let e0 = full.entries[0];
    assert_eq!((e0.offset, e0.size, e0.fd_index, e0.flags), (0x40, 4, 0, 0));
    let e1 = full.entries[1];
    assert_eq!(
        (e1.offset, e1.fd_index, e1.flags, e1.datamatch),
        (0x44, 1, KVM_IOEVENTFD_FLAG_DATAMATCH, 0xabcd)
    );
    // The ioeventfd reaches the device's poll loop.
    h.clear();
    // SAFETY: writing 8 bytes from a live buffer to a live eventfd.
    let n = unsafe { libc::write(r.fds[0].as_raw_fd(), 1u64.to_ne_bytes().as_ptr().cast(), 8) };
    assert_eq!(n, 8);
    h.wait_for("the doorbell event", |l| {
        l.contains(&Call::FdEvent(DOORBELL_TOKEN))
    });
    drop(r);
    let r = c.call(
        Command::DeviceGetRegionIoFds,
        &RegionIoFdsRequest::new(2, 16).encode(),
        &[],
    );
    let none = RegionIoFdsReply::parse(&r.body).unwrap();
    assert_eq!((none.argsz, none.count), (16, 0));

    // IRQ_INFO for every index.
    let want = [
        (0u32, 0x7u32, 1u32),
        (1, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE, 1),
        (
            2,
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE,
            MSIX_COUNT,
        ),
        (3, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE, 1),
        (4, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE, 1),
    ];
    for (index, flags, count) in want {
        let r = c.call(
            Command::DeviceGetIrqInfo,
            &IrqInfoMsg::request(index).encode(),
            &[],
        );
        assert_eq!(
            IrqInfoMsg::parse(&r.body).unwrap(),
            IrqInfoMsg::reply(index, flags, count)
        );
    }

    // REGION_WRITE / REGION_READ on BAR0 and config space.
    c.write(0, 0x10, &[1, 2, 3, 4]);
    assert_eq!(c.read(0, 0x10, 4), vec![1, 2, 3, 4]);
    c.write(7, 0x3c, &[0x0b]);
    assert_eq!(c.read(7, 0x3c, 2), vec![0x0b, 0]);
    // The last byte of a region, and a zero-length read at its end.
    c.write(2, BAR2_SIZE - 1, &[0xee]);
    assert_eq!(c.read(2, BAR2_SIZE - 1, 1), vec![0xee]);
    assert_eq!(c.read(2, BAR2_SIZE, 0), Vec::<u8>::new());
    // A whole 8 KiB region in one read.
    assert_eq!(c.read(2, 0, BAR2_SIZE as u32).len(), BAR2_SIZE as usize);

    // REGION_WRITE_MULTI.
    let multi = WriteMultiRequest {
        entries: vec![
            WriteMultiEntry::new(0, 0x20, &[0xaa, 0xbb]),
            WriteMultiEntry::new(2, 0x100, &[1, 2, 3, 4, 5, 6, 7, 8]),
        ],
    };
    let r = c.call(Command::RegionWriteMulti, &multi.encode(), &[]);
    assert_eq!(WriteMultiReply::parse(&r.body).unwrap().wr_cnt, 2);
    assert_eq!(c.read(0, 0x20, 2), vec![0xaa, 0xbb]);
    assert_eq!(c.read(2, 0x100, 8), vec![1, 2, 3, 4, 5, 6, 7, 8]);

    // DMA_MAP with and without a file, DMA_UNMAP echo, unmap-all.
    h.clear();
    let ram = memfd(0x20_0000);
    c.call(
        Command::DmaMap,
        &DmaMapRequest::new(3, 0x10_0000, 0x8000_0000, 0x10_0000).encode(),
        &[ram.as_fd()],
    );
    c.call(
        Command::DmaMap,
        &DmaMapRequest::new(1, 0, 0x1_0000_0000, 0x1000).encode(),
        &[],
    );
    c.call(
        Command::DmaMap,
        &DmaMapRequest::new(2, 0, 0x2_0000_0000, 0x2000).encode(),
        &[ram.as_fd()],
    );
    let u = DmaUnmapRequest::new(0, 0x8000_0000, 0x10_0000);
    let r = c.call(Command::DmaUnmap, &u.encode(), &[]);
    assert_eq!(DmaUnmapRequest::parse(&r.body).unwrap(), u);
    let all = DmaUnmapRequest::new(VFIO_DMA_UNMAP_FLAG_ALL, 0, 0);
    let r = c.call(Command::DmaUnmap, &all.encode(), &[]);
    assert_eq!(DmaUnmapRequest::parse(&r.body).unwrap(), all);
    assert_eq!(
        h.calls(),
        vec![
            Call::DmaMap {
                iova: 0x8000_0000,
                size: 0x10_0000,
                fd: true
            },
            Call::DmaMap {
                iova: 0x1_0000_0000,
                size: 0x1000,
                fd: false
            },
            Call::DmaMap {
                iova: 0x2_0000_0000,
                size: 0x2000,
                fd: true
            },
            Call::DmaUnmap {
                iova: 0x8000_0000,
                size: 0x10_0000
            },
            Call::DmaUnmap {
                iova: 0x1_0000_0000,
                size: 0x1000
            },
            Call::DmaUnmap {
                iova: 0x2_0000_0000,
                size: 0x2000
            },
        ]
    );

    // DEVICE_RESET.
    h.clear();
    let r = c.call(Command::DeviceReset, &[], &[]);
    assert!(r.body.is_empty());
    assert_eq!(h.calls(), vec![Call::Reset]);
}

#[test]
fn set_irqs_every_action_and_data() {
    let _g = serial();
    let h = Harness::start();
    let mut c = h.client();
    let msix = VFIO_PCI_MSIX_IRQ_INDEX;
    let actions = [
        (VFIO_IRQ_SET_ACTION_MASK, IrqAction::Mask),
        (VFIO_IRQ_SET_ACTION_UNMASK, IrqAction::Unmask),
        (VFIO_IRQ_SET_ACTION_TRIGGER, IrqAction::Trigger),
    ];
    for (aflag, action) in actions {
        // DATA_NONE.
        h.clear();
        c.set_irqs(msix, aflag | VFIO_IRQ_SET_DATA_NONE, 1, 3, &[])
            .unwrap();
        // DATA_BOOL.
        let b = SetIrqsRequest::with_bools(msix, aflag, 4, &[true, false, true]);
        c.call(Command::DeviceSetIrqs, &b.encode(), &[]);
        // DATA_EVENTFD with fds: the device writes to each, we see it on ours.
        let (e1, e2) = (eventfd(), eventfd());
        c.set_irqs(
            msix,
            aflag | VFIO_IRQ_SET_DATA_EVENTFD,
            6,
            2,
            &[bfd(&e1), bfd(&e2)],
        )
        .unwrap();
        assert_eq!(wait_count(&e1), 1);
        assert_eq!(wait_count(&e2), 1);
        // DATA_EVENTFD without fds: de-assign.
        c.set_irqs(msix, aflag | VFIO_IRQ_SET_DATA_EVENTFD, 0, 3, &[])
            .unwrap();
        assert_eq!(
            irq_calls(&h),
            vec![
                Call::SetIrqs {
                    index: msix,
                    action,
                    start: 1,
                    count: 3,
                    data: IrqDataSeen::None
                },
                Call::SetIrqs {
                    index: msix,
                    action,
                    start: 4,
                    count: 3,
                    data: IrqDataSeen::Bool(vec![true, false, true])
                },
                Call::SetIrqs {
                    index: msix,
                    action,
                    start: 6,
                    count: 2,
                    data: IrqDataSeen::Eventfds(vec![true, true])
                },
                Call::SetIrqs {
                    index: msix,
                    action,
                    start: 0,
                    count: 3,
                    data: IrqDataSeen::Eventfds(vec![false, false, false])
                },
            ],
            "action {action:?}"
        );
    }

    // The INTx sequence QEMU sends with KVM resample, then disable.
    h.clear();
    let intx = VFIO_PCI_INTX_IRQ_INDEX;
    let (trigger, resample) = (eventfd(), eventfd());
    let seq: [(u32, u32, Option<&vmm_sys_util::eventfd::EventFd>); 5] = [
        (
            VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
            1,
            Some(&trigger),
        ),
        (VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_NONE, 1, None),
        (
            VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_DATA_EVENTFD,
            1,
            Some(&resample),
        ),
        (VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_DATA_NONE, 1, None),
        (
            VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_NONE,
            0,
            None,
        ),
    ];
    for (flags, count, fd) in seq {
        let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|e| bfd(e)).collect();
        c.set_irqs(intx, flags, 0, count, &fds).unwrap();
    }
    assert_eq!(wait_count(&trigger), 1);
    assert_eq!(wait_count(&resample), 1);
    let got: Vec<(IrqAction, u32, IrqDataSeen)> = irq_calls(&h)
        .into_iter()
        .map(|c| match c {
            Call::SetIrqs {
                action,
                count,
                data,
                ..
            } => (action, count, data),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (IrqAction::Trigger, 1, IrqDataSeen::Eventfds(vec![true])),
            (IrqAction::Mask, 1, IrqDataSeen::None),
            (IrqAction::Unmask, 1, IrqDataSeen::Eventfds(vec![true])),
            (IrqAction::Unmask, 1, IrqDataSeen::None),
            (IrqAction::Trigger, 0, IrqDataSeen::None),
        ]
    );

    // ERR and REQ take TRIGGER.
    let e = eventfd();
    c.set_irqs(
        VFIO_PCI_ERR_IRQ_INDEX,
        VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
        0,
        1,
        &[bfd(&e)],
    )
    .unwrap();
    c.set_irqs(
        VFIO_PCI_REQ_IRQ_INDEX,
        VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_NONE,
        0,
        1,
        &[],
    )
    .unwrap();
    // 16 fds in one message (Cloud Hypervisor's batch size) on an 8-vector index would be out
    // of range; 8 fds exactly fill it.
    let efds: Vec<_> = (0..MSIX_COUNT).map(|_| eventfd()).collect();
    let b: Vec<_> = efds.iter().map(bfd).collect();
    c.set_irqs(
        msix,
        VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
        0,
        MSIX_COUNT,
        &b,
    )
    .unwrap();
    for e in &efds {
        assert_eq!(wait_count(e), 1);
    }
}

#[test]
fn set_irqs_validation() {
    let _g = serial();
    let h = Harness::start();
    let mut c = h.client();
    h.clear();
    let msix = VFIO_PCI_MSIX_IRQ_INDEX;
    let intx = VFIO_PCI_INTX_IRQ_INDEX;
    let trig_none = VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_NONE;
    let trig_efd = VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD;
    let e = eventfd();
    let e2 = eventfd();
    let not_efd = memfd(4096);
    let (r_end, w_end) = {
        let mut p = [0; 2];
        // SAFETY: pipe2 fills the array.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors owned by nobody else.
        unsafe {
            (
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(p[0]),
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(p[1]),
            )
        }
    };

    type Case<'a> = (&'a str, u32, u32, u32, u32, Vec<BorrowedFd<'a>>, u32);
    let cases: Vec<Case<'_>> = vec![
        (
            "two data bits",
            msix,
            trig_none | VFIO_IRQ_SET_DATA_BOOL,
            0,
            1,
            vec![],
            EINVAL,
        ),
        (
            "no data bit",
            msix,
            VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            vec![],
            EINVAL,
        ),
        (
            "no action bit",
            msix,
            VFIO_IRQ_SET_DATA_NONE,
            0,
            1,
            vec![],
            EINVAL,
        ),
        (
            "two action bits",
            msix,
            trig_none | VFIO_IRQ_SET_ACTION_MASK,
            0,
            1,
            vec![],
            EINVAL,
        ),
        (
            "unknown flag bit",
            msix,
            trig_none | 0x40,
            0,
            1,
            vec![],
            EINVAL,
        ),
        ("index out of range", 5, trig_none, 0, 1, vec![], EINVAL),
        ("index u32::MAX", u32::MAX, trig_none, 0, 1, vec![], EINVAL),
        (
            "start+count past count",
            msix,
            trig_none,
            7,
            2,
            vec![],
            EINVAL,
        ),
        (
            "start+count overflows",
            msix,
            trig_none,
            u32::MAX,
            2,
            vec![],
            EINVAL,
        ),
        ("count 0 with start", msix, trig_none, 1, 0, vec![], EINVAL),
        (
            "count 0 without TRIGGER|NONE",
            msix,
            VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_NONE,
            0,
            0,
            vec![],
            EINVAL,
        ),
        ("count 0 with EVENTFD", msix, trig_efd, 0, 0, vec![], EINVAL),
        (
            "fds with DATA_NONE",
            msix,
            trig_none,
            0,
            1,
            vec![bfd(&e)],
            EINVAL,
        ),
        (
            "fewer fds than count",
            msix,
            trig_efd,
            0,
            3,
            vec![bfd(&e), bfd(&e2)],
            EINVAL,
        ),
        (
            "more fds than count",
            msix,
            trig_efd,
            0,
            1,
            vec![bfd(&e), bfd(&e2)],
            EINVAL,
        ),
        (
            "a memfd as eventfd",
            msix,
            trig_efd,
            0,
            1,
            vec![not_efd.as_fd()],
            EINVAL,
        ),
        (
            "a pipe among eventfds",
            msix,
            trig_efd,
            0,
            2,
            vec![bfd(&e), w_end.as_fd()],
            EINVAL,
        ),
        ("INTx start 1", intx, trig_none, 1, 1, vec![], EINVAL),
        ("INTx count 2", intx, trig_none, 0, 2, vec![], EINVAL),
        (
            "INTx MASK|EVENTFD",
            intx,
            VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_EVENTFD,
            0,
            1,
            vec![bfd(&e)],
            ENOTTY,
        ),
        (
            "ERR UNMASK",
            VFIO_PCI_ERR_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_DATA_NONE,
            0,
            1,
            vec![],
            ENOTTY,
        ),
        (
            "REQ MASK",
            VFIO_PCI_REQ_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_NONE,
            0,
            1,
            vec![],
            ENOTTY,
        ),
        (
            "MASK on a non-maskable index",
            VFIO_PCI_MSI_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_NONE,
            0,
            1,
            vec![],
            ENOTTY,
        ),
    ];
    for (what, index, flags, start, count, fds, errno) in &cases {
        assert_eq!(
            c.set_irqs(*index, *flags, *start, *count, fds),
            Err(*errno),
            "{what}"
        );
        c.in_step();
    }
    // No descriptor was written by the device: none of these reached it.
    assert_eq!(
        e.read().map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock)
    );
    drop(r_end);

    // DATA_BOOL with the wrong number of bytes, trailing bytes on DATA_NONE.
    for (flags, count, data) in [
        (
            VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_BOOL,
            3u32,
            vec![1u8, 0],
        ),
        (
            VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_BOOL,
            1,
            vec![1, 0],
        ),
        (trig_none, 1, vec![0]),
    ] {
        let mut req = SetIrqsRequest::new(msix, flags, 0, count);
        req.argsz += data.len() as u32;
        req.data = data;
        c.expect_errno(Command::DeviceSetIrqs, &req.encode(), &[], libc::EINVAL);
        c.in_step();
    }
    // Short body and small argsz.
    let body = SetIrqsRequest::new(msix, trig_none, 0, 1).encode();
    c.expect_errno(Command::DeviceSetIrqs, &body[..19], &[], libc::EINVAL);
    let mut small = body.clone();
    small[0] = 19;
    c.expect_errno(Command::DeviceSetIrqs, &small, &[], libc::EINVAL);
    c.in_step();
    assert!(irq_calls(&h).is_empty(), "{:?}", h.calls());
}

#[test]
fn no_reply_is_never_answered() {
    let _g = serial();
    let h = Harness::start();
    let mut c = h.client();
    // A valid posted write, then a read: the next message is the read's reply.
    c.post(
        Command::RegionWrite,
        &RegionData {
            offset: 0x30,
            region: 0,
            data: vec![9, 8, 7, 6],
        }
        .encode(),
        &[],
    );
    assert_eq!(c.read(0, 0x30, 4), vec![9, 8, 7, 6]);
    // Failing posted messages get no error reply either.
    let bad_write = RegionData {
        offset: 0,
        region: 42,
        data: vec![1],
    };
    c.post(Command::RegionWrite, &bad_write.encode(), &[]);
    c.post(Command::DmaRead, &[0; 16], &[]);
    c.post(Command::DeviceGetInfo, &[1, 2], &[]);
    c.post(
        Command::RegionWrite,
        &RegionData {
            offset: BAR2_ZERO_ERRNO_OFFSET,
            region: 2,
            data: vec![1],
        }
        .encode(),
        &[],
    );
    // A posted WRITE_MULTI.
    let multi = WriteMultiRequest {
        entries: vec![WriteMultiEntry::new(0, 0x34, &[0x55])],
    };
    c.post(Command::RegionWriteMulti, &multi.encode(), &[]);
    assert_eq!(c.read(0, 0x30, 5), vec![9, 8, 7, 6, 0x55]);
    // A posted reset with NO_REPLY still runs.
    h.clear();
    c.post(Command::DeviceReset, &[], &[]);
    c.in_step();
    assert_eq!(h.calls(), vec![Call::Reset]);
}

#[test]
fn malformed_input_keeps_the_stream_in_step_and_leaks_nothing() {
    let _g = serial();
    let mut h = Harness::start();
    let before = open_fds();
    let mut c = h.client();
    let rd = |offset: u64, region: u32, count: u32| {
        RegionAccess {
            offset,
            region,
            count,
        }
        .encode()
    };

    // Header only for a command that needs a body.
    c.raw_expect_errno(&raw_msg(100, 9, &[]), &[], 100, libc::EINVAL);
    c.in_step();
    // msg_size < 16 (only the header is consumed).
    c.raw_expect_errno(&raw_header(101, 4, 8, 0), &[], 101, libc::EINVAL);
    c.in_step();
    // msg_size < 16 with descriptors attached: closed.
    let e = eventfd();
    c.raw_expect_errno(&raw_header(102, 8, 0, 0), &[bfd(&e)], 102, libc::EINVAL);
    c.in_step();
    // Unknown message type.
    c.raw_expect_errno(&raw_header(103, 4, 16, 2), &[], 103, libc::EINVAL);
    c.in_step();
    // A stray reply is ignored (no answer), the next request is served.
    c.conn
        .send_raw(&raw_header(104, 4, 16, FLAGS_TYPE_REPLY), &[])
        .unwrap();
    c.in_step();
    // Bad argsz and lengths.
    let mut info = DeviceInfoMsg::request().encode();
    info[0] = 8;
    c.expect_errno(Command::DeviceGetInfo, &info, &[], libc::EINVAL);
    c.expect_errno(Command::DeviceGetInfo, &[16, 0, 0, 0], &[], libc::EINVAL);
    c.expect_errno(
        Command::DeviceGetRegionInfo,
        &RegionInfoRequest::new(0, 31).encode(),
        &[],
        libc::EINVAL,
    );
    c.expect_errno(
        Command::DeviceGetRegionIoFds,
        &RegionIoFdsRequest::new(0, 8).encode(),
        &[],
        libc::EINVAL,
    );
    let mut f = RegionIoFdsRequest::new(0, 96);
    f.flags = 1;
    c.expect_errno(
        Command::DeviceGetRegionIoFds,
        &f.encode(),
        &[],
        libc::EINVAL,
    );
    let mut m = DmaMapRequest::new(3, 0, 0, 0x1000).encode();
    m[0] = 16;
    c.expect_errno(Command::DmaMap, &m, &[], libc::EINVAL);
    c.expect_errno(Command::DeviceReset, &[0], &[], libc::EINVAL);
    c.in_step();
    // Index out of range.
    c.expect_errno(
        Command::DeviceGetRegionInfo,
        &RegionInfoRequest::new(9, 32).encode(),
        &[],
        libc::EINVAL,
    );
    c.expect_errno(
        Command::DeviceGetRegionIoFds,
        &RegionIoFdsRequest::new(9, 16).encode(),
        &[],
        libc::EINVAL,
    );
    c.expect_errno(
        Command::DeviceGetIrqInfo,
        &IrqInfoMsg::request(5).encode(),
        &[],
        libc::EINVAL,
    );
    c.expect_errno(Command::RegionRead, &rd(0, 9, 4), &[], libc::EINVAL);
    c.in_step();
    // Region accesses out of bounds (checked arithmetic).
    h.clear();
    c.expect_errno(
        Command::RegionRead,
        &rd(BAR0_SIZE - 4, 0, 8),
        &[],
        libc::EINVAL,
    );
    c.expect_errno(
        Command::RegionRead,
        &rd(u64::MAX - 1, 0, 4),
        &[],
        libc::EINVAL,
    );
    c.expect_errno(Command::RegionRead, &rd(0, 1, 1), &[], libc::EINVAL);
    let w = RegionData {
        offset: CONFIG_SIZE - 1,
        region: 7,
        data: vec![1, 2],
    };
    c.expect_errno(Command::RegionWrite, &w.encode(), &[], libc::EINVAL);
    // count disagreeing with the data.
    let mut lying = RegionData {
        offset: 0,
        region: 0,
        data: vec![1, 2, 3, 4],
    }
    .encode();
    lying[12] = 2;
    c.expect_errno(Command::RegionWrite, &lying, &[], libc::EINVAL);
    // Over max_data_xfer_size (1 MiB): E2BIG, nothing allocated or read.
    c.expect_errno(
        Command::RegionRead,
        &rd(0, 2, (1 << 20) + 1),
        &[],
        libc::E2BIG,
    );
    c.expect_errno(Command::RegionRead, &rd(0, 0, u32::MAX), &[], libc::E2BIG);
    assert!(h.calls().is_empty(), "no bad access reached the device");
    c.in_step();
    // WRITE_MULTI: too many entries, an entry over 8 bytes, one out of bounds (nothing applied).
    let mut too_many = 201u64.to_le_bytes().to_vec();
    too_many.resize(8 + 201 * 24, 0);
    c.expect_errno(Command::RegionWriteMulti, &too_many, &[], libc::EINVAL);
    let mut big = WriteMultiEntry::new(0, 0, &[1; 8]);
    big.count = 9;
    let bad = WriteMultiRequest {
        entries: vec![WriteMultiEntry::new(0, 0x50, &[1]), big],
    };
    c.expect_errno(Command::RegionWriteMulti, &bad.encode(), &[], libc::EINVAL);
    let oob = WriteMultiRequest {
        entries: vec![
            WriteMultiEntry::new(0, 0x50, &[1]),
            WriteMultiEntry::new(7, CONFIG_SIZE - 2, &[1, 2, 3, 4]),
        ],
    };
    c.expect_errno(Command::RegionWriteMulti, &oob.encode(), &[], libc::EINVAL);
    c.expect_errno(Command::RegionWriteMulti, &[0; 7], &[], libc::EINVAL);
    assert!(h.calls().is_empty(), "no partial WRITE_MULTI");
    c.in_step();
    // Device errors come back with a real errno, never 0.
    c.expect_errno(
        Command::RegionRead,
        &rd(BAR0_FAIL_OFFSET, 0, 4),
        &[],
        libc::EIO,
    );
    let z = RegionData {
        offset: BAR2_ZERO_ERRNO_OFFSET,
        region: 2,
        data: vec![1],
    };
    c.expect_errno(Command::RegionWrite, &z.encode(), &[], libc::EIO);
    c.in_step();
    // DMA: overlap, bad unmaps, too many fds, unknown flags, dirty bitmap.
    let ram = memfd(0x10000);
    c.call(
        Command::DmaMap,
        &DmaMapRequest::new(3, 0, 0x10000, 0x10000).encode(),
        &[ram.as_fd()],
    );
    c.expect_errno(
        Command::DmaMap,
        &DmaMapRequest::new(3, 0, 0x18000, 0x1000).encode(),
        &[ram.as_fd()],
        libc::EEXIST,
    );
    c.expect_errno(
        Command::DmaMap,
        &DmaMapRequest::new(3, 0, 0x8000, 0x10000).encode(),
        &[],
        libc::EEXIST,
    );
    c.expect_errno(
        Command::DmaMap,
        &DmaMapRequest::new(3, 0, 0x40000, 0x1000).encode(),
        &[ram.as_fd(), ram.as_fd()],
        libc::EINVAL,
    );
    c.expect_errno(
        Command::DmaMap,
        &DmaMapRequest::new(8, 0, 0x40000, 0x1000).encode(),
        &[],
        libc::EINVAL,
    );
    c.expect_errno(
        Command::DmaMap,
        &DmaMapRequest::new(3, 0, 0x40000, 0).encode(),
        &[],
        libc::EINVAL,
    );
    // An fd that is not a file (refused by the fstat check before any mmap).
    c.expect_errno(
        Command::DmaMap,
        &DmaMapRequest::new(3, 0, 0x40000, 0x1000).encode(),
        &[bfd(&e)],
        libc::EINVAL,
    );
    c.expect_errno(
        Command::DmaUnmap,
        &DmaUnmapRequest::new(0, 0x10000, 0x1000).encode(),
        &[],
        libc::EINVAL,
    );
    c.expect_errno(
        Command::DmaUnmap,
        &DmaUnmapRequest::new(0, 0x20000, 0x1000).encode(),
        &[],
        libc::ENOENT,
    );
    c.expect_errno(
        Command::DmaUnmap,
        &DmaUnmapRequest::new(VFIO_DMA_UNMAP_FLAG_ALL, 0x10000, 0).encode(),
        &[],
        libc::EINVAL,
    );
    c.expect_errno(
        Command::DmaUnmap,
        &DmaUnmapRequest::new(4, 0x10000, 0x10000).encode(),
        &[],
        libc::EINVAL,
    );
    c.expect_errno(
        Command::DmaUnmap,
        &DmaUnmapRequest::new(VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 0x10000, 0x10000).encode(),
        &[],
        libc::EOPNOTSUPP,
    );
    c.in_step();
    // Descriptors on commands that take none.
    c.expect_errno(
        Command::DeviceGetInfo,
        &DeviceInfoMsg::request().encode(),
        &[bfd(&e)],
        libc::EINVAL,
    );
    c.expect_errno(Command::RegionRead, &rd(0, 0, 4), &[bfd(&e)], libc::EINVAL);
    c.expect_errno(Command::DeviceReset, &[], &[bfd(&e)], libc::EINVAL);
    // More than 16 descriptors: refused, all closed, stream in step.
    let many: Vec<_> = (0..17).map(|_| eventfd()).collect();
    let b: Vec<_> = many.iter().map(bfd).collect();
    c.expect_errno(
        Command::DeviceSetIrqs,
        &SetIrqsRequest::new(
            2,
            VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
            0,
            8,
        )
        .encode(),
        &b,
        libc::EINVAL,
    );
    drop(b);
    drop(many);
    c.in_step();
    // Unknown and unsupported commands.
    for cmd in [0u16, 11, 12, 14, 16, 17, 18, 19, 99, u16::MAX] {
        let id = 200 + cmd % 50;
        c.raw_expect_errno(&raw_msg(id, cmd, &[1, 2, 3]), &[bfd(&e)], id, libc::ENOSYS);
    }
    c.in_step();
    // VERSION again.
    c.expect_errno(Command::Version, &[0, 0, 0, 0], &[], libc::EINVAL);
    c.in_step();

    // An oversized msg_size cannot be drained safely: the connection is dropped...
    let d0 = h.disconnects();
    c.conn
        .send_raw(&raw_header(300, 10, u32::MAX, 0), &[])
        .unwrap();
    assert!(matches!(
        c.conn.recv(),
        Err(irqbridge_vfio_user::error::Error::Disconnected)
    ));
    h.wait_for("the disconnect", |l| {
        l.iter().filter(|c| **c == Call::Disconnected).count() == d0 + 1
    });
    // ... its DMA mapping went away with it ...
    assert!(h.calls().contains(&Call::DmaUnmap {
        iova: 0x10000,
        size: 0x10000
    }));
    drop(c);
    // ... and the next client is served.
    let mut c2 = h.client();
    c2.in_step();
    let d1 = h.disconnects();
    drop(c2);
    h.wait_for("the second disconnect", |l| {
        l.iter().filter(|c| **c == Call::Disconnected).count() == d1 + 1
    });
    drop(e);
    drop(ram);
    assert_eq!(open_fds(), before, "descriptor leak");
    h.stop();
}

#[test]
fn reconnect_drops_client_state() {
    let _g = serial();
    let h = Harness::start();
    let before = open_fds();
    for round in 0..3u64 {
        let mut c = h.client();
        let ram = memfd(0x4000);
        c.call(
            Command::DmaMap,
            &DmaMapRequest::new(3, 0, 0x100000, 0x4000).encode(),
            &[ram.as_fd()],
        );
        let (t, r) = (eventfd(), eventfd());
        c.set_irqs(
            VFIO_PCI_INTX_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
            0,
            1,
            &[bfd(&t)],
        )
        .unwrap();
        c.set_irqs(
            VFIO_PCI_INTX_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_DATA_EVENTFD,
            0,
            1,
            &[bfd(&r)],
        )
        .unwrap();
        // Device state survives reconnects: what round n-1 wrote is still there.
        if round > 0 {
            assert_eq!(c.read(0, 0x80, 8), (round - 1).to_le_bytes().to_vec());
        }
        c.write(0, 0x80, &round.to_le_bytes());
        h.clear();
        drop(c);
        h.wait_for("disconnect", |l| l.contains(&Call::Disconnected));
        assert_eq!(
            h.calls(),
            vec![
                Call::DmaUnmap {
                    iova: 0x100000,
                    size: 0x4000
                },
                Call::Disconnected
            ]
        );
    }
    assert_eq!(open_fds(), before, "descriptor leak across reconnects");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let _g = serial();
    let h = Harness::start();
    let c = h.client();
    let mut burst = Vec::new();
    for i in 0..50u16 {
        burst.extend_from_slice(&raw_msg(
            1000 + i,
            Command::RegionRead as u16,
            &RegionAccess {
                offset: u64::from(i % 16) * 4,
                region: 0,
                count: 4,
            }
            .encode(),
        ));
    }
    c.conn.send_raw(&burst, &[]).unwrap();
    for i in 0..50u16 {
        let m = c.conn.recv().unwrap();
        assert_eq!(m.header.msg_id, 1000 + i);
        assert!(m.header.is_reply() && !m.header.is_error());
        assert_eq!(m.body.len(), 20);
    }
}

#[test]
fn stop_handle_ends_run_with_a_client_connected() {
    let _g = serial();
    let mut h = Harness::start();
    let mut c = h.client();
    c.in_step();
    h.stop();
    assert!(h.calls().contains(&Call::Disconnected));
    assert!(matches!(
        c.conn.recv(),
        Err(irqbridge_vfio_user::error::Error::Disconnected)
    ));
    assert!(!h.path.exists(), "socket file removed with the server");
}

#[test]
fn from_listener_and_small_xfer_limit() {
    let _g = serial();
    let h = Harness::start_from_listener();
    let mut c = h.client();
    c.in_step();
    drop(c);
    drop(h);

    let h = Harness::start_with(ServerConfig {
        max_data_xfer_size: 4096,
        ..ServerConfig::default()
    });
    let mut c = h.connect();
    let v = c.version_qemu();
    assert_eq!(v.capabilities.max_data_xfer_size, 4096);
    assert_eq!(c.read(2, 0, 4096).len(), 4096);
    c.expect_errno(
        Command::RegionRead,
        &RegionAccess {
            offset: 0,
            region: 2,
            count: 4097,
        }
        .encode(),
        &[],
        libc::E2BIG,
    );
    // A write bigger than the limit but within the 64 KiB message floor is drained and refused.
    let w = RegionData {
        offset: 0,
        region: 2,
        data: vec![0; 8192],
    };
    c.expect_errno(Command::RegionWrite, &w.encode(), &[], libc::E2BIG);
    c.in_step();
}

/// Runs `f` on a thread and fails the test if it takes more than 10 s (the rust-vmm client
/// hangs on some error replies).
fn with_timeout<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("rust-vmm client call timed out"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("rust-vmm client thread panicked"),
    }
}

#[test]
fn rust_vmm_client_interop() {
    let _g = serial();
    let h = Harness::start();
    let before = open_fds();
    let path = h.path.clone();
    let (trigger, trigger_ours) = {
        let e = eventfd();
        let dup = e.try_clone().unwrap();
        (e, dup)
    };
    let ram = memfd(0x10000);
    let ram_raw = ram.as_raw_fd();
    with_timeout(move || {
        let mut c = vfio_user::Client::new(&path).expect("connect");
        let r4 = c.region(4).expect("region 4");
        assert_eq!(r4.size, MMAP_BAR_SIZE);
        assert_eq!(r4.sparse_areas.len(), 1);
        assert_eq!(r4.sparse_areas[0].size, MMAP_BAR_SIZE);
        let fo = r4.file_offset.as_ref().expect("BAR4 fd");
        assert_eq!(fo.start(), BAR4_FILE_OFFSET);
        assert_eq!(
            pread(fo.file().as_raw_fd(), BAR4_FILE_OFFSET + 1, 2),
            vec![1, 2]
        );
        let r5 = c.region(5).expect("region 5");
        assert!(r5.file_offset.is_some(), "whole-BAR mmap fd delivered");
        assert!(c.region(0).unwrap().file_offset.is_none());
        assert_eq!(c.region(7).unwrap().size, CONFIG_SIZE);
        // The crate reports resettable inverted: our RESET flag reads as false.
        assert!(!c.resettable());

        let irq = c.get_irq_info(2).unwrap();
        assert_eq!((irq.index, irq.count), (2, MSIX_COUNT));
        c.set_irqs(
            0,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[trigger.as_raw_fd()],
        )
        .unwrap();
        c.set_irqs(
            0,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
            0,
            1,
            &[],
        )
        .unwrap();
        c.region_write(7, 0x3c, &[0x0a]).unwrap();
        let mut b = [0u8; 1];
        c.region_read(7, 0x3c, &mut b).unwrap();
        assert_eq!(b, [0x0a]);
        c.region_write(0, 0, &0xdead_beefu32.to_le_bytes()).unwrap();
        let mut w = [0u8; 4];
        c.region_read(0, 0, &mut w).unwrap();
        assert_eq!(u32::from_le_bytes(w), 0xdead_beef);
        c.dma_map(0, 0x4000_0000, 0x10000, ram_raw).unwrap();
        c.dma_unmap(0x4000_0000, 0x10000).unwrap();
        c.reset().unwrap();
        c.shutdown().unwrap();
        drop(trigger);
    });
    assert_eq!(
        wait_count(&trigger_ours),
        1,
        "trigger eventfd reached the device"
    );
    h.wait_for("the rust-vmm client's disconnect", |l| {
        l.contains(&Call::Disconnected)
    });
    let calls = h.calls();
    let irqs: Vec<_> = calls
        .iter()
        .filter_map(|c| match c {
            Call::SetIrqs { index, action, .. } => Some((*index, *action)),
            _ => None,
        })
        .collect();
    assert_eq!(irqs, vec![(0, IrqAction::Trigger), (0, IrqAction::Unmask)]);
    assert!(calls.contains(&Call::DmaMap {
        iova: 0x4000_0000,
        size: 0x10000,
        fd: true
    }));
    assert!(calls.contains(&Call::DmaUnmap {
        iova: 0x4000_0000,
        size: 0x10000
    }));
    assert!(calls.contains(&Call::Reset));
    drop(trigger_ours);
    drop(ram);
    assert_eq!(open_fds(), before, "descriptor leak");
}

#[test]
fn stalled_or_truncated_messages_end_only_that_client() {
    let _g = serial();
    let h = Harness::start_with(ServerConfig {
        io_timeout: Duration::from_millis(50),
        ..ServerConfig::default()
    });
    // Half a header, then silence: the server gives up on this client after io_timeout.
    let c = h.client();
    let hdr = raw_header(1, Command::DeviceReset as u16, 16, 0);
    c.conn.send_raw(&hdr[..10], &[]).unwrap();
    h.wait_for("the stalled client to be dropped", |l| {
        l.contains(&Call::Disconnected)
    });
    assert!(matches!(
        c.conn.recv(),
        Err(irqbridge_vfio_user::error::Error::Disconnected)
    ));
    drop(c);
    // A body cut short by a close.
    h.clear();
    let c = h.client();
    let mut msg = raw_header(2, Command::RegionWrite as u16, 16 + 16 + 4, 0).to_vec();
    msg.extend_from_slice(&[0; 10]);
    c.conn.send_raw(&msg, &[]).unwrap();
    drop(c);
    h.wait_for("the truncated client to be dropped", |l| {
        l.contains(&Call::Disconnected)
    });
    assert!(
        !h.calls().iter().any(|c| matches!(c, Call::Write { .. })),
        "a partial message never reaches the device"
    );
    // The server still serves.
    let mut c = h.client();
    c.in_step();
}
