//! `squib run --backend soft`: a simulated guest on the software stage-2.

use anyhow::Context as _;
use squib_arch::PageGeometry;
use squib_kvm_sim::soft::runner::{self, DEFAULT_RAM_BASE, RunConfig, RunReport};
use squib_kvm_sim::workload::WorkloadSpec;
use squib_snapshot::TrackingConfig;

use super::CmdResult;
use super::run::{RunArgs, RunSink};

/// Run a simulated guest and print its summary.
///
/// # Errors
/// A bad workload, memory size or vCPU count, or a failure in tracking.
pub fn run(args: &RunArgs) -> CmdResult {
    let spec = args.workload.as_deref().unwrap_or("idle");
    let workload: WorkloadSpec = spec.parse().with_context(|| format!("--workload {spec}"))?;
    let cfg = RunConfig {
        geometry: PageGeometry::APPLE_SILICON,
        ram_base: DEFAULT_RAM_BASE,
        mem: args.mem,
        vcpus: args.vcpus,
        workload,
        tracking: TrackingConfig::new(args.policy),
        run_for: args.run_for(),
        checkpoint_every: args.checkpoint_every(),
        stop_after_checkpoints: args.stop_after_checkpoints,
    };
    // With --snapshot-dir every checkpoint is saved: the first full, the rest diffs chained to it.
    let mut sink = RunSink::new(args, "soft", cfg.geometry)?;
    let report = runner::run(&cfg, &mut sink).context("squib run --backend soft")?;
    let saved = sink.saved().len();
    let cost = cfg.tracking.cost.cost_us(
        report.tracker.faults,
        report.tracker.protect_calls,
        report.tracker.dirty_bytes,
    );
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["workload"] = spec.into();
        v["modelled_cost_us"] = cost.into();
        v["snapshots_written"] = saved.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_summary(&report, spec, cost, args, &cfg, saved);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[allow(clippy::cast_precision_loss)] // display only
fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
}

fn print_summary(r: &RunReport, spec: &str, cost: f64, args: &RunArgs, cfg: &RunConfig, saved: usize) {
    let t = &r.tracker;
    println!(
        "squib run: soft backend ({} geometry), {} MiB, {} vCPU(s), workload {spec}, policy {}",
        r.geometry,
        r.mem >> 20,
        r.vcpus,
        r.policy
    );
    println!(
        "ran {:.2} s: {} guest writes ({:.1} MiB), {} vCPU exits",
        r.elapsed_s,
        r.writes,
        mib(r.bytes_written),
        r.vcpu_faults
    );
    println!(
        "faults {}  re-grants {}  protect calls {}  step-downs {}  step-ups {}  TLB invalidations {}",
        t.faults, t.regrants, t.protect_calls, t.step_downs, t.step_ups, r.mmu.tlb_invalidations
    );
    println!(
        "checkpoints {} (live, every {}; the last closes the run), dirty MiB per checkpoint:",
        r.checkpoints.len(),
        humantime::format_duration(cfg.checkpoint_every)
    );
    for c in &r.checkpoints {
        println!(
            "  #{:<4} at {:>9.1} ms  {:>9.2} MiB in {:>6} ranges  ({:.0} µs)",
            c.index,
            c.at_ms,
            mib(c.dirty_bytes),
            c.ranges,
            c.took_us
        );
    }
    println!(
        "total dirty {:.2} MiB; modelled cost {:.0} µs",
        mib(t.dirty_bytes),
        cost
    );
    if let Some(dir) = &args.snapshot_dir {
        println!(
            "snapshots: {saved} written to {} (the first full, the rest diffs chained to it)",
            dir.display()
        );
    }
}
