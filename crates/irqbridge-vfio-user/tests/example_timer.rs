// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The example device (`examples/timer.rs`) served over a unix socket: a vfio-user client
//! binds an eventfd to MSI-X vector 2, enables MSI-X, starts the timer and sees the vector
//! fire; stopping the timer stops the events.

mod device_util;

#[path = "../examples/timer.rs"]
#[allow(dead_code)]
mod timer;

use std::time::Duration;

use irqbridge_vfio_user::device::VfioUserDevice;
use irqbridge_vfio_user::pci::consts::*;
use irqbridge_vfio_user::proto::{VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD};
use irqbridge_vfio_user::server::Server;

use device_util::*;

#[test]
fn timer_raises_its_msix_vector_over_vfio_user() {
    let dir = TempDir::new("timer");
    let path = dir.join("timer.sock");
    let mut device = timer::timer_function().unwrap();
    assert_eq!(device.irq_info(IRQ_MSIX).count, u32::from(timer::VECTORS));
    assert_eq!(device.irq_info(IRQ_INTX).count, 0);
    let mut server = Server::bind(&path).unwrap();
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || {
        server.run(&mut device).unwrap();
        device
    });

    let mut c = RawClient::connect(&path);
    assert_eq!(c.read(REGION_CONFIG, 0, 4), 0x7e57_1234);
    let (ours, theirs) = eventfd_pair();
    c.set_irqs(
        IRQ_MSIX,
        VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
        2,
        1,
        &[&theirs],
    )
    .unwrap();
    drop(theirs);
    // MSI-X Enable (the capability is the first one, at 0x40).
    c.write(REGION_CONFIG, PCI_CAP_START + MSIX_CAP_CONTROL, 2, 0x8000);
    c.write(0, timer::REG_VECTOR, 4, 2);
    c.write(0, timer::REG_PERIOD_MS, 4, 2);
    let mut seen = 0;
    while seen < 3 {
        let n = wait_count(&ours);
        assert_ne!(n, 0, "no tick on MSI-X vector 2 within 5 s (seen {seen})");
        seen += n;
    }
    // Stop: after the reply no tick is delivered any more.
    c.write(0, timer::REG_PERIOD_MS, 4, 0);
    let ticks = c.read(0, timer::REG_TICKS, 4);
    assert!(ticks >= 3, "TICKS {ticks}");
    take(&ours);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(c.read(0, timer::REG_TICKS, 4), ticks);
    assert_eq!(take(&ours), 0);
    drop(c);
    stop.stop().unwrap();
    let device = thread.join().unwrap();
    assert_eq!(device.core().msix().unwrap().stats().triggers, ticks);
}
