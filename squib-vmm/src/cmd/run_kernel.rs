//! `squib run --backend kvm --kernel ELF`: boot a 64-bit ELF kernel on KVM.
//!
//! The console is COM1, shown on standard output and, with `--serial-file`,
//! appended to a file as well. The run ends after `--for`, or when the guest
//! fails (a guest panic, a triple fault, a KVM error), which is an error.
//!
//! With `--api-sock` squib serves Firecracker's API: with `--kernel` the guest
//! boots at once and the API pauses, snapshots and resumes it; without, the
//! process waits for `PUT /machine-config`, `PUT /boot-source` and
//! `InstanceStart`, or for `PUT /snapshot/load`.

use super::CmdResult;
use super::run::RunArgs;

/// Boot `args.kernel` and run it.
///
/// # Errors
/// An option this path does not support yet, an invalid configuration, a
/// kernel that does not load, or a guest that fails while running.
pub fn run(args: RunArgs) -> CmdResult {
    imp::run(args)
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    use std::fs::OpenOptions;
    use std::path::Path;
    use std::process::ExitCode;
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use squib_kvm_sim::machine::console::Stdout;
    use squib_kvm_sim::machine::{Console, Machine, MachineConfig};

    use crate::api::vmm::Vmm;

    use super::super::run::{BackendKind, RunArgs};
    use super::CmdResult;

    pub(super) fn run(args: RunArgs) -> CmdResult {
        if args.backend != BackendKind::Kvm {
            bail!(
                "--kernel/--api-sock {}: needs --backend kvm (got {:?})",
                args.kernel
                    .as_deref()
                    .or(args.api_sock.as_deref())
                    .unwrap_or(Path::new(""))
                    .display(),
                args.backend
            );
        }
        if let Some(initrd) = &args.initrd {
            bail!(
                "--initrd {}: not supported by squib's KVM machine yet",
                initrd.display()
            );
        }
        if args.snapshot_every.is_some() || args.snapshot_dir.is_some() {
            bail!("--snapshot-every/--snapshot-dir with --kernel: not built into squib yet");
        }
        let vcpus = u8::try_from(args.vcpus).with_context(|| format!("--vcpus {}: too many", args.vcpus))?;
        let serial_file = args.serial_file.clone();
        let console = move || -> std::io::Result<Console> {
            let mut console = Console::new().with_sink(Box::new(Stdout));
            if let Some(path) = &serial_file {
                let file = OpenOptions::new().create(true).append(true).open(path)?;
                console = console.with_sink(Box::new(file));
            }
            Ok(console)
        };
        let config = MachineConfig {
            mem_size: args.mem,
            vcpus,
            cmdline: args.cmdline.clone().unwrap_or_default(),
            track_dirty_pages: false,
        };
        if let Some(sock) = &args.api_sock {
            let mut vmm = Vmm::new(Box::new(console));
            if let Some(kernel) = &args.kernel {
                config
                    .validate()
                    .with_context(|| format!("booting {}", kernel.display()))?;
                vmm.configure(config, kernel.clone());
                vmm.start().map_err(anyhow::Error::msg)?;
            }
            crate::api::serve(sock, vmm, args.run_for)?;
            return Ok(ExitCode::SUCCESS);
        }
        let Some(kernel) = args.kernel.as_deref() else {
            bail!("--kernel is required without --api-sock");
        };
        let console = console().with_context(|| {
            format!(
                "--serial-file {}",
                args.serial_file.as_deref().unwrap_or(Path::new("")).display()
            )
        })?;
        let machine = Machine::boot(&config, kernel, console)
            .with_context(|| format!("booting {}", kernel.display()))?;
        let started = Instant::now();
        loop {
            if let Some(why) = machine.failure() {
                bail!("guest {}: {why}", kernel.display());
            }
            if args.run_for.is_some_and(|d| started.elapsed() >= d) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(machine);
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "kernel": kernel.display().to_string(),
                    "vcpus": vcpus,
                    "mem": args.mem,
                    "ran_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                })
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod imp {
    use super::super::run::RunArgs;
    use super::CmdResult;

    pub(super) fn run(args: RunArgs) -> CmdResult {
        anyhow::bail!(
            "--kernel {}: booting a kernel needs KVM on x86-64 Linux",
            args.kernel
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display()
        )
    }
}
