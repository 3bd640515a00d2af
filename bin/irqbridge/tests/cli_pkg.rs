// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `irqbridge` binary as users and packagers meet it: long help, error style, socket
//! activation with a real inherited listener, completions, the man page, and the vhost-user
//! backend program conventions.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

use common::{BIN, Proc, TempDir, signal, vfio_user_hello, wait_exit, wait_for};

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut s).unwrap();
    s
}

/// The subcommands `irqbridge --help` lists (without `help`).
fn subcommands() -> Vec<String> {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    let mut names = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            if !line.starts_with("  ") {
                break;
            }
            let name = line.split_whitespace().next().unwrap().to_string();
            if name != "help" {
                names.push(name);
            }
        }
    }
    names
}

#[test]
fn every_subcommand_has_examples_and_exit_codes() {
    let subs = subcommands();
    for want in [
        "vfio-user",
        "control",
        "vhost-user",
        "demo",
        "bench",
        "completions",
        "man",
    ] {
        assert!(
            subs.iter().any(|s| s == want),
            "{want} missing from {subs:?}"
        );
    }
    let top = text(&run(&["--help"]).stdout);
    for needle in [
        "Examples:",
        "Exit status:",
        "RUST_LOG",
        "LISTEN_FDS",
        "SIGTERM",
        "--log-level",
    ] {
        assert!(
            top.contains(needle),
            "irqbridge --help lacks {needle}:\n{top}"
        );
    }
    for sub in &subs {
        let out = run(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help");
        let help = text(&out.stdout);
        assert!(
            help.contains("Examples:"),
            "{sub} --help has no examples:\n{help}"
        );
        assert!(
            help.contains(&format!("irqbridge {sub}")),
            "{sub} --help has no example of itself:\n{help}"
        );
        assert!(
            help.contains("Exit status:"),
            "{sub} --help has no exit status:\n{help}"
        );
        for code in ["0 ", "1 ", "2 "] {
            assert!(
                help.lines().any(|l| l.trim_start().starts_with(code)),
                "{sub} --help does not explain exit status {code}:\n{help}"
            );
        }
        // The short help stays short.
        let short = text(&run(&[sub, "-h"]).stdout);
        assert!(!short.contains("Exit status:"), "{sub} -h");
    }
}

#[test]
fn user_errors_name_the_flag_in_one_style() {
    let cases: [(&[&str], &str); 8] = [
        (
            &["vfio-user", "-s", "/tmp/x.sock", "--msix-vectors", "0"],
            "--msix-vectors",
        ),
        (
            &["vfio-user", "-s", "/tmp/x.sock", "--evtchn-ports", "5000"],
            "--evtchn-ports",
        ),
        (&["vfio-user", "--fd", "99999"], "--fd"),
        (&["vfio-user"], "--socket-path"),
        (&["vhost-user", "--ports", "0"], "--ports"),
        (&["vhost-user", "--upcalls", "63"], "--upcalls"),
        (&["bench", "--samples", "0"], "--samples"),
        (&["bench", "--row", "nope"], "--row"),
    ];
    for (args, flag) in cases {
        let out = Command::new(BIN)
            .args(args)
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: usage error status\n{err}"
        );
        assert!(err.starts_with("error: "), "{args:?}: clap's style\n{err}");
        assert!(err.contains(flag), "{args:?}: names {flag}\n{err}");
        assert!(
            err.contains("try '--help'"),
            "{args:?}: clap's pointer to the help\n{err}"
        );
        // No struct field names, no Rust Debug output.
        for bad in [
            "msix_vectors",
            "evtchn_ports",
            "InvalidConfig",
            "Some(",
            "caused by",
        ] {
            assert!(!err.contains(bad), "{args:?}: {bad} in\n{err}");
        }
    }
    // A failure that is not the command line's fault: status 1, same `error:` style, causes.
    let out = run(&[
        "control",
        "--socket",
        "/nonexistent/irqbridge.sock",
        "counters",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("caused by:"), "{err}");
}

#[test]
fn completions_and_man_page_come_from_the_definitions() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        for sub in [
            "vfio-user",
            "vhost-user",
            "bench",
            "socket-path",
            "log-level",
        ] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    assert_eq!(run(&["completions", "tcsh"]).status.code(), Some(2));

    let out = run(&["man"]);
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH irqbridge 1"),
        "{page}"
    );
    assert!(page.contains(".TH irqbridge 1"), "roff title");
    // roff escapes '-' as '\-'.
    for sub in ["vfio\\-user", "vhost\\-user", "completions", "Exit status"] {
        assert!(page.contains(sub), "man page lacks {sub}");
    }

    let dir = TempDir::new("man");
    let out = Command::new(BIN)
        .args(["man", "--dir"])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for page in [
        "irqbridge.1",
        "irqbridge-vfio-user.1",
        "irqbridge-vhost-user.1",
        "irqbridge-bench.1",
    ] {
        let p = dir.0.join(page);
        let body = std::fs::read_to_string(&p).unwrap_or_default();
        assert!(!body.is_empty(), "{} written", p.display());
    }
    let vfio = std::fs::read_to_string(dir.0.join("irqbridge-vfio-user.1")).unwrap();
    assert!(
        vfio.contains("Examples:") && vfio.contains("socket\\-path"),
        "{vfio}"
    );
}

/// Spawns `irqbridge args` the way systemd socket activation does: `listener` becomes fd 3
/// (without close-on-exec), `LISTEN_FDS=1` and `LISTEN_PID` is the child's own process ID.
///
/// The process ID is only known after fork, and setting an environment variable between fork
/// and exec is not async-signal-safe, so a `sh` execs the binary with `LISTEN_PID=$$`: `exec`
/// keeps the shell's process ID. The `pre_exec` hook only calls dup2(2), which is safe there.
fn spawn_activated(listener: &UnixListener, listen_pid: Option<&str>, args: &[&str]) -> Child {
    let fd = listener.as_raw_fd();
    let pid = listen_pid.unwrap_or("$$");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("LISTEN_PID={pid} LISTEN_FDS=1 exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; the closure touches no memory of the parent beyond
    // the copied descriptor number. dup2 clears FD_CLOEXEC on the new descriptor; when `fd` is
    // already 3, FD_CLOEXEC is cleared with fcntl, also async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[test]
fn vfio_user_socket_activation_with_an_inherited_listener() {
    let dir = TempDir::new("act-vfio");
    let path = dir.0.join("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut child = Proc(spawn_activated(
        &listener,
        None,
        &["vfio-user", "--no-intx"],
    ));
    drop(listener);

    // The server answers on the socket it never bound.
    let info = vfio_user_hello(UnixStream::connect(&path).unwrap());
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));

    signal(&child.0, libc::SIGTERM);
    let status = wait_exit(&mut child.0);
    let log = stderr_of(&mut child.0);
    assert!(status.success(), "{status}\n{log}");
    assert!(path.exists(), "an activated socket is systemd's to remove");
    assert!(log.contains("socket-activated fd 3"), "{log}");
    // Log lines: no doubled prefix, no Rust Debug structs, one level per line.
    for line in log.lines() {
        assert!(!line.contains("irqbridge: "), "doubled prefix: {line}");
        assert!(!line.contains(" irqbridge]"), "module path: {line}");
        assert!(
            !line.contains("Counters {") && !line.contains("Capabilities {"),
            "{line}"
        );
    }
    assert!(log.contains("counters at exit: "), "{log}");
    assert!(log.contains("SIGTERM, shutting down"), "{log}");
}

#[test]
fn vhost_user_socket_activation_with_an_inherited_listener() {
    use vhost::VhostBackend;
    use vhost::vhost_user::Frontend;

    let dir = TempDir::new("act-vhost");
    let path = dir.0.join("evtchn.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut child = Proc(spawn_activated(
        &listener,
        None,
        &["vhost-user", "--ports", "64"],
    ));
    drop(listener);

    let frontend = Frontend::connect(&path, 64).unwrap();
    let features = frontend.get_features().unwrap();
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1: {features:#x}");
    drop(frontend);

    signal(&child.0, libc::SIGTERM);
    let status = wait_exit(&mut child.0);
    assert!(status.success(), "{status}\n{}", stderr_of(&mut child.0));
}

#[test]
fn activation_variables_for_another_process_are_ignored() {
    let dir = TempDir::new("act-other");
    let listener = UnixListener::bind(dir.0.join("x.sock")).unwrap();
    // LISTEN_PID names this test process, not the server: not activated, so no socket at all.
    let me = std::process::id().to_string();
    let mut child = Proc(spawn_activated(&listener, Some(&me), &["vfio-user"]));
    let status = wait_exit(&mut child.0);
    let err = stderr_of(&mut child.0);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("--socket-path") && err.contains("LISTEN_FDS"),
        "{err}"
    );
}

#[test]
fn vhost_user_descriptor_binary() {
    use vhost::VhostBackend;
    use vhost::vhost_user::Frontend;

    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let descriptor = manifest.join("../../docs/vhost-user/50-irqbridge-evtchn.json");
    let desc: Value = serde_json::from_slice(&std::fs::read(&descriptor).unwrap()).unwrap();
    for field in ["description", "type", "binary"] {
        assert!(desc[field].is_string(), "{field} in {desc}");
    }
    let binary = Path::new(desc["binary"].as_str().unwrap());
    assert!(binary.is_absolute(), "{}", binary.display());
    let name = binary.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("vhost-user-"), "{name}");

    // Install the binary under that name, as the packaging instructions do (a symlink).
    let dir = TempDir::new("descriptor");
    let program = dir.0.join(name);
    std::os::unix::fs::symlink(BIN, &program).unwrap();

    // --print-capabilities: the descriptor's type, exit 0, every other option ignored.
    for extra in [
        &[][..],
        &["--socket-path=/nonexistent/x.sock", "--ports=0", "--bogus"][..],
    ] {
        let out = Command::new(&program)
            .arg("--print-capabilities")
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{extra:?}: {}", text(&out.stderr));
        let caps: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(caps["type"], desc["type"], "{caps}");
    }
    // The same answer from `irqbridge vhost-user`.
    let out = run(&["vhost-user", "--print-capabilities"]);
    let caps: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps["type"], desc["type"]);

    // --socket-path=PATH serves a vhost-user frontend; SIGTERM ends it with status 0.
    let sock = dir.0.join("evtchn.sock");
    let mut child = Proc(
        Command::new(&program)
            .arg(format!("--socket-path={}", sock.display()))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for(&sock, &mut child.0);
    let frontend = Frontend::connect(&sock, 64).unwrap();
    assert_ne!(frontend.get_features().unwrap() & (1 << 32), 0);
    drop(frontend);
    signal(&child.0, libc::SIGTERM);
    assert!(wait_exit(&mut child.0).success());
    assert!(!sock.exists(), "socket removed on exit");
}

/// Runs `irqbridge bench ARGS --json DIR/NAME.json` and checks the JSON report and its plots;
/// returns the report.
fn bench_json(dir: &Path, name: &str, args: &[&str]) -> Value {
    let json = dir.join(format!("{name}.json"));
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    // A missed goal (status 1) is no failure of the plumbing at these sample counts.
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{args:?}: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains(&format!("JSON report: {}", json.display())),
        "{stdout}"
    );
    // Progress went to stderr, one phase at a time, each completed.
    assert!(stderr.contains("bench "), "no progress on stderr: {stderr}");
    assert!(stderr.contains(", done"), "no completed phase: {stderr}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert!(!rows.is_empty(), "{report}");
    let plots = report["plots"].as_array().unwrap();
    assert!(!plots.is_empty(), "{report}");
    for p in plots {
        let file = dir.join(p.as_str().unwrap());
        assert!(
            file.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&format!("{name}-")),
            "{} is named after the report",
            file.display()
        );
        let svg = std::fs::read_to_string(&file).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{}",
            file.display()
        );
        assert_eq!(
            svg.matches("<polyline").count(),
            2,
            "row and baseline: {}",
            file.display()
        );
        assert!(
            stdout.contains(&format!("CDF plot: {}", file.display())),
            "{stdout}"
        );
    }
    report
}

#[test]
fn bench_vhost_user_writes_json_and_plots() {
    // No /dev/kvm needed: the vhost-user benchmark runs its guests as threads.
    let dir = TempDir::new("bench-vu");
    let report = bench_json(&dir.0, "vu", &["--vhost-user", "--samples", "2"]);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 7, "{report}");
    for r in rows {
        assert!(r["value"].as_f64().unwrap() > 0.0, "{r}");
    }
    // One plot per latency row: 1, 64, 4096 ports and the doorbell.
    let plots: Vec<&str> = report["plots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        plots,
        [
            "vu-latency-1.svg",
            "vu-latency-64.svg",
            "vu-latency-4096.svg",
            "vu-doorbell.svg"
        ]
    );
}

#[test]
fn bench_rows_write_json_and_plots() {
    if let Some(reason) = irqbridge_integration::kvm_unavailable_reason() {
        eprintln!("SKIPPED: /dev/kvm not available ({reason})");
        return;
    }
    let dir = TempDir::new("bench-kvm");
    // Every row at once, with the fewest samples.
    let all = bench_json(&dir.0, "all", &["--samples", "1"]);
    let names: Vec<&str> = all["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["row"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "msix_fire",
            "intx_loop",
            "doorbell",
            "region_read",
            "region_write_posted"
        ],
        "{all}"
    );
    assert_eq!(
        all["plots"].as_array().map(Vec::len),
        Some(names.len()),
        "one plot per row: {all}"
    );
    assert_eq!(all["iterations"], 1);
    for r in all["rows"].as_array().unwrap() {
        assert_eq!(r["measured_cdf"].as_array().unwrap().len(), 103, "{r}");
        assert_eq!(r["baseline_cdf"].as_array().unwrap().len(), 103, "{r}");
    }
    // One row.
    let one = bench_json(&dir.0, "msix", &["--row", "msix", "--samples", "1"]);
    assert_eq!(one["rows"].as_array().unwrap().len(), 1);
    assert_eq!(one["plots"], serde_json::json!(["msix-msix.svg"]));
}

/// Starts `irqbridge vfio-user -s DIR/NAME.sock EXTRA` with `env` and stderr on a pipe whose
/// identity is passed as `JOURNAL_STREAM` if `journal`; stops it with SIGTERM once the socket
/// exists and returns its stderr.
fn vfio_user_log(
    dir: &Path,
    name: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    journal: bool,
) -> String {
    use std::os::unix::fs::MetadataExt;
    let (mut reader, writer) = std::io::pipe().unwrap();
    let meta = std::fs::metadata(format!("/proc/self/fd/{}", writer.as_raw_fd())).unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(BIN);
    cmd.arg("vfio-user")
        .arg("--socket-path")
        .arg(&sock)
        .args(extra)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(writer);
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    } else {
        cmd.env_remove("JOURNAL_STREAM");
    }
    let mut child = Proc(cmd.spawn().unwrap());
    // Our copy of the write end is gone with `cmd`, so reading ends when the child exits.
    drop(cmd);
    wait_for(&sock, &mut child.0);
    signal(&child.0, libc::SIGTERM);
    assert!(wait_exit(&mut child.0).success());
    let mut log = String::new();
    std::io::Read::read_to_string(&mut reader, &mut log).unwrap();
    log
}

#[test]
fn log_format_level_precedence_and_journal_priorities() {
    let dir = TempDir::new("log");
    // Plain stderr: time stamp, level, message; no module path, no doubled prefix.
    let log = vfio_user_log(&dir.0, "plain", &[], &[], false);
    let line = log
        .lines()
        .find(|l| l.contains("vfio-user: listening on"))
        .unwrap_or_else(|| panic!("{log}"));
    let mut words = line.split_whitespace();
    let ts = words.next().unwrap();
    assert!(
        ts.len() >= 20 && ts.ends_with('Z') && ts.contains('T'),
        "{line}"
    );
    assert_eq!(words.next(), Some("INFO"), "{line}");
    assert_eq!(words.next(), Some("vfio-user:"), "{line}");

    // --log-level wins over RUST_LOG.
    let log = vfio_user_log(
        &dir.0,
        "quiet",
        &["--log-level", "warn"],
        &[("RUST_LOG", "debug")],
        false,
    );
    assert!(!log.contains("INFO") && !log.contains("DEBUG"), "{log}");
    let log = vfio_user_log(
        &dir.0,
        "loud",
        &["--log-level", "info"],
        &[("RUST_LOG", "off")],
        false,
    );
    assert!(log.contains(" INFO "), "{log}");
    // RUST_LOG applies without it.
    let log = vfio_user_log(&dir.0, "rustlog", &[], &[("RUST_LOG", "warn")], false);
    assert!(!log.contains(" INFO "), "{log}");

    // stderr is the journal: sd-daemon priority prefixes, no time stamps.
    let log = vfio_user_log(&dir.0, "journal", &[], &[], true);
    assert!(!log.is_empty());
    for line in log.lines() {
        assert!(
            line.starts_with("<6>") || line.starts_with("<4>") || line.starts_with("<3>"),
            "{line}"
        );
        assert!(!line.contains("Z INFO"), "{line}");
    }
    assert!(log.contains("<6>vfio-user: listening on"), "{log}");
    // A JOURNAL_STREAM that names another file is not the journal.
    let log = vfio_user_log(&dir.0, "other", &[], &[("JOURNAL_STREAM", "1:1")], false);
    assert!(log.lines().all(|l| !l.starts_with('<')), "{log}");
}
