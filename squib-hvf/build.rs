//! Sets `cfg(hvf)` where Hypervisor.framework for Apple Silicon exists: aarch64 macOS.
//!
//! Everything that calls into the framework is behind `cfg(hvf)`, so that on any other host the
//! crate links without it. `SQUIB_HVF_TYPECHECK=1 cargo check -p squib-hvf --all-targets` sets the
//! cfg on another host too, to type-check the macOS-only code (including the macOS integration
//! tests) where it cannot be linked: use it with `cargo check` or `cargo clippy` only.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(hvf)");
    println!("cargo::rerun-if-env-changed=SQUIB_HVF_TYPECHECK");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let typecheck = std::env::var("SQUIB_HVF_TYPECHECK").is_ok_and(|v| v == "1");
    if (os == "macos" && arch == "aarch64") || typecheck {
        println!("cargo::rustc-cfg=hvf");
    }
}
