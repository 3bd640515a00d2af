// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Assembles the bare-metal guest agent (`guests/agent.s`) into a flat binary with GNU binutils.
//!
//! `as` and `objcopy` (package `binutils`) must be installed; `AS` and `OBJCOPY` override the
//! tool names. The agent is position-independent code without a linker, so the object must not
//! carry relocations: the build fails if `objdump -r` lists any.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(tool: &str, args: &[&str]) -> String {
    let output = match Command::new(tool).args(args).output() {
        Ok(output) => output,
        Err(e) => panic!(
            "irqbridge-integration: cannot run `{tool}` ({e}). The bare-metal guest agent is \
             assembled with GNU binutils: install the `binutils` package (or set AS / OBJCOPY)."
        ),
    };
    if !output.status.success() {
        panic!(
            "irqbridge-integration: `{tool} {}` failed ({}):\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn main() {
    let src = Path::new("guests/agent.s");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=AS");
    println!("cargo:rerun-if-env-changed=OBJCOPY");

    let out_dir = match env::var_os("OUT_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => panic!("irqbridge-integration: OUT_DIR is not set (not run by cargo?)"),
    };
    let obj = out_dir.join("agent.o");
    let bin = out_dir.join("agent.bin");
    let (obj_s, bin_s) = (obj.to_string_lossy(), bin.to_string_lossy());
    let src_s = src.to_string_lossy();

    let as_tool = env::var("AS").unwrap_or_else(|_| "as".to_owned());
    let objcopy = env::var("OBJCOPY").unwrap_or_else(|_| "objcopy".to_owned());
    run(&as_tool, &["--64", "-o", &obj_s, &src_s]);

    let objdump = objcopy.replace("objcopy", "objdump");
    let relocs = run(&objdump, &["-r", &obj_s]);
    if relocs.contains("R_X86_64") {
        panic!(
            "irqbridge-integration: guests/agent.s needs relocations, but it is flattened \
             without a linker; use absolute constants or PC-relative references:\n{relocs}"
        );
    }
    run(&objcopy, &["-O", "binary", "-j", ".text", &obj_s, &bin_s]);
}
