//! `squib run`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::snapshot::restore::dump_memory;
use squib_snapshot::snapshot::{SavedSnapshot, SnapshotError};
use squib_snapshot::{ChainSink, CheckpointSink, Policy};
use vm_memory::{GuestMemoryMmap, bitmap::AtomicBitmap};

use super::CmdResult;

/// Which hypervisor backend runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The software stage-2 model with simulated vCPUs (runs anywhere).
    Soft,
    /// Linux KVM (`/dev/kvm`).
    Kvm,
    /// Hypervisor.framework (macOS on Apple Silicon).
    Hvf,
}

/// How the KVM backend learns of writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrackingKind {
    /// The kernel's dirty log (KVM_MEM_LOG_DIRTY_PAGES, manual protect).
    DirtyLog,
    /// userfaultfd write-protect faults through the core's fault path.
    UffdWp,
}

/// `squib run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Backend.
    #[arg(long, value_enum, default_value = "soft")]
    pub backend: BackendKind,
    /// KVM tracking mechanism.
    #[arg(long, value_enum, default_value = "dirty-log")]
    pub tracking: TrackingKind,
    /// Guest RAM size (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Built-in workload, `NAME[:k=v,...]` (seq, random, hotspot, stride, idle).
    #[arg(long, conflicts_with_all = ["trace", "kernel"])]
    pub workload: Option<String>,
    /// Replay a write trace as the guest.
    #[arg(long, conflicts_with = "kernel")]
    pub trace: Option<PathBuf>,
    /// Boot a 64-bit ELF kernel (KVM).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initrd for `--kernel`.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for `--kernel`.
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// Tracking policy.
    #[arg(long, default_value = "adaptive")]
    pub policy: Policy,
    /// Take a snapshot this often (e.g. 200ms).
    #[arg(long, value_parser = parse_duration, requires = "snapshot_dir")]
    pub snapshot_every: Option<Duration>,
    /// Directory the snapshots go to (one subdirectory each, in chain order).
    #[arg(long)]
    pub snapshot_dir: Option<PathBuf>,
    /// How long to run (e.g. 2s).
    #[arg(long = "for", value_parser = parse_duration)]
    pub run_for: Option<Duration>,
    /// End a workload run once this many live checkpoints have saved guest writes (or when
    /// `--for` ends, whichever comes first).
    #[arg(long)]
    pub stop_after_checkpoints: Option<u64>,
    /// Write guest memory as it was at the run's closing checkpoint (the state the last snapshot
    /// holds) as one raw file, regions in address order, as `snapshot restore --dump-memory` does.
    #[arg(long)]
    pub dump_memory: Option<PathBuf>,
    /// Serve Firecracker's API shape on this Unix socket.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also append the guest's serial console (COM1) to this file (`--kernel`, `--api-sock`).
    #[arg(long)]
    pub serial_file: Option<PathBuf>,
}

/// Checkpoint interval of a workload run when `--snapshot-every` is not given (design.md's).
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// How long a workload run lasts when `--for` is not given.
pub const DEFAULT_RUN_FOR: Duration = Duration::from_secs(2);

impl RunArgs {
    /// `--snapshot-every`, or the default checkpoint interval.
    #[must_use]
    pub fn checkpoint_every(&self) -> Duration {
        self.snapshot_every.unwrap_or(DEFAULT_CHECKPOINT_EVERY)
    }

    /// `--for`, or the default run length.
    #[must_use]
    pub fn run_for(&self) -> Duration {
        self.run_for.unwrap_or(DEFAULT_RUN_FOR)
    }
}

/// What a workload run does with its checkpoints: with `--snapshot-dir`, saves each (the first
/// full, then diffs); with `--dump-memory`, writes guest memory at the closing checkpoint.
#[derive(Debug)]
pub struct RunSink {
    chain: Option<ChainSink>,
    dump: Option<PathBuf>,
}

impl RunSink {
    /// The sink `args` ask for, saving snapshots made by `backend` with `geometry`.
    ///
    /// # Errors
    /// `--snapshot-dir` cannot be created or already holds a chain.
    pub fn new(args: &RunArgs, backend: &str, geometry: PageGeometry) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let chain = match &args.snapshot_dir {
            Some(dir) => Some(
                ChainSink::create(dir, backend, geometry)
                    .with_context(|| format!("--snapshot-dir {}", dir.display()))?,
            ),
            None => None,
        };
        Ok(Self {
            chain,
            dump: args.dump_memory.clone(),
        })
    }

    /// The snapshots saved so far, in chain order.
    #[must_use]
    pub fn saved(&self) -> &[SavedSnapshot] {
        self.chain.as_ref().map_or(&[], ChainSink::saved)
    }
}

impl CheckpointSink for RunSink {
    type Error = SnapshotError;

    fn write(
        &mut self,
        index: u64,
        ranges: &[GpaRange],
        mem: &GuestMemoryMmap<AtomicBitmap>,
    ) -> Result<(), SnapshotError> {
        self.chain.write(index, ranges, mem)
    }

    fn finish(&mut self, mem: &GuestMemoryMmap<AtomicBitmap>) -> Result<(), SnapshotError> {
        self.chain.finish(mem)?;
        if let Some(out) = &self.dump {
            dump_memory(mem, out)?;
        }
        Ok(())
    }
}

/// Parse a flag's byte size with [`squib_arch::spec::parse_size`] (binary units K, M, G, T);
/// a flag's size must be above zero.
///
/// # Errors
/// A message naming the value and what is wrong.
pub fn parse_size(s: &str) -> Result<u64, String> {
    match squib_arch::spec::parse_size(s) {
        Ok(0) => Err(format!("size {s:?}: must be above zero")),
        Ok(v) => Ok(v),
        Err(e) => Err(e.to_string()),
    }
}

/// Parse a duration such as `200ms`, `2s`, `1m`.
///
/// # Errors
/// A message naming the value.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("duration {s:?}: {e}"))
}

/// Run `squib run`.
///
/// # Errors
/// Whatever the backend's runner reports.
pub fn run(args: RunArgs) -> CmdResult {
    if args.kernel.is_some() || args.api_sock.is_some() {
        if args.dump_memory.is_some() || args.stop_after_checkpoints.is_some() {
            anyhow::bail!(
                "--dump-memory and --stop-after-checkpoints are options of workload runs; with --kernel or --api-sock, take snapshots and restore them with `squib snapshot restore --dump-memory`"
            );
        }
        return super::run_kernel::run(args);
    }
    if let Some(trace) = &args.trace {
        anyhow::bail!(
            "--trace {}: a write trace is replayed, not run as a guest: use `squib trace replay FILE`, which replays it on the soft backend",
            trace.display()
        );
    }
    match args.backend {
        BackendKind::Soft => super::run_soft::run(&args),
        BackendKind::Kvm => super::run_kvm::run(&args),
        BackendKind::Hvf => super::run_hvf::run(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_parse_sizes_with_binary_units() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert!(parse_size("12Q").unwrap_err().contains("12Q"));
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn test_should_send_a_trace_to_trace_replay_whatever_the_backend() {
        use clap::Parser;
        for backend in ["soft", "kvm", "hvf"] {
            let cli = crate::Cli::try_parse_from(["squib", "run", "--backend", backend, "--trace", "t.txt"])
                .unwrap();
            let crate::Command::Run(args) = cli.command else {
                unreachable!()
            };
            let e = run(*args).unwrap_err().to_string();
            assert!(
                e.contains("t.txt") && e.contains("squib trace replay"),
                "{backend}: {e}"
            );
        }
    }

    #[test]
    fn test_should_send_a_kernel_to_the_kvm_machine_only() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from([
            "squib",
            "run",
            "--backend",
            "soft",
            "--kernel",
            "/no/such/vmlinux",
        ])
        .unwrap();
        let crate::Command::Run(args) = cli.command else {
            unreachable!()
        };
        let e = run(*args).unwrap_err().to_string();
        assert!(
            e.contains("/no/such/vmlinux") && e.contains("needs --backend kvm"),
            "{e}"
        );
    }

    #[test]
    fn test_should_parse_durations() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert!(parse_duration("fast").unwrap_err().contains("fast"));
    }
}
