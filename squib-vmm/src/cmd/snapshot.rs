//! `squib snapshot ...`.

use clap::Subcommand;

use super::CmdResult;

/// `squib snapshot` subcommands (filled by the snapshot-files issue).
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {}

/// Run a `squib snapshot` subcommand.
///
/// # Errors
/// Whatever the subcommand reports.
pub fn run(c: SnapshotCommand) -> CmdResult {
    match c {}
}
