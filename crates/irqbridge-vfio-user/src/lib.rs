//! vfio-user wire format, framing with fd passing, server loop and the irqbridge PCI test device.

pub mod conn;
pub mod control;
pub mod device;
pub mod dma;
pub mod error;
pub mod pci;
pub mod proto;
pub mod server;
pub mod shmem;
