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
//!
//! With `--snapshot-dir` (and `--snapshot-every`, default 1 s) the run writes
//! a chain into the directory while the guest runs: a full snapshot first,
//! then diffs, through the same `ChainWriter` as every other run. Each diff
//! pauses the guest only to capture its state and copy the dirty pages
//! (`machine::snapshot::save_live_diff`); the files are written after the
//! guest has resumed. `squib snapshot restore DIR --for D` resumes such a
//! chain ([`resume`]).

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

/// Restore the machine snapshot chain ending at `dir` and run the guest for `run_for`, its
/// console on standard output (`squib snapshot restore DIR --for D`).
///
/// # Errors
/// The chain does not load or is not a machine snapshot, KVM refuses the state, or the guest
/// fails while running.
pub fn resume(dir: &std::path::Path, lazy: bool, run_for: std::time::Duration, json: bool) -> CmdResult {
    imp::resume(dir, lazy, run_for, json)
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    use std::fs::OpenOptions;
    use std::path::Path;
    use std::process::ExitCode;
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use squib_machine::console::{DRAINED_CAPACITY, Drained, Stdout};
    use squib_machine::snapshot::{self, Staging};
    use squib_machine::{Console, Machine, MachineConfig, RestoreOptions};
    use squib_snapshot::snapshot::{ChainWriter, RestoreMode};

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
        if args.api_sock.is_some() && (args.snapshot_every.is_some() || args.snapshot_dir.is_some()) {
            bail!("--snapshot-every/--snapshot-dir with --api-sock: take snapshots through the API");
        }
        let vcpus = u8::try_from(args.vcpus).with_context(|| format!("--vcpus {}: too many", args.vcpus))?;
        let serial_file = args.serial_file.clone();
        // Every sink that can block goes behind a Drained buffer: a console nobody reads must
        // never hold a vCPU (and with it pause, snapshot and the API).
        let console = move || -> std::io::Result<Console> {
            let mut console =
                Console::new().with_sink(Box::new(Drained::new(Box::new(Stdout), DRAINED_CAPACITY)?));
            if let Some(path) = &serial_file {
                let file = OpenOptions::new().create(true).append(true).open(path)?;
                console = console.with_sink(Box::new(Drained::new(Box::new(file), DRAINED_CAPACITY)?));
            }
            Ok(console)
        };
        let config = MachineConfig {
            mem_size: args.mem,
            vcpus,
            cmdline: args.cmdline.clone().unwrap_or_default(),
            track_dirty_pages: args.snapshot_dir.is_some(),
            initrd: args.initrd.clone(),
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
        let mut chain = match &args.snapshot_dir {
            Some(dir) => {
                Some(ChainWriter::create(dir).with_context(|| format!("--snapshot-dir {}", dir.display()))?)
            }
            None => None,
        };
        let every = args.snapshot_every.unwrap_or(Duration::from_secs(1));
        let machine = Machine::boot(&config, kernel, console)
            .with_context(|| format!("booting {}", kernel.display()))?;
        let started = Instant::now();
        let staging = match chain {
            Some(_) => Some(Staging::for_machine(&machine).context("staging memory for diffs")?),
            None => None,
        };
        let mut next = started + every;
        let mut snapshots = Vec::new();
        loop {
            if let Some(why) = machine.failure() {
                bail!("guest {}: {why}", kernel.display());
            }
            if args.run_for.is_some_and(|d| started.elapsed() >= d) {
                break;
            }
            if let (Some(chain), Some(staging)) = (chain.as_mut(), staging.as_ref())
                && Instant::now() >= next
            {
                let t = Instant::now();
                let live = snapshot::save_live_diff(&machine, chain, staging, || ())
                    .with_context(|| format!("snapshot into {}", chain.dir().display()))?;
                let took = t.elapsed();
                eprintln!(
                    "squib: {} ({} {} KiB), guest paused {:.2?}, written in {took:.2?}",
                    live.saved.path.display(),
                    live.saved.kind.name(),
                    live.saved.extent_bytes >> 10,
                    live.paused
                );
                snapshots.push(serde_json::json!({
                    "dir": live.saved.path,
                    "type": live.saved.kind.name(),
                    "extent_bytes": live.saved.extent_bytes,
                    "written_bytes": live.saved.written_bytes,
                    "paused_us": u64::try_from(live.paused.as_micros()).unwrap_or(u64::MAX),
                    "took_us": u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                }));
                while next <= Instant::now() {
                    next += every;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
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
                    "snapshots": snapshots,
                })
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(super) fn resume(dir: &Path, lazy: bool, run_for: Duration, json: bool) -> CmdResult {
        let t = Instant::now();
        let mode = if lazy {
            RestoreMode::Lazy
        } else {
            RestoreMode::Eager
        };
        let loaded = snapshot::load(dir, mode).with_context(|| format!("restoring {}", dir.display()))?;
        let machine = Machine::restore(
            &loaded.state,
            loaded.memory,
            Console::new().with_sink(Box::new(Drained::new(Box::new(Stdout), DRAINED_CAPACITY)?)),
            RestoreOptions::default(),
        )
        .with_context(|| format!("restoring {}", dir.display()))?;
        let running = t.elapsed();
        eprintln!("squib: {} running after {running:.2?}", dir.display());
        let started = Instant::now();
        while started.elapsed() < run_for {
            if let Some(why) = machine.failure() {
                bail!("guest restored from {}: {why}", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(machine);
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "dir": dir,
                    "mode": if lazy { "lazy" } else { "eager" },
                    "load_to_running_us": u64::try_from(running.as_micros()).unwrap_or(u64::MAX),
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

    pub(super) fn resume(dir: &std::path::Path, _: bool, _: std::time::Duration, _: bool) -> CmdResult {
        anyhow::bail!(
            "{}: resuming a booted kernel needs KVM on x86-64 Linux",
            dir.display()
        )
    }
}
