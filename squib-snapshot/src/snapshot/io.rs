//! The one seam between snapshot writing and the file system's write and rename calls.
//!
//! Why a seam: "nothing at the destination changes on ENOSPC" and "a file system without
//! `RENAME_NOREPLACE` still never loses a snapshot" are promises that must be tested, and a full
//! disk or an NFS mount is hard to arrange on every machine. Every byte a save writes goes through
//! [`SnapshotIo::write_at`] and the final rename through [`SnapshotIo::rename_noreplace`], so a
//! test can inject a writer that fails after N bytes with any `errno`, or a file system that
//! refuses the rename flag, and check what the save leaves behind.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Positional writes for snapshot files.
pub trait SnapshotIo: Send + Sync + std::fmt::Debug {
    /// Write all of `buf` at `offset` in `file`.
    ///
    /// # Errors
    /// The OS error (for example ENOSPC).
    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> std::io::Result<()>;

    /// Rename `from` to `to`, failing if `to` exists: `renameat2(RENAME_NOREPLACE)` (on macOS,
    /// `renameatx_np(RENAME_EXCL)`).
    ///
    /// # Errors
    /// The OS error: `EEXIST` when `to` exists; `EINVAL` (or `ENOSYS`, `EOPNOTSUPP`) where the
    /// file system or kernel does not support the flag (NFS, older overlayfs), in which case the
    /// save falls back to a plain `rename` that cannot replace a snapshot (see `save.rs`).
    fn rename_noreplace(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        use rustix::fs::{CWD, RenameFlags, renameat_with};
        renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE).map_err(std::io::Error::from)
    }
}

/// Plain `pwrite` (through [`FileExt::write_all_at`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectIo;

impl SnapshotIo for DirectIo {
    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        file.write_all_at(buf, offset)
    }
}
