//! `squib run --backend kvm`: a real guest under `/dev/kvm`, tracked by the kernel's dirty log
//! or by userfaultfd write-protect faults.

use super::CmdResult;
use super::run::RunArgs;

/// Run a KVM guest and print its summary.
///
/// # Errors
/// Not Linux.
#[cfg(not(target_os = "linux"))]
pub fn run(_: &RunArgs) -> CmdResult {
    anyhow::bail!("--backend kvm needs Linux with /dev/kvm")
}

#[cfg(target_os = "linux")]
pub use linux::run;

#[cfg(target_os = "linux")]
mod linux {
    use std::io::Write;

    use anyhow::Context as _;
    use squib_arch::PageGeometry;
    use squib_kvm::runner::{self, RunConfig, RunReport};
    use squib_kvm::{MemoryLayout, Tracking, VmConfig, Workload};
    use squib_snapshot::TrackingConfig;

    use super::super::run::{RunSink, TrackingKind};
    use super::{CmdResult, RunArgs};

    /// Run a KVM guest and print its summary.
    ///
    /// # Errors
    /// A bad workload, memory size or vCPU count, a missing `/dev/kvm`, or a failure in the VM
    /// or in tracking.
    pub fn run(args: &RunArgs) -> CmdResult {
        let spec = args.workload.as_deref().unwrap_or("idle");
        let workload: Workload = spec.parse().with_context(|| format!("--workload {spec}"))?;
        let layout = MemoryLayout::for_size(args.mem).with_context(|| format!("--mem {}", args.mem))?;
        let tracking = match args.tracking {
            TrackingKind::DirtyLog => Tracking::DirtyLog,
            TrackingKind::UffdWp => Tracking::UffdWp,
        };
        let cfg = RunConfig {
            vm: VmConfig {
                layout,
                vcpus: args.vcpus,
                tracking,
            },
            workload,
            tracking: TrackingConfig::new(args.policy),
            run_for: args.run_for(),
            checkpoint_every: args.checkpoint_every(),
            stop_after_checkpoints: args.stop_after_checkpoints,
        };
        // With --snapshot-dir every checkpoint is saved: the first full, the rest diffs chained to
        // it; the last is taken with the vCPUs paused.
        let mut sink = RunSink::new(args, "kvm", PageGeometry::X86_64)?;
        let report = runner::run(&cfg, &mut sink).context("squib run --backend kvm")?;
        let saved = sink.saved().len();
        let t = &report.tracker;
        let cost = cfg
            .tracking
            .cost
            .cost_us(t.faults, t.protect_calls, t.dirty_bytes);
        let mut out = std::io::stdout().lock();
        let printed = if args.json {
            let text = serde_json::to_string_pretty(&json(&report, spec, cost, &cfg, args, saved))?;
            writeln!(out, "{text}")
        } else {
            print_summary(&mut out, &report, spec, cost, args, &cfg, saved)
        };
        match printed {
            // A reader that went away (`| head`) is not an error of the run.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(anyhow::Error::new(e).context("writing the summary"))
            }
            _ => Ok(std::process::ExitCode::SUCCESS),
        }
    }

    const fn tracking_name(t: Tracking) -> &'static str {
        match t {
            Tracking::DirtyLog => "dirty-log",
            Tracking::UffdWp => "uffd-wp",
        }
    }

    fn json(
        r: &RunReport,
        spec: &str,
        cost: f64,
        cfg: &RunConfig,
        args: &RunArgs,
        saved: usize,
    ) -> serde_json::Value {
        let checkpoints: Vec<_> = r
            .checkpoints
            .iter()
            .map(|c| {
                serde_json::json!({
                    "index": c.index,
                    "at_ms": c.at_ms,
                    "dirty_bytes": c.dirty_bytes,
                    "ranges": c.ranges,
                    "took_us": c.took_us,
                    "paused": c.paused,
                })
            })
            .collect();
        let slots: Vec<_> = cfg
            .vm
            .layout
            .ram()
            .iter()
            .map(|s| serde_json::json!({ "start": s.start(), "len": s.len() }))
            .collect();
        serde_json::json!({
            "backend": "kvm",
            "tracking": tracking_name(cfg.vm.tracking),
            "workload": spec,
            "policy": args.policy.to_string(),
            "mem": args.mem,
            "vcpus": args.vcpus,
            "memslots": slots,
            "elapsed_s": r.elapsed.as_secs_f64(),
            "writes": r.writes,
            "progress_exits": r.progress_exits,
            "faults_served": r.faults_served,
            "tracker": r.tracker,
            "checkpoints": checkpoints,
            "modelled_cost_us": cost,
            "snapshots_written": saved,
        })
    }

    #[allow(clippy::cast_precision_loss)] // display only
    fn mib(b: u64) -> f64 {
        b as f64 / f64::from(1u32 << 20)
    }

    fn print_summary(
        out: &mut impl Write,
        r: &RunReport,
        spec: &str,
        cost: f64,
        args: &RunArgs,
        cfg: &RunConfig,
        saved: usize,
    ) -> std::io::Result<()> {
        let t = &r.tracker;
        let slots: Vec<String> = cfg.vm.layout.ram().iter().map(ToString::to_string).collect();
        writeln!(
            out,
            "squib run: kvm backend ({} tracking), {} MiB in memslots {}, {} vCPU(s), workload {spec}, policy {}",
            tracking_name(cfg.vm.tracking),
            args.mem >> 20,
            slots.join(" + "),
            args.vcpus,
            args.policy
        )?;
        writeln!(
            out,
            "ran {:.2} s: {} guest writes, {} progress exits, {} uffd faults served",
            r.elapsed.as_secs_f64(),
            r.writes,
            r.progress_exits,
            r.faults_served
        )?;
        writeln!(
            out,
            "faults {}  re-grants {}  protect calls {}  step-downs {}  step-ups {}",
            t.faults, t.regrants, t.protect_calls, t.step_downs, t.step_ups
        )?;
        writeln!(
            out,
            "checkpoints {} (live, every {}; the last, with vCPUs paused, closes the run), dirty MiB per checkpoint:",
            r.checkpoints.len(),
            humantime::format_duration(cfg.checkpoint_every)
        )?;
        for c in &r.checkpoints {
            writeln!(
                out,
                "  #{:<4} at {:>9.1} ms  {:>9.2} MiB in {:>6} ranges  ({:.0} µs){}",
                c.index,
                c.at_ms,
                mib(c.dirty_bytes),
                c.ranges,
                c.took_us,
                if c.paused { "  paused" } else { "" }
            )?;
        }
        writeln!(
            out,
            "total dirty {:.2} MiB; modelled cost {:.0} µs",
            mib(t.dirty_bytes),
            cost
        )?;
        if let Some(dir) = &args.snapshot_dir {
            writeln!(
                out,
                "snapshots: {saved} written to {} (the first full, the rest diffs chained to it)",
                dir.display()
            )?;
        }
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use clap::Parser;

    use super::super::run::RunArgs;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: RunArgs,
    }

    fn args(argv: &[&str]) -> RunArgs {
        Cli::try_parse_from(std::iter::once("squib").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn test_should_refuse_a_bad_workload_or_memory_size_before_starting_a_vm() {
        let e = super::run(&args(&["--backend", "kvm", "--workload", "walk"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("walk"), "{e}");
        let e = super::run(&args(&["--backend", "kvm", "--mem", "3M", "--workload", "seq"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--mem"), "{e}");
    }

    #[test]
    fn test_should_run_a_workload_under_kvm_in_both_tracking_modes() {
        if !squib_kvm::kvm_or_skip("test_should_run_a_workload_under_kvm_in_both_tracking_modes") {
            return;
        }
        for tracking in ["dirty-log", "uffd-wp"] {
            let dir = tempfile::tempdir().unwrap();
            let chain = dir.path().join("chain");
            let a = args(&[
                "--backend",
                "kvm",
                "--tracking",
                tracking,
                "--mem",
                "16M",
                "--vcpus",
                "2",
                "--workload",
                "stride:k=4,seed=2",
                "--snapshot-every",
                "50ms",
                "--snapshot-dir",
                chain.to_str().unwrap(),
                "--for",
                "150ms",
                "--json",
            ]);
            let code = super::run(&a).unwrap();
            assert_eq!(code, std::process::ExitCode::SUCCESS, "{tracking}");
            let saved = std::fs::read_dir(&chain).unwrap().count();
            assert!(
                saved >= 2,
                "{tracking}: a full base and at least one diff, got {saved}"
            );
        }
    }
}
