// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An example device in one file: a periodic timer that raises an MSI-X vector every
//! `PERIOD_MS` milliseconds, served over vfio-user.
//!
//! ```text
//! cargo run -p irqbridge-vfio-user --example timer -- /tmp/timer.sock [PERIOD_MS]
//! ```
//!
//! Everything PCI (config space, BAR sizing, the MSI-X capability with its table and PBA in
//! BAR2, INTx, SET_IRQS, reset, disconnects) comes from [`PciFunction`]; the device is only
//! its BAR0 registers and a ticker:
//!
//! | BAR0 offset | register | access |
//! |---|---|---|
//! | 0x00 | PERIOD_MS: 0 stops the timer | RW |
//! | 0x04 | VECTOR: the MSI-X vector each tick raises (0..4) | RW |
//! | 0x08 | TICKS: ticks delivered to the MSI-X model | RO |
//!
//! The ticker is a thread that writes one byte per period into a socket pair; the device
//! polls the other end ([`PciDevice::poll_fds`]) and turns each byte into an MSI-X event on
//! the server thread, so the models are never touched from two threads.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use irqbridge_vfio_user::pci::{
    Bar, BarIndex, Error, Identity, PciCore, PciDevice, PciFunction, PciFunctionBuilder,
};

/// BAR0 PERIOD_MS.
pub const REG_PERIOD_MS: u64 = 0x00;
/// BAR0 VECTOR.
pub const REG_VECTOR: u64 = 0x04;
/// BAR0 TICKS.
pub const REG_TICKS: u64 = 0x08;
/// MSI-X table size.
pub const VECTORS: u16 = 4;

/// The timer's registers and its ticker.
#[derive(Debug)]
pub struct Timer {
    period_ms: Arc<AtomicU32>,
    vector: u32,
    ticks: u64,
    /// Our end of the ticker's socket pair; dropping it ends the ticker thread. It exists for
    /// the device's whole life: the poll set must not change on a register write (the server
    /// looks at it again only after messages other than region accesses).
    ticker: Option<UnixStream>,
}

impl Timer {
    /// A stopped timer and its ticker thread (which writes one byte per period while the
    /// period is not 0).
    pub fn new() -> Self {
        let period_ms = Arc::new(AtomicU32::new(0));
        let ticker = UnixStream::pair().ok().and_then(|(ours, mut theirs)| {
            ours.set_nonblocking(true).ok()?;
            // The thread ends when the device is dropped (the period's last strong reference).
            let period = Arc::downgrade(&period_ms);
            std::thread::spawn(move || {
                while let Some(ms) = period.upgrade().map(|p| p.load(Ordering::Relaxed)) {
                    std::thread::sleep(Duration::from_millis(u64::from(ms.max(1))));
                    if ms != 0 && theirs.write_all(&[1]).is_err() {
                        return;
                    }
                }
            });
            Some(ours)
        });
        Self {
            period_ms,
            vector: 0,
            ticks: 0,
            ticker,
        }
    }

    /// Starts (or stops, with 0) the timer.
    fn set_period(&mut self, period_ms: u32) {
        self.period_ms.store(period_ms, Ordering::Relaxed);
        if period_ms == 0 {
            // Ticks already written but not yet read are not delivered after a stop.
            if let Some(t) = &mut self.ticker {
                let mut buf = [0u8; 64];
                while matches!(t.read(&mut buf), Ok(n) if n > 0) {}
            }
        }
    }
}

impl Default for Timer {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for Timer {
    fn bar_read(&mut self, _bar: BarIndex, offset: u64, data: &mut [u8], _pci: &mut PciCore) {
        let value = match offset {
            REG_PERIOD_MS => self.period_ms.load(Ordering::Relaxed),
            REG_VECTOR => self.vector,
            REG_TICKS => self.ticks as u32,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn bar_write(&mut self, _bar: BarIndex, offset: u64, data: &[u8], _pci: &mut PciCore) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return; // only 32-bit accesses
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            REG_PERIOD_MS => self.set_period(value),
            REG_VECTOR if value < u32::from(VECTORS) => self.vector = value,
            _ => {}
        }
    }

    fn reset(&mut self, _pci: &mut PciCore) {
        self.set_period(0);
        self.vector = 0;
        self.ticks = 0;
    }

    fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, u64)> {
        self.ticker.iter().map(|t| (t.as_fd(), 0)).collect()
    }

    fn handle_fd_event(&mut self, _token: u64, pci: &mut PciCore) {
        let Some(t) = &mut self.ticker else { return };
        let mut buf = [0u8; 64];
        let n = match t.read(&mut buf) {
            Ok(0) | Err(_) => {
                // Hung up or nothing after all (WouldBlock): nothing to deliver.
                return;
            }
            Ok(n) => n,
        };
        if self.period_ms.load(Ordering::Relaxed) == 0 {
            return; // a tick written just before a stop is not delivered after it
        }
        for _ in 0..n {
            // Masked or disabled: the model sets the PBA bit and delivers on unmask.
            if pci.msix_fire(self.vector as u16).is_ok() {
                self.ticks += 1;
            }
        }
    }
}

/// The timer as a PCI function: BAR0 registers, MSI-X with table and PBA in BAR2.
///
/// # Errors
///
/// What [`PciFunctionBuilder::build`] returns.
pub fn timer_function() -> Result<PciFunction<Timer>, Error> {
    PciFunctionBuilder::new(Identity {
        vendor_id: 0x1234,
        device_id: 0x7e57,
        class_code: 0xff_0000,
        ..Identity::default()
    })
    .intx(false)
    .bar(0, Bar::mem32(4096))
    .bar(2, Bar::mem32(8192))
    .msix(VECTORS, 2, 0, 0x1000)
    .build(Timer::default())
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: timer SOCKET [PERIOD_MS]")?;
    let period: u32 = args.next().map_or(Ok(0), |p| p.parse())?;
    let mut device = timer_function()?;
    let (timer, _) = device.split_mut();
    timer.set_period(period);
    let mut server = irqbridge_vfio_user::server::Server::bind(&path)?;
    println!("timer: serving on {path}");
    server.run(&mut device)?;
    Ok(())
}
