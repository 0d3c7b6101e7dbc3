//! The one seam between snapshot writing and the file system's write calls.
//!
//! Why a seam: "nothing at the destination changes on ENOSPC" is a promise that must be tested,
//! and a full disk is hard to arrange on every machine. Every byte a save writes goes through
//! [`SnapshotIo::write_at`], so a test can inject a writer that fails after N bytes with any
//! `errno` and check what the save leaves behind.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Positional writes for snapshot files.
pub trait SnapshotIo: Send + Sync + std::fmt::Debug {
    /// Write all of `buf` at `offset` in `file`.
    ///
    /// # Errors
    /// The OS error (for example ENOSPC).
    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> std::io::Result<()>;
}

/// Plain `pwrite` (through [`FileExt::write_all_at`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectIo;

impl SnapshotIo for DirectIo {
    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        file.write_all_at(buf, offset)
    }
}
