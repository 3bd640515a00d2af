//! VMM-side plugin: wires the interrupts and doorbells of an irqbridge device into KVM.
