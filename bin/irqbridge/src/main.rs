// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `irqbridge`: serve the irqbridge interrupt devices over vfio-user and vhost-user, talk to
//! the control socket, run the demo and the benchmark.
//!
//! This file only parses the command line (clap) and calls the `irqbridge` library
//! (`src/lib.rs`: listener adoption, socket activation, signals, run loops) or the integration
//! crate (demo, bench). The long help of every subcommand is in `help.rs`; `irqbridge man` and
//! `irqbridge completions SHELL` are generated from the same definitions.
//!
//! Exit status: 0 success, 1 failure, 2 usage error (clap's own errors and ours alike, printed
//! in clap's style and naming the option at fault).

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::PossibleValuesParser;
use clap::builder::TypedValueParser;
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use irqbridge::daemon::{self, Listen, VfioUserConfig};
use irqbridge_vfio_user::control::{ControlClient, ControlRequest};
use irqbridge_vfio_user::pci::{DEFAULT_EVTCHN_PORTS, DEFAULT_MSIX_VECTORS, DeviceConfig};
use irqbridge_vhost_user::{ConnId, Endpoint};
use log::LevelFilter;

mod help;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "irqbridge",
    version,
    about,
    long_about = help::MAIN_ABOUT,
    after_long_help = help::MAIN_AFTER,
    propagate_version = true
)]
struct Cli {
    /// Log level on stderr; overrides RUST_LOG.
    ///
    /// Without it RUST_LOG applies (env_logger filter syntax, e.g.
    /// RUST_LOG=irqbridge_vfio_user=debug); the default is info for the servers and warn for
    /// demo and bench.
    #[arg(
        long,
        global = true,
        value_name = "LEVEL",
        value_parser = PossibleValuesParser::new(["off", "error", "warn", "info", "debug", "trace"])
            .map(|s| s.parse::<LevelFilter>().unwrap_or(LevelFilter::Info))
    )]
    log_level: Option<LevelFilter>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the irqbridge PCI test device (docs/device-abi.md) over vfio-user.
    #[command(long_about = help::VFIO_USER_ABOUT, after_long_help = help::VFIO_USER_AFTER)]
    VfioUser(VfioUserArgs),
    /// Send one request to a running device's control socket and print the JSON reply.
    #[command(long_about = help::CONTROL_ABOUT, after_long_help = help::CONTROL_AFTER)]
    Control(ControlArgs),
    /// Serve the event-channel device (docs/evtchn-virtio.md) as a vhost-user backend.
    #[command(long_about = help::VHOST_USER_ABOUT, after_long_help = help::VHOST_USER_AFTER)]
    VhostUser(VhostUserArgs),
    /// Run every interrupt scenario end to end on /dev/kvm and print a table.
    #[command(long_about = help::DEMO_ABOUT, after_long_help = help::DEMO_AFTER)]
    Demo(DemoArgs),
    /// Benchmark the interrupt paths against baselines measured in the same run.
    #[command(long_about = help::BENCH_ABOUT, after_long_help = help::BENCH_AFTER)]
    Bench(BenchArgs),
    /// Serve a host PCI device bound to vfio-pci over vfio-user (docs/passthrough.md).
    #[command(long_about = help::PASSTHROUGH_ABOUT, after_long_help = help::PASSTHROUGH_AFTER)]
    Passthrough(PassthroughArgs),
    /// Print a shell completion script.
    #[command(long_about = help::COMPLETIONS_ABOUT, after_long_help = help::COMPLETIONS_AFTER)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page.
    #[command(long_about = help::MAN_ABOUT, after_long_help = help::MAN_AFTER)]
    Man {
        /// Write irqbridge.1 and one irqbridge-COMMAND.1 per subcommand into this directory
        /// instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Arguments of `irqbridge passthrough`.
#[derive(Debug, Args)]
struct PassthroughArgs {
    /// The host PCI device, DDDD:BB:SS.F, bound to vfio-pci.
    #[arg(long, value_name = "DDDD:BB:SS.F")]
    device: String,
    /// Listen for the VMM on this unix socket (created with mode 0600, removed on exit).
    #[arg(short = 's', long, value_name = "PATH")]
    socket_path: Option<PathBuf>,
    /// Serve on this already listening unix socket inherited from the parent.
    #[arg(long, value_name = "N", conflicts_with = "socket_path")]
    fd: Option<RawFd>,
    /// Let the client mmap the BAR pages that hold neither the MSI-X table nor the PBA. Trust:
    /// the client then drives those device registers directly, unseen by the server, and can
    /// start device DMA on its own (only into memory it DMA-mapped, the IOMMU enforces that);
    /// interrupt routing and masking stay with the server. Without it every BAR access is a
    /// message the server checks and performs.
    #[arg(long)]
    mmap_bars: bool,
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
    #[arg(
        long,
        value_name = "N",
        default_value_t = irqbridge_core::evtchn::EVTCHN_DEFAULT_PORTS,
        value_parser = clap::value_parser!(u32)
            .range(1..=i64::from(irqbridge_core::evtchn::EVTCHN_MAX_PORTS))
    )]
    ports: u32,
    /// Upcalls (event queues) per frontend (1..=62).
    #[arg(
        long,
        value_name = "N",
        default_value_t = irqbridge_vhost_user::DEFAULT_UPCALLS,
        value_parser = clap::value_parser!(u16)
            .range(1..=i64::from(irqbridge_vhost_user::abi::MAX_UPCALLS))
    )]
    upcalls: u16,
    /// Virtio device ID the frontend should present (not assigned by OASIS; see the ABI).
    #[arg(
        long,
        value_name = "N",
        default_value_t = irqbridge_vhost_user::abi::DEFAULT_VIRTIO_ID,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    virtio_id: u16,
    /// Link two ports before serving: `[C.]A:[C.]B` links port A of frontend C (the C-th
    /// socket, `--fd` first; 0 when omitted) with port B, so a doorbell or SEND on one is an
    /// event on the other. Repeatable.
    #[arg(long, value_name = "[C.]A:[C.]B", value_parser = parse_link)]
    link: Vec<(Endpoint, Endpoint)>,
    /// Print the backend capabilities as JSON (QEMU's vhost-user backend convention) and exit;
    /// every other option is ignored then.
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
    /// Samples per measured path (at least 1). With --vhost-user: latency and doorbell round
    /// trips per measurement; warm-up and throughput sizes shrink with it.
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    samples: Option<usize>,
    /// Run one row only: msix, intx, doorbell, region-read or region-write.
    #[arg(long, value_name = "ROW")]
    row: Option<String>,
    /// Also write the report as JSON to this file, and a latency CDF plot per row next to it
    /// (FILE-STEM-ROW.svg). Default: target/irqbridge-bench.json, with --vhost-user
    /// target/irqbridge-bench-vhost-user.json.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Arguments of `irqbridge vfio-user`.
#[derive(Debug, Args)]
struct VfioUserArgs {
    /// Listen for the VMM on this unix socket (created with mode 0600, removed on exit).
    #[arg(short = 's', long, value_name = "PATH")]
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
    /// Number of MSI vectors: 1, 2, 4, 8, 16 or 32; 0 = no MSI capability.
    #[arg(long, value_name = "N", default_value_t = irqbridge_vfio_user::pci::regs::DEFAULT_MSI_VECTORS)]
    msi_vectors: u8,
    /// Build the device without an INTx pin (INTERRUPT_PIN 0, INTx IRQ count 0).
    #[arg(long)]
    no_intx: bool,
    /// Also listen for control requests (docs/control.md) on this unix socket.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

/// Errors of the command line tool.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// The daemon (listener adoption, servers, signals) failed.
    #[error(transparent)]
    Daemon(#[from] irqbridge::Error),
    /// The control socket failed.
    #[error("Control socket failed.")]
    Control(#[source] irqbridge_vfio_user::control::ControlError),
    /// The demo or the benchmark could not run (no /dev/kvm, setup failure).
    #[error("Cannot run on this machine.")]
    Integration(#[source] irqbridge_integration::Error),
    /// An unknown benchmark row.
    #[error(
        "--row {0:?} is not a benchmark row (expected msix, intx, doorbell, region-read or \
         region-write)."
    )]
    BenchRow(String),
    /// The vhost-user backend failed.
    #[error("vhost-user backend failed.")]
    VhostUser(#[source] irqbridge_vhost_user::Error),
    /// Writing the benchmark JSON failed.
    #[error("Cannot write {0}.")]
    WriteJson(PathBuf, #[source] std::io::Error),
    /// Writing a completion script or man page failed.
    #[error("Cannot write the output.")]
    Output(#[source] std::io::Error),
}

impl CliError {
    /// Whether the command line is at fault (exit status 2, printed in clap's style).
    fn is_usage(&self) -> bool {
        match self {
            CliError::Daemon(e) => e.is_usage(),
            CliError::BenchRow(_) => true,
            _ => false,
        }
    }
}

impl TryFrom<VfioUserArgs> for VfioUserConfig {
    type Error = CliError;

    fn try_from(a: VfioUserArgs) -> Result<Self, CliError> {
        let listen = Listen::from_args(a.socket_path, a.fd)?;
        let device = DeviceConfig {
            msix_vectors: a.msix_vectors,
            evtchn_ports: a.evtchn_ports,
            intx: !a.no_intx,
            msi_vectors: a.msi_vectors,
        };
        device
            .validate()
            .map_err(|e| CliError::Daemon(irqbridge::Error::Device(e)))?;
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

fn run_control(args: ControlArgs) -> Result<bool, CliError> {
    let mut client = ControlClient::connect(&args.socket).map_err(CliError::Control)?;
    let reply = client
        .call(&ControlRequest::from(args.request))
        .map_err(CliError::Control)?;
    println!("{reply}");
    Ok(reply.get("ok").and_then(|v| v.as_bool()) == Some(true))
}

fn run_vhost_user(args: VhostUserArgs) -> Result<bool, CliError> {
    use irqbridge_vhost_user::{BackendConfig, print_capabilities};
    if args.print_capabilities {
        print!("{}", print_capabilities());
        return Ok(true);
    }
    let config = BackendConfig {
        sockets: args.socket_path,
        ports: args.ports,
        upcalls: args.upcalls,
        virtio_id: args.virtio_id,
        links: args.link,
        ..BackendConfig::default()
    };
    daemon::run_vhost_user(config, args.fd)?;
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
    use irqbridge::progress::StderrProgress;
    use irqbridge::report;
    use irqbridge_integration::bench::{self, BenchOptions, Row};
    let progress = std::sync::Arc::new(StderrProgress::new("bench"));
    let (json, report_json, plots, met) = if args.vhost_user {
        use irqbridge_vhost_user::bench::{BenchOptions as VhostOptions, run_observed};
        let mut opts = VhostOptions::default();
        if let Some(n) = args.samples {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            opts.latency_rounds = n;
            opts.doorbell_rounds = n;
            opts.warm_up_rounds = opts.warm_up_rounds.min(n.saturating_mul(3));
            opts.throughput_events = opts.throughput_events.min(n.saturating_mul(200));
        }
        let result = run_observed(&opts, &*progress);
        progress.finish();
        let r = result.map_err(CliError::VhostUser)?;
        r.print_table();
        let json = args
            .json
            .unwrap_or_else(|| "target/irqbridge-bench-vhost-user.json".into());
        (json, r.to_json(), report::vhost_user_plots(&r), true)
    } else {
        let mut opts = BenchOptions::default();
        if let Some(n) = args.samples {
            opts.iterations = n;
        }
        if let Some(name) = args.row {
            opts.only = Some(Row::from_name(&name).ok_or(CliError::BenchRow(name))?);
        }
        irqbridge_integration::stats::set_progress_sink(Some(progress.clone()));
        let result = bench::run(&opts);
        irqbridge_integration::stats::set_progress_sink(None);
        progress.finish();
        let r = result.map_err(CliError::Integration)?;
        r.print_table();
        let json = args
            .json
            .unwrap_or_else(|| "target/irqbridge-bench.json".into());
        (
            json,
            r.to_json(),
            report::integration_plots(&r),
            r.all_met(),
        )
    };
    let paths =
        report::write(&json, report_json, &plots).map_err(|(p, e)| CliError::WriteJson(p, e))?;
    println!("JSON report: {}", json.display());
    for p in paths {
        println!("CDF plot: {}", p.display());
    }
    Ok(met)
}

/// The messages of an error and its sources, outermost first.
fn error_chain(e: &dyn std::error::Error) -> Vec<String> {
    let mut v = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        v.push(s.to_string());
        cur = s.source();
    }
    v
}

/// Replaces the names of `cmd`'s argument fields (`msix_vectors`) in `msg` with their flags
/// (`--msix-vectors`), so that a message from a library names what the user typed.
fn name_flags(msg: &str, cmd: &clap::Command) -> String {
    let mut out = msg.to_string();
    for arg in cmd.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        // Plain words ("ports", "fd") are English too; only snake_case names are fields.
        if !id.contains('_') {
            continue;
        }
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(id) {
            let before = rest[..i].chars().next_back();
            let after = rest[i + id.len()..].chars().next();
            let word =
                |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-');
            result.push_str(&rest[..i]);
            if word(before) || word(after) {
                result.push_str(id);
            } else {
                result.push_str("--");
                result.push_str(long);
            }
            rest = &rest[i + id.len()..];
        }
        result.push_str(rest);
        out = result;
    }
    out
}

/// Prints an error and returns the exit status: usage errors in clap's style with the
/// subcommand's usage line (status 2), failures as `error:` plus their causes (status 1).
fn report_error(e: &CliError, subcommand: Option<&str>) -> ExitCode {
    let mut root = Cli::command();
    root.build();
    let cmd = subcommand
        .and_then(|s| root.find_subcommand(s))
        .unwrap_or(&root)
        .clone();
    let chain: Vec<String> = error_chain(e).iter().map(|m| name_flags(m, &cmd)).collect();
    if e.is_usage() {
        // The innermost message says what is wrong with the value; the outer ones only where.
        let msg = chain.last().cloned().unwrap_or_default();
        let mut cmd = cmd;
        let _ = cmd.error(ErrorKind::ValueValidation, msg).print();
        return ExitCode::from(2);
    }
    let mut stderr = std::io::stderr().lock();
    let mut lines = chain.iter();
    if let Some(first) = lines.next() {
        let _ = writeln!(stderr, "error: {first}");
    }
    for cause in lines {
        let _ = writeln!(stderr, "  caused by: {cause}");
    }
    ExitCode::FAILURE
}

/// The subcommand a raw command line names (the first word that is not an option or the value
/// of `--log-level`), for the checks that must run before clap parses anything.
fn raw_subcommand(args: &[OsString]) -> Option<&str> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_str()?;
        if a == "--log-level" {
            it.next();
        } else if !a.starts_with('-') {
            return Some(a);
        }
    }
    None
}

/// The command line, with `vhost-user` inserted when the program runs as `vhost-user-*`: the
/// name QEMU's backend program conventions give vhost-user backends (docs/vhost-user/).
fn command_line() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let invoked_as = args
        .first()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if invoked_as.starts_with("vhost-user-") {
        args.insert(1, "vhost-user".into());
    }
    args
}

fn run_completions(shell: clap_complete::Shell) -> Result<bool, CliError> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "irqbridge", &mut out);
    std::io::stdout()
        .write_all(&out)
        .map_err(CliError::Output)?;
    Ok(true)
}

fn run_man(dir: Option<PathBuf>) -> Result<bool, CliError> {
    let cmd = Cli::command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(CliError::Output)?;
            clap_mangen::generate_to(cmd, &dir).map_err(CliError::Output)?;
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(CliError::Output)?;
            std::io::stdout()
                .write_all(&out)
                .map_err(CliError::Output)?;
        }
    }
    Ok(true)
}

fn main() -> ExitCode {
    let args = command_line();
    // QEMU's backend conventions: --print-capabilities ignores every other option, so it is
    // answered before clap could reject one.
    if raw_subcommand(&args) == Some("vhost-user")
        && args.iter().any(|a| a == "--print-capabilities")
    {
        print!("{}", irqbridge_vhost_user::print_capabilities());
        return ExitCode::SUCCESS;
    }
    let matches = Cli::command().get_matches_from(args);
    let subcommand = matches.subcommand_name().map(str::to_owned);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // The demo and the benchmark print their own report; the servers they start in-process
    // only log what goes wrong unless asked otherwise.
    let default_level = match cli.command {
        Command::Demo(_) | Command::Bench(_) => LevelFilter::Warn,
        _ => LevelFilter::Info,
    };
    irqbridge::logging::init(cli.log_level, default_level);
    let result = match cli.command {
        Command::VfioUser(args) => VfioUserConfig::try_from(args)
            .and_then(|c| daemon::run_vfio_user(c).map_err(CliError::from))
            .map(|()| true),
        Command::Control(args) => run_control(args),
        Command::VhostUser(args) => run_vhost_user(args),
        Command::Demo(args) => run_demo(args),
        Command::Bench(args) => run_bench(args),
        Command::Passthrough(a) => irqbridge::daemon::Listen::from_args(a.socket_path, a.fd)
            .map_err(CliError::from)
            .and_then(|listen| {
                let cfg = irqbridge::daemon::PassthroughConfig {
                    listen,
                    device: a.device,
                    mmap_bars: a.mmap_bars,
                };
                irqbridge::daemon::run_passthrough(cfg).map_err(CliError::from)
            })
            .map(|()| true),
        Command::Completions { shell } => run_completions(shell),
        Command::Man { dir } => run_man(dir),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => report_error(&e, subcommand.as_deref()),
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
            "--msi-vectors=32",
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
                intx: false,
                msi_vectors: 32,
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
        assert!(vfio_user(&["vfio-user", "-s", "a", "--msi-vectors", "3"]).is_err());
        assert!(vfio_user(&["vfio-user", "-s", "a", "--msi-vectors", "64"]).is_err());
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
    fn field_names_become_flags() {
        let mut root = Cli::command();
        root.build();
        let cmd = root.find_subcommand("vfio-user").unwrap();
        assert_eq!(
            name_flags("msix_vectors 0 is not in 1..=2048", cmd),
            "--msix-vectors 0 is not in 1..=2048"
        );
        assert_eq!(
            name_flags("evtchn_ports 5000, msix_vectors 2", cmd),
            "--evtchn-ports 5000, --msix-vectors 2"
        );
        // Only whole words, and plain English stays.
        assert_eq!(name_flags("my_msix_vectors x", cmd), "my_msix_vectors x");
        assert_eq!(name_flags("fd 3 socket", cmd), "fd 3 socket");
    }

    #[test]
    fn raw_subcommand_skips_options() {
        let v = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            raw_subcommand(&v(&["irqbridge", "vhost-user", "-s", "x"])),
            Some("vhost-user")
        );
        assert_eq!(
            raw_subcommand(&v(&["irqbridge", "--log-level", "debug", "vhost-user"])),
            Some("vhost-user")
        );
        assert_eq!(raw_subcommand(&v(&["irqbridge", "--version"])), None);
        assert_eq!(
            raw_subcommand(&v(&["irqbridge", "bench", "vhost-user"])),
            Some("bench")
        );
    }

    #[test]
    fn usage_errors_are_told_apart() {
        assert!(CliError::BenchRow("x".into()).is_usage());
        assert!(CliError::Daemon(irqbridge::Error::BadFd(3)).is_usage());
        assert!(!CliError::Output(std::io::Error::other("x")).is_usage());
    }
}
