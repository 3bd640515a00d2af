// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `irqbridge` daemon as a library: everything the binary does after its command line is
//! parsed.
//!
//! The binary (`src/main.rs`) only parses arguments with clap and calls in here:
//!
//! - [`listen`] adopts listening sockets handed over by the parent, either `--fd N` or systemd
//!   socket activation (`LISTEN_FDS` / `LISTEN_PID`, descriptors from 3 up), after checking that
//!   each is an open, listening unix socket.
//! - [`signals`] blocks SIGTERM and SIGINT before any thread starts and takes them on one
//!   thread with `sigwait(3)`, so shutdown runs as ordinary code.
//! - [`daemon`] runs the vfio-user device server and the vhost-user backend until a signal
//!   stops them, then removes the socket files they created.
//!
//! Unsafe code is confined to the descriptor checks in [`listen`] and the signal mask in
//! [`signals`].

#![deny(missing_docs)]

pub mod daemon;
pub mod listen;
pub mod logging;
pub mod plot;
pub mod progress;
pub mod report;
pub mod signals;

pub use daemon::Error;
