//! Builds the test guest kernel (`guest/kernel.S`) into an ELF64 with binutils.
//!
//! Why binutils and not a Rust assembler: the guest is meant to be read, and GNU
//! `as` source with a linker script is the most readable form a kernel entry,
//! descriptor tables and interrupt stubs take. `as` and `ld` come with every
//! Linux toolchain that can link Rust (rustc's default linker drives them), so
//! the build needs nothing new. Only x86-64 Linux targets build the guest; the
//! path of the result reaches the crate as `SQUIB_GUEST_KERNEL`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=guest/kernel.S");
    println!("cargo:rerun-if-changed=guest/kernel.ld");
    println!("cargo:rerun-if-changed=build.rs");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch != "x86_64" || os != "linux" {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("kernel.o");
    let elf = out.join("squib-guest.elf");
    run(Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&obj)
        .arg("guest/kernel.S"));
    run(Command::new("ld")
        .args(["-nostdlib", "-static", "-z", "max-page-size=0x1000"])
        .arg("--no-warn-rwx-segments")
        .args(["-T", "guest/kernel.ld", "-o"])
        .arg(&elf)
        .arg(&obj));
    println!("cargo:rustc-env=SQUIB_GUEST_KERNEL={}", elf.display());
}

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("building the guest kernel: cannot run {cmd:?}: {e} (install binutils)"));
    assert!(
        status.success(),
        "building the guest kernel: {cmd:?} failed with {status}"
    );
}
