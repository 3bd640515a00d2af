//! vfio-user wire format, framing with fd passing, server loop and the irqbridge PCI test device.

pub mod conn;
pub mod device;
pub mod dma;
pub mod error;
pub mod proto;
pub mod server;
