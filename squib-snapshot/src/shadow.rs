//! Test kit: a checkpoint sink that rebuilds guest memory from what it is handed, as a chain
//! restore does, and checks it byte for byte against the guest's own memory when the run ends.
//!
//! Why: a run's counters only say that checkpoints happened. Whether a write was lost shows only
//! when base + diffs are compared with the memory they claim to hold, and that memory is a ground
//! truth the tracker did not produce. The first checkpoint a [`ShadowSink`] accepts is copied
//! whole (a full snapshot, fuzzy while vCPUs run; every write during the copy faults into the
//! next epoch), each later one only its ranges (a diff). Runners call
//! [`CheckpointSink::finish`] right after the closing checkpoint with the guest stopped; that is
//! where the comparison runs, and where the guest's final image is kept for other comparisons
//! (a chain on disk, say).

use squib_arch::GpaRange;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::sink::{CheckpointSink, CountingSink};

/// Bytes copied or compared per step.
const STEP: usize = 1 << 20;

/// What a [`ShadowSink`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError<E: std::error::Error + 'static> {
    /// The wrapped sink failed (the shadow was not updated).
    #[error("the wrapped sink failed")]
    Inner(#[source] E),
    /// Guest memory could not be read or the shadow not built.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Base + diffs differ from the guest's memory.
    #[error("base + diffs differ from guest memory at {gpa:#x}: a write was lost")]
    LostWrite {
        /// The first differing byte.
        gpa: u64,
    },
}

/// A sink that keeps base + diffs in memory and checks them against guest memory at the end of a
/// run. Wraps another sink (`inner`), which sees every call first; a checkpoint `inner` refuses
/// is not applied (the tracker folds its units into the next one).
#[derive(Debug)]
pub struct ShadowSink<S = CountingSink> {
    /// The wrapped sink.
    pub inner: S,
    shadow: Vec<(u64, Vec<u8>)>,
    /// Every checkpoint applied: its index and ranges.
    pub seen: Vec<(u64, Vec<GpaRange>)>,
    /// Every checkpoint the wrapped sink refused: its index and ranges.
    pub refused: Vec<(u64, Vec<GpaRange>)>,
    /// Guest memory as `finish` found it (region start, bytes), once it ran and matched.
    pub final_image: Option<Vec<(u64, Vec<u8>)>>,
}

impl<S> ShadowSink<S> {
    /// A shadow in front of `inner`.
    pub const fn new(inner: S) -> Self {
        Self {
            inner,
            shadow: Vec::new(),
            seen: Vec::new(),
            refused: Vec::new(),
            final_image: None,
        }
    }

    /// Bytes `finish` compared (0 before it ran).
    #[must_use]
    pub fn verified_bytes(&self) -> u64 {
        self.final_image
            .as_ref()
            .map_or(0, |img| img.iter().map(|(_, b)| b.len() as u64).sum())
    }
}

fn read<E: std::error::Error>(
    mem: &GuestMemoryMmap<AtomicBitmap>,
    gpa: u64,
    out: &mut [u8],
) -> Result<(), ShadowError<E>> {
    for (i, chunk) in out.chunks_mut(STEP).enumerate() {
        let at = gpa + (i * STEP) as u64;
        mem.read_slice(chunk, GuestAddress(at))
            .map_err(|e| ShadowError::Memory(format!("reading {at:#x}: {e}")))?;
    }
    Ok(())
}

fn image<E: std::error::Error>(
    mem: &GuestMemoryMmap<AtomicBitmap>,
) -> Result<Vec<(u64, Vec<u8>)>, ShadowError<E>> {
    let mut regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    regions.sort_unstable();
    regions
        .into_iter()
        .map(|(gpa, len)| {
            let len = usize::try_from(len)
                .map_err(|_| ShadowError::Memory(format!("region {gpa:#x} too large")))?;
            let mut bytes = vec![0u8; len];
            read(mem, gpa, &mut bytes)?;
            Ok((gpa, bytes))
        })
        .collect()
}

impl<S: CheckpointSink> CheckpointSink for ShadowSink<S> {
    type Error = ShadowError<S::Error>;

    fn write(
        &mut self,
        index: u64,
        ranges: &[GpaRange],
        mem: &GuestMemoryMmap<AtomicBitmap>,
    ) -> Result<(), Self::Error> {
        if let Err(e) = self.inner.write(index, ranges, mem) {
            self.refused.push((index, ranges.to_vec()));
            return Err(ShadowError::Inner(e));
        }
        if self.seen.is_empty() {
            self.shadow = image(mem)?;
        } else {
            for r in ranges {
                let (base, bytes) = self
                    .shadow
                    .iter_mut()
                    .find(|(base, b)| r.start() >= *base && r.end() <= *base + b.len() as u64)
                    .ok_or_else(|| ShadowError::Memory(format!("range {r} is not inside one region")))?;
                let off =
                    usize::try_from(r.start() - *base).map_err(|_| ShadowError::Memory(format!("{r}")))?;
                let len = usize::try_from(r.len()).map_err(|_| ShadowError::Memory(format!("{r}")))?;
                read(mem, r.start(), &mut bytes[off..off + len])?;
            }
        }
        self.seen.push((index, ranges.to_vec()));
        Ok(())
    }

    fn finish(&mut self, mem: &GuestMemoryMmap<AtomicBitmap>) -> Result<(), Self::Error> {
        self.inner.finish(mem).map_err(ShadowError::Inner)?;
        let actual = image(mem)?;
        for ((base, want), (_, got)) in self.shadow.iter().zip(&actual) {
            if let Some(i) = want.iter().zip(got).position(|(a, b)| a != b) {
                return Err(ShadowError::LostWrite { gpa: base + i as u64 });
            }
        }
        if self.shadow.len() != actual.len() {
            return Err(ShadowError::Memory("no checkpoint was applied".into()));
        }
        self.final_image = Some(actual);
        Ok(())
    }
}
