//! `squib trace ...`.

use std::io::{IsTerminal as _, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use squib_arch::PageGeometry;
use squib_kvm_sim::trace::{ReplayConfig, ReplayReport, TraceFormat, replay_path};
use squib_snapshot::Policy;

use super::CmdResult;
use super::run::{parse_duration, parse_size};

/// `squib trace` subcommands.
#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Replay a write trace through the soft stage-2 and report what a policy costs.
    Replay(ReplayArgs),
}

/// Trace formats on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// `<t_ns> <gpa> <len>` and `<t_ns> checkpoint` lines.
    Squib,
    /// `valgrind --tool=lackey --trace-mem=yes` output.
    Lackey,
}

/// Geometries on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GeometryArg {
    /// 16 KiB granule and fine unit, 2 MiB blocks.
    AppleSilicon,
    /// 4 KiB granule and fine unit, 2 MiB blocks.
    #[value(name = "x86-64")]
    X86_64,
}

/// `squib trace replay` arguments.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The trace (`-` for standard input; gzip is read directly).
    pub file: PathBuf,
    /// Trace format.
    #[arg(long, value_enum, default_value = "squib")]
    pub format: FormatArg,
    /// Tracking policy: fine, coarse, region, adaptive, or `all` to compare every one.
    #[arg(long, default_value = "adaptive")]
    pub policy: String,
    /// Periodic checkpoint interval of trace time.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub checkpoint_every: Duration,
    /// Guest RAM size (default: sized from the trace).
    #[arg(long, value_parser = parse_size)]
    pub mem: Option<u64>,
    /// Stage-2 geometry.
    #[arg(long, value_enum, default_value = "apple-silicon")]
    pub geometry: GeometryArg,
    /// Lackey: trace time each instruction takes, ns.
    #[arg(long, default_value_t = 0.5)]
    pub ns_per_instr: f64,
    /// Cost model: µs per write fault.
    #[arg(long, default_value_t = 4.0)]
    pub fault_us: f64,
    /// Cost model: µs per write-protect call.
    #[arg(long, default_value_t = 120.0)]
    pub protect_us: f64,
    /// Cost model: diff write bandwidth, bytes per µs.
    #[arg(long, default_value_t = 500.0)]
    pub write_bytes_per_us: f64,
    /// Print JSON (one object, or an array with `--policy all`).
    #[arg(long)]
    pub json: bool,
}

/// Run a `squib trace` subcommand.
///
/// # Errors
/// Whatever the subcommand reports.
pub fn run(c: TraceCommand) -> CmdResult {
    match c {
        TraceCommand::Replay(args) => replay_cmd(&args),
    }
}

fn progress_wrap(
    show: bool,
) -> impl FnMut(Box<dyn Read + Send>, Option<u64>, &'static str) -> Box<dyn Read + Send> {
    move |raw, len, pass| {
        if !show {
            return raw;
        }
        let bar = len.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
        let style = ProgressStyle::with_template(
            "{msg:>7} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(pass);
        Box::new(bar.wrap_read(raw))
    }
}

fn replay_cmd(args: &ReplayArgs) -> CmdResult {
    let policies: Vec<Policy> = if args.policy == "all" {
        Policy::ALL.to_vec()
    } else {
        vec![
            args.policy
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--policy: {e}"))?,
        ]
    };
    let show = std::io::stderr().is_terminal();
    let mut reports = Vec::new();
    for policy in policies {
        let mut cfg = ReplayConfig::new(policy);
        cfg.format = match args.format {
            FormatArg::Squib => TraceFormat::Squib,
            FormatArg::Lackey => TraceFormat::Lackey,
        };
        cfg.geometry = match args.geometry {
            GeometryArg::AppleSilicon => PageGeometry::APPLE_SILICON,
            GeometryArg::X86_64 => PageGeometry::X86_64,
        };
        cfg.checkpoint_every = args.checkpoint_every;
        cfg.ns_per_instr = args.ns_per_instr;
        cfg.tracking.cost.fault_us = args.fault_us;
        cfg.tracking.cost.protect_us = args.protect_us;
        cfg.tracking.cost.write_bytes_per_us = args.write_bytes_per_us;
        let started = Instant::now();
        let mut wrap = progress_wrap(show);
        let report = replay_path(&args.file, &cfg, args.mem, &mut wrap)
            .with_context(|| format!("replaying {} under {policy}", args.file.display()))?;
        reports.push((report, started.elapsed()));
    }
    if args.json {
        let out: Vec<_> = reports.iter().map(|(r, _)| r).collect();
        let text = if out.len() == 1 {
            serde_json::to_string_pretty(out[0])?
        } else {
            serde_json::to_string_pretty(&out)?
        };
        println!("{text}");
    } else {
        print_table(args, &reports);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[allow(clippy::cast_precision_loss)] // display only
fn print_table(args: &ReplayArgs, reports: &[(ReplayReport, Duration)]) {
    if let Some((r, _)) = reports.first() {
        println!(
            "trace {}: {} writes ({} bytes) over {:.3} s of trace time, {} MiB of RAM, {} geometry, checkpoints every {}",
            args.file.display(),
            r.writes,
            r.bytes_written,
            r.trace_ns as f64 / 1e9,
            r.mem_bytes >> 20,
            r.geometry,
            humantime::format_duration(args.checkpoint_every)
        );
    }
    println!(
        "{:<9} {:>12} {:>10} {:>9} {:>14} {:>11} {:>10} {:>8} {:>16} {:>12}",
        "policy",
        "writes",
        "faults",
        "protects",
        "dirty bytes",
        "checkpoints",
        "step-downs",
        "step-ups",
        "modelled cost µs",
        "writes/s"
    );
    for (r, took) in reports {
        println!(
            "{:<9} {:>12} {:>10} {:>9} {:>14} {:>11} {:>10} {:>8} {:>16.0} {:>12.0}",
            r.policy,
            r.writes,
            r.faults,
            r.protect_calls,
            r.dirty_bytes,
            r.checkpoints,
            r.step_downs,
            r.step_ups,
            r.modelled_cost_us,
            r.writes as f64 / took.as_secs_f64().max(1e-9)
        );
    }
}
