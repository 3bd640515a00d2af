//! `irqbridge-ci-vhost-backend`: the irqbridge event-channel vhost-user backend for the QEMU
//! guest tests, with loopback links between ports.
//!
//! ```text
//! irqbridge-ci-vhost-backend --socket-path PATH [--socket-path PATH ...] [--ports N]
//!                            [--upcalls N] [--virtio-id N] [--link [C.]A:[C.]B ...]
//! ```
//!
//! It is `irqbridge vhost-user` (same options, same [`BackendConfig`]) plus `--link`: each link
//! joins port A of connection C (default 0) with port B, so that a guest's SEND request or
//! doorbell on one end is an event on the other (`Backend::connect_interdomain`). A guest can
//! then make events for itself without any host-side harness. The links exist before the line
//! `IRQBRIDGE-VHOST-READY` is printed on stdout; the process runs until it is killed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use irqbridge_vhost_user::{BackendConfig, ConnId, Endpoint, Server};

/// The line printed on stdout once the sockets listen and every link is made.
const READY: &str = "IRQBRIDGE-VHOST-READY";

#[derive(Debug, Default)]
struct Args {
    config: BackendConfig,
    links: Vec<(Endpoint, Endpoint)>,
}

fn number<T: std::str::FromStr>(opt: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{opt} needs a number, got {v:?}"))
}

/// `[C.]P`: port P of connection C (0 when omitted).
fn endpoint(s: &str) -> Result<Endpoint, String> {
    let (conn, port) = match s.split_once('.') {
        Some((c, p)) => (number("--link", c)?, p),
        None => (0, s),
    };
    Ok((ConnId(conn), number("--link", port)?))
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = args.into_iter();
    while let Some(opt) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{opt} needs a value"));
        match opt.as_str() {
            "--socket-path" | "-s" => a.config.sockets.push(PathBuf::from(value()?)),
            "--ports" => a.config.ports = number(&opt, &value()?)?,
            "--upcalls" => a.config.upcalls = number(&opt, &value()?)?,
            "--virtio-id" => a.config.virtio_id = number(&opt, &value()?)?,
            "--link" => {
                let v = value()?;
                let (x, y) = v
                    .split_once(':')
                    .ok_or_else(|| format!("--link needs A:B, got {v:?}"))?;
                a.links.push((endpoint(x)?, endpoint(y)?));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.config.sockets.is_empty() {
        return Err("at least one --socket-path is needed".into());
    }
    Ok(a)
}

fn run(args: Args) -> Result<(), String> {
    let server = Server::start(args.config).map_err(|e| format!("starting the backend: {e}"))?;
    for (a, b) in &args.links {
        server
            .backend()
            .connect_interdomain(*a, *b)
            .map_err(|e| format!("linking {a:?} with {b:?}: {e}"))?;
    }
    let mut out = std::io::stdout();
    writeln!(out, "{READY}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    server.wait().map_err(|e| format!("backend failed: {e}"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let result = parse(std::env::args().skip(1)).and_then(run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("irqbridge-ci-vhost-backend: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_and_links_parse() {
        let a = parse(args(&[
            "--socket-path",
            "/tmp/a.sock",
            "--upcalls",
            "1",
            "--link",
            "1:5",
            "--link",
            "0.2:1.71",
        ]))
        .expect("valid");
        assert_eq!(a.config.sockets, vec![PathBuf::from("/tmp/a.sock")]);
        assert_eq!(a.config.upcalls, 1);
        assert_eq!(
            a.links,
            vec![
                ((ConnId(0), 1), (ConnId(0), 5)),
                ((ConnId(0), 2), (ConnId(1), 71))
            ]
        );
    }

    #[test]
    fn bad_arguments_are_rejected() {
        assert!(parse(args(&[])).is_err());
        assert!(parse(args(&["--socket-path"])).is_err());
        assert!(parse(args(&["-s", "x", "--link", "5"])).is_err());
        assert!(parse(args(&["-s", "x", "--link", "a:5"])).is_err());
        assert!(parse(args(&["-s", "x", "--ports", "many"])).is_err());
        assert!(parse(args(&["-s", "x", "--bogus"])).is_err());
    }
}
