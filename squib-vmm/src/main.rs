//! `squib`: run a guest with live dirty tracking, take and restore snapshots, replay write traces.
//!
//! Errors go to standard error with the file or value they concern, and the exit status is
//! non-zero; `--json` output goes to standard output only.

#![deny(missing_docs)]

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod api;
mod cmd;
mod log;

use clap::{Parser, Subcommand};

/// squib: a VMM built around live, incremental snapshots.
#[derive(Debug, Parser)]
#[command(name = "squib", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a guest with dirty tracking (and optionally periodic snapshots).
    Run(Box<cmd::run::RunArgs>),
    /// Inspect, verify, merge and restore snapshots.
    #[command(subcommand)]
    Snapshot(cmd::snapshot::SnapshotCommand),
    /// Work with write traces.
    #[command(subcommand)]
    Trace(cmd::trace::TraceCommand),
}

fn main() -> std::process::ExitCode {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    // Standard error gets what SQUIB_LOG asks for; the API's log file (PUT /logger) what the
    // API asks for. Each layer filters for itself.
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(EnvFilter::try_from_env("SQUIB_LOG").unwrap_or_else(|_| "warn".into())),
        )
        .with(log::ApiLog.with_filter(log::ApiLogFilter))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => cmd::run::run(*args),
        Command::Snapshot(c) => cmd::snapshot::run(c),
        Command::Trace(c) => cmd::trace::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("squib: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
