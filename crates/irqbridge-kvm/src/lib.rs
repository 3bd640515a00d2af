//! VMM-side plugin: wires the interrupts and doorbells of an irqbridge device into KVM.
#![deny(missing_docs)]

mod error;
pub mod interrupt;
pub mod routing;

pub use error::{Error, Result};
