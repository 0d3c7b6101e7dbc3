//! One module per subcommand.

pub mod run;
pub mod run_hvf;
pub mod run_kernel;
pub mod run_kvm;
pub mod run_soft;
pub mod snapshot;
pub mod trace;

/// What a subcommand returns: an exit code, or an error printed as `squib: error: ...`.
pub type CmdResult = anyhow::Result<std::process::ExitCode>;
