//! Where a run loop's checkpoints go.
//!
//! Every backend's run loop (soft, KVM, HVF) takes checkpoints the same way: the tracker drains,
//! re-protects and hands the dirty ranges to a writer while the guest runs. One trait for that
//! writer keeps the run loops apart from the snapshot files, and lets a test inject a writer that
//! fails (the tracker then folds the ranges back).

use squib_arch::{GpaRange, PageGeometry};
use vm_memory::{GuestMemoryMmap, bitmap::AtomicBitmap};

use crate::snapshot::{ChainWriter, SavedSnapshot, SnapshotError, SnapshotMeta};

/// Receives each checkpoint's dirty ranges while the guest keeps running: a snapshot writer, or
/// an accountant.
pub trait CheckpointSink {
    /// What writing can fail with; the tracker folds the ranges back on failure.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Save `ranges` (sorted, coalesced) of `mem` as checkpoint `index` (0 is the first). Runs
    /// after the ranges were re-protected, while vCPUs may be writing.
    ///
    /// # Errors
    /// Whatever the writer reports.
    fn write(
        &mut self,
        index: u64,
        ranges: &[GpaRange],
        mem: &GuestMemoryMmap<AtomicBitmap>,
    ) -> Result<(), Self::Error>;

    /// Called once at the end of a run, right after its closing checkpoint was written and while
    /// the guest is still stopped: `mem` is exactly the image that checkpoint saved (what a
    /// restore of the chain must give back). Not called when the closing checkpoint failed. The
    /// default does nothing.
    ///
    /// # Errors
    /// Whatever the sink reports; the run fails with it.
    fn finish(&mut self, mem: &GuestMemoryMmap<AtomicBitmap>) -> Result<(), Self::Error> {
        let _ = mem;
        Ok(())
    }
}

/// `None` saves nothing; `Some(sink)` is that sink. (A run with an optional snapshot directory.)
impl<S: CheckpointSink> CheckpointSink for Option<S> {
    type Error = S::Error;
    fn write(
        &mut self,
        index: u64,
        ranges: &[GpaRange],
        mem: &GuestMemoryMmap<AtomicBitmap>,
    ) -> Result<(), S::Error> {
        self.as_mut().map_or(Ok(()), |s| s.write(index, ranges, mem))
    }

    fn finish(&mut self, mem: &GuestMemoryMmap<AtomicBitmap>) -> Result<(), S::Error> {
        self.as_mut().map_or(Ok(()), |s| s.finish(mem))
    }
}

/// A sink that saves nothing: the run's own records are the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingSink;

impl CheckpointSink for CountingSink {
    type Error = std::convert::Infallible;
    fn write(
        &mut self,
        _: u64,
        _: &[GpaRange],
        _: &GuestMemoryMmap<AtomicBitmap>,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A sink that writes a snapshot chain: the first checkpoint a full snapshot, every later one a
/// diff chained to the one before (`squib run --snapshot-dir`).
///
/// A full snapshot taken while vCPUs run is fuzzy, but the tracker re-protected all memory before
/// the copy began, so every write that lands during the copy is in the next diff: the chain
/// restores exactly to every later quiescent checkpoint.
#[derive(Debug)]
pub struct ChainSink {
    writer: ChainWriter,
    meta: SnapshotMeta,
    saved: Vec<SavedSnapshot>,
}

impl ChainSink {
    /// A sink writing a new chain into `dir` (created if missing) for a VM of `backend` with
    /// `geometry`.
    ///
    /// # Errors
    /// [`SnapshotError`] if `dir` cannot be created or already holds snapshots.
    pub fn create(
        dir: &std::path::Path,
        backend: &str,
        geometry: PageGeometry,
    ) -> Result<Self, SnapshotError> {
        Ok(Self {
            writer: ChainWriter::create(dir)?,
            meta: SnapshotMeta::new(backend, geometry),
            saved: Vec::new(),
        })
    }

    /// What was saved so far, in chain order.
    #[must_use]
    pub fn saved(&self) -> &[SavedSnapshot] {
        &self.saved
    }
}

impl CheckpointSink for ChainSink {
    type Error = SnapshotError;
    fn write(
        &mut self,
        _index: u64,
        ranges: &[GpaRange],
        mem: &GuestMemoryMmap<AtomicBitmap>,
    ) -> Result<(), SnapshotError> {
        let saved = self.writer.save(mem, ranges, &self.meta)?;
        self.saved.push(saved);
        Ok(())
    }
}
