// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest agent binary (assembled from `guests/agent.s` by `build.rs`) and its header.

use crate::error::{Error, Result};
use crate::layout::{
    ACTIONS_GPA, AGENT_ABI_VERSION, AGENT_GPA, AGENT_MAX_SIZE, COUNTS_GPA, MAILBOX_GPA,
    PORT_COUNTS_GPA, STACK_TOP,
};

/// The flat agent binary, to be loaded at [`AGENT_GPA`].
pub static AGENT_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/agent.bin"));

/// What the VMM needs from the agent header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentInfo {
    /// Guest address of the entry point.
    pub entry_gpa: u64,
    /// Guest address of the stub of vector 0.
    pub stubs_gpa: u64,
    /// Distance between two stubs.
    pub stub_stride: u64,
}

impl AgentInfo {
    /// Guest address of the interrupt stub of `vector`.
    pub fn stub_gpa(&self, vector: u8) -> u64 {
        self.stubs_gpa + u64::from(vector) * self.stub_stride
    }
}

fn u32_at(image: &[u8], off: usize) -> Result<u32> {
    image
        .get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(Error::BadAgent("truncated header"))
}

fn u64_at(image: &[u8], off: usize) -> Result<u64> {
    image
        .get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or(Error::BadAgent("truncated header"))
}

/// Checks an agent image against this crate's memory map and returns its entry points.
///
/// # Errors
///
/// [`Error::BadAgent`] when the magic, ABI version, addresses or stub table do not match.
pub fn parse(image: &[u8]) -> Result<AgentInfo> {
    if image.get(0..8) != Some(b"IRQBAGNT".as_slice()) {
        return Err(Error::BadAgent("bad magic"));
    }
    if image.len() as u64 > AGENT_MAX_SIZE {
        return Err(Error::BadAgent("image too large"));
    }
    if u32_at(image, 0x08)? != AGENT_ABI_VERSION {
        return Err(Error::BadAgent("ABI version mismatch"));
    }
    let expected = [
        (0x20, MAILBOX_GPA),
        (0x28, ACTIONS_GPA),
        (0x30, COUNTS_GPA),
        (0x38, PORT_COUNTS_GPA),
        (0x40, STACK_TOP),
        (0x48, AGENT_GPA),
    ];
    for (off, value) in expected {
        if u64_at(image, off)? != value {
            return Err(Error::BadAgent("memory map mismatch with layout.rs"));
        }
    }
    let entry = u64::from(u32_at(image, 0x0c)?);
    let stubs = u64::from(u32_at(image, 0x10)?);
    let stride = u64::from(u32_at(image, 0x14)?);
    let stubs_len = u64::from(u32_at(image, 0x18)?);
    let len = image.len() as u64;
    if entry >= len || stride == 0 || stubs_len != 256 * stride || stubs + stubs_len > len {
        return Err(Error::BadAgent("bad entry or stub table"));
    }
    Ok(AgentInfo {
        entry_gpa: AGENT_GPA + entry,
        stubs_gpa: AGENT_GPA + stubs,
        stub_stride: stride,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_agent_matches_the_layout() {
        let info = parse(AGENT_IMAGE).unwrap();
        assert_eq!(info.stub_stride, 16);
        assert!(info.entry_gpa > AGENT_GPA);
        assert_eq!(info.stub_gpa(255), info.stubs_gpa + 255 * 16);
        // Stub of vector 0x40 pushes a dummy error code, then the vector: 6a 00 6a 40.
        let off = (info.stub_gpa(0x40) - AGENT_GPA) as usize;
        assert_eq!(&AGENT_IMAGE[off..off + 4], &[0x6a, 0x00, 0x6a, 0x40]);
        // Vector 14 (page fault) has a CPU error code: no dummy push.
        let off = (info.stub_gpa(14) - AGENT_GPA) as usize;
        assert_eq!(&AGENT_IMAGE[off..off + 2], &[0x6a, 14]);
    }

    #[test]
    fn rejects_foreign_images() {
        assert!(parse(b"").is_err());
        assert!(parse(b"IRQBAGNT").is_err());
        let mut img = AGENT_IMAGE.to_vec();
        img[0x20] ^= 1;
        assert!(matches!(parse(&img), Err(Error::BadAgent(_))));
        let mut img = AGENT_IMAGE.to_vec();
        img[0x08] = 2;
        assert!(parse(&img).is_err());
    }
}
