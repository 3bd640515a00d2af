// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The two servers as run by `irqbridge vfio-user` and `irqbridge vhost-user`: adopt or bind
//! the listening sockets, block the shutdown signals, serve until SIGTERM or SIGINT, remove the
//! socket files created and log the counters.

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use irqbridge_vfio_user::control::ControlServer;
use irqbridge_vfio_user::pci::{DeviceConfig, DeviceError, IrqbridgeDevice};
use irqbridge_vfio_user::server::{Server, StopHandle};
use irqbridge_vhost_user::{BackendConfig, Server as VhostServer};
use log::{error, info};

use crate::listen::{activated_fd, adopt_listener};
use crate::signals::Signals;

/// Errors of the daemon. [`Error::is_usage`] tells the ones caused by the command line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither or both of --socket-path and --fd, and no socket activation.
    #[error(
        "Exactly one of --socket-path and --fd is required (or socket activation with \
         LISTEN_FDS=1)."
    )]
    Listen,
    /// A negative or unusable --fd (or activated descriptor).
    #[error("--fd {0} is not an open listening unix socket.")]
    BadFd(RawFd),
    /// `LISTEN_PID` / `LISTEN_FDS` are set for this process but cannot be used.
    #[error("Socket activation: {0}.")]
    SocketActivation(String),
    /// `irqbridge vhost-user` without a socket.
    #[error(
        "At least one --socket-path or --fd is required (or socket activation with LISTEN_FDS=1)."
    )]
    NoListener,
    /// The device could not be created (a configuration value out of range, or no resources).
    #[error("Cannot create the device.")]
    Device(#[source] DeviceError),
    /// The vfio-user server failed.
    #[error("vfio-user server failed.")]
    Server(#[source] irqbridge_vfio_user::error::Error),
    /// The control socket failed.
    #[error("Control socket failed.")]
    Control(#[source] irqbridge_vfio_user::control::ControlError),
    /// Signal handling could not be set up.
    #[error("Failed to set up signal handling.")]
    Signals(#[source] std::io::Error),
    /// The vhost-user backend failed.
    #[error("vhost-user backend failed.")]
    VhostUser(#[source] irqbridge_vhost_user::Error),
    /// The host device to pass through could not be opened (not found, not bound to vfio-pci,
    /// group not viable, no access to /dev/vfio).
    #[error("Cannot pass the device through.")]
    Passthrough(#[source] irqbridge_vfio_user::passthrough::PassthroughError),
}

impl Error {
    /// Whether the command line is at fault (a usage error, exit status 2) rather than the
    /// machine or a peer (exit status 1).
    pub fn is_usage(&self) -> bool {
        match self {
            Error::Listen
            | Error::BadFd(_)
            | Error::SocketActivation(_)
            | Error::NoListener
            | Error::Device(DeviceError::InvalidConfig(_))
            | Error::VhostUser(irqbridge_vhost_user::Error::InvalidConfig(_)) => true,
            Error::Device(_)
            | Error::Server(_)
            | Error::Control(_)
            | Error::Signals(_)
            | Error::VhostUser(_)
            | Error::Passthrough(_) => false,
        }
    }
}

/// Where the vfio-user server listens.
#[derive(Debug, PartialEq, Eq)]
pub enum Listen {
    /// Bind a new socket at this path (`--socket-path`).
    Path(PathBuf),
    /// Use this inherited listening socket (`--fd`).
    Fd(RawFd),
    /// Use this descriptor passed by systemd socket activation.
    Activated(RawFd),
}

impl Listen {
    /// Picks the listening socket from `--socket-path` and `--fd`; with neither, from systemd
    /// socket activation (see [`crate::listen`]).
    ///
    /// # Errors
    ///
    /// [`Error::Listen`] for both or none of them, [`Error::BadFd`] for a negative `fd`,
    /// [`Error::SocketActivation`] for unusable activation variables.
    pub fn from_args(socket_path: Option<PathBuf>, fd: Option<RawFd>) -> Result<Listen, Error> {
        match (socket_path, fd) {
            (Some(p), None) => Ok(Listen::Path(p)),
            (None, Some(fd)) if fd >= 0 => Ok(Listen::Fd(fd)),
            (None, Some(fd)) => Err(Error::BadFd(fd)),
            (None, None) => activated_fd()?.map(Listen::Activated).ok_or(Error::Listen),
            (Some(_), Some(_)) => Err(Error::Listen),
        }
    }
}

/// Validated configuration of `irqbridge vfio-user`.
#[derive(Debug, PartialEq, Eq)]
pub struct VfioUserConfig {
    /// Where to listen for the VMM.
    pub listen: Listen,
    /// The device to serve.
    pub device: DeviceConfig,
    /// Where to listen for control requests, if anywhere.
    pub control_socket: Option<PathBuf>,
}

/// `key=value` pairs of a serializable value, for one log line without Rust Debug syntax.
pub fn log_fields(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        Ok(v) => v.to_string(),
        Err(e) => format!("<{e}>"),
    }
}

/// Serves the irqbridge PCI device over vfio-user until SIGTERM or SIGINT.
///
/// Signals are blocked before any thread starts; on the first one the server stops, drops the
/// client and removes the socket files it created (a socket passed in is left alone).
///
/// # Errors
///
/// Any [`Error`]; the socket files are removed in every case.
pub fn run_vfio_user(cfg: VfioUserConfig) -> Result<(), Error> {
    cfg.device.validate().map_err(Error::Device)?;
    // Block SIGTERM/SIGINT before any other thread exists, so that only the signal thread
    // receives them.
    let signals = Signals::block().map_err(Error::Signals)?;
    let listener = match &cfg.listen {
        Listen::Fd(fd) | Listen::Activated(fd) => Some(adopt_listener(*fd)?),
        Listen::Path(_) => None,
    };
    let mut device = IrqbridgeDevice::new(cfg.device).map_err(Error::Device)?;
    if let Some(path) = &cfg.control_socket {
        let control = ControlServer::bind(path).map_err(Error::Control)?;
        info!("control: listening on {}", path.display());
        device.attach_control(control);
    }
    let mut server = match (&cfg.listen, listener) {
        (_, Some(l)) => Server::from_listener(l).map_err(Error::Server)?,
        (Listen::Path(p), None) => Server::bind(p).map_err(Error::Server)?,
        (_, None) => return Err(Error::Listen),
    };
    match &cfg.listen {
        Listen::Path(p) => info!("vfio-user: listening on {}", p.display()),
        Listen::Fd(fd) => info!("vfio-user: listening on inherited fd {fd}"),
        Listen::Activated(fd) => info!("vfio-user: listening on socket-activated fd {fd}"),
    }
    info!(
        "vfio-user: device with {} MSI-X vectors, {} event-channel ports, INTx {}",
        cfg.device.msix_vectors,
        cfg.device.evtchn_ports,
        if cfg.device.intx { "on" } else { "off" }
    );
    let stop: StopHandle = server.stop_handle();
    signals.spawn_waiter(move |sig| {
        info!("{}, shutting down", signal_name(sig));
        if let Err(e) = stop.stop() {
            error!("vfio-user: cannot stop the server: {e}");
        }
    });
    let result = server.run(&mut device);
    info!(
        "vfio-user: counters at exit: {}",
        log_fields(&device.counters())
    );
    // Dropping the server and the device removes the socket files they created.
    drop(server);
    drop(device);
    result.map_err(Error::Server)
}

/// What `irqbridge passthrough` serves and where.
#[derive(Debug)]
pub struct PassthroughConfig {
    /// The listening socket.
    pub listen: Listen,
    /// The host PCI device, `DDDD:BB:SS.F`, bound to vfio-pci.
    pub device: String,
    /// Offer the BAR pages without the MSI-X table or PBA as sparse-mmap areas.
    pub mmap_bars: bool,
}

/// Serves a host PCI device (bound to vfio-pci) over vfio-user until SIGTERM or SIGINT
/// (docs/passthrough.md).
///
/// # Errors
///
/// [`Error::Passthrough`] when the device cannot be opened, otherwise as
/// [`run_vfio_user`].
pub fn run_passthrough(cfg: PassthroughConfig) -> Result<(), Error> {
    use irqbridge_vfio_user::passthrough::{self, PassthroughOptions};
    let signals = Signals::block().map_err(Error::Signals)?;
    let listener = match &cfg.listen {
        Listen::Fd(fd) | Listen::Activated(fd) => Some(adopt_listener(*fd)?),
        Listen::Path(_) => None,
    };
    let opts = PassthroughOptions {
        mmap_bars: cfg.mmap_bars,
    };
    let mut device = passthrough::open(&cfg.device, opts).map_err(Error::Passthrough)?;
    let mut server = match (&cfg.listen, listener) {
        (_, Some(l)) => Server::from_listener(l).map_err(Error::Server)?,
        (Listen::Path(p), None) => Server::bind(p).map_err(Error::Server)?,
        (_, None) => return Err(Error::Listen),
    };
    info!(
        "passthrough: serving {} (mmap BARs: {})",
        cfg.device,
        if cfg.mmap_bars { "yes" } else { "no" }
    );
    let stop: StopHandle = server.stop_handle();
    signals.spawn_waiter(move |sig| {
        info!("{}, shutting down", signal_name(sig));
        if let Err(e) = stop.stop() {
            error!("passthrough: cannot stop the server: {e}");
        }
    });
    let result = server.run(&mut device);
    let st = device.stats();
    info!("passthrough: counters at exit: {st:?}");
    drop(server);
    drop(device);
    result.map_err(Error::Server)
}

/// Serves the event-channel device as a vhost-user backend until SIGTERM or SIGINT.
///
/// `fd` is `--fd`: an inherited listening socket, connection 0. Without `fd` and without
/// `config.sockets`, the socket comes from systemd socket activation.
///
/// # Errors
///
/// Any [`Error`]; the socket files are removed in every case.
pub fn run_vhost_user(mut config: BackendConfig, fd: Option<RawFd>) -> Result<(), Error> {
    let fd = match fd {
        Some(fd) => Some(fd),
        None if config.sockets.is_empty() && config.listen_fd.is_none() => {
            Some(activated_fd()?.ok_or(Error::NoListener)?)
        }
        None => None,
    };
    if let Some(fd) = fd {
        config.listen_fd = Some(OwnedFd::from(adopt_listener(fd)?));
    }
    if config.connections() == 0 {
        return Err(Error::NoListener);
    }
    let signals = Signals::block().map_err(Error::Signals)?;
    let server = VhostServer::start(config).map_err(Error::VhostUser)?;
    let stop = server.stop_handle();
    signals.spawn_waiter(move |sig| {
        info!("{}, shutting down", signal_name(sig));
        stop.stop();
    });
    server.wait().map_err(Error::VhostUser)
}

/// `SIGTERM`, `SIGINT` or `signal N`.
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_from_args() {
        assert_eq!(
            Listen::from_args(Some("/tmp/a".into()), None).unwrap(),
            Listen::Path("/tmp/a".into())
        );
        assert_eq!(Listen::from_args(None, Some(3)).unwrap(), Listen::Fd(3));
        assert!(matches!(
            Listen::from_args(None, Some(-1)),
            Err(Error::BadFd(-1))
        ));
        assert!(matches!(
            Listen::from_args(Some("/tmp/a".into()), Some(3)),
            Err(Error::Listen)
        ));
        // The test process is not socket-activated (LISTEN_PID, if set at all, is not ours).
        assert!(matches!(Listen::from_args(None, None), Err(Error::Listen)));
    }

    #[test]
    fn usage_errors_are_told_apart() {
        assert!(Error::Listen.is_usage());
        assert!(Error::BadFd(7).is_usage());
        assert!(Error::Device(DeviceError::InvalidConfig("x".into())).is_usage());
        assert!(!Error::Device(DeviceError::NoIntx).is_usage());
        assert!(!Error::Signals(std::io::Error::other("x")).is_usage());
        assert!(Error::BadFd(7).to_string().contains("--fd 7"));
    }

    #[test]
    fn log_fields_are_key_value_pairs() {
        let c = irqbridge_vfio_user::pci::Counters {
            msix_triggers: 5,
            ..Default::default()
        };
        let s = log_fields(&c);
        assert!(s.contains("msix_triggers=5"), "{s}");
        assert!(!s.contains('{') && !s.contains("Counters"), "{s}");
    }

    #[test]
    fn run_vfio_user_refuses_a_bad_fd_and_a_bad_device() {
        let cfg = VfioUserConfig {
            listen: Listen::Fd(-5),
            device: DeviceConfig::default(),
            control_socket: None,
        };
        assert!(matches!(run_vfio_user(cfg), Err(Error::BadFd(-5))));
        let cfg = VfioUserConfig {
            listen: Listen::Path("/nonexistent-dir/x.sock".into()),
            device: DeviceConfig {
                msix_vectors: 0,
                ..DeviceConfig::default()
            },
            control_socket: None,
        };
        assert!(run_vfio_user(cfg).unwrap_err().is_usage());
    }

    #[test]
    fn run_vhost_user_needs_a_listener() {
        let e = run_vhost_user(BackendConfig::default(), None).unwrap_err();
        assert!(matches!(e, Error::NoListener), "{e}");
        let e = run_vhost_user(BackendConfig::default(), Some(-1)).unwrap_err();
        assert!(matches!(e, Error::BadFd(-1)), "{e}");
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(libc::SIGINT), "SIGINT");
        assert_eq!(signal_name(99), "signal 99");
    }
}
