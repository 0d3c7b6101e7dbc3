//! `squib trace ...`.

use std::io::{IsTerminal as _, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use squib_arch::PageGeometry;
use squib_kvm_sim::workload::WorkloadSpec;
use squib_snapshot::Policy;
use squib_trace::{Event, EventReader, ReplayConfig, ReplayReport, TraceFormat, decoder, replay_path};

use super::CmdResult;
use super::run::{parse_duration, parse_size};

/// `squib trace` subcommands.
#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Replay a write trace through the soft stage-2 and report what a policy costs.
    Replay(ReplayArgs),
    /// Write a built-in workload's writes as a squib-format trace (deterministic per seed).
    Generate(GenerateArgs),
    /// Rewrite a trace (lackey, say) as a squib-format trace of its writes, with the addresses
    /// and times replay gives them: replaying the result gives the same figures, faster.
    Convert(ConvertArgs),
}

/// `squib trace convert` arguments.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The trace (`-` for standard input; gzip is read directly).
    pub file: PathBuf,
    /// Its format.
    #[arg(long, value_enum, default_value = "lackey")]
    pub format: FormatArg,
    /// Lackey: trace time each instruction takes, ns.
    #[arg(long, default_value_t = 0.5)]
    pub ns_per_instr: f64,
}

/// `squib trace generate` arguments.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Built-in workload, `NAME[:k=v,...]` (seq, random, hotspot, stride).
    #[arg(long)]
    pub workload: String,
    /// Guest RAM the workload writes (the trace's addresses lie below it).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Number of vCPUs whose streams are interleaved, one write each in turn.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Number of writes.
    #[arg(long, default_value_t = 1_000_000)]
    pub writes: u64,
    /// Trace time between consecutive writes, ns.
    #[arg(long, default_value_t = 200)]
    pub ns_per_write: u64,
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
        TraceCommand::Generate(args) => generate_cmd(&args),
        TraceCommand::Convert(args) => convert_cmd(&args),
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

fn generate_cmd(args: &GenerateArgs) -> CmdResult {
    use std::io::Write as _;
    let spec: WorkloadSpec = args
        .workload
        .parse()
        .with_context(|| format!("--workload {}", args.workload))?;
    if args.vcpus == 0 {
        anyhow::bail!("--vcpus must be at least 1");
    }
    let mut streams = (0..args.vcpus)
        .map(|i| squib_kvm_sim::workload::stream(&spec, args.mem, i, args.vcpus))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--workload {}", args.workload))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    writeln!(
        out,
        "# squib trace generate --workload {} --mem {} --vcpus {} --writes {} --ns-per-write {}",
        args.workload, args.mem, args.vcpus, args.writes, args.ns_per_write
    )?;
    let mut t: u64 = 0;
    for i in 0..args.writes {
        let n = streams.len();
        let Some((gpa, len)) = streams[usize::try_from(i).unwrap_or(0) % n].next_write() else {
            break;
        };
        writeln!(out, "{t} {gpa:#x} {len}")?;
        t = t.saturating_add(args.ns_per_write);
    }
    out.flush()?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn convert_cmd(args: &ConvertArgs) -> CmdResult {
    use std::io::Write as _;
    let format = match args.format {
        FormatArg::Squib => TraceFormat::Squib,
        FormatArg::Lackey => TraceFormat::Lackey,
    };
    if !args.ns_per_instr.is_finite() || args.ns_per_instr < 0.0 {
        anyhow::bail!(
            "--ns-per-instr {}: must be a finite, non-negative number",
            args.ns_per_instr
        );
    }
    let raw: Box<dyn Read + Send> = if args.file.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(&args.file)
                .with_context(|| format!("cannot open trace {}", args.file.display()))?,
        )
    };
    let len = std::fs::metadata(&args.file).ok().map(|m| m.len());
    let mut wrap = progress_wrap(std::io::stderr().is_terminal());
    let input = decoder(wrap(raw, len, "convert"))?;
    let mut events = EventReader::new(input, format, args.ns_per_instr);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    writeln!(
        out,
        "# squib trace convert --format {} --ns-per-instr {} {}",
        match args.format {
            FormatArg::Squib => "squib",
            FormatArg::Lackey => "lackey",
        },
        args.ns_per_instr,
        args.file.display()
    )?;
    while let Some(e) = events
        .next_event()
        .with_context(|| format!("converting {}", args.file.display()))?
    {
        match e {
            Event::Write { t_ns, gpa, len } => writeln!(out, "{t_ns} {gpa:#x} {len}")?,
            Event::Checkpoint { t_ns } => writeln!(out, "{t_ns} checkpoint")?,
        }
    }
    out.flush()?;
    Ok(std::process::ExitCode::SUCCESS)
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
    if policies.len() > 1 && args.file.as_os_str() == "-" {
        anyhow::bail!("--policy all reads the trace once per policy: give a file, not standard input");
    }
    let show = std::io::stderr().is_terminal();
    let mut reports = Vec::new();
    // RAM sized from the trace by the first replay serves the others: one scan, not four.
    let mut mem = args.mem;
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
        let report = replay_path(&args.file, &cfg, mem, &mut wrap)
            .with_context(|| format!("replaying {} under {policy}", args.file.display()))?;
        if mem.is_none() && report.mem_bytes > 0 {
            mem = Some(report.mem_bytes);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        c: TraceCommand,
    }

    #[test]
    fn test_should_parse_replay_flags_with_design_md_defaults() {
        let Cli {
            c: TraceCommand::Replay(a),
        } = Cli::try_parse_from(["t", "replay", "x.trace"]).unwrap()
        else {
            panic!("not a replay");
        };
        assert_eq!(
            (a.format, a.geometry, a.policy.as_str()),
            (FormatArg::Squib, GeometryArg::AppleSilicon, "adaptive")
        );
        assert_eq!(a.checkpoint_every, Duration::from_millis(100));
        assert_eq!(
            (a.fault_us, a.protect_us, a.write_bytes_per_us, a.ns_per_instr),
            (4.0, 120.0, 500.0, 0.5)
        );
        let Cli {
            c: TraceCommand::Replay(a),
        } = Cli::try_parse_from([
            "t",
            "replay",
            "-",
            "--format",
            "lackey",
            "--geometry",
            "x86-64",
            "--mem",
            "64M",
            "--checkpoint-every",
            "5ms",
        ])
        .unwrap()
        else {
            panic!("not a replay");
        };
        assert_eq!(
            (a.format, a.geometry, a.mem),
            (FormatArg::Lackey, GeometryArg::X86_64, Some(64 << 20))
        );
        assert!(Cli::try_parse_from(["t", "replay", "x", "--mem", "12Q"]).is_err());
    }

    #[test]
    fn test_should_refuse_an_unknown_policy_and_all_on_standard_input() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap() {
            Cli {
                c: TraceCommand::Replay(a),
            } => a,
            _ => panic!("not a replay"),
        };
        let err = replay_cmd(&parse(&["t", "replay", "x", "--policy", "medium"])).unwrap_err();
        assert!(err.to_string().contains("medium"), "{err}");
        let err = replay_cmd(&parse(&["t", "replay", "-", "--policy", "all"])).unwrap_err();
        assert!(err.to_string().contains("standard input"), "{err}");
    }
}
