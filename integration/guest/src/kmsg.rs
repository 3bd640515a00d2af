// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! New kernel log records since a point in time, read from /dev/kmsg.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

use crate::report::{Context, Result};

/// A /dev/kmsg reader positioned at the end of the log when opened.
#[derive(Debug)]
pub struct Kmsg(File);

impl Kmsg {
    /// Opens /dev/kmsg and skips every record logged so far.
    pub fn open_at_end() -> Result<Self> {
        let mut f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ctx("opening /dev/kmsg")?;
        f.seek(SeekFrom::End(0)).ctx("seeking /dev/kmsg")?;
        Ok(Self(f))
    }

    /// The messages logged since the last call (or since opening).
    pub fn new_messages(&mut self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(buf.get(..n).unwrap_or_default());
                    // "prio,seq,time,flags;message\n continuation lines"
                    let first = rec.lines().next().unwrap_or_default();
                    let msg = first.split_once(';').map_or(first, |(_, m)| m);
                    out.push(msg.to_string());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Records were overwritten before we read them: carry on with the next ones.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).ctx("reading /dev/kmsg"),
            }
        }
        Ok(out)
    }
}

/// Kernel messages that mean an interrupt line was shut off for misbehaving.
pub fn irq_disabled_messages(msgs: &[String]) -> Vec<&String> {
    msgs.iter()
        .filter(|m| m.contains("nobody cared") || m.contains("Disabling IRQ"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kernel_irq_shutdown_messages() {
        let msgs = vec![
            "irq 16: nobody cared (try booting with the \"irqpoll\" option)".to_string(),
            "uio_pci_generic 0000:00:03.0: enabling device".to_string(),
            "Disabling IRQ #16".to_string(),
        ];
        let hits = irq_disabled_messages(&msgs);
        assert_eq!(hits.len(), 2);
        assert!(hits[0].contains("nobody cared"));
        assert!(hits[1].contains("Disabling"));
    }
}
