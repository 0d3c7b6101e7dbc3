//! Snapshot files: full and diff snapshots of guest memory, chains of them, merge, verify and
//! restore. `specs/17-snapshot-files.md` is the byte-level contract.
//!
//! Why a module apart from the tracker: the tracker decides *which* guest ranges changed and
//! hands them to a writer closure; everything about *how* they persist — formats, atomicity,
//! validation of hostile files — lives here and never touches tracking state. A failed save
//! returns an error, the tracker folds its drained units back, and nothing at the destination has
//! changed: a snapshot directory only appears by one `rename` after everything in it has been
//! written and synced, and two files anywhere become loadable only when the state file, written
//! after the memory file is durable, is complete (see [`save`]).
//!
//! Why every loader validates everything first: a snapshot is input from disk, maybe from another
//! machine, and its state file names other files (its memory, its parent) that may have moved,
//! been swapped or been overwritten since. Every count, offset and length in a state file is checked against the
//! layout (and the memory file's real length) before any guest memory is allocated or written,
//! and every extent's bytes are checked against their xxh3 as they are read.
//!
//! A run loop uses [`ChainWriter`]; the `squib snapshot` command uses [`Chain`], [`verify()`],
//! [`merge`] and [`restore::restore_chain`].

pub mod chain;
pub mod format;
pub mod io;
pub mod load;
pub mod restore;
pub mod save;
pub mod verify;

use std::path::{Path, PathBuf};

pub use chain::{ChainWriter, merge, merge_bytes, merge_chain};
pub use format::{
    Extent, FormatError, ParentRef, RegionLayout, Section, SnapshotId, SnapshotKind, SnapshotState,
};
pub use io::{DirectIo, SnapshotIo};
pub use load::{Chain, LoadedSnapshot, MemoryFile, state_file_of};
pub use restore::{RestoreMode, Restored};
pub use save::{ParentLink, Placement, SavedSnapshot, SnapshotMeta, merge_in_place};
pub use verify::{VerifyReport, verify};

/// Name of the state file inside a snapshot directory (squib's layout; a snapshot's state file
/// may have any name elsewhere).
pub const STATE_FILE: &str = "state";
/// Name of the memory file inside a snapshot directory (squib's layout).
pub const MEMORY_FILE: &str = "memory";
/// A progress hook for long work (restore, merge): called with the bytes each step processed.
pub type Progress<'a> = dyn FnMut(u64) + 'a;

/// Longest chain followed before giving up (a guard against pathological input).
pub const MAX_CHAIN_LEN: usize = 100_000;

/// Everything that can go wrong with snapshot files. Every variant names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O call failed.
    #[error("{path}: {op} failed")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A state file's bytes were refused.
    #[error("{path}: invalid state file")]
    Format {
        /// The state file.
        path: PathBuf,
        /// Why.
        source: FormatError,
    },
    /// A state or memory file is not a regular file (a directory, FIFO, device, ...).
    #[error("{path}: not a regular file")]
    NotRegularFile {
        /// The path.
        path: PathBuf,
    },
    /// A state file is larger than the load cap (refused before reading it).
    #[error("{path}: state file is {len} bytes, above the {cap}-byte cap")]
    StateTooLarge {
        /// The state file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// The memory file does not have the length its layout requires.
    #[error("{path}: memory file is {actual} bytes but its layout needs {expected} ({reason})")]
    MemoryFileLength {
        /// The memory file.
        path: PathBuf,
        /// Layout size.
        expected: u64,
        /// Actual size.
        actual: u64,
        /// Shorter or longer.
        reason: &'static str,
    },
    /// The memory file a state file names does not exist.
    #[error("{path}: memory file of {state} is missing")]
    MissingMemory {
        /// Where the memory file should be.
        path: PathBuf,
        /// The state file naming it.
        state: PathBuf,
    },
    /// A memory file holds another snapshot's memory (swapped, or overwritten by an in-place
    /// merge since).
    #[error(
        "{path}: memory file holds snapshot {found}, but {state} is snapshot {expected} (the file was swapped, or an in-place merge has overwritten it since)"
    )]
    MemoryMismatch {
        /// The memory file.
        path: PathBuf,
        /// The state file that named it.
        state: PathBuf,
        /// The id its trailer carries.
        found: SnapshotId,
        /// The id of the state file.
        expected: SnapshotId,
    },
    /// A memory file's identity trailer is missing or damaged.
    #[error("{path}: not a squib memory file (identity trailer at offset {offset:#x})")]
    BadMemoryIdentity {
        /// The memory file.
        path: PathBuf,
        /// Where the trailer should start.
        offset: u64,
        /// What is wrong with it.
        source: FormatError,
    },
    /// An in-place merge failed after it had started changing the base's memory file.
    #[error(
        "{path}: in-place merge failed after the memory file was changed; the snapshot it held can no longer be loaded (take a full snapshot)"
    )]
    InPlaceMerge {
        /// The memory file.
        path: PathBuf,
        /// What failed.
        source: Box<SnapshotError>,
    },
    /// An extent lies past the end of the memory file.
    #[error(
        "{path}: extent at {gpa:#x}+{len:#x} (file offset {offset:#x}) lies past the end of the {file_len}-byte memory file"
    )]
    ExtentPastMemoryFile {
        /// The memory file.
        path: PathBuf,
        /// Extent start.
        gpa: u64,
        /// Extent length.
        len: u64,
        /// Its offset in the file.
        offset: u64,
        /// The file's length.
        file_len: u64,
    },
    /// An extent's bytes do not hash to its recorded checksum.
    #[error(
        "{path}: extent at {gpa:#x}+{len:#x} is corrupt: xxh3 {found:#018x}, state file says {expected:#018x}"
    )]
    Checksum {
        /// The memory file.
        path: PathBuf,
        /// Extent start.
        gpa: u64,
        /// Extent length.
        len: u64,
        /// Recorded hash.
        expected: u64,
        /// Hash of the bytes read.
        found: u64,
    },
    /// A diff's parent directory is missing.
    #[error("{path}: parent snapshot {parent} (id {id}) is missing")]
    MissingParent {
        /// The diff's state file.
        path: PathBuf,
        /// Where the parent should be.
        parent: PathBuf,
        /// The parent's id.
        id: SnapshotId,
    },
    /// The directory the parent reference leads to holds another snapshot.
    #[error("{path}: parent {parent} has id {found}, but the diff names id {expected}")]
    ParentMismatch {
        /// The diff's state file.
        path: PathBuf,
        /// The parent directory.
        parent: PathBuf,
        /// Id named by the diff.
        expected: SnapshotId,
        /// Id found there.
        found: SnapshotId,
    },
    /// Following parents returns to a snapshot already visited.
    #[error("{path}: the chain has a cycle (snapshot {id} is reached twice)")]
    Cycle {
        /// The state file reached twice.
        path: PathBuf,
        /// Its id.
        id: SnapshotId,
    },
    /// The chain is longer than [`MAX_CHAIN_LEN`].
    #[error("{path}: chain longer than {MAX_CHAIN_LEN} snapshots")]
    ChainTooLong {
        /// Where the walk stopped.
        path: PathBuf,
    },
    /// A snapshot does not match what it is combined with or restored into.
    #[error("{path}: {what} mismatch: expected {expected}, found {found}")]
    Incompatible {
        /// The state file.
        path: PathBuf,
        /// `"backend"`, `"geometry"` or `"memory layout"`.
        what: &'static str,
        /// What was required.
        expected: String,
        /// What the file says.
        found: String,
    },
    /// The guest memory handed to a save cannot be described by a layout.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// A range handed to a diff save is not inside guest memory or not granule-aligned.
    #[error("dirty range {start:#x}+{len:#x}: {reason}")]
    BadRange {
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The destination already exists (a snapshot is never overwritten).
    #[error("{path}: destination already exists")]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },
    /// A diff was requested with no full snapshot in the chain yet.
    #[error("{path}: no full snapshot to chain a diff to")]
    NoBase {
        /// The chain directory.
        path: PathBuf,
    },
    /// Arguments that cannot work together.
    #[error("{path}: {reason}")]
    Usage {
        /// The directory concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl SnapshotError {
    /// Wrap an I/O error with its path.
    pub(crate) fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Self::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}
