// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vfio-user message decoder: the first byte picks a message type, the rest is its body
//! (or, for the header, 16 bytes of it). Every parser must return `Ok` or `Err` without
//! panicking, and what parses must encode and parse back to the same value.

#![no_main]

use irqbridge_vfio_user::proto::{
    Capabilities, DeviceInfoMsg, DmaMapRequest, DmaUnmapRequest, HEADER_SIZE, Header, IrqInfoMsg,
    RegionAccess, RegionData, RegionInfoReply, RegionInfoRequest, RegionIoFdsReply,
    RegionIoFdsRequest, SetIrqsRequest, Version, WriteMultiReply, WriteMultiRequest,
};
use libfuzzer_sys::fuzz_target;

/// Parses `body` with `parse`; if it parses, its encoding must parse to the same value.
macro_rules! round_trip {
    ($t:ty, $body:expr) => {
        if let Ok(v) = <$t>::parse($body) {
            let again = <$t>::parse(&v.encode()).expect(concat!(stringify!($t), " re-parse"));
            assert_eq!(again, v, concat!(stringify!($t), " round trip"));
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 17 {
        0 => {
            if let Ok(h) = Header::from_slice(body) {
                let _ = (h.body_len(), h.is_command(), h.is_reply(), h.no_reply());
                assert_eq!(Header::parse(&h.encode()), h);
            }
            if let Some(b) = body
                .get(..HEADER_SIZE)
                .and_then(|b| <&[u8; 16]>::try_from(b).ok())
            {
                let h = Header::parse(b);
                assert_eq!(Header::parse(&h.encode()), h);
            }
        }
        1 => {
            if let Ok(v) = Version::parse(body) {
                let again = Version::parse(&v.encode()).expect("Version re-parse");
                assert_eq!((again.major, again.minor), (v.major, v.minor));
            }
        }
        2 => {
            let _ = Capabilities::from_json(body);
        }
        3 => round_trip!(DmaMapRequest, body),
        4 => round_trip!(DmaUnmapRequest, body),
        5 => round_trip!(DeviceInfoMsg, body),
        6 => round_trip!(RegionInfoRequest, body),
        7 => {
            if let Ok(r) = RegionInfoReply::parse(body) {
                let _ = (
                    r.sparse_areas(),
                    r.is_truncated(),
                    r.needed(),
                    r.truncated(),
                );
                let _ = RegionInfoReply::parse(&r.encode());
            }
        }
        8 => round_trip!(RegionIoFdsRequest, body),
        9 => {
            if let Ok(r) = RegionIoFdsReply::parse(body) {
                let _ = (r.truncated(), RegionIoFdsReply::parse(&r.encode()));
            }
        }
        10 => round_trip!(IrqInfoMsg, body),
        11 => round_trip!(SetIrqsRequest, body),
        12 => round_trip!(RegionAccess, body),
        13 => round_trip!(RegionData, body),
        14 => {
            if let Ok(w) = WriteMultiRequest::parse(body) {
                for e in &w.entries {
                    let _ = e.bytes();
                }
                let _ = WriteMultiRequest::parse(&w.encode());
            }
        }
        15 => round_trip!(WriteMultiReply, body),
        _ => {
            // A whole message: header, then the body its command names.
            if let Ok(h) = Header::from_slice(body) {
                let rest = body.get(HEADER_SIZE..).unwrap_or_default();
                let _ = (
                    SetIrqsRequest::parse(rest),
                    RegionData::parse(rest),
                    DmaMapRequest::parse(rest),
                    h.body_len(),
                );
            }
        }
    }
});
