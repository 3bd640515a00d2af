//! Protocol-free interrupt models: PCI INTx, MSI-X table and PBA, event channels.
