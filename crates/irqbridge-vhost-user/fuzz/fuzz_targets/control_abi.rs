// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user event-channel device's guest ABI: control requests, doorbell buffers and the
//! plain-data encodings of `irqbridge_vhost_user::abi`, driven by raw bytes through the same
//! decoding and router code as the backend (`irqbridge_vhost_user::harness`).
//!
//! Input: one configuration byte (ports 1..=64 in bits 5:0, upcalls 1..=4 in bits 7:6), then
//! operations, each a tag byte (bit 0: connection 0 or 1; bits 2:1: 0/1 control request of the
//! next 16 bytes, 2 doorbell buffer of a length byte and that many bytes, 3 link of 4 bytes,
//! or with bit 3 set a guest write into its page: page, word u16, value u64).

#![no_main]

use irqbridge_vhost_user::ConnId;
use irqbridge_vhost_user::abi::{
    CONFIG_SIZE, ConfigSpace, MAX_CONFIG_READ, Op, PORT_BOUND, PORT_CLOSED, PORT_UNBOUND,
    PORT_UPCALL_SHIFT, RECORD_SIZE, REPLY_SIZE, REQUEST_SIZE, Reply, Request, Status, UpcallRecord,
    parse_doorbell,
};
use irqbridge_vhost_user::harness::ControlHarness;
use libfuzzer_sys::fuzz_target;

fn window<const N: usize>(data: &[u8], at: usize) -> Option<[u8; N]> {
    data.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Every decoder is the inverse of its encoder on the raw input.
fn check_codecs(data: &[u8]) {
    if let Some(w) = window::<REQUEST_SIZE>(data, 0) {
        let r = Request::from_bytes(&w);
        assert_eq!(r.to_bytes(), w);
        assert_eq!(Request::parse(data), Some(r));
        if let Ok(op) = Op::try_from(r.op) {
            assert_eq!(op as u32, r.op);
        }
    } else {
        assert_eq!(Request::parse(data), None);
    }
    if let Some(w) = window::<REPLY_SIZE>(data, 0) {
        let r = Reply::from_bytes(&w);
        assert_eq!(r.to_bytes(), w);
        if let Some(s) = r.status() {
            assert_eq!(s as u32, r.status);
        }
    }
    if let Some(w) = window::<RECORD_SIZE>(data, 0) {
        assert_eq!(UpcallRecord::from_bytes(&w).to_bytes(), w);
    }
    if let Some(w) = window::<CONFIG_SIZE>(data, 0) {
        let c = ConfigSpace::from_bytes(&w);
        assert_eq!(c.to_bytes()[..18], w[..18]);
        assert_eq!(ConfigSpace::from_bytes(&c.to_bytes()), c);
        if let (Some(o), Some(s)) = (window::<4>(data, 0), window::<4>(data, 4)) {
            let (offset, size) = (u32::from_le_bytes(o) % 300, u32::from_le_bytes(s) % 300);
            let read = c.read(offset, size);
            let fits = size > 0 && (offset as usize + size as usize) <= MAX_CONFIG_READ;
            assert_eq!(read.is_some(), fits);
            if let Some(b) = read {
                assert_eq!(b.len(), size as usize);
            }
        }
    }
    let ports = parse_doorbell(data);
    let well_formed = !data.is_empty() && data.len() % 4 == 0 && data.len() <= 4096;
    assert_eq!(ports.is_some(), well_formed);
}

fuzz_target!(|data: &[u8]| {
    check_codecs(data);
    let Some((&cfg, mut rest)) = data.split_first() else {
        return;
    };
    let ports = u32::from(cfg & 0x3f) + 1;
    let upcalls = u16::from(cfg >> 6) + 1;
    let mut h = ControlHarness::new(2, ports, upcalls).expect("valid sizes");
    while let Some((&tag, tail)) = rest.split_first() {
        let conn = ConnId(u32::from(tag & 1));
        match (tag >> 1) & 3 {
            0 | 1 => {
                let (req, next) = tail.split_at(tail.len().min(REQUEST_SIZE));
                let reply = h.control(conn, req).expect("known connection");
                let status = reply.status().expect("a defined status");
                if let Some(r) = Request::parse(req) {
                    let op = Op::try_from(r.op);
                    if op.is_err() {
                        assert_eq!(status, Status::UnknownOp);
                    }
                    if op.is_ok_and(|o| o != Op::RegisterPage && o != Op::Reset)
                        && r.port >= ports
                        && status == Status::Ok
                    {
                        panic!("port {} accepted with {ports} ports", r.port);
                    }
                    if op == Ok(Op::Status) && status == Status::Ok {
                        let state = reply.value & 3;
                        assert!(matches!(state, PORT_CLOSED | PORT_UNBOUND | PORT_BOUND));
                        if state == PORT_BOUND {
                            assert!(reply.value >> PORT_UPCALL_SHIFT < u32::from(upcalls));
                        }
                    }
                    if op == Ok(Op::Bind) && status == Status::Ok {
                        assert!(r.arg < u64::from(upcalls));
                    }
                } else {
                    assert_eq!(status, Status::BadRequest);
                }
                if status != Status::Ok {
                    assert_eq!(reply.value, 0);
                }
                rest = next;
            }
            2 => {
                let Some((&len, t)) = tail.split_first() else {
                    break;
                };
                let (buf, next) = t.split_at(usize::from(len).min(t.len()));
                let before = h.upcalls(ConnId(0)) + h.upcalls(ConnId(1));
                let r = h.doorbell(conn, buf).expect("known connection");
                assert_eq!(r.is_some(), !buf.is_empty() && buf.len() % 4 == 0);
                let after = h.upcalls(ConnId(0)) + h.upcalls(ConnId(1));
                assert!(
                    after - before <= r.unwrap_or(0) as u64,
                    "an upcall per port at most"
                );
                rest = next;
            }
            _ if tag & 8 != 0 => {
                // The guest writes its page behind the device's back.
                let Some(w) = tail.get(..11) else {
                    break;
                };
                let word = usize::from(u16::from_le_bytes([w[1], w[2]])) % 512;
                let value = u64::from_le_bytes(w[3..11].try_into().expect("8 bytes"));
                h.guest_write(conn, u64::from(w[0] % 4), word, value);
                rest = &tail[11..];
            }
            _ => {
                let Some(l) = tail.get(..4) else {
                    break;
                };
                let a = (ConnId(u32::from(l[0] & 1)), u32::from(l[1]));
                let b = (ConnId(u32::from(l[2] & 1)), u32::from(l[3]));
                assert_eq!(h.link(a, b).is_ok(), a.1 < ports && b.1 < ports);
                rest = &tail[4..];
            }
        }
    }
});
