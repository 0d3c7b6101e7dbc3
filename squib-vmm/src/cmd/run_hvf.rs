//! `squib run --backend hvf`: a guest on Hypervisor.framework with live dirty tracking.
//!
//! The guest is squib-hvf's store loop (real aarch64 code, one loop per vCPU). The run
//! checkpoints while the vCPUs write and ends by checking that the base snapshot plus every diff
//! equals guest memory, so a summary that says "verified" means no write was lost. Elsewhere than
//! Apple Silicon the command refuses at once, before looking at the other flags.

use squib_arch::spec::NamedSpec;
use squib_hvf::workload::{self, CheckpointRecord, RunReport, StoreLoopRun};

use super::CmdResult;
use super::run::{DEFAULT_CHECKPOINT_EVERY, RunArgs, TrackingKind};

/// What a user sees off Apple Silicon.
pub const UNAVAILABLE: &str =
    "--backend hvf needs macOS on Apple Silicon (Hypervisor.framework); use --backend soft or kvm here";

/// Slot stride when the workload does not say (one slot per 4 KiB: four per 16 KiB page).
const DEFAULT_STRIDE: u64 = 4096;

/// Turn `squib run` arguments into the HVF run they ask for.
///
/// # Errors
/// A message naming the flag the HVF backend cannot honour, or the bad workload parameter.
pub fn plan(args: &RunArgs) -> anyhow::Result<StoreLoopRun> {
    if args.trace.is_some() || args.kernel.is_some() {
        anyhow::bail!(
            "--backend hvf runs its built-in guest (--workload store-loop); --trace and --kernel are not supported with it"
        );
    }
    if args.tracking == TrackingKind::UffdWp {
        anyhow::bail!("--tracking uffd-wp is a KVM option; --backend hvf always tracks by stage-2 faults");
    }
    if args.api_sock.is_some() {
        anyhow::bail!("--api-sock is not supported with --backend hvf");
    }
    if let Some(dir) = &args.snapshot_dir {
        anyhow::bail!(
            "--snapshot-dir {}: writing snapshot files is not wired into --backend hvf yet; without it the run checkpoints every {}ms in memory and verifies base + diffs against guest memory",
            dir.display(),
            DEFAULT_CHECKPOINT_EVERY.as_millis()
        );
    }
    let (stride, passes) = parse_workload(args.workload.as_deref())?;
    Ok(StoreLoopRun {
        mem: args.mem,
        vcpus: args.vcpus,
        policy: args.policy,
        stride,
        passes,
        checkpoint_every: args.checkpoint_every(),
        run_for: args.run_for(),
    })
}

/// `store-loop[:stride=BYTES,passes=N]` → (stride, passes); passes 0 (the default) runs until
/// `--for` ends.
fn parse_workload(spec: Option<&str>) -> anyhow::Result<(u64, u64)> {
    let spec = spec.unwrap_or("store-loop");
    let named = NamedSpec::parse(spec).map_err(|e| anyhow::anyhow!("--workload {e}"))?;
    if named.name != "store-loop" {
        anyhow::bail!("--workload {spec:?}: --backend hvf runs `store-loop[:stride=BYTES,passes=N]`");
    }
    let (mut stride, mut passes) = (DEFAULT_STRIDE, 0);
    for &(k, v) in &named.params {
        match k {
            "stride" => {
                stride = super::run::parse_size(v).map_err(|e| anyhow::anyhow!("--workload stride: {e}"))?
            }
            "passes" => {
                passes = v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--workload {spec:?}: passes {v:?} is not a number"))?;
            }
            _ => anyhow::bail!("--workload {spec:?}: unknown parameter {k:?} (stride, passes)"),
        }
    }
    Ok((stride, passes))
}

/// Run `squib run --backend hvf`.
///
/// # Errors
/// [`UNAVAILABLE`] off Apple Silicon; otherwise a bad flag, or whatever the run reports (the
/// framework's error, a lost write found by the final verification, ...).
pub fn run(args: &RunArgs) -> CmdResult {
    if !squib_hvf::AVAILABLE {
        anyhow::bail!(UNAVAILABLE);
    }
    let plan = plan(args)?;
    let report = workload::run(&plan, &mut |c: &CheckpointRecord| {
        tracing::info!(
            at_ms = c.at.as_millis(),
            ranges = c.ranges,
            dirty_bytes = c.dirty_bytes,
            "checkpoint"
        );
    })?;
    if args.json {
        println!("{}", summary_json(&plan, &report));
    } else {
        print!("{}", summary_text(&plan, &report));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn summary_json(plan: &StoreLoopRun, r: &RunReport) -> serde_json::Value {
    serde_json::json!({
        "backend": "hvf",
        "policy": plan.policy.name(),
        "vcpus": plan.vcpus,
        "mem": plan.mem,
        "elapsed_ms": r.elapsed.as_secs_f64() * 1e3,
        "faults": r.counters.faults,
        "regrants": r.counters.regrants,
        "protect_calls": r.counters.protect_calls,
        "step_downs": r.counters.step_downs,
        "step_ups": r.counters.step_ups,
        "checkpoints": r.counters.checkpoints,
        "dirty_bytes": r.counters.dirty_bytes,
        "verified_bytes": r.verified_bytes,
        "vcpu_faults": r.vcpus.iter().map(|v| v.tracking_faults).collect::<Vec<_>>(),
        "vcpus_finished": r.vcpus.iter().filter(|v| v.finished).count(),
    })
}

fn summary_text(plan: &StoreLoopRun, r: &RunReport) -> String {
    let c = &r.counters;
    let largest = r.checkpoints.iter().map(|c| c.dirty_bytes).max().unwrap_or(0);
    format!(
        "squib run: backend hvf, policy {}, {} vCPU(s), {} MiB, ran {:.3}s\n\
         \x20 faults {}  regrants {}  protect calls {}  step-ups {}  step-downs {}\n\
         \x20 checkpoints {}  dirty bytes {} (largest diff {} bytes)\n\
         \x20 verified: base + diffs == guest memory ({} bytes)\n",
        plan.policy,
        plan.vcpus,
        plan.mem >> 20,
        r.elapsed.as_secs_f64(),
        c.faults,
        c.regrants,
        c.protect_calls,
        c.step_ups,
        c.step_downs,
        c.checkpoints,
        c.dirty_bytes,
        largest,
        r.verified_bytes,
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cmd::run::DEFAULT_RUN_FOR;
    use std::time::Duration;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RunArgs,
    }

    fn args(argv: &[&str]) -> RunArgs {
        Cli::try_parse_from(std::iter::once("run").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[cfg(not(all(target_os = "macos", target_arch = "aarch64")))]
    #[test]
    fn test_should_refuse_hvf_off_apple_silicon_with_a_clear_error() {
        let e = run(&args(&["--backend", "hvf"])).unwrap_err().to_string();
        assert_eq!(e, UNAVAILABLE);
        assert!(e.contains("macOS on Apple Silicon") && e.contains("--backend soft or kvm"));
        // Through the dispatch, as the binary takes it.
        let e = super::super::run::run(args(&["--backend", "hvf", "--mem", "64M"]))
            .unwrap_err()
            .to_string();
        assert_eq!(e, UNAVAILABLE);
    }

    #[test]
    fn test_should_plan_the_store_loop_from_the_run_flags() {
        let p = plan(&args(&[
            "--backend",
            "hvf",
            "--mem",
            "64M",
            "--vcpus",
            "2",
            "--policy",
            "fine",
            "--workload",
            "store-loop:stride=64,passes=10",
            "--for",
            "3s",
        ]))
        .unwrap();
        assert_eq!((p.mem, p.vcpus, p.stride, p.passes), (64 << 20, 2, 64, 10));
        assert_eq!(p.policy, squib_snapshot::Policy::Fine);
        assert_eq!(p.run_for, Duration::from_secs(3));
        assert_eq!(p.checkpoint_every, DEFAULT_CHECKPOINT_EVERY);
        let d = plan(&args(&["--backend", "hvf"])).unwrap();
        assert_eq!(
            (d.stride, d.passes, d.run_for),
            (DEFAULT_STRIDE, 0, DEFAULT_RUN_FOR)
        );
    }

    #[test]
    fn test_should_refuse_flags_the_hvf_run_cannot_honour() {
        for (argv, needle) in [
            (&["--workload", "seq"][..], "store-loop"),
            (&["--workload", "store-loop:speed=3"], "unknown parameter"),
            (&["--workload", "store-loop:passes=many"], "passes \"many\""),
            (&["--workload", "store-loop:stride"], "key=value"),
            (&["--trace", "t.txt"], "--trace"),
            (&["--kernel", "vmlinux"], "--kernel"),
            (&["--api-sock", "/tmp/s"], "--api-sock"),
            (&["--tracking", "uffd-wp"], "KVM option"),
            (&["--snapshot-dir", "snaps"], "snaps"),
        ] {
            let e = plan(&args(argv)).unwrap_err().to_string();
            assert!(e.contains(needle), "{argv:?}: {e}");
        }
    }
}
