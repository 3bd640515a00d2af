// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `irqbridge passthrough` error paths that run on any host: each exits non-zero with a
//! message that says what is wrong, and no socket is left behind.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_irqbridge"))
        .arg("passthrough")
        .args(args)
        .output()
        .expect("run irqbridge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sock(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("irqbridge-pt-{name}-{}.sock", std::process::id()))
        .display()
        .to_string()
}

#[test]
fn a_nonexistent_device_is_refused() {
    let s = sock("none");
    let (rc, err) = run(&["--device", "ffff:ff:1f.7", "--socket-path", &s]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("There is no PCI device ffff:ff:1f.7"), "{err}");
    assert!(!std::path::Path::new(&s).exists());
}

#[test]
fn a_malformed_address_is_refused() {
    let (rc, err) = run(&["--device", "00:04", "--socket-path", &sock("bad")]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("is not a PCI address"), "{err}");
}

#[test]
fn a_device_not_bound_to_vfio_pci_is_refused() {
    let Ok(dir) = std::fs::read_dir("/sys/bus/pci/devices") else {
        println!("SKIPPED: no /sys/bus/pci/devices");
        return;
    };
    let found = dir.flatten().find_map(|e| {
        let driver = std::fs::read_link(e.path().join("driver")).ok()?;
        let name = driver.file_name()?.to_string_lossy().into_owned();
        (name != "vfio-pci").then(|| (e.file_name().to_string_lossy().into_owned(), name))
    });
    let Some((bdf, driver)) = found else {
        println!("SKIPPED: no PCI device bound to a driver other than vfio-pci");
        return;
    };
    let s = sock("bound");
    let (rc, err) = run(&["--device", &bdf, "--socket-path", &s]);
    assert_eq!(rc, 1, "{err}");
    assert!(
        err.contains(&format!("is bound to {driver}, not bound to vfio-pci")),
        "{err}"
    );
    assert!(!std::path::Path::new(&s).exists());
}

#[test]
fn a_socket_is_required() {
    let (rc, err) = run(&["--device", "0000:00:04.0"]);
    assert_eq!(rc, 2, "{err}");
}
