//! Checking a snapshot chain end to end without restoring it.
//!
//! Why keep going after the first bad extent: an operator deciding whether a chain can be
//! salvaged wants every corrupt extent listed, not just the first. Structural errors (a bad state
//! file, a broken link) stop the walk, since nothing after them can be trusted.

use std::path::{Path, PathBuf};

use super::SnapshotError;
use super::load::Chain;

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// The chain's snapshots (directories or state files), base first.
    pub chain: Vec<PathBuf>,
    /// Extents whose bytes were hashed.
    pub extents_checked: u64,
    /// Bytes hashed.
    pub bytes_checked: u64,
    /// Every corrupt extent, as an error naming its memory file.
    pub problems: Vec<SnapshotError>,
}

impl VerifyReport {
    /// Whether the chain is sound: it loaded and every extent matched its checksum.
    #[must_use]
    pub fn is_sound(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verify the chain ending at `dir`: CRC and rules of every state file, links back to a full
/// base, extents inside the layout and the memory file, and every extent's checksum.
///
/// # Errors
/// A structural [`SnapshotError`] (the chain does not load). Corrupt extents are reported in
/// [`VerifyReport::problems`] instead.
pub fn verify(dir: &Path) -> Result<VerifyReport, SnapshotError> {
    let chain = Chain::load(dir)?;
    let mut report = VerifyReport {
        chain: chain.members.iter().map(|m| m.path.clone()).collect(),
        ..VerifyReport::default()
    };
    let mut buf = Vec::new();
    for m in &chain.members {
        // One memory file open at a time, whatever the chain's length.
        let file = m.open_memory()?;
        for e in &m.state.extents {
            match file.read_extent(e, &mut buf, &mut |_, _| Ok(())) {
                Ok(()) => {
                    report.extents_checked += 1;
                    report.bytes_checked += e.len;
                }
                Err(err @ SnapshotError::Checksum { .. }) => {
                    report.extents_checked += 1;
                    report.bytes_checked += e.len;
                    report.problems.push(err);
                }
                Err(other) => return Err(other),
            }
        }
    }
    Ok(report)
}
