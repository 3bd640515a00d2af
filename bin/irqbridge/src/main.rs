//! `irqbridge`: serve the irqbridge interrupt test device over vfio-user, or talk to its
//! control socket.
//!
//! ```text
//! irqbridge vfio-user --socket-path PATH [--fd N] [--msix-vectors N] [--evtchn-ports N]
//!                     [--no-intx] [--control-socket PATH]
//! irqbridge control --socket PATH <command> [args]
//! irqbridge vhost-user (--socket-path PATH ... | --fd N) [--ports N] [--upcalls N]
//!                      [--virtio-id N] [--link [C.]A:[C.]B ...] [--print-capabilities]
//! irqbridge demo [--json]
//! irqbridge bench [--samples N] [--row ROW] [--json FILE] | --vhost-user
//! ```
//!
//! The server runs in the foreground, logs to stderr (`RUST_LOG`, default `info`) and shuts down
//! cleanly on SIGTERM or SIGINT, removing the socket files it created.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use irqbridge_vfio_user::control::{ControlClient, ControlRequest, ControlServer};
use irqbridge_vfio_user::pci::{
    DEFAULT_EVTCHN_PORTS, DEFAULT_MSIX_VECTORS, DeviceConfig, DeviceError, IrqbridgeDevice,
};
use irqbridge_vfio_user::server::{Server, StopHandle};
use irqbridge_vhost_user::{ConnId, Endpoint};
use log::{error, info};

mod signals;

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "irqbridge", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the irqbridge PCI test device (docs/device-abi.md) over vfio-user.
    VfioUser(VfioUserArgs),
    /// Send one request to a running device's control socket and print the JSON reply.
    Control(ControlArgs),
    /// Serve the event-channel device (docs/evtchn-virtio.md) as a vhost-user backend.
    VhostUser(VhostUserArgs),
    /// Run every interrupt scenario end to end: device server + test VMM + bare-metal guest on
    /// /dev/kvm. Prints a table; exits non-zero if a scenario fails or /dev/kvm is missing.
    Demo(DemoArgs),
    /// Benchmark the interrupt paths against baselines measured in the same run.
    Bench(BenchArgs),
}

/// Arguments of `irqbridge vhost-user`.
#[derive(Debug, Args)]
struct VhostUserArgs {
    /// Listen for a frontend on this unix socket; repeat it to serve several frontends (VMs)
    /// whose ports can be linked to each other.
    #[arg(short = 's', long, value_name = "PATH")]
    socket_path: Vec<PathBuf>,
    /// Serve on this already listening unix socket inherited from the parent.
    #[arg(long, value_name = "N")]
    fd: Option<RawFd>,
    /// Event-channel ports per frontend (1..=4096).
    #[arg(long, value_name = "N", default_value_t = irqbridge_core::evtchn::EVTCHN_DEFAULT_PORTS)]
    ports: u32,
    /// Upcalls (event queues) per frontend.
    #[arg(long, value_name = "N", default_value_t = irqbridge_vhost_user::DEFAULT_UPCALLS)]
    upcalls: u16,
    /// Virtio device ID the frontend should present (not assigned by OASIS; see the ABI).
    #[arg(long, value_name = "N", default_value_t = irqbridge_vhost_user::abi::DEFAULT_VIRTIO_ID)]
    virtio_id: u16,
    /// Link two ports before serving: `[C.]A:[C.]B` links port A of frontend C (the C-th
    /// socket, `--fd` first; 0 when omitted) with port B, so a doorbell or SEND on one is an
    /// event on the other. Repeatable.
    #[arg(long, value_name = "[C.]A:[C.]B", value_parser = parse_link)]
    link: Vec<(Endpoint, Endpoint)>,
    /// Print the backend capabilities as JSON (QEMU's vhost-user backend convention) and exit.
    #[arg(long)]
    print_capabilities: bool,
}

/// One side of `--link`: `[C.]P`.
fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    let (conn, port) = match s.split_once('.') {
        Some((c, p)) => (
            c.parse()
                .map_err(|_| format!("bad frontend number {c:?}"))?,
            p,
        ),
        None => (0, s),
    };
    let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    Ok((ConnId(conn), port))
}

/// `--link [C.]A:[C.]B`.
fn parse_link(s: &str) -> Result<(Endpoint, Endpoint), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("expected [C.]A:[C.]B, got {s:?}"))?;
    Ok((parse_endpoint(a)?, parse_endpoint(b)?))
}

/// Arguments of `irqbridge demo`.
#[derive(Debug, Args)]
struct DemoArgs {
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Arguments of `irqbridge bench`.
#[derive(Debug, Args)]
struct BenchArgs {
    /// Benchmark the vhost-user event-channel device instead (event latency and throughput with
    /// 1, 64 and 4096 ports; interdomain doorbell against a direct eventfd write).
    #[arg(long, conflicts_with = "row")]
    vhost_user: bool,
    /// Samples per measured path.
    #[arg(long, value_name = "N")]
    samples: Option<usize>,
    /// Run one row only: msix, intx, doorbell, region-read or region-write.
    #[arg(long, value_name = "ROW")]
    row: Option<String>,
    /// Also write the report as JSON to this file.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "target/irqbridge-bench.json"
    )]
    json: PathBuf,
}

/// Arguments of `irqbridge vfio-user`.
#[derive(Debug, Args)]
struct VfioUserArgs {
    /// Listen for the VMM on this unix socket (created with mode 0600, removed on exit).
    #[arg(short = 's', long, value_name = "PATH", required_unless_present = "fd")]
    socket_path: Option<PathBuf>,
    /// Serve on this already listening unix socket inherited from the parent.
    #[arg(long, value_name = "N", conflicts_with = "socket_path")]
    fd: Option<RawFd>,
    /// MSI-X table size (1..=2048).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MSIX_VECTORS)]
    msix_vectors: u16,
    /// Number of event-channel ports (1..=4096).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_EVTCHN_PORTS)]
    evtchn_ports: u32,
    /// Build the device without an INTx pin (INTERRUPT_PIN 0, INTx IRQ count 0).
    #[arg(long)]
    no_intx: bool,
    /// Also listen for control requests (docs/control.md) on this unix socket.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

/// Where the vfio-user server listens.
#[derive(Debug, PartialEq, Eq)]
enum Listen {
    /// Bind a new socket at this path.
    Path(PathBuf),
    /// Use this inherited listening socket.
    Fd(RawFd),
}

/// Validated configuration of `irqbridge vfio-user`.
#[derive(Debug, PartialEq, Eq)]
struct VfioUserConfig {
    listen: Listen,
    device: DeviceConfig,
    control_socket: Option<PathBuf>,
}

/// Errors of the command line tool.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// Neither or both of --socket-path and --fd.
    #[error("Exactly one of --socket-path and --fd is required.")]
    Listen,
    /// A negative or unusable --fd.
    #[error("--fd {0} is not an open listening unix socket.")]
    BadFd(RawFd),
    /// The device configuration is out of range.
    #[error("Invalid device options.")]
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
    /// The demo or the benchmark could not run (no /dev/kvm, setup failure).
    #[error("Cannot run on this machine.")]
    Integration(#[source] irqbridge_integration::Error),
    /// An unknown benchmark row.
    #[error(
        "Unknown benchmark row {0:?} (expected msix, intx, doorbell, region-read or region-write)."
    )]
    BenchRow(String),
    /// `irqbridge vhost-user` without a socket.
    #[error("At least one --socket-path or --fd is required.")]
    NoListener,
    /// The vhost-user backend failed.
    #[error("vhost-user backend failed.")]
    VhostUser(#[source] irqbridge_vhost_user::Error),
    /// Writing the benchmark JSON failed.
    #[error("Cannot write {0}.")]
    WriteJson(PathBuf, #[source] std::io::Error),
}

impl TryFrom<VfioUserArgs> for VfioUserConfig {
    type Error = CliError;

    fn try_from(a: VfioUserArgs) -> Result<Self, CliError> {
        let listen = match (a.socket_path, a.fd) {
            (Some(p), None) => Listen::Path(p),
            (None, Some(fd)) if fd >= 0 => Listen::Fd(fd),
            (None, Some(fd)) => return Err(CliError::BadFd(fd)),
            _ => return Err(CliError::Listen),
        };
        let device = DeviceConfig {
            msix_vectors: a.msix_vectors,
            evtchn_ports: a.evtchn_ports,
            intx: !a.no_intx,
        };
        device.validate().map_err(CliError::Device)?;
        Ok(VfioUserConfig {
            listen,
            device,
            control_socket: a.control_socket,
        })
    }
}

/// Arguments of `irqbridge control`.
#[derive(Debug, Args)]
struct ControlArgs {
    /// The device's control socket.
    #[arg(short = 's', long, value_name = "PATH")]
    socket: PathBuf,
    #[command(subcommand)]
    request: ControlCommand,
}

/// One control request (docs/control.md).
#[derive(Debug, Subcommand, PartialEq, Eq)]
enum ControlCommand {
    /// Raise INTx (control source).
    #[command(alias = "intx_assert")]
    IntxAssert,
    /// Lower INTx (control source).
    #[command(alias = "intx_deassert")]
    IntxDeassert,
    /// Fire an MSI-X vector.
    #[command(alias = "msix_fire")]
    MsixFire {
        /// Vector number.
        vector: u32,
    },
    /// Send an event on an event-channel port.
    #[command(alias = "evtchn_send")]
    EvtchnSend {
        /// Port number.
        port: u32,
    },
    /// Open a port and bind it to an upcall vector.
    #[command(alias = "evtchn_bind")]
    EvtchnBind {
        /// Port number.
        port: u32,
        /// Upcall (MSI-X) vector.
        vector: u32,
    },
    /// Print the device counters.
    Counters,
    /// Print the whole device state.
    Snapshot,
    /// Reset the device.
    Reset,
}

impl From<ControlCommand> for ControlRequest {
    fn from(c: ControlCommand) -> Self {
        match c {
            ControlCommand::IntxAssert => ControlRequest::IntxAssert,
            ControlCommand::IntxDeassert => ControlRequest::IntxDeassert,
            ControlCommand::MsixFire { vector } => ControlRequest::MsixFire { vector },
            ControlCommand::EvtchnSend { port } => ControlRequest::EvtchnSend { port },
            ControlCommand::EvtchnBind { port, vector } => {
                ControlRequest::EvtchnBind { port, vector }
            }
            ControlCommand::Counters => ControlRequest::Counters,
            ControlCommand::Snapshot => ControlRequest::Snapshot,
            ControlCommand::Reset => ControlRequest::Reset,
        }
    }
}

/// Adopts an inherited fd after checking that it is an open, listening unix socket.
fn adopt_listener(fd: RawFd) -> Result<UnixListener, CliError> {
    // SAFETY: F_GETFD only inspects the descriptor table entry; no memory is involved.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(CliError::BadFd(fd));
    }
    let mut domain: libc::c_int = 0;
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `domain` and `len` are valid for writes of one c_int / socklen_t.
    let r1 = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    let mut len2 = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above.
    let r2 = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len2,
        )
    };
    if r1 != 0 || r2 != 0 || domain != libc::AF_UNIX || accepting == 0 {
        return Err(CliError::BadFd(fd));
    }
    // SAFETY: the descriptor is open (checked above) and was handed to this process for the
    // server to own; nothing else in the process uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Keep it from leaking into children.
    // SAFETY: F_SETFD on an open descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(UnixListener::from(owned))
}

fn run_vfio_user(cfg: VfioUserConfig) -> Result<(), CliError> {
    // Block SIGTERM/SIGINT before any other thread exists, so that only the signal thread
    // receives them.
    let signals = signals::Signals::block().map_err(CliError::Signals)?;
    let mut device = IrqbridgeDevice::new(cfg.device).map_err(CliError::Device)?;
    if let Some(path) = &cfg.control_socket {
        let control = ControlServer::bind(path).map_err(CliError::Control)?;
        info!("irqbridge: control socket at {}", path.display());
        device.attach_control(control);
    }
    let mut server = match &cfg.listen {
        Listen::Path(p) => Server::bind(p).map_err(CliError::Server)?,
        Listen::Fd(fd) => Server::from_listener(adopt_listener(*fd)?).map_err(CliError::Server)?,
    };
    match &cfg.listen {
        Listen::Path(p) => info!("irqbridge: vfio-user server listening on {}", p.display()),
        Listen::Fd(fd) => info!("irqbridge: vfio-user server listening on fd {fd}"),
    }
    info!(
        "irqbridge: device: {} MSI-X vectors, {} event-channel ports, INTx {}",
        cfg.device.msix_vectors,
        cfg.device.evtchn_ports,
        if cfg.device.intx { "on" } else { "off" }
    );
    let stop: StopHandle = server.stop_handle();
    signals.spawn_waiter(move |sig| {
        info!("irqbridge: signal {sig}, shutting down");
        if let Err(e) = stop.stop() {
            error!("irqbridge: cannot stop the server: {e}");
        }
    });
    let result = server.run(&mut device);
    info!("irqbridge: counters at exit: {:?}", device.counters());
    // Dropping the server and the device removes the socket files they created.
    drop(server);
    drop(device);
    result.map_err(CliError::Server)
}

fn run_control(args: ControlArgs) -> Result<bool, CliError> {
    let mut client = ControlClient::connect(&args.socket).map_err(CliError::Control)?;
    let reply = client
        .call(&ControlRequest::from(args.request))
        .map_err(CliError::Control)?;
    println!("{reply}");
    Ok(reply.get("ok").and_then(|v| v.as_bool()) == Some(true))
}

fn run_vhost_user(args: VhostUserArgs) -> Result<bool, CliError> {
    use irqbridge_vhost_user::{BackendConfig, Server as VhostServer, print_capabilities};
    if args.print_capabilities {
        print!("{}", print_capabilities());
        return Ok(true);
    }
    let listen_fd = match args.fd {
        Some(fd) if fd >= 0 => Some(OwnedFd::from(adopt_listener(fd)?)),
        Some(fd) => return Err(CliError::BadFd(fd)),
        None => None,
    };
    if listen_fd.is_none() && args.socket_path.is_empty() {
        return Err(CliError::NoListener);
    }
    let config = BackendConfig {
        sockets: args.socket_path,
        listen_fd,
        ports: args.ports,
        upcalls: args.upcalls,
        virtio_id: args.virtio_id,
        links: args.link,
        ..BackendConfig::default()
    };
    let signals = signals::Signals::block().map_err(CliError::Signals)?;
    let server = VhostServer::start(config).map_err(CliError::VhostUser)?;
    let stop = server.stop_handle();
    signals.spawn_waiter(move |sig| {
        info!("irqbridge: signal {sig}, shutting down");
        stop.stop();
    });
    server.wait().map_err(CliError::VhostUser)?;
    Ok(true)
}

fn run_demo(args: DemoArgs) -> Result<bool, CliError> {
    use irqbridge_integration::demo::{self, DemoOptions};
    let report = demo::run(&DemoOptions::default()).map_err(CliError::Integration)?;
    if args.json {
        println!("{:#}", report.to_json());
    } else {
        report.print_table();
    }
    Ok(report.passed())
}

fn run_bench(args: BenchArgs) -> Result<bool, CliError> {
    use irqbridge_integration::bench::{self, BenchOptions, Row};
    if args.vhost_user {
        let report = irqbridge_vhost_user::bench::run().map_err(CliError::VhostUser)?;
        report.print_table();
        return Ok(true);
    }
    let mut opts = BenchOptions::default();
    if let Some(n) = args.samples {
        opts.iterations = n;
    }
    if let Some(name) = args.row {
        opts.only = Some(Row::from_name(&name).ok_or(CliError::BenchRow(name))?);
    }
    let report = bench::run(&opts).map_err(CliError::Integration)?;
    report.print_table();
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CliError::WriteJson(args.json.clone(), e))?;
    }
    std::fs::write(&args.json, format!("{:#}\n", report.to_json()))
        .map_err(|e| CliError::WriteJson(args.json.clone(), e))?;
    println!("JSON report: {}", args.json.display());
    Ok(report.all_met())
}

fn print_error(e: &dyn std::error::Error) {
    eprintln!("irqbridge: {e}");
    let mut cur = e.source();
    while let Some(s) = cur {
        eprintln!("  caused by: {s}");
        cur = s.source();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo and the benchmark print their own report; the servers they start in-process
    // only log what goes wrong unless RUST_LOG says otherwise.
    let default_filter = match cli.command {
        Command::Demo(_) | Command::Bench(_) => "warn",
        _ => "info",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        .target(env_logger::Target::Stderr)
        .init();
    let result = match cli.command {
        Command::VfioUser(args) => VfioUserConfig::try_from(args)
            .and_then(run_vfio_user)
            .map(|()| true),
        Command::Control(args) => run_control(args),
        Command::VhostUser(args) => run_vhost_user(args),
        Command::Demo(args) => run_demo(args),
        Command::Bench(args) => run_bench(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("irqbridge").chain(args.iter().copied()))
    }

    fn vfio_user(args: &[&str]) -> Result<VfioUserConfig, String> {
        match parse(args).map_err(|e| e.to_string())?.command {
            Command::VfioUser(a) => VfioUserConfig::try_from(a).map_err(|e| e.to_string()),
            c => panic!("unexpected {c:?}"),
        }
    }

    #[test]
    fn vhost_user_links_parse() {
        assert_eq!(parse_link("1:5"), Ok(((ConnId(0), 1), (ConnId(0), 5))));
        assert_eq!(
            parse_link("0.2:1.71"),
            Ok(((ConnId(0), 2), (ConnId(1), 71)))
        );
        assert!(parse_link("5").is_err());
        assert!(parse_link("a:1").is_err());
        assert!(parse_link("1.x:2").is_err());
        assert!(parse(&["vhost-user", "-s", "/tmp/x", "--link", "3"]).is_err());
    }

    #[test]
    fn vfio_user_defaults_and_options() {
        let c = vfio_user(&["vfio-user", "--socket-path", "/tmp/x.sock"]).unwrap();
        assert_eq!(
            c,
            VfioUserConfig {
                listen: Listen::Path("/tmp/x.sock".into()),
                device: DeviceConfig::default(),
                control_socket: None,
            }
        );
        let c = vfio_user(&[
            "vfio-user",
            "--fd=3",
            "--msix-vectors",
            "2048",
            "--evtchn-ports=4096",
            "--no-intx",
            "--control-socket",
            "/tmp/c.sock",
        ])
        .unwrap();
        assert_eq!(c.listen, Listen::Fd(3));
        assert_eq!(
            c.device,
            DeviceConfig {
                msix_vectors: 2048,
                evtchn_ports: 4096,
                intx: false
            }
        );
        assert_eq!(c.control_socket, Some("/tmp/c.sock".into()));
    }

    #[test]
    fn vfio_user_rejects_bad_arguments() {
        assert!(vfio_user(&["vfio-user"]).is_err());
        assert!(vfio_user(&["vfio-user", "-s", "a", "--fd", "3"]).is_err());
        assert!(vfio_user(&["vfio-user", "-s", "a", "--msix-vectors", "0"]).is_err());
        assert!(vfio_user(&["vfio-user", "-s", "a", "--msix-vectors", "2049"]).is_err());
        assert!(vfio_user(&["vfio-user", "-s", "a", "--msix-vectors", "70000"]).is_err());
        assert!(vfio_user(&["vfio-user", "-s", "a", "--evtchn-ports", "4097"]).is_err());
        assert!(vfio_user(&["vfio-user", "-s", "a", "--evtchn-ports", "0"]).is_err());
        let e = vfio_user(&["vfio-user", "--fd", "-1"]).unwrap_err();
        assert!(e.contains("-1"), "{e}");
    }

    #[test]
    fn control_commands() {
        let cases: [(&[&str], ControlRequest); 8] = [
            (&["intx-assert"], ControlRequest::IntxAssert),
            (&["intx_deassert"], ControlRequest::IntxDeassert),
            (&["msix-fire", "3"], ControlRequest::MsixFire { vector: 3 }),
            (
                &["evtchn-send", "7"],
                ControlRequest::EvtchnSend { port: 7 },
            ),
            (
                &["evtchn-bind", "7", "1"],
                ControlRequest::EvtchnBind { port: 7, vector: 1 },
            ),
            (&["counters"], ControlRequest::Counters),
            (&["snapshot"], ControlRequest::Snapshot),
            (&["reset"], ControlRequest::Reset),
        ];
        for (args, want) in cases {
            let mut v = vec!["control", "--socket", "/tmp/c.sock"];
            v.extend_from_slice(args);
            match parse(&v).unwrap().command {
                Command::Control(c) => {
                    assert_eq!(c.socket, PathBuf::from("/tmp/c.sock"));
                    assert_eq!(ControlRequest::from(c.request), want);
                }
                c => panic!("unexpected {c:?}"),
            }
        }
        assert!(parse(&["control", "--socket", "x", "msix-fire"]).is_err());
        assert!(parse(&["control", "counters"]).is_err());
    }

    #[test]
    fn adopt_listener_checks_the_fd() {
        assert!(adopt_listener(-1).is_err());
        // A pipe is not a socket.
        let mut p = [0; 2];
        // SAFETY: `p` has room for two fds.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        assert!(matches!(adopt_listener(p[0]), Err(CliError::BadFd(_))));
        // SAFETY: closing the pipe we created (adopt_listener did not take it).
        unsafe {
            libc::close(p[0]);
            libc::close(p[1]);
        }
    }
}
