//! `squib trace ...`.

use clap::Subcommand;

use super::CmdResult;

/// `squib trace` subcommands (filled by the trace-replay issue).
#[derive(Debug, Subcommand)]
pub enum TraceCommand {}

/// Run a `squib trace` subcommand.
///
/// # Errors
/// Whatever the subcommand reports.
pub fn run(c: TraceCommand) -> CmdResult {
    match c {}
}
