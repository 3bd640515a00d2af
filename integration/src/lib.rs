//! Test VMM on the irqbridge-kvm plugin, bare-metal 64-bit guests and end-to-end scenarios.
