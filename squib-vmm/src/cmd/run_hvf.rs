//! `squib run --backend hvf`: a guest on Hypervisor.framework with live dirty tracking.
//!
//! The guest is squib-hvf's store loop (real aarch64 code, one loop per vCPU). The run
//! checkpoints while the vCPUs write and ends by checking that the base snapshot plus every diff
//! equals guest memory, so a summary that says "verified" means no write was lost. With
//! `--snapshot-dir` every checkpoint is saved through the same sink as the soft and KVM runs
//! (the first full, the rest diffs); `--dump-memory` writes guest memory at the closing
//! checkpoint. Elsewhere than Apple Silicon the command refuses at once, before looking at the
//! other flags; the tests run the same command logic over squib-hvf's stand-in.

use squib_arch::PageGeometry;
use squib_arch::spec::NamedSpec;
use squib_hvf::workload::{self, CheckpointRecord, RunError, RunReport, StoreLoopRun};

use super::CmdResult;
use super::run::{RunArgs, RunSink, TrackingKind};

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
    let (stride, passes) = parse_workload(args.workload.as_deref())?;
    Ok(StoreLoopRun {
        mem: args.mem,
        vcpus: args.vcpus,
        policy: args.policy,
        stride,
        passes,
        checkpoint_every: args.checkpoint_every(),
        run_for: args.run_for(),
        stop_after_checkpoints: args.stop_after_checkpoints,
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
    execute(args, workload::run::<RunSink>)
}

/// How a planned run is carried out: on Hypervisor.framework, or (in tests) over the stand-in.
type Runner =
    fn(&StoreLoopRun, &mut RunSink, &mut dyn FnMut(&CheckpointRecord)) -> Result<RunReport, RunError>;

/// Plan the run, carry it out with `runner` into the sink `args` ask for, print the summary.
fn execute(args: &RunArgs, runner: Runner) -> CmdResult {
    use anyhow::Context as _;
    let plan = plan(args)?;
    let mut sink = RunSink::new(args, "hvf", PageGeometry::APPLE_SILICON)?;
    let report = runner(&plan, &mut sink, &mut |c: &CheckpointRecord| {
        tracing::info!(
            at_ms = c.at.as_millis(),
            ranges = c.ranges,
            dirty_bytes = c.dirty_bytes,
            "checkpoint"
        );
    })
    .context("squib run --backend hvf")?;
    let saved = sink.saved().len();
    if args.json {
        println!("{}", summary_json(&plan, &report, saved));
    } else {
        print!("{}", summary_text(&plan, &report));
        if let Some(dir) = &args.snapshot_dir {
            println!(
                "snapshots: {saved} written to {} (the first full, the rest diffs chained to it)",
                dir.display()
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn summary_json(plan: &StoreLoopRun, r: &RunReport, saved: usize) -> serde_json::Value {
    serde_json::json!({
        "snapshots_written": saved,
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
    use crate::cmd::run::{DEFAULT_CHECKPOINT_EVERY, DEFAULT_RUN_FOR};
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
    fn test_should_write_a_snapshot_chain_from_the_hvf_run_through_the_stand_in() {
        use squib_snapshot::snapshot::RestoreMode;
        use squib_snapshot::snapshot::restore::{dump_memory, restore};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snaps");
        let truth = tmp.path().join("truth.raw");
        let argv = [
            "--backend",
            "hvf",
            "--mem",
            "2M",
            "--vcpus",
            "2",
            "--workload",
            "store-loop:stride=512,passes=30",
            "--snapshot-every",
            "2ms",
            "--for",
            "60s",
            "--snapshot-dir",
            dir.to_str().unwrap(),
            "--dump-memory",
            truth.to_str().unwrap(),
            "--json",
        ];
        let a = args(&argv);
        execute(&a, workload::run_on_stand_in::<RunSink>).unwrap();
        let mut members: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        members.sort();
        assert!(members[0].ends_with("000000-full"), "{members:?}");
        let leaf = members.last().unwrap();
        let restored = tmp.path().join("restored.raw");
        let r = restore(leaf, RestoreMode::Eager).unwrap();
        assert_eq!(r.state.backend, "hvf");
        dump_memory(&r.memory, &restored).unwrap();
        // Ground truth: guest memory at the closing checkpoint, dumped by the run itself.
        let truth = std::fs::read(&truth).unwrap();
        assert!(
            std::fs::read(&restored).unwrap() == truth,
            "the chain restores to other bytes"
        );
        // And an independent model of it: every vCPU finished, so each slot holds its last pass.
        for p in workload::layout(&plan(&a).unwrap()).unwrap() {
            for (gpa, want) in p.program.expected(p.program.passes) {
                let off = usize::try_from(gpa - workload::RAM_BASE).unwrap();
                assert_eq!(&truth[off..off + 32], &want[..], "slot at {gpa:#x}");
            }
        }
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
        ] {
            let e = plan(&args(argv)).unwrap_err().to_string();
            assert!(e.contains(needle), "{argv:?}: {e}");
        }
    }
}
