//! Write traces: replaying a recorded guest's writes under each tracking policy.
//!
//! A policy comparison is only meaningful on the same writes, and real workloads are easier to
//! record than to simulate. So squib replays traces, in its own format or as valgrind lackey
//! output, through the soft stage-2 and the real tracker, on trace time, with design.md's rules:
//!
//! - Checkpoints fall at every multiple of the interval of trace time and at `checkpoint` lines; a
//!   write stamped exactly at a checkpoint time belongs to the epoch after it; the end of the
//!   trace closes the last epoch. A `checkpoint` line at a periodic boundary just taken is that
//!   same checkpoint. A trace without writes is the zero result.
//! - Guest RAM starts at 0 and is sized from the trace (the end of its highest write, rounded up
//!   to 2 MiB) unless `--mem` is given; a write outside `--mem` is an error. Sizing needs a first
//!   pass over the trace; standard input is spooled to a temporary file for it.
//! - Lackey: `S` and `M` records are writes, each `I` record advances time by `ns_per_instr`
//!   (a write is stamped with the time after its instruction's `I`), and 2 MiB blocks of the
//!   process's address space are packed into guest RAM in the order they are first written.
//!
//! Input may be gzip-compressed (detected by its magic bytes) and is streamed: memory stays
//! bounded whatever the trace's length.
#![deny(missing_docs)]

pub mod parse;
pub mod replay;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use squib_snapshot::TrackError;

pub use parse::{Event, EventReader, TraceFormat};
pub use replay::{ReplayConfig, ReplayReport, empty_report, ram_needed, replay};

use squib_kvm_sim::soft::vcpu::VcpuError;

/// The most guest RAM a replay will model.
pub const MAX_REPLAY_MEM: u64 = 1 << 40;

const READ_BUFFER: usize = 1 << 18;

/// What reading or replaying a trace can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The trace file cannot be opened.
    #[error("cannot open trace {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading the trace failed (I/O, or a corrupt gzip stream).
    #[error("reading trace line {line}")]
    Read {
        /// The line being read.
        line: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not in the trace format.
    #[error("trace line {line}: {reason}: {text:?}")]
    Malformed {
        /// 1-based line number.
        line: u64,
        /// The line's text (cut at 160 bytes).
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A lackey access reaches into the last 2 MiB block of the 64-bit address space: no process
    /// maps memory there, and the block has no end address to pack it by.
    #[error(
        "trace line {line}: access of {size} bytes at {addr:#x} reaches the top 2 MiB of the address space, where no process maps memory"
    )]
    TopOfAddressSpace {
        /// 1-based line number.
        line: u64,
        /// The access's address.
        addr: u64,
        /// Its size.
        size: u64,
    },
    /// A line's time is earlier than the line before.
    #[error("trace line {line}: time goes backwards ({t_ns} ns after {previous} ns)")]
    TimeBackwards {
        /// 1-based line number.
        line: u64,
        /// Its time.
        t_ns: u64,
        /// The previous line's time.
        previous: u64,
    },
    /// A write lies outside guest RAM.
    #[error(
        "trace line {line}: write of {len} bytes at {gpa:#x} is outside the {mem}-byte guest RAM (--mem)"
    )]
    OutsideRam {
        /// 1-based line number.
        line: u64,
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
        /// RAM size.
        mem: u64,
    },
    /// The trace needs more RAM than a replay models.
    #[error("the trace needs {needed} bytes of guest RAM, above the {limit}-byte limit of a replay")]
    TooMuchRam {
        /// RAM the trace needs.
        needed: u64,
        /// The limit.
        limit: u64,
    },
    /// A replay setting is unusable.
    #[error("invalid replay configuration: {0}")]
    Config(String),
    /// The tracker failed.
    #[error(transparent)]
    Track(#[from] TrackError),
    /// A checkpoint failed in the backend.
    #[error("checkpoint failed")]
    Checkpoint(#[source] squib_snapshot::CheckpointError<std::convert::Infallible>),
    /// The simulated vCPU's fault could not be handled.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// Wraps the raw (possibly compressed) byte stream of each pass: the hook for a progress bar.
/// Arguments: the stream, its length if known, and which pass (`"scan"` or `"replay"`).
pub type WrapRead<'a> =
    &'a mut dyn FnMut(Box<dyn Read + Send>, Option<u64>, &'static str) -> Box<dyn Read + Send>;

/// A buffered reader over `raw`, decompressing it when it starts with the gzip magic.
///
/// # Errors
/// [`TraceError::Read`] when the first bytes cannot be read.
pub fn decoder(raw: Box<dyn Read + Send>) -> Result<Box<dyn BufRead + Send>, TraceError> {
    let mut buf = BufReader::with_capacity(READ_BUFFER, raw);
    let head = buf
        .fill_buf()
        .map_err(|source| TraceError::Read { line: 1, source })?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(BufReader::with_capacity(
            READ_BUFFER,
            flate2::bufread::MultiGzDecoder::new(buf),
        )))
    } else {
        Ok(Box::new(buf))
    }
}

fn open_file(path: &Path) -> Result<(File, Option<u64>), TraceError> {
    let f = File::open(path).map_err(|source| TraceError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let len = f.metadata().ok().map(|m| m.len());
    Ok((f, len))
}

/// Replay the trace at `path` (`-` for standard input), sizing RAM from it unless `mem` is given.
///
/// # Errors
/// [`TraceError`] naming the file or line and what is wrong.
pub fn replay_path(
    path: &Path,
    cfg: &ReplayConfig,
    mem: Option<u64>,
    wrap: WrapRead<'_>,
) -> Result<ReplayReport, TraceError> {
    cfg.validate()?;
    if let Some(m) = mem
        && m > MAX_REPLAY_MEM
    {
        return Err(TraceError::TooMuchRam {
            needed: m,
            limit: MAX_REPLAY_MEM,
        });
    }
    let stdin = path == Path::new("-");
    if stdin && let Some(mem) = mem {
        let raw: Box<dyn Read + Send> = Box::new(std::io::stdin());
        return replay_sized(decoder(wrap(raw, None, "replay"))?, cfg, mem);
    }
    // Sizing RAM needs two passes: spool standard input to a temporary file first.
    let spooled;
    let file: &Path = if stdin {
        let mut tmp = tempfile::NamedTempFile::new().map_err(|source| TraceError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        std::io::copy(&mut std::io::stdin().lock(), tmp.as_file_mut())
            .map_err(|source| TraceError::Read { line: 0, source })?;
        spooled = tmp;
        spooled.path()
    } else {
        path
    };
    let mem = match mem {
        Some(m) => m,
        None => {
            let (f, len) = open_file(file)?;
            match ram_needed(decoder(wrap(Box::new(f), len, "scan"))?, cfg)? {
                None => return Ok(empty_report(cfg, 0)),
                Some(needed) if needed > MAX_REPLAY_MEM => {
                    return Err(TraceError::TooMuchRam {
                        needed,
                        limit: MAX_REPLAY_MEM,
                    });
                }
                Some(needed) => needed,
            }
        }
    };
    let (f, len) = open_file(file)?;
    replay_sized(decoder(wrap(Box::new(f), len, "replay"))?, cfg, mem)
}

fn replay_sized(
    input: Box<dyn BufRead + Send>,
    cfg: &ReplayConfig,
    mem: u64,
) -> Result<ReplayReport, TraceError> {
    replay(input, cfg, mem)
}
