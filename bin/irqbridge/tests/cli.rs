// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `irqbridge` binary as a process: startup, control socket, `irqbridge control`,
//! `--fd`, and clean shutdown on SIGTERM / SIGINT.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};

use irqbridge_vfio_user::control::ControlClient;
use serde_json::{Value, json};

use common::{BIN, Proc, TempDir, signal, vfio_user_hello, wait_exit, wait_for};

fn control_cli(sock: &Path, args: &[&str]) -> (bool, Value) {
    let out = Command::new(BIN)
        .arg("control")
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    (
        out.status.success(),
        serde_json::from_str(text.trim()).unwrap(),
    )
}

#[test]
fn serve_control_and_sigterm() {
    let dir = TempDir::new("term");
    let vu = dir.0.join("vu.sock");
    let ctl = dir.0.join("ctl.sock");
    let mut child = Proc(
        Command::new(BIN)
            .args([
                "vfio-user",
                "--msix-vectors",
                "32",
                "--no-intx",
                "--socket-path",
            ])
            .arg(&vu)
            .arg("--control-socket")
            .arg(&ctl)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for(&vu, &mut child.0);
    wait_for(&ctl, &mut child.0);

    let info = vfio_user_hello(UnixStream::connect(&vu).unwrap());
    assert_eq!((info.flags, info.num_regions, info.num_irqs), (3, 9, 5));

    let mut c = ControlClient::connect(&ctl).unwrap();
    let snap = c.request(&json!({"cmd":"snapshot"})).unwrap();
    assert_eq!(
        snap["snapshot"]["config"],
        json!({"msix_vectors": 32, "evtchn_ports": 1024, "intx": false, "msi_vectors": 4})
    );
    let r = c.request(&json!({"cmd":"intx_assert"})).unwrap();
    assert_eq!(r["ok"], false, "no INTx pin: {r}");

    let (ok, reply) = control_cli(&ctl, &["msix-fire", "31"]);
    assert!(ok);
    assert_eq!(reply, json!({"ok": true, "delivery": "pending"}));
    let (ok, reply) = control_cli(&ctl, &["msix_fire", "32"]);
    assert!(!ok, "an error reply gives a failing exit status");
    assert_eq!(reply["ok"], false);
    let (ok, reply) = control_cli(&ctl, &["counters"]);
    assert!(ok);
    assert_eq!(reply["counters"]["msix_pending"], 1);

    signal(&child.0, libc::SIGTERM);
    let status = wait_exit(&mut child.0);
    assert!(status.success(), "{status}");
    assert!(!vu.exists(), "vfio-user socket removed");
    assert!(!ctl.exists(), "control socket removed");
    let mut log = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.contains("shutting down"), "{log}");
}

#[test]
fn inherited_fd_and_sigint() {
    let dir = TempDir::new("fd");
    let path = dir.0.join("inherited.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // A copy without close-on-exec for the child.
    // SAFETY: dup of a descriptor we own; the result is checked.
    let fd = unsafe { libc::dup(listener.as_raw_fd()) };
    assert!(fd >= 0);
    let child = Command::new(BIN)
        .args(["vfio-user", "--fd"])
        .arg(fd.to_string())
        .stderr(Stdio::null())
        .spawn();
    // SAFETY: closing our copy; the child has its own.
    unsafe { libc::close(fd) };
    let mut child = Proc(child.unwrap());
    drop(listener);

    let info = vfio_user_hello(UnixStream::connect(&path).unwrap());
    assert_eq!(info.num_irqs, 5);

    signal(&child.0, libc::SIGINT);
    let status = wait_exit(&mut child.0);
    assert!(status.success(), "{status}");
    assert!(
        path.exists(),
        "a socket the server did not create is left alone"
    );
}

#[test]
fn bad_arguments_fail() {
    for args in [
        &["vfio-user"][..],
        &[
            "vfio-user",
            "--socket-path",
            "/tmp/x",
            "--msix-vectors",
            "0",
        ],
        &["vfio-user", "--fd", "99999"],
        &[
            "control",
            "--socket",
            "/nonexistent/irqbridge.sock",
            "counters",
        ],
        &["nonsense"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: an error message");
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .starts_with("irqbridge ")
    );
}

#[test]
fn vhost_user_serves_two_sockets_and_sigterm() {
    use vhost::VhostBackend;
    use vhost::vhost_user::Frontend;

    let out = Command::new(BIN)
        .args(["vhost-user", "--print-capabilities"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(caps["type"].is_string(), "{caps}");

    let dir = TempDir::new("vhost");
    let a = dir.0.join("a.sock");
    let b = dir.0.join("b.sock");
    let child = Command::new(BIN)
        .args(["vhost-user", "--socket-path"])
        .arg(&a)
        .arg("--socket-path")
        .arg(&b)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Proc(child);
    wait_for(&a, &mut child.0);
    wait_for(&b, &mut child.0);
    // Both sockets serve a real vhost-user frontend.
    for sock in [&a, &b] {
        let frontend = Frontend::connect(sock, 64).unwrap();
        let features = frontend.get_features().unwrap();
        assert_ne!(
            features & (1 << 32),
            0,
            "VIRTIO_F_VERSION_1 offered: {features:#x}"
        );
    }
    signal(&child.0, libc::SIGTERM);
    assert!(wait_exit(&mut child.0).success());
    assert!(!a.exists() && !b.exists(), "socket files removed on exit");

    let status = Command::new(BIN)
        .args(["vhost-user"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "no socket is an error");
}

/// The main job: `irqbridge demo` passes every scenario on /dev/kvm and says so in its table.
#[test]
fn demo_passes_every_scenario() {
    if let Some(reason) = irqbridge_integration::kvm_unavailable_reason() {
        eprintln!("SKIPPED: /dev/kvm not available ({reason})");
        let out = Command::new(BIN).arg("demo").output().unwrap();
        assert!(!out.status.success(), "demo without /dev/kvm must fail");
        return;
    }
    let out = Command::new(BIN).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = stdout.lines().filter(|l| l.contains(" PASS ")).count();
    // Every scenario plus the vhost-user row.
    let want = irqbridge_integration::scenarios::Scenario::ALL.len() + 1;
    assert_eq!(rows, want, "{stdout}");
    assert!(!stdout.contains(" FAIL "), "{stdout}");
}
